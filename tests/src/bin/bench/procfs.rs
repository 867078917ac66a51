//! What the suite reads about the contenders' processes from /proc: CPU time, resident memory, open-file limits;
//! and raising this process's own open-file limit (children inherit it).

/// CPU seconds (user + system, every thread) the process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are space-separated,
    // utime and stime being the 14th and 15th fields of the whole line.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        let text = fields.get(i).ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: too few fields"))?;
        Ok(text.parse()?)
    };
    // After ")": field 3 (state) is index 0, so field 14 (utime) is index 11 and field 15 (stime) index 12.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(total as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The process's threads by name (`/proc/PID/task/*/comm`), e.g. "3 threads: 2× ztunnel-proxy-0, 1× ztunnel".
pub fn thread_names(pid: u32) -> anyhow::Result<String> {
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm"))?;
        *names.entry(comm.trim().to_owned()).or_default() += 1;
    }
    let total: usize = names.values().sum();
    let each: Vec<String> = names.iter().map(|(name, n)| format!("{n}× {name}")).collect();
    Ok(format!("{total} threads: {}", each.join(", ")))
}

/// Resident set size in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    let kib: u64 = line.split_whitespace().nth(1).unwrap_or("0").parse()?;
    Ok(kib * 1024)
}

/// The soft "Max open files" limit of a process.
pub fn open_files_limit(pid: u32) -> anyhow::Result<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits.lines().find(|l| l.starts_with("Max open files")).ok_or_else(|| anyhow::anyhow!("no limit"))?;
    let soft = line.split_whitespace().nth(3).unwrap_or("0");
    Ok(if soft == "unlimited" { u64::MAX } else { soft.parse()? })
}

/// Raises this process's RLIMIT_NOFILE to `want` (soft and, as far as allowed, hard); returns the soft limit now.
#[allow(unsafe_code)]
pub fn raise_open_files(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur >= want {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max.max(want) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not allowed to raise the hard limit: go as far as it lets us.
            let capped = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &capped);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// Sets this thread's timer slack to 1 ns, so that the load generator's sleeps end on time.
#[allow(unsafe_code)]
pub fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
