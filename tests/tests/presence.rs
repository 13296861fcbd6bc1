//! Presence and relays: GET_STATUS (online, offline with last-seen, never seen), TYPING relays
//! (never stored), READ_RECEIPT relays.

use std::time::Duration;

use iris_tests::{unix_ms, unix_secs, wait_until, wire, Frame, Server};

#[test]
fn status_online_offline_and_last_seen() {
    let s = Server::with_shards(2);
    let mut q = s.login("watcher");

    // Never seen: exact bytes 06 | u16 len | user | 00 | u64 0.
    q.write(&wire::get_status(b"never-seen"));
    let (f, raw) = q.recv_raw();
    assert_eq!(
        raw,
        [&[0x06, 0x00, 0x0a][..], b"never-seen", &[0], &[0; 8]].concat(),
        "STATUS of a never-seen user: {f:?}"
    );

    let mut u = s.login("presence-u");
    assert!(
        wait_until(Duration::from_secs(2), || q.status("presence-u") == (1, 0)),
        "presence-u not online (1, 0) within 2 s: {:?}",
        q.status("presence-u")
    );
    assert_eq!(u.status("presence-u"), (1, 0), "own status");

    let t0 = unix_secs();
    u.shutdown();
    let mut last = (1, 0);
    assert!(
        wait_until(Duration::from_secs(2), || {
            last = q.status("presence-u");
            last.0 == 0
        }),
        "presence-u still online 2 s after disconnect: {last:?}"
    );
    let t1 = unix_secs();
    assert!(
        last.1 + 1 >= t0 && last.1 <= t1 + 1,
        "last_seen {} not within [{t0}, {t1}] (±1 s)",
        last.1
    );
    // Stays the same while offline.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.status("presence-u"), last);

    // Online again after a new login.
    let _u2 = s.login("presence-u");
    assert!(
        wait_until(Duration::from_secs(2), || q.status("presence-u") == (1, 0)),
        "presence-u not online again within 2 s"
    );
}

#[test]
fn status_across_shards() {
    // Users are owned by different shards; status is right for each whoever asks.
    let s = Server::with_shards(4);
    let mut users: Vec<_> = (0..12).map(|i| s.login(&format!("st{i}"))).collect();
    for (i, u) in users.iter_mut().enumerate() {
        let other = format!("st{}", (i + 5) % 12);
        assert!(
            wait_until(Duration::from_secs(2), || u.status(&other) == (1, 0)),
            "st{i} sees {other} offline"
        );
        assert_eq!(u.status(&format!("nobody{i}")), (0, 0));
    }
}

#[test]
fn typing_relays_exact_bytes_and_never_stored() {
    let s = Server::with_shards(2);
    let mut a = s.login("typer");
    let mut b = s.login("watched");
    a.wait_online("watched");
    a.write(&wire::typing(b"watched", true));
    assert_eq!(
        b.recv_raw().1,
        b"\x72\x00\x05typer\x01",
        "TYPING_START relay"
    );
    a.write(&wire::typing(b"watched", false));
    assert_eq!(
        b.recv_raw().1,
        b"\x72\x00\x05typer\x00",
        "TYPING_STOP relay"
    );

    // To an offline user: no error, nothing stored.
    a.write(&wire::typing(b"typing-offline", true));
    a.write(&wire::typing(b"typing-offline", false));
    a.sync();
    std::thread::sleep(Duration::from_millis(100));
    let mut off = s.login("typing-offline");
    off.expect_silence(Duration::from_millis(300));
    // Still usable.
    a.send("typing-offline", b"msg");
    assert_eq!(off.recv_acked(), b"msg");
}

#[test]
fn read_receipt_relayed_to_original_sender() {
    let s = Server::with_shards(2);
    let mut a = s.login("rr-sender");
    let mut b = s.login("rr-reader");
    a.send("rr-reader", b"please read");
    let (id, _) = b.recv_msg();
    b.wait_online("rr-sender");
    b.ack(&id);
    let before = unix_ms();
    b.write(&wire::read_receipt(&id, b"rr-sender"));
    let (f, raw) = a.recv_raw();
    let after = unix_ms();
    let mut want_prefix = vec![0x75, 0x00, 0x10];
    want_prefix.extend_from_slice(&id);
    want_prefix.extend_from_slice(&[0x00, 0x09]);
    want_prefix.extend_from_slice(b"rr-reader");
    assert_eq!(
        raw.len(),
        want_prefix.len() + 8,
        "receipt relay length: {f:?}"
    );
    assert_eq!(
        &raw[..want_prefix.len()],
        &want_prefix[..],
        "receipt relay: {f:?}"
    );
    let ms = u64::from_be_bytes(raw[want_prefix.len()..].try_into().unwrap());
    assert!(
        ms + 5000 >= before && ms <= after + 5000,
        "unix_ms {ms} not near [{before}, {after}]"
    );
    match f {
        Frame::Receipt { reader, .. } => assert_eq!(reader, b"rr-reader"),
        other => panic!("{other:?}"),
    }
    // A receipt for an offline sender is dropped silently; the reader stays connected.
    b.write(&wire::read_receipt(&id, b"rr-nobody"));
    b.sync();
}

/// PROTOCOL.md "Visibility after LOGIN_OK": once both sides have read LOGIN_OK, a typing
/// indicator, a STATUS query and a read receipt see the other user online and reach it live.
/// On a 2-shard edge the user's presence owner is often not the shard holding its socket; 30
/// fresh pairs, zero losses.
#[test]
fn login_ok_means_reachable_at_once() {
    let s = Server::with_shards(2);
    let mut lost = Vec::new();
    for i in 0..30 {
        let (na, nb) = (format!("vis-a{i}"), format!("vis-b{i}"));
        let mut a = s.login(&na);
        let mut b = s.login(&nb);
        // Right after both LOGIN_OKs: A types to B and asks B's status; B sends A a receipt.
        a.write(&wire::typing(nb.as_bytes(), true));
        a.write(&wire::get_status(nb.as_bytes()));
        b.write(&wire::read_receipt(b"00000000000000ab", na.as_bytes()));
        match b.recv_within(Duration::from_secs(1)) {
            Some(Frame::Typing { sender, on: 1 }) if sender == na.as_bytes() => {}
            other => lost.push(format!("pair {i}: typing A->B: got {other:?}")),
        }
        let mut status = None;
        let mut receipt = false;
        while let Some(f) = a.recv_within(Duration::from_secs(1)) {
            match f {
                Frame::Status { online, .. } => status = Some(online),
                Frame::Receipt { reader, .. } if reader == nb.as_bytes() => receipt = true,
                other => lost.push(format!("pair {i}: A got {other:?}")),
            }
            if status.is_some() && receipt {
                break;
            }
        }
        if status != Some(1) {
            lost.push(format!(
                "pair {i}: STATUS of B right after its LOGIN_OK: {status:?}"
            ));
        }
        if !receipt {
            lost.push(format!("pair {i}: read receipt B->A lost"));
        }
    }
    assert!(
        lost.is_empty(),
        "{} losses:\n  {}",
        lost.len(),
        lost.join("\n  ")
    );
}

/// The presence map keeps no entry for a user without a session, and the last-seen times of
/// offline users are bounded by `presence_last_seen_max` (the oldest read as never seen).
#[test]
fn presence_forgets_users_without_sessions_within_its_bound() {
    let s =
        Server::start(iris_tests::ServerOpts::shards(2).config("presence_last_seen_max = 100\n"));
    let mut q = s.login("pb-watcher");
    for i in 0..400 {
        let c = s.login(&format!("pb-{i}"));
        c.shutdown();
    }
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_edge_presence_users")
            == 1),
        "presence entries after 400 logouts: {} (only the watcher is logged in)",
        s.metric("iris_edge_presence_users")
    );
    let seen = s.metric("iris_edge_presence_last_seen_users");
    assert!(
        (50..=100).contains(&seen),
        "last-seen entries {seen}, bound 100"
    );
    // The latest logout is remembered, the first is forgotten (never seen).
    assert!(
        wait_until(Duration::from_secs(2), || q.status("pb-399").0 == 0),
        "pb-399 still online"
    );
    let (online, last) = q.status("pb-399");
    assert!(
        online == 0 && last + 5 >= unix_secs(),
        "pb-399: {online} {last}"
    );
    assert_eq!(q.status("pb-0"), (0, 0));
}
