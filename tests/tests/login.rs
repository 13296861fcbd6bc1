//! LOGIN: exact LOGIN_OK bytes, re-login on one socket, LOGIN + SEND in one write, ACK + SEND
//! coalesced in one write, and the LOGIN errors.

use std::time::Duration;

use iris_tests::{wire, Frame, Server};

#[test]
fn login_ok_is_exactly_03_login_ok() {
    let s = Server::with_shards(2);
    let mut c = s.connect();
    c.write(b"\x01first-user");
    let (f, raw) = c.recv_raw();
    assert_eq!(raw, b"\x03LOGIN_OK", "LOGIN_OK bytes (decoded as {f:?})");
    // Nothing is stored for a new user: nothing else comes.
    c.expect_silence(Duration::from_millis(200));
}

#[test]
fn relogin_on_one_socket_switches_the_user() {
    let s = Server::with_shards(2);
    let mut sender = s.login("relogin-sender");
    let mut c = s.login("relogin-old");

    sender.send("relogin-old", b"to-old-1");
    assert_eq!(c.recv_acked(), b"to-old-1");
    c.flush_acks();

    // Re-login as another user on the same socket.
    c.login("relogin-new");
    sender.send("relogin-new", b"to-new-1");
    assert_eq!(c.recv_acked(), b"to-new-1", "message to the new name");
    c.flush_acks();

    // The old name is no longer this socket: its messages go offline (stored).
    sender.send("relogin-old", b"to-old-2");
    c.expect_silence(Duration::from_millis(300));
    let offline = iris_tests::wait_until(Duration::from_secs(2), || {
        sender.status("relogin-old").0 == 0
    });
    assert!(
        offline,
        "relogin-old still online 2 s after the socket re-logged in"
    );
    assert_eq!(sender.status("relogin-new"), (1, 0), "relogin-new online");

    let mut old = s.login("relogin-old");
    assert_eq!(
        old.recv_acked(),
        b"to-old-2",
        "stored message for the old name"
    );
    old.expect_silence(Duration::from_millis(300));

    // The re-logged-in socket still works for its new name.
    sender.send("relogin-new", b"to-new-2");
    assert_eq!(c.recv_acked(), b"to-new-2");
}

#[test]
fn login_and_send_in_one_write_keeps_the_send() {
    let s = Server::with_shards(2);
    // Several pairs, so both same-shard and cross-shard cases occur.
    for i in 0..8 {
        let a_name = format!("lsw-a{i}");
        let b_name = format!("lsw-b{i}");
        let mut b = s.login(&b_name);
        let mut a = s.connect();
        let mut bytes = wire::login(a_name.as_bytes());
        bytes.extend(wire::send(
            b_name.as_bytes(),
            format!("hello {i}").as_bytes(),
        ));
        bytes.extend(wire::send(
            b_name.as_bytes(),
            format!("again {i}").as_bytes(),
        ));
        bytes.extend(wire::get_status(b_name.as_bytes()));
        a.write(&bytes);
        assert_eq!(a.recv(), Frame::LoginOk, "pair {i}: LOGIN_OK first");
        match a.recv() {
            Frame::Status { user, online, .. } => {
                assert_eq!(user, b_name.as_bytes());
                assert_eq!(online, 1, "pair {i}: {b_name} is online");
            }
            other => panic!("pair {i}: expected STATUS after the login, got {other:?}"),
        }
        assert_eq!(b.recv_acked(), format!("hello {i}").as_bytes(), "pair {i}");
        assert_eq!(b.recv_acked(), format!("again {i}").as_bytes(), "pair {i}");
        // The login name is exactly the bytes before the SEND: messages to it arrive.
        b.send(&a_name, b"reply");
        assert_eq!(a.recv_acked(), b"reply", "pair {i}: reply to {a_name:?}");
    }
}

#[test]
fn ack_coalesced_with_following_frames() {
    let s = Server::with_shards(2);
    let mut a = s.login("coal-a");
    let mut b = s.login("coal-b");

    a.send("coal-b", b"m1");
    a.send("coal-b", b"m2");
    let (id1, p1) = b.recv_msg();
    let (id2, p2) = b.recv_msg();
    assert_eq!((p1.as_slice(), p2.as_slice()), (&b"m1"[..], &b"m2"[..]));

    // ACK, ACK, SEND and GET_STATUS in one write: nothing may be swallowed by the acks.
    let mut bytes = wire::ack(&id1);
    bytes.extend(wire::ack(&id2));
    bytes.extend(wire::send(b"coal-a", b"after-acks"));
    bytes.extend(wire::get_status(b"coal-a"));
    b.write(&bytes);
    match b.recv() {
        Frame::Status { user, online, .. } => {
            assert_eq!((user.as_slice(), online), (&b"coal-a"[..], 1))
        }
        other => panic!("expected STATUS after ack+ack+send+status, got {other:?}"),
    }
    assert_eq!(a.recv_acked(), b"after-acks");
    a.flush_acks();

    // The acks counted: a new session of coal-b gets nothing again.
    b.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    let mut b2 = s.login("coal-b");
    b2.expect_silence(Duration::from_millis(500));
    a.send("coal-b", b"marker");
    assert_eq!(b2.recv_acked(), b"marker", "the marker is the next frame");
}

#[test]
fn login_too_long_and_empty_user_are_refused() {
    let s = Server::with_shards(2);
    let mut c = s.connect();
    c.write(&wire::login(&[b'x'; 257]));
    c.expect_error_and_close("login_too_long");

    // 256 bytes is the maximum and is accepted.
    let name = "y".repeat(256);
    let mut ok = s.connect();
    ok.login(&name);

    let mut c = s.connect();
    c.write(&wire::login(b":token-without-user"));
    c.expect_error_and_close("bad_login");

    // The server is still fine.
    let mut peer = s.login("after-bad-logins");
    ok.send("after-bad-logins", b"still here");
    assert_eq!(peer.recv_acked(), b"still here");
}

#[test]
fn frames_before_login_get_not_logged_in() {
    let s = Server::with_shards(2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("SEND", wire::send(b"someone", b"hi")),
        ("GET_STATUS", wire::get_status(b"someone")),
        ("ACK", wire::ack(b"0000000000000001")),
        ("TYPING", wire::typing(b"someone", true)),
        ("FETCH_PREKEYS", wire::fetch_prekeys(b"someone")),
        ("GROUP_CREATE", wire::raw(0x30, &wire::l16(b"team"))),
    ];
    for (name, bytes) in cases {
        let mut c = s.connect();
        c.write(&bytes);
        let (f, raw) = c.recv_raw();
        assert_eq!(
            raw, b"\xFE\x00\x0Dnot_logged_in",
            "{name} before LOGIN: got {f:?}"
        );
        let rest = c.expect_closed();
        assert!(rest.is_empty(), "{name}: frames after the error: {rest:?}");
    }
    let mut a = s.login("nl-a");
    let mut b = s.login("nl-b");
    a.send("nl-b", b"ok");
    assert_eq!(b.recv_acked(), b"ok");
}
