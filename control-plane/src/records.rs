//! Typed records kept in the store (JSON values), and the helpers that read and write them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, Table, Txn};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    /// SHA-256 of the secret part (hex): the token itself is never stored.
    pub secret_sha256: String,
    pub node: String,
    pub namespaces: Vec<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub reusable: bool,
    pub uses: u32,
    pub revoked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub namespaces: Vec<String>,
    pub joined_at: i64,
    pub revoked: bool,
    /// When it was revoked (absent in records revoked before this field, or not revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    pub credential_serial: String,
}

/// The log of issued certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertRecord {
    pub serial: String,
    pub identity: String,
    pub node: String,
    pub issued_at: i64,
    pub not_after: i64,
    /// SHA-256 (hex) of the issuing CA's certificate (empty in records written before root rotation existed).
    #[serde(default)]
    pub issuer: String,
}

/// A certificate of a revoked node, pushed to every proxy until it expires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevokedCertRecord {
    pub serial: String,
    pub identity: String,
    pub node: String,
    pub not_after: i64,
    pub revoked_at: i64,
}

/// A revoked workload identity: no certificate naming it is accepted or signed any more.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevokedIdentityRecord {
    pub spiffe_id: String,
    pub revoked_at: i64,
}

/// An admin credential; calls are accepted only from admins recorded here and not revoked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdminRecord {
    pub name: String,
    pub serial: String,
    pub created_at: i64,
    /// The admin that created it; empty for the one `trellis-control init` made.
    pub created_by: String,
    pub not_after: i64,
    pub revoked: bool,
    pub revoked_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResourceRecord {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub revision: u64,
    /// Canonical JSON of the validated document.
    pub json: String,
}

impl ResourceRecord {
    pub fn store_key(&self) -> String {
        resource_store_key(&self.kind, &self.namespace, &self.name)
    }
}

pub fn resource_store_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// Keys in the meta table.
pub const META_VERSION: &str = "config_version";
pub const META_REVISION: &str = "resource_revision";

pub fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, key: key.to_owned(), reason: e.to_string() })
}

pub fn get<T: DeserializeOwned>(txn: &dyn Txn, table: Table, key: &str) -> Result<Option<T>, StoreError> {
    txn.get(table, key)?.map(|bytes| decode(table, key, &bytes)).transpose()
}

pub fn put<T: Serialize>(txn: &mut dyn Txn, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).expect("records serialize");
    txn.put(table, key, &bytes)
}

pub fn load<T: DeserializeOwned>(store: &dyn Store, table: Table, key: &str) -> Result<Option<T>, StoreError> {
    store.get(table, key)?.map(|bytes| decode(table, key, &bytes)).transpose()
}

pub fn load_all<T: DeserializeOwned>(store: &dyn Store, table: Table) -> Result<Vec<T>, StoreError> {
    store.list(table)?.iter().map(|(key, bytes)| decode(table, key, bytes)).collect()
}

pub fn counter(txn: &dyn Txn, key: &str) -> Result<u64, StoreError> {
    Ok(get::<u64>(txn, Table::Meta, key)?.unwrap_or(0))
}

/// Increments a counter in the meta table and returns the new value.
pub fn bump(txn: &mut dyn Txn, key: &str) -> Result<u64, StoreError> {
    let next = counter(txn, key)? + 1;
    put(txn, Table::Meta, key, &next)?;
    Ok(next)
}
