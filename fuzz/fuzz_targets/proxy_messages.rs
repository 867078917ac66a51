//! What a proxy accepts from the control plane on its Discovery stream (`DiscoveryResponse`): protobuf decoding,
//! then what the proxy does with each message. A `ConfigUpdate` is applied (`state::apply`: trust bundle, workloads,
//! resources parsed with trellis-policy, the policy set compiled) on top of a synced state and on an empty one, and
//! an accepted state is turned into what the data path reads (registry index, per-workload policies and JWT rules).
//! A `CertificateResponse` or `NodeCredentialResponse` chain goes through the checks of an issued certificate; a
//! `RenewNow` through the certificate manager.
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use rcgen::PublicKeyData;
use rustls_pki_types::CertificateDer;
use trellis_data_plane::authz::LocalPolicies;
use trellis_data_plane::config::Config;
use trellis_data_plane::identity::{CertManager, WorkloadCerts, certs};
use trellis_data_plane::registry::{LocalWorkloads, Registry};
use trellis_data_plane::state::{self, State};
use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1::discovery_response::Message as Down;
use trellis_proto::v1::{self, DiscoveryResponse};

const TRUST_DOMAIN: &str = "fuzz.example";
const PROXY_YAML: &str = "node: node-a
controlPlane:
  address: 127.0.0.1:15012
  caPin: sha256:0000000000000000000000000000000000000000000000000000000000000000
stateDir: /tmp/trellis-fuzz
workloads:
  - name: web
    namespace: shop
    serviceAccount: web-sa
    labels: {app: web}
    addresses: [\"10.0.0.1\", \"fd00::1\"]
    ports: [{port: 8080, protocol: http}, {port: 9000, protocol: tcp}]
";

struct Fixture {
    synced: State,
    locals: LocalWorkloads,
    id: SpiffeId,
    node_id: SpiffeId,
    spki: Vec<u8>,
    certs: Mutex<CertManager>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let root = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = params.self_signed(&root).expect("root");
    let full = v1::ConfigUpdate {
        version: 1,
        full: true,
        trust_bundle: Some(v1::TrustBundle { trust_domain: TRUST_DOMAIN.into(), roots: vec![root.der().to_vec()], jwks: String::new() }),
        ..Default::default()
    };
    let synced = state::apply(&State::new(TRUST_DOMAIN), &full).expect("the fixture's full snapshot applies");
    let config = Config::parse(PROXY_YAML).expect("fixture proxy.yaml");
    let locals = LocalWorkloads::new(&config.workloads, TRUST_DOMAIN).expect("locals");
    let id = SpiffeId::workload(TRUST_DOMAIN, "shop", "web-sa").expect("id");
    let node_id = SpiffeId::node(TRUST_DOMAIN, "node-a").expect("node id");
    let spki = rcgen::KeyPair::generate().expect("key").subject_public_key_info();
    let certs = Mutex::new(CertManager::new(Arc::new(WorkloadCerts::new([id.clone()])), Instant::now()));
    Fixture { synced, locals, id, node_id, spki, certs }
});

fn use_state(next: &State) {
    let _ = Registry::from_state(next);
    // The mesh issuer with the JWKS from the trust bundle, as the proxy's reconfigure does.
    let issuer = format!("spiffe://{}", next.trust_domain);
    let mesh = (issuer.as_str(), next.mesh_jwks.as_str());
    let _ = LocalPolicies::build(&next.policies, &FIXTURE.locals, &next.jwks, mesh, Duration::from_secs(60));
}

fuzz_target!(|data: &[u8]| {
    let Ok(response) = DiscoveryResponse::decode(data) else { return };
    match response.message {
        Some(Down::Update(update)) => {
            if let Ok(next) = state::apply(&FIXTURE.synced, &update) {
                use_state(&next);
            }
            if let Ok(next) = state::apply(&State::new(TRUST_DOMAIN), &update) {
                assert!(update.full, "an incremental update applied to a state that was never synced");
                use_state(&next);
            }
        }
        Some(Down::Certificate(answer)) => {
            let chain: Vec<CertificateDer<'_>> =
                answer.certificate_chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
            let checked = certs::check_issued(&chain, &FIXTURE.spki, &FIXTURE.id, SystemTime::now());
            assert!(checked.is_err(), "a chain for a key nobody holds was accepted");
        }
        Some(Down::NodeCredential(answer)) => {
            // A renewed node credential meets the same check (`NodeCredential::renewed`).
            let chain: Vec<CertificateDer<'_>> =
                answer.certificate_chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
            let checked = certs::check_issued(&chain, &FIXTURE.spki, &FIXTURE.node_id, SystemTime::now());
            assert!(checked.is_err(), "a node chain for a key nobody holds was accepted");
        }
        Some(Down::Renew(renew)) => {
            let mut manager = FIXTURE.certs.lock().unwrap();
            let _ = manager.renew_now(&renew.spiffe_ids, Instant::now());
        }
        None => {}
    }
});
