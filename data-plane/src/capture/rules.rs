//! The nftables ruleset for transparent capture, rendered as text for `nft -f -`. Pure: the same spec always gives
//! the same text (golden tests below).
//!
//! One table, `inet trellis`, with two NAT chains:
//! - `output` (locally generated): every TCP connection is redirected to the outbound listener, except the
//!   proxy's own (SO_MARK), loopback destinations, and the configured excluded ports and networks;
//! - `prerouting` (arriving from the network): TCP to a workload address is redirected to the plaintext inbound
//!   listener, except HBONE (mTLS from other proxies), the proxy's metrics and readiness ports, and excluded ports.
//!
//! With `capture.preserveSourceAddress` a third chain, `preserve_source` (route hook output, mangle priority), lets
//! the workloads' answers to the proxy's transparent dials (from the client's address, IP_TRANSPARENT) come back to
//! the proxy: each new connection the proxy opens (its mark) gets the conntrack mark `returnMark`, and every answer
//! on such a connection gets `returnMark` as packet mark, which re-routes it through the policy routing
//! [`ReturnRoute::ip_commands`] installs (`ip rule fwmark <returnMark> lookup <routeTable>`, whose table holds only
//! `local default dev lo`): delivered to the proxy instead of sent out towards the client's real host. Marking every
//! proxy connection, not only the transparent ones, is harmless: an answer that passes the output hook comes from a
//! local socket to a local address, which is delivered locally either way.
//!
//! The transaction first adds the table (a no-op if it exists), deletes it, then creates it: one atomic step that
//! replaces a leftover table from a crash instead of adding a second copy of the rules.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use trellis_policy::Cidr;

use crate::config::Config;

pub const TABLE: &str = "trellis";

/// What the rules need to know; built from the proxy's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    pub mark: u32,
    /// Port of the captured outbound listener (listen.outbound).
    pub outbound_port: u16,
    /// Port of the plaintext inbound listener (listen.inbound).
    pub inbound_port: u16,
    pub workload_addresses: BTreeSet<IpAddr>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Configured exclusions plus the proxy's own listeners reached on workload addresses (HBONE, metrics, ready).
    pub exclude_inbound_ports: BTreeSet<u16>,
    /// `capture.preserveSourceAddress`: the return route for transparent dials; `None` when off.
    pub preserve_source: Option<ReturnRoute>,
}

/// The policy routing that brings answers to transparent dials back to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReturnRoute {
    pub mark: u32,
    pub table: u32,
}

impl ReturnRoute {
    /// The `ip` invocations that install the route, both families; each is idempotent (`replace`), except `rule
    /// add`, which [`ReturnRoute::remove_commands`] run first make so.
    pub fn ip_commands(&self) -> Vec<Vec<String>> {
        let (mark, table) = (format!("{:#x}", self.mark), self.table.to_string());
        let mut out = Vec::new();
        for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            out.push(words(&[family, "route", "replace", "local", default, "dev", "lo", "table", &table]));
            out.push(words(&[family, "rule", "add", "fwmark", &mark, "lookup", &table, "priority", RULE_PRIORITY]));
        }
        out
    }

    /// The `ip` invocations that remove the route; each may fail when there is nothing to remove.
    pub fn remove_commands(&self) -> Vec<Vec<String>> {
        let (mark, table) = (format!("{:#x}", self.mark), self.table.to_string());
        let mut out = Vec::new();
        for family in ["-4", "-6"] {
            out.push(words(&[family, "rule", "del", "fwmark", &mark, "lookup", &table, "priority", RULE_PRIORITY]));
            out.push(words(&[family, "route", "flush", "table", &table]));
        }
        out
    }
}

/// The `ip rule` priority of the return route: before the main table (32766), after the local table (0).
pub const RULE_PRIORITY: &str = "7472";

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| (*s).to_owned()).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "{field}: {address} must listen on 127.0.0.1 or 0.0.0.0 for capture (outbound REDIRECT delivers to 127.0.0.1)"
    )]
    OutboundAddress { field: &'static str, address: std::net::SocketAddr },
    #[error(
        "{field}: {address} must listen on a wildcard address (0.0.0.0 or ::) for capture (inbound REDIRECT delivers \
         to the address of the interface the packet arrived on)"
    )]
    InboundAddress { field: &'static str, address: std::net::SocketAddr },
    #[error("{field}: {address} has port 0, which capture cannot use (its rules name the port before it is bound)")]
    PortZero { field: &'static str, address: std::net::SocketAddr },
}

impl CaptureSpec {
    pub fn from_config(config: &Config) -> Result<CaptureSpec, SpecError> {
        let listen = &config.listen;
        let named = [
            ("listen.outbound", listen.outbound),
            ("listen.inbound", listen.inbound),
            ("listen.hbone", listen.hbone),
            ("listen.metrics", listen.metrics),
            ("listen.ready", listen.ready),
        ];
        if let Some((field, address)) = named.into_iter().find(|(_, a)| a.port() == 0) {
            return Err(SpecError::PortZero { field, address });
        }
        if !(listen.outbound.ip().is_loopback() || listen.outbound.ip().is_unspecified()) {
            return Err(SpecError::OutboundAddress { field: "listen.outbound", address: listen.outbound });
        }
        if !listen.inbound.ip().is_unspecified() {
            return Err(SpecError::InboundAddress { field: "listen.inbound", address: listen.inbound });
        }
        let capture = &config.capture;
        let mut exclude_inbound_ports: BTreeSet<u16> = capture.exclude_inbound_ports.iter().copied().collect();
        exclude_inbound_ports.extend([listen.hbone.port(), listen.metrics.port(), listen.ready.port()]);
        Ok(CaptureSpec {
            mark: capture.mark,
            outbound_port: listen.outbound.port(),
            inbound_port: listen.inbound.port(),
            workload_addresses: config.workloads.iter().flat_map(|w| w.addresses.iter().copied()).collect(),
            exclude_outbound_ports: capture.exclude_outbound_ports.iter().copied().collect(),
            exclude_outbound_cidrs: capture.exclude_outbound_cidrs.clone(),
            exclude_inbound_ports,
            preserve_source: capture
                .preserve_source_address
                .then_some(ReturnRoute { mark: capture.return_mark, table: capture.route_table }),
        })
    }

    /// The `nft -f -` input that installs (or replaces) the table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&remove_transaction());
        let _ = writeln!(out, "table inet {TABLE} {{");
        out.push_str("\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n");
        let _ = writeln!(out, "\t\tmeta mark {:#x} return", self.mark);
        out.push_str("\t\tip daddr 127.0.0.0/8 return\n\t\tip6 daddr ::1 return\n");
        if !self.exclude_outbound_ports.is_empty() {
            let _ = writeln!(out, "\t\ttcp dport {} return", set(&self.exclude_outbound_ports));
        }
        let (v4, v6): (Vec<&Cidr>, Vec<&Cidr>) = self.exclude_outbound_cidrs.iter().partition(|c| c.addr().is_ipv4());
        let networks =
            |list: &[&Cidr]| list.iter().map(|c| format!("{}/{}", c.network(), c.prefix_len())).collect::<Vec<_>>();
        if !v4.is_empty() {
            let _ = writeln!(out, "\t\tip daddr {} return", set(networks(&v4)));
        }
        if !v6.is_empty() {
            let _ = writeln!(out, "\t\tip6 daddr {} return", set(networks(&v6)));
        }
        let _ = writeln!(out, "\t\tmeta l4proto tcp redirect to :{}", self.outbound_port);
        out.push_str("\t}\n\n");

        out.push_str("\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n");
        if !self.exclude_inbound_ports.is_empty() {
            let _ = writeln!(out, "\t\ttcp dport {} return", set(&self.exclude_inbound_ports));
        }
        let (v4, v6): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) =
            self.workload_addresses.iter().partition(|ip| ip.is_ipv4());
        for (family, addresses) in [("ip", v4), ("ip6", v6)] {
            if !addresses.is_empty() {
                let _ = writeln!(
                    out,
                    "\t\t{family} daddr {} meta l4proto tcp redirect to :{}",
                    set(&addresses),
                    self.inbound_port
                );
            }
        }
        out.push_str("\t}\n");
        if let Some(route) = self.preserve_source {
            out.push_str("\n\tchain preserve_source {\n\t\ttype route hook output priority mangle; policy accept;\n");
            let _ = writeln!(out, "\t\tmeta mark {:#x} ct state new ct mark set {:#x}", self.mark, route.mark);
            let _ = writeln!(out, "\t\tct direction reply ct mark {:#x} meta mark set {:#x}", route.mark, route.mark);
            out.push_str("\t}\n");
        }
        out.push_str("}\n");
        out
    }
}

/// The transaction that removes the table, whether or not it exists.
pub fn remove_transaction() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// `{ a, b }` (nft accepts a one-element set too; keeping one form keeps the rendering simple).
fn set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CaptureSpec {
        CaptureSpec {
            mark: 0x7472,
            outbound_port: 15001,
            inbound_port: 15006,
            workload_addresses: ["10.200.1.2", "10.200.1.3", "fd00::2"].iter().map(|a| a.parse().unwrap()).collect(),
            exclude_outbound_ports: [53, 22].into(),
            exclude_outbound_cidrs: vec!["169.254.1.1/16".parse().unwrap(), "fd00:ff::/32".parse().unwrap()],
            exclude_inbound_ports: [15008, 15020, 15021, 22].into(),
            preserve_source: Some(ReturnRoute { mark: 0x7473, table: 7472 }),
        }
    }

    #[test]
    fn golden_full() {
        let want = "add table inet trellis
delete table inet trellis
table inet trellis {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x7472 return
\t\tip daddr 127.0.0.0/8 return
\t\tip6 daddr ::1 return
\t\ttcp dport { 22, 53 } return
\t\tip daddr { 169.254.0.0/16 } return
\t\tip6 daddr { fd00:ff::/32 } return
\t\tmeta l4proto tcp redirect to :15001
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\ttcp dport { 22, 15008, 15020, 15021 } return
\t\tip daddr { 10.200.1.2, 10.200.1.3 } meta l4proto tcp redirect to :15006
\t\tip6 daddr { fd00::2 } meta l4proto tcp redirect to :15006
\t}

\tchain preserve_source {
\t\ttype route hook output priority mangle; policy accept;
\t\tmeta mark 0x7472 ct state new ct mark set 0x7473
\t\tct direction reply ct mark 0x7473 meta mark set 0x7473
\t}
}
";
        assert_eq!(spec().render(), want);
    }

    #[test]
    fn return_route_commands_install_and_remove_both_families() {
        let route = ReturnRoute { mark: 0x7473, table: 7472 };
        let line = |c: &Vec<String>| c.join(" ");
        assert_eq!(
            route.ip_commands().iter().map(line).collect::<Vec<_>>(),
            [
                "-4 route replace local 0.0.0.0/0 dev lo table 7472",
                "-4 rule add fwmark 0x7473 lookup 7472 priority 7472",
                "-6 route replace local ::/0 dev lo table 7472",
                "-6 rule add fwmark 0x7473 lookup 7472 priority 7472",
            ]
        );
        assert_eq!(
            route.remove_commands().iter().map(line).collect::<Vec<_>>(),
            [
                "-4 rule del fwmark 0x7473 lookup 7472 priority 7472",
                "-4 route flush table 7472",
                "-6 rule del fwmark 0x7473 lookup 7472 priority 7472",
                "-6 route flush table 7472",
            ]
        );
    }

    #[test]
    fn golden_minimal_omits_empty_sets() {
        let spec = CaptureSpec {
            workload_addresses: BTreeSet::new(),
            exclude_outbound_ports: BTreeSet::new(),
            exclude_outbound_cidrs: Vec::new(),
            exclude_inbound_ports: BTreeSet::new(),
            preserve_source: None,
            ..spec()
        };
        let want = "add table inet trellis
delete table inet trellis
table inet trellis {
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta mark 0x7472 return
\t\tip daddr 127.0.0.0/8 return
\t\tip6 daddr ::1 return
\t\tmeta l4proto tcp redirect to :15001
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t}
}
";
        assert_eq!(spec.render(), want);
    }

    #[test]
    fn remove_is_idempotent_text() {
        assert_eq!(remove_transaction(), "add table inet trellis\ndelete table inet trellis\n");
    }

    #[test]
    fn spec_from_config_adds_own_ports_and_checks_listen_addresses() {
        let base = "node: a\ncontrolPlane: {address: 'cp:15012', caPin: 'sha256:0000000000000000000000000000000000000000000000000000000000000000'}\nstateDir: /x\nworkloads:\n  - {name: w, namespace: ns, serviceAccount: sa, addresses: [10.200.1.2], ports: [{port: 80, protocol: tcp}]}\ncapture: {excludeInboundPorts: [22], excludeOutboundPorts: [53], mark: 7}\n";
        let spec = CaptureSpec::from_config(&Config::parse(base).unwrap()).unwrap();
        assert_eq!(spec.exclude_inbound_ports, [22, 15008, 15020, 15021].into());
        assert_eq!(spec.exclude_outbound_ports, [53].into());
        assert_eq!((spec.mark, spec.outbound_port, spec.inbound_port), (7, 15001, 15006));
        assert_eq!(spec.workload_addresses, ["10.200.1.2".parse().unwrap()].into());
        assert_eq!(spec.preserve_source, Some(ReturnRoute { mark: 0x7473, table: 7472 }), "on by default");
        let off = format!("{}, preserveSourceAddress: false}}\n", base.trim_end().trim_end_matches('}'));
        assert_eq!(CaptureSpec::from_config(&Config::parse(&off).unwrap()).unwrap().preserve_source, None);

        let err =
            CaptureSpec::from_config(&Config::parse(&format!("{base}listen: {{inbound: 127.0.0.1:15006}}\n")).unwrap())
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("listen.inbound: 127.0.0.1:15006 must listen on a wildcard address"), "{err}");
        let err =
            CaptureSpec::from_config(&Config::parse(&format!("{base}listen: {{outbound: 10.0.0.1:15001}}\n")).unwrap())
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("listen.outbound: 10.0.0.1:15001 must listen on 127.0.0.1 or 0.0.0.0"), "{err}");
        let err = CaptureSpec::from_config(&Config::parse(&format!("{base}listen: {{ready: 0.0.0.0:0}}\n")).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("listen.ready: 0.0.0.0:0 has port 0, which capture cannot use"), "{err}");
    }
}
