//! The checks: each host setting that matters for a thread-per-core edge holding hundreds of
//! thousands of sockets, judged against a profile and a plan into [`Finding`]s.
//!
//! Pure functions of [`HostFacts`], so tests can feed them any host. Severity means:
//! `Critical`: the edge will not start, or cannot reach the profile's planned load (sockets
//! refused or dropped); `Warning`: it runs, but slower, with worse tail latency or less headroom
//! than planned; `Info`: worth knowing, nothing to fix for the edge (or we cannot tell);
//! `Ok`: as wanted. The sysctl rules here are also what `apply` writes
//! ([`SysctlRule::fixed`]).

use serde::{Deserialize, Serialize};

use crate::facts::{HostFacts, NicFacts};
use crate::limits::{
    effective_io_memory, human_bytes, memlock_needed, memlock_per_shard, memlock_target,
    nofile_target, ring_bytes, show_limit, GLOMMIO_MIN_MEMLOCK, UNLIMITED,
};
use crate::plan::Plan;
use crate::profile::{Profile, Selection};
use crate::root::format_cpulist;
use crate::uring::{UringStatus, EDGE_OPCODES};
use crate::wake::WakeStatus;

/// How much a finding matters (ordered: `Ok < Info < Warning < Critical`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Info,
    Warning,
    Critical,
}

impl Severity {
    /// Lower-case name (`ok`, `info`, `warning`, `critical`).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One checked setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable identifier: `kernel`, `io_uring`, `memlock`, `nofile`, a sysctl name,
    /// `irq_affinity:eth0`, ...
    pub name: String,
    /// What the host has (`unknown` when it could not be read).
    pub current: String,
    /// What the edge wants.
    pub wanted: String,
    pub severity: Severity,
    /// Why it matters, and what to do.
    pub why: String,
}

fn finding(
    name: impl Into<String>,
    current: impl Into<String>,
    wanted: impl Into<String>,
    severity: Severity,
    why: impl Into<String>,
) -> Finding {
    Finding {
        name: name.into(),
        current: current.into(),
        wanted: wanted.into(),
        severity,
        why: why.into(),
    }
}

/// What the checks are run for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckContext {
    /// Shards the edge runs; `None` = the plan's count.
    pub shards: Option<usize>,
    /// CPUs the shards are pinned to; `None` = the plan's.
    pub shard_cpus: Option<Vec<usize>>,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    /// The checks run inside the process that will run the shards (`iris-edge` at startup), so
    /// its own capabilities and io_uring probe decide; otherwise (`iris-tune check`) the limits
    /// are judged for an unprivileged service.
    pub this_process: bool,
}

/// The numbers the checks and `apply` aim for, derived from profile, plan and context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Targets {
    pub connections: u64,
    pub nofile: u64,
    pub file_max: u64,
    pub conntrack_max: u64,
    pub shards: usize,
    pub memlock_per_shard: u64,
    pub memlock_needed: u64,
    pub memlock_target: u64,
    pub shard_cpus: Vec<usize>,
    pub irq_cpus: Vec<usize>,
}

impl Targets {
    pub fn new(facts: &HostFacts, plan: &Plan, ctx: &CheckContext) -> Self {
        let connections = plan.connections;
        let nofile = nofile_target(connections);
        let shards = ctx.shards.filter(|&s| s > 0).unwrap_or(plan.shards);
        let needed = memlock_needed(shards, ctx.io_memory_bytes, ctx.ring_depth);
        let (shard_cpus, irq_cpus) = match &ctx.shard_cpus {
            Some(cpus) if !cpus.is_empty() => (
                cpus.clone(),
                facts
                    .cpu_ids()
                    .into_iter()
                    .filter(|c| !cpus.contains(c))
                    .collect(),
            ),
            _ => (plan.shard_cpus.clone(), plan.irq_cpus.clone()),
        };
        Self {
            connections,
            nofile,
            file_max: nofile.saturating_mul(2),
            conntrack_max: connections.saturating_add(connections / 4),
            shards,
            memlock_per_shard: memlock_per_shard(ctx.io_memory_bytes, ctx.ring_depth),
            memlock_needed: needed,
            memlock_target: memlock_target(needed),
            shard_cpus,
            irq_cpus,
        }
    }
}

/// What a sysctl should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    AtLeast(u64),
    AtMost(u64),
    Equals(u64),
    /// `low high` at least `width` ports wide; `target` is written otherwise.
    PortRange {
        width: u32,
        target: [u32; 2],
    },
    /// `min default max`: default at most `target[1]`, max at least `target[2]`.
    Buffers([u64; 3]),
}

/// One managed sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlRule {
    pub key: &'static str,
    pub want: Want,
    /// Severity when not as wanted.
    pub severity: Severity,
    /// Below this (for `AtLeast`), critical.
    pub critical_below: Option<u64>,
    pub why: String,
}

fn numbers(text: &str) -> Option<Vec<u64>> {
    text.split_whitespace().map(|w| w.parse().ok()).collect()
}

impl SysctlRule {
    /// The wanted value as text.
    pub fn wanted_text(&self) -> String {
        match &self.want {
            Want::AtLeast(v) => format!(">= {v}"),
            Want::AtMost(v) => format!("<= {v}"),
            Want::Equals(v) => v.to_string(),
            Want::PortRange { width, target } => {
                format!(">= {width} ports ({} {})", target[0], target[1])
            }
            Want::Buffers(t) => format!("default <= {}, max >= {}", t[1], t[2]),
        }
    }

    /// Judges a current value; `None` when it does not parse.
    pub fn judge(&self, current: &str) -> Option<Severity> {
        let n = numbers(current)?;
        let bad = self.severity;
        Some(match (&self.want, n.as_slice()) {
            (Want::AtLeast(t), [v]) => {
                if v >= t {
                    Severity::Ok
                } else if self.critical_below.is_some_and(|c| *v < c) {
                    Severity::Critical
                } else {
                    bad
                }
            }
            (Want::AtMost(t), [v]) => {
                if v <= t {
                    Severity::Ok
                } else {
                    bad
                }
            }
            (Want::Equals(t), [v]) => {
                if v == t {
                    Severity::Ok
                } else {
                    bad
                }
            }
            (Want::PortRange { width, .. }, [lo, hi]) => {
                if hi.saturating_sub(*lo) + 1 >= u64::from(*width) {
                    Severity::Ok
                } else {
                    bad
                }
            }
            (Want::Buffers(t), [_, default, max]) => {
                if default > &t[1] {
                    Severity::Warning
                } else if max < &t[2] {
                    Severity::Info
                } else {
                    Severity::Ok
                }
            }
            _ => return None,
        })
    }

    /// The value `apply` writes for a current value: never lowers a minimum or raises a
    /// maximum that is already fine, so applying twice changes nothing. `None` when the current
    /// value does not parse.
    pub fn fixed(&self, current: &str) -> Option<String> {
        let n = numbers(current)?;
        Some(match (&self.want, n.as_slice()) {
            (Want::AtLeast(t), [v]) => (*v).max(*t).to_string(),
            (Want::AtMost(t), [v]) => (*v).min(*t).to_string(),
            (Want::Equals(t), [_]) => t.to_string(),
            (Want::PortRange { width, target }, [lo, hi]) => {
                if hi.saturating_sub(*lo) + 1 >= u64::from(*width) {
                    format!("{lo} {hi}")
                } else {
                    format!("{} {}", target[0], target[1])
                }
            }
            (Want::Buffers(t), [min, default, max]) => {
                let default = (*default).min(t[1]);
                format!("{} {} {}", (*min).min(default), default, (*max).max(t[2]))
            }
            _ => return None,
        })
    }
}

/// The managed sysctls, with targets from the profile.
pub fn sysctl_rules(profile: &Profile, targets: &Targets) -> Vec<SysctlRule> {
    let conns = targets.connections;
    let rule = |key, want, severity, critical_below, why: &str| SysctlRule {
        key,
        want,
        severity,
        critical_below,
        why: why.to_owned(),
    };
    vec![
        rule(
            "fs.file-max",
            Want::AtLeast(targets.file_max),
            Severity::Warning,
            Some(conns),
            "system-wide table of open files; every socket is one. At the limit every process's \
             accept/open fails with ENFILE",
        ),
        rule(
            "fs.nr_open",
            Want::AtLeast(targets.nofile),
            Severity::Warning,
            Some(conns),
            "ceiling for any process's RLIMIT_NOFILE: a LimitNOFILE above it makes the service \
             fail to start",
        ),
        rule(
            "net.core.somaxconn",
            Want::AtLeast(profile.somaxconn),
            Severity::Warning,
            None,
            "caps every listen backlog. After an edge restart all its clients reconnect at once; \
             a full accept queue drops SYNs and clients back off 1 s, 3 s, 7 s",
        ),
        rule(
            "net.ipv4.tcp_max_syn_backlog",
            Want::AtLeast(profile.tcp_max_syn_backlog),
            Severity::Warning,
            None,
            "half-open connections queued during a reconnect storm; beyond it the kernel drops \
             SYNs or falls back to SYN cookies",
        ),
        rule(
            "net.core.netdev_max_backlog",
            Want::AtLeast(profile.netdev_max_backlog),
            Severity::Info,
            None,
            "packets queued per CPU when softirq processing falls behind a burst; overflows \
             are drops (third column of /proc/net/softnet_stat)",
        ),
        rule(
            "net.ipv4.ip_local_port_range",
            Want::PortRange {
                width: profile.min_port_range_width,
                target: profile.port_range,
            },
            Severity::Info,
            None,
            "ephemeral ports for outgoing connections (Kafka, core, a load generator on this \
             host); the edge's inbound client sockets do not use them",
        ),
        rule(
            "net.core.rmem_default",
            Want::AtMost(profile.rmem_default),
            Severity::Info,
            None,
            "initial receive buffer of non-TCP sockets (UDP, unix); TCP uses tcp_rmem",
        ),
        rule(
            "net.core.wmem_default",
            Want::AtMost(profile.wmem_default),
            Severity::Info,
            None,
            "initial send buffer of non-TCP sockets (UDP, unix); TCP uses tcp_wmem",
        ),
        rule(
            "net.core.rmem_max",
            Want::AtLeast(profile.rmem_max),
            Severity::Info,
            None,
            "ceiling for SO_RCVBUF: the Kafka consumer and bulk sockets cannot ask for more",
        ),
        rule(
            "net.core.wmem_max",
            Want::AtLeast(profile.wmem_max),
            Severity::Info,
            None,
            "ceiling for SO_SNDBUF: the Kafka producer cannot ask for more",
        ),
        rule(
            "net.ipv4.tcp_rmem",
            Want::Buffers(profile.tcp_rmem),
            Severity::Warning,
            None,
            "TCP receive buffer min/default/max. The default times hundreds of thousands of \
             sockets is the worst-case kernel memory; the max bounds throughput of the few \
             bulk sockets",
        ),
        rule(
            "net.ipv4.tcp_wmem",
            Want::Buffers(profile.tcp_wmem),
            Severity::Warning,
            None,
            "TCP send buffer min/default/max; the default times the sockets with queued output \
             is kernel memory a slow-reader storm can pin",
        ),
        rule(
            "net.ipv4.tcp_tw_reuse",
            Want::Equals(profile.tcp_tw_reuse),
            Severity::Info,
            None,
            "lets outgoing connections reuse TIME_WAIT ports (2 = loopback only); matters for \
             Kafka reconnects and load generators, not for inbound clients",
        ),
        rule(
            "net.netfilter.nf_conntrack_max",
            Want::AtLeast(targets.conntrack_max),
            Severity::Warning,
            Some(conns),
            "with conntrack loaded every client connection takes a tracking entry; a full table \
             drops new connections (\"nf_conntrack: table full\"). Better: exempt the client \
             port, e.g. `iptables -t raw -A PREROUTING -p tcp --dport 8085 -j NOTRACK`",
        ),
    ]
}

/// Runs every check.
pub fn run_checks(
    facts: &HostFacts,
    profile: &Profile,
    selection: Selection,
    plan: &Plan,
    ctx: &CheckContext,
) -> Vec<Finding> {
    let targets = Targets::new(facts, plan, ctx);
    let mut out = vec![
        check_profile(facts, profile, selection),
        check_kernel(facts),
        check_io_uring_disabled(facts, ctx),
        check_io_uring(facts),
        check_memlock(facts, &targets, ctx),
        check_nofile(facts, &targets),
    ];
    for rule in sysctl_rules(profile, &targets) {
        out.push(check_sysctl(facts, &rule));
    }
    out.push(check_thp(facts));
    out.push(check_governor(facts, &targets));
    out.push(check_frequency(facts));
    out.push(check_smt(facts, profile, plan));
    out.push(check_numa(facts, profile, plan));
    if facts.nics.is_empty() {
        out.push(finding(
            "nic",
            "none found",
            "a network device in /sys/class/net",
            Severity::Info,
            "no device-backed interface found: NIC queue and IRQ checks skipped",
        ));
    }
    for nic in &facts.nics {
        out.push(check_nic_queues(nic, profile));
        out.push(check_irq_affinity(nic, &targets));
    }
    out.push(check_irqbalance(facts, &targets));
    out.push(check_clocksource(facts));
    out.push(check_wakeup(facts));
    out.push(check_halt_poll(facts));
    out.extend(check_nvme(facts, profile));
    out
}

fn check_profile(facts: &HostFacts, profile: &Profile, selection: Selection) -> Finding {
    let cpus = facts.cpus.len();
    let current = match selection {
        Selection::Requested => format!("{} (requested)", profile.name),
        Selection::Dmi => format!("{} (DMI product name)", profile.name),
        Selection::Generic => format!(
            "{} (DMI product name {})",
            profile.name,
            facts
                .dmi_product
                .as_deref()
                .map_or("unknown".to_owned(), |d| format!("{d:?}"))
        ),
    };
    match profile.vcpus {
        Some(want) if cpus > 0 && want != cpus => finding(
            "profile",
            format!("{current}, host has {cpus} CPUs online"),
            format!("host with {want} vCPUs"),
            Severity::Warning,
            "the host does not look like the profile: wrong --profile, or CPUs offline; the plan \
             follows the host",
        ),
        Some(want) => finding(
            "profile",
            current,
            format!("host with {want} vCPUs"),
            Severity::Ok,
            "targets come from this profile",
        ),
        None => finding(
            "profile",
            current,
            "an instance profile (--profile)",
            Severity::Info,
            "no instance profile: targets sized from this host's CPUs; pass --profile for an \
             instance type's targets",
        ),
    }
}

fn check_kernel(facts: &HostFacts) -> Finding {
    let wanted = ">= 5.8 (glommio 0.9), 6.12 or newer recommended";
    let current = facts
        .kernel_release
        .clone()
        .unwrap_or_else(|| "unknown".to_owned());
    match facts.kernel_version() {
        None => finding(
            "kernel",
            current,
            wanted,
            Severity::Warning,
            "cannot read /proc/sys/kernel/osrelease",
        ),
        Some(v) if v < (5, 8) => finding(
            "kernel",
            current,
            wanted,
            Severity::Critical,
            "glommio 0.9 needs io_uring opcodes from Linux 5.8; it exits at executor start \
             without them",
        ),
        Some(v) if v < (6, 1) => finding(
            "kernel",
            current,
            wanted,
            Severity::Info,
            "runs glommio, but older io_uring code gets fewer fixes; prefer a 6.1+ LTS kernel",
        ),
        Some(v) if v < (6, 12) => finding(
            "kernel",
            current,
            wanted,
            Severity::Info,
            "runs the edge, but a sleeping shard wakes at each event: batch_wait_us needs the \
             batch wait of Linux 6.12",
        ),
        Some(_) => finding(
            "kernel",
            current,
            wanted,
            Severity::Ok,
            "io_uring as glommio 0.9 and batch_wait_us need it",
        ),
    }
}

fn uring_works(facts: &HostFacts) -> bool {
    matches!(&facts.uring, UringStatus::Probed { missing, .. } if missing.is_empty())
}

fn check_io_uring_disabled(facts: &HostFacts, ctx: &CheckContext) -> Finding {
    let name = "io_uring_disabled";
    match facts.io_uring_disabled {
        None => finding(
            name,
            "absent",
            "0",
            Severity::Ok,
            "kernels before 6.6 have no kernel.io_uring_disabled switch: io_uring is on",
        ),
        Some(0) => finding(
            name,
            "0",
            "0",
            Severity::Ok,
            "io_uring enabled for all processes",
        ),
        Some(1) => {
            let group = facts
                .io_uring_group
                .map_or("unset".to_owned(), |g| g.to_string());
            let why = format!(
                "io_uring only for processes with CAP_SYS_ADMIN or in group \
                 kernel.io_uring_group ({group}): run iris-edge in that group, or set 0"
            );
            let severity = if ctx.this_process && uring_works(facts) {
                Severity::Info
            } else {
                Severity::Warning
            };
            finding(name, "1", "0", severity, why)
        }
        Some(2) => finding(
            name,
            "2",
            "0",
            Severity::Critical,
            "io_uring is disabled for every process: glommio cannot create executors",
        ),
        Some(v) => finding(
            name,
            v.to_string(),
            "0",
            Severity::Warning,
            "unexpected value",
        ),
    }
}

fn check_io_uring(facts: &HostFacts) -> Finding {
    let name = "io_uring";
    let wanted = format!(
        "ring setup works, all {} opcodes glommio uses supported",
        EDGE_OPCODES.len()
    );
    match &facts.uring {
        UringStatus::Probed { missing, total } if missing.is_empty() => finding(
            name,
            format!("ring set up, {total}/{total} opcodes supported"),
            wanted,
            Severity::Ok,
            "probed live with the io-uring crate",
        ),
        UringStatus::Probed { missing, total } => finding(
            name,
            format!(
                "{}/{total} opcodes supported; missing {}",
                total - missing.len(),
                missing.join(", ")
            ),
            wanted,
            Severity::Critical,
            "glommio 0.9 exits at executor start when an opcode it uses is missing: upgrade the \
             kernel",
        ),
        UringStatus::ProbeFailed { message } => finding(
            name,
            format!("ring set up, probe failed: {message}"),
            wanted,
            Severity::Critical,
            "the kernel cannot register an opcode probe (before 5.6): too old for glommio",
        ),
        UringStatus::SetupFailed { errno, message } => {
            let why = match *errno {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    "io_uring_setup refused: kernel.io_uring_disabled, a seccomp filter (Docker's \
                     default profile blocks io_uring: run with a profile that allows it) or an LSM"
                }
                Some(libc::ENOSYS) => "the kernel is built without io_uring (CONFIG_IO_URING)",
                Some(libc::ENOMEM) => {
                    "RLIMIT_MEMLOCK is too low for even one ring (ring memory is charged to it)"
                }
                _ => "io_uring_setup failed",
            };
            finding(
                name,
                format!("setup failed: {message}"),
                wanted,
                Severity::Critical,
                why,
            )
        }
        UringStatus::NotProbed => {
            let disabled = facts.io_uring_disabled == Some(2);
            let old = facts.kernel_version().is_some_and(|v| v < (5, 8));
            let (severity, why) = if disabled || old {
                (
                    Severity::Critical,
                    "not probed, but the kernel version or kernel.io_uring_disabled rules it out",
                )
            } else {
                (
                    Severity::Info,
                    "not probed (not the live root): judged from the kernel version and \
                     kernel.io_uring_disabled only",
                )
            };
            finding(name, "not probed", wanted, severity, why)
        }
    }
}

fn check_memlock(facts: &HostFacts, t: &Targets, ctx: &CheckContext) -> Finding {
    let name = "memlock";
    let wanted = format!(
        ">= {} for {} shard(s): 3 rings x (io_memory {} + ring {}) = {} each; apply sets {}",
        human_bytes(t.memlock_needed),
        t.shards,
        human_bytes(effective_io_memory(ctx.io_memory_bytes)),
        human_bytes(ring_bytes(ctx.ring_depth)),
        human_bytes(t.memlock_per_shard),
        human_bytes(t.memlock_target),
    );
    let Some(limit) = facts.limits.memlock else {
        return finding(
            name,
            "unknown",
            wanted,
            Severity::Warning,
            "cannot read RLIMIT_MEMLOCK",
        );
    };
    let current = format!(
        "{} (soft), {} (hard)",
        human_bytes(limit.soft),
        human_bytes(limit.hard)
    );
    let soft = limit.soft;
    let (severity, why) = if soft < GLOMMIO_MIN_MEMLOCK {
        (
            Severity::Critical,
            "glommio refuses to create an executor below 512 KiB of locked memory".to_owned(),
        )
    } else if ctx.this_process && facts.cap_ipc_lock == Some(true) {
        (
            Severity::Ok,
            "this process has CAP_IPC_LOCK: io_uring does not charge its rings and buffers"
                .to_owned(),
        )
    } else if soft < t.memlock_needed {
        (
            Severity::Critical,
            format!(
                "each shard's 3 io_uring rings and 3 registrations of io_memory are charged to \
                 the user's locked memory; {} holds only {} shard(s): later shards fail to set \
                 up rings or fall back to unregistered buffers. Raise LimitMEMLOCK (iris-tune \
                 apply), lower shards or io_memory_bytes (a process with CAP_IPC_LOCK is not \
                 charged)",
                human_bytes(soft),
                soft / t.memlock_per_shard.max(1)
            ),
        )
    } else if soft != UNLIMITED && soft < t.memlock_needed.saturating_mul(2) {
        (
            Severity::Info,
            "enough for this edge, but the charge is per user: a second edge of the same user \
             (restart overlap, a test run) does not fit"
                .to_owned(),
        )
    } else {
        (
            Severity::Ok,
            "room for the shards' rings and registered buffers".to_owned(),
        )
    };
    finding(name, current, wanted, severity, why)
}

fn check_nofile(facts: &HostFacts, t: &Targets) -> Finding {
    let name = "nofile";
    let wanted = format!(
        ">= {} ({} planned sockets + headroom)",
        t.nofile, t.connections
    );
    let Some(limit) = facts.limits.nofile else {
        return finding(
            name,
            "unknown",
            wanted,
            Severity::Warning,
            "cannot read RLIMIT_NOFILE",
        );
    };
    let current = format!(
        "{} (soft), {} (hard)",
        show_limit(limit.soft),
        show_limit(limit.hard)
    );
    let (severity, why) = if limit.soft < t.connections {
        (
            Severity::Critical,
            format!(
                "every socket is a file descriptor: past {} the edge's accept fails with \
                 EMFILE, far below the planned {} sockets. Set LimitNOFILE (iris-tune apply)",
                limit.soft, t.connections
            ),
        )
    } else if limit.soft < t.nofile {
        (
            Severity::Warning,
            "holds the planned sockets but leaves little for the store, rings and eventfds"
                .to_owned(),
        )
    } else {
        (
            Severity::Ok,
            "room for the planned sockets and the edge's own files".to_owned(),
        )
    };
    finding(name, current, wanted, severity, why)
}

fn check_sysctl(facts: &HostFacts, rule: &SysctlRule) -> Finding {
    let wanted = rule.wanted_text();
    match facts.sysctls.get(rule.key) {
        None if rule.key.starts_with("net.netfilter.nf_conntrack") => finding(
            rule.key,
            "nf_conntrack not loaded",
            wanted,
            Severity::Ok,
            "no connection tracking: nothing to size",
        ),
        None => finding(
            rule.key,
            "unknown",
            wanted,
            Severity::Info,
            format!("cannot read it: {}", rule.why),
        ),
        Some(current) => match rule.judge(current) {
            Some(severity) => finding(
                rule.key,
                current.clone(),
                wanted,
                severity,
                rule.why.clone(),
            ),
            None => finding(
                rule.key,
                current.clone(),
                wanted,
                Severity::Info,
                format!("unexpected value: {}", rule.why),
            ),
        },
    }
}

fn check_thp(facts: &HostFacts) -> Finding {
    let name = "transparent_hugepage";
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".to_owned());
    let current = format!(
        "enabled={} defrag={}",
        show(&facts.thp_enabled),
        show(&facts.thp_defrag)
    );
    let wanted = "enabled=madvise or never, defrag not always";
    let enabled = facts.thp_enabled.as_deref();
    let defrag = facts.thp_defrag.as_deref();
    if enabled == Some("always") || defrag == Some("always") {
        finding(
            name,
            current,
            wanted,
            Severity::Warning,
            "with `always` every anonymous mapping may be collapsed by khugepaged or compacted \
             in the page-fault path: millisecond stalls on a shard's thread show up as p99.9",
        )
    } else if enabled.is_none() && defrag.is_none() {
        finding(
            name,
            current,
            wanted,
            Severity::Info,
            "not exposed (kernel without THP?)",
        )
    } else {
        finding(
            name,
            current,
            wanted,
            Severity::Ok,
            "huge pages only where an allocator asks for them",
        )
    }
}

fn check_governor(facts: &HostFacts, t: &Targets) -> Finding {
    let name = "cpu_governor";
    let wanted = "performance";
    let with: Vec<_> = facts.cpus.iter().filter(|c| c.governor.is_some()).collect();
    if with.is_empty() {
        return finding(
            name,
            "not exposed",
            wanted,
            Severity::Info,
            "no cpufreq driver (typical in a VM: the hypervisor sets the frequency)",
        );
    }
    let slow: Vec<usize> = with
        .iter()
        .filter(|c| c.governor.as_deref() != Some("performance"))
        .map(|c| c.id)
        .collect();
    let mut govs: Vec<String> = with.iter().filter_map(|c| c.governor.clone()).collect();
    govs.sort();
    govs.dedup();
    let current = format!("{} ({} CPUs)", govs.join(", "), with.len());
    if slow.is_empty() {
        finding(
            name,
            current,
            wanted,
            Severity::Ok,
            "CPUs stay at full clock",
        )
    } else {
        let on_shards = slow.iter().any(|c| t.shard_cpus.contains(c));
        finding(
            name,
            format!("{current}; not performance on {}", format_cpulist(&slow)),
            wanted,
            if on_shards {
                Severity::Warning
            } else {
                Severity::Info
            },
            "a power-saving governor lowers the clock between bursts: the first messages after \
             a quiet gap pay the ramp-up in latency",
        )
    }
}

fn check_frequency(facts: &HostFacts) -> Finding {
    let name = "cpu_frequency";
    let mhz = |khz: u64| format!("{} MHz", khz / 1000);
    let capped: Vec<usize> = facts
        .cpus
        .iter()
        .filter(|c| matches!((c.scaling_max_khz, c.max_khz), (Some(s), Some(m)) if s < m))
        .map(|c| c.id)
        .collect();
    let first = facts.cpus.iter().find(|c| c.max_khz.is_some());
    let mut parts = Vec::new();
    if let Some(c) = first {
        if let Some(v) = c.cur_khz {
            parts.push(format!("cpu{} now {}", c.id, mhz(v)));
        }
        if let Some(v) = c.max_khz {
            parts.push(format!("max {}", mhz(v)));
        }
        if let Some(v) = c.scaling_max_khz {
            parts.push(format!("scaling max {}", mhz(v)));
        }
    } else if let Some(v) = facts.cpu_mhz {
        parts.push(format!("{v:.0} MHz (/proc/cpuinfo)"));
    }
    if let Some(nt) = facts.no_turbo {
        parts.push(format!("turbo {}", if nt { "off" } else { "on" }));
    }
    let current = if parts.is_empty() {
        "unknown".to_owned()
    } else {
        parts.join(", ")
    };
    let wanted = "scaling max = hardware max, turbo on";
    if !capped.is_empty() {
        finding(
            name,
            current,
            wanted,
            Severity::Warning,
            format!(
                "scaling_max_freq is below the hardware maximum on CPUs {}: shards run slower \
                 than the capacity plan assumes",
                format_cpulist(&capped)
            ),
        )
    } else if facts.no_turbo == Some(true) {
        finding(
            name,
            current,
            wanted,
            Severity::Info,
            "turbo is off: steadier but lower per-core throughput than the benchmarks measured",
        )
    } else if first.is_none() {
        finding(
            name,
            current,
            wanted,
            Severity::Info,
            "cpufreq not exposed: frequency is the hypervisor's business",
        )
    } else {
        finding(name, current, wanted, Severity::Ok, "full clock available")
    }
}

fn check_smt(facts: &HostFacts, profile: &Profile, plan: &Plan) -> Finding {
    let name = "smt";
    let known = facts.cpus.iter().any(|c| c.siblings.is_some());
    let wanted = "either; the plan keeps whole cores (all siblings) for housekeeping";
    if !known {
        return finding(
            name,
            "unknown",
            wanted,
            Severity::Info,
            "CPU topology not exposed",
        );
    }
    let tpc = facts
        .cpus
        .iter()
        .filter_map(|c| c.siblings.as_ref().map(Vec::len))
        .max()
        .unwrap_or(1);
    let current = if tpc > 1 {
        format!("on, {tpc} threads per core ({} cores)", plan.physical_cores)
    } else {
        "off (1 thread per core)".to_owned()
    };
    match profile.threads_per_core {
        Some(p) if p != tpc => finding(
            name,
            current,
            format!("{p} threads per core (profile)"),
            Severity::Info,
            "differs from the profile: per-shard throughput will differ from the capacity plan",
        ),
        _ if tpc > 1 => finding(
            name,
            current,
            wanted,
            Severity::Info,
            "two shards share each physical core: per-shard throughput is below a core's",
        ),
        _ => finding(name, current, wanted, Severity::Ok, "one shard per core"),
    }
}

fn check_numa(facts: &HostFacts, profile: &Profile, plan: &Plan) -> Finding {
    let name = "numa";
    if facts.nodes.is_empty() {
        return finding(
            name,
            "unknown",
            "known layout",
            Severity::Info,
            "/sys/devices/system/node not exposed",
        );
    }
    let layout: Vec<String> = facts
        .nodes
        .iter()
        .map(|n| format!("node{}: {}", n.id, format_cpulist(&n.cpus)))
        .collect();
    let mut current = format!("{} node(s) ({})", facts.nodes.len(), layout.join("; "));
    if let Some(n) = plan.nic_node {
        current.push_str(&format!(", NIC on node{n}"));
    }
    let wanted = "housekeeping CPUs on the NIC's node";
    if let Some(p) = profile.numa_nodes.filter(|&p| p != facts.nodes.len()) {
        return finding(
            name,
            current,
            format!("{p} node(s) (profile)"),
            Severity::Info,
            "differs from the profile",
        );
    }
    if facts.nodes.len() > 1 {
        finding(
            name,
            current,
            wanted,
            Severity::Info,
            "shards on every node allocate locally (one executor per thread), but packets of \
             sockets on the far node cross the interconnect; the plan puts IRQ handling on the \
             NIC's node",
        )
    } else {
        finding(
            name,
            current,
            wanted,
            Severity::Ok,
            "single node: nothing to place",
        )
    }
}

fn check_nic_queues(nic: &NicFacts, profile: &Profile) -> Finding {
    let name = format!("nic_queues:{}", nic.name);
    let current = format!("{} rx, {} tx", nic.rx_queues, nic.tx_queues);
    match profile.nic_queues {
        Some(want) if nic.rx_queues < want => finding(
            name,
            current,
            format!(">= {want} (profile)"),
            Severity::Warning,
            format!(
                "fewer queues than the instance offers: receive processing is spread over fewer \
                 CPUs. Raise with `ethtool -L {} combined {want}`",
                nic.name
            ),
        ),
        Some(want) => finding(
            name,
            current,
            format!(">= {want} (profile)"),
            Severity::Ok,
            "all queues in use",
        ),
        None => finding(
            name,
            current,
            "as many as the NIC offers",
            Severity::Ok,
            "no profile expectation; compare with `ethtool -l`",
        ),
    }
}

fn check_irq_affinity(nic: &NicFacts, t: &Targets) -> Finding {
    let name = format!("irq_affinity:{}", nic.name);
    if nic.irqs.is_empty() {
        return finding(
            name,
            "no IRQs found",
            "IRQs off the shard CPUs",
            Severity::Info,
            "no interrupt in /proc/interrupts matched this interface",
        );
    }
    if t.irq_cpus.is_empty() {
        return finding(
            name,
            format!("{} IRQs", nic.irqs.len()),
            "no CPU kept for IRQs on this host",
            Severity::Info,
            "every CPU runs a shard (too few cores to keep one back): packet processing shares \
             the shards' CPUs",
        );
    }
    let wanted = format!("IRQs on CPUs {}", format_cpulist(&t.irq_cpus));
    let unknown = nic.irqs.iter().filter(|i| i.affinity.is_none()).count();
    // IRQs that may run on a shard CPU, grouped by their affinity.
    let mut on_shards: std::collections::BTreeMap<Vec<usize>, Vec<usize>> = Default::default();
    for irq in &nic.irqs {
        if let Some(aff) = &irq.affinity {
            if aff.iter().any(|c| t.shard_cpus.contains(c)) {
                on_shards
                    .entry(aff.clone())
                    .or_default()
                    .push(irq.irq as usize);
            }
        }
    }
    if !on_shards.is_empty() {
        let count: usize = on_shards.values().map(Vec::len).sum();
        let groups: Vec<String> = on_shards
            .iter()
            .map(|(aff, irqs)| {
                format!(
                    "IRQ {} on CPUs {}",
                    format_cpulist(irqs),
                    format_cpulist(aff)
                )
            })
            .collect();
        finding(
            name,
            format!(
                "{count} of {} IRQs may run on shard CPUs: {}",
                nic.irqs.len(),
                groups.join("; ")
            ),
            wanted,
            Severity::Warning,
            "softirq packet processing on a shard's CPU steals it from the shard at random \
             moments (tail latency); iris-tune apply pins the IRQs to the housekeeping CPUs",
        )
    } else if unknown > 0 {
        finding(
            name,
            format!("{unknown} of {} IRQs unreadable", nic.irqs.len()),
            wanted,
            Severity::Info,
            "cannot read /proc/irq/N/smp_affinity_list",
        )
    } else {
        finding(
            name,
            format!("{} IRQs on {}", nic.irqs.len(), format_cpulist(&t.irq_cpus)),
            wanted,
            Severity::Ok,
            "packet processing stays off the shards",
        )
    }
}

fn check_irqbalance(facts: &HostFacts, t: &Targets) -> Finding {
    let name = "irqbalance";
    match (facts.irqbalance_running, t.irq_cpus.is_empty()) {
        (false, _) => finding(
            name,
            "not running",
            "not running",
            Severity::Ok,
            "IRQ pinning stays",
        ),
        (true, true) => finding(
            name,
            "running",
            "not running",
            Severity::Info,
            "no CPU is kept for IRQs on this host, so it does no harm here",
        ),
        (true, false) => finding(
            name,
            "running",
            "not running",
            Severity::Warning,
            format!(
                "it moves NIC IRQs back onto shard CPUs: `systemctl disable --now irqbalance`, \
                 or set IRQBALANCE_BANNED_CPULIST={}",
                format_cpulist(&t.shard_cpus)
            ),
        ),
    }
}

fn check_clocksource(facts: &HostFacts) -> Finding {
    let name = "clocksource";
    let current = facts
        .clocksource
        .clone()
        .unwrap_or_else(|| "unknown".to_owned());
    let tsc_ok = facts.clocksources_available.iter().any(|c| c == "tsc");
    match facts.clocksource.as_deref() {
        Some("tsc") => finding(
            name,
            current,
            "tsc",
            Severity::Ok,
            "clock reads stay in the vDSO",
        ),
        None => finding(name, current, "tsc", Severity::Info, "not exposed"),
        Some(other @ ("xen" | "hpet" | "acpi_pm")) => finding(
            name,
            current,
            "tsc",
            Severity::Warning,
            format!(
                "{other} has no vDSO fast path: every clock_gettime is a syscall or an MMIO read, \
                 and the edge reads the clock per batch. {}",
                if tsc_ok {
                    "tsc is available: iris-tune apply switches to it; keep it with \
                     `clocksource=tsc tsc=reliable` on the kernel command line"
                } else {
                    "tsc is not offered; check `tsc=reliable` on the kernel command line"
                }
            ),
        ),
        Some(_) if tsc_ok => finding(
            name,
            current,
            "tsc",
            Severity::Info,
            "readable from the vDSO, but tsc is cheaper to read (AWS recommends it): iris-tune \
             apply switches to it; keep it with `clocksource=tsc` on the kernel command line",
        ),
        Some(_) => finding(
            name,
            current,
            "tsc",
            Severity::Info,
            "not tsc, and tsc is not offered",
        ),
    }
}

/// Above this much CPU per wake-up from idle, sparse traffic costs the edge markedly more CPU per
/// message than on bare metal (2–5 µs there; about 25 µs under nested virtualization).
const WAKEUP_CPU_US_MAX: f64 = 10.0;

fn check_wakeup(facts: &HostFacts) -> Finding {
    let name = "wakeup";
    let wanted = format!("≤ {WAKEUP_CPU_US_MAX} µs of CPU per wake-up from idle");
    match &facts.wake {
        WakeStatus::NotProbed => finding(
            name,
            "not probed",
            wanted,
            Severity::Info,
            "not measured (only `iris-tune check` on the live host measures it)",
        ),
        WakeStatus::Unavailable { reason } => finding(
            name,
            "unknown",
            wanted,
            Severity::Info,
            format!("not measured: {reason}"),
        ),
        WakeStatus::Measured {
            cpu_us_per_wake,
            rounds,
        } => {
            let current = format!("{cpu_us_per_wake:.1} µs per wake-up ({rounds} rounds)");
            if *cpu_us_per_wake <= WAKEUP_CPU_US_MAX {
                finding(
                    name,
                    current,
                    wanted,
                    Severity::Ok,
                    "a sleeping shard wakes cheaply; batch_wait_us 200 (the default) fits",
                )
            } else {
                finding(
                    name,
                    current,
                    wanted,
                    Severity::Warning,
                    format!(
                        "each wake-up of an idle shard costs {cpu_us_per_wake:.1} µs of CPU \
                         (typical of nested virtualization or slow idle exits), so at low \
                         message rates the edge spends several times more CPU per message than \
                         on bare metal: raise batch_wait_us (500–1000) where up to that much \
                         added latency at low load is acceptable; see docs/TUNING.md, \
                         \"Wake-ups and batch_wait_us\""
                    ),
                )
            }
        }
    }
}

/// What `guest_halt_poll_ns` is advised at: the kernel's own default (200 µs).
const GUEST_HALT_POLL_NS: u64 = 200_000;

/// A KVM guest whose idle driver is `haltpoll` with polling off halts its vCPU at every idle
/// entry, so each wake-up of a sleeping shard is a VM exit and entry. The kernel's default polls
/// up to 200 µs first (adaptively: a CPU whose wake-ups come later polls less).
fn check_halt_poll(facts: &HostFacts) -> Finding {
    let name = "halt_poll";
    let wanted = format!(
        "guest halt polling on (up to {} µs)",
        GUEST_HALT_POLL_NS / 1000
    );
    if facts.cpuidle_driver.as_deref() != Some("haltpoll") {
        let current = facts.cpuidle_driver.as_deref().map_or_else(
            || "no cpuidle driver".to_owned(),
            |d| format!("cpuidle {d}"),
        );
        return finding(
            name,
            current,
            wanted,
            Severity::Ok,
            "not a guest idling through haltpoll: nothing to set",
        );
    }
    match facts.guest_halt_poll_ns {
        None => finding(
            name,
            "haltpoll, polling unknown",
            wanted,
            Severity::Info,
            "the haltpoll driver is in use but /sys/module/haltpoll/parameters/guest_halt_poll_ns \
             cannot be read",
        ),
        Some(ns) if ns > 0 => finding(
            name,
            format!("haltpoll, polling up to {} µs", ns / 1000),
            wanted,
            Severity::Ok,
            "an idle vCPU polls before it halts: wake-ups soon after sleeping stay in the guest",
        ),
        Some(_) => {
            let dear = matches!(
                facts.wake,
                WakeStatus::Measured { cpu_us_per_wake, .. } if cpu_us_per_wake > WAKEUP_CPU_US_MAX
            );
            finding(
                name,
                "haltpoll, polling off (guest_halt_poll_ns=0)",
                wanted,
                if dear { Severity::Warning } else { Severity::Info },
                format!(
                    "an idle vCPU halts at once, so every wake-up of a sleeping shard is a VM exit \
                     and entry; the kernel's default polls up to {} µs first: `echo {GUEST_HALT_POLL_NS} \
                     > /sys/module/haltpoll/parameters/guest_halt_poll_ns` (or \
                     haltpoll.guest_halt_poll_ns={GUEST_HALT_POLL_NS} on the kernel command line) \
                     halved the CPU per wake-up on a nested-virtualization host (21–26 to 12–13 µs) \
                     at the price of the vCPU spinning that long when it idles; see \
                     docs/TUNING.md, \"Wake-ups and batch_wait_us\"",
                    GUEST_HALT_POLL_NS / 1000
                ),
            )
        }
    }
}

fn check_nvme(facts: &HostFacts, profile: &Profile) -> Vec<Finding> {
    let local: Vec<_> = facts.nvme.iter().filter(|d| !d.is_ebs()).collect();
    let mut out = Vec::new();
    if local.is_empty() {
        if profile.nvme {
            out.push(finding(
                "nvme",
                "no NVMe instance storage found",
                "NVMe instance storage (profile)",
                Severity::Warning,
                "the profile expects local NVMe for the store; wrong profile or devices missing",
            ));
        }
        return out;
    }
    for dev in &local {
        let name = format!("nvme_scheduler:{}", dev.name);
        let current = dev
            .scheduler
            .clone()
            .unwrap_or_else(|| "unknown".to_owned());
        let (severity, why) = match dev.scheduler.as_deref() {
            Some("none") => (Severity::Ok, "requests go straight to the device's queues"),
            None => (Severity::Info, "cannot read queue/scheduler"),
            Some(_) => (
                Severity::Warning,
                "NVMe has deep hardware queues; a software I/O scheduler only adds CPU time and \
                 latency to store writes",
            ),
        };
        out.push(finding(name, current, "none", severity, why));
    }
    for m in facts.mounts.iter().filter(|m| {
        local.iter().any(|d| {
            m.device
                .strip_prefix("/dev/")
                .is_some_and(|n| n.starts_with(&d.name))
        })
    }) {
        let noatime = m.options.iter().any(|o| o == "noatime");
        out.push(finding(
            format!("mount:{}", m.mountpoint),
            format!("{} {} {}", m.device, m.fstype, m.options.join(",")),
            "noatime",
            if noatime {
                Severity::Ok
            } else {
                Severity::Warning
            },
            if noatime {
                "reads do not write access times".to_owned()
            } else {
                format!(
                    "access-time updates turn the store's reads into metadata writes: add \
                     noatime to {}'s options in /etc/fstab and remount",
                    m.mountpoint
                )
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{CollectOptions, CpuFacts};
    use crate::limits::{Limits, Rlim};
    use crate::plan::make_plan;
    use crate::profile::ProfileSet;
    use crate::root::Root;

    fn base_facts() -> HostFacts {
        let dir = tempfile::tempdir().unwrap();
        let mut f = HostFacts::collect(&Root::new(dir.path()), CollectOptions::default());
        f.kernel_release = Some("6.1.0".to_owned());
        f.cpus = (0..4)
            .map(|id| CpuFacts {
                id,
                ..CpuFacts::default()
            })
            .collect();
        f
    }

    fn ctx() -> CheckContext {
        CheckContext {
            shards: None,
            shard_cpus: None,
            io_memory_bytes: 512 << 10,
            ring_depth: 128,
            this_process: false,
        }
    }

    fn run(f: &HostFacts, c: &CheckContext) -> Vec<Finding> {
        let p = ProfileSet::builtin().unwrap().resolve("generic").unwrap();
        let plan = make_plan(f, &p, c.io_memory_bytes, c.ring_depth);
        run_checks(f, &p, Selection::Generic, &plan, c)
    }

    fn get<'a>(fs: &'a [Finding], name: &str) -> &'a Finding {
        fs.iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("{name}"))
    }

    #[test]
    fn kernel_severity() {
        let mut f = base_facts();
        for (rel, sev) in [
            ("5.4.0-aws", Severity::Critical),
            ("5.10.1", Severity::Info),
            ("6.6.30", Severity::Info),
            ("6.12.0", Severity::Ok),
            ("6.18.44-fc", Severity::Ok),
            ("weird", Severity::Warning),
        ] {
            f.kernel_release = Some(rel.to_owned());
            assert_eq!(get(&run(&f, &ctx()), "kernel").severity, sev, "{rel}");
        }
    }

    #[test]
    fn io_uring_severity() {
        let mut f = base_facts();
        f.uring = UringStatus::Probed {
            missing: vec![],
            total: 24,
        };
        assert_eq!(get(&run(&f, &ctx()), "io_uring").severity, Severity::Ok);
        f.uring = UringStatus::Probed {
            missing: vec!["SEND".into()],
            total: 24,
        };
        let io = run(&f, &ctx());
        assert_eq!(get(&io, "io_uring").severity, Severity::Critical);
        assert!(get(&io, "io_uring").current.contains("SEND"));
        f.uring = UringStatus::SetupFailed {
            errno: Some(libc::EPERM),
            message: "Operation not permitted".into(),
        };
        let io = run(&f, &ctx());
        assert_eq!(get(&io, "io_uring").severity, Severity::Critical);
        assert!(get(&io, "io_uring").why.contains("seccomp"));
        f.uring = UringStatus::NotProbed;
        assert_eq!(get(&run(&f, &ctx()), "io_uring").severity, Severity::Info);
        f.io_uring_disabled = Some(2);
        let fs = run(&f, &ctx());
        assert_eq!(get(&fs, "io_uring").severity, Severity::Critical);
        assert_eq!(get(&fs, "io_uring_disabled").severity, Severity::Critical);
        f.io_uring_disabled = Some(1);
        assert_eq!(
            get(&run(&f, &ctx()), "io_uring_disabled").severity,
            Severity::Warning
        );
        f.io_uring_disabled = None;
        assert_eq!(
            get(&run(&f, &ctx()), "io_uring_disabled").severity,
            Severity::Ok
        );
    }

    #[test]
    fn memlock_severity_follows_shards() {
        let mut f = base_facts();
        let set = |f: &mut HostFacts, soft: u64| {
            f.limits = Limits {
                memlock: Some(Rlim { soft, hard: soft }),
                ..Limits::default()
            };
        };
        let with_shards = |n| CheckContext {
            shards: Some(n),
            ..ctx()
        };
        set(&mut f, 8 << 20);
        // 8 MiB: five default shards fit, six do not.
        assert_eq!(
            get(&run(&f, &with_shards(2)), "memlock").severity,
            Severity::Ok
        );
        assert_eq!(
            get(&run(&f, &with_shards(5)), "memlock").severity,
            Severity::Info
        );
        let six = run(&f, &with_shards(6));
        assert_eq!(get(&six, "memlock").severity, Severity::Critical);
        assert!(get(&six, "memlock").why.contains("holds only 5 shard"));
        set(&mut f, 256 << 10);
        assert_eq!(
            get(&run(&f, &with_shards(1)), "memlock").severity,
            Severity::Critical
        );
        set(&mut f, UNLIMITED);
        assert_eq!(
            get(&run(&f, &with_shards(64)), "memlock").severity,
            Severity::Ok
        );
        // CAP_IPC_LOCK lifts the charge, but only for the process that runs the shards.
        set(&mut f, 8 << 20);
        f.cap_ipc_lock = Some(true);
        assert_eq!(
            get(&run(&f, &with_shards(16)), "memlock").severity,
            Severity::Critical
        );
        let mine = CheckContext {
            this_process: true,
            ..with_shards(16)
        };
        assert_eq!(get(&run(&f, &mine), "memlock").severity, Severity::Ok);
        f.limits = Limits::default();
        assert_eq!(get(&run(&f, &ctx()), "memlock").severity, Severity::Warning);
    }

    #[test]
    fn nofile_severity() {
        let mut f = base_facts();
        // generic profile on 4 CPUs: 150,000 sockets, target 262,144.
        for (soft, sev) in [
            (20_000, Severity::Critical),
            (200_000, Severity::Warning),
            (262_144, Severity::Ok),
            (UNLIMITED, Severity::Ok),
        ] {
            f.limits = Limits {
                nofile: Some(Rlim {
                    soft,
                    hard: UNLIMITED,
                }),
                ..Limits::default()
            };
            assert_eq!(get(&run(&f, &ctx()), "nofile").severity, sev, "{soft}");
        }
    }

    #[test]
    fn sysctl_rules_judge_and_fix() {
        let r = SysctlRule {
            key: "x",
            want: Want::AtLeast(100),
            severity: Severity::Warning,
            critical_below: Some(10),
            why: String::new(),
        };
        assert_eq!(r.judge("5"), Some(Severity::Critical));
        assert_eq!(r.judge("50"), Some(Severity::Warning));
        assert_eq!(r.judge("500"), Some(Severity::Ok));
        assert_eq!(r.judge("abc"), None);
        assert_eq!(r.judge("1 2"), None);
        assert_eq!(r.fixed("50").as_deref(), Some("100"));
        assert_eq!(r.fixed("500").as_deref(), Some("500"));
        let b = SysctlRule {
            want: Want::Buffers([4096, 131072, 16 << 20]),
            ..r.clone()
        };
        assert_eq!(b.judge("4096 16384 4194304"), Some(Severity::Info));
        assert_eq!(b.judge("4096 1048576 33554432"), Some(Severity::Warning));
        assert_eq!(b.judge("4096 131072 33554432"), Some(Severity::Ok));
        assert_eq!(
            b.fixed("4096 1048576 4194304").as_deref(),
            Some("4096 131072 16777216")
        );
        let fixed = b.fixed("4096 1048576 4194304").unwrap();
        assert_eq!(b.judge(&fixed), Some(Severity::Ok));
        assert_eq!(b.fixed(&fixed), Some(fixed));
        let p = SysctlRule {
            want: Want::PortRange {
                width: 50000,
                target: [1024, 65535],
            },
            ..r
        };
        assert_eq!(p.judge("32768 60999"), Some(Severity::Warning));
        assert_eq!(p.fixed("32768 60999").as_deref(), Some("1024 65535"));
        assert_eq!(p.fixed("2000 65000").as_deref(), Some("2000 65000"));
    }

    #[test]
    fn conntrack_absent_is_ok_and_full_is_critical() {
        let mut f = base_facts();
        assert_eq!(
            get(&run(&f, &ctx()), "net.netfilter.nf_conntrack_max").severity,
            Severity::Ok
        );
        f.sysctls
            .insert("net.netfilter.nf_conntrack_max".into(), "65536".into());
        assert_eq!(
            get(&run(&f, &ctx()), "net.netfilter.nf_conntrack_max").severity,
            Severity::Critical
        );
    }

    #[test]
    fn thp_clocksource_governor() {
        let mut f = base_facts();
        f.thp_enabled = Some("always".into());
        f.thp_defrag = Some("madvise".into());
        f.clocksource = Some("xen".into());
        f.clocksources_available = vec!["xen".into(), "tsc".into()];
        f.cpus[1].governor = Some("powersave".into());
        let fs = run(&f, &ctx());
        assert_eq!(get(&fs, "transparent_hugepage").severity, Severity::Warning);
        assert_eq!(get(&fs, "clocksource").severity, Severity::Warning);
        assert_eq!(get(&fs, "cpu_governor").severity, Severity::Warning);
        f.clocksource = Some("kvm-clock".into());
        f.clocksources_available = vec!["kvm-clock".into(), "tsc".into()];
        assert_eq!(
            get(&run(&f, &ctx()), "clocksource").severity,
            Severity::Info
        );
        f.clocksources_available = vec!["kvm-clock".into()];
        assert_eq!(
            get(&run(&f, &ctx()), "clocksource").severity,
            Severity::Info
        );
    }

    /// A probe's result of `us` per wake-up.
    fn measured(us: f64) -> WakeStatus {
        WakeStatus::Measured {
            cpu_us_per_wake: us,
            rounds: 400,
        }
    }

    #[test]
    fn halt_poll_severity() {
        let mut f = base_facts();
        // Bare metal or a guest with another idle driver: nothing to set.
        assert_eq!(get(&run(&f, &ctx()), "halt_poll").severity, Severity::Ok);
        f.cpuidle_driver = Some("intel_idle".into());
        assert_eq!(
            get(&run(&f, &ctx()), "halt_poll").current,
            "cpuidle intel_idle"
        );
        f.cpuidle_driver = Some("haltpoll".into());
        assert_eq!(get(&run(&f, &ctx()), "halt_poll").severity, Severity::Info);
        f.guest_halt_poll_ns = Some(200_000);
        let w = run(&f, &ctx());
        assert_eq!(get(&w, "halt_poll").severity, Severity::Ok);
        assert_eq!(
            get(&w, "halt_poll").current,
            "haltpoll, polling up to 200 µs"
        );
        // Off: advice, a warning once wake-ups were measured dear.
        f.guest_halt_poll_ns = Some(0);
        let w = run(&f, &ctx());
        let h = get(&w, "halt_poll");
        assert_eq!(h.severity, Severity::Info);
        assert!(
            h.why.contains("echo 200000 > /sys/module/haltpoll"),
            "{}",
            h.why
        );
        f.wake = measured(3.0);
        assert_eq!(get(&run(&f, &ctx()), "halt_poll").severity, Severity::Info);
        f.wake = measured(24.5);
        assert_eq!(
            get(&run(&f, &ctx()), "halt_poll").severity,
            Severity::Warning
        );
    }

    #[test]
    fn wakeup_severity() {
        let mut f = base_facts();
        assert_eq!(f.wake, WakeStatus::NotProbed);
        let w = run(&f, &ctx());
        assert_eq!(get(&w, "wakeup").severity, Severity::Info);
        assert!(get(&w, "wakeup").why.contains("not measured"));
        f.wake = WakeStatus::Unavailable {
            reason: "needs two CPUs this process may run on, has 1".into(),
        };
        let w = run(&f, &ctx());
        assert_eq!(get(&w, "wakeup").severity, Severity::Info);
        assert!(get(&w, "wakeup").why.contains("needs two CPUs"));
        f.wake = measured(3.0);
        assert_eq!(get(&run(&f, &ctx()), "wakeup").severity, Severity::Ok);
        f.wake = measured(10.0);
        assert_eq!(get(&run(&f, &ctx()), "wakeup").severity, Severity::Ok);
        f.wake = measured(24.5);
        let w = run(&f, &ctx());
        let wake = get(&w, "wakeup");
        assert_eq!(wake.severity, Severity::Warning);
        assert_eq!(wake.current, "24.5 µs per wake-up (400 rounds)");
        assert!(
            wake.why.contains("batch_wait_us (500–1000)"),
            "{}",
            wake.why
        );
    }
}
