//! Group commit: callers that each need one item made durable queue it; one of them at a time (the *leader*)
//! commits the items queued so far, at most `max_batch` of them (and at most `max_weight` of their weights, a byte
//! bound say, but always at least one item), in one call of its commit function (one store
//! transaction), while the others wait. Each caller returns its own item's outcome, once the batch holding its item
//! has been committed, or has failed. No caller is delayed on purpose: a batch gathers the items queued while the
//! previous one was being committed, so an idle queue commits a lone item at once, and a busy one commits as many
//! items per transaction as arrived during one commit. A caller waits at most for the commit in progress and for
//! the commits of the items queued before its own (`max_batch` per commit).
//!
//! Two ways in. [`GroupCommit::submit`] is synchronous, like the store: waiting blocks the thread (on a worker of a
//! multi-threaded tokio runtime, inside `block_in_place`, so that the worker's other tasks move on meanwhile).
//! [`GroupCommit::submit_async`] waits as a task: only the caller that leads a batch blocks its thread (in
//! `block_in_place`) while the store commits; the others are woken when a batch settles, with no thread of their own
//! (a signing stream does not hand its worker over, nor sleep on a condition variable, per certificate). No lock is
//! held while committing, nor across an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::pin;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The batch holding the item was abandoned: the leader's commit function panicked (or returned the wrong number of
/// outcomes). Whether the batch was written is unknown.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the batch holding this item was abandoned: its commit panicked; it may or may not have been written")]
pub struct Abandoned;

pub struct GroupCommit<T, R> {
    max_batch: usize,
    /// Bound on the summed weights of one batch's items (its first item is taken whatever its weight).
    max_weight: usize,
    weight: fn(&T) -> usize,
    state: Mutex<Queue<T, R>>,
    /// Notified when a batch's outcomes are in, and the next leader may start: the threads waiting in
    /// [`GroupCommit::submit`]...
    settled: Condvar,
    /// ... and the tasks waiting in [`GroupCommit::submit_async`].
    settled_tasks: tokio::sync::Notify,
}

struct Queue<T, R> {
    /// Items not taken by a leader yet, with their ticket, in arrival order.
    waiting: VecDeque<(u64, T)>,
    /// Outcomes not yet taken by their caller, by ticket.
    outcomes: HashMap<u64, Result<R, Abandoned>>,
    next_ticket: u64,
    /// Whether a leader is committing a batch now.
    committing: bool,
    /// Tickets whose caller went away before its outcome (an async caller dropped while waiting): their outcome is
    /// not kept.
    forgotten: HashSet<u64>,
}

/// What a caller does next.
enum Turn<T, R> {
    /// Its outcome is in.
    Done(Result<R, Abandoned>),
    /// Another caller is committing a batch: wait until it settles.
    Wait,
    /// Nobody is committing: commit this batch (tickets and items, queue order).
    Lead(Vec<u64>, Vec<T>),
}

impl<T, R> GroupCommit<T, R> {
    /// At most `max_batch` items per commit (at least 1).
    pub fn new(max_batch: usize) -> Self {
        Self::bounded(max_batch, usize::MAX, |_| 0)
    }

    /// At most `max_batch` items per commit (at least 1), and items whose `weight`s sum to at most `max_weight`
    /// (the first item of a batch is taken whatever its weight).
    pub fn bounded(max_batch: usize, max_weight: usize, weight: fn(&T) -> usize) -> Self {
        GroupCommit {
            max_batch: max_batch.max(1),
            max_weight,
            weight,
            state: Mutex::new(Queue {
                waiting: VecDeque::new(),
                outcomes: HashMap::new(),
                next_ticket: 0,
                committing: false,
                forgotten: HashSet::new(),
            }),
            settled: Condvar::new(),
            settled_tasks: tokio::sync::Notify::new(),
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
        let ticket = self.enqueue(item);
        let mut queue = self.lock();
        loop {
            match self.turn(&mut queue, ticket) {
                Turn::Done(outcome) => return outcome,
                Turn::Wait => queue = self.settled.wait(queue).unwrap_or_else(PoisonError::into_inner),
                Turn::Lead(tickets, items) => {
                    drop(queue);
                    self.lead(tickets, items, commit);
                    queue = self.lock();
                }
            }
        }
    }

    /// [`GroupCommit::submit`] for a task: the same batches and outcomes, but a caller waits for the batch in
    /// progress without blocking its thread; only while it leads a batch (runs `commit`) does it block (in
    /// `block_in_place` on a multi-threaded runtime). Dropped while waiting, its item is still committed with its
    /// batch (nobody is told the outcome).
    pub async fn submit_async(&self, item: T, commit: &mut (dyn FnMut(&[T]) -> Vec<R> + Send)) -> Result<R, Abandoned> {
        let mut ticket = Ticket { group: self, ticket: self.enqueue(item), done: false };
        loop {
            // Registered before looking, so that a batch settling in between still wakes this task.
            let mut settled = pin!(self.settled_tasks.notified());
            settled.as_mut().enable();
            let turn = self.turn(&mut self.lock(), ticket.ticket);
            match turn {
                Turn::Done(outcome) => {
                    ticket.done = true;
                    return outcome;
                }
                Turn::Wait => settled.await,
                Turn::Lead(tickets, items) => blocking(|| self.lead(tickets, items, commit)),
            }
        }
    }

    /// Queues `item`; its ticket.
    fn enqueue(&self, item: T) -> u64 {
        let mut queue = self.lock();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push_back((ticket, item));
        ticket
    }

    /// What the caller of `ticket` does next; taking the lead marks the queue as committing.
    fn turn(&self, queue: &mut Queue<T, R>, ticket: u64) -> Turn<T, R> {
        if let Some(outcome) = queue.outcomes.remove(&ticket) {
            return Turn::Done(outcome);
        }
        if queue.committing {
            return Turn::Wait;
        }
        queue.committing = true;
        let mut take = 0;
        let mut weight = 0usize;
        for (_, item) in queue.waiting.iter().take(self.max_batch) {
            weight = weight.saturating_add((self.weight)(item));
            if take > 0 && weight > self.max_weight {
                break;
            }
            take += 1;
        }
        let (tickets, items) = queue.waiting.drain(..take).unzip();
        Turn::Lead(tickets, items)
    }

    /// Commits a batch taken by [`GroupCommit::turn`] without the lock, then hands out its outcomes and lets the
    /// waiting callers know.
    fn lead(&self, tickets: Vec<u64>, items: Vec<T>, commit: &mut dyn FnMut(&[T]) -> Vec<R>) {
        let mut leading = Leading { group: self, tickets, done: false };
        let outcomes = commit(&items);
        let mut queue = self.lock();
        if outcomes.len() == items.len() {
            for (ticket, outcome) in leading.tickets.iter().zip(outcomes) {
                if !queue.forgotten.remove(ticket) {
                    queue.outcomes.insert(*ticket, Ok(outcome));
                }
            }
            leading.done = true;
        } else {
            tracing::error!(items = items.len(), outcomes = outcomes.len(), "group commit: outcomes do not match");
            // `leading` abandons the batch as it drops, below.
        }
        drop(queue);
        drop(leading);
    }
}

/// An async caller's ticket: when the caller goes away before its outcome, the outcome is not kept.
struct Ticket<'a, T, R> {
    group: &'a GroupCommit<T, R>,
    ticket: u64,
    done: bool,
}

impl<T, R> Drop for Ticket<'_, T, R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queue = self.group.lock();
        if queue.outcomes.remove(&self.ticket).is_none() {
            // Still queued or being committed: committed all the same, its outcome dropped when it comes.
            queue.forgotten.insert(self.ticket);
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
                if !queue.forgotten.remove(ticket) {
                    queue.outcomes.insert(*ticket, Err(Abandoned));
                }
            }
        }
        queue.committing = false;
        drop(queue);
        self.group.settled.notify_all();
        self.group.settled_tasks.notify_waiters();
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
        let commit = held_first_commit(batches.clone(), gate.clone());
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

    /// A batch also ends before the item that would take its summed weight over `max_weight` (a byte bound), and an
    /// item heavier than the bound alone still goes, in a batch of its own.
    #[test]
    fn a_batch_holds_at_most_max_weight() {
        let group = Arc::new(GroupCommit::<u32, u32>::bounded(64, 10, |i| *i as usize));
        let Held { batches, gate, commit, first } = first_batch_held(&group);
        // Queued in this order (one at a time): weights 3, 4, 2 (9), then 5, 5 (10), then 11 (alone), then 1.
        let weights = [3u32, 4, 2, 5, 5, 11, 1];
        let mut callers = Vec::new();
        for (n, w) in weights.into_iter().enumerate() {
            let (caller_group, mut commit) = (group.clone(), commit.clone());
            callers.push(std::thread::spawn(move || caller_group.submit(w, &mut commit)));
            until_queued(&group, n + 1);
        }
        gate.wait();
        assert_eq!(first.join().unwrap().unwrap(), 0);
        for (w, caller) in weights.into_iter().zip(callers) {
            assert_eq!(caller.join().unwrap().unwrap(), w * 10);
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches[..], [vec![0], vec![3, 4, 2], vec![5, 5], vec![11], vec![1]]);
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

    /// The commit function of the tests below: records each batch; the first one is held at `gate` (twice) so that
    /// the other callers queue meanwhile.
    fn held_first_commit(
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<Barrier>,
    ) -> impl FnMut(&[u32]) -> Vec<u32> + Clone + Send + 'static {
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
    }

    /// A first caller (item 0) on a thread of its own, its batch's commit held at `gate` (its first wait already
    /// passed): what the callers of a test queue meanwhile goes into the next batch once the test passes the gate.
    struct Held<C> {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        gate: Arc<Barrier>,
        commit: C,
        first: std::thread::JoinHandle<Result<u32, Abandoned>>,
    }

    fn first_batch_held(
        group: &Arc<GroupCommit<u32, u32>>,
    ) -> Held<impl FnMut(&[u32]) -> Vec<u32> + Clone + Send + 'static> {
        let (batches, gate) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Barrier::new(2)));
        let commit = held_first_commit(batches.clone(), gate.clone());
        let first = {
            let (group, mut commit) = (group.clone(), commit.clone());
            std::thread::spawn(move || group.submit(0, &mut commit))
        };
        gate.wait();
        Held { batches, gate, commit, first }
    }

    /// Async callers wait without holding a thread: 40 tasks on a runtime of ONE thread all queue while another
    /// caller's batch is being committed (a caller waiting in `submit` would block that thread, and the 39 others
    /// would never queue), then share the next commit, each getting its own item's outcome.
    #[test]
    fn async_callers_wait_without_a_thread_and_share_the_next_commit() {
        let group = Arc::new(GroupCommit::<u32, u32>::new(64));
        let Held { batches, gate, commit, first } = first_batch_held(&group);
        let tasks = {
            let group = group.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                runtime.block_on(async {
                    let tasks: Vec<_> = (1..=40u32)
                        .map(|i| {
                            let (group, mut commit) = (group.clone(), commit.clone());
                            tokio::spawn(async move { group.submit_async(i, &mut commit).await })
                        })
                        .collect();
                    let mut outcomes = Vec::new();
                    for task in tasks {
                        outcomes.push(task.await.unwrap().unwrap());
                    }
                    outcomes
                })
            })
        };
        until_queued(&group, 40);
        gate.wait();
        assert_eq!(first.join().unwrap().unwrap(), 0);
        assert_eq!(tasks.join().unwrap(), (1..=40).map(|i| i * 10).collect::<Vec<_>>(), "each its own outcome");
        let batches = batches.lock().unwrap();
        assert_eq!(batches.len(), 2, "the first alone, then the 40 tasks that queued meanwhile: {batches:?}");
        assert_eq!(batches[1], (1..=40).collect::<Vec<_>>());
    }

    /// An async caller that goes away while waiting: its item is committed with the next batch all the same, and
    /// its outcome is not kept (nothing is left behind in the queue).
    #[test]
    fn an_async_caller_dropped_while_waiting_leaves_nothing_behind() {
        let group = Arc::new(GroupCommit::<u32, u32>::new(64));
        let Held { batches, gate, commit, first } = first_batch_held(&group);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let waiting = {
            let (group, mut commit) = (group.clone(), commit.clone());
            runtime.spawn(async move { group.submit_async(1, &mut commit).await })
        };
        // Run the task until it has queued and waits.
        runtime.block_on(async {
            while group.queued() < 1 {
                tokio::task::yield_now().await;
            }
        });
        waiting.abort();
        assert!(runtime.block_on(waiting).unwrap_err().is_cancelled());
        gate.wait();
        assert_eq!(first.join().unwrap().unwrap(), 0);
        // The next caller commits the dropped caller's item with its own.
        let mut commit = commit;
        assert_eq!(group.submit(2, &mut commit).unwrap(), 20);
        assert_eq!(batches.lock().unwrap()[1], [1, 2], "the dropped caller's item was committed");
        let queue = group.lock();
        assert!(queue.outcomes.is_empty() && queue.forgotten.is_empty(), "an outcome was kept for nobody");
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
