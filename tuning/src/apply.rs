//! `apply`: turns the checks' targets into actions (config files to write, kernel settings to
//! set) and either performs them under a [`Root`] or prints them as a shell script (`--dry-run`).
//!
//! Persistent settings go to files: a sysctl.d file, a limits.d file and a systemd drop-in for
//! `iris-edge.service` (`LimitNOFILE`, `LimitMEMLOCK`). Runtime settings (sysctls, IRQ affinity,
//! CPU governor, transparent huge pages, clock source, NVMe scheduler) are written to `/proc`
//! and `/sys`. Every value is "at least the target, never less than now", so applying twice
//! writes the same files and changes nothing the second time. In a fixture root the process
//! limits in `proc/self/limits` are rewritten too, standing for a restarted `iris-edge`.

use crate::checks::{sysctl_rules, Targets};
use crate::error::TuningError;
use crate::facts::{sysctl_path, HostFacts};
use crate::limits::{human_bytes, rewrite_proc_limits, show_limit, UNLIMITED};
use crate::profile::Profile;
use crate::root::{format_cpulist, Root};

/// The sysctl.d file `apply` writes.
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/60-iris-edge.conf";
/// The limits.d file (PAM sessions: shells, `su`, `sudo`).
pub const LIMITS_FILE: &str = "/etc/security/limits.d/60-iris-edge.conf";
/// The systemd drop-in for `iris-edge.service`.
pub const SYSTEMD_DROPIN: &str = "/etc/systemd/system/iris-edge.service.d/60-iris-tune.conf";

/// One step of `apply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write a whole configuration file.
    WriteFile { path: String, contents: String },
    /// Write one runtime kernel setting.
    SetValue {
        path: String,
        value: String,
        what: String,
    },
    /// New process limits: take effect when `iris-edge` (re)starts; in a fixture root,
    /// `proc/self/limits` is rewritten.
    SetLimits { nofile: u64, memlock: u64 },
    /// Something `apply` does not do itself.
    Note(String),
}

/// Everything `apply` would do on this host.
pub fn actions(facts: &HostFacts, profile: &Profile, targets: &Targets) -> Vec<Action> {
    let mut out = Vec::new();
    let mut runtime = Vec::new();

    // Sysctls: every managed key the kernel has, at its fixed value.
    let mut conf = String::from(
        "# Written by `iris-tune apply` for the iris edge; rewritten on every apply.\n\
         # Values are at least the profile's targets and never lower than they were.\n",
    );
    conf.push_str(&format!("# Profile: {}\n", profile.name));
    for rule in sysctl_rules(profile, targets) {
        let Some(current) = facts.sysctls.get(rule.key) else {
            continue;
        };
        let Some(value) = rule.fixed(current) else {
            continue;
        };
        conf.push_str(&format!("{} = {}\n", rule.key, value));
        if &value != current {
            runtime.push(Action::SetValue {
                path: sysctl_path(rule.key),
                value,
                what: format!("{} (was {current})", rule.key),
            });
        }
    }
    out.push(Action::WriteFile {
        path: SYSCTL_FILE.to_owned(),
        contents: conf,
    });
    out.append(&mut runtime);

    // Limits.
    let hard = |r: Option<crate::limits::Rlim>| r.map(|r| r.hard);
    let nofile = hard(facts.limits.nofile)
        .filter(|&h| h != UNLIMITED)
        .unwrap_or(0)
        .max(targets.nofile);
    let memlock = match hard(facts.limits.memlock) {
        Some(UNLIMITED) => UNLIMITED,
        h => h.unwrap_or(0).max(targets.memlock_target),
    };
    let memlock_kib = if memlock == UNLIMITED {
        "unlimited".to_owned()
    } else {
        memlock.div_ceil(1024).to_string()
    };
    let mut limits = format!(
        "# Written by `iris-tune apply` for the iris edge (profile {}).\n\
         # nofile: {} planned sockets + headroom. memlock (KiB): {} shard(s) x {} of io_uring\n\
         # rings and registered buffers, doubled (the kernel charges the user, not the process).\n",
        profile.name,
        targets.connections,
        targets.shards,
        human_bytes(targets.memlock_per_shard)
    );
    for who in ["*", "root"] {
        for kind in ["soft", "hard"] {
            limits.push_str(&format!("{who:<5} {kind} nofile  {nofile}\n"));
            limits.push_str(&format!("{who:<5} {kind} memlock {memlock_kib}\n"));
        }
    }
    out.push(Action::WriteFile {
        path: LIMITS_FILE.to_owned(),
        contents: limits,
    });
    out.push(Action::WriteFile {
        path: SYSTEMD_DROPIN.to_owned(),
        contents: format!(
            "# Written by `iris-tune apply` (profile {}).\n[Service]\nLimitNOFILE={}\n\
             LimitMEMLOCK={}\n",
            profile.name,
            nofile,
            if memlock == UNLIMITED {
                "infinity".to_owned()
            } else {
                memlock.to_string()
            }
        ),
    });
    let now = (
        facts.limits.nofile.map(|r| (r.soft, r.hard)),
        facts.limits.memlock.map(|r| (r.soft, r.hard)),
    );
    if now != (Some((nofile, nofile)), Some((memlock, memlock))) {
        out.push(Action::SetLimits { nofile, memlock });
    }

    // NIC IRQs onto the housekeeping CPUs.
    if !targets.irq_cpus.is_empty() {
        let list = format_cpulist(&targets.irq_cpus);
        for nic in &facts.nics {
            for irq in &nic.irqs {
                if irq.affinity.as_deref() != Some(targets.irq_cpus.as_slice()) {
                    out.push(Action::SetValue {
                        path: format!("/proc/irq/{}/smp_affinity_list", irq.irq),
                        value: list.clone(),
                        what: format!("IRQ {} ({}) to CPUs {list}", irq.irq, irq.name),
                    });
                }
            }
        }
        if facts.irqbalance_running {
            out.push(Action::Note(format!(
                "irqbalance is running and will move the IRQs back: `systemctl disable --now \
                 irqbalance`, or set IRQBALANCE_BANNED_CPULIST={} in /etc/default/irqbalance",
                format_cpulist(&targets.shard_cpus)
            )));
        }
    }

    // CPU governor.
    for cpu in &facts.cpus {
        let can = cpu.governors_available.is_empty()
            || cpu.governors_available.iter().any(|g| g == "performance");
        if cpu.governor.as_deref().is_some_and(|g| g != "performance") && can {
            out.push(Action::SetValue {
                path: format!(
                    "/sys/devices/system/cpu/cpu{}/cpufreq/scaling_governor",
                    cpu.id
                ),
                value: "performance".to_owned(),
                what: format!("cpu{} governor performance", cpu.id),
            });
        }
    }

    // Transparent huge pages.
    for (file, now) in [
        ("enabled", &facts.thp_enabled),
        ("defrag", &facts.thp_defrag),
    ] {
        if now.as_deref() == Some("always") {
            out.push(Action::SetValue {
                path: format!("/sys/kernel/mm/transparent_hugepage/{file}"),
                value: "madvise".to_owned(),
                what: format!("transparent_hugepage {file} madvise"),
            });
        }
    }

    // Clock source.
    if facts.clocksource.as_deref().is_some_and(|c| c != "tsc")
        && facts.clocksources_available.iter().any(|c| c == "tsc")
    {
        out.push(Action::SetValue {
            path: "/sys/devices/system/clocksource/clocksource0/current_clocksource".to_owned(),
            value: "tsc".to_owned(),
            what: "clocksource tsc".to_owned(),
        });
        out.push(Action::Note(
            "keep tsc after a reboot: add `clocksource=tsc tsc=reliable` to the kernel command \
             line"
                .to_owned(),
        ));
    }

    // NVMe instance storage.
    for dev in facts.nvme.iter().filter(|d| !d.is_ebs()) {
        let can = dev.schedulers_available.is_empty()
            || dev.schedulers_available.iter().any(|s| s == "none");
        if dev.scheduler.as_deref().is_some_and(|s| s != "none") && can {
            out.push(Action::SetValue {
                path: format!("/sys/block/{}/queue/scheduler", dev.name),
                value: "none".to_owned(),
                what: format!("{} scheduler none", dev.name),
            });
        }
        for m in facts.mounts.iter().filter(|m| {
            m.device
                .strip_prefix("/dev/")
                .is_some_and(|n| n.starts_with(&dev.name))
                && !m.options.iter().any(|o| o == "noatime")
        }) {
            out.push(Action::Note(format!(
                "{} on {} lacks noatime: add it in /etc/fstab and `mount -o remount {}`",
                m.device, m.mountpoint, m.mountpoint
            )));
        }
    }

    // NIC queues.
    if let Some(want) = profile.nic_queues {
        for nic in facts.nics.iter().filter(|n| n.rx_queues < want) {
            out.push(Action::Note(format!(
                "{} uses {} queues, the profile expects {want}: `ethtool -L {} combined {want}`",
                nic.name, nic.rx_queues, nic.name
            )));
        }
    }

    if out
        .iter()
        .any(|a| matches!(a, Action::SetValue { path, .. } if !path.starts_with("/proc/sys/")))
    {
        out.push(Action::Note(
            "IRQ affinity, governor, huge page, clock source and scheduler settings do not \
             survive a reboot: run `iris-tune apply` from a boot-time unit"
                .to_owned(),
        ));
    }
    out
}

/// What `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// One line per action.
    pub lines: Vec<String>,
    /// Actions that failed (also in `lines`); the others were still carried out.
    pub failed: Vec<String>,
}

/// Performs the actions under `root`. A failing action is reported and the rest still run.
pub fn apply(root: &Root, actions: &[Action]) -> ApplyReport {
    let mut report = ApplyReport::default();
    let fail = |report: &mut ApplyReport, e: TuningError| {
        report.lines.push(format!("FAILED    {e}"));
        report.failed.push(e.to_string());
    };
    for action in actions {
        match action {
            Action::WriteFile { path, contents } => match root.write_file(path, contents) {
                Ok(changed) => report.lines.push(format!(
                    "{} {}",
                    if changed { "wrote    " } else { "unchanged" },
                    root.path(path).display()
                )),
                Err(e) => fail(&mut report, e),
            },
            Action::SetValue { path, value, what } => match root.set_value(path, value) {
                Ok(()) => report.lines.push(format!("set       {what}")),
                Err(e) => fail(&mut report, e),
            },
            Action::SetLimits { nofile, memlock } => {
                if root.is_live() {
                    report.lines.push(format!(
                        "limits    nofile {} memlock {}: take effect when iris-edge restarts \
                         (systemctl daemon-reload && systemctl restart iris-edge)",
                        show_limit(*nofile),
                        human_bytes(*memlock)
                    ));
                } else if let Some(text) = root.read("/proc/self/limits") {
                    let text = rewrite_proc_limits(&text, *nofile, *memlock);
                    match root.write_file("/proc/self/limits", &text) {
                        Ok(_) => report.lines.push(format!(
                            "limits    nofile {} memlock {} (fixture proc/self/limits)",
                            show_limit(*nofile),
                            human_bytes(*memlock)
                        )),
                        Err(e) => fail(&mut report, e),
                    }
                }
            }
            Action::Note(note) => report.lines.push(format!("note      {note}")),
        }
    }
    report
}

/// The actions as a POSIX shell script, paths under `root`.
pub fn script(root: &Root, actions: &[Action]) -> String {
    let mut out =
        String::from("#!/bin/sh\n# iris-tune apply --dry-run: run as root to apply.\nset -eu\n");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut dropin = false;
    for action in actions {
        match action {
            Action::WriteFile { path, contents } => {
                let p = root.path(path).display().to_string();
                let dir = root
                    .path(path)
                    .parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                out.push_str(&format!(
                    "\nmkdir -p {}\ncat > {} <<'IRIS_TUNE_EOF'\n{}IRIS_TUNE_EOF\n",
                    quote(&dir),
                    quote(&p),
                    contents
                ));
                dropin |= path == SYSTEMD_DROPIN;
            }
            Action::SetValue { path, value, what } => {
                out.push_str(&format!(
                    "\n# {what}\nprintf '%s\\n' {} > {}\n",
                    quote(value),
                    quote(&root.path(path).display().to_string())
                ));
            }
            Action::SetLimits { nofile, memlock } => {
                out.push_str(&format!(
                    "\n# Process limits nofile {} memlock {} apply when iris-edge restarts.\n",
                    show_limit(*nofile),
                    human_bytes(*memlock)
                ));
            }
            Action::Note(note) => out.push_str(&format!("\n# NOTE: {note}\n")),
        }
    }
    if dropin && root.is_live() {
        out.push_str("\nsystemctl daemon-reload\n# then: systemctl restart iris-edge\n");
    }
    out
}
