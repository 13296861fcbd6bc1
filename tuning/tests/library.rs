//! The library API `iris-edge` uses at startup, against the real machine and fixture trees.

mod common;

use common::Fixture;
use iris_tuning::{
    startup_checks, CheckContext, CollectOptions, Finding, Host, ProfileSet, Root, Severity,
    StartupContext,
};

#[test]
fn startup_checks_on_this_machine() {
    let findings = startup_checks(&StartupContext {
        shards: 2,
        io_memory_bytes: 512 << 10,
        ring_depth: 128,
    });
    let get = |name: &str| -> &Finding {
        findings
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no {name} in {findings:?}"))
    };
    for name in ["kernel", "io_uring", "memlock", "nofile"] {
        let f = get(name);
        assert!(!f.current.is_empty() && f.current != "unknown", "{f:?}");
        assert!(!f.why.is_empty());
    }
    // Probed live: the ring is set up, whatever the verdict.
    assert_ne!(get("io_uring").current, "not probed");
    // The edge refuses to start only on these two; on this machine (Linux 6.18, 8 MiB memlock,
    // 2 shards) neither is critical.
    assert_ne!(
        get("io_uring").severity,
        Severity::Critical,
        "{:?}",
        get("io_uring")
    );
    assert_ne!(
        get("memlock").severity,
        Severity::Critical,
        "{:?}",
        get("memlock")
    );
    let json = serde_json::to_value(get("memlock")).unwrap();
    assert!(json["severity"].is_string());
    iris_tuning::log_findings(&findings);
    iris_tuning::log_findings(&findings);
}

#[test]
fn too_many_shards_for_memlock_is_critical_at_startup_unless_cap_ipc_lock() {
    let f = Fixture::c6i_4xlarge();
    f.write(
        "/proc/self/limits",
        "Max locked memory         8388608              8388608              bytes     \n",
    );
    let open = || {
        Host::open(
            Root::new(f.root()),
            &ProfileSet::builtin().unwrap(),
            None,
            CollectOptions::default(),
        )
        .unwrap()
    };
    // What iris-edge passes for 14 shards, judged inside the edge's own process.
    let ctx = CheckContext {
        shards: Some(14),
        this_process: true,
        ..CheckContext::for_plan()
    };
    let memlock = |h: &Host| {
        h.check(&ctx)
            .into_iter()
            .find(|f| f.name == "memlock")
            .unwrap()
    };
    let m = memlock(&open());
    assert_eq!(m.severity, Severity::Critical, "{m:?}");
    assert!(m.why.contains("holds only 5 shard(s)"), "{m:?}");
    f.write(
        "/proc/self/status",
        "Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n",
    );
    assert_eq!(memlock(&open()).severity, Severity::Ok);
}
