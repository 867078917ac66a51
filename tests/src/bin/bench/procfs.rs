//! What the suite reads about the contenders' processes from /proc: CPU time, resident memory, open-file limits;
//! and raising this process's own open-file limit (children inherit it).

/// CPU seconds (user + system, every thread) the process has used so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    cpu_times(pid).map(|t| t.user + t.system)
}

/// CPU seconds a process used, split by mode: in its own code (user) and in the kernel on its behalf (system: its
/// system calls, and the network stack's work done in its context, such as delivering what it sends over loopback
/// or a veth to the receiving socket).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl std::ops::Sub for CpuTimes {
    type Output = CpuTimes;
    fn sub(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes { user: self.user - earlier.user, system: self.system - earlier.system }
    }
}

impl std::iter::Sum for CpuTimes {
    fn sum<I: Iterator<Item = CpuTimes>>(iter: I) -> CpuTimes {
        iter.fold(CpuTimes::default(), |a, b| CpuTimes { user: a.user + b.user, system: a.system + b.system })
    }
}

/// The process's user and system CPU seconds so far (every thread).
pub fn cpu_times(pid: u32) -> anyhow::Result<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (user, system) = stat_ticks(&stat).ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no utime and stime"))?;
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(CpuTimes { user: user as f64 / hz, system: system as f64 / hz })
}

/// utime and stime (clock ticks) of a `/proc/PID/stat` line.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may hold spaces and parentheses; the fields after its last closing parenthesis are
    // space-separated, utime and stime being the 14th and 15th fields of the whole line: after ")", field 3 (state)
    // is index 0, so utime is index 11 and stime index 12.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_ticks_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731 2209 0 0 20 0 3 0 100 0 0";
        assert_eq!(stat_ticks(line), Some((731, 2209)));
        // The control: a line cut before stime has no reading rather than a wrong one.
        assert_eq!(stat_ticks("4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731"), None);
        let own = cpu_times(std::process::id()).unwrap();
        assert!(own.user >= 0.0 && own.system >= 0.0);
        assert!(cpu_seconds(std::process::id()).unwrap() >= own.user + own.system, "the sum, read later");
    }
}
