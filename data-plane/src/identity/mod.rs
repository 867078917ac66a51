//! Identities: the node credential (how this proxy authenticates to the control plane) and the workload
//! certificates (how its workloads authenticate to each other).

pub mod certs;
pub mod csr;
pub mod files;
pub mod node;
pub mod node_renewal;
pub mod workload;

pub use node::{NodeCredential, NodeError};
pub use workload::{CertManager, WorkloadCert, WorkloadCerts};
