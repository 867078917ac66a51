//! The CSR checks of the control plane's CA (`control-plane/src/ca.rs`): DER parsing, the CSR's signature, exactly
//! one URI SAN, a SPIFFE workload ID in this trust domain; then signing. A node credential's CSR too (only its
//! key is used). The CA is made once, in a temporary directory, the way `trellis-control init` lays it out.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use trellis_control_plane::ca::{CA_CERT, CA_CHAIN, CA_KEY, Ca};
use trellis_control_plane::serial_tag::NodeTag;

const TRUST_DOMAIN: &str = "fuzz.example";

static CA: LazyLock<Ca> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("trellis-fuzz-ca-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("ca")).expect("temp dir");
    let (cert, key) = Ca::generate_root(TRUST_DOMAIN).expect("root");
    std::fs::write(dir.join(CA_CERT), &cert).expect("write");
    std::fs::write(dir.join(CA_KEY), &key).expect("write");
    std::fs::write(dir.join(CA_CHAIN), &cert).expect("write");
    let ca = Ca::load(&dir, TRUST_DOMAIN).expect("load");
    let _ = std::fs::remove_dir_all(&dir);
    ca
});

fuzz_target!(|data: &[u8]| {
    let ttl = Duration::from_secs(3600);
    let mut asked = None;
    let signed = CA.sign_workload(data, ttl, &NodeTag::of("n1"), |id, namespace, sa| {
        asked = Some((id.to_string(), namespace.to_owned(), sa.to_owned()));
        Ok(())
    });
    if let Ok((id, issued)) = signed {
        let (asked_id, namespace, sa) = asked.expect("authorization is asked before signing");
        assert_eq!(id.to_string(), asked_id);
        assert_eq!(asked_id, format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"));
        assert_eq!(issued.chain.len(), 2);
    }
    let _ = CA.sign_node(data, "node-a", ttl);
});
