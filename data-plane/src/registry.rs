//! Address lookups, built once per config change: every mesh workload by IP (where to tunnel, which identity to
//! expect), and this proxy's own workloads by IP (which identity a local client speaks as, which ports may be
//! dialled on an inbound tunnel).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_proto::spiffe::SpiffeId;
use trellis_proto::v1;

use crate::config::{Protocol, WorkloadConfig};
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
}

#[derive(Debug, Default)]
pub struct Registry {
    by_ip: HashMap<IpAddr, Arc<MeshWorkload>>,
}

impl Registry {
    pub fn from_state(state: &State) -> Self {
        let mut by_ip = HashMap::new();
        for workload in state.workloads.values() {
            let Some(entry) = mesh_workload(workload) else {
                tracing::debug!(workload = %workload.name, "registry entry without usable identity or proxy address");
                continue;
            };
            let entry = Arc::new(entry);
            for address in &workload.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    by_ip.insert(ip, entry.clone());
                }
            }
        }
        Self { by_ip }
    }

    pub fn lookup(&self, ip: IpAddr) -> Option<&Arc<MeshWorkload>> {
        self.by_ip.get(&ip)
    }
}

fn mesh_workload(w: &v1::Workload) -> Option<MeshWorkload> {
    let spiffe_id = SpiffeId::parse(&w.spiffe_id).ok()?;
    let hbone_port = w.proxy_address.parse::<SocketAddr>().ok()?.port();
    let ports = w
        .ports
        .iter()
        .filter_map(|p| {
            let protocol = match p.protocol() {
                v1::Protocol::Http => Protocol::Http,
                _ => Protocol::Tcp,
            };
            Some((u16::try_from(p.port).ok()?, protocol))
        })
        .collect();
    Some(MeshWorkload {
        key: trellis_proto::workload_key(&w.namespace, &w.name),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        spiffe_id,
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ports,
        hbone_port,
    })
}

/// One of this proxy's own workloads.
#[derive(Debug)]
pub struct LocalWorkload {
    pub config: WorkloadConfig,
    pub spiffe_id: SpiffeId,
    /// `<namespace>/<name>`.
    pub key: String,
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
            let local = Arc::new(LocalWorkload { key: config.key(), config: config.clone(), spiffe_id });
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
