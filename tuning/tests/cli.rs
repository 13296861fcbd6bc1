//! The `iris-tune` binary against fixture trees (`--root DIR`): check severities, JSON and the
//! table, exit codes, plan fragments, apply idempotence, dry runs, profiles files.

mod common;

use common::{findings, iris_tune, iris_tune_in, severity, snapshot, stdout, Fixture};

#[test]
fn check_json_reports_a_stock_c6i_and_exits_1() {
    let f = Fixture::c6i_4xlarge();
    let out = iris_tune_in(&f, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profile"], "c6i.4xlarge");
    assert_eq!(v["profile_selection"], "dmi");
    assert_eq!(v["critical"], true);
    assert!(v["summary"]["critical"].as_u64().unwrap() >= 3);
    for f in v["findings"].as_array().unwrap() {
        for key in ["name", "current", "wanted", "severity", "why"] {
            assert!(f[key].is_string(), "{key} in {f}");
        }
    }
    let fs = findings(&out);
    for (name, want) in [
        ("profile", "ok"),
        ("kernel", "info"),
        ("io_uring_disabled", "ok"),
        ("io_uring", "info"),
        // 64 KiB: glommio refuses to start an executor.
        ("memlock", "critical"),
        // soft 1024 against 600,000 planned sockets.
        ("nofile", "critical"),
        ("fs.file-max", "ok"),
        ("fs.nr_open", "ok"),
        ("net.core.somaxconn", "warning"),
        ("net.ipv4.tcp_max_syn_backlog", "warning"),
        ("net.ipv4.ip_local_port_range", "info"),
        ("net.ipv4.tcp_rmem", "info"),
        ("net.ipv4.tcp_tw_reuse", "info"),
        ("net.netfilter.nf_conntrack_max", "critical"),
        ("transparent_hugepage", "warning"),
        ("cpu_governor", "warning"),
        ("cpu_frequency", "ok"),
        ("smt", "info"),
        ("numa", "ok"),
        ("nic_queues:eth0", "ok"),
        ("irq_affinity:eth0", "warning"),
        ("irqbalance", "ok"),
        ("clocksource", "info"),
        // Not a live root: the wake-up probe does not run.
        ("wakeup", "info"),
    ] {
        assert_eq!(severity(&fs, name), want, "{name}: {}", fs[name]);
    }
    assert!(!fs.contains_key("nic_queues:lo"));
    assert!(!fs.keys().any(|k| k.starts_with("nvme")));
    // ENA management IRQ (via msi_irqs) and the 8 queue IRQs.
    assert!(fs["irq_affinity:eth0"]["current"]
        .as_str()
        .unwrap()
        .starts_with("9 of 9 IRQs may run on shard CPUs: IRQ 25-33 on CPUs 0-15"));
    assert_eq!(v["plan"]["shards"], 14);
}

#[test]
fn check_table_is_the_default_output() {
    let f = Fixture::c6i_4xlarge();
    let out = iris_tune_in(&f, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("SEVERITY  CHECK"), "{text}");
    assert!(text.contains("CRITICAL  memlock"), "{text}");
    assert!(text.contains("why: glommio refuses"), "{text}");
    assert!(text.trim_end().ends_with("ok"), "{text}");
    let verbose = stdout(&iris_tune_in(&f, &["check", "-v"]));
    assert!(verbose.matches("why:").count() > text.matches("why:").count());
}

#[test]
fn check_after_apply_is_clean_and_exits_0() {
    let f = Fixture::c6i_4xlarge();
    let out = iris_tune_in(&f, &["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = iris_tune_in(&f, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let fs = findings(&out);
    for name in [
        "memlock",
        "nofile",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.core.netdev_max_backlog",
        "net.ipv4.ip_local_port_range",
        "net.core.rmem_max",
        "net.core.wmem_max",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_tw_reuse",
        "net.netfilter.nf_conntrack_max",
        "transparent_hugepage",
        "cpu_governor",
        "irq_affinity:eth0",
        "clocksource",
    ] {
        assert_eq!(severity(&fs, name), "ok", "{name}: {}", fs[name]);
    }
    // What is left is only what apply cannot change on this host.
    for (name, f) in &fs {
        let sev = f["severity"].as_str().unwrap();
        assert!(sev == "ok" || sev == "info", "{name}: {f}");
    }
    // The files apply wrote.
    let sysctl = f.read("/etc/sysctl.d/60-iris-edge.conf");
    assert!(sysctl.contains("net.core.somaxconn = 65535\n"), "{sysctl}");
    assert!(sysctl.contains("net.ipv4.ip_local_port_range = 1024 65535\n"));
    assert!(sysctl.contains("net.netfilter.nf_conntrack_max = 750000\n"));
    // Never lowered: file-max was already above the target.
    assert!(sysctl.contains("fs.file-max = 3243894\n"));
    let dropin = f.read("/etc/systemd/system/iris-edge.service.d/60-iris-tune.conf");
    assert!(
        dropin.contains("[Service]\nLimitNOFILE=1048576\nLimitMEMLOCK="),
        "{dropin}"
    );
    let limits = f.read("/etc/security/limits.d/60-iris-edge.conf");
    assert!(limits.contains("*     hard nofile  1048576"), "{limits}");
    assert_eq!(
        f.read("/proc/irq/30/smp_affinity_list").trim(),
        "0,8",
        "IRQs on the housekeeping core's two threads"
    );
    assert_eq!(
        f.read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "always [madvise] never\n"
    );
    assert_eq!(
        f.read("/sys/devices/system/cpu/cpu3/cpufreq/scaling_governor")
            .trim(),
        "performance"
    );
}

#[test]
fn apply_twice_writes_the_same_files_and_changes_nothing_more() {
    let f = Fixture::c6i_4xlarge();
    let first = iris_tune_in(&f, &["apply"]);
    assert_eq!(first.status.code(), Some(0));
    assert!(stdout(&first).contains("set       net.core.somaxconn"));
    let after_first = snapshot(f.root());
    let second = iris_tune_in(&f, &["apply"]);
    assert_eq!(second.status.code(), Some(0));
    assert_eq!(snapshot(f.root()), after_first);
    let log = stdout(&second);
    assert!(!log.contains("set "), "{log}");
    assert!(!log.contains("wrote"), "{log}");
    assert_eq!(log.matches("unchanged").count(), 3, "{log}");
}

#[test]
fn dry_run_prints_a_script_and_writes_nothing() {
    let f = Fixture::c6i_4xlarge();
    let before = snapshot(f.root());
    let out = iris_tune_in(&f, &["apply", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(snapshot(f.root()), before);
    let script = stdout(&out);
    assert!(script.starts_with("#!/bin/sh\n"), "{script}");
    assert!(script.contains("set -eu"));
    let root = f.root().display().to_string();
    assert!(script.contains(&format!("cat > '{root}/etc/sysctl.d/60-iris-edge.conf'")));
    assert!(script.contains(&format!(
        "printf '%s\\n' '65535' > '{root}/proc/sys/net/core/somaxconn'"
    )));
    assert!(script.contains("LimitMEMLOCK="));
    assert!(script.contains("smp_affinity_list"));
    assert!(script.contains("'performance'"));
}

#[test]
fn plan_prints_a_toml_fragment_with_shards_and_cpus() {
    let f = Fixture::c6i_4xlarge();
    let out = iris_tune_in(&f, &["plan"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(text.starts_with("# iris-edge config fragment"), "{text}");
    let value: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(value.len(), 2, "only shards and cpus: {value:?}");
    assert_eq!(value["shards"].as_integer(), Some(14));
    let cpus: Vec<i64> = value["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_integer().unwrap())
        .collect();
    assert_eq!(cpus.len(), 14);
    assert!(
        !cpus.contains(&0) && !cpus.contains(&8),
        "core 0 kept back: {cpus:?}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&iris_tune_in(&f, &["plan", "--json"]).stdout).unwrap();
    assert_eq!(json["irq_cpus"], serde_json::json!([0, 8]));
    assert_eq!(json["producer_cpus"], serde_json::json!([0, 8]));
    assert_eq!(json["shards"], 14);
}

#[test]
fn i3_profile_checks_nvme_and_xen_clock() {
    let f = Fixture::i3_4xlarge();
    let out = iris_tune_in(&f, &["--profile", "i3.4xlarge", "check", "--json"]);
    let fs = findings(&out);
    assert_eq!(severity(&fs, "profile"), "ok");
    // 6.1 runs the edge; the batch wait (batch_wait_us) needs 6.12.
    assert_eq!(severity(&fs, "kernel"), "info");
    assert_eq!(severity(&fs, "nvme_scheduler:nvme0n1"), "warning");
    assert_eq!(severity(&fs, "nvme_scheduler:nvme1n1"), "warning");
    assert_eq!(severity(&fs, "mount:/data"), "warning");
    assert_eq!(severity(&fs, "clocksource"), "warning");
    assert!(!fs.contains_key("mount:/"));
    assert!(!fs.contains_key("cpu_governor") || severity(&fs, "cpu_governor") == "info");

    // Without --profile, "HVM domU" matches nothing: generic, no NVMe expectation, but the
    // instance storage is still checked.
    let generic = findings(&iris_tune_in(&f, &["check", "--json"]));
    assert_eq!(severity(&generic, "profile"), "info");
    assert!(generic.contains_key("nvme_scheduler:nvme0n1"));

    let applied = iris_tune_in(&f, &["--profile", "i3.4xlarge", "apply"]);
    let log = stdout(&applied);
    assert!(log.contains("lacks noatime"), "{log}");
    let fs = findings(&iris_tune_in(
        &f,
        &["--profile", "i3.4xlarge", "check", "--json"],
    ));
    assert_eq!(severity(&fs, "nvme_scheduler:nvme0n1"), "ok");
    assert_eq!(severity(&fs, "clocksource"), "ok");
    // apply cannot remount: still a warning, with the fix in the reason.
    assert_eq!(severity(&fs, "mount:/data"), "warning");
    assert_eq!(
        f.read("/sys/block/nvme0n1/queue/scheduler"),
        "mq-deadline kyber [none]\n"
    );
}

#[test]
fn nvme_profile_on_a_host_without_instance_storage_warns() {
    let f = Fixture::c6i_4xlarge();
    let fs = findings(&iris_tune_in(
        &f,
        &["--profile", "i3.4xlarge", "check", "--json"],
    ));
    assert_eq!(severity(&fs, "nvme"), "warning");
}

#[test]
fn wrong_profile_shape_is_a_warning() {
    let f = Fixture::c6i_4xlarge();
    let fs = findings(&iris_tune_in(
        &f,
        &["--profile", "c6i.2xlarge", "check", "--json"],
    ));
    assert_eq!(severity(&fs, "profile"), "warning");
}

#[test]
fn operator_profiles_file_extends_the_builtin_set() {
    let f = Fixture::c6i_4xlarge();
    f.write(
        "/etc/iris/profiles.toml",
        "[profiles.\"c6i.4xlarge\"]\nhousekeeping_cores = 2\nconnections = 100000\n\
         [profiles.\"lab\"]\ndescription = \"lab box\"\nvcpus = 16\n",
    );
    let file = f.root().join("etc/iris/profiles.toml");
    let file = file.to_str().unwrap();
    let out = iris_tune_in(&f, &["--profiles", file, "plan"]);
    let value: toml::Table = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["shards"].as_integer(), Some(12));
    let list = stdout(&iris_tune(&["--profiles", file, "profiles"]));
    assert!(list.contains("lab              lab box"), "{list}");
    assert!(list.contains("c6i.4xlarge"));
    assert!(list.starts_with("generic"));
}

#[test]
fn errors_exit_2() {
    let f = Fixture::c6i_4xlarge();
    let out = iris_tune_in(&f, &["--profile", "c6i.nano", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown profile \"c6i.nano\""), "{err}");
    assert!(err.contains("c6i.4xlarge"), "{err}");
    f.write("/bad.toml", "[profiles.x]\nvcpu = 1\n");
    let bad = f.root().join("bad.toml");
    let out = iris_tune_in(&f, &["--profiles", bad.to_str().unwrap(), "check"]);
    assert_eq!(out.status.code(), Some(2));
    let out = iris_tune(&["--root", "/nonexistent/iris", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let out = iris_tune_in(&f, &["check", "--edge-config", "/nonexistent.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn memlock_severity_follows_the_shard_count() {
    let f = Fixture::c6i_4xlarge();
    f.write(
        "/proc/self/limits",
        "Max open files            1048576              1048576              files     \n\
         Max locked memory         8388608              8388608              bytes     \n",
    );
    let sev = |shards: &str| {
        severity(
            &findings(&iris_tune_in(&f, &["check", "--json", "--shards", shards])),
            "memlock",
        )
    };
    assert_eq!(sev("2"), "ok");
    assert_eq!(sev("5"), "info");
    assert_eq!(sev("6"), "critical");
    // A smaller io_memory makes room for more shards.
    let fs = findings(&iris_tune_in(
        &f,
        &[
            "check",
            "--json",
            "--shards",
            "6",
            "--io-memory-bytes",
            "262144",
        ],
    ));
    assert_ne!(severity(&fs, "memlock"), "critical");
}

#[test]
fn edge_config_cpus_drive_the_irq_check() {
    let f = Fixture::c6i_4xlarge();
    iris_tune_in(&f, &["apply"]);
    // Shards on every CPU but 1: the IRQs now pinned to 0,8 sit on shard CPUs.
    f.write(
        "/etc/iris/edge.toml",
        "listen = \"0.0.0.0:8085\"\nshards = 15\ncpus = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]\n",
    );
    let cfg = f.root().join("etc/iris/edge.toml");
    let fs = findings(&iris_tune_in(
        &f,
        &["check", "--json", "--edge-config", cfg.to_str().unwrap()],
    ));
    assert_eq!(severity(&fs, "irq_affinity:eth0"), "warning");
    assert!(fs["memlock"]["wanted"]
        .as_str()
        .unwrap()
        .contains("15 shard(s)"));
}

#[test]
fn an_empty_root_is_all_unknown_and_does_not_crash() {
    let f = Fixture::empty();
    let out = iris_tune_in(&f, &["check", "--json"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let fs = findings(&out);
    assert_eq!(fs["kernel"]["current"], "unknown");
    assert_eq!(fs["memlock"]["current"], "unknown");
    assert_eq!(fs["nofile"]["current"], "unknown");
    assert_eq!(fs["net.core.somaxconn"]["current"], "unknown");
    let plan: toml::Table = toml::from_str(&stdout(&iris_tune_in(&f, &["plan"]))).unwrap();
    assert_eq!(plan["shards"].as_integer(), Some(1));
    // apply on nothing: writes its files, sets nothing, does not fail.
    assert_eq!(iris_tune_in(&f, &["apply"]).status.code(), Some(0));
}

#[test]
fn check_runs_on_this_machine() {
    let out = iris_tune(&["check", "--json"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let fs = findings(&out);
    for name in ["kernel", "io_uring", "memlock", "nofile"] {
        assert!(fs.contains_key(name), "{name}");
        assert_ne!(fs[name]["current"], "unknown", "{name}");
    }
    // Probed live: measured, or unknown with a reason (fewer than two CPUs allowed).
    assert_ne!(fs["wakeup"]["current"], "not probed");
    // Read-only on the real root: the dry run prints and changes nothing.
    let out = iris_tune(&["apply", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("/etc/sysctl.d/60-iris-edge.conf"));
}

#[test]
fn a_haltpoll_guest_without_polling_is_told_how_to_turn_it_on() {
    let f = Fixture::c6i_4xlarge();
    let fs = findings(&iris_tune_in(&f, &["check", "--json"]));
    assert_eq!(severity(&fs, "halt_poll"), "ok", "{}", fs["halt_poll"]);
    f.write(
        "/sys/devices/system/cpu/cpuidle/current_driver",
        "haltpoll\n",
    );
    f.write("/sys/module/haltpoll/parameters/guest_halt_poll_ns", "0\n");
    let fs = findings(&iris_tune_in(&f, &["check", "--json"]));
    // Advice only: wake-ups are not measured under a fixture root.
    assert_eq!(severity(&fs, "halt_poll"), "info", "{}", fs["halt_poll"]);
    let why = fs["halt_poll"]["why"].as_str().unwrap();
    assert!(
        why.contains("echo 200000 > /sys/module/haltpoll/parameters/guest_halt_poll_ns"),
        "{why}"
    );
    f.write(
        "/sys/module/haltpoll/parameters/guest_halt_poll_ns",
        "200000\n",
    );
    let fs = findings(&iris_tune_in(&f, &["check", "--json"]));
    assert_eq!(severity(&fs, "halt_poll"), "ok", "{}", fs["halt_poll"]);
    assert_eq!(fs["halt_poll"]["current"], "haltpoll, polling up to 200 µs");
}
