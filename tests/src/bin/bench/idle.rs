//! When an idle process's RSS is read: once its own housekeeping is done, by one rule for every contender.
//!
//! A proxy gives memory back on timers of its own after traffic stops: Trellis closes surplus pooled connections
//! 5-10 s after their last stream and trims glibc's heap one 5 s quiet period after that (`data-plane/src/heap.rs`),
//! up to about 20 s in all; ztunnel's jemalloc background threads purge dirty pages over its 10 s decay. A reading
//! at a fixed moment catches whichever contender is slower mid-way, and which one that is depends on the order the
//! contenders ran in. So every process is read after the same minimum quiet time and then only once its RSS has held
//! still: [`STEADY_READINGS`] consecutive readings one second apart within [`tolerance`] of each other. The reading
//! taken is the last one; a process that never holds still is read at [`MAX_WAIT`] and says so.

use std::time::{Duration, Instant};

use super::procfs;

/// Readings one second apart that must agree before a process counts as settled (the suite's `--smoke` asks for
/// one).
pub const STEADY_READINGS: usize = 10;
/// How long after the minimum quiet time a process may take to hold still; then its last reading is taken.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
const READ_EVERY: Duration = Duration::from_secs(1);

/// How far apart readings may be and still count as the same: 1 % of the reading, at least 64 KiB (a thread stack's
/// touched pages, a socket buffer).
pub fn tolerance(bytes: u64) -> u64 {
    (bytes / 100).max(64 << 10)
}

/// Whether the last `readings` of `history` lie within [`tolerance`] of each other.
pub fn steady(history: &[u64], readings: usize) -> bool {
    if readings == 0 || history.len() < readings {
        return false;
    }
    let window = &history[history.len() - readings..];
    let (min, max) = (window.iter().min().copied().unwrap_or(0), window.iter().max().copied().unwrap_or(0));
    max - min <= tolerance(max)
}

/// One process's settled RSS.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub pid: u32,
    pub bytes: u64,
    /// From the start of [`settled_rss`] (the minimum quiet time included) to the reading.
    pub after: Duration,
    /// False when [`MAX_WAIT`] passed before the RSS held still.
    pub steady: bool,
}

/// Waits `quiet`, then reads every process in `pids` each second until each has held still for `readings`
/// readings (or [`MAX_WAIT`] passed); returns one reading per pid, in order.
pub async fn settled_rss(pids: &[u32], quiet: Duration, readings: usize) -> anyhow::Result<Vec<Reading>> {
    let start = Instant::now();
    tokio::time::sleep(quiet).await;
    let deadline = Instant::now() + MAX_WAIT;
    let mut histories: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
    let mut done: Vec<Option<Reading>> = vec![None; pids.len()];
    loop {
        let last_chance = Instant::now() >= deadline;
        for (i, &pid) in pids.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let bytes = procfs::rss_bytes(pid)?;
            histories[i].push(bytes);
            let steady = steady(&histories[i], readings);
            if steady || last_chance {
                done[i] = Some(Reading { pid, bytes, after: start.elapsed(), steady });
            }
        }
        if done.iter().all(Option::is_some) {
            return Ok(done.into_iter().flatten().collect());
        }
        tokio::time::sleep(READ_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn a_process_is_steady_once_its_last_readings_agree_and_not_while_it_still_gives_memory_back() {
        // Not enough readings yet.
        assert!(!steady(&[13 * MB; 9], 10));
        // Ten equal readings.
        assert!(steady(&[13 * MB; 10], 10));
        // A trim 9 readings ago (22.5 → 13.4 MB, as Trellis's proxies after a round of idle connections): not yet.
        let mut trimming = vec![22 * MB; 5];
        trimming.extend([13 * MB; 9]);
        assert!(!steady(&trimming, 10));
        // One reading more and the window holds only the trimmed value.
        trimming.push(13 * MB);
        assert!(steady(&trimming, 10));
        // Within 1 %: noise, not a change.
        let mut noise = vec![20 * MB; 9];
        noise.push(20 * MB + 150 * 1024);
        assert!(steady(&noise, 10));
        // A small process wobbles by a thread stack's pages (64 KiB) and still counts as steady; by more it does not.
        let mut small = vec![MB; 9];
        small.push(MB + 64 * 1024);
        assert!(steady(&small, 10));
        small.push(MB + 200 * 1024);
        assert!(!steady(&small, 10));
        assert!(!steady(&[MB; 10], 0));
    }

    #[test]
    fn the_tolerance_is_one_percent_with_a_floor() {
        assert_eq!(tolerance(100 * MB), MB);
        assert_eq!(tolerance(MB), 64 << 10);
        assert_eq!(tolerance(0), 64 << 10);
    }
}
