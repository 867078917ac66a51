//! What each proxy reported holding: the certificates it uses (workload SVIDs, node credential), with the CA
//! that signed each. A root rotation's switch waits on these reports; `trellisctl ca status` shows them. A report
//! outlives its stream (a proxy that went away still holds what it held), but "reported" is per stream.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use trellis_proto::v1 as pb;

#[derive(Debug, Clone, Default)]
pub struct Held {
    /// A report came on the proxy's current stream.
    pub reported: bool,
    pub certificates: Vec<pb::HeldCertificate>,
}

impl Held {
    /// How many of the certificates the CA with this fingerprint signed.
    pub fn signed_by(&self, ca_sha256: &str) -> usize {
        self.certificates.iter().filter(|c| c.issuer_sha256 == ca_sha256).count()
    }
}

#[derive(Default)]
pub struct Holdings {
    nodes: DashMap<String, Held>,
    /// Bumped by every change, so that the status publisher skips a period where nothing changed.
    generation: AtomicU64,
}

impl Holdings {
    /// A new stream from `node`: its report is awaited again.
    pub fn stream_started(&self, node: &str) {
        self.nodes.entry(node.to_owned()).or_default().reported = false;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn report(&self, node: &str, certificates: Vec<pb::HeldCertificate>) {
        self.nodes.insert(node.to_owned(), Held { reported: true, certificates });
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes with every change of what is held (read it before reading the holdings).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, node: &str) -> Held {
        self.nodes.get(node).map(|h| h.clone()).unwrap_or_default()
    }
}
