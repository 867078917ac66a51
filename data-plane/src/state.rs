//! The mesh state as this proxy sees it, and the one way to change it: `apply`, a pure function that
//! validates a whole `ConfigUpdate` against a copy and returns the new state or the reason to NACK. The
//! caller swaps the result in, so a rejected update changes nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use trellis_policy::{CompileOptions, CompiledPolicies, CompiledResource, Kind, ResourceKey};
use trellis_proto::v1;

use crate::identity::certs::{self, CertError, CertInfo};
use crate::revocation::Revocations;

#[derive(Debug, Clone, Default)]
pub struct State {
    /// Set once a full snapshot has been applied; before that the proxy has no mesh config.
    pub synced: bool,
    /// Read from the state directory at start (`stored.rs`): the config last ACKed before a restart, not yet
    /// confirmed by the control plane (its next full snapshot replaces it, which clears this).
    pub restored: bool,
    pub version: u64,
    /// This proxy's trust domain (from its node credential); a bundle for another domain is refused.
    pub trust_domain: String,
    pub trust_bundle: Option<Arc<TrustBundle>>,
    /// The mesh JWT keys (a JWKS document, from the trust bundle; empty from a control plane without them): what
    /// JWT-SVIDs of this trust domain verify against (Workload API, RequestAuthentication with the mesh issuer).
    pub mesh_jwks: Arc<String>,
    /// By `<namespace>/<name>`. Shared with the state this one was made from until an update changes it (`apply`
    /// copies a map only when the update touches it: an update that carries a policy does not copy the registry).
    pub workloads: Arc<BTreeMap<String, Arc<v1::Workload>>>,
    /// Shared the same way as `workloads`.
    pub resources: Arc<BTreeMap<ResourceKey, Arc<StoredResource>>>,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// The resources compiled for evaluation; a resource set that does not compile is NACKed.
    pub policies: Arc<CompiledPolicies>,
    /// JWKS documents the control plane fetched, by `jwksUri` (RequestAuthentication).
    pub jwks: Arc<BTreeMap<String, String>>,
    /// Revoked node certificates and workload identities (`revocation.rs`).
    pub revocations: Arc<Revocations>,
}

#[derive(Debug, Clone)]
pub struct TrustBundle {
    pub trust_domain: String,
    pub roots: Vec<Root>,
}

#[derive(Debug, Clone)]
pub struct Root {
    pub der: CertificateDer<'static>,
    pub info: CertInfo,
}

#[derive(Debug, Clone)]
pub struct StoredResource {
    pub revision: u64,
    pub resource: trellis_policy::Resource,
    /// Compiled when the resource arrived: an update recompiles only the resources it carries.
    pub compiled: CompiledResource,
}

impl TrustBundle {
    pub fn root_ders(&self) -> Vec<CertificateDer<'static>> {
        self.roots.iter().map(|r| r.der.clone()).collect()
    }

    /// The same trust domain and the same roots in the same order.
    pub fn same_roots(&self, other: &TrustBundle) -> bool {
        self.trust_domain == other.trust_domain
            && self.roots.len() == other.roots.len()
            && self.roots.iter().zip(&other.roots).all(|(a, b)| a.der == b.der)
    }
}

impl State {
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self::with_root_namespace(trust_domain, trellis_policy::DEFAULT_ROOT_NAMESPACE)
    }

    pub fn with_root_namespace(trust_domain: impl Into<String>, root_namespace: impl Into<String>) -> Self {
        Self { trust_domain: trust_domain.into(), root_namespace: root_namespace.into(), ..Self::default() }
    }
}

/// Why an update was refused; the text goes back to the control plane in the NACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("incremental update before any full snapshot")]
    NotSynced,
    #[error("full snapshot without a trust bundle")]
    MissingTrustBundle,
    #[error("trust bundle: {0}")]
    TrustBundle(String),
    #[error("trust bundle root {index}: {source}")]
    Root { index: usize, source: CertError },
    #[error("workloads[{index}] ({key:?}): {reason}")]
    Workload { index: usize, key: String, reason: String },
    #[error("resources[{index}] ({key}): {reason}")]
    Resource { index: usize, key: String, reason: String },
    #[error("removed_resources[{index}]: {reason}")]
    RemovedResource { index: usize, reason: String },
    #[error("revocations: {0}")]
    Revocations(crate::revocation::RevocationsError),
}

impl ApplyError {
    /// What part of the update was rejected: the bounded `reason` of a NACK.
    pub fn kind(&self) -> &'static str {
        match self {
            ApplyError::NotSynced => "not_synced",
            ApplyError::MissingTrustBundle | ApplyError::TrustBundle(_) | ApplyError::Root { .. } => "trust_bundle",
            ApplyError::Workload { .. } => "workload",
            ApplyError::Resource { .. } => "resource",
            ApplyError::RemovedResource { .. } => "removed_resource",
            ApplyError::Revocations(_) => "revocations",
        }
    }
}

/// Validates `update` and returns the state after it; `state` is never modified.
pub fn apply(state: &State, update: &v1::ConfigUpdate) -> Result<State, ApplyError> {
    let mut next = if update.full {
        State::with_root_namespace(state.trust_domain.clone(), state.root_namespace.clone())
    } else if !state.synced {
        return Err(ApplyError::NotSynced);
    } else {
        state.clone()
    };

    match &update.trust_bundle {
        Some(wire) => {
            let bundle = check_bundle(wire, &state.trust_domain)?;
            // The same roots again (every full snapshot, so every reconnect, carries the bundle) keep the current
            // `Arc`: whoever follows changes by pointer (the TLS set, which would otherwise be rebuilt and make every
            // pooled connection re-handshake) sees no change.
            next.trust_bundle = match &state.trust_bundle {
                Some(current) if current.same_roots(&bundle) => Some(current.clone()),
                _ => Some(Arc::new(bundle)),
            };
            next.mesh_jwks = if *state.mesh_jwks == wire.jwks {
                state.mesh_jwks.clone()
            } else {
                if !wire.jwks.is_empty() {
                    trellis_policy::check_jwks(&wire.jwks)
                        .map_err(|e| ApplyError::TrustBundle(format!("jwks: {e}")))?;
                }
                Arc::new(wire.jwks.clone())
            };
        }
        None if update.full => return Err(ApplyError::MissingTrustBundle),
        None => {}
    }

    // Removals first, so an update that removes and re-adds a key ends with the key present. A full
    // snapshot starts empty, so its removal lists mean nothing.
    // The maps are copied (`make_mut`) only when this update changes them; the copy holds `Arc`s, not values.
    if !update.full && !update.removed_workloads.is_empty() {
        let workloads = Arc::make_mut(&mut next.workloads);
        for key in &update.removed_workloads {
            workloads.remove(key);
        }
    }
    if !update.full && !update.removed_resources.is_empty() {
        let resources = Arc::make_mut(&mut next.resources);
        for (index, key) in update.removed_resources.iter().enumerate() {
            let key = policy_key(key).map_err(|reason| ApplyError::RemovedResource { index, reason })?;
            resources.remove(&key);
        }
    }

    if !update.workloads.is_empty() {
        let workloads = Arc::make_mut(&mut next.workloads);
        for (index, workload) in update.workloads.iter().enumerate() {
            let key = trellis_proto::workload_key(&workload.namespace, &workload.name);
            check_workload(workload).map_err(|reason| ApplyError::Workload { index, key: key.clone(), reason })?;
            workloads.insert(key, Arc::new(workload.clone()));
        }
    }

    let options = compile_options(&next.root_namespace);
    if !update.resources.is_empty() {
        let resources = Arc::make_mut(&mut next.resources);
        for (index, resource) in update.resources.iter().enumerate() {
            let stored = check_resource(resource, &options).map_err(|(key, reason)| ApplyError::Resource {
                index,
                key,
                reason,
            })?;
            resources.insert(stored.resource.key(), Arc::new(stored));
        }
    }

    match &update.jwks {
        Some(set) => {
            next.jwks = Arc::new(set.entries.iter().map(|j| (j.uri.clone(), j.json.clone())).collect());
        }
        None if update.full => next.jwks = Arc::default(),
        None => {}
    }

    match &update.revocations {
        Some(list) => {
            let revocations = Revocations::from_wire(list).map_err(ApplyError::Revocations)?;
            // The same set again (every full snapshot carries it) keeps the current `Arc`: `reconfigure` scans the
            // open connections only when it changes.
            if *state.revocations != revocations {
                next.revocations = Arc::new(revocations);
            } else {
                next.revocations = state.revocations.clone();
            }
        }
        None if update.full => next.revocations = Arc::default(),
        None => {}
    }

    if update.full || !update.resources.is_empty() || !update.removed_resources.is_empty() {
        // Each resource was compiled when it arrived (`check_resource`); this only puts the set together.
        let parts = next.resources.values().map(|r| (&r.resource, &r.compiled));
        next.policies = Arc::new(CompiledPolicies::assemble(parts, &options));
    }

    next.version = update.version;
    next.synced = true;
    Ok(next)
}

/// Debug builds only: the environment variable naming a resource (`<namespace>/<name>`) that this proxy refuses.
#[cfg(debug_assertions)]
pub const REFUSE_RESOURCE_VAR: &str = "TRELLIS_TEST_ONLY_REFUSE_RESOURCE";

/// Test-only fault injection for the end-to-end NACK test (`tests/tests/nack.rs`), which needs a config that the
/// control plane accepts and a proxy cannot apply. It exists only in debug builds (`cfg(debug_assertions)`): a
/// release build compiles the no-op below and never reads the variable, so no deployment can turn it on. In a
/// debug build, an update that carries the resource named by [`REFUSE_RESOURCE_VAR`] is refused as a resource this
/// proxy cannot apply, through the same NACK path as any other invalid resource.
#[cfg(debug_assertions)]
pub fn injected_refusal(update: &v1::ConfigUpdate) -> Result<(), ApplyError> {
    let Some(refused) = std::env::var_os(REFUSE_RESOURCE_VAR).filter(|v| !v.is_empty()) else { return Ok(()) };
    for (index, resource) in update.resources.iter().enumerate() {
        let Some(key) = &resource.key else { continue };
        if refused.to_str() == Some(format!("{}/{}", key.namespace, key.name).as_str()) {
            return Err(ApplyError::Resource {
                index,
                key: format!("{}/{}/{}", key.kind, key.namespace, key.name),
                reason: format!("refused by {REFUSE_RESOURCE_VAR} (test-only fault injection, debug builds only)"),
            });
        }
    }
    Ok(())
}

/// Release builds: no fault injection (see the debug-build version).
#[cfg(not(debug_assertions))]
pub fn injected_refusal(_update: &v1::ConfigUpdate) -> Result<(), ApplyError> {
    Ok(())
}

fn check_bundle(bundle: &v1::TrustBundle, want_domain: &str) -> Result<TrustBundle, ApplyError> {
    trellis_proto::spiffe::validate_trust_domain(&bundle.trust_domain)
        .map_err(|e| ApplyError::TrustBundle(format!("trust domain {:?}: {e}", bundle.trust_domain)))?;
    if !want_domain.is_empty() && bundle.trust_domain != want_domain {
        return Err(ApplyError::TrustBundle(format!(
            "trust domain {:?} is not this proxy's trust domain {want_domain:?}",
            bundle.trust_domain
        )));
    }
    if bundle.roots.is_empty() {
        return Err(ApplyError::TrustBundle("no roots".into()));
    }
    let roots = bundle
        .roots
        .iter()
        .enumerate()
        .map(|(index, der)| {
            let info = certs::check_root(der).map_err(|source| ApplyError::Root { index, source })?;
            Ok(Root { der: CertificateDer::from(der.clone()), info })
        })
        .collect::<Result<_, _>>()?;
    Ok(TrustBundle { trust_domain: bundle.trust_domain.clone(), roots })
}

fn check_workload(w: &v1::Workload) -> Result<(), String> {
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("name and namespace must not be empty".into());
    }
    for address in &w.addresses {
        if address.parse::<IpAddr>().is_err() {
            return Err(format!("address {address:?} is not an IP address"));
        }
    }
    for port in &w.ports {
        if !(1..=65535).contains(&port.port) {
            return Err(format!("port {} is not in 1..65535", port.port));
        }
    }
    Ok(())
}

/// Parses a resource; on error returns (key as sent, reason).
fn compile_options(root_namespace: &str) -> CompileOptions {
    CompileOptions { root_namespace: root_namespace.to_string(), ..CompileOptions::default() }
}

fn check_resource(r: &v1::Resource, options: &CompileOptions) -> Result<StoredResource, (String, String)> {
    let Some(wire_key) = &r.key else {
        return Err(("?".into(), "no key".into()));
    };
    let shown = format!("{}/{}/{}", wire_key.kind, wire_key.namespace, wire_key.name);
    let want = policy_key(wire_key).map_err(|reason| (shown.clone(), reason))?;
    let resource = trellis_policy::Resource::from_json(&r.json).map_err(|e| (shown.clone(), e.to_string()))?;
    let got = resource.key();
    if got != want {
        return Err((shown, format!("the document is {got}, not the resource its key names")));
    }
    let compiled = CompiledResource::compile(&resource, options).map_err(|e| (shown, e.to_string()))?;
    Ok(StoredResource { revision: r.revision, resource, compiled })
}

fn policy_key(key: &v1::ResourceKey) -> Result<ResourceKey, String> {
    let kind = Kind::from_manifest_kind(&key.kind).ok_or_else(|| format!("unknown kind {:?}", key.kind))?;
    Ok(ResourceKey::new(kind, key.namespace.clone(), key.name.clone()))
}

/// The current state, readable from anywhere, with a change signal for consumers that rebuild derived data.
pub struct StateStore {
    current: ArcSwap<State>,
    changes: watch::Sender<u64>,
}

impl StateStore {
    pub fn new(initial: State) -> Self {
        Self { current: ArcSwap::from_pointee(initial), changes: watch::Sender::new(0) }
    }

    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    pub fn store(&self, state: State) {
        let version = state.version;
        self.current.store(Arc::new(state));
        self.changes.send_replace(version);
    }

    /// Yields the version of each newly stored state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::certs::test_ca::TestCa;
    use std::sync::LazyLock;

    static CA: LazyLock<TestCa> = LazyLock::new(TestCa::new);

    fn bundle() -> Option<v1::TrustBundle> {
        Some(v1::TrustBundle { trust_domain: "td".into(), roots: vec![CA.root.to_vec()], jwks: String::new() })
    }

    fn workload(name: &str, address: &str, port: u32) -> v1::Workload {
        v1::Workload {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            addresses: vec![address.into()],
            ports: vec![v1::Port { port, protocol: v1::Protocol::Tcp as i32 }],
            ..Default::default()
        }
    }

    fn wire_key(kind: &str, name: &str) -> v1::ResourceKey {
        v1::ResourceKey { kind: kind.into(), namespace: "ns".into(), name: name.into() }
    }

    fn policy(name: &str, revision: u64) -> v1::Resource {
        let json = format!(
            r#"{{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{{"name":"{name}","namespace":"ns"}},"spec":{{}}}}"#
        );
        v1::Resource { key: Some(wire_key("AuthorizationPolicy", name)), revision, json }
    }

    fn full(version: u64) -> v1::ConfigUpdate {
        v1::ConfigUpdate {
            version,
            full: true,
            trust_bundle: bundle(),
            workloads: vec![workload("a", "10.0.0.1", 80), workload("b", "10.0.0.2", 80)],
            resources: vec![policy("p1", 1), policy("p2", 2)],
            ..Default::default()
        }
    }

    fn incremental(version: u64) -> v1::ConfigUpdate {
        v1::ConfigUpdate { version, ..Default::default() }
    }

    fn synced() -> State {
        apply(&State::new("td"), &full(1)).unwrap()
    }

    fn names(state: &State) -> (Vec<String>, Vec<String>) {
        (state.workloads.keys().cloned().collect(), state.resources.keys().map(|k| k.name.clone()).collect())
    }

    /// An update copies only the maps it changes: a policy does not copy the registry, a workload not the
    /// resources; the state it was applied to never changes.
    #[test]
    fn an_update_shares_the_maps_it_does_not_change() {
        let state = synced();
        let policy_only =
            apply(&state, &v1::ConfigUpdate { resources: vec![policy("p3", 3)], ..incremental(2) }).unwrap();
        assert!(Arc::ptr_eq(&policy_only.workloads, &state.workloads), "the registry is shared");
        assert!(!Arc::ptr_eq(&policy_only.resources, &state.resources));
        assert_eq!(names(&policy_only).1, ["p1", "p2", "p3"]);
        assert_eq!(names(&state).1, ["p1", "p2"], "the state applied to is unchanged");

        let workload_only =
            apply(&policy_only, &v1::ConfigUpdate { workloads: vec![workload("c", "10.0.0.3", 80)], ..incremental(3) })
                .unwrap();
        assert!(Arc::ptr_eq(&workload_only.resources, &policy_only.resources), "the resources are shared");
        assert_eq!(names(&workload_only).0, ["ns/a", "ns/b", "ns/c"]);
        assert_eq!(names(&policy_only).0, ["ns/a", "ns/b"]);

        let removed =
            apply(&workload_only, &v1::ConfigUpdate { removed_workloads: vec!["ns/a".into()], ..incremental(4) })
                .unwrap();
        assert_eq!(names(&removed).0, ["ns/b", "ns/c"]);
        assert_eq!(names(&workload_only).0, ["ns/a", "ns/b", "ns/c"]);
        assert!(Arc::ptr_eq(&removed.resources, &workload_only.resources));

        // A refused update leaves the state it was applied to as it was, though it changed a copy of a map first.
        let refused = v1::ConfigUpdate {
            removed_workloads: vec!["ns/b".into()],
            workloads: vec![workload("", "10.0.0.4", 80)],
            ..incremental(5)
        };
        assert!(apply(&removed, &refused).is_err());
        assert_eq!(names(&removed).0, ["ns/b", "ns/c"]);
    }

    #[test]
    fn jwks_set_is_replaced_when_sent_and_kept_otherwise() {
        let set = |uri: &str| {
            Some(v1::JwksSet { entries: vec![v1::Jwks { uri: uri.into(), json: r#"{"keys":[]}"#.into() }] })
        };
        let state = apply(&State::new("td"), &v1::ConfigUpdate { jwks: set("https://a"), ..full(1) }).unwrap();
        assert_eq!(state.jwks.keys().collect::<Vec<_>>(), ["https://a"]);
        let kept = apply(&state, &incremental(2)).unwrap();
        assert!(Arc::ptr_eq(&kept.jwks, &state.jwks), "an update without a set keeps it");
        let replaced = apply(&kept, &v1::ConfigUpdate { jwks: set("https://b"), ..incremental(3) }).unwrap();
        assert_eq!(replaced.jwks.keys().collect::<Vec<_>>(), ["https://b"]);
        assert!(apply(&replaced, &full(4)).unwrap().jwks.is_empty(), "a full snapshot without a set clears it");
    }

    #[test]
    fn applies_updates() {
        struct Case {
            name: &'static str,
            start: State,
            update: v1::ConfigUpdate,
            workloads: &'static [&'static str],
            resources: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "first full snapshot",
                start: State::new("td"),
                update: full(1),
                workloads: &["ns/a", "ns/b"],
                resources: &["p1", "p2"],
            },
            Case {
                name: "full snapshot replaces everything",
                start: synced(),
                update: v1::ConfigUpdate {
                    workloads: vec![workload("c", "10.0.0.3", 80)],
                    resources: vec![policy("p3", 3)],
                    ..full(2)
                },
                workloads: &["ns/c"],
                resources: &["p3"],
            },
            Case {
                name: "incremental upsert keeps the rest",
                start: synced(),
                update: v1::ConfigUpdate {
                    workloads: vec![workload("a", "10.0.0.9", 80), workload("c", "10.0.0.3", 80)],
                    resources: vec![policy("p3", 3)],
                    ..incremental(2)
                },
                workloads: &["ns/a", "ns/b", "ns/c"],
                resources: &["p1", "p2", "p3"],
            },
            Case {
                name: "incremental removal",
                start: synced(),
                update: v1::ConfigUpdate {
                    removed_workloads: vec!["ns/a".into(), "ns/unknown".into()],
                    removed_resources: vec![wire_key("AuthorizationPolicy", "p1")],
                    ..incremental(2)
                },
                workloads: &["ns/b"],
                resources: &["p2"],
            },
            Case {
                name: "remove and re-add in one update keeps the key",
                start: synced(),
                update: v1::ConfigUpdate {
                    removed_workloads: vec!["ns/a".into()],
                    workloads: vec![workload("a", "10.0.0.7", 80)],
                    ..incremental(2)
                },
                workloads: &["ns/a", "ns/b"],
                resources: &["p1", "p2"],
            },
        ];
        for case in cases {
            let next = apply(&case.start, &case.update).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(
                names(&next),
                (
                    case.workloads.iter().map(|s| s.to_string()).collect(),
                    case.resources.iter().map(|s| s.to_string()).collect()
                ),
                "{}",
                case.name
            );
            assert_eq!(next.version, case.update.version, "{}", case.name);
            assert!(next.synced);
            assert_eq!(next.trust_bundle.as_ref().unwrap().roots.len(), 1);
        }
        let upserted =
            apply(&synced(), &v1::ConfigUpdate { workloads: vec![workload("a", "10.0.0.9", 80)], ..incremental(2) })
                .unwrap();
        assert_eq!(upserted.workloads["ns/a"].addresses, ["10.0.0.9"]);
        assert_eq!(synced().resources.values().map(|r| r.revision).collect::<Vec<_>>(), [1, 2]);
    }

    #[test]
    fn the_same_bundle_again_keeps_the_current_one_and_a_new_root_replaces_it() {
        let before = synced();
        let kept = apply(&before, &v1::ConfigUpdate { trust_bundle: bundle(), ..full(2) }).unwrap();
        let (old, new) = (before.trust_bundle.as_ref().unwrap(), kept.trust_bundle.as_ref().unwrap());
        assert!(Arc::ptr_eq(old, new), "a full snapshot with the same roots replaced the bundle");

        let other = TestCa::named("other root");
        let roots = vec![CA.root.to_vec(), other.root.to_vec()];
        let grown = apply(
            &kept,
            &v1::ConfigUpdate {
                trust_bundle: Some(v1::TrustBundle { trust_domain: "td".into(), roots, jwks: String::new() }),
                ..incremental(3)
            },
        )
        .unwrap();
        let grown = grown.trust_bundle.as_ref().unwrap();
        assert!(!Arc::ptr_eq(new, grown));
        assert_eq!(grown.roots.len(), 2);
    }

    #[test]
    fn rejects_bad_updates_without_touching_state() {
        let mut mismatched = policy("p9", 9);
        mismatched.key = Some(wire_key("AuthorizationPolicy", "other"));
        let mut wrong_kind = policy("p9", 9);
        wrong_kind.key = Some(wire_key("PeerAuthentication", "p9"));
        let bad_bundle = |roots: Vec<Vec<u8>>, td: &str| v1::ConfigUpdate {
            trust_bundle: Some(v1::TrustBundle { trust_domain: td.into(), roots, jwks: String::new() }),
            ..incremental(2)
        };
        let cases: Vec<(&str, State, v1::ConfigUpdate, &str)> = vec![
            ("incremental before full", State::new("td"), incremental(1), "before any full snapshot"),
            (
                "full without bundle",
                synced(),
                v1::ConfigUpdate { trust_bundle: None, ..full(2) },
                "without a trust bundle",
            ),
            (
                "resource json does not parse",
                synced(),
                v1::ConfigUpdate {
                    resources: vec![v1::Resource { json: "{not json".into(), ..policy("p9", 9) }],
                    ..incremental(2)
                },
                "resources[0] (AuthorizationPolicy/ns/p9)",
            ),
            (
                "resource json is not a valid policy",
                synced(),
                v1::ConfigUpdate {
                    resources: vec![v1::Resource {
                        json: r#"{"kind":"AuthorizationPolicy"}"#.into(),
                        ..policy("p9", 9)
                    }],
                    ..incremental(2)
                },
                "resources[0]",
            ),
            (
                "resource key mismatch (name)",
                synced(),
                v1::ConfigUpdate { resources: vec![mismatched], ..incremental(2) },
                "not the resource its key names",
            ),
            (
                "resource key mismatch (kind)",
                synced(),
                v1::ConfigUpdate { resources: vec![wrong_kind], ..incremental(2) },
                "not the resource its key names",
            ),
            (
                "resource without key",
                synced(),
                v1::ConfigUpdate { resources: vec![v1::Resource { key: None, ..policy("p9", 9) }], ..incremental(2) },
                "no key",
            ),
            (
                "unknown kind",
                synced(),
                v1::ConfigUpdate {
                    resources: vec![v1::Resource { key: Some(wire_key("Gateway", "g")), ..policy("p9", 9) }],
                    ..incremental(2)
                },
                "unknown kind \"Gateway\"",
            ),
            (
                "root is garbage",
                synced(),
                bad_bundle(vec![b"garbage".to_vec()], "td"),
                "trust bundle root 0: certificate cannot be parsed",
            ),
            (
                "root is not a CA",
                synced(),
                bad_bundle(vec![CA.root.to_vec(), CA.leaf().to_vec()], "td"),
                "trust bundle root 1: not a CA",
            ),
            ("no roots", synced(), bad_bundle(vec![], "td"), "no roots"),
            (
                "foreign trust domain",
                synced(),
                bad_bundle(vec![CA.root.to_vec()], "other"),
                "not this proxy's trust domain",
            ),
            (
                "bad address",
                synced(),
                v1::ConfigUpdate { workloads: vec![workload("c", "10.0.0.300", 80)], ..incremental(2) },
                r#"workloads[0] ("ns/c"): address "10.0.0.300" is not an IP address"#,
            ),
            (
                "port 0",
                synced(),
                v1::ConfigUpdate { workloads: vec![workload("c", "10.0.0.3", 0)], ..incremental(2) },
                "port 0 is not in 1..65535",
            ),
            (
                "port too big",
                synced(),
                v1::ConfigUpdate { workloads: vec![workload("c", "10.0.0.3", 65536)], ..incremental(2) },
                "port 65536",
            ),
            (
                "bad removal",
                synced(),
                v1::ConfigUpdate { removed_resources: vec![wire_key("Nope", "x")], ..incremental(2) },
                "removed_resources[0]: unknown kind",
            ),
            (
                "good parts do not sneak in with a bad one",
                synced(),
                v1::ConfigUpdate {
                    removed_workloads: vec!["ns/a".into()],
                    workloads: vec![workload("c", "10.0.0.3", 80), workload("d", "bad", 80)],
                    ..incremental(2)
                },
                "workloads[1]",
            ),
        ];
        for (name, start, update, want) in cases {
            let before = names(&start);
            let err = apply(&start, &update).expect_err(name).to_string();
            assert!(err.contains(want), "{name}: want {want:?} in {err:?}");
            // `apply` takes the state by reference; check it still describes the same mesh.
            assert_eq!(names(&start), before, "{name}");
        }
    }

    #[test]
    fn store_publishes_and_signals() {
        let store = StateStore::new(State::new("td"));
        let mut changes = store.subscribe();
        assert!(!store.load().synced);
        store.store(synced());
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 1);
        assert!(store.load().synced);
    }
}
