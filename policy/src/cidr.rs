//! IP address / CIDR values for `ipBlocks`, `remoteIpBlocks` and the `*.ip` conditions.
//!
//! Own small parser (std::net only) with the same acceptance rules as Go's `netip.ParseAddr`/`ParsePrefix`, which
//! is what Istio validates with: no wildcards, no zones, no leading zeros in IPv4 octets or in the prefix length, and
//! host bits after the prefix are allowed (they are ignored for matching, as Envoy does).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IP network. A bare address is a host network (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Returned for a value that is neither an IP address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR")]
pub struct InvalidCidr(pub String);

impl Cidr {
    /// `None` if `prefix_len` exceeds the address width.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        (prefix_len <= max_len(&addr)).then_some(Cidr { addr, prefix_len })
    }

    /// The address as written (host bits are kept so the value displays as the user wrote it).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(self.prefix_len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(self.prefix_len))),
        }
    }

    /// Whether `ip` is inside the network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as seen on dual-stack
    /// sockets) is compared as the IPv4 address it carries.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
            IpAddr::V4(_) => *ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask_v4(self.prefix_len);
                u32::from(net) & m == u32::from(ip) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask_v6(self.prefix_len);
                u128::from(net) & m == u128::from(ip) & m
            }
            (IpAddr::V6(net), IpAddr::V4(ip)) => match net.to_ipv4_mapped() {
                // ::ffff:0:0/96-style networks written in IPv6 notation still match plain IPv4 peers.
                Some(_) if self.prefix_len >= 96 => {
                    let m = mask_v6(self.prefix_len);
                    u128::from(net) & m == u128::from(ip.to_ipv6_mapped()) & m
                }
                _ => false,
            },
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask_v4(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

fn mask_v6(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

fn parse_addr(s: &str) -> Option<IpAddr> {
    // std already rejects zones, brackets, whitespace and IPv4 octets with leading zeros.
    if s.contains(':') {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

fn parse_len(s: &str) -> Option<u8> {
    let valid =
        !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if valid { s.parse().ok() } else { None }
}

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCidr(s.to_string());
        match s.split_once('/') {
            Some((addr, len)) => {
                let addr = parse_addr(addr).ok_or_else(bad)?;
                let len = parse_len(len).ok_or_else(bad)?;
                Cidr::new(addr, len).ok_or_else(bad)
            }
            None => {
                let addr = parse_addr(s).ok_or_else(bad)?;
                Ok(Cidr { addr, prefix_len: max_len(&addr) })
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        // (input, expected Display or None for rejection)
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.1", Some("10.0.0.1/32")),
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            ("10.1.2.3/8", Some("10.1.2.3/8")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("203.0.113.4/32", Some("203.0.113.4/32")),
            ("::1", Some("::1/128")),
            ("2001:db8::/32", Some("2001:db8::/32")),
            ("::/0", Some("::/0")),
            ("::ffff:10.0.0.1", Some("::ffff:10.0.0.1/128")),
            ("10.0.0.300/8", None),
            ("10.0.0.0/33", None),
            ("10.0.0.0/", None),
            ("10.0.0.0/08", None),
            ("10.0.0.0/+8", None),
            ("10.0.0.0/8/8", None),
            ("2001:db8::/129", None),
            ("010.0.0.1", None),
            ("10.0.0", None),
            ("10.0.0.*", None),
            ("*", None),
            ("10.0.0.0/*", None),
            ("fe80::1%eth0", None),
            ("[::1]", None),
            (" 10.0.0.1", None),
            ("", None),
            ("example.com", None),
        ];
        for (input, want) in cases {
            let got = input.parse::<Cidr>().ok().map(|c| c.to_string());
            assert_eq!(got.as_deref(), *want, "{input}");
        }
        assert_eq!(
            "10.0.0.300/8".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.300/8\" is not an IP address or CIDR"
        );
    }

    #[test]
    fn contains_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3/8", "10.9.9.9", true),
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("0.0.0.0/0", "::1", false),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
            ("2001:db8::/32", "2001:db8:1::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "::1", true),
            ("::/0", "10.0.0.1", false),
            ("::ffff:10.0.0.0/104", "10.1.1.1", true),
            ("192.168.1.0/24", "192.168.2.1", false),
        ];
        for (net, ip, want) in cases {
            let net: Cidr = net.parse().unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(net.contains(&ip), *want, "{net} contains {ip}");
        }
    }

    #[test]
    fn network_clears_host_bits() {
        assert_eq!("10.1.2.3/8".parse::<Cidr>().unwrap().network().to_string(), "10.0.0.0");
        assert_eq!("2001:db8::1/64".parse::<Cidr>().unwrap().network().to_string(), "2001:db8::");
        assert_eq!("1.2.3.4/0".parse::<Cidr>().unwrap().network().to_string(), "0.0.0.0");
    }
}
