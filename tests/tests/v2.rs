//! Protocol v2 (docs/PROTOCOL-v2.md) against a real `iris-edge` serving it with
//! `--listen-v2`: HELLO, the sent tick (SEND_ACK only once durable, a resend acknowledged with
//! the first id and delivered once, also across kill -9), DELIVER with its sender, batched
//! ACKs, receipts, typing, status, prekeys, keepalive, errors and the SEND rate limit, and
//! v1 <-> v2 interoperation both ways, live and through the offline drain. The v2 side is a
//! raw socket speaking the bytes `iris-wire` encodes, so every frame on the wire is checked.

use std::time::{Duration, Instant};

use iris_tests::v2::V2;
use iris_tests::{Frame, Server, ServerOpts};
use iris_wire::v2::{
    encode_client, ClientFrame, ErrorCode, LimitedAction, MsgKind, ReceiptKind, ServerFrame,
};

fn v2_server(config: Option<&str>) -> Server {
    let mut opts = ServerOpts::shards(2).with_v2();
    if let Some(c) = config {
        opts = opts.config(c);
    }
    Server::start(opts)
}

#[test]
fn hello_ok_announces_the_limits_and_messages_get_the_sent_tick() {
    let server = v2_server(None);
    let (mut alice, ok) = V2::hello(&server, "alice");
    match ok {
        ServerFrame::HelloOk {
            version,
            max_frame_bytes,
            ping_interval_ms,
            send_rate_per_sec,
            send_burst,
            server_time_unix_ms,
            ..
        } => {
            assert_eq!(version, 2);
            assert_eq!(max_frame_bytes, (1 << 20) + 512);
            assert_eq!(ping_interval_ms, 30_000);
            assert_eq!((send_rate_per_sec, send_burst), (1_000, 2_000));
            assert!(server_time_unix_ms.abs_diff(iris_tests::unix_ms()) < 5_000);
        }
        other => panic!("{other:?}"),
    }
    let (mut bob, _) = V2::hello(&server, "bob");
    alice.send(41, "bob", b"hello bob");
    let (client, id) = alice.send_ack();
    assert_eq!(client, 41);
    let (got, sender, kind, payload) = bob.deliver();
    assert_eq!(
        (got, sender.as_slice(), kind, payload.as_slice()),
        (id, &b"alice"[..], MsgKind::Plain, &b"hello bob"[..])
    );
    // Acked in one frame with an id nobody minted: the message is gone, nothing else breaks.
    bob.write(&ClientFrame::Ack { ids: vec![id, 1] });
    close_seen(&server, bob);
    let (mut bob, _) = V2::hello(&server, "bob");
    assert_eq!(bob.recv_within(Duration::from_millis(500)), None);
    assert_eq!(server.metric("iris_edge_v2_send_acks_total"), 1);
}

#[test]
fn v1_and_v2_talk_both_ways_live_and_through_the_drain() {
    let server = v2_server(None);
    // v2 -> offline v1: drained at the v1 login as a RELIABLE_MSG with the same id.
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(1, "carol", b"to carol offline");
    let (_, id1) = alice.send_ack();
    let mut carol = server.login("carol");
    let (id, payload) = carol.recv_msg();
    assert_eq!(payload, b"to carol offline");
    assert_eq!(
        iris_tests::id_value(&id),
        id1,
        "v1 shows the v2 id as its hex text"
    );
    carol.ack(&id);
    // v2 -> online v1, live.
    alice.send(2, "carol", b"to carol live");
    let (_, id2) = alice.send_ack();
    let (id, payload) = carol.recv_msg();
    assert_eq!(
        (iris_tests::id_value(&id), payload.as_slice()),
        (id2, &b"to carol live"[..])
    );
    carol.ack(&id);
    // v1 -> online v2, live, with its sender.
    carol.send("alice", b"from carol live");
    let (_, sender, kind, payload) = alice.deliver();
    assert_eq!(
        (sender.as_slice(), kind, payload.as_slice()),
        (&b"carol"[..], MsgKind::Plain, &b"from carol live"[..])
    );
    // v1 -> offline v2: drained after HELLO, with its sender.
    carol.send("dave", b"from carol to dave");
    std::thread::sleep(Duration::from_millis(50));
    let (mut dave, _) = V2::hello(&server, "dave");
    let (_, sender, _, payload) = dave.deliver();
    assert_eq!(
        (sender.as_slice(), payload.as_slice()),
        (&b"carol"[..], &b"from carol to dave"[..])
    );
    // A v1 read receipt reaches the v2 sender as RECEIPT(read) naming the id.
    carol.write(&iris_tests::wire::read_receipt(
        format!("{id2:016x}").as_bytes(),
        b"alice",
    ));
    match alice.recv() {
        ServerFrame::Receipt {
            kind, reader, ids, ..
        } => assert_eq!(
            (kind, reader.as_slice(), ids),
            (ReceiptKind::Read, &b"carol"[..], vec![id2])
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_resend_is_acknowledged_with_the_first_id_and_delivered_once() {
    let server = v2_server(None);
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(7, "bob", b"once");
    let (_, first) = alice.send_ack();
    // The same client id again, on a new connection (a client that did not see the ack).
    drop(alice);
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(7, "bob", b"once");
    assert_eq!(alice.send_ack(), (7, first));
    // Another sender may use the same client id: not a resend.
    let (mut eve, _) = V2::hello(&server, "eve");
    eve.send(7, "bob", b"from eve");
    let (_, other) = eve.send_ack();
    assert_ne!(other, first);
    let (mut bob, _) = V2::hello(&server, "bob");
    let mut got = vec![bob.deliver().0, bob.deliver().0];
    got.sort_unstable();
    let mut want = vec![first, other];
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(bob.recv_within(Duration::from_millis(500)), None);
    assert_eq!(server.metric("iris_edge_v2_resends_total"), 1);
}

#[test]
fn kill9_after_the_sent_tick_loses_nothing_and_a_resend_after_it_is_delivered_once() {
    let mut server = v2_server(None);
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(1, "bob", b"acked before the kill");
    let (_, acked) = alice.send_ack();
    // Sent, and the server killed before its ack could be read: the client resends it.
    alice.send(2, "bob", b"maybe stored");
    server.kill9();
    server.restart();
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(2, "bob", b"maybe stored");
    let (_, second) = alice.send_ack();
    let (mut bob, _) = V2::hello(&server, "bob");
    let a = bob.deliver();
    let b = bob.deliver();
    assert_eq!(
        (a.0, a.3.as_slice()),
        (acked, &b"acked before the kill"[..])
    );
    assert_eq!((b.0, b.3.as_slice()), (second, &b"maybe stored"[..]));
    assert_eq!(bob.recv_within(Duration::from_millis(500)), None);
}

/// A sender that sends enough for the store to keep a mark of its highest client id (learnt at
/// its 16th lookup; `core/src/store.rs`): once its records reached the store, a resend of an old
/// id, of its highest, and after a kill -9 and restart are still duplicates, and new ids are new. Fails if
/// a record's write does not raise the mark (the resend of the highest id would be stored and
/// delivered again).
#[test]
fn resends_of_a_busy_sender_are_duplicates_once_its_records_are_in_the_store() {
    let mut server = v2_server(None);
    let (mut alice, _) = V2::hello(&server, "alice");
    let mut first = std::collections::HashMap::new();
    for client in 1..=40u64 {
        alice.send(client, "bob", format!("m{client}").as_bytes());
        let (c, id) = alice.send_ack();
        assert_eq!(c, client);
        first.insert(client, id);
    }
    // The records leave the hot log for the store within `hot_log_secs` (1 s) and one more.
    std::thread::sleep(Duration::from_secs(3));
    for client in [5u64, 16, 17, 40] {
        alice.send(client, "bob", format!("m{client}").as_bytes());
        assert_eq!(
            alice.send_ack(),
            (client, first[&client]),
            "resend of {client}"
        );
    }
    alice.send(41, "bob", b"m41");
    let (_, id41) = alice.send_ack();
    assert!(!first.values().any(|&id| id == id41));
    assert_eq!(server.metric("iris_edge_v2_resends_total"), 4);
    drop(alice);
    server.kill9();
    server.restart();
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send(40, "bob", b"m40");
    assert_eq!(
        alice.send_ack(),
        (40, first[&40]),
        "resend of 40 after the kill"
    );
    alice.send(42, "bob", b"m42");
    let (_, id42) = alice.send_ack();
    assert_ne!(id42, id41);
    let (mut bob, _) = V2::hello(&server, "bob");
    let mut got = Vec::new();
    for _ in 0..42 {
        got.push(bob.deliver().3);
    }
    let want: Vec<Vec<u8>> = (1..=42).map(|c| format!("m{c}").into_bytes()).collect();
    assert_eq!(got, want, "each message once, in order");
    assert_eq!(bob.recv_within(Duration::from_millis(500)), None);
    assert_eq!(
        server.metric("iris_edge_v2_resends_total"),
        1,
        "since the restart"
    );
}

#[test]
fn hello_must_come_first_and_errors_name_their_send() {
    let server = v2_server(None);
    // Not HELLO first: ERROR hello_required, then the close.
    let mut c = V2::connect(server.v2.unwrap());
    c.write(&ClientFrame::Ping { nonce: 1 });
    let frames = c.until_closed(Duration::from_secs(5));
    assert_eq!(
        frames,
        vec![ServerFrame::error(ErrorCode::HelloRequired, 0)]
    );
    // A wrong version: refused and closed.
    let mut c = V2::connect(server.v2.unwrap());
    let mut hello = Vec::new();
    encode_client(
        &ClientFrame::Hello {
            client_name: b"x".to_vec(),
            client_version: b"1".to_vec(),
            token: b"alice".to_vec(),
            resume_after: 0,
        },
        &mut hello,
    );
    hello[5] = 3; // the version byte
    c.write_raw(&hello);
    let frames = c.until_closed(Duration::from_secs(5));
    assert_eq!(
        frames,
        vec![ServerFrame::error(ErrorCode::UnsupportedVersion, 0)]
    );
    // Unknown type: answered, skipped, the connection stays usable.
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.write_raw(&[0, 0, 0, 3, 0x7e, 1, 2]);
    assert_eq!(alice.recv(), ServerFrame::error(ErrorCode::UnknownType, 0));
    alice.write(&ClientFrame::Ping { nonce: 9 });
    assert_eq!(alice.recv(), ServerFrame::Pong { nonce: 9 });
    // A CBOR payload that is not a map: ERROR bad_payload naming the SEND, not stored.
    alice.write(&ClientFrame::Send {
        client_msg_id: 77,
        recipient: b"bob".to_vec(),
        kind: MsgKind::Cbor,
        payload: vec![0x01],
    });
    assert_eq!(alice.recv(), ServerFrame::error(ErrorCode::BadPayload, 77));
    alice.write(&ClientFrame::Ping { nonce: 10 });
    assert_eq!(alice.recv(), ServerFrame::Pong { nonce: 10 });
    // A frame over the announced maximum: ERROR frame_too_large, then the close.
    alice.write_raw(&(2u32 << 20).to_be_bytes());
    let frames = alice.until_closed(Duration::from_secs(5));
    assert_eq!(
        frames,
        vec![ServerFrame::error(ErrorCode::FrameTooLarge, 0)]
    );
}

#[test]
fn a_flooding_sender_is_rate_limited_and_its_neighbour_is_not() {
    let server = v2_server(Some("[v2]\nsend_rate_per_sec = 5\nsend_burst = 5\n"));
    let (mut flood, _) = V2::hello(&server, "flood");
    let (mut calm, _) = V2::hello(&server, "calm");
    for i in 1..=20 {
        flood.send(i, "sink", b"x");
    }
    let (mut acked, mut limited) = (0, Vec::new());
    for _ in 0..20 {
        match flood.recv() {
            ServerFrame::SendAck { .. } => acked += 1,
            ServerFrame::RateLimited {
                what,
                retry_after_ms,
                reference,
            } => {
                assert_eq!(what, LimitedAction::Send);
                assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
                limited.push(reference);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!((5..=7).contains(&acked), "{acked} acked");
    assert_eq!(acked + limited.len(), 20);
    assert!(limited.iter().all(|r| (1..=20).contains(r)));
    // The connection stays open and its neighbour is not limited.
    calm.send(1, "sink", b"y");
    assert_eq!(calm.send_ack().0, 1);
    flood.write(&ClientFrame::Ping { nonce: 3 });
    assert_eq!(flood.recv(), ServerFrame::Pong { nonce: 3 });
    assert!(server.metric("iris_edge_rate_limited_total") >= 13);
}

#[test]
fn typing_receipts_status_and_prekeys_between_v2_clients() {
    let server = v2_server(None);
    let (mut alice, _) = V2::hello(&server, "alice");
    let (mut bob, _) = V2::hello(&server, "bob");
    alice.write(&ClientFrame::Typing {
        target: b"bob".to_vec(),
        typing: true,
    });
    assert_eq!(
        bob.recv(),
        ServerFrame::Typing {
            sender: b"alice".to_vec(),
            typing: true
        }
    );
    alice.send(5, "bob", b"m");
    let (_, id) = alice.send_ack();
    let (got, ..) = bob.deliver();
    assert_eq!(got, id);
    for kind in [ReceiptKind::Delivered, ReceiptKind::Read] {
        bob.write(&ClientFrame::Receipt {
            kind,
            sender: b"alice".to_vec(),
            ids: vec![id],
        });
        match alice.recv() {
            ServerFrame::Receipt {
                kind: k,
                reader,
                ids,
                unix_ms,
            } => {
                assert_eq!((k, reader.as_slice(), ids), (kind, &b"bob"[..], vec![id]));
                assert!(unix_ms.abs_diff(iris_tests::unix_ms()) < 5_000);
            }
            other => panic!("{other:?}"),
        }
    }
    alice.write(&ClientFrame::StatusQuery {
        user: b"bob".to_vec(),
    });
    assert_eq!(
        alice.recv(),
        ServerFrame::Status {
            user: b"bob".to_vec(),
            online: true,
            last_seen_unix_secs: 0
        }
    );
    // Prekeys: a bundle uploaded is fetched with its user; an absent one is empty.
    let bundle = vec![0xa1, 0x61, b'k', 0x01]; // {"k": 1}
    bob.write(&ClientFrame::PrekeyUpload {
        bundle: bundle.clone(),
    });
    std::thread::sleep(Duration::from_millis(50));
    alice.write(&ClientFrame::PrekeyFetch {
        user: b"bob".to_vec(),
    });
    alice.write(&ClientFrame::PrekeyFetch {
        user: b"nobody".to_vec(),
    });
    assert_eq!(
        alice.recv(),
        ServerFrame::Prekeys {
            user: b"bob".to_vec(),
            bundle
        }
    );
    assert_eq!(
        alice.recv(),
        ServerFrame::Prekeys {
            user: b"nobody".to_vec(),
            bundle: Vec::new()
        }
    );
    // A v2 "delivered" receipt has no v1 form: a v1 sender does not see it, a read one it does.
    let mut carol = server.login("carol");
    carol.send("bob", b"from v1");
    let (v1id, ..) = bob.deliver();
    bob.write(&ClientFrame::Receipt {
        kind: ReceiptKind::Delivered,
        sender: b"carol".to_vec(),
        ids: vec![v1id],
    });
    bob.write(&ClientFrame::Receipt {
        kind: ReceiptKind::Read,
        sender: b"carol".to_vec(),
        ids: vec![v1id],
    });
    match carol.recv() {
        Frame::Receipt { id, reader, .. } => {
            assert_eq!(iris_tests::id_value(&id), v1id);
            assert_eq!(reader, b"bob");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_silent_client_is_pinged_then_closed() {
    let server = v2_server(Some("[v2]\nping_interval_ms = 200\n"));
    let (mut quiet, _) = V2::hello(&server, "quiet");
    match quiet.recv_within(Duration::from_secs(2)) {
        Some(ServerFrame::Ping { nonce }) => assert!(nonce >= 1),
        other => panic!("expected a PING, got {other:?}"),
    }
    let start = Instant::now();
    let frames = quiet.until_closed(Duration::from_secs(5));
    assert_eq!(
        frames.last(),
        Some(&ServerFrame::error(ErrorCode::IdleTimeout, 0)),
        "{frames:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    // One that answers (any frame counts) stays.
    let (mut chatty, _) = V2::hello(&server, "chatty");
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        if let Some(ServerFrame::Ping { nonce }) = chatty.recv_within(Duration::from_millis(100)) {
            chatty.write(&ClientFrame::Pong { nonce });
        }
    }
    chatty.write(&ClientFrame::Ping { nonce: 5 });
    let mut saw_pong = false;
    for _ in 0..4 {
        if chatty.recv_within(Duration::from_secs(1)) == Some(ServerFrame::Pong { nonce: 5 }) {
            saw_pong = true;
            break;
        }
    }
    assert!(saw_pong, "an answering client was closed");
}

#[test]
fn e2ee_messages_cross_between_v1_and_v2() {
    let server = v2_server(None);
    let header = iris_tests::cbor::map(&[("n", iris_tests::cbor::V::Bytes(b"nonce"))]);
    let ciphertext = vec![0xc7; 300];
    // v2 body of kind 2: u16 hlen | header | u32 clen | ciphertext.
    let mut body = (header.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&header);
    body.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    body.extend_from_slice(&ciphertext);
    // v2 -> v1: the v1 recipient gets the 0x24 frame naming the sender.
    let mut carol = server.login("carol");
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.write(&ClientFrame::Send {
        client_msg_id: 1,
        recipient: b"carol".to_vec(),
        kind: MsgKind::E2ee,
        payload: body.clone(),
    });
    alice.send_ack();
    let (_, payload) = carol.recv_msg();
    assert_eq!(
        payload,
        iris_tests::wire::e2ee_delivery(b"alice", &header, &ciphertext)
    );
    // v1 -> v2: DELIVER kind 2 with the v2 body and the sender in its own field.
    carol.write(&iris_tests::wire::e2ee_msg(b"alice", &header, &ciphertext));
    let (_, sender, kind, payload) = alice.deliver();
    assert_eq!(
        (sender.as_slice(), kind, payload),
        (&b"carol"[..], MsgKind::E2ee, body.clone())
    );
    // The same from the store, after a login.
    carol.write(&iris_tests::wire::e2ee_msg(b"dave", &header, &ciphertext));
    carol.sync();
    let (mut dave, _) = V2::hello(&server, "dave");
    let (_, sender, kind, payload) = dave.deliver();
    assert_eq!(
        (sender.as_slice(), kind, payload),
        (&b"carol"[..], MsgKind::E2ee, body)
    );
}

#[test]
fn a_connection_at_its_unconfirmed_bound_resumes_as_acks_come() {
    // One SEND waiting for its SEND_ACK at a time: the connection stops reading after each and
    // must be woken by the confirmation to decode the next one already buffered.
    let server = v2_server(Some("[v2]\nmax_unconfirmed_sends = 1\n"));
    let (mut alice, _) = V2::hello(&server, "alice");
    let (mut bob, _) = V2::hello(&server, "bob");
    let mut bytes = Vec::new();
    for i in 1..=20u64 {
        encode_client(
            &ClientFrame::Send {
                client_msg_id: i,
                recipient: b"bob".to_vec(),
                kind: MsgKind::Plain,
                payload: format!("m{i}").into_bytes(),
            },
            &mut bytes,
        );
    }
    alice.write_raw(&bytes);
    let acked: Vec<u64> = (0..20).map(|_| alice.send_ack().0).collect();
    assert_eq!(acked, (1..=20).collect::<Vec<u64>>());
    let got: Vec<Vec<u8>> = (0..20).map(|_| bob.deliver().3).collect();
    let want: Vec<Vec<u8>> = (1..=20).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(got, want);
}

/// The v2 body of an E2EE message (kind 2): `u16 hlen | header | u32 clen | ciphertext`.
fn e2ee_body(header: &[u8], ciphertext: &[u8]) -> Vec<u8> {
    let mut body = (header.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(header);
    body.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    body.extend_from_slice(ciphertext);
    body
}

#[test]
fn kinds_survive_the_drain_and_v1_recipients_get_the_same_bytes() {
    let server = v2_server(None);
    let cbor = iris_tests::cbor::map(&[("t", iris_tests::cbor::V::Bytes(b"typed"))]);
    let header = iris_tests::cbor::map(&[("n", iris_tests::cbor::V::Bytes(b"nonce"))]);
    let ciphertext = vec![0x5a; 40];
    let body = e2ee_body(&header, &ciphertext);
    // A plain payload that looks like an E2EE inner frame: stored as kind 0, it stays kind 0.
    let lookalike = iris_tests::wire::e2ee_delivery(b"mallory", &header, &ciphertext);
    // dave (v2) and erin (v1) are offline: every message is stored, then drained.
    let (mut alice, _) = V2::hello(&server, "alice");
    let mut carol = server.login("carol");
    for (c, to) in [(0, "dave"), (10, "erin")] {
        alice.send_kind(c + 1, to, MsgKind::Cbor, &cbor);
        alice.send_kind(c + 2, to, MsgKind::E2ee, &body);
        alice.send_kind(c + 3, to, MsgKind::Plain, &lookalike);
        for n in 1..=3 {
            assert_eq!(alice.send_ack().0, c + n);
        }
        carol.write(&iris_tests::wire::cbor_msg(to.as_bytes(), &cbor));
        carol.write(&iris_tests::wire::e2ee_msg(
            to.as_bytes(),
            &header,
            &ciphertext,
        ));
        carol.send(to, b"plain from v1");
    }
    carol.sync();
    // Restarted (a clean stop commits what is pending): the kinds come from the store on disk.
    drop(alice);
    drop(carol);
    let mut server = server;
    assert!(server.sigterm().success());
    server.restart();

    let (mut dave, _) = V2::hello(&server, "dave");
    let got: Vec<_> = (0..6)
        .map(|_| {
            let (_, sender, kind, payload) = dave.deliver();
            (String::from_utf8(sender).unwrap(), kind, payload)
        })
        .collect();
    let want = vec![
        ("alice".to_owned(), MsgKind::Cbor, cbor.clone()),
        ("alice".to_owned(), MsgKind::E2ee, body.clone()),
        ("alice".to_owned(), MsgKind::Plain, lookalike.clone()),
        ("carol".to_owned(), MsgKind::Cbor, cbor.clone()),
        ("carol".to_owned(), MsgKind::E2ee, body.clone()),
        (
            "carol".to_owned(),
            MsgKind::Plain,
            b"plain from v1".to_vec(),
        ),
    ];
    assert_eq!(got, want);

    // The v1 recipient gets exactly the bytes v1 always got: the CBOR map, the 0x24 inner
    // frame naming the sender, and the plain payloads.
    let mut erin = server.login("erin");
    let got: Vec<Vec<u8>> = erin.recv_msgs(6, true).into_iter().map(|m| m.1).collect();
    let want = vec![
        cbor.clone(),
        iris_tests::wire::e2ee_delivery(b"alice", &header, &ciphertext),
        lookalike,
        cbor,
        iris_tests::wire::e2ee_delivery(b"carol", &header, &ciphertext),
        b"plain from v1".to_vec(),
    ];
    assert_eq!(got, want);
}

/// Delivers `n` stored messages to a fresh v2 session of `user` without acking them, and
/// closes it; returns their ids in the order they were written.
fn drained_unacked(server: &Server, user: &str, resume_after: u64, n: usize) -> Vec<u64> {
    let (mut c, _) = V2::hello_resume(server, user, resume_after);
    let ids = (0..n).map(|_| c.deliver().0).collect();
    assert_eq!(c.recv_within(Duration::from_millis(300)), None);
    // Closed, and the close seen by the server before the next session starts: a HELLO that
    // overtakes the end of the last session finds no list (PROTOCOL-v2.md).
    close_seen(server, c);
    ids
}

/// Closes `conn` and waits until the server has seen the session end, and so has handed on
/// everything read before it (its acks, its resume list): a next session that overtook the
/// close could be delivered them again (at least once, PROTOCOL-v2.md).
fn close_seen(server: &Server, conn: V2) {
    let open = server.metric("iris_edge_sessions_open");
    drop(conn);
    let t0 = std::time::Instant::now();
    while server.metric("iris_edge_sessions_open") >= open {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server never saw the session end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn resume_after_acks_exactly_what_was_delivered_up_to_it() {
    let server = v2_server(None);
    let (mut alice, _) = V2::hello(&server, "alice");
    let mut sent = Vec::new();
    for n in 1..=4u64 {
        alice.send(n, "bob", format!("m{n}").as_bytes());
        sent.push(alice.send_ack().1);
    }
    // Session 1 is delivered m1..m4 and acks nothing (its acks were "lost").
    let ids = drained_unacked(&server, "bob", 0, 4);
    assert_eq!(ids, sent);
    // Meanwhile m5 is stored; bob never saw it.
    alice.send(5, "bob", b"m5");
    let m5 = alice.send_ack().1;
    // Session 2 resumes after m2: m1 and m2 are acknowledged, m3, m4 (written after m2) and
    // m5 (never delivered) come again.
    let ids = drained_unacked(&server, "bob", sent[1], 3);
    assert_eq!(ids, vec![sent[2], sent[3], m5]);
    assert_eq!(server.metric("iris_core_resume_acked_total"), 2);
    // Session 3 names an id that session 2 was never delivered (m1, acked before): nothing is
    // skipped, everything still stored comes again.
    let ids = drained_unacked(&server, "bob", sent[0], 3);
    assert_eq!(ids, vec![sent[2], sent[3], m5]);
    // Session 4 names an id it was not delivered at all (one of alice's own sends to carol):
    // nothing is skipped.
    alice.send(6, "carol", b"not bob's");
    let other = alice.send_ack().1;
    let ids = drained_unacked(&server, "bob", other, 3);
    assert_eq!(ids, vec![sent[2], sent[3], m5]);
    // Session 5 resumes after the last one it was delivered: all gone, for good.
    let ids = drained_unacked(&server, "bob", m5, 0);
    assert!(ids.is_empty());
    let (mut bob, _) = V2::hello(&server, "bob");
    assert_eq!(bob.recv_within(Duration::from_millis(500)), None);
    assert_eq!(server.metric("iris_core_resume_acked_total"), 5);
}

#[test]
fn resume_after_counts_live_deliveries_and_ignores_acked_ones() {
    let server = v2_server(None);
    let (mut bob, _) = V2::hello(&server, "bob");
    let (mut alice, _) = V2::hello(&server, "alice");
    let mut ids = Vec::new();
    for n in 1..=3u64 {
        alice.send(n, "bob", format!("live {n}").as_bytes());
        alice.send_ack();
        ids.push(bob.deliver().0);
    }
    // bob acks the first itself, then the connection dies before the other acks.
    bob.write(&ClientFrame::Ack { ids: vec![ids[0]] });
    close_seen(&server, bob);
    // Resuming after the second live message: only the third comes again.
    let got = drained_unacked(&server, "bob", ids[1], 1);
    assert_eq!(got, vec![ids[2]]);
    // A v1 login is not affected by any of it.
    let mut bob1 = server.login("bob");
    let (id, payload) = bob1.recv_msg();
    assert_eq!(
        (iris_tests::id_value(&id), payload.as_slice()),
        (ids[2], &b"live 3"[..])
    );
}

/// A store written by the build before kinds were stored (inbox values `u8 version (1) |
/// u16 len(sender) | sender | payload`, written here directly with fjall while the edge is
/// stopped) opens after the upgrade: its messages drain to a v2 recipient with the kind the
/// previous build gave them (2 for an E2EE inner frame, else 0) and to a v1 recipient as the
/// same bytes, beside a message stored after the upgrade with its kind.
#[test]
fn a_store_written_without_kinds_drains_after_the_upgrade() {
    let mut server = v2_server(None);
    assert!(server.sigterm().success());
    let header = iris_tests::cbor::map(&[("n", iris_tests::cbor::V::Bytes(b"nonce"))]);
    let ciphertext = vec![0x33; 20];
    let e2ee = iris_tests::wire::e2ee_delivery(b"carol", &header, &ciphertext);
    let cbor = iris_tests::cbor::map(&[("t", iris_tests::cbor::V::Bytes(b"old"))]);
    // Ids minted a second ago on shard 0 (see docs/PROTOCOL-v2.md "Server ids").
    let now_us = iris_tests::unix_ms() * 1000 - 1_000_000;
    let id0 = ((now_us - 1_704_067_200_000_000) / 16) << 18;
    let old = [(e2ee.clone(), id0), (cbor.clone(), id0 + (1 << 18))];
    {
        let db = fjall::Database::builder(server.data_dir().join("store"))
            .open()
            .unwrap();
        let inbox = db
            .keyspace("inbox", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        for user in [&b"dave"[..], b"erin"] {
            for (payload, id) in &old {
                let mut key = (user.len() as u16).to_be_bytes().to_vec();
                key.extend_from_slice(user);
                key.extend_from_slice(&id.to_be_bytes());
                let mut value = vec![1u8, 0, 5];
                value.extend_from_slice(b"carol");
                value.extend_from_slice(payload);
                inbox.insert(key, value).unwrap();
            }
        }
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    server.restart();
    let (mut alice, _) = V2::hello(&server, "alice");
    alice.send_kind(1, "dave", MsgKind::Cbor, &cbor);
    alice.send_ack();

    let (mut dave, _) = V2::hello(&server, "dave");
    let got: Vec<_> = (0..3)
        .map(|_| {
            let (id, sender, kind, payload) = dave.deliver();
            (id, String::from_utf8(sender).unwrap(), kind, payload)
        })
        .collect();
    assert_eq!(
        got[..2],
        [
            (
                id0,
                "carol".to_owned(),
                MsgKind::E2ee,
                e2ee_body(&header, &ciphertext)
            ),
            (
                id0 + (1 << 18),
                "carol".to_owned(),
                MsgKind::Plain,
                cbor.clone()
            ),
        ]
    );
    assert_eq!(
        (&got[2].1[..], got[2].2, &got[2].3),
        ("alice", MsgKind::Cbor, &cbor)
    );
    let mut erin = server.login("erin");
    let got = erin.recv_msgs(2, true);
    assert_eq!(
        got.iter()
            .map(|(id, p)| (iris_tests::id_value(id), p.clone()))
            .collect::<Vec<_>>(),
        vec![(id0, e2ee), (id0 + (1 << 18), cbor)]
    );
    assert_eq!(server.metric("iris_core_corrupt_skipped_total"), 0);
}
