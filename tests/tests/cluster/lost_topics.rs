//! A broker restart with memory storage: every topic, record and committed offset is gone. The
//! processes' topic keepers re-create the topics; librdkafka cannot follow a re-created topic in
//! place, so the edges and cores exit with status 75 for their supervisor to restart them (or
//! librdkafka crashes them first with SIGSEGV). The test plays the supervisor: it restarts
//! whatever exited with 75 or SIGSEGV (any other exit fails the test) and checks that the region
//! serves again within a bounded time, and that a message the edge had accepted into its outbox
//! while the broker did not answer is delivered after the restart.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use iris_tests::cluster::{Cluster, ClusterOpts};
use iris_tests::{metric_value, unique, Frame};

use crate::common::*;

/// A supervisor restarts on these: 75 (asked for) or SIGSEGV (librdkafka crashed).
fn restartable(s: ExitStatus) -> bool {
    s.code() == Some(75) || s.signal() == Some(libc::SIGSEGV)
}

/// One supervisor pass: restarts every edge and core that exited for a restart; panics on any
/// other exit. Returns the restarts done (name and status).
fn supervise(c: &mut Cluster) -> Vec<String> {
    let mut done = Vec::new();
    for i in 0..c.edges.len() {
        if let Some(s) = c.edges[i].exited() {
            assert!(
                restartable(s),
                "edge {} exited ({s}); stderr:\n{}",
                i + 1,
                c.edges[i].log_tail(8000)
            );
            done.push(format!("edge {} ({s})", i + 1));
            c.edges[i].restart();
        }
    }
    for i in 0..c.cores.len() {
        if let Some(s) = c.cores[i].exited() {
            assert!(
                restartable(s),
                "core {i} exited ({s}); stderr:\n{}",
                c.cores[i].log_tail(8000)
            );
            done.push(format!("core {i} ({s})"));
            c.cores[i].restart();
        }
    }
    done
}

/// The counters that tell where a message stopped: each edge's outbox and bus frames, the
/// core's records, stores and drains.
fn counters(c: &mut Cluster) -> String {
    let mut out = String::new();
    for (i, e) in c.edges.iter().enumerate() {
        let m = e.metrics();
        for k in [
            "iris_edge_messages_accepted_total",
            "iris_edge_outbox_stalls_total",
            "iris_edge_outbox_records",
            "iris_edge_outbox_replayed_total",
            "iris_bus_frames_out_total",
            "iris_bus_frames_in_total",
        ] {
            out.push_str(&format!(
                "edge {}: {k} {:?}\n",
                i + 1,
                metric_value(&m, k, None)
            ));
        }
    }
    for (i, core) in c.cores.iter_mut().enumerate() {
        if !core.is_running() {
            out.push_str(&format!("core {i}: not running\n"));
            continue;
        }
        let m = core.metrics();
        for k in [
            "iris_core_records_total",
            "iris_core_delivers_total",
            "iris_core_drains_total",
            "iris_core_routed_total",
            "iris_core_acks_total",
        ] {
            out.push_str(&format!("core {i}: {k} {:?}\n", metric_value(&m, k, None)));
        }
    }
    out
}

#[test]
fn a_memory_broker_restart_leaves_no_edge_deaf() {
    let mut c = Cluster::start(ClusterOpts {
        edges: 2,
        cores: 1,
        partitions: 2,
        shards: 1,
        ..ClusterOpts::default()
    });
    c.wait_startup_presence();
    let a = unique("ta");
    let b = unique("tb");
    let mut ca = c.login(0, &a);
    {
        let mut cb = c.login(1, &b);
        ca.send(&b, b"before");
        let (_, p) = recv_one(&mut cb, Duration::from_secs(20), "before the restart");
        assert_eq!(p, b"before");
    }
    // B is offline; a message accepted while the broker answers nothing stays in edge 1's
    // outbox (not acknowledged).
    c.stop_broker();
    ca.send(&b, b"held");
    let t0 = Instant::now();
    while c.edge_metric(0, "iris_edge_outbox_records") < 1 {
        // Seen once under the whole suite's load, with nothing in the logs: say where it is.
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the held message is not in the outbox after 10 s:\n{}",
            counters(&mut c)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(ca);
    let restarted = Instant::now();
    c.restart_broker();

    // Supervise until every process has run unchanged for a while (three keeper periods).
    let mut restarts = Vec::new();
    let mut quiet_since = Instant::now();
    loop {
        let done = supervise(&mut c);
        if !done.is_empty() {
            quiet_since = Instant::now();
            restarts.extend(done);
        }
        if quiet_since.elapsed() >= Duration::from_secs(8)
            && restarted.elapsed() >= Duration::from_secs(10)
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(120),
            "still restarting after 120 s: {restarts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let settled = restarted.elapsed();
    eprintln!(
        "memory broker restart: settled after {} ms, restarts: {restarts:?}",
        settled.as_millis()
    );

    // Messages flow again: the held message reaches B at login (after "before" again, if B's
    // ack of it had not reached the core: at least once), a new one follows live, and a new
    // pair works both ways.
    let mut cb = c.login(1, &b);
    loop {
        match cb.recv_within(Duration::from_secs(30)) {
            Some(Frame::Reliable { id, payload }) => {
                cb.ack(&id);
                if payload == b"held" {
                    break;
                }
                assert_eq!(
                    payload, b"before",
                    "only a duplicate may come before the held message"
                );
            }
            other => panic!(
                "the held message after the restart: got {other:?} (restarts: {restarts:?});\n{}",
                counters(&mut c)
            ),
        }
    }
    let mut ca = c.login(0, &a);
    ca.send(&b, b"after");
    let (_, p) = recv_one(
        &mut cb,
        Duration::from_secs(30),
        &format!("a message sent after the restart (restarts: {restarts:?})"),
    );
    assert_eq!(p, b"after");
    let u = unique("fu");
    let v = unique("fv");
    let mut cu = c.login(0, &u);
    let mut cv = c.login(1, &v);
    cu.send(&v, b"fresh");
    assert_eq!(
        recv_one(&mut cv, Duration::from_secs(20), "fresh u → v").1,
        b"fresh"
    );
    cv.send(&u, b"back");
    assert_eq!(
        recv_one(&mut cu, Duration::from_secs(20), "fresh v → u").1,
        b"back"
    );
    c.assert_running();
}
