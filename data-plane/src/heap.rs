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

use std::time::Duration;

use crate::activity;

/// How often activity is sampled; memory is returned after one whole period without traffic.
const QUIET_PERIOD: Duration = Duration::from_secs(5);

/// Runs until the runtime stops. `on_quiet` runs at each quiet point before the trim: what holds room a burst grew
/// (the connection registry) gives it back there, so that its pages are among those returned.
pub async fn release_when_quiet(on_quiet: impl Fn()) {
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
            // A walk over every arena: off the async workers.
            let _ = tokio::task::spawn_blocking(release_free_pages).await;
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

/// The crate's `unsafe` code: this function and [`set_arena_max`] (the crate root denies `unsafe_code`; these two
/// alone are allowed it).
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
