//! The client against a real `iris-edge` (embedded deployment, `--listen-v2`): two clients
//! exchange messages with sent ticks, un-acked sends survive a reconnect and are delivered
//! once, and acked deliveries leave the store.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use iris_client::{Client, ClientOptions, Event, MsgKind, ReceiptKind};
use iris_tests::{unique, Server, ServerOpts};

fn server() -> (Server, SocketAddr) {
    let s = Server::start(ServerOpts {
        args: vec!["--listen-v2".into(), "127.0.0.1:0".into()],
        ..ServerOpts::shards(2)
    });
    let v2 = s.v2.expect("the edge announced no v2 listener");
    (s, v2)
}

fn client(addr: SocketAddr, user: &str) -> Client {
    let mut o = ClientOptions::new(user);
    o.auto_reconnect = false;
    Client::connect(addr, o).expect("login")
}

/// Events until `pred` has been true `n` times or `timeout` passes.
fn collect(c: &Client, timeout: Duration, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !done(&out) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(e) = c.recv(left.min(Duration::from_millis(200))).expect("recv") {
            out.push(e);
        }
    }
    out
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

fn is_deliver(e: &Event) -> bool {
    matches!(e, Event::Deliver { .. })
}

fn is_send_ack(e: &Event) -> bool {
    matches!(e, Event::SendAck { .. })
}

#[test]
fn two_clients_exchange_messages_with_sent_ticks() {
    let (_s, addr) = server();
    let (a, b) = (unique("alice"), unique("bob"));
    let alice = client(addr, &a);
    let bob = client(addr, &b);
    assert_eq!(alice.server_limits().version, 2);
    let mut sent = HashMap::new();
    for i in 0..10 {
        let id = alice
            .send(b.as_bytes(), MsgKind::Plain, format!("hi {i}").as_bytes())
            .unwrap();
        sent.insert(id, i);
    }
    // Alice's ticks.
    let ticks = collect(&alice, Duration::from_secs(5), |e| {
        count(e, is_send_ack) == 10
    });
    let mut server_ids = Vec::new();
    let mut tick_of_text = HashMap::new();
    for e in &ticks {
        if let Event::SendAck {
            client_msg_id,
            server_id,
            ..
        } = e
        {
            tick_of_text.insert(sent[client_msg_id], *server_id);
            server_ids.push(*server_id);
        }
    }
    assert_eq!(server_ids.len(), 10, "{ticks:?}");
    assert_eq!(alice.unacked_sends(), 0);
    // Bob gets them, from alice, with the ids alice was told (their order: see
    // `live_deliveries_keep_send_order`).
    let got = collect(&bob, Duration::from_secs(5), |e| count(e, is_deliver) == 10);
    let delivered: Vec<(u64, String)> = got
        .iter()
        .filter_map(|e| match e {
            Event::Deliver {
                server_id,
                sender,
                payload,
                kind,
                ..
            } => {
                assert_eq!(sender, a.as_bytes());
                assert_eq!(*kind, MsgKind::Plain);
                Some((*server_id, String::from_utf8(payload.clone()).unwrap()))
            }
            _ => None,
        })
        .collect();
    // Each delivery carries the id alice's tick named for that text.
    for (server_id, text) in &delivered {
        let i: usize = text.strip_prefix("hi ").unwrap().parse().unwrap();
        assert_eq!(tick_of_text[&i], *server_id, "{text}");
    }
    assert_eq!(delivered.len(), 10);
    let mut ids: Vec<u64> = delivered.iter().map(|d| d.0).collect();
    ids.sort_unstable();
    server_ids.sort_unstable();
    assert_eq!(ids, server_ids);
    // Bob answers; alice gets it.
    bob.send(a.as_bytes(), MsgKind::Plain, b"hello alice")
        .unwrap();
    let back = collect(&alice, Duration::from_secs(5), |e| {
        count(e, is_deliver) == 1
    });
    assert!(
        back.iter()
            .any(|e| matches!(e, Event::Deliver { payload, .. } if payload == b"hello alice")),
        "{back:?}"
    );
    // Bob reads alice's messages: alice gets the read receipt.
    bob.receipt(ReceiptKind::Read, a.as_bytes(), &ids).unwrap();
    let receipted = |e: &[Event]| -> usize {
        e.iter()
            .map(|e| match e {
                Event::Receipt { ids, .. } => ids.len(),
                _ => 0,
            })
            .sum()
    };
    let receipts = collect(&alice, Duration::from_secs(5), |e| receipted(e) >= 10);
    let mut read: Vec<u64> = receipts
        .iter()
        .filter_map(|e| match e {
            Event::Receipt {
                kind: ReceiptKind::Read,
                reader,
                ids,
                ..
            } if reader == b.as_bytes() => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    read.sort_unstable();
    assert_eq!(read, ids, "{receipts:?}");
    // Status: bob is online.
    alice.status(b.as_bytes()).unwrap();
    let st = collect(&alice, Duration::from_secs(5), |e| {
        count(e, |e| matches!(e, Event::Status { .. })) > 0
    });
    assert!(
        st.iter()
            .any(|e| matches!(e, Event::Status { user, online: true, .. } if user == b.as_bytes())),
        "{st:?}"
    );
}

#[test]
fn unacked_sends_are_resent_after_a_reconnect_and_delivered_once() {
    let (_s, addr) = server();
    let (a, b) = (unique("alice"), unique("bob"));
    let alice = client(addr, &a);
    let n = 300;
    for i in 0..n {
        alice
            .send(b.as_bytes(), MsgKind::Plain, format!("m{i}").as_bytes())
            .unwrap();
    }
    // Drop the connection at once: some sends are not acknowledged yet (durable means
    // committed and fsynced), so they go again, with the same ids, on the new connection.
    let unacked_at_drop = alice.unacked_sends();
    alice.reconnect().expect("reconnect");
    assert!(
        unacked_at_drop > 0,
        "every send was acked before the drop: nothing resent"
    );
    let events = collect(&alice, Duration::from_secs(8), |_| {
        alice.unacked_sends() == 0
    });
    assert_eq!(
        alice.unacked_sends(),
        0,
        "{} still un-acked",
        alice.unacked_sends()
    );
    assert!(events.contains(&Event::Reconnected));
    let acks: HashMap<u64, u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::SendAck {
                client_msg_id,
                server_id,
                ..
            } => Some((*client_msg_id, *server_id)),
            _ => None,
        })
        .collect();
    // Bob, with no memory of recent ids (so a second copy would show), gets each once.
    let mut o = ClientOptions::new(&b);
    o.auto_reconnect = false;
    o.dedupe_window = 1;
    let bob = Client::connect(addr, o).unwrap();
    let got = collect(&bob, Duration::from_secs(8), |e| count(e, is_deliver) >= n);
    // Anything extra would come right after.
    let extra = collect(&bob, Duration::from_millis(500), |_| false);
    let mut texts: Vec<String> = got
        .iter()
        .chain(&extra)
        .filter_map(|e| match e {
            Event::Deliver { payload, .. } => Some(String::from_utf8(payload.clone()).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.len(), n, "delivered {} for {n} sent", texts.len());
    let in_order: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, in_order, "not in send order");
    texts.dedup();
    assert_eq!(texts.len(), n);
    let mut server_ids: Vec<u64> = acks.values().copied().collect();
    server_ids.sort_unstable();
    server_ids.dedup();
    // Every SEND_ACK the client reported names a distinct stored message.
    assert_eq!(server_ids.len(), acks.len());
}

#[test]
fn acked_deliveries_are_not_delivered_again() {
    let (_s, addr) = server();
    let (a, b) = (unique("alice"), unique("bob"));
    let alice = client(addr, &a);
    for i in 0..20 {
        alice
            .send(b.as_bytes(), MsgKind::Plain, format!("m{i}").as_bytes())
            .unwrap();
    }
    collect(&alice, Duration::from_secs(5), |_| {
        alice.unacked_sends() == 0
    });
    assert_eq!(alice.unacked_sends(), 0);

    // Without acks the messages stay stored: a second login gets them again.
    let mut o = ClientOptions::new(&b);
    o.auto_reconnect = false;
    o.manual_ack = true;
    let bob = Client::connect(addr, o.clone()).unwrap();
    assert_eq!(
        count(
            &collect(&bob, Duration::from_secs(5), |e| count(e, is_deliver) == 20),
            is_deliver
        ),
        20
    );
    bob.close();
    let bob = Client::connect(addr, o).unwrap();
    assert_eq!(
        count(
            &collect(&bob, Duration::from_secs(5), |e| count(e, is_deliver) == 20),
            is_deliver
        ),
        20
    );
    bob.close();

    // Auto-acked: gone from the store.
    let bob = client(addr, &b);
    assert_eq!(
        count(
            &collect(&bob, Duration::from_secs(5), |e| count(e, is_deliver) == 20),
            is_deliver
        ),
        20
    );
    bob.close(); // sends the pending acks
    std::thread::sleep(Duration::from_millis(300));
    let bob = client(addr, &b);
    let again = collect(&bob, Duration::from_secs(1), |_| false);
    assert_eq!(count(&again, is_deliver), 0, "{again:?}");
}

#[test]
fn live_deliveries_keep_send_order() {
    // PROTOCOL-v2.md, Delivery: "Per sender and recipient, messages are delivered in send
    // order". (Regression: the edge once routed live copies in the order of the store's
    // confirmations, which came out of a hash map.)
    let (_s, addr) = server();
    let (a, b) = (unique("alice"), unique("bob"));
    let alice = client(addr, &a);
    let bob = client(addr, &b);
    for i in 0..50 {
        alice
            .send(b.as_bytes(), MsgKind::Plain, format!("{i}").as_bytes())
            .unwrap();
    }
    let got = collect(&bob, Duration::from_secs(5), |e| count(e, is_deliver) == 50);
    let order: Vec<usize> = got
        .iter()
        .filter_map(|e| match e {
            Event::Deliver { payload, .. } => std::str::from_utf8(payload).unwrap().parse().ok(),
            _ => None,
        })
        .collect();
    assert_eq!(order, (0..50).collect::<Vec<_>>());
}
