//! Address lookups, built once per config change: every mesh workload by IP (where to tunnel, which identity to
//! expect), and this proxy's own workloads by IP (which identity a local client speaks as, which ports may be
//! dialled on an inbound tunnel).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1;

use crate::config::{Protocol, WorkloadConfig};
use crate::metrics::PeerLabels;
use crate::state::State;

/// A workload of the mesh, as the registry describes it.
#[derive(Debug)]
pub struct MeshWorkload {
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub spiffe_id: SpiffeId,
    pub labels: HashMap<String, String>,
    pub ports: HashMap<u16, Protocol>,
    /// Port of the HBONE listener of the proxy that fronts it; tunnels go to `<workload ip>:<hbone_port>`.
    pub hbone_port: u16,
    /// The address of the proxy that fronts it (its node), as the control plane recorded it.
    pub proxy_ip: IpAddr,
    /// Its metric labels, built once here.
    pub peer: Arc<PeerLabels>,
}

#[derive(Debug, Default)]
pub struct Registry {
    by_ip: HashMap<IpAddr, Arc<MeshWorkload>>,
    /// The workload holding each identity, where exactly one does (None: shared by several).
    by_identity: HashMap<SpiffeId, Option<Arc<MeshWorkload>>>,
}

impl Registry {
    pub fn from_state(state: &State) -> Self {
        let mut by_ip = HashMap::new();
        let mut by_identity = HashMap::new();
        for workload in state.workloads.values() {
            let Some(entry) = mesh_workload(workload) else {
                tracing::debug!(workload = %workload.name, "registry entry without usable identity or proxy address");
                continue;
            };
            let entry = Arc::new(entry);
            by_identity
                .entry(entry.spiffe_id.clone())
                .and_modify(|holder| *holder = None)
                .or_insert_with(|| Some(entry.clone()));
            for address in &workload.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    by_ip.insert(ip, entry.clone());
                }
            }
        }
        Self { by_ip, by_identity }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<MeshWorkload>> {
        self.by_ip.get(&ip)
    }

    /// The workload that a verified peer with `id` speaks for: the one at `ip` if it holds that identity, else the
    /// only workload holding it.
    pub fn source(&self, id: &SpiffeId, ip: Option<IpAddr>) -> Option<&Arc<MeshWorkload>> {
        ip.and_then(|ip| self.by_ip.get(&ip))
            .filter(|w| w.spiffe_id == *id)
            .or_else(|| self.by_identity.get(id)?.as_ref())
    }

    /// Whether a tunnel's claimed original source address (`Forwarded`) may be used as the source of the dial to the
    /// workload: the claim comes from a peer proxy, which could name any address. Trusted only when the registry
    /// has a workload at `claimed` that holds the identity the peer authenticated with (`id`, from its mTLS
    /// certificate), fronted by a proxy at the address the tunnel came from (`peer`): a node can then only claim
    /// the addresses of workloads it hosts and holds the certificates of.
    pub fn vouch_source(&self, id: &SpiffeId, claimed: IpAddr, peer: IpAddr) -> Result<(), UntrustedSource> {
        let workload = self.by_ip.get(&claimed).ok_or(UntrustedSource::NotAWorkload)?;
        if workload.spiffe_id != *id {
            return Err(UntrustedSource::OtherIdentity(workload.spiffe_id.clone()));
        }
        // The tunnel comes from the node's address, or, over the other family, from one of its workloads' addresses.
        let same_node = |ip: &IpAddr| *ip == workload.proxy_ip;
        if !(same_node(&peer) || self.by_ip.get(&peer).is_some_and(|w| same_node(&w.proxy_ip))) {
            return Err(UntrustedSource::OtherNode(workload.proxy_ip));
        }
        Ok(())
    }

    /// The metric labels of every mesh workload, for expiring the series of those that left.
    pub fn present(&self) -> impl Iterator<Item = &Arc<PeerLabels>> {
        self.by_ip.values().map(|w| &w.peer)
    }
}

/// Why a tunnel's claimed source address is not used (the dial goes from the proxy's own address instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UntrustedSource {
    #[error("no mesh workload has that address")]
    NotAWorkload,
    #[error("the workload at that address is {0}, not the peer's identity")]
    OtherIdentity(SpiffeId),
    #[error("the workload at that address is fronted by the proxy at {0}, not the peer")]
    OtherNode(IpAddr),
}

fn mesh_workload(w: &v1::Workload) -> Option<MeshWorkload> {
    let spiffe_id = SpiffeId::parse(&w.spiffe_id).ok()?;
    let proxy = w.proxy_address.parse::<SocketAddr>().ok()?;
    let (hbone_port, proxy_ip) = (proxy.port(), proxy.ip());
    let ports = w
        .ports
        .iter()
        .filter_map(|p| {
            let protocol = Protocol::from_proto(p.protocol()).unwrap_or(Protocol::Tcp);
            Some((u16::try_from(p.port).ok()?, protocol))
        })
        .collect();
    Some(MeshWorkload {
        peer: PeerLabels::new(&spiffe_id, &w.name, &w.namespace),
        key: trellis_proto::workload_key(&w.namespace, &w.name),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        spiffe_id,
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ports,
        hbone_port,
        proxy_ip,
    })
}

/// One of this proxy's own workloads.
#[derive(Debug)]
pub struct LocalWorkload {
    pub config: WorkloadConfig,
    pub spiffe_id: SpiffeId,
    /// `<namespace>/<name>`.
    pub key: String,
    /// Its metric labels.
    pub peer: Arc<PeerLabels>,
}

impl LocalWorkload {
    pub fn port(&self, port: u16) -> Option<Protocol> {
        self.config.ports.iter().find(|p| p.port == port).map(|p| p.protocol)
    }
}

/// This proxy's workloads by address (fixed by the config file).
#[derive(Debug, Default)]
pub struct LocalWorkloads {
    by_ip: HashMap<IpAddr, Arc<LocalWorkload>>,
    all: Vec<Arc<LocalWorkload>>,
}

impl LocalWorkloads {
    pub fn new(workloads: &[WorkloadConfig], trust_domain: &str) -> Result<Self, trellis_proto::spiffe::SpiffeIdError> {
        let mut out = Self::default();
        for config in workloads {
            let spiffe_id = SpiffeId::workload(trust_domain, &config.namespace, &config.service_account)?;
            let peer = PeerLabels::new(&spiffe_id, &config.name, &config.namespace);
            let local = Arc::new(LocalWorkload { key: config.key(), config: config.clone(), spiffe_id, peer });
            for ip in &config.addresses {
                out.by_ip.insert(*ip, local.clone());
            }
            out.all.push(local);
        }
        Ok(out)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<LocalWorkload>> {
        self.by_ip.get(&ip)
    }

    pub fn all(&self) -> &[Arc<LocalWorkload>] {
        &self.all
    }

    pub fn get(&self, index: usize) -> Option<&Arc<LocalWorkload>> {
        self.all.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::workload("td", "ns", sa).unwrap()
    }

    /// A mesh workload as the control plane sends it (identity and proxy address filled in).
    fn workload(name: &str, sa: &str, addresses: &[&str]) -> v1::Workload {
        v1::Workload {
            name: name.into(),
            namespace: "ns".into(),
            service_account: sa.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ports: vec![v1::Port { port: 8080, protocol: v1::Protocol::Tcp as i32 }],
            proxy_address: "192.0.2.1:15008".into(),
            spiffe_id: id(sa).to_string(),
            ..Default::default()
        }
    }

    fn registry(workloads: Vec<v1::Workload>) -> Registry {
        let mut state = State::default();
        for w in workloads {
            Arc::make_mut(&mut state.workloads).insert(trellis_proto::workload_key(&w.namespace, &w.name), Arc::new(w));
        }
        Registry::from_state(&state)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_address_leads_to_the_workload_and_its_proxy() {
        let mut api = workload("api", "api-sa", &["10.1.0.2", "fd00::2", "not-an-address"]);
        api.ports = vec![
            v1::Port { port: 8080, protocol: v1::Protocol::Http as i32 },
            v1::Port { port: 5432, protocol: v1::Protocol::Tcp as i32 },
            v1::Port { port: 70_000, protocol: v1::Protocol::Tcp as i32 },
        ];
        let registry = registry(vec![api]);
        for address in ["10.1.0.2", "fd00::2"] {
            let found = registry.lookup(ip(address)).expect(address);
            assert_eq!(found.spiffe_id, id("api-sa"));
            assert_eq!((found.key.as_str(), found.hbone_port), ("ns/api", 15008));
            // The port beyond u16 is left out.
            assert_eq!(found.ports, HashMap::from([(8080, Protocol::Http), (5432, Protocol::Tcp)]));
        }
        assert!(registry.lookup(ip("10.1.0.3")).is_none());
    }

    #[test]
    fn workloads_without_identity_or_proxy_port_are_left_out() {
        let good = workload("good", "good-sa", &["10.1.0.1"]);
        let mut no_id = workload("no-id", "sa", &["10.1.0.2"]);
        no_id.spiffe_id = "ns/sa".into();
        let mut no_proxy = workload("no-proxy", "sa", &["10.1.0.3"]);
        no_proxy.proxy_address = String::new();
        let mut no_port = workload("no-port", "sa", &["10.1.0.4"]);
        no_port.proxy_address = "192.0.2.1".into();
        let registry = registry(vec![good, no_id, no_proxy, no_port]);
        assert_eq!(registry.lookup(ip("10.1.0.1")).map(|w| w.name.as_str()), Some("good"));
        for address in ["10.1.0.2", "10.1.0.3", "10.1.0.4"] {
            assert!(registry.lookup(ip(address)).is_none(), "{address}");
        }
    }

    #[test]
    fn source_is_the_workload_at_the_peer_address_or_the_only_holder_of_the_identity() {
        // a and b share an identity; c has its own.
        let registry = registry(vec![
            workload("a", "shared", &["10.1.0.1"]),
            workload("b", "shared", &["10.1.0.2"]),
            workload("c", "own", &["10.1.0.3"]),
        ]);
        let name = |id: &SpiffeId, at: Option<&str>| registry.source(id, at.map(ip)).map(|w| w.name.clone());
        // The address decides between holders of a shared identity.
        assert_eq!(name(&id("shared"), Some("10.1.0.2")).as_deref(), Some("b"));
        assert_eq!(name(&id("shared"), Some("10.1.0.1")).as_deref(), Some("a"));
        // Without an address holding it, a shared identity names no workload.
        assert_eq!(name(&id("shared"), None), None);
        assert_eq!(name(&id("shared"), Some("10.1.0.3")), None);
        // A unique identity names its workload from anywhere; the address of another identity does not count.
        assert_eq!(name(&id("own"), None).as_deref(), Some("c"));
        assert_eq!(name(&id("own"), Some("10.1.0.1")).as_deref(), Some("c"));
        assert_eq!(name(&id("unknown"), Some("10.1.0.1")), None);
    }

    #[test]
    fn a_claimed_source_is_trusted_only_for_a_workload_of_the_peer_identity_on_the_peer_node() {
        let mut elsewhere = workload("b", "shared", &["10.1.0.2"]);
        elsewhere.proxy_address = "192.0.2.9:15008".into();
        let registry = registry(vec![
            workload("a", "shared", &["10.1.0.1", "fd00::1"]),
            elsewhere,
            workload("c", "own", &["10.1.0.3"]),
        ]);
        let node = ip("192.0.2.1");
        // Control: the peer's own workload, on the peer's node, both families.
        assert_eq!(registry.vouch_source(&id("shared"), ip("10.1.0.1"), node), Ok(()));
        assert_eq!(registry.vouch_source(&id("shared"), ip("fd00::1"), node), Ok(()));
        // A tunnel over IPv6 comes from the node's IPv6 address, which one of its workloads holds.
        assert_eq!(registry.vouch_source(&id("shared"), ip("fd00::1"), ip("fd00::1")), Ok(()));
        // An address no workload has, another identity's workload, the same identity's workload on another node.
        assert_eq!(registry.vouch_source(&id("shared"), ip("10.9.9.9"), node), Err(UntrustedSource::NotAWorkload));
        assert_eq!(
            registry.vouch_source(&id("shared"), ip("10.1.0.3"), node),
            Err(UntrustedSource::OtherIdentity(id("own")))
        );
        assert_eq!(
            registry.vouch_source(&id("shared"), ip("10.1.0.2"), node),
            Err(UntrustedSource::OtherNode(ip("192.0.2.9")))
        );
    }
}
