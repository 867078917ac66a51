//! Group commit: callers that each need one item made durable queue it; one of them at a time (the *leader*)
//! commits the items queued so far, at most `max_batch` of them, in one call of its commit function (one store
//! transaction), while the others wait. Each caller returns its own item's outcome, once the batch holding its item
//! has been committed, or has failed. No caller is delayed on purpose: a batch gathers the items queued while the
//! previous one was being committed, so an idle queue commits a lone item at once, and a busy one commits as many
//! items per transaction as arrived during one commit. A caller waits at most for the commit in progress and for
//! the commits of the items queued before its own (`max_batch` per commit).
//!
//! Synchronous, like the store: waiting blocks the thread (on a worker of a multi-threaded tokio runtime, inside
//! `block_in_place`, so that the worker's other tasks move on meanwhile). No lock is held while committing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The batch holding the item was abandoned: the leader's commit function panicked (or returned the wrong number of
/// outcomes). Whether the batch was written is unknown.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the batch holding this item was abandoned: its commit panicked; it may or may not have been written")]
pub struct Abandoned;

pub struct GroupCommit<T, R> {
    max_batch: usize,
    state: Mutex<Queue<T, R>>,
    /// Notified when a batch's outcomes are in, and the next leader may start.
    settled: Condvar,
}

struct Queue<T, R> {
    /// Items not taken by a leader yet, with their ticket, in arrival order.
    waiting: VecDeque<(u64, T)>,
    /// Outcomes not yet taken by their caller, by ticket.
    outcomes: HashMap<u64, Result<R, Abandoned>>,
    next_ticket: u64,
    /// Whether a leader is committing a batch now.
    committing: bool,
}

impl<T, R> GroupCommit<T, R> {
    /// At most `max_batch` items per commit (at least 1).
    pub fn new(max_batch: usize) -> Self {
        GroupCommit {
            max_batch: max_batch.max(1),
            state: Mutex::new(Queue {
                waiting: VecDeque::new(),
                outcomes: HashMap::new(),
                next_ticket: 0,
                committing: false,
            }),
            settled: Condvar::new(),
        }
    }

    /// Items queued and not yet taken into a batch.
    pub fn queued(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> MutexGuard<'_, Queue<T, R>> {
        // No code panics while holding the lock; a poisoned lock still holds a consistent queue.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits `item` together with whatever other callers queue meanwhile and returns its outcome. `commit` gets a
    /// batch (queue order, at most `max_batch` items) and returns one outcome per item, in order; this caller runs
    /// it when no other caller is committing, possibly for a batch that does not hold its own item yet (then again).
    /// Every caller is expected to pass an equivalent `commit`.
    pub fn submit(&self, item: T, commit: &mut dyn FnMut(&[T]) -> Vec<R>) -> Result<R, Abandoned> {
        blocking(|| self.submit_blocking(item, commit))
    }

    fn submit_blocking(&self, item: T, commit: &mut dyn FnMut(&[T]) -> Vec<R>) -> Result<R, Abandoned> {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push_back((ticket, item));
        loop {
            if let Some(outcome) = queue.outcomes.remove(&ticket) {
                return outcome;
            }
            if queue.committing {
                queue = self.settled.wait(queue).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // Lead: take a batch, commit it without the lock, hand out its outcomes.
            queue.committing = true;
            let take = queue.waiting.len().min(self.max_batch);
            let (tickets, items): (Vec<u64>, Vec<T>) = queue.waiting.drain(..take).unzip();
            drop(queue);
            let mut leading = Leading { group: self, tickets, done: false };
            let outcomes = commit(&items);
            queue = self.lock();
            if outcomes.len() == items.len() {
                for (ticket, outcome) in leading.tickets.iter().zip(outcomes) {
                    queue.outcomes.insert(*ticket, Ok(outcome));
                }
                leading.done = true;
            } else {
                tracing::error!(items = items.len(), outcomes = outcomes.len(), "group commit: outcomes do not match");
                // `leading` abandons the batch as it drops, below.
            }
            drop(queue);
            drop(leading);
            queue = self.lock();
        }
    }
}

/// The leader's batch while it commits: on a panic (or mismatched outcomes), every item of it is abandoned, and the
/// next caller may lead. Always lets the waiting callers know the batch is settled.
struct Leading<'a, T, R> {
    group: &'a GroupCommit<T, R>,
    tickets: Vec<u64>,
    done: bool,
}

impl<T, R> Drop for Leading<'_, T, R> {
    fn drop(&mut self) {
        let mut queue = self.group.lock();
        if !self.done {
            for ticket in &self.tickets {
                queue.outcomes.insert(*ticket, Err(Abandoned));
            }
        }
        queue.committing = false;
        drop(queue);
        self.group.settled.notify_all();
    }
}

/// Runs `f`, which blocks, telling a multi-threaded tokio runtime first (when called on one of its workers) so that
/// the worker's other tasks move to another thread meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    use super::*;

    /// Waits (polling, bounded) until `n` items are queued.
    fn until_queued<T, R>(group: &GroupCommit<T, R>, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while group.queued() < n {
            assert!(std::time::Instant::now() < deadline, "{} of {n} items queued", group.queued());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn many_concurrent_callers_share_few_commits_and_each_gets_its_own_outcome() {
        let group = Arc::new(GroupCommit::<u32, u32>::new(64));
        let batches = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        // The first commit is held until every other caller has queued: they must then share the next commit.
        let gate = Arc::new(Barrier::new(2));
        let commit = {
            let (batches, gate) = (batches.clone(), gate.clone());
            move |items: &[u32]| {
                let first = {
                    let mut batches = batches.lock().unwrap();
                    batches.push(items.to_vec());
                    batches.len() == 1
                };
                if first {
                    gate.wait();
                    gate.wait();
                }
                items.iter().map(|i| i * 10).collect::<Vec<u32>>()
            }
        };
        let spawn = |i: u32| {
            let (group, mut commit) = (group.clone(), commit.clone());
            std::thread::spawn(move || group.submit(i, &mut commit))
        };
        let first = spawn(0);
        gate.wait();
        let callers: Vec<_> = (1..=40).map(spawn).collect();
        until_queued(&group, 40);
        gate.wait();
        assert_eq!(first.join().unwrap().unwrap(), 0);
        for (i, caller) in (1..=40).zip(callers) {
            assert_eq!(caller.join().unwrap().unwrap(), i * 10, "caller {i} got its own item's outcome");
        }
        let batches = batches.lock().unwrap();
        println!("41 callers, {} commits: {:?}", batches.len(), batches.iter().map(Vec::len).collect::<Vec<_>>());
        assert_eq!(batches.len(), 2, "the first alone, then the 40 that queued meanwhile: {batches:?}");
        let mut all: Vec<u32> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..=40).collect::<Vec<_>>(), "every item committed exactly once");
    }

    #[test]
    fn a_batch_holds_at_most_max_batch_items() {
        let group = Arc::new(GroupCommit::<u32, ()>::new(4));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Barrier::new(2));
        let commit = {
            let (sizes, gate) = (sizes.clone(), gate.clone());
            move |items: &[u32]| {
                let first = sizes.lock().unwrap().is_empty();
                sizes.lock().unwrap().push(items.len());
                if first {
                    gate.wait();
                    gate.wait();
                }
                vec![(); items.len()]
            }
        };
        let first = {
            let (group, mut commit) = (group.clone(), commit.clone());
            std::thread::spawn(move || group.submit(0, &mut commit))
        };
        gate.wait();
        let callers: Vec<_> = (1..=10)
            .map(|i| {
                let (group, mut commit) = (group.clone(), commit.clone());
                std::thread::spawn(move || group.submit(i, &mut commit))
            })
            .collect();
        until_queued(&group, 10);
        gate.wait();
        first.join().unwrap().unwrap();
        callers.into_iter().for_each(|c| c.join().unwrap().unwrap());
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 11);
        assert_eq!(sizes[..], [1, 4, 4, 2], "10 queued items in batches of at most 4");
    }

    /// The outcome a commit function gives a whole failed batch reaches every caller of that batch, and no other.
    #[test]
    fn a_failed_batch_fails_each_of_its_callers_and_no_other() {
        let group = Arc::new(GroupCommit::<u32, Result<u32, String>>::new(64));
        let commits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Barrier::new(2));
        let commit = {
            let (commits, gate) = (commits.clone(), gate.clone());
            move |items: &[u32]| {
                let n = commits.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    gate.wait();
                    gate.wait();
                }
                if n == 1 {
                    // The second batch's transaction fails: every item of it fails, with the error.
                    return items.iter().map(|_| Err("store unavailable: injected".to_owned())).collect();
                }
                items.iter().map(|i| Ok(*i)).collect()
            }
        };
        let spawn = |i: u32| {
            let (group, mut commit) = (group.clone(), commit.clone());
            std::thread::spawn(move || group.submit(i, &mut commit).unwrap())
        };
        let first = spawn(0);
        gate.wait();
        let failing: Vec<_> = (1..=8).map(spawn).collect();
        until_queued(&group, 8);
        gate.wait();
        assert_eq!(first.join().unwrap(), Ok(0), "the batch before");
        for caller in failing {
            assert_eq!(caller.join().unwrap(), Err("store unavailable: injected".to_owned()));
        }
        // Control, through the same path: the batches after succeed.
        let after: Vec<_> = (9..=16).map(spawn).collect();
        for (i, caller) in (9..=16).zip(after) {
            assert_eq!(caller.join().unwrap(), Ok(i));
        }
    }

    #[test]
    fn a_panicking_commit_abandons_its_batch_and_the_next_caller_leads() {
        let group = GroupCommit::<u32, u32>::new(8);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.submit(1, &mut |_: &[u32]| -> Vec<u32> { panic!("injected") })
        }));
        assert!(panicked.is_err());
        // The queue is usable again; a mismatched outcome count abandons the batch, clearly.
        assert!(matches!(group.submit(2, &mut |_: &[u32]| vec![]), Err(Abandoned)));
        assert_eq!(group.submit(3, &mut |items: &[u32]| items.to_vec()).unwrap(), 3);
    }
}
