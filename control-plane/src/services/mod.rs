//! The gRPC services: thin translations between the wire contract and [`crate::mesh::Mesh`].

pub mod admin;
pub mod discovery;
pub mod identity;

use std::sync::Arc;

use crate::mesh::Mesh;
use crate::status::ProxyRegistry;

/// What every service shares.
#[derive(Clone)]
pub struct Shared {
    pub mesh: Arc<Mesh>,
    pub proxies: Arc<ProxyRegistry>,
}
