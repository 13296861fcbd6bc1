//! Facts about the host and about processes, read from `/proc`.
//!
//! Every report records the CPU model, core count, kernel and load average (other work
//! on a shared machine shows up there), and, given the server's pid, its resident memory and
//! CPU time, so memory per connection and server CPU use come from the same run.

use std::fs;

use serde::{Deserialize, Serialize};

/// The machine a run was measured on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpu_model: String,
    /// Online logical CPUs.
    pub cpus_online: usize,
    pub kernel: String,
    pub mem_total_kib: u64,
    /// `/proc/loadavg` 1, 5 and 15 minute averages when the run started.
    pub loadavg_start: [f64; 3],
    /// The same when it ended.
    pub loadavg_end: [f64; 3],
}

impl HostInfo {
    /// Reads the host facts now (`loadavg_end` is filled by [`HostInfo::finish`]).
    pub fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpus_online = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(
                cpuinfo
                    .lines()
                    .filter(|l| l.starts_with("processor"))
                    .count(),
            );
        let mem_total_kib = meminfo_kib("MemTotal").unwrap_or(0);
        Self {
            hostname: read_trim("/proc/sys/kernel/hostname"),
            cpu_model,
            cpus_online,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            mem_total_kib,
            loadavg_start: loadavg(),
            loadavg_end: [0.0; 3],
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(&mut self) {
        self.loadavg_end = loadavg();
    }
}

fn read_trim(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    status_field(&s, key)
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> [f64; 3] {
    let s = read_trim("/proc/loadavg");
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// A `Key:   123 kB` field of a `/proc/.../status`-style text, in KiB.
fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Memory of a process, in KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcMem {
    pub rss_kib: u64,
    pub rss_anon_kib: u64,
}

/// Reads the memory of process `pid` (`None` if it does not exist).
pub fn proc_mem(pid: u32) -> Option<ProcMem> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcMem {
        rss_kib: status_field(&s, "VmRSS")?,
        rss_anon_kib: status_field(&s, "RssAnon").unwrap_or(0),
    })
}

/// User + system CPU time of process `pid` (all threads) in seconds.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_secs_of_stat(&s)
}

/// User + system CPU seconds of each thread of process `pid`, summed by thread name (the
/// kernel's 15-byte `comm`), sorted by name. Threads that exited are not counted.
pub fn proc_thread_cpu_secs(pid: u32) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in dir.flatten() {
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) if b > a => stat[a + 1..b].to_owned(),
            _ => continue,
        };
        if let Some(secs) = cpu_secs_of_stat(&stat) {
            *by_name.entry(name).or_default() += secs;
        }
    }
    by_name.into_iter().collect()
}

/// CPU time of this process in seconds.
pub fn self_cpu_secs() -> f64 {
    fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| cpu_secs_of_stat(&s))
        .unwrap_or(0.0)
}

fn cpu_secs_of_stat(s: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; fields after its closing ')' are fixed.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ppid(4) ... utime is field 14, stime 15 → indexes 11 and 12 here.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf takes a plain integer name, has no preconditions and touches no memory
    // of ours; it only returns a system constant (or -1).
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host_and_process() {
        let h = HostInfo::read();
        assert!(h.cpus_online >= 1);
        assert!(!h.kernel.is_empty());
        let m = proc_mem(std::process::id()).expect("own status");
        assert!(m.rss_kib > 0);
        assert!(proc_cpu_secs(std::process::id()).is_some());
        let threads = proc_thread_cpu_secs(std::process::id());
        assert!(
            !threads.is_empty(),
            "this process has at least its main thread"
        );
        assert!(self_cpu_secs() >= 0.0);
        assert_eq!(proc_mem(u32::MAX), None);
    }

    #[test]
    fn parses_fields() {
        assert_eq!(status_field("VmRSS:\t  1234 kB\nX: 1", "VmRSS"), Some(1234));
        assert_eq!(status_field("VmRSSx: 1", "VmRSS"), None);
        let stat = "1 (a b) S 0 0 0 0 0 0 0 0 0 0 200 100 0 0";
        assert_eq!(cpu_secs_of_stat(stat), Some(300.0 / clk_tck()));
    }
}
