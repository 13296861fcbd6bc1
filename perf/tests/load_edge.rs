//! `iris-load` against a real `iris-edge`: short runs of every scenario; counts must match
//! (nothing lost, duplicated or reordered), the JSON must parse and the histograms be sane.

mod common;

use common::{assert_sane_latency, run_load, Edge};

#[test]
fn pairs_open_loop_delivers_everything_in_order() {
    let edge = Edge::start(1);
    let target = edge.client.to_string();
    let pid = edge.pid.to_string();
    let r = run_load(&[
        "pairs",
        "--target",
        &target,
        "--pairs",
        "4",
        "--rate",
        "400",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--size",
        "64",
        "--server-pid",
        &pid,
    ]);
    let sent = r.get("sent").unwrap();
    // 400/s for 1.5 s, give or take one message per pair at the edges of the schedule.
    assert!((590.0..=610.0).contains(&sent), "sent {sent}");
    assert_eq!(r.get("delivered"), Some(sent));
    assert_eq!(r.totals.sent as f64, sent);
    assert_eq!(r.totals.delivered as f64, sent);
    assert_eq!(r.lost, 0);
    assert_eq!((r.totals.duplicates, r.totals.reordered), (0, 0));
    assert_eq!(
        (r.totals.errors, r.totals.unexpected),
        (0, 0),
        "{:?}",
        r.notes
    );
    assert_sane_latency(&r);
    // Only messages intended in the measured second are in the histogram.
    let n = r.latency.unwrap().count as f64;
    assert!((390.0..=410.0).contains(&n), "samples {n}");
    let s = r.server.clone().expect("server sampled");
    assert_eq!(s.pid, edge.pid);
    assert!(s.mem_after.rss_kib > 0);
    assert!(r.command.iter().any(|a| a == "pairs"));
    assert!(!r.timeseries.is_empty());
    assert_eq!(r.get("offered_per_s"), Some(400.0));
}

#[test]
fn pairs_max_with_idle_connections() {
    let edge = Edge::start(2);
    let target = edge.client.to_string();
    let r = run_load(&[
        "pairs",
        "--target",
        &target,
        "--pairs",
        "3",
        "--max",
        "--window",
        "8",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--idle",
        "50",
    ]);
    assert_eq!(r.get("connections"), Some(56.0));
    let sent = r.get("sent").unwrap();
    assert!(sent > 0.0);
    assert_eq!(r.get("delivered"), Some(sent));
    assert_eq!(r.lost, 0);
    assert_eq!(
        (r.totals.duplicates, r.totals.reordered, r.totals.errors),
        (0, 0, 0)
    );
    assert!(r.get("delivered_per_s").unwrap() > 0.0);
    assert_sane_latency(&r);
}

#[test]
fn connect_holds_connections_and_measures_memory() {
    let edge = Edge::start(1);
    let target = edge.client.to_string();
    let pid = edge.pid.to_string();
    let r = run_load(&[
        "connect",
        "--target",
        &target,
        "--conns",
        "300",
        "--rate",
        "3000",
        "--hold",
        "1.2",
        "--settle",
        "0.3",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(r.get("connections_open"), Some(300.0));
    assert_eq!(r.get("still_open"), Some(300.0));
    assert!(r.get("connects_per_s").unwrap() > 0.0);
    assert!(r.get("server_rss_per_conn_bytes").is_some());
    // The edge's CPU while it only holds them (from --settle to the end of the hold): an edge
    // that spins or polls per connection would show here.
    let idle = r.get("server_idle_cpu_cores").expect("idle CPU reported");
    assert!((0.0..0.5).contains(&idle), "idle edge used {idle} cores");
    assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
    assert_eq!(r.latency.unwrap().count, 300);
    assert_sane_latency(&r);
}

#[test]
fn offline_drain_gets_every_message_in_order() {
    let edge = Edge::start(1);
    let target = edge.client.to_string();
    let r = run_load(&[
        "offline",
        "--target",
        &target,
        "--users",
        "10",
        "--messages",
        "2003",
        "--senders",
        "3",
        "--settle",
        "0.2",
        "--timeout",
        "30",
    ]);
    assert_eq!(r.get("sent"), Some(2003.0));
    assert_eq!(r.get("delivered"), Some(2003.0));
    assert_eq!(r.lost, 0);
    assert_eq!(
        (r.totals.duplicates, r.totals.reordered, r.totals.errors),
        (0, 0, 0)
    );
    assert!(r.get("drain_per_s").unwrap() > 0.0);
    assert_eq!(r.latency.unwrap().count, 2003);
    assert_sane_latency(&r);
}

#[test]
fn logins_churn_both_modes() {
    logins_churn(&[]);
}

/// The same churn from four loopback source addresses (`--source-ips`), as `scripts/bench.sh`
/// runs its logins step.
#[test]
fn logins_churn_from_several_source_addresses() {
    logins_churn(&["--source-ips", "4"]);
}

fn logins_churn(extra: &[&str]) {
    let edge = Edge::start(1);
    let target = edge.client.to_string();
    for relogin in [false, true] {
        let mut extra = extra.to_vec();
        if relogin {
            extra.push("--relogin");
        }
        let r = churn(&target, &extra);
        assert!(r.get("logins_per_s").unwrap() > 0.0);
        assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
        assert_sane_latency(&r);
    }
}

/// A short `logins` run (4 loops, 20 users, 0.5 s) against `target`, with `extra` arguments.
fn churn(target: &str, extra: &[&str]) -> iris_perf::load::Report {
    let mut args = vec![
        "logins",
        "--target",
        target,
        "--conns",
        "4",
        "--users",
        "20",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
    ];
    args.extend_from_slice(extra);
    run_load(&args)
}

/// With `--jwt-secret` every login carries a token signed with the edge's `[auth]` secret: the
/// churn (v1 and v2) and a `pairs` run log in against an edge with auth on; a wrong secret
/// logs nobody in.
#[test]
fn logins_with_tokens_against_an_edge_with_auth_on() {
    const SECRET: &str = "load-test-secret-of-at-least-32-bytes";
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!("[auth]\nenabled = true\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let edge = Edge::start_with(
        1,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--listen-v2",
            "127.0.0.1:0",
        ],
    );
    let v1 = edge.client.to_string();
    let v2 = edge.v2.expect("v2 address").to_string();
    let signed = |target: &str, protocol: &str, secret: &str| {
        churn(target, &["--protocol", protocol, "--jwt-secret", secret])
    };
    for (target, protocol) in [(&v1, "v1"), (&v2, "v2")] {
        let r = signed(target, protocol, SECRET);
        assert!(r.get("logins_per_s").unwrap() > 0.0, "{protocol}");
        assert_eq!(r.totals.errors, 0, "{protocol}: {:?}", r.notes);
        assert_sane_latency(&r);
        let r = signed(target, protocol, "another-secret-of-at-least-32-bytes!");
        assert_eq!(r.get("logins_per_s"), Some(0.0), "{protocol}: wrong secret");
        assert!(r.totals.errors > 0, "{protocol}: wrong secret");
    }
    let r = run_load(&[
        "pairs",
        "--target",
        &v1,
        "--pairs",
        "2",
        "--rate",
        "200",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--jwt-secret",
        SECRET,
    ]);
    assert!(r.get("sent").unwrap() > 0.0);
    assert_eq!(r.get("delivered"), r.get("sent"));
    assert_eq!(r.lost, 0);
    assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
}
