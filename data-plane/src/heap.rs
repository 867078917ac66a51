//! Giving freed heap memory back to the OS once traffic goes quiet.
//!
//! glibc's malloc keeps what each thread frees in that thread's arena for reuse and returns only the top of the
//! main heap by itself, so a burst (buffers of many concurrent streams, TLS records, HTTP/2 frames) leaves the
//! process holding its peak for good. `malloc_trim` hands every whole free page back. It runs once a quiet period
//! follows activity, so a busy proxy is not made to fault the same pages in again and an idle one is not woken for
//! nothing: as jemalloc's decay does, but without a second allocator in the build. With the `jemalloc` feature
//! (off by default) the same quiet point also purges jemalloc's arenas: without background threads its decay only
//! advances while the process allocates, so an idle proxy would otherwise keep its dirty pages.
//!
//! [`limit_arenas`] caps glibc's arenas at the runtime's worker threads: by default every thread that allocates
//! gets an arena of its own (up to 8 per CPU), each with its own free and partly used pages, so the main thread
//! (start-up, the discovery stream) and the blocking threads the trims and state writes run on each kept memory
//! beside the worker's. Those threads allocate rarely, so sharing an arena costs the data path no lock contention.
//!
//! While traffic flows, glibc is kept from handing memory back by itself ([`BUSY_TRIM_THRESHOLD`]). By default it
//! trims a thread's arena whenever the free memory at its top exceeds twice the largest block it has seen mapped
//! (about 520 KiB for 256 KiB blocks), and a bulk stream's receiving side frees and allocates such blocks all the
//! time: h2 takes a new read buffer of a frame's size (up to 256 KiB) per DATA frame, freed once the frame is written
//! out. Those pages went back to the kernel (`madvise`) and were faulted in again, zeroed, for the next frames:
//! 17-18 % of the receiving proxy's samples (BENCHMARKS.md, "Bulk: page faults on the receiving side"). So the mmap
//! threshold is fixed at [`MMAP_THRESHOLD`] (setting any threshold ends glibc's dynamic ones), an arena keeps up to
//! [`BUSY_TRIM_THRESHOLD`] free at its top while traffic flows, and once traffic goes quiet the threshold drops to
//! [`QUIET_TRIM_THRESHOLD`] for the trim: `malloc_trim` returns the free pages inside every arena and the main
//! heap's top, and a block freed on the worker running this (a thread's arena's top is trimmed only by a free in it)
//! returns that arena's top.

use std::time::Duration;

use crate::activity;

/// How often activity is sampled; memory is returned after one whole period without traffic.
const QUIET_PERIOD: Duration = Duration::from_secs(5);

/// Blocks at least this large are mapped on their own (and unmapped when freed); smaller ones come from the arenas.
/// Above the largest block the data path frees often (a 256 KiB copy buffer, a frame of up to 256 KiB plus its
/// header in h2's read buffer).
pub const MMAP_THRESHOLD: usize = 1024 * 1024;
/// Free memory an arena may keep at its top while traffic flows, before a free hands the rest back: what one bulk
/// stream's receiving side frees and takes again between frames (a stream window of frames, 4 MiB, and the copy
/// and read-ahead buffers) with room to spare. Bounded: per arena (one per worker thread), and only until the
/// next quiet period; with more than one worker, the quiet trim returns the top of the arena of the worker it runs
/// on, and another worker's arena keeps up to this much until a large block is freed on that worker.
pub const BUSY_TRIM_THRESHOLD: usize = 8 * 1024 * 1024;
/// The threshold for the trim when traffic has gone quiet (glibc's default).
pub const QUIET_TRIM_THRESHOLD: usize = 128 * 1024;
/// A block freed on a worker so that its arena's top is trimmed: at least glibc's `FASTBIN_CONSOLIDATION_THRESHOLD`
/// (64 KiB; smaller frees never trim), below [`MMAP_THRESHOLD`] (so it comes from the arena).
const TRIM_NUDGE: usize = 128 * 1024;

/// Runs until the runtime stops. `on_quiet` runs at each quiet point before the trim: what holds room a burst grew
/// (the connection registry) gives it back there, so that its pages are among those returned.
pub async fn release_when_quiet(on_quiet: impl Fn()) {
    set_thresholds(BUSY_TRIM_THRESHOLD);
    // The first check one period from now: an interval's immediate first tick would trim before start-up is done.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + QUIET_PERIOD, QUIET_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = activity::reading();
    let mut busy = true; // start-up (joining, certificates, the first config) allocates too
    loop {
        ticks.tick().await;
        let now = activity::reading();
        if now != seen {
            seen = now;
            busy = true;
        } else if busy {
            busy = false;
            // The copy pool's buffers first, so that their pages are among those returned.
            crate::copy::release_pooled_buffers();
            on_quiet();
            set_thresholds(QUIET_TRIM_THRESHOLD);
            trim_this_threads_arena();
            // A walk over every arena: off the async workers.
            let _ = tokio::task::spawn_blocking(release_free_pages).await;
            set_thresholds(BUSY_TRIM_THRESHOLD);
        }
    }
}

/// Caps glibc's malloc arenas at `arenas` (the runtime's worker threads; at least 1). Call before the runtime
/// starts threads: arenas already made stay. Returns whether the allocator took the limit (false with another
/// allocator or libc).
pub fn limit_arenas(arenas: usize) -> bool {
    set_arena_max(arenas.max(1))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(arenas: usize) -> bool {
    let value = libc::c_int::try_from(arenas).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt(M_ARENA_MAX, n)` is glibc's documented setter of a malloc tunable: it takes two integers and no
    // pointer, takes the allocator's own lock, and only changes how many arenas later threads may create; no
    // allocation is moved or freed. It returns 1 on success, 0 for a value it refuses.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_: usize) -> bool {
    false
}

/// The crate's `unsafe` code: this function, [`set_arena_max`] and [`set_thresholds`] (the crate root denies
/// `unsafe_code`; these three alone are allowed it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() {
    // SAFETY: `malloc_trim(pad)` is glibc's own entry point, callable from any thread at any time: it takes no
    // pointer (0 is the padding to keep at the top of the heap), takes the allocator's arena locks itself, and only
    // returns whole free pages to the OS (madvise/sbrk), so no allocation that Rust holds is moved, freed or changed.
    // Its result (whether memory was released) is information only. With the `jemalloc` feature it still matters:
    // the C code in the process (aws-lc) allocates through glibc's malloc.
    unsafe {
        libc::malloc_trim(0);
    }
    // SAFETY: `mallctl("arena.<MALLCTL_ARENAS_ALL>.purge")` (4096 in jemalloc 5, which tikv-jemalloc-sys 0.6 builds)
    // is jemalloc's documented control for returning every arena's unused dirty pages to the OS at once; the name is
    // a NUL-terminated static string, and the control is write-only and void, so the old and new value pointers are
    // null with a zero length, as it requires. It frees nothing that is allocated and takes jemalloc's own locks.
    // Its result (0 or an errno) is information only.
    #[cfg(feature = "jemalloc")]
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

/// Returns the free top of the calling thread's arena down to the trim threshold: glibc trims a thread's arena when
/// a large block is freed in it (`malloc_trim` leaves those tops alone). Run on the worker, whose arena the data path
/// allocates from.
fn trim_this_threads_arena() {
    drop(std::hint::black_box(Vec::<u8>::with_capacity(TRIM_NUDGE)));
}

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] and its trim threshold at `trim` (bytes).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn set_thresholds(trim: usize) {
    // SAFETY: `mallopt(param, value)` is glibc's entry point for tuning its allocator, callable from any thread at
    // any time: it takes no pointer, takes the allocator's lock itself, and only changes when later allocations are
    // mapped on their own and when later frees return memory; no allocation Rust holds is moved or changed. Its
    // result (1 on success, 0 for a value out of range; both values here are in range) is information only.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim as libc::c_int);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn set_thresholds(_trim: usize) {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // The fields after the command name (in parentheses, which may hold spaces): state is field 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(7).unwrap().parse().unwrap()
    }

    /// What a bulk stream's receiving side does to the heap: frames of h2's largest size (plus its 9-byte header)
    /// allocated, written and freed, a stream window's worth at a time. Returns the page faults it took.
    fn receive_frames(rounds: usize) -> u64 {
        const FRAME: usize = 256 * 1024 + 9;
        let before = minor_faults();
        for _ in 0..rounds {
            let frames: Vec<Vec<u8>> = (0..16).map(|i| vec![i as u8; FRAME]).collect();
            std::hint::black_box(&frames);
        }
        minor_faults() - before
    }

    #[test]
    fn freed_frames_are_reused_without_page_faults_while_busy_and_returned_by_the_quiet_trim() {
        // A thread of its own: its own arena, and its own fault count.
        std::thread::spawn(|| {
            set_thresholds(BUSY_TRIM_THRESHOLD);
            receive_frames(2); // the arena grows to a window of frames once
            let busy = receive_frames(50);
            // Control, the same work with glibc's default trim threshold: each round's frames go back to the
            // kernel when freed and are faulted in again by the next.
            set_thresholds(QUIET_TRIM_THRESHOLD);
            let default = receive_frames(50);
            println!("page faults over 50 rounds of 16 frames: {busy} busy, {default} with the default threshold");
            assert!(default >= 50, "control: the default threshold returns the frames each round ({default} faults)");
            assert!(busy * 10 < default, "busy: the frames' pages are reused ({busy} faults against {default})");

            // The quiet trim: the arena holds a window of freed frames at its top while busy, and a free on the
            // thread once the threshold is down hands them back (the next round faults them in again). Control:
            // without that free, they stay.
            set_thresholds(BUSY_TRIM_THRESHOLD);
            receive_frames(2);
            assert_eq!(receive_frames(1), 0, "control: kept while busy");
            set_thresholds(QUIET_TRIM_THRESHOLD);
            set_thresholds(BUSY_TRIM_THRESHOLD);
            assert_eq!(receive_frames(1), 0, "control: lowering the threshold alone returns nothing");
            set_thresholds(QUIET_TRIM_THRESHOLD);
            trim_this_threads_arena();
            set_thresholds(BUSY_TRIM_THRESHOLD);
            let after_trim = receive_frames(1);
            println!("page faults of the round after the quiet trim: {after_trim}");
            assert!(after_trim > 0, "the quiet trim returned the arena's free top");
        })
        .join()
        .unwrap();
    }
}
