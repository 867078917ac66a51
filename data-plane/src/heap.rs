//! Giving freed heap memory back to the OS once traffic goes quiet.
//!
//! glibc's malloc keeps what each thread frees in that thread's arena for reuse and returns only the top of the
//! main heap by itself, so a burst (buffers of many concurrent streams, TLS records, HTTP/2 frames) leaves the
//! process holding its peak for good. `malloc_trim` hands every whole free page back. It runs once a quiet period
//! follows activity, so a busy proxy is not made to fault the same pages in again and an idle one is not woken for
//! nothing: as jemalloc's decay does, but without a second allocator in the build. With the `jemalloc` feature
//! (off by default) the same quiet point also purges jemalloc's arenas: without background threads its decay only
//! advances while the process allocates, so an idle proxy would otherwise keep its dirty pages.

use std::time::Duration;

use crate::activity;

/// How often activity is sampled; memory is returned after one whole period without traffic.
const QUIET_PERIOD: Duration = Duration::from_secs(5);

/// Allocations at least this large get a mapping of their own from glibc (`M_MMAP_THRESHOLD`), mapped and unmapped
/// with each one; below it they come from the arena. Above the largest buffer the data path allocates per frame
/// (HTTP/2's read buffer holding a 256 KiB DATA frame, the copy pool's 256 KiB buffers), so those are reused.
const MMAP_THRESHOLD: usize = 1024 * 1024;

/// Free memory an arena keeps at its top while traffic flows (`M_TRIM_THRESHOLD`) before glibc returns it by itself.
/// Left to glibc's dynamic default (twice the largest freed mapping, about 600 KiB here), a single-stream transfer
/// had the receiving proxy's freed frame buffers returned and faulted in again over and over (17 % of the client
/// side's samples in page faults, server→client: BENCHMARKS.md, issue 19). Quiet periods still return everything
/// (`malloc_trim` below), so an idle proxy keeps none of it.
const TRIM_THRESHOLD: usize = 16 * 1024 * 1024;

/// Runs until the runtime stops.
pub async fn release_when_quiet() {
    keep_busy_memory();
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
            // A walk over every arena: off the async workers.
            let _ = tokio::task::spawn_blocking(release_free_pages).await;
        }
    }
}

/// Sets glibc's thresholds ([`MMAP_THRESHOLD`], [`TRIM_THRESHOLD`]) once, at start-up. One of the crate's two
/// `unsafe` functions (the crate root denies `unsafe_code`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_busy_memory() {
    let int = |n: usize| libc::c_int::try_from(n).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` is glibc's documented call for these two parameters, callable from any thread; it takes
    // plain integers and the allocator's own lock, and changes only where later allocations come from and when
    // glibc trims on its own, not any allocation that exists. Its result (1 on success) is information only.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, int(MMAP_THRESHOLD));
        libc::mallopt(libc::M_TRIM_THRESHOLD, int(TRIM_THRESHOLD));
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_busy_memory() {}

/// The crate's other `unsafe` function (the crate root denies `unsafe_code`; these two alone are allowed it).
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
