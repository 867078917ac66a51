//! The root CA rotation as a state machine, pure: the record the store keeps (which phase, since when, what it
//! waits for) and the decision whether a phase is complete, from what the control plane observes of its proxies.
//! `mesh/rotation.rs` makes the transitions (store first), `services/rotation.rs` drives them.
//!
//! Phases, in order: `prepare` (the new root joins the trust bundle; complete when every connected proxy ACKed a
//! version carrying it), `switch` (the new CA signs; every proxy renews; complete when every connected proxy
//! reported certificates and none of them is from the retiring CA), `overlap` (the retiring root stays in the
//! bundle for proxies that were away, until `retire_at`, and until every live control-plane replica serves a
//! certificate from the new root: a client that trusts only the new root, as admin configs do once the rotation is
//! done, must be able to reach every replica), `retire` (the retiring root leaves the bundle; complete when every
//! connected proxy ACKed that), `done`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Prepare,
    Switch,
    Overlap,
    Retire,
    Done,
}

impl Phase {
    pub const ALL: [Phase; 5] = [Phase::Prepare, Phase::Switch, Phase::Overlap, Phase::Retire, Phase::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Switch => "switch",
            Phase::Overlap => "overlap",
            Phase::Retire => "retire",
            Phase::Done => "done",
        }
    }

    /// The phase after this one (`done` stays).
    pub fn next(self) -> Phase {
        match self {
            Phase::Prepare => Phase::Switch,
            Phase::Switch => Phase::Overlap,
            Phase::Overlap => Phase::Retire,
            Phase::Retire | Phase::Done => Phase::Done,
        }
    }

    /// Whether the CA the rotation introduces signs new certificates in this phase.
    pub fn new_ca_signs(self) -> bool {
        self >= Phase::Switch
    }

    /// Whether the retiring root is still in the trust bundle in this phase.
    pub fn old_root_trusted(self) -> bool {
        self < Phase::Retire
    }
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Phase::Prepare, Phase::Switch, Phase::Overlap, Phase::Retire, Phase::Done]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a rotation phase (prepare, switch, overlap, retire, done)"))
    }
}

/// One rotation, as kept in the store (meta table, [`RECORD_KEY`]). The last one stays after it is done: its
/// `new_dir` is then the CA in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationRecord {
    /// Counts rotations, from 1.
    pub rotation: u64,
    /// Folders of the data dir holding the retiring CA and the new one.
    pub old_dir: String,
    pub new_dir: String,
    pub phase: Phase,
    /// Chosen overlap; `None`: until the retiring CA's last certificate issued to a proxy expires.
    pub overlap_secs: Option<u64>,
    /// Retire as soon as the switch is complete.
    pub force: bool,
    /// The config version that carried the trust bundle of the current phase (prepare: with the new root; retire:
    /// without the retiring one): proxies ACKing it (or later) have it.
    pub bundle_version: u64,
    /// When the overlap ends (set on entering it).
    pub retire_at: Option<i64>,
    /// When each phase began (unix seconds).
    pub history: Vec<(Phase, i64)>,
}

pub const RECORD_KEY: &str = "ca_rotation";

/// What the rotation sees of one proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyView {
    pub node: String,
    pub connected: bool,
    pub acked_version: u64,
    /// It reported the certificates it holds since it connected.
    pub reported: bool,
    /// Of those, how many the retiring CA signed.
    pub old_certificates: usize,
}

/// What the rotation sees of one control-plane replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub replica: String,
    /// Its serving certificate chains to the new root (it rebuilt its TLS since it followed the switch).
    pub serves_new_root: bool,
}

/// Whether the current phase is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not yet: what it waits for, in words.
    Wait(String),
    /// Complete: go on to this phase.
    Advance(Phase),
}

/// Decides from the record, what the proxies show (only connected ones count: one that comes back later gets the
/// current bundle in its first snapshot and is asked to renew when it reports old certificates) and what the live
/// replicas serve (looked at in the overlap only).
pub fn decide(record: &RotationRecord, proxies: &[ProxyView], replicas: &[ReplicaView], now: i64) -> Decision {
    let waiting = |what: &str, pending: Vec<&str>| {
        if pending.is_empty() {
            Decision::Advance(record.phase.next())
        } else {
            Decision::Wait(format!("{} {what}: {}", pending.len(), pending.join(", ")))
        }
    };
    let connected = proxies.iter().filter(|p| p.connected);
    match record.phase {
        Phase::Prepare => waiting(
            &format!("proxies to ACK version {} (the bundle with the new root)", record.bundle_version),
            connected.filter(|p| p.acked_version < record.bundle_version).map(|p| p.node.as_str()).collect(),
        ),
        Phase::Switch => waiting(
            "proxies to hold only certificates of the new CA",
            connected.filter(|p| !p.reported || p.old_certificates > 0).map(|p| p.node.as_str()).collect(),
        ),
        Phase::Overlap => match record.retire_at {
            Some(at) if !record.force && now < at => Decision::Wait(format!("the overlap to end at unix time {at}")),
            _ => waiting(
                "control-plane replicas to serve a certificate from the new root",
                replicas.iter().filter(|r| !r.serves_new_root).map(|r| r.replica.as_str()).collect(),
            ),
        },
        Phase::Retire => waiting(
            &format!("proxies to ACK version {} (the bundle without the retiring root)", record.bundle_version),
            connected.filter(|p| p.acked_version < record.bundle_version).map(|p| p.node.as_str()).collect(),
        ),
        Phase::Done => Decision::Wait("nothing: the rotation is done".into()),
    }
}

/// When the overlap entered at `now` ends: `force` at once, else after the chosen overlap, else when the latest of
/// `issued_not_after` (expiries of the certificates the retiring CA issued to proxies) passes.
pub fn retire_at(record: &RotationRecord, now: i64, issued_not_after: impl Iterator<Item = i64>) -> i64 {
    if record.force {
        return now;
    }
    match record.overlap_secs {
        Some(secs) => now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)),
        None => issued_not_after.max().unwrap_or(now).max(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(phase: Phase) -> RotationRecord {
        RotationRecord {
            rotation: 1,
            old_dir: "ca".into(),
            new_dir: "ca-1".into(),
            phase,
            overlap_secs: None,
            force: false,
            bundle_version: 10,
            retire_at: None,
            history: vec![(Phase::Prepare, 0)],
        }
    }

    fn proxy(node: &str, connected: bool, acked: u64, reported: bool, old: usize) -> ProxyView {
        ProxyView { node: node.into(), connected, acked_version: acked, reported, old_certificates: old }
    }

    #[test]
    fn prepare_waits_for_every_connected_proxy_to_ack_the_bundle() {
        let r = record(Phase::Prepare);
        let proxies = [proxy("a", true, 10, true, 3), proxy("b", true, 9, true, 3), proxy("c", false, 1, true, 3)];
        assert_eq!(
            decide(&r, &proxies, &[], 0),
            Decision::Wait("1 proxies to ACK version 10 (the bundle with the new root): b".into())
        );
        // Control: once b ACKs (a later version counts too), the disconnected c does not hold it back.
        let proxies = [proxy("a", true, 10, true, 3), proxy("b", true, 11, true, 3), proxy("c", false, 1, true, 3)];
        assert_eq!(decide(&r, &proxies, &[], 0), Decision::Advance(Phase::Switch));
    }

    #[test]
    fn switch_waits_for_reports_without_old_certificates() {
        let r = record(Phase::Switch);
        let cases = [
            (proxy("a", true, 10, false, 0), false, "not reported since it connected"),
            (proxy("a", true, 10, true, 1), false, "still holds one old certificate"),
            (proxy("a", false, 10, true, 1), true, "disconnected: not waited for"),
            (proxy("a", true, 10, true, 0), true, "reported only new certificates"),
        ];
        for (p, complete, why) in cases {
            let decision = decide(&r, &[p], &[], 0);
            assert_eq!(decision == Decision::Advance(Phase::Overlap), complete, "{why}: {decision:?}");
        }
    }

    #[test]
    fn overlap_ends_at_retire_at_or_at_once_when_forced() {
        let mut r = record(Phase::Overlap);
        r.retire_at = Some(100);
        assert!(matches!(decide(&r, &[], &[], 99), Decision::Wait(_)));
        assert_eq!(decide(&r, &[], &[], 100), Decision::Advance(Phase::Retire));
        r.force = true;
        assert_eq!(decide(&r, &[], &[], 0), Decision::Advance(Phase::Retire));
    }

    /// The old root leaves the bundle only once every live replica serves a certificate from the new root: a
    /// client that then trusts only the new root reaches each of them.
    #[test]
    fn overlap_ends_only_once_every_replica_serves_the_new_root() {
        let mut r = record(Phase::Overlap);
        r.retire_at = Some(100);
        let replica = |name: &str, serves_new_root: bool| ReplicaView { replica: name.into(), serves_new_root };
        let replicas = [replica("r0", true), replica("r1", false), replica("r2", true)];
        assert_eq!(
            decide(&r, &[], &replicas, 100),
            Decision::Wait("1 control-plane replicas to serve a certificate from the new root: r1".into())
        );
        r.force = true;
        assert!(matches!(decide(&r, &[], &replicas, 0), Decision::Wait(_)), "not even when forced");
        // Control: once r1 serves the new root, the overlap ends.
        let replicas = [replica("r0", true), replica("r1", true), replica("r2", true)];
        assert_eq!(decide(&r, &[], &replicas, 0), Decision::Advance(Phase::Retire));
        // And the time still counts first.
        r.force = false;
        assert!(matches!(decide(&r, &[], &replicas, 99), Decision::Wait(ref w) if w.contains("unix time 100")));
    }

    #[test]
    fn retire_waits_for_acks_then_done_stays_done() {
        let r = record(Phase::Retire);
        assert!(matches!(decide(&r, &[proxy("a", true, 9, true, 0)], &[], 0), Decision::Wait(_)));
        assert_eq!(decide(&r, &[proxy("a", true, 10, true, 0)], &[], 0), Decision::Advance(Phase::Done));
        assert!(matches!(decide(&record(Phase::Done), &[], &[], 0), Decision::Wait(_)));
        assert_eq!(Phase::Done.next(), Phase::Done);
    }

    #[test]
    fn retire_time_by_force_overlap_or_issued_certificates() {
        let mut r = record(Phase::Switch);
        assert_eq!(retire_at(&r, 50, [70, 90, 60].into_iter()), 90, "default: the last expiry");
        assert_eq!(retire_at(&r, 50, [10].into_iter()), 50, "all expired already: now");
        assert_eq!(retire_at(&r, 50, std::iter::empty()), 50);
        r.overlap_secs = Some(30);
        assert_eq!(retire_at(&r, 50, [90].into_iter()), 80);
        r.force = true;
        assert_eq!(retire_at(&r, 50, [90].into_iter()), 50);
    }

    #[test]
    fn phase_properties() {
        assert!(!Phase::Prepare.new_ca_signs() && Phase::Switch.new_ca_signs() && Phase::Done.new_ca_signs());
        assert!(Phase::Overlap.old_root_trusted() && !Phase::Retire.old_root_trusted());
        let json = serde_json::to_string(&record(Phase::Overlap)).unwrap();
        assert!(json.contains("\"phase\":\"overlap\""), "{json}");
        assert_eq!(serde_json::from_str::<RotationRecord>(&json).unwrap(), record(Phase::Overlap));
    }
}
