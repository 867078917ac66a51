//! PeerAuthentication: the effective mTLS mode of a workload port, with Istio's precedence (istiod
//! `ComposePeerAuthentication`): workload (selector) > namespace > mesh (root namespace) > PERMISSIVE; `UNSET`
//! inherits from the level above; `portLevelMtls` overrides per workload port.
//!
//! Several policies at one level: Istio keeps the oldest (creationTimestamp). Trellis's store keeps no creation
//! time, so the policy with the lexicographically smallest name wins instead; that is deterministic and gives
//! operators a simple rule ("name it `00-...` to make it win").

use std::collections::BTreeMap;
use std::fmt;

use crate::common::WorkloadSelector;
use crate::kind::{Kind, ResourceKey};
use crate::peer_authn::{MtlsMode, PeerAuthentication};
use crate::resource::Resource;

/// The mode that applies to one workload port, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveMtls {
    /// Never `Unset`.
    pub mode: MtlsMode,
    pub level: MtlsLevel,
    /// The PeerAuthentication that set `mode`; `None` for the built-in default.
    pub policy: Option<ResourceKey>,
}

/// Which level of PeerAuthentication decided the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MtlsLevel {
    /// Nothing set anywhere: PERMISSIVE.
    Default,
    /// Root namespace, no selector.
    Mesh,
    /// Workload namespace, no selector.
    Namespace,
    /// Workload namespace, selector matching the workload.
    Workload,
    /// `portLevelMtls` of the workload policy.
    Port,
}

impl MtlsLevel {
    pub fn as_str(&self) -> &'static str {
        match self {
            MtlsLevel::Default => "default",
            MtlsLevel::Mesh => "mesh",
            MtlsLevel::Namespace => "namespace",
            MtlsLevel::Workload => "workload",
            MtlsLevel::Port => "port",
        }
    }
}

impl fmt::Display for MtlsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for EffectiveMtls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            None => write!(f, "{} (default)", self.mode),
            Some(key) => {
                write!(f, "{} ({}-level PeerAuthentication {}/{})", self.mode, self.level, key.namespace, key.name)
            }
        }
    }
}

impl EffectiveMtls {
    fn default_mode() -> EffectiveMtls {
        EffectiveMtls { mode: MtlsMode::Permissive, level: MtlsLevel::Default, policy: None }
    }
}

/// The mTLS settings of one workload, resolved once per config change: the workload mode and its port overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMtls {
    workload: EffectiveMtls,
    ports: Vec<(u16, EffectiveMtls)>,
}

impl Default for WorkloadMtls {
    fn default() -> Self {
        WorkloadMtls { workload: EffectiveMtls::default_mode(), ports: Vec::new() }
    }
}

impl WorkloadMtls {
    /// The mode for ports without a port-level setting.
    pub fn workload(&self) -> &EffectiveMtls {
        &self.workload
    }

    /// The mode for `port` (a workload/target port).
    pub fn port(&self, port: u16) -> &EffectiveMtls {
        self.ports.iter().find(|(p, _)| *p == port).map_or(&self.workload, |(_, m)| m)
    }

    pub fn mode(&self, port: u16) -> MtlsMode {
        self.port(port).mode
    }
}

#[derive(Debug, Clone)]
struct PeerAuthnEntry {
    namespace: String,
    name: String,
    /// Only non-empty selectors (an empty `matchLabels` means namespace-/mesh-wide).
    selector: Option<WorkloadSelector>,
    mode: MtlsMode,
    ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthnEntry {
    fn key(&self) -> ResourceKey {
        ResourceKey::new(Kind::PeerAuthentication, self.namespace.clone(), self.name.clone())
    }
}

/// All PeerAuthentication policies of a configuration, sorted by (namespace, name).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerAuthnSet {
    root_namespace: String,
    entries: Vec<PeerAuthnEntry>,
}

impl PeerAuthnSet {
    pub(crate) fn new(root_namespace: &str) -> PeerAuthnSet {
        PeerAuthnSet { root_namespace: root_namespace.to_string(), entries: Vec::new() }
    }

    /// Adds one policy; returns false when Istio ignores it (a selector in the root namespace).
    pub(crate) fn add(&mut self, namespace: &str, name: &str, pa: &PeerAuthentication) -> bool {
        let selector = pa.selector.clone().filter(|s| !s.match_labels.is_empty());
        if selector.is_some() && namespace == self.root_namespace {
            return false;
        }
        let ports = (pa.port_level_mtls.iter())
            .filter_map(|(port, m)| u16::try_from(*port).ok().map(|p| (p, m.mode)))
            .collect();
        let entry = PeerAuthnEntry {
            namespace: namespace.to_string(),
            name: name.to_string(),
            selector,
            mode: pa.mode(),
            ports,
        };
        let at = self.entries.partition_point(|e| (&e.namespace, &e.name) < (&entry.namespace, &entry.name));
        self.entries.insert(at, entry);
        true
    }

    pub(crate) fn from_resources(resources: &[Resource], root_namespace: &str) -> PeerAuthnSet {
        let mut set = PeerAuthnSet::new(root_namespace);
        for r in resources {
            if let Some(pa) = r.peer_authentication() {
                set.add(&r.metadata.namespace, &r.metadata.name, pa);
            }
        }
        set
    }

    pub(crate) fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> WorkloadMtls {
        let root = self.root_namespace.as_str();
        // Entries are sorted by name within a namespace, so `find` picks the tie-break winner.
        let mesh = self.entries.iter().find(|e| e.namespace == root && e.selector.is_none());
        let ns_level = (namespace != root)
            .then(|| self.entries.iter().find(|e| e.namespace == namespace && e.selector.is_none()))
            .flatten();
        let workload = (namespace != root)
            .then(|| {
                self.entries
                    .iter()
                    .find(|e| e.namespace == namespace && e.selector.as_ref().is_some_and(|s| s.matches(labels)))
            })
            .flatten();

        let mut effective = EffectiveMtls::default_mode();
        for (entry, level) in
            [(mesh, MtlsLevel::Mesh), (ns_level, MtlsLevel::Namespace), (workload, MtlsLevel::Workload)]
        {
            if let Some(e) = entry.filter(|e| e.mode != MtlsMode::Unset) {
                effective = EffectiveMtls { mode: e.mode, level, policy: Some(e.key()) };
            }
        }
        let ports = workload.map_or_else(Vec::new, |w| {
            (w.ports.iter())
                .map(|(port, mode)| {
                    let m = if *mode == MtlsMode::Unset {
                        effective.clone()
                    } else {
                        EffectiveMtls { mode: *mode, level: MtlsLevel::Port, policy: Some(w.key()) }
                    };
                    (*port, m)
                })
                .collect()
        });
        WorkloadMtls { workload: effective, ports }
    }
}

/// The effective mTLS mode (never `Unset`) for `port` of the workload with `labels` in `namespace`, with where it
/// comes from. Non-PeerAuthentication resources are ignored. For repeated lookups compile once with
/// [`crate::CompiledPolicies`].
pub fn effective_mtls(
    resources: &[Resource],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> EffectiveMtls {
    PeerAuthnSet::from_resources(resources, root_namespace).for_workload(namespace, labels).port(port).clone()
}

/// Just the mode of [`effective_mtls`].
pub fn effective_mtls_mode(
    resources: &[Resource],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    effective_mtls(resources, root_namespace, namespace, labels, port).mode
}
