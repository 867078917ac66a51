//! Per-workload rule index, so that a check only looks at the rules that can match the request.
//!
//! Most rules name their peers by exact principal (`principals: [cluster.local/ns/foo/sa/sleep]`) or their
//! ports exactly: such a rule can only match a request with one of those principals (ports). Each action list
//! files every rule under the exact values it requires ([`IndexKey`]s, computed at compile time), or in a list of
//! rules that are always considered. A check then walks the rules filed under the request's principal and port
//! and the always-considered ones, merged back into policy order, then rule order: the first of them that
//! matches is the first match of a scan over every rule, so decisions are unchanged.
//!
//! Values are filed by a 64-bit hash, so that building the index (once per workload) handles no strings. Two
//! values with the same hash share their rules: a check then tries a few more rules, with the same result.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::compile::CompiledPolicy;
use super::index_key::IndexKey;

/// The key a port is filed under: spread over 64 bits, as the hash map expects.
fn port_hash(port: u16) -> u64 {
    u64::from(port).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A rule of a [`PolicyList`]: index of its policy in the list, index of the rule in `spec.rules`. The derived
/// order is evaluation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RuleRef {
    pub(crate) policy: u32,
    pub(crate) rule: u32,
}

/// The policies of one action (and dry-run state) that apply to a workload, in evaluation order, with their
/// rules indexed. Every rule is in exactly one of `by_principal`, `by_port` and `always`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyList {
    pub(crate) policies: Vec<Arc<CompiledPolicy>>,
    /// Rules that can only match a peer with one of a few exact principals, under each of them.
    by_principal: Filed,
    /// Rules that can only match one of a few destination ports (and are not in `by_principal`).
    by_port: Filed,
    /// Every other rule, sorted.
    always: Vec<RuleRef>,
}

impl PolicyList {
    pub(crate) fn new(policies: Vec<Arc<CompiledPolicy>>) -> PolicyList {
        let (mut by_principal, mut by_port, mut always) = (Vec::new(), Vec::new(), Vec::new());
        for (policy, p) in policies.iter().enumerate() {
            let policy = u32::try_from(policy).expect("fewer than 2^32 policies");
            for &(key, rule) in &p.index_keys {
                let r = RuleRef { policy, rule };
                match key {
                    IndexKey::Principal(hash) => by_principal.push((hash, r)),
                    IndexKey::Port(port) => by_port.push((port_hash(port), r)),
                    IndexKey::Any => always.push(r),
                }
            }
        }
        PolicyList { policies, by_principal: Filed::new(by_principal), by_port: Filed::new(by_port), always }
    }

    pub(crate) fn len(&self) -> usize {
        self.policies.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// `(rules in by_principal or by_port, all rules)`.
    #[cfg(test)]
    pub(crate) fn indexed_rules(&self) -> (usize, usize) {
        let all = self.policies.iter().map(|p| p.rules.len()).sum::<usize>();
        (all - self.always.len(), all)
    }

    /// The rules that can match a request to `port` from the peer whose
    /// [`principal_hash`](super::index_key::principal_hash) `principal` returns
    /// (called only if rules are filed by principal), in evaluation order. Allocation-free.
    pub(crate) fn candidates(&self, principal: impl FnOnce() -> Option<u64>, port: u16) -> Candidates<'_> {
        let by_principal = if self.by_principal.is_empty() {
            &[][..]
        } else {
            principal().map_or(&[][..], |h| self.by_principal.get(h))
        };
        let by_port = self.by_port.get(port_hash(port));
        Candidates { lists: [by_principal, by_port, &self.always] }
    }
}

/// Rules filed under the hashes of the values they require: `ranges[hash]` is a slice of `rules`, in evaluation
/// order.
#[derive(Debug, Clone, Default)]
struct Filed {
    rules: Vec<RuleRef>,
    ranges: HashMap<u64, (u32, u32), BuildHasherDefault<Prehashed>>,
}

impl Filed {
    fn new(mut entries: Vec<(u64, RuleRef)>) -> Filed {
        // By hash, then rule: each hash's rules are in evaluation order. A rule listing a value twice is filed once.
        entries.sort_unstable();
        entries.dedup();
        let mut ranges = HashMap::with_capacity_and_hasher(entries.len(), BuildHasherDefault::default());
        let mut start = 0;
        for group in entries.chunk_by(|a, b| a.0 == b.0) {
            let end = start + u32::try_from(group.len()).expect("fewer than 2^32 rules");
            ranges.insert(group[0].0, (start, end));
            start = end;
        }
        Filed { rules: entries.into_iter().map(|(_, r)| r).collect(), ranges }
    }

    fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn get(&self, hash: u64) -> &[RuleRef] {
        match self.ranges.get(&hash) {
            Some(&(start, end)) => &self.rules[start as usize..end as usize],
            None => &[],
        }
    }
}

/// The keys of [`Filed::ranges`] are hashes already.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// Merge of sorted, disjoint rule lists.
pub(crate) struct Candidates<'a> {
    lists: [&'a [RuleRef]; 3],
}

impl Iterator for Candidates<'_> {
    type Item = RuleRef;

    fn next(&mut self) -> Option<RuleRef> {
        let (i, _) =
            (self.lists.iter().enumerate()).filter_map(|(i, l)| Some((i, *l.first()?))).min_by_key(|(_, r)| *r)?;
        let (&head, rest) = self.lists[i].split_first()?;
        self.lists[i] = rest;
        Some(head)
    }
}
