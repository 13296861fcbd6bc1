//! Everything the checks, the plan and `apply` need to know about a host, read once from a
//! [`Root`] into plain data ([`HostFacts`]).
//!
//! Collection never fails: whatever is missing or malformed is `None` or empty, and the checks
//! turn that into "unknown". Keeping the reads here and the judgement in `checks` lets tests
//! build facts directly for edge cases that no fixture tree can express (a failed io_uring setup).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::limits::Limits;
use crate::root::{options, parse_cpulist, selected, Root};
use crate::uring::{self, UringStatus};
use crate::wake::{self, WakeStatus};

/// The kernel settings (sysctl names) the checks and `apply` manage.
pub const SYSCTLS: &[&str] = &[
    "fs.file-max",
    "fs.nr_open",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.ip_local_port_range",
    "net.core.rmem_default",
    "net.core.wmem_default",
    "net.core.rmem_max",
    "net.core.wmem_max",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_tw_reuse",
    "net.netfilter.nf_conntrack_max",
];

/// Where a sysctl lives under `/proc/sys`.
pub fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// Bit of `CAP_IPC_LOCK` in the capability sets of `/proc/<pid>/status`.
const CAP_IPC_LOCK: u32 = 14;

/// How to collect.
#[derive(Debug, Clone, Copy, Default)]
pub struct CollectOptions {
    /// Set up a real io_uring ring to probe opcodes (only meaningful on the live root).
    pub probe_uring: bool,
    /// Run the wake-up cost probe (two pinned threads ping-ponging over pipes, about 0.15 s;
    /// only meaningful on the live root).
    pub probe_wake: bool,
}

/// One logical CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuFacts {
    pub id: usize,
    /// `(physical_package_id, core_id)`; `None` when topology is not exposed.
    pub core: Option<(i64, i64)>,
    /// SMT siblings including this CPU.
    pub siblings: Option<Vec<usize>>,
    pub node: Option<usize>,
    pub governor: Option<String>,
    pub governors_available: Vec<String>,
    pub cur_khz: Option<u64>,
    pub max_khz: Option<u64>,
    pub scaling_max_khz: Option<u64>,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeFacts {
    pub id: usize,
    pub cpus: Vec<usize>,
}

/// One interrupt line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IrqFacts {
    pub irq: u32,
    pub name: String,
    /// `smp_affinity_list`; `None` when unreadable.
    pub affinity: Option<Vec<usize>>,
}

/// One network interface backed by a device (not `lo`, bridges or other virtual links).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NicFacts {
    pub name: String,
    pub rx_queues: usize,
    pub tx_queues: usize,
    pub numa_node: Option<usize>,
    pub irqs: Vec<IrqFacts>,
}

/// One NVMe block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockFacts {
    pub name: String,
    pub model: Option<String>,
    pub scheduler: Option<String>,
    pub schedulers_available: Vec<String>,
}

impl BlockFacts {
    /// Amazon EBS volumes also show up as NVMe on Nitro hosts; they are not instance storage.
    pub fn is_ebs(&self) -> bool {
        self.model
            .as_deref()
            .is_some_and(|m| m.contains("Elastic Block Store"))
    }
}

/// One line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountFacts {
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    pub options: Vec<String>,
}

/// All facts about a host.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// Whether these came from the live root.
    pub live: bool,
    pub kernel_release: Option<String>,
    /// `kernel.io_uring_disabled`; `None` when absent (kernels before 6.6 have no such switch).
    pub io_uring_disabled: Option<u64>,
    pub io_uring_group: Option<i64>,
    pub uring: UringStatus,
    /// CPU charged to a thread per wake-up from idle (live probe).
    pub wake: WakeStatus,
    pub limits: Limits,
    /// Whether this process has `CAP_IPC_LOCK` in its effective set.
    pub cap_ipc_lock: Option<bool>,
    /// Effective uid of this process.
    pub euid: Option<u32>,
    /// Values of [`SYSCTLS`] that exist, trimmed, whitespace collapsed to single spaces.
    pub sysctls: BTreeMap<String, String>,
    pub thp_enabled: Option<String>,
    pub thp_defrag: Option<String>,
    pub cpus: Vec<CpuFacts>,
    pub nodes: Vec<NodeFacts>,
    pub no_turbo: Option<bool>,
    pub cpu_mhz: Option<f64>,
    pub clocksource: Option<String>,
    pub clocksources_available: Vec<String>,
    /// The cpuidle driver (`haltpoll` in KVM guests that poll before halting).
    pub cpuidle_driver: Option<String>,
    /// `haltpoll.guest_halt_poll_ns`: how long an idle vCPU polls before it halts (0: never).
    pub guest_halt_poll_ns: Option<u64>,
    pub nics: Vec<NicFacts>,
    pub irqbalance_running: bool,
    pub nvme: Vec<BlockFacts>,
    pub mounts: Vec<MountFacts>,
    /// DMI product name: the instance type on AWS Nitro hosts (`c6i.4xlarge`).
    pub dmi_product: Option<String>,
}

impl HostFacts {
    /// Reads every fact from `root`.
    pub fn collect(root: &Root, opts: CollectOptions) -> Self {
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|key| {
                let v = root.read_trimmed(&sysctl_path(key))?;
                Some((
                    (*key).to_owned(),
                    v.split_whitespace().collect::<Vec<_>>().join(" "),
                ))
            })
            .collect();
        let status = root.read("/proc/self/status").unwrap_or_default();
        let uring = if opts.probe_uring && root.is_live() {
            uring::probe()
        } else {
            UringStatus::NotProbed
        };
        let wake = if opts.probe_wake && root.is_live() {
            wake::probe()
        } else {
            WakeStatus::NotProbed
        };
        let cpus = collect_cpus(root);
        let (clocksource, clocksources_available) = {
            let base = "/sys/devices/system/clocksource/clocksource0";
            (
                root.read_trimmed(&format!("{base}/current_clocksource")),
                root.read(&format!("{base}/available_clocksource"))
                    .map(|t| options(&t))
                    .unwrap_or_default(),
            )
        };
        Self {
            live: root.is_live(),
            kernel_release: root.read_trimmed("/proc/sys/kernel/osrelease"),
            io_uring_disabled: root.read_u64("/proc/sys/kernel/io_uring_disabled"),
            io_uring_group: root
                .read_trimmed("/proc/sys/kernel/io_uring_group")
                .and_then(|v| v.parse().ok()),
            uring,
            wake,
            limits: Limits::read(root),
            cap_ipc_lock: status_field(&status, "CapEff:")
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .map(|caps| caps & (1 << CAP_IPC_LOCK) != 0),
            euid: status_field(&status, "Uid:")
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok()),
            sysctls,
            thp_enabled: root
                .read("/sys/kernel/mm/transparent_hugepage/enabled")
                .and_then(|t| selected(&t)),
            thp_defrag: root
                .read("/sys/kernel/mm/transparent_hugepage/defrag")
                .and_then(|t| selected(&t)),
            nodes: collect_nodes(root),
            no_turbo: root
                .read_u64("/sys/devices/system/cpu/intel_pstate/no_turbo")
                .map(|v| v == 1),
            cpu_mhz: root.read("/proc/cpuinfo").and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("cpu MHz"))
                    .and_then(|l| l.split(':').nth(1))
                    .and_then(|v| v.trim().parse().ok())
            }),
            clocksource,
            clocksources_available,
            cpuidle_driver: root.read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver"),
            guest_halt_poll_ns: root.read_u64("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
            nics: collect_nics(root),
            irqbalance_running: irqbalance_running(root),
            nvme: collect_nvme(root),
            mounts: collect_mounts(root),
            dmi_product: root
                .read_trimmed("/sys/devices/virtual/dmi/id/product_name")
                .or_else(|| root.read_trimmed("/sys/class/dmi/id/product_name")),
            cpus,
        }
    }

    /// Online CPU ids.
    pub fn cpu_ids(&self) -> Vec<usize> {
        self.cpus.iter().map(|c| c.id).collect()
    }

    /// The parsed kernel version `(major, minor)`.
    pub fn kernel_version(&self) -> Option<(u32, u32)> {
        parse_kernel_version(self.kernel_release.as_deref()?)
    }
}

/// The CPUs the calling thread may run on (its affinity mask), lowest first.
pub fn affinity_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain array of integers, for which all-zero is a valid value
    // (the empty set).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes (the size we pass)
    // through the pointer, which points at a live, aligned and exclusively borrowed `cpu_set_t`
    // for the whole call; it has no other memory effects.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let setsize = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    Ok((0..setsize)
        // SAFETY: CPU_ISSET only reads bit `c` of the set we own, and `c` < CPU_SETSIZE, the
        // number of bits in a `cpu_set_t`, so the read stays inside it.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// `6.18.44-fc-v669` -> `(6, 18)`.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The text after `key` on its line of `/proc/self/status`.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

fn collect_cpus(root: &Root) -> Vec<CpuFacts> {
    let base = "/sys/devices/system/cpu";
    let ids = root
        .read(&format!("{base}/online"))
        .and_then(|t| parse_cpulist(&t))
        .filter(|ids| !ids.is_empty())
        .unwrap_or_else(|| {
            root.list(base)
                .iter()
                .filter_map(|n| n.strip_prefix("cpu")?.parse().ok())
                .collect()
        });
    let nodes = collect_nodes(root);
    ids.into_iter()
        .map(|id| {
            let dir = format!("{base}/cpu{id}");
            let topo = |f: &str| -> Option<i64> {
                root.read_trimmed(&format!("{dir}/topology/{f}"))?
                    .parse()
                    .ok()
            };
            let core = topo("core_id").map(|core| (topo("physical_package_id").unwrap_or(0), core));
            let freq = |f: &str| root.read_u64(&format!("{dir}/cpufreq/{f}"));
            CpuFacts {
                id,
                core,
                siblings: root
                    .read(&format!("{dir}/topology/thread_siblings_list"))
                    .and_then(|t| parse_cpulist(&t))
                    .filter(|s| !s.is_empty()),
                node: nodes.iter().find(|n| n.cpus.contains(&id)).map(|n| n.id),
                governor: root.read_trimmed(&format!("{dir}/cpufreq/scaling_governor")),
                governors_available: root
                    .read(&format!("{dir}/cpufreq/scaling_available_governors"))
                    .map(|t| options(&t))
                    .unwrap_or_default(),
                cur_khz: freq("scaling_cur_freq"),
                max_khz: freq("cpuinfo_max_freq"),
                scaling_max_khz: freq("scaling_max_freq"),
            }
        })
        .collect()
}

fn collect_nodes(root: &Root) -> Vec<NodeFacts> {
    let base = "/sys/devices/system/node";
    root.list(base)
        .iter()
        .filter_map(|n| {
            let id = n.strip_prefix("node")?.parse().ok()?;
            let cpus = root
                .read(&format!("{base}/{n}/cpulist"))
                .and_then(|t| parse_cpulist(&t))
                .unwrap_or_default();
            Some(NodeFacts { id, cpus })
        })
        .collect()
}

/// `(irq, name)` of every numbered line of `/proc/interrupts`. The name is the last column
/// (the action name, `eth0-Tx-Rx-0`, `virtio2-input.0`).
fn interrupts(root: &Root) -> Vec<(u32, String)> {
    let Some(text) = root.read("/proc/interrupts") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (num, rest) = line.trim_start().split_once(':')?;
            let irq = num.trim().parse().ok()?;
            let name = rest.split_whitespace().last()?.to_owned();
            Some((irq, name))
        })
        .collect()
}

fn collect_nics(root: &Root) -> Vec<NicFacts> {
    let irqs = interrupts(root);
    root.list("/sys/class/net")
        .into_iter()
        .filter(|name| name != "lo" && root.exists(&format!("/sys/class/net/{name}/device")))
        .map(|name| {
            let dir = format!("/sys/class/net/{name}");
            let queues = root.list(&format!("{dir}/queues"));
            let count = |p: &str| queues.iter().filter(|q| q.starts_with(p)).count();
            let device = root.link_name(&format!("{dir}/device"));
            let msi: Vec<u32> = root
                .list(&format!("{dir}/device/msi_irqs"))
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect();
            let matches = |irq: u32, action: &str| {
                msi.contains(&irq)
                    || action == name
                    || action.starts_with(&format!("{name}-"))
                    || action.starts_with(&format!("{name}@"))
                    || device
                        .as_deref()
                        .is_some_and(|d| action.starts_with(&format!("{d}-")))
            };
            let nic_irqs = irqs
                .iter()
                .filter(|(irq, action)| matches(*irq, action))
                .map(|(irq, action)| IrqFacts {
                    irq: *irq,
                    name: action.clone(),
                    affinity: root
                        .read(&format!("/proc/irq/{irq}/smp_affinity_list"))
                        .and_then(|t| parse_cpulist(&t)),
                })
                .collect();
            NicFacts {
                rx_queues: count("rx-"),
                tx_queues: count("tx-"),
                numa_node: root
                    .read_trimmed(&format!("{dir}/device/numa_node"))
                    .and_then(|v| v.parse::<i64>().ok())
                    .and_then(|v| usize::try_from(v).ok()),
                irqs: nic_irqs,
                name,
            }
        })
        .collect()
}

fn irqbalance_running(root: &Root) -> bool {
    root.list("/proc")
        .iter()
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .any(|pid| root.read_trimmed(&format!("/proc/{pid}/comm")).as_deref() == Some("irqbalance"))
}

fn collect_nvme(root: &Root) -> Vec<BlockFacts> {
    root.list("/sys/block")
        .into_iter()
        .filter(|n| n.starts_with("nvme"))
        .map(|name| {
            let sched = root.read(&format!("/sys/block/{name}/queue/scheduler"));
            BlockFacts {
                model: root.read_trimmed(&format!("/sys/block/{name}/device/model")),
                scheduler: sched.as_deref().and_then(selected),
                schedulers_available: sched.as_deref().map(options).unwrap_or_default(),
                name,
            }
        })
        .collect()
}

fn collect_mounts(root: &Root) -> Vec<MountFacts> {
    let Some(text) = root
        .read("/proc/mounts")
        .or_else(|| root.read("/proc/self/mounts"))
    else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            Some(MountFacts {
                device: w.next()?.to_owned(),
                mountpoint: w.next()?.to_owned(),
                fstype: w.next()?.to_owned(),
                options: w.next()?.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.8.0"), Some((5, 8)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert_eq!(parse_kernel_version(""), None);
    }

    #[test]
    fn empty_root_collects_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let facts = HostFacts::collect(&Root::new(dir.path()), CollectOptions::default());
        assert!(facts.cpus.is_empty());
        assert!(facts.kernel_release.is_none());
        assert_eq!(facts.uring, UringStatus::NotProbed);
        assert_eq!(facts.wake, WakeStatus::NotProbed);
        assert!(facts.sysctls.is_empty());
    }

    #[test]
    fn garbage_files_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        for (path, text) in [
            ("/proc/sys/kernel/io_uring_disabled", "yes please"),
            ("/sys/devices/system/cpu/online", "0-banana"),
            ("/proc/interrupts", "\u{0}\u{1}::::\n  x: y\n"),
            ("/proc/self/limits", "Max open files lots"),
            ("/proc/self/status", "CapEff:\tzz\nUid:\n"),
            ("/proc/mounts", "onlyone\n"),
        ] {
            let p = root.path(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let facts = HostFacts::collect(&root, CollectOptions::default());
        assert_eq!(facts.io_uring_disabled, None);
        assert!(facts.cpus.is_empty());
        assert_eq!(facts.limits, Limits::default());
        assert_eq!(facts.cap_ipc_lock, None);
        assert_eq!(facts.euid, None);
        assert!(facts.mounts.is_empty());
    }
}
