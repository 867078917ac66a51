//! The `jwksUri` check: an absolute http(s) URL with a host, as Istio's `ParseJwksURI` (Go's `net/url`) reads it.
//!
//! Hand-written rather than the `url` crate: `url` is not in the dependency tree (it would add about 25 crates,
//! ICU tables among them, to every binary that links the policy), and it parses by the WHATWG rules, which accept
//! what Go refuses (`https:example.com`, `\` as `/`, tabs and newlines removed, `https:///jwks` read as host
//! `jwks`), so each difference would need a check of its own in front of it anyway.

use crate::lexical::parse_port;

/// An absolute http(s) URL with a host, as Istio's `ParseJwksURI` needs to derive host and port.
pub(crate) fn check_http_url(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{s:?} is not a valid http(s) URL: {why}"));
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains whitespace or control characters");
    }
    let Some((scheme, rest)) = s.split_once("://") else { return bad("missing scheme (http:// or https://)") };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(format!("URI scheme {:?} is not supported: use http or https", scheme.to_ascii_lowercase()));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else { return bad("unterminated IPv6 address") };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("invalid IPv6 address");
        }
        match after {
            "" => (addr, None),
            p => match p.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return bad("unexpected characters after IPv6 address"),
            },
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return bad("missing host");
    }
    if host.contains(['[', ']', '@', '\\']) {
        return bad("invalid host");
    }
    if port.is_some_and(|p| !p.is_empty() && parse_port(p).is_none()) {
        return bad("invalid port");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for ok in [
            "https://example.com/.well-known/jwks.json",
            "http://example.com",
            "HTTPS://example.com:8443/jwks",
            "https://user@example.com/jwks",
            "https://[::1]:8080/jwks",
            "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json",
            // As Go's net/url: an empty port is no port; userinfo, query and fragment are allowed.
            "https://example.com:/jwks",
            "https://user:secret@example.com:8443/jwks?kid=1#frag",
            "https://a@b@example.com/jwks",
            "https://example.com:0/jwks",
            "https://bücher.example/jwks",
            "https://[fe80::1]/jwks",
        ] {
            assert_eq!(check_http_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "example.com/jwks",
            "ftp://example.com/jwks",
            "https://",
            "https:///jwks",
            "https://example.com:99999/jwks",
            "https://example.com:abc/",
            "https://exa mple.com/",
            "https://[::1/jwks",
            "https://[zz]/jwks",
        ] {
            assert!(check_http_url(bad).is_err(), "{bad}");
        }
        // Each refusal says why.
        let refusals = [
            ("example.com/jwks", "missing scheme (http:// or https://)"),
            ("https:example.com", "missing scheme (http:// or https://)"),
            ("https:///jwks", "missing host"),
            ("https://user@/jwks", "missing host"),
            ("https://exa\\mple.com/jwks", "invalid host"),
            ("https://example.com:65536/jwks", "invalid port"),
            ("https://example.com:8o/jwks", "invalid port"),
            ("https://[::1]x/jwks", "unexpected characters after IPv6 address"),
            ("https://exa\tmple.com/jwks", "contains whitespace or control characters"),
            (" https://example.com/jwks", "contains whitespace or control characters"),
        ];
        for (bad, why) in refusals {
            assert_eq!(check_http_url(bad), Err(format!("{bad:?} is not a valid http(s) URL: {why}")), "{bad}");
        }
        assert_eq!(
            check_http_url("FTP://example.com/jwks"),
            Err("URI scheme \"ftp\" is not supported: use http or https".to_string())
        );
    }
}
