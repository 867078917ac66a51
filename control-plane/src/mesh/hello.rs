//! A proxy's Hello: the workloads its node declares, checked before the registry sees them (names, the node's
//! namespaces, addresses, ports), and completed with what the control plane owns.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use trellis_policy::check_dns1123_label;
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1 as pb;

use super::MeshError;
use crate::records::NodeRecord;

/// Checks a proxy's declaration and fills in what the control plane owns (node, proxy address, SPIFFE ID).
pub(super) fn validate(
    node: &NodeRecord,
    hello: &pb::Hello,
    trust_domain: &str,
) -> Result<BTreeMap<String, pb::Workload>, MeshError> {
    let invalid = |i: usize, msg: String| MeshError::InvalidArgument(format!("workloads[{i}]: {msg}"));
    if hello.hbone_address.parse::<std::net::SocketAddr>().is_err() {
        return Err(MeshError::InvalidArgument(format!(
            "hbone_address {:?} is not an IP:port address",
            hello.hbone_address
        )));
    }
    let mut out = BTreeMap::new();
    let mut addresses = BTreeSet::new();
    for (i, w) in hello.workloads.iter().enumerate() {
        check_dns1123_label(&w.name).map_err(|e| invalid(i, format!("name {:?}: {e}", w.name)))?;
        check_dns1123_label(&w.namespace).map_err(|e| invalid(i, format!("namespace {:?}: {e}", w.namespace)))?;
        if !node.namespaces.iter().any(|n| n == &w.namespace) {
            return Err(MeshError::PermissionDenied(format!(
                "workloads[{i}] ({}/{}): node {:?} may not host workloads in namespace {:?} (its token allows {})",
                w.namespace,
                w.name,
                node.name,
                w.namespace,
                node.namespaces.join(", ")
            )));
        }
        let spiffe_id = SpiffeId::workload(trust_domain, &w.namespace, &w.service_account)
            .map_err(|e| invalid(i, format!("serviceAccount {:?}: {e}", w.service_account)))?;
        if w.addresses.is_empty() {
            return Err(invalid(i, "has no addresses".into()));
        }
        for address in &w.addresses {
            let ip: IpAddr = address.parse().map_err(|_| invalid(i, format!("{address:?} is not an IP address")))?;
            if !addresses.insert(ip) {
                return Err(invalid(i, format!("address {address} is declared twice")));
            }
        }
        for port in &w.ports {
            if port.port == 0 || port.port > 65535 {
                return Err(invalid(i, format!("port {} is out of range 1-65535", port.port)));
            }
            if port.protocol() == pb::Protocol::Unspecified {
                return Err(invalid(i, format!("port {} has no protocol (tcp, http, http2 or grpc)", port.port)));
            }
        }
        let key = trellis_proto::workload_key(&w.namespace, &w.name);
        let mut w = w.clone();
        w.node = node.name.clone();
        w.proxy_address = hello.hbone_address.clone();
        w.spiffe_id = spiffe_id.to_string();
        if out.insert(key.clone(), w).is_some() {
            return Err(MeshError::InvalidArgument(format!("workload {key} is declared twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use trellis_proto::v1 as pb;

    use super::validate;
    use crate::mesh::testing::{TRUST_DOMAIN, hello, refusal, workload};
    use crate::records::NodeRecord;

    fn node() -> NodeRecord {
        NodeRecord {
            name: "n1".into(),
            namespaces: vec!["shop".into()],
            joined_at: 0,
            revoked: false,
            revoked_at: None,
            credential_serial: String::new(),
        }
    }

    fn refused(hello: &pb::Hello) -> (&'static str, String) {
        refusal(&validate(&node(), hello, TRUST_DOMAIN).unwrap_err())
    }

    fn good() -> pb::Workload {
        workload("shop", "api", "api-sa", &["10.0.0.1"])
    }

    #[test]
    fn a_valid_declaration_is_completed() {
        let declared = validate(&node(), &hello(vec![good()]), TRUST_DOMAIN).unwrap();
        let w = &declared["shop/api"];
        assert_eq!(w.node, "n1");
        assert_eq!(w.proxy_address, "127.0.0.1:15008");
        assert_eq!(w.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/api-sa"));
    }

    #[test]
    fn refusals_name_the_workload_and_the_reason() {
        let with = |edit: fn(&mut pb::Workload)| {
            let mut w = good();
            edit(&mut w);
            hello(vec![w])
        };
        let labels = "must be lowercase letters, digits and '-', starting and ending with a letter or digit";
        let cases: Vec<(pb::Hello, (&str, String))> = vec![
            (with(|w| w.name = "Api".into()), ("InvalidArgument", format!("workloads[0]: name \"Api\": {labels}"))),
            (
                with(|w| w.name = String::new()),
                ("InvalidArgument", "workloads[0]: name \"\": must not be empty".into()),
            ),
            (
                with(|w| w.namespace = "-shop".into()),
                ("InvalidArgument", format!("workloads[0]: namespace \"-shop\": {labels}")),
            ),
            (
                with(|w| w.namespace = "bank".into()),
                (
                    "PermissionDenied",
                    "workloads[0] (bank/api): node \"n1\" may not host workloads in namespace \"bank\" (its token \
                     allows shop)"
                        .into(),
                ),
            ),
            (with(|w| w.addresses.clear()), ("InvalidArgument", "workloads[0]: has no addresses".into())),
            (
                with(|w| w.addresses = vec!["10.0.0.300".into()]),
                ("InvalidArgument", "workloads[0]: \"10.0.0.300\" is not an IP address".into()),
            ),
            (
                with(|w| w.addresses = vec!["10.0.0.1".into(), "10.0.0.1".into()]),
                ("InvalidArgument", "workloads[0]: address 10.0.0.1 is declared twice".into()),
            ),
            (with(|w| w.ports[0].port = 0), ("InvalidArgument", "workloads[0]: port 0 is out of range 1-65535".into())),
            (
                with(|w| w.ports[0].port = 65536),
                ("InvalidArgument", "workloads[0]: port 65536 is out of range 1-65535".into()),
            ),
            (
                with(|w| w.ports[0].protocol = pb::Protocol::Unspecified.into()),
                ("InvalidArgument", "workloads[0]: port 8080 has no protocol (tcp, http, http2 or grpc)".into()),
            ),
            (
                hello(vec![good(), workload("shop", "api", "api-sa", &["10.0.0.2"])]),
                ("InvalidArgument", "workload shop/api is declared twice".into()),
            ),
            (
                pb::Hello { hbone_address: "localhost".into(), ..hello(vec![good()]) },
                ("InvalidArgument", "hbone_address \"localhost\" is not an IP:port address".into()),
            ),
        ];
        for (hello, want) in cases {
            let got = refused(&hello);
            assert_eq!((got.0, got.1.as_str()), (want.0, want.1.as_str()));
        }
    }
}
