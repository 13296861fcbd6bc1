//! Bounds of the embedded store, against a real `iris-edge` process over real sockets and a
//! real data directory:
//!
//! - a recipient's quota (`[store] max_messages_per_user`): the excess is refused to its sender
//!   with `0xFE recipient_inbox_full`, the connection stays open, nothing else is affected;
//! - the message lifetime (`[store] message_ttl_secs`): expired messages are never delivered
//!   and are deleted;
//! - a full disk (a file-size rlimit: writes fail with `EFBIG`) fails the messages of the failed
//!   commits (`0xFE store_unavailable`), not the server: live delivery, status and drains go on,
//!   and the store recovers by itself once writes work again, losing nothing it had stored;
//! - acks of ids that were never stored write nothing.

use std::time::{Duration, Instant};

use iris_tests::{wait_until, Frame, Server, ServerOpts};

/// Every frame that arrives within `d` (reading stops at the first quiet `d`).
fn frames_within(c: &mut iris_tests::Client, d: Duration) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = c.recv_within(d) {
        out.push(f);
    }
    out
}

fn errors(frames: &[Frame]) -> Vec<&str> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Error(r) => Some(r.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_full_inbox_refuses_more_messages_to_that_recipient_only() {
    let s = Server::start(ServerOpts::shards(2).config("[store]\nmax_messages_per_user = 5\n"));
    let mut a = s.login("quota-a");
    for i in 0..8 {
        a.send("quota-bob", format!("b{i}").as_bytes());
    }
    a.send("quota-carol", b"c0");
    let got = frames_within(&mut a, Duration::from_millis(500));
    let errs = errors(&got);
    assert!(
        !errs.is_empty() && errs.iter().all(|e| *e == "recipient_inbox_full"),
        "the sender is told: {got:?}"
    );
    assert_eq!(s.metric("iris_core_refused_over_quota_total"), 3);
    assert!(s.metric("iris_edge_sends_refused_total") >= 1);
    // The connection stays open and usable.
    assert_eq!(a.status("quota-carol").0, 0);

    let mut bob = s.login("quota-bob");
    let msgs = bob.recv_msgs(5, true);
    let payloads: Vec<_> = msgs.iter().map(|(_, p)| p.clone()).collect();
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("b{i}").into_bytes()).collect();
    assert_eq!(payloads, want, "the first five are stored, in order");
    bob.flush_acks();
    bob.expect_silence(Duration::from_millis(300));
    let mut carol = s.login("quota-carol");
    assert_eq!(carol.recv_acked(), b"c0");

    // Acked: room again, and the next message is stored and delivered with no error.
    bob.sync();
    a.send("quota-bob", b"b-after");
    assert_eq!(bob.recv_acked(), b"b-after");
    a.expect_silence(Duration::from_millis(300));
    assert_eq!(s.metric("iris_core_refused_over_quota_total"), 3);
}

#[test]
fn expired_messages_are_never_delivered_and_are_deleted() {
    let s = Server::start(ServerOpts::shards(2).config("[store]\nmessage_ttl_secs = 2\n"));
    let mut a = s.login("ttl-a");
    for i in 0..3 {
        a.send("ttl-bob", format!("old{i}").as_bytes());
    }
    a.sync();
    assert!(
        wait_until(Duration::from_secs(10), || s
            .metric("iris_core_expired_deleted_total")
            == 3),
        "the sweep deletes them: {}",
        s.metric("iris_core_expired_deleted_total")
    );
    // Well inside its 2 s (a login takes milliseconds).
    a.send("ttl-bob", b"fresh");
    a.sync();
    let mut bob = s.login("ttl-bob");
    assert_eq!(bob.recv_acked(), b"fresh");
    bob.flush_acks();
    bob.expect_silence(Duration::from_millis(300));

    // A user who logs in after the TTL gets nothing, and the drain deletes what it skipped.
    let mut c = s.login("ttl-c");
    c.send("ttl-dan", b"late");
    c.sync();
    std::thread::sleep(Duration::from_millis(2200));
    let mut dan = s.login("ttl-dan");
    dan.expect_silence(Duration::from_millis(300));
    assert!(wait_until(Duration::from_secs(5), || s
        .metric("iris_core_expired_deleted_total")
        == 4));
}

/// Sends one message and waits until the core has committed it or failed it: true if stored.
fn send_committed(s: &Server, a: &mut iris_tests::Client, to: &str, payload: &[u8]) -> bool {
    let stored = s.metric("iris_core_stored_total");
    let failed = s.metric("iris_core_failed_messages_total");
    a.send(to, payload);
    assert!(
        wait_until(Duration::from_secs(10), || {
            s.metric("iris_core_stored_total") + s.metric("iris_core_failed_messages_total")
                > stored + failed
        }),
        "the message was neither stored nor failed"
    );
    s.metric("iris_core_stored_total") > stored
}

/// A 1 MiB file-size limit set on the running edge: soon no write into the store's journal
/// succeeds (`EFBIG`), as on a full disk. The hot tier is off: the limit is per file, so each
/// new hot log file would take another 1 MiB (which is right, and not a full disk); its own
/// fallback to the LSM is tested in `iris_core::embedded`.
#[test]
fn a_full_disk_fails_the_messages_not_the_server_and_recovers() {
    let mut s = Server::start(ServerOpts::shards(2).config("[store]\nhot_log_secs = 0\n"));
    s.set_fsize_limit(Some(1 << 20));
    let mut a = s.login("disk-a");
    let mut live = s.login("disk-live");
    // Incompressible (the journal may compress).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let payload: Vec<u8> = (0..16 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // Fill until a commit fails (each send waits for its commit: ids stay in order).
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while send_committed(&s, &mut a, "disk-bob", &payload) {
        sent += 1;
        assert!(Instant::now() < deadline, "no write failed within 60 s");
        assert!(
            sent < 1000,
            "1000 messages of 16 KiB stored under a 1 MiB limit"
        );
    }
    let stored = s.metric("iris_core_stored_total");
    assert_eq!(stored, sent);
    assert!(stored > 0, "some messages fit before the limit");
    let got = frames_within(&mut a, Duration::from_millis(300));
    assert_eq!(errors(&got), vec!["store_unavailable"], "{got:?}");
    s.assert_running();

    // While writes fail: more sends fail the same way, live delivery and status go on, the
    // stored messages drain.
    a.send("disk-live", b"live while full");
    let (_, p) = live.recv_msg();
    assert_eq!(p, b"live while full");
    assert_eq!(a.status("disk-live").0, 1);
    let mut bob = s.login("disk-bob");
    let drained = bob.recv_msgs(stored as usize, false);
    assert!(drained.iter().all(|(_, p)| *p == payload));
    bob.expect_silence(Duration::from_millis(300));
    drop(bob);
    a.send("disk-carol", &payload);
    let got = frames_within(&mut a, Duration::from_secs(3));
    assert_eq!(errors(&got), vec!["store_unavailable"], "{got:?}");
    s.assert_running();
    assert!(s.metric("iris_core_store_reopens_total") >= 1);

    // Space returns: the store recovers by itself.
    s.set_fsize_limit(None);
    assert!(
        wait_until(Duration::from_secs(15), || send_committed(
            &s,
            &mut a,
            "disk-carol",
            b"after recovery"
        )),
        "stores work again: {}",
        s.log_tail(20)
    );
    eprintln!(
        "full disk: {stored} messages of 16 KiB stored under the limit, {} failed, {} store \
         errors, {} reopens",
        s.metric("iris_core_failed_messages_total"),
        s.metric("iris_core_store_errors_total"),
        s.metric("iris_core_store_reopens_total")
    );
    let mut carol = s.login("disk-carol");
    assert_eq!(carol.recv_acked(), b"after recovery");
    drop(carol);

    // Nothing stored before the failure is lost, even across kill -9.
    s.kill9();
    s.restart();
    let mut bob = s.login("disk-bob");
    let again = bob.recv_msgs(stored as usize, true);
    assert_eq!(again.len() as u64, stored);
    bob.flush_acks();
    bob.expect_silence(Duration::from_millis(300));
}

#[test]
fn acks_of_ids_never_stored_write_nothing() {
    let s = Server::with_shards(2);
    let mut a = s.login("absent-a");
    // Stored (b is offline), then delivered and acked: two commits.
    a.send("absent-b", b"one");
    a.sync();
    assert!(wait_until(Duration::from_secs(5), || s
        .metric("iris_core_stored_total")
        == 1));
    let mut b = s.login("absent-b");
    let (id, _) = b.recv_msg();
    b.ack(&id);
    b.sync();
    assert!(wait_until(Duration::from_secs(5), || s
        .metric("iris_core_commits_total")
        >= 2
        && s.metric("iris_core_pending_ops") == 0));
    let commits = s.metric("iris_core_commits_total");
    let not_stored = s.metric("iris_core_acks_not_stored_total");
    // Acks of ids minted now (plausible, not in the future) that were never delivered: the
    // same id again (already deleted) and neighbours of it.
    let base = u64::from_str_radix(std::str::from_utf8(&id).unwrap(), 16).unwrap();
    let mut bytes = Vec::new();
    for i in 0..500u64 {
        bytes.extend(iris_tests::wire::ack(
            format!("{:016x}", base.wrapping_sub(i + 1)).as_bytes(),
        ));
    }
    bytes.extend(iris_tests::wire::ack(&id));
    b.write(&bytes);
    b.sync();
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_core_acks_not_stored_total")
            == not_stored + 501),
        "{}",
        s.metric("iris_core_acks_not_stored_total")
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        s.metric("iris_core_commits_total"),
        commits,
        "no commit (tombstone, fsync) for acks of ids not stored"
    );
}
