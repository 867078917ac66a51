//! What the control plane accepts from a proxy on its Discovery stream (`DiscoveryRequest`): protobuf decoding,
//! then the checks each message meets before it reaches the store: a Hello's workload declarations
//! (`mesh/hello.rs`), a CertificateRequest's CSR (the CA's checks and the node's authorization, as
//! `Mesh::sign_workload` does), a NodeCredentialRequest's CSR (the CA's part of a node renewal), a Held report (the
//! holdings record), an Ack's version and NACK reason.
#![no_main]

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use trellis_control_plane::ca::{CA_CERT, CA_CHAIN, CA_KEY, Ca};
use trellis_control_plane::holdings::Holdings;
use trellis_control_plane::mesh::validate_hello;
use trellis_control_plane::records::NodeRecord;
use trellis_control_plane::serial_tag::NodeTag;
use trellis_proto::v1::DiscoveryRequest;
use trellis_proto::v1::discovery_request::Message as Up;

const TRUST_DOMAIN: &str = "fuzz.example";

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("trellis-fuzz-cp-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("ca")).expect("temp dir");
    let (cert, key) = Ca::generate_root(TRUST_DOMAIN).expect("root");
    std::fs::write(dir.join(CA_CERT), &cert).expect("write");
    std::fs::write(dir.join(CA_KEY), &key).expect("write");
    std::fs::write(dir.join(CA_CHAIN), &cert).expect("write");
    let ca = Ca::load(&dir, TRUST_DOMAIN).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    ca
});

fn node() -> NodeRecord {
    NodeRecord {
        name: "node-a".into(),
        namespaces: vec!["shop".into(), "bank".into()],
        joined_at: 0,
        revoked: false,
        revoked_at: None,
        credential_serial: "01".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = DiscoveryRequest::decode(data) else { return };
    let node = node();
    match request.message {
        Some(Up::Hello(hello)) => {
            if let Ok(workloads) = validate_hello(&node, &hello, TRUST_DOMAIN) {
                for w in workloads.values() {
                    assert!(node.namespaces.contains(&w.namespace), "{w:?}");
                    assert_eq!(w.node, node.name);
                    assert!(!w.addresses.is_empty());
                }
            }
        }
        Some(Up::CertificateRequest(csr)) => {
            let hosted: BTreeSet<(&str, &str)> = [("shop", "web-sa")].into();
            let _ = CA.sign_workload(&csr.csr_der, Duration::from_secs(3600), &NodeTag::of("n1"), |_, namespace, sa| {
                if hosted.contains(&(namespace, sa)) { Ok(()) } else { Err("not hosted".into()) }
            });
        }
        Some(Up::NodeCredentialRequest(request)) => {
            // The CA's part of `Mesh::renew_node`: only the CSR's key is used, its names are ignored.
            if let Ok((id, _)) = CA.sign_node(&request.csr_der, &node.name, Duration::from_secs(3600)) {
                assert_eq!(id.to_string(), format!("spiffe://{TRUST_DOMAIN}/trellis/node/{}", node.name));
            }
        }
        Some(Up::Held(held)) => {
            let holdings = Holdings::default();
            holdings.report(&node.name, held.certificates.clone());
            assert_eq!(holdings.get(&node.name).certificates, held.certificates);
        }
        Some(Up::Ack(ack)) => {
            let _ = (ack.version, ack.error.len(), ack.reason.len());
        }
        None => {}
    }
});
