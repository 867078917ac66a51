//! Which `jwksUri` hosts the control plane refuses to fetch from unless started with `--jwks-allow-local`: loopback
//! (127.0.0.0/8, ::1, `localhost`), link-local (169.254.0.0/16, where cloud metadata services answer, and
//! fe80::/10) and unspecified (0.0.0.0/8, ::, which reach this host) addresses. Otherwise anyone who may apply a
//! RequestAuthentication could make the control plane fetch from services only this host can reach, every refresh
//! (server-side request forgery). Checked twice: at apply time on the URI's literal host ([`literal_host`]), and at
//! fetch time on every address the host resolves to ([`local_kind`]), which the connection then uses.
//! Pure code: no resolution here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The flag that allows local hosts, named in refusals.
pub const ALLOW_FLAG: &str = "--jwks-allow-local";

/// Why an address is local: "loopback", "link-local" or "unspecified"; `None` for any other address.
pub fn local_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_kind(v4),
            None => v6_kind(v6),
        },
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.octets()[0] == 0 {
        Some("unspecified")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else {
        None
    }
}

/// A `jwksUri` whose literal host is local, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {host} is a {kind} address: refused (start the control plane with {ALLOW_FLAG} to allow it)")]
pub struct LocalHost {
    pub host: String,
    pub kind: &'static str,
}

/// The URI's host, if it is a local IP address or `localhost` (or a name under `.localhost`, which resolvers map
/// to loopback, RFC 6761). Hosts that cannot be read are left to the fetch, which refuses them itself.
pub fn literal_host(uri: &str) -> Option<LocalHost> {
    let parsed: hyper::Uri = uri.parse().ok()?;
    let host = parsed.host()?.trim_start_matches('[').trim_end_matches(']');
    let kind = match host.parse::<IpAddr>() {
        Ok(ip) => local_kind(ip)?,
        Err(_) => {
            let name = host.trim_end_matches('.').to_ascii_lowercase();
            (name == "localhost" || name.ends_with(".localhost")).then_some("loopback")?
        }
    };
    Some(LocalHost { host: host.to_owned(), kind })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses() {
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("::ffff:169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
        ] {
            assert_eq!(local_kind(ip.parse().unwrap()), Some(kind), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.1.1",
            "8.8.8.8",
            "169.255.0.1",
            "128.0.0.1",
            "2001:db8::1",
            "fec0::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(local_kind(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn literal_hosts() {
        let refused = |uri: &str| literal_host(uri).map(|l| (l.host, l.kind));
        assert_eq!(refused("http://127.0.0.1:8080/jwks.json"), Some(("127.0.0.1".into(), "loopback")));
        assert_eq!(refused("https://[::1]/jwks"), Some(("::1".into(), "loopback")));
        assert_eq!(refused("https://[::ffff:169.254.169.254]/"), Some(("::ffff:169.254.169.254".into(), "link-local")));
        assert_eq!(refused("http://169.254.169.254/latest/meta-data/"), Some(("169.254.169.254".into(), "link-local")));
        assert_eq!(refused("https://LocalHost./jwks"), Some(("LocalHost.".into(), "loopback")));
        assert_eq!(refused("https://auth.localhost/jwks"), Some(("auth.localhost".into(), "loopback")));
        assert_eq!(refused("https://user@127.0.0.1/jwks"), Some(("127.0.0.1".into(), "loopback")));
        // Control: other hosts pass (a name is checked again once resolved, at fetch time).
        for uri in ["https://auth.example.com/jwks", "https://10.0.0.1/jwks", "https://localhost.example.com/", "x"] {
            assert_eq!(refused(uri), None, "{uri}");
        }
        assert_eq!(
            literal_host("http://127.0.0.1/").unwrap().to_string(),
            "host 127.0.0.1 is a loopback address: refused (start the control plane with --jwks-allow-local to allow it)"
        );
    }
}
