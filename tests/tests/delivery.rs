//! Delivery: live same-shard and cross-shard delivery (2 shards, and 4 shards on 2 cores),
//! offline storage and in-order drain at login (1,000 messages; 3,000 × 200 bytes), unacked
//! redelivery and acked never, login while messages are still arriving, and the other message
//! frames (BATCH_SEND, SEND_SEQ, CBOR_MSG) delivered like SEND.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use iris_tests::{cbor, metric_value, number_of, numbered, wire, Client, Frame, Server};

/// `pairs` pairs exchange `rounds` messages each way, all connections open at once.
fn pairs_exchange(shards: usize, pairs: usize, rounds: usize) {
    let s = Server::with_shards(shards);
    let mut a: Vec<Client> = (0..pairs).map(|i| s.login(&format!("pa{i}"))).collect();
    let mut b: Vec<Client> = (0..pairs).map(|i| s.login(&format!("pb{i}"))).collect();

    // Every shard holds some of the connections (SO_REUSEPORT spreads them).
    let m = s.metrics();
    for shard in 0..shards {
        let open = metric_value(&m, "iris_edge_connections_open", Some(shard)).unwrap_or(0);
        assert!(open > 0, "shard {shard} holds no connection:\n{m}");
    }

    for r in 0..rounds {
        for (i, c) in a.iter_mut().enumerate() {
            c.send(&format!("pb{i}"), format!("a{i}->b{i} #{r}").as_bytes());
        }
    }
    for (i, c) in b.iter_mut().enumerate() {
        for r in 0..rounds {
            let got = c.recv_acked();
            assert_eq!(
                got,
                format!("a{i}->b{i} #{r}").as_bytes(),
                "pair {i} round {r}"
            );
        }
        c.flush_acks();
        for r in 0..rounds {
            c.send(&format!("pa{i}"), format!("b{i}->a{i} #{r}").as_bytes());
        }
    }
    for (i, c) in a.iter_mut().enumerate() {
        for r in 0..rounds {
            let got = c.recv_acked();
            assert_eq!(
                got,
                format!("b{i}->a{i} #{r}").as_bytes(),
                "pair {i} round {r}"
            );
        }
        c.flush_acks();
    }
    for c in a.iter_mut().chain(b.iter_mut()) {
        c.expect_silence(Duration::from_millis(20));
    }
    // Cross-shard routing happened (users are spread over owners).
    let rings = s.metric("iris_edge_ring_items_out_total");
    assert!(rings > 0, "no item crossed the shard rings");
}

#[test]
fn same_and_cross_shard_delivery_two_shards() {
    pairs_exchange(2, 24, 5);
}

#[test]
fn same_and_cross_shard_delivery_more_shards_than_cores() {
    pairs_exchange(4, 32, 5);
}

/// Sends `n` numbered messages of `len` bytes to an offline user, then logs it in and checks
/// that all arrive after LOGIN_OK, complete and in order, then nothing more.
fn offline_backlog(n: usize, len: usize) {
    let s = Server::with_shards(2);
    let mut a = s.login("backlog-sender");
    a.send_many("backlog-rcpt", (0..n).map(|i| numbered(i, len)));
    a.sync();
    // PROTOCOL.md: a stored message is visible to a login that starts 100 ms after the send.
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let mut r = s.login("backlog-rcpt");
    let msgs = r.recv_msgs(n, true);
    let took = t0.elapsed();
    let mut ids = HashSet::new();
    for (i, (id, payload)) in msgs.iter().enumerate() {
        assert_eq!(
            payload,
            &numbered(i, len),
            "message {i} of {n} (got #{})",
            number_of(payload)
        );
        assert!(
            ids.insert(id.clone()),
            "id {:?} delivered twice",
            iris_tests::Bytes(id)
        );
    }
    r.expect_silence(Duration::from_millis(300));
    eprintln!("drained {n} x {len} B in {took:?}");
    // All acked: the next session gets nothing.
    r.sync();
    drop(r);
    std::thread::sleep(Duration::from_millis(100));
    let mut r2 = s.login("backlog-rcpt");
    r2.expect_silence(Duration::from_millis(300));
}

#[test]
fn offline_1000_messages_delivered_in_order_after_login() {
    offline_backlog(1000, 32);
}

#[test]
fn backlog_3000_x_200_bytes_complete_and_in_order() {
    offline_backlog(3000, 200);
}

#[test]
fn unacked_redelivered_after_abrupt_close_acked_never() {
    let s = Server::with_shards(2);
    let mut a = s.login("redeliv-a");
    let mut r = s.login("redeliv-r");
    a.send_many("redeliv-r", (0..10).map(|i| numbered(i, 24)));
    let first = r.recv_msgs(10, false);
    for (i, (_, p)) in first.iter().enumerate() {
        assert_eq!(p, &numbered(i, 24));
    }
    // Ack the first five only, then close abruptly.
    let mut acks = Vec::new();
    for (id, _) in &first[..5] {
        acks.extend(wire::ack(id));
    }
    r.write(&acks);
    r.sync();
    r.shutdown();
    std::thread::sleep(Duration::from_millis(100));

    // Next session: exactly the five unacked, in order, with their ids; do not ack; drop.
    let mut r2 = s.login("redeliv-r");
    let second = r2.recv_msgs(5, false);
    for (k, (id, p)) in second.iter().enumerate() {
        assert_eq!(p, &numbered(5 + k, 24), "redelivery {k}");
        assert_eq!(id, &first[5 + k].0, "redelivered message keeps its id");
    }
    r2.expect_silence(Duration::from_millis(300));
    drop(r2);
    std::thread::sleep(Duration::from_millis(100));

    // Again (never acked yet): the same five; ack them now.
    let mut r3 = s.login("redeliv-r");
    let third = r3.recv_msgs(5, true);
    for (k, (_, p)) in third.iter().enumerate() {
        assert_eq!(p, &numbered(5 + k, 24), "second redelivery {k}");
    }
    r3.sync();
    r3.shutdown();
    std::thread::sleep(Duration::from_millis(100));

    // Everything acked: nothing within 500 ms, then a marker is the next frame.
    let mut r4 = s.login("redeliv-r");
    r4.expect_silence(Duration::from_millis(500));
    a.send("redeliv-r", b"marker");
    let (_, p) = r4.recv_msg();
    assert_eq!(p, b"marker", "the marker must be the next frame");
}

#[test]
fn login_while_messages_arrive_loses_nothing() {
    let s = Server::with_shards(2);
    let n = 3000;
    let addr = s.client;
    let sender = std::thread::spawn(move || {
        let mut a = Client::connect(addr);
        a.login("race-sender");
        for chunk in 0..(n / 50) {
            a.send_many(
                "race-rcpt",
                (chunk * 50..chunk * 50 + 50).map(|i| numbered(i, 40)),
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        a.sync();
    });
    std::thread::sleep(Duration::from_millis(25));
    let mut r = s.login("race-rcpt");
    let msgs = r.recv_msgs(n, true);
    sender.join().unwrap();
    let got: Vec<usize> = msgs.iter().map(|(_, p)| number_of(p)).collect();
    let want: Vec<usize> = (0..n).collect();
    if got != want {
        let first_bad = got.iter().zip(&want).position(|(g, w)| g != w);
        panic!(
            "messages out of order or missing around the login: first difference at index {first_bad:?}: \
             got {:?}",
            &got[first_bad.unwrap_or(0).saturating_sub(3)..(first_bad.unwrap_or(0) + 5).min(got.len())]
        );
    }
    r.expect_silence(Duration::from_millis(300));
}

#[test]
fn batch_seq_and_cbor_messages_are_delivered_like_send() {
    let s = Server::with_shards(2);
    let mut a = s.login("kinds-a");
    let mut b = s.login("kinds-b");
    let cbor_payload = cbor::map(&[
        ("type", cbor::V::Text("note")),
        ("n", cbor::V::Uint(7)),
        ("blob", cbor::V::Bytes(&[0, 1, 2, 0xFF])),
    ]);
    let frames = |target: &[u8]| -> Vec<u8> {
        let mut v = wire::batch_send(target, &[b"batch-1", b"batch-2", b"", b"batch-4"]);
        v.extend(wire::send_seq(target, 42, b"seq-msg"));
        v.extend(wire::cbor_msg(target, &cbor_payload));
        v.extend(wire::send(target, b"plain"));
        v
    };
    let want: Vec<&[u8]> = vec![
        b"batch-1",
        b"batch-2",
        b"",
        b"batch-4",
        b"seq-msg",
        &cbor_payload,
        b"plain",
    ];

    // Live.
    a.write(&frames(b"kinds-b"));
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&b.recv_acked(), w, "live message {i}");
    }
    // Offline, then login.
    a.write(&frames(b"kinds-off"));
    a.sync();
    std::thread::sleep(Duration::from_millis(100));
    let mut off = s.login("kinds-off");
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&off.recv_acked(), w, "stored message {i}");
    }
    off.expect_silence(Duration::from_millis(200));
}

#[test]
fn largest_frames_are_delivered_intact() {
    let s = Server::with_shards(2);
    let mut a = s.login("big-a");
    let mut b = s.login("big-b");
    // A 65535-byte SEND.
    let big: Vec<u8> = (0..65535u32).map(|i| (i % 251) as u8).collect();
    a.send("big-b", &big);
    assert_eq!(b.recv_acked(), big, "65535-byte SEND");
    // A batch of 1000 entries (the maximum).
    let entries: Vec<Vec<u8>> = (0..1000).map(|i| numbered(i, 12)).collect();
    let refs: Vec<&[u8]> = entries.iter().map(Vec::as_slice).collect();
    a.write(&wire::batch_send(b"big-b", &refs));
    let got = b.recv_msgs(1000, true);
    for (i, (_, p)) in got.iter().enumerate() {
        assert_eq!(p, &entries[i], "batch entry {i}");
    }
    // A batch of 15 × 65535 bytes (just under 1 MiB).
    let chunks: Vec<Vec<u8>> = (0..15u8).map(|k| vec![k; 65535]).collect();
    let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
    a.write(&wire::batch_send(b"big-b", &refs));
    for (k, c) in chunks.iter().enumerate() {
        let got = b.recv_acked();
        assert!(
            got == *c,
            "big batch entry {k}: {} bytes, first {:?}",
            got.len(),
            got.first()
        );
    }
    b.flush_acks();
    match b.recv_within(Duration::from_millis(200)) {
        None => {}
        Some(f @ Frame::Reliable { .. }) => panic!("unexpected extra message {f:?}"),
        Some(f) => panic!("unexpected frame {f:?}"),
    }
}
