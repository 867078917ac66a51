//! `heap::limit_arenas`: threads started after it share the arenas there are instead of each making one.
//!
//! glibc fixes its arena limit the first time a thread needs an arena after `mallopt`, so the limited case and the
//! control each run in a process of their own: this test runs its own executable again as the child.

use std::process::Command;

const CHILD: &str = "TRELLIS_HEAP_ARENAS_CHILD";
const THREADS: usize = 4;

/// glibc's arenas other than the main one: each is a heap of its own, mapped at a multiple of its 64 MiB maximum.
fn arena_heaps() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("reading /proc/self/maps");
    maps.lines()
        .filter(|line| line.split_whitespace().nth(5).is_none()) // anonymous
        .filter_map(|line| u64::from_str_radix(line.split('-').next()?, 16).ok())
        .filter(|start| start % (64 << 20) == 0)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// In the child: optionally limit the arenas, start `THREADS` threads that allocate while all are alive, print the
/// arena heaps before and after.
fn child(limit: bool) {
    if limit {
        assert!(trellis_data_plane::heap::limit_arenas(1), "glibc took the limit");
    }
    let before = arena_heaps();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait(); // every thread alive (and none has exited and freed its arena for the next)
                let held: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 1024]).collect();
                barrier.wait();
                held.len()
            })
        })
        .collect();
    for t in threads {
        t.join().expect("allocating thread");
    }
    println!("arena heaps: {before} -> {}", arena_heaps());
}

fn run_child(mode: &str) -> (usize, usize) {
    let exe = std::env::current_exe().expect("test executable");
    let out = Command::new(exe)
        .args(["--exact", "threads_started_after_the_limit_share_arenas", "--nocapture", "--test-threads", "1"])
        .env(CHILD, mode)
        .output()
        .expect("running the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child ({mode}) failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The harness prints the test's name on the same line.
    let at = stdout.find("arena heaps: ").unwrap_or_else(|| panic!("{stdout}")) + "arena heaps: ".len();
    let line = stdout[at..].lines().next().unwrap_or_default();
    let (before, after) = line.split_once(" -> ").expect("two counts");
    (before.parse().expect("count"), after.parse().expect("count"))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn threads_started_after_the_limit_share_arenas() {
    match std::env::var(CHILD).as_deref() {
        Ok("limit") => return child(true),
        Ok(_) => return child(false),
        Err(_) => {}
    }
    // The control: without the limit each new thread that allocates gets an arena of its own.
    let (before, after) = run_child("none");
    assert!(after >= before + THREADS - 1, "without the limit {THREADS} threads made new arenas: {before} -> {after}");
    // With it they share the ones there are.
    let (before, after) = run_child("limit");
    assert_eq!(after, before, "with the limit no thread made an arena: {before} -> {after}");
}
