//! This process's resource use, from `/proc` (Linux), for the `process_*` series Prometheus conventions expect.

pub struct ProcessStats {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: usize,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// None where `/proc` is not available or not in the expected format.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is parenthesised and may itself contain spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = clock_ticks_per_second();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_ticks = field(14)? + field(15)?;
        let start_ticks = field(22)?;
        let boot = boot_time()?;
        Some(Self {
            resident_bytes: resident_bytes()?,
            cpu_seconds: cpu_ticks as f64 / ticks,
            open_fds: std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0),
            start_time_seconds: boot + start_ticks as f64 / ticks,
        })
    }
}

/// Boot time (Unix seconds), from `btime` in /proc/stat.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("btime "))?;
    line[6..].trim().parse::<f64>().ok()
}

/// USER_HZ: 100 on every Linux ABI Trellis targets (the kernel reports /proc times in these units).
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// Resident memory, from `VmRSS` (kB) in /proc/self/status.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let p = super::ProcessStats::read().expect("/proc is readable on Linux");
        assert!(p.resident_bytes > 1 << 20, "{}", p.resident_bytes);
        assert!(p.open_fds >= 3);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time_seconds > now - 86400.0 && p.start_time_seconds <= now + 1.0, "{}", p.start_time_seconds);
    }
}
