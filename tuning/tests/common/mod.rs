//! Fixture trees of `/proc` and `/sys` for the integration tests, built in temporary
//! directories: a stock (untuned) c6i.4xlarge, a stock i3.4xlarge, and helpers to run the
//! `iris-tune` binary against them and to snapshot a tree.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn empty() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, path: &str, contents: &str) {
        let p = self.root().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
    }

    pub fn mkdir(&self, path: &str) {
        std::fs::create_dir_all(self.root().join(path.trim_start_matches('/'))).unwrap();
    }

    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.root().join(path.trim_start_matches('/'))).unwrap()
    }

    fn sysctl(&self, key: &str, value: &str) {
        self.write(
            &format!("/proc/sys/{}", key.replace('.', "/")),
            &format!("{value}\n"),
        );
    }

    /// What every stock host has: untuned sysctls, small limits, `always` huge pages.
    fn stock(&self, kernel: &str, cpus: usize, threads_per_core: usize) {
        self.sysctl("kernel.osrelease", kernel);
        for (k, v) in [
            ("fs.file-max", "3243894"),
            ("fs.nr_open", "1048576"),
            ("net.core.somaxconn", "4096"),
            ("net.ipv4.tcp_max_syn_backlog", "1024"),
            ("net.core.netdev_max_backlog", "1000"),
            ("net.ipv4.ip_local_port_range", "32768\t60999"),
            ("net.core.rmem_default", "212992"),
            ("net.core.wmem_default", "212992"),
            ("net.core.rmem_max", "212992"),
            ("net.core.wmem_max", "212992"),
            ("net.ipv4.tcp_rmem", "4096\t131072\t6291456"),
            ("net.ipv4.tcp_wmem", "4096\t16384\t4194304"),
            ("net.ipv4.tcp_tw_reuse", "2"),
            ("net.netfilter.nf_conntrack_max", "65536"),
        ] {
            self.sysctl(k, v);
        }
        self.write(
            "/proc/self/limits",
            "Limit                     Soft Limit           Hard Limit           Units     \n\
             Max cpu time              unlimited            unlimited            seconds   \n\
             Max open files            1024                 524288               files     \n\
             Max locked memory         65536                65536                bytes     \n",
        );
        self.write(
            "/proc/self/status",
            "Name:\tiris-tune\nUid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n",
        );
        self.write(
            "/sys/kernel/mm/transparent_hugepage/enabled",
            "[always] madvise never\n",
        );
        self.write(
            "/sys/kernel/mm/transparent_hugepage/defrag",
            "always defer defer+madvise [madvise] never\n",
        );
        let cores = cpus / threads_per_core;
        self.write(
            "/sys/devices/system/cpu/online",
            &format!("0-{}\n", cpus - 1),
        );
        for cpu in 0..cpus {
            let base = format!("/sys/devices/system/cpu/cpu{cpu}");
            let core = cpu % cores;
            let siblings: Vec<String> = (0..threads_per_core)
                .map(|t| (core + t * cores).to_string())
                .collect();
            self.write(&format!("{base}/topology/core_id"), &format!("{core}\n"));
            self.write(&format!("{base}/topology/physical_package_id"), "0\n");
            self.write(
                &format!("{base}/topology/thread_siblings_list"),
                &format!("{}\n", siblings.join(",")),
            );
        }
        self.write(
            "/sys/devices/system/node/node0/cpulist",
            &format!("0-{}\n", cpus - 1),
        );
        self.write("/proc/cpuinfo", "processor\t: 0\ncpu MHz\t\t: 3500.000\n");
        // A loopback interface without a device: not a NIC.
        self.mkdir("/sys/class/net/lo/queues/rx-0");
        self.write("/proc/1/comm", "systemd\n");
    }

    /// An ENA interface with `queues` queue pairs; IRQs start at 26, all CPUs allowed.
    fn ena(&self, queues: usize, cpus: usize) {
        let mut interrupts = String::from("           CPU0       CPU1\n");
        interrupts.push_str("  24:          1          0  IO-APIC   5-edge      ACPI:Ged\n");
        interrupts.push_str(
            "  25:          0          0  PCI-MSIX-0000:00:05.0   0-edge      ena-mgmnt@pci:0000:00:05.0\n",
        );
        self.write("/sys/class/net/eth0/device/numa_node", "0\n");
        self.mkdir("/sys/class/net/eth0/device/msi_irqs/25");
        for q in 0..queues {
            let irq = 26 + q;
            self.mkdir(&format!("/sys/class/net/eth0/queues/rx-{q}"));
            self.mkdir(&format!("/sys/class/net/eth0/queues/tx-{q}"));
            self.mkdir(&format!("/sys/class/net/eth0/device/msi_irqs/{irq}"));
            interrupts.push_str(&format!(
                "  {irq}:       1000       2000  PCI-MSIX-0000:00:05.0   {}-edge      eth0-Tx-Rx-{q}\n",
                q + 1
            ));
        }
        interrupts.push_str("NMI:          0          0   Non-maskable interrupts\n");
        self.write("/proc/interrupts", &interrupts);
        for irq in 24..26 + queues {
            self.write(
                &format!("/proc/irq/{irq}/smp_affinity_list"),
                &format!("0-{}\n", cpus - 1),
            );
        }
    }

    /// A stock c6i.4xlarge as it boots, made to look like bare metal (cpufreq exposed, so the
    /// governor is checked too): 16 CPUs = 8 cores x 2, one node, ENA with 8 queues,
    /// Linux 5.10, conntrack loaded.
    pub fn c6i_4xlarge() -> Self {
        let f = Self::empty();
        f.stock("5.10.205-195.807.amzn2.x86_64", 16, 2);
        f.write("/sys/devices/virtual/dmi/id/product_name", "c6i.4xlarge\n");
        for cpu in 0..16 {
            let base = format!("/sys/devices/system/cpu/cpu{cpu}/cpufreq");
            f.write(&format!("{base}/scaling_governor"), "powersave\n");
            f.write(
                &format!("{base}/scaling_available_governors"),
                "performance powersave\n",
            );
            f.write(&format!("{base}/scaling_cur_freq"), "3500000\n");
            f.write(&format!("{base}/cpuinfo_max_freq"), "3500000\n");
            f.write(&format!("{base}/scaling_max_freq"), "3500000\n");
        }
        f.write(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            "kvm-clock\n",
        );
        f.write(
            "/sys/devices/system/clocksource/clocksource0/available_clocksource",
            "kvm-clock tsc hpet acpi_pm \n",
        );
        f.ena(8, 16);
        f
    }

    /// A stock i3.4xlarge (Xen): 16 CPUs = 8 cores x 2, two NVMe instance-store disks with
    /// mq-deadline, one mounted without noatime, xen clock source, DMI says "HVM domU".
    pub fn i3_4xlarge() -> Self {
        let f = Self::empty();
        f.stock("6.1.66-91.160.amzn2023.x86_64", 16, 2);
        f.write("/proc/sys/kernel/io_uring_disabled", "0\n");
        f.write("/sys/devices/virtual/dmi/id/product_name", "HVM domU\n");
        f.write(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            "xen\n",
        );
        f.write(
            "/sys/devices/system/clocksource/clocksource0/available_clocksource",
            "xen tsc hpet acpi_pm \n",
        );
        for d in ["nvme0n1", "nvme1n1"] {
            f.write(
                &format!("/sys/block/{d}/device/model"),
                "Amazon EC2 NVMe Instance Storage        \n",
            );
            f.write(
                &format!("/sys/block/{d}/queue/scheduler"),
                "[mq-deadline] kyber none\n",
            );
        }
        f.write("/sys/block/xvda/queue/scheduler", "[mq-deadline] none\n");
        f.write(
            "/proc/mounts",
            "/dev/xvda1 / xfs rw,noatime,attr2 0 0\n\
             /dev/nvme0n1 /data xfs rw,relatime,attr2 0 0\n",
        );
        f.ena(8, 16);
        f
    }
}

/// Runs the built `iris-tune` with `args`.
pub fn iris_tune(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_iris-tune"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `iris-tune --root <fixture> args...`.
pub fn iris_tune_in(f: &Fixture, args: &[&str]) -> Output {
    let root = f.root().to_str().unwrap().to_owned();
    let mut all = vec!["--root", root.as_str()];
    all.extend_from_slice(args);
    iris_tune(&all)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every file under `dir` with its bytes.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// The JSON findings of a `check --json` run, by name.
pub fn findings(o: &Output) -> BTreeMap<String, serde_json::Value> {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)));
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_owned(), f.clone()))
        .collect()
}

pub fn severity(fs: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    fs.get(name)
        .unwrap_or_else(|| panic!("no finding {name}: {:?}", fs.keys().collect::<Vec<_>>()))
        ["severity"]
        .as_str()
        .unwrap()
        .to_owned()
}
