//! Durability: SIGTERM drains (exit 0, connections closed, `/health` 503 while draining) and a
//! restart on the same data directory delivers everything; kill -9 after the commit window
//! loses nothing; message ids stay unique across restarts.

use std::collections::HashSet;
use std::time::Duration;

use iris_tests::{number_of, numbered, wait_until, Server, ServerOpts};

#[test]
fn sigterm_drains_and_restart_delivers_everything() {
    let mut s = Server::with_shards(2);
    let mut a = s.login("st-sender");
    a.send_many("st-offline", (0..500).map(|i| numbered(i, 48)));
    a.sync();
    let mut idle = s.login("st-idle");

    let status = s.sigterm();
    assert!(status.success(), "SIGTERM exit status {status} (want 0)");
    let rest = idle.expect_closed();
    assert!(rest.is_empty(), "idle client got {rest:?} before the close");
    drop(a);

    s.restart();
    // Ids after the restart must not collide with stored ones.
    let mut a = s.login("st-sender");
    a.send_many("st-offline", (500..700).map(|i| numbered(i, 48)));
    a.sync();
    std::thread::sleep(Duration::from_millis(100));
    let mut r = s.login("st-offline");
    let msgs = r.recv_msgs(700, true);
    let mut ids = HashSet::new();
    for (i, (id, p)) in msgs.iter().enumerate() {
        assert_eq!(p, &numbered(i, 48), "message {i} (got #{})", number_of(p));
        assert!(
            ids.insert(id.clone()),
            "id {:?} used twice",
            iris_tests::Bytes(id)
        );
    }
    r.expect_silence(Duration::from_millis(300));
    r.sync();
    drop(r);
    std::thread::sleep(Duration::from_millis(100));
    // All acked: nothing after another clean restart.
    assert!(s.sigterm().success());
    s.restart();
    let mut r = s.login("st-offline");
    r.expect_silence(Duration::from_millis(500));
}

#[test]
fn kill9_after_commit_window_loses_nothing() {
    let mut s = Server::with_shards(2);
    let n = 1000;
    let mut a = s.login("k9-sender");
    a.send_many("k9-offline", (0..n).map(|i| numbered(i, 64)));
    a.sync();
    std::thread::sleep(Duration::from_millis(200));
    s.kill9();
    drop(a);
    s.restart();
    let mut r = s.login("k9-offline");
    let msgs = r.recv_msgs(n, true);
    for (i, (_, p)) in msgs.iter().enumerate() {
        assert_eq!(
            p,
            &numbered(i, 64),
            "message {i} after kill -9 (got #{})",
            number_of(p)
        );
    }
    r.expect_silence(Duration::from_millis(300));
    // And the restarted server works normally.
    let mut a = s.login("k9-sender");
    a.send("k9-offline", b"after restart");
    assert_eq!(r.recv_acked(), b"after restart");
}

/// Messages that are only in the hot log (`hot_log_secs` long enough that none moves into the
/// LSM), some of them acked late (after the commit window, so deleted by hot log records): a
/// kill -9 and a restart deliver exactly the unacked ones, and the log is replayed away.
#[test]
fn kill9_with_messages_only_in_the_hot_log_loses_nothing_and_redelivers_no_acked_one() {
    let mut s = Server::start(ServerOpts::shards(2).config("[store]\nhot_log_secs = 3600\n"));
    let n = 300;
    let mut a = s.login("hk-sender");
    a.send_many("hk-offline", (0..n).map(|i| numbered(i, 64)));
    a.sync();
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_core_hot_logged_total")
            == n as u64),
        "hot logged: {}",
        s.metric("iris_core_hot_logged_total")
    );
    // The first 100 are drained at a login and acked well after the commit window.
    let mut r = s.login("hk-offline");
    let first = r.recv_msgs(n, false);
    std::thread::sleep(Duration::from_millis(50));
    for (id, _) in &first[..100] {
        r.ack(id);
    }
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_core_acks_of_hot_total")
            == 100),
        "acks of hot messages: {}",
        s.metric("iris_core_acks_of_hot_total")
    );
    // Give the acks' delete records their commit window.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.metric("iris_core_hot_moved_total"), 0);
    s.kill9();
    drop((a, r));
    s.restart();
    let hot_files = std::fs::read_dir(s.data_dir().join("store").join("hot"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(hot_files, 0, "the hot log was replayed into the store");
    let mut r = s.login("hk-offline");
    let msgs = r.recv_msgs(n - 100, true);
    for (i, (_, p)) in msgs.iter().enumerate() {
        assert_eq!(number_of(p), i + 100, "message {i} after kill -9");
    }
    r.expect_silence(Duration::from_millis(300));
}

#[test]
fn sigterm_reports_draining_while_output_is_flushed() {
    // A silent reader keeps output queued, so the drain lasts drain_timeout_ms.
    let mut s = Server::start(
        ServerOpts::shards(2).config("drain_timeout_ms = 3000\nmax_output_bytes = 16777216\n"),
    );
    let silent = s.login("dr-silent");
    let mut a = s.login("dr-sender");
    a.send_many("dr-silent", (0..30_000).map(|i| numbered(i, 100)));
    a.sync();
    assert_eq!(s.admin_get("/health"), (200, "ok\n".to_owned()));
    s.signal(libc::SIGTERM);
    let mut seen = (0, String::new());
    let draining = wait_until(Duration::from_secs(2), || {
        seen = s.admin_get("/health");
        seen.0 == 503
    });
    assert!(draining, "/health during the drain: {seen:?}");
    assert_eq!(seen.1.trim(), "draining");
    let status = s.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");
    drop(silent);
    // Whatever the silent reader did not ack is delivered after a restart.
    s.restart();
    let mut r = s.login("dr-silent");
    let msgs = r.recv_msgs(30_000, true);
    for (i, (_, p)) in msgs.iter().enumerate() {
        assert_eq!(number_of(p), i, "message {i}");
    }
}
