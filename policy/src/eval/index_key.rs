//! The exact values a rule can be filed under in the per-workload index ([`super::index`]): computed when a
//! policy is compiled, read when a workload's index is built and when a request's principal is looked up.

use std::hash::{DefaultHasher, Hasher};

/// What a request needs for a rule to possibly match, for the per-workload index: a principal or a port among a
/// few exact values (from a positive `when` check, or from one positive check in every `from` / `to` element;
/// principals win over ports). A rule is filed under each of its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IndexKey {
    /// The peer principal has this [`principal_hash`].
    Principal(u64),
    /// The destination port is this.
    Port(u16),
    /// No such requirement: the rule is always tried.
    Any,
}

/// The key a principal is filed under. `DefaultHasher::new()` is the same function throughout the process.
pub(crate) fn principal_hash(principal: &str) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(principal.as_bytes());
    h.finish()
}
