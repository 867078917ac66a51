//! What changed from one snapshot to the next, computed once per change and shared by the streams that make the
//! same step. On a change, the thousands of streams of a replica hold the same snapshot (`sent`) and move to the
//! same next one; diffing the whole registry once per stream cost (streams × workloads) per change, the largest
//! part of a replica's work when 10,000 proxies converge. A [`Step`] is the unscoped difference; each stream only
//! filters the resources by its [`Scope`] and builds its update from it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use trellis_proto::v1 as pb;

use super::scope::Scope;
use crate::mesh::Snapshot;

/// Steps remembered: the streams of a replica make few distinct steps at once (most hold the previous snapshot; a
/// few lag one or two changes behind, and new streams start from nothing).
const KEEP: usize = 16;

/// The difference from `sent` (None: a proxy that holds nothing) to a snapshot, before scoping.
#[derive(Debug, Default)]
pub struct Step {
    version: u64,
    full: bool,
    trust_bundle: Option<pb::TrustBundle>,
    workloads: Vec<pb::Workload>,
    removed_workloads: Vec<String>,
    /// Resources added or changed, every namespace, in key order.
    resources: Vec<Arc<pb::Resource>>,
    /// Resources removed, as `sent` held them, in key order.
    removed_resources: Vec<Arc<pb::Resource>>,
    jwks: Option<pb::JwksSet>,
    revocations: Option<pb::Revocations>,
}

impl Step {
    /// A full snapshot when `sent` is None, else only what changed. The registry goes whole in a full snapshot and
    /// as added, changed and removed entries after it.
    pub fn between(sent: Option<&Snapshot>, next: &Snapshot) -> Step {
        let Some(sent) = sent else {
            return Step {
                version: next.version,
                full: true,
                trust_bundle: Some(next.trust_bundle.clone()),
                workloads: next.workloads.values().map(|w| (**w).clone()).collect(),
                removed_workloads: vec![],
                resources: next.resources.values().cloned().collect(),
                removed_resources: vec![],
                jwks: Some(jwks_set(&next.jwks)),
                revocations: Some((*next.revocations).clone()),
            };
        };
        let mut step = Step { version: next.version, ..Default::default() };
        if std::ptr::eq(sent, next) {
            return step;
        }
        if sent.trust_bundle != next.trust_bundle {
            step.trust_bundle = Some(next.trust_bundle.clone());
        }
        for (key, w) in &next.workloads {
            if sent.workloads.get(key).is_none_or(|old| !Arc::ptr_eq(old, w) && old != w) {
                step.workloads.push((**w).clone());
            }
        }
        step.removed_workloads = sent.workloads.keys().filter(|k| !next.workloads.contains_key(*k)).cloned().collect();
        for (key, r) in &next.resources {
            if sent.resources.get(key).is_none_or(|old| !Arc::ptr_eq(old, r) && old != r) {
                step.resources.push(r.clone());
            }
        }
        step.removed_resources =
            sent.resources.iter().filter(|(k, _)| !next.resources.contains_key(*k)).map(|(_, r)| r.clone()).collect();
        if !Arc::ptr_eq(&sent.jwks, &next.jwks) && sent.jwks != next.jwks {
            step.jwks = Some(jwks_set(&next.jwks));
        }
        if !Arc::ptr_eq(&sent.revocations, &next.revocations) && sent.revocations != next.revocations {
            step.revocations = Some((*next.revocations).clone());
        }
        step
    }

    /// What a proxy of `scope` is sent for this step: None when nothing it receives changed (a full snapshot is
    /// always sent). A resource's scope depends on its namespace only, so filtering the unscoped difference by the
    /// scope gives the difference of the scoped views.
    pub fn update(&self, scope: &Scope) -> Option<pb::ConfigUpdate> {
        let update = pb::ConfigUpdate {
            version: self.version,
            full: self.full,
            trust_bundle: self.trust_bundle.clone(),
            workloads: self.workloads.clone(),
            removed_workloads: self.removed_workloads.clone(),
            resources: self.resources.iter().filter(|r| scope.admits(r)).map(|r| (**r).clone()).collect(),
            removed_resources: self
                .removed_resources
                .iter()
                .filter(|r| scope.admits(r))
                .filter_map(|r| r.key.clone())
                .collect(),
            jwks: self.jwks.clone(),
            revocations: self.revocations.clone(),
            lineage: String::new(),
        };
        let empty = update.trust_bundle.is_none()
            && update.jwks.is_none()
            && update.revocations.is_none()
            && update.workloads.is_empty()
            && update.removed_workloads.is_empty()
            && update.resources.is_empty()
            && update.removed_resources.is_empty();
        (self.full || !empty).then_some(update)
    }
}

pub fn jwks_set(jwks: &std::collections::BTreeMap<String, String>) -> pb::JwksSet {
    pb::JwksSet { entries: jwks.iter().map(|(uri, json)| pb::Jwks { uri: uri.clone(), json: json.clone() }).collect() }
}

/// The recent steps, shared by every stream of the replica.
#[derive(Default)]
pub struct Steps {
    recent: Mutex<VecDeque<Recent>>,
    /// Steps computed (not found among the recent ones), for tests.
    #[cfg(test)]
    computed: std::sync::atomic::AtomicUsize,
}

struct Recent {
    sent: Option<Arc<Snapshot>>,
    next: Arc<Snapshot>,
    /// Computed by the first stream that needs it; the others wait for it rather than compute it again.
    step: Arc<OnceLock<Step>>,
}

impl Steps {
    /// The step from `sent` to `next`, computed once however many streams ask (the lock is held only to find or
    /// add the entry, never while computing).
    pub fn between(&self, sent: Option<&Arc<Snapshot>>, next: &Arc<Snapshot>) -> Arc<OnceLock<Step>> {
        let same = |a: Option<&Arc<Snapshot>>, b: Option<&Arc<Snapshot>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let cell = {
            let mut recent = self.recent.lock().expect("steps lock");
            match recent.iter().find(|r| Arc::ptr_eq(&r.next, next) && same(r.sent.as_ref(), sent)) {
                Some(r) => r.step.clone(),
                None => {
                    if recent.len() == KEEP {
                        recent.pop_front();
                    }
                    let step = Arc::new(OnceLock::new());
                    recent.push_back(Recent { sent: sent.cloned(), next: next.clone(), step: step.clone() });
                    step
                }
            }
        };
        cell.get_or_init(|| {
            #[cfg(test)]
            self.computed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Step::between(sent.map(|s| s.as_ref()), next)
        });
        cell
    }

    /// What a proxy of `scope` that holds `sent` is sent to reach `next` (`Step::update`).
    pub fn update(
        &self,
        sent: Option<&Arc<Snapshot>>,
        next: &Arc<Snapshot>,
        scope: &Scope,
    ) -> Option<pb::ConfigUpdate> {
        self.between(sent, next).get().expect("initialized by between").update(scope)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn resource(namespace: &str, revision: u64) -> Arc<pb::Resource> {
        Arc::new(pb::Resource {
            key: Some(pb::ResourceKey {
                kind: "AuthorizationPolicy".into(),
                namespace: namespace.into(),
                name: "p".into(),
            }),
            revision,
            json: format!("{{\"r\":{revision}}}"),
        })
    }

    fn snapshot(version: u64, resources: &[(&str, u64)], workloads: usize) -> Arc<Snapshot> {
        let resources: BTreeMap<String, Arc<pb::Resource>> =
            resources.iter().map(|(ns, r)| (format!("AuthorizationPolicy/{ns}/p"), resource(ns, *r))).collect();
        let workloads = (0..workloads)
            .map(|i| (format!("ns/w{i}"), Arc::new(pb::Workload { name: format!("w{i}"), ..Default::default() })))
            .collect();
        Arc::new(Snapshot { version, resources, workloads, ..Default::default() })
    }

    /// Streams that make the same step share one computation; each still gets its own scope's resources, the same
    /// update as diffing alone.
    #[test]
    fn streams_making_the_same_step_share_it_and_keep_their_scopes() {
        let steps = Steps::default();
        let one = snapshot(1, &[("a", 1), ("b", 1)], 3);
        let mut two = Snapshot { version: 2, ..Default::default() };
        two.trust_bundle = one.trust_bundle.clone();
        two.workloads = one.workloads.clone();
        two.workloads.insert("ns/w9".into(), Arc::new(pb::Workload { name: "w9".into(), ..Default::default() }));
        two.resources = one.resources.clone();
        two.resources.insert("AuthorizationPolicy/a/p".into(), resource("a", 2));
        two.resources.remove("AuthorizationPolicy/b/p");
        two.jwks = one.jwks.clone();
        two.revocations = one.revocations.clone();
        let two = Arc::new(two);
        let scope = |ns: &str| Scope::Namespaces([ns.to_owned()].into());
        for (scope, namespaces, removed) in [
            (Scope::Everything, vec!["a"], vec!["b"]),
            (scope("a"), vec!["a"], vec![]),
            (scope("b"), vec![], vec!["b"]),
            (scope("c"), vec![], vec![]),
        ] {
            for _ in 0..3 {
                let update = steps.update(Some(&one), &two, &scope).unwrap();
                assert_eq!(Some(&update), diff_alone(&one, &two, &scope).as_ref(), "{scope:?}");
                let got: Vec<&str> =
                    update.resources.iter().map(|r| r.key.as_ref().unwrap().namespace.as_str()).collect();
                assert_eq!(got, namespaces, "{scope:?}");
                let gone: Vec<&str> = update.removed_resources.iter().map(|k| k.namespace.as_str()).collect();
                assert_eq!(gone, removed, "{scope:?}");
                assert_eq!(update.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["w9"]);
            }
        }
        assert_eq!(steps.computed.load(std::sync::atomic::Ordering::Relaxed), 1, "one step, computed once");
        // A full snapshot and another base are other steps.
        assert!(steps.update(None, &two, &scope("c")).unwrap().full);
        assert!(steps.update(Some(&two), &two, &scope("c")).is_none(), "nothing changed");
        assert_eq!(steps.computed.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    fn diff_alone(sent: &Snapshot, next: &Snapshot, scope: &Scope) -> Option<pb::ConfigUpdate> {
        Step::between(Some(sent), next).update(scope)
    }

    /// The remembered steps are bounded: the oldest is forgotten (and computed again if asked for).
    #[test]
    fn steps_are_bounded() {
        let steps = Steps::default();
        let base = snapshot(0, &[], 1);
        let nexts: Vec<_> = (1..=KEEP as u64 + 1).map(|v| snapshot(v, &[("a", v)], 1)).collect();
        for next in &nexts {
            steps.update(Some(&base), next, &Scope::Everything).unwrap();
        }
        assert_eq!(steps.recent.lock().unwrap().len(), KEEP);
        steps.update(Some(&base), &nexts[0], &Scope::Everything).unwrap();
        assert_eq!(steps.computed.load(std::sync::atomic::Ordering::Relaxed), KEEP + 2);
    }
}
