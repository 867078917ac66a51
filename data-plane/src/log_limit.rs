//! Rate limits for log lines that anyone who can open a TCP connection can cause (refused HBONE connections, and
//! accept errors and shed connections when the proxy is out of file descriptors): a token bucket per reason. Within the bucket each refusal gets its one line; beyond it the line is dropped and
//! counted (`trellis_log_suppressed_total{log,reason}`), and `report_suppressed` logs one summary line per reason
//! per interval ("N refusals not logged"). So a flood of 100,000 bad handshakes costs a few dozen lines, and the
//! counters still say what happened.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines logged at once before the bucket is empty, per reason.
pub const BURST: f64 = 20.0;
/// Lines per second per reason once the burst is spent.
pub const PER_SECOND: f64 = 1.0;
/// How often suppressed lines are summarised.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// The HBONE listener's refusals (before the peer is identified: bad TLS, no or unusable certificate).
pub static HBONE_REFUSALS: LogLimit = LogLimit::new("hbone_refusal", "HBONE refusals");
/// Every listener's accept errors and connections shed for want of file descriptors (`listen.rs`), by listener.
pub static ACCEPT_ERRORS: LogLimit = LogLimit::new("accept_error", "accept errors or shed connections");

/// "HBONE connection accepted" (an authenticated peer proxy): kept at INFO, as pooled connections are few, but
/// limited, so that a peer reconnecting in a loop cannot flood the log.
pub static HBONE_ACCEPTS: LogLimit = LogLimit::new("hbone_accepted", "HBONE connections accepted");

/// Every limit, for the summary.
static ALL: [&LogLimit; 3] = [&HBONE_REFUSALS, &ACCEPT_ERRORS, &HBONE_ACCEPTS];

pub struct LogLimit {
    /// The `log` label, naming which lines are limited.
    log: &'static str,
    /// What the lines are about, for the summary line ("N HBONE refusals not logged").
    what: &'static str,
    /// Few reasons, so a list; the lock is held for a few instructions, never across an await.
    buckets: Mutex<Vec<Bucket>>,
}

struct Bucket {
    reason: &'static str,
    tokens: f64,
    refilled: Instant,
    /// Suppressed since the last summary.
    suppressed: u64,
}

impl LogLimit {
    pub const fn new(log: &'static str, what: &'static str) -> Self {
        Self { log, what, buckets: Mutex::new(Vec::new()) }
    }

    /// Whether a line for `reason` may be logged now; if not, it is counted as suppressed.
    pub fn allow(&self, reason: &'static str) -> bool {
        let allowed = self.allow_at(reason, Instant::now());
        if !allowed {
            crate::metrics::log_suppressed(self.log, reason);
        }
        allowed
    }

    fn allow_at(&self, reason: &'static str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = match buckets.iter().position(|b| b.reason == reason) {
            Some(index) => index,
            None => {
                buckets.push(Bucket { reason, tokens: BURST, refilled: now, suppressed: 0 });
                buckets.len() - 1
            }
        };
        let bucket = &mut buckets[index];
        let elapsed = now.saturating_duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * PER_SECOND).min(BURST);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            bucket.suppressed += 1;
            false
        }
    }

    /// The lines suppressed per reason since the last call, and resets them.
    pub fn take_suppressed(&self) -> Vec<(&'static str, u64)> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        buckets.iter_mut().filter(|b| b.suppressed > 0).map(|b| (b.reason, std::mem::take(&mut b.suppressed))).collect()
    }
}

/// Logs, every `SUMMARY_INTERVAL`, how many lines each limit suppressed (nothing when none were).
pub async fn report_suppressed() {
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for limit in ALL {
            for (reason, suppressed) in limit.take_suppressed() {
                tracing::warn!(
                    log = limit.log,
                    reason,
                    suppressed,
                    "{suppressed} {} not logged in the last {SUMMARY_INTERVAL:?} (rate limit; counted in \
                     trellis_log_suppressed_total)",
                    limit.what
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_reason_and_suppressed_counts_are_taken_once() {
        let limit = LogLimit::new("test", "test lines");
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| limit.allow_at("a", t0)).count();
        assert_eq!(allowed, BURST as usize);
        // Another reason has its own bucket.
        assert!(limit.allow_at("b", t0));
        assert_eq!(limit.take_suppressed(), [("a", 1000 - BURST as u64)]);
        assert!(limit.take_suppressed().is_empty());

        // Ten seconds later, ten more lines (one a second), not more.
        let later = t0 + Duration::from_secs(10);
        let allowed = (0..1000).filter(|_| limit.allow_at("a", later)).count();
        assert_eq!(allowed, (10.0 * PER_SECOND) as usize);
        // A long quiet spell refills only up to the burst.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!((0..1000).filter(|_| limit.allow_at("a", much_later)).count(), BURST as usize);
    }
}
