//! Protocol v2 in a regional cluster: SEND_ACK (the "sent" tick) comes only once the
//! recipient's home core has the message durable (its window fsynced), and a resend of the same
//! client message id, through the same edge or another one, after a reconnect or a `kill -9` of
//! the sender's edge, is confirmed with the first id and never delivered twice.
//!
//! Every edge serves v2 beside v1 (`--listen-v2 127.0.0.1:0`); the sender and the recipients
//! use raw v2 sockets (`iris_tests::v2::V2`) or v1 clients, so the bytes are the protocol's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use iris_tests::cluster::{Cluster, ClusterOpts};
use iris_tests::v2::V2;
use iris_tests::{number_of, numbered, unique, Client, Frame};
use iris_wire::v2::{ClientFrame, ServerFrame};

/// A region whose edges serve v2 too.
fn region_with_v2() -> Cluster {
    Cluster::start(ClusterOpts {
        edge_args: vec!["--listen-v2".to_owned(), "127.0.0.1:0".to_owned()],
        ..ClusterOpts::default()
    })
}

/// Reads frames on `c` until `want` SEND_ACKs came (or `timeout`); returns client id → server
/// id. Any other frame than SEND_ACK or PING fails the test.
fn send_acks(c: &mut V2, want: usize, timeout: Duration) -> BTreeMap<u64, u64> {
    let deadline = Instant::now() + timeout;
    let mut acks = BTreeMap::new();
    while acks.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {want} SEND_ACKs within {timeout:?}: {acks:?}",
            acks.len()
        );
        match c.recv_within(left.min(Duration::from_millis(200))) {
            None | Some(ServerFrame::Ping { .. }) => {}
            Some(ServerFrame::SendAck {
                client_msg_id,
                server_id,
                ..
            }) => {
                let before = acks.insert(client_msg_id, server_id);
                assert!(before.is_none(), "client id {client_msg_id} acked twice");
            }
            Some(other) => panic!("expected SEND_ACK, got {other:?}"),
        }
    }
    acks
}

/// Reads DELIVERs on `c` (acking each) until `want` distinct server ids came and nothing more
/// for `quiet`, or `timeout`. Returns (server id, sender, payload) in arrival order, repeats
/// included.
fn delivers(
    c: &mut V2,
    want: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut ids = HashSet::new();
    let mut last = Instant::now();
    while Instant::now() < deadline && !(ids.len() >= want && last.elapsed() >= quiet) {
        match c.recv_within(Duration::from_millis(100)) {
            None | Some(ServerFrame::Ping { .. }) => {}
            Some(ServerFrame::Deliver {
                server_id,
                sender,
                payload,
                ..
            }) => {
                c.write(&ClientFrame::Ack {
                    ids: vec![server_id],
                });
                ids.insert(server_id);
                got.push((server_id, sender, payload));
                last = Instant::now();
            }
            Some(other) => panic!("expected DELIVER, got {other:?}"),
        }
    }
    got
}

/// The numbers of v1 RELIABLE_MSGs read on `c` (acking each) until `want` came and nothing
/// more for `quiet`, or `timeout`.
fn v1_numbers(c: &mut Client, want: usize, quiet: Duration, timeout: Duration) -> Vec<usize> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut last = Instant::now();
    while Instant::now() < deadline && !(got.len() >= want && last.elapsed() >= quiet) {
        match c.next_raw(Instant::now() + Duration::from_millis(100)) {
            Ok((Frame::Reliable { id, payload }, _)) => {
                c.write(&iris_tests::wire::ack(&id));
                got.push(number_of(&payload));
                last = Instant::now();
            }
            Ok(_) => {}
            Err(_) => {}
        }
    }
    got
}

/// Checks DELIVERs of the numbered messages `0..n` (as [`delivers`] returns them): each
/// arrived once, with the payload `payload(k)` and the server id its SEND_ACK named
/// (`acked`: client id `k` → server id).
fn each_once_with_its_acked_id(
    got: &[(u64, Vec<u8>, Vec<u8>)],
    acked: &HashMap<u64, u64>,
    n: usize,
    payload: impl Fn(usize) -> Vec<u8>,
) {
    let mut seen = HashSet::new();
    for (id, _, p) in got {
        let k = number_of(p);
        assert_eq!(p, &payload(k), "payload of {k}");
        assert!(seen.insert(k), "message {k} delivered twice");
        assert_eq!(
            Some(id),
            acked.get(&(k as u64)),
            "message {k}: not the acked id"
        );
    }
    assert_eq!(seen.len(), n, "every message delivered once");
}

/// A v2 sender on edge 2 to a v2 and a v1 recipient on edge 1: every SEND is acknowledged once
/// with its own server id, only after the core confirmed it (the core counts one confirm per
/// message), and both recipients get every message live, in order, the v2 one with its sender.
#[test]
fn v2_sends_are_acknowledged_after_the_home_core_confirms_them_and_delivered_across_edges() {
    const N: usize = 60;
    let mut c = region_with_v2();
    assert!(c.wait_startup_presence());
    let a = unique("va");
    let b = unique("vb");
    let v1 = unique("v1");
    let (mut cb, _) = V2::hello(c.edge(0), &b);
    let mut c1 = c.login(0, &v1);
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    for k in 0..N {
        ca.send(k as u64 + 1, &b, &numbered(k, 32));
        ca.send(1000 + k as u64, &v1, &numbered(k, 32));
    }
    let acks = send_acks(&mut ca, 2 * N, Duration::from_secs(30));
    let ids: HashSet<u64> = acks.values().copied().collect();
    assert_eq!(ids.len(), 2 * N, "one server id per message: {acks:?}");
    let got = delivers(
        &mut cb,
        N,
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    let numbers: Vec<usize> = got.iter().map(|(_, _, p)| number_of(p)).collect();
    assert_eq!(
        numbers,
        (0..N).collect::<Vec<_>>(),
        "v2 recipient: all, in order, once"
    );
    for (id, sender, payload) in &got {
        assert_eq!(sender, a.as_bytes(), "DELIVER names the sender");
        assert_eq!(
            Some(id),
            acks.get(&(number_of(payload) as u64 + 1)),
            "the acked id"
        );
    }
    let v1_got = v1_numbers(
        &mut c1,
        N,
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    assert_eq!(
        v1_got,
        (0..N).collect::<Vec<_>>(),
        "v1 recipient: all, in order, once"
    );
    assert_eq!(
        c.core_metric("iris_core_confirms_total"),
        2 * N as u64,
        "one confirm per message"
    );
    assert_eq!(c.core_metric("iris_core_resends_total"), 0);
}

/// A resend of a client message id through the other edge (a reconnect landing elsewhere) is
/// acknowledged with the first message's id, and the message is delivered once: live to an
/// online recipient, and from the store to one that logs in later.
#[test]
fn a_v2_resend_through_the_other_edge_is_acknowledged_with_the_first_id_and_delivered_once() {
    let mut c = region_with_v2();
    assert!(c.wait_startup_presence());
    let a = unique("ra");
    let online = unique("ron");
    let offline = unique("roff");
    let (mut con, _) = V2::hello(c.edge(0), &online);
    // The first sends go through edge 2.
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    ca.send(7, &offline, b"stored once");
    ca.send(8, &online, b"live once");
    let first = send_acks(&mut ca, 2, Duration::from_secs(30));
    let got = delivers(
        &mut con,
        1,
        Duration::from_millis(200),
        Duration::from_secs(30),
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, first[&8]);
    drop(ca);
    // The client reconnects through edge 1 and resends both (it did not trust its acks), then
    // sends a new one.
    let (mut ca, _) = V2::hello(c.edge(0), &a);
    ca.send(7, &offline, b"stored once");
    ca.send(8, &online, b"live once");
    ca.send(9, &offline, b"second");
    let again = send_acks(&mut ca, 3, Duration::from_secs(30));
    assert_eq!(again[&7], first[&7], "a resend is acked with the first id");
    assert_eq!(again[&8], first[&8], "a resend is acked with the first id");
    assert!(!first.values().any(|id| *id == again[&9]));
    assert_eq!(c.core_metric("iris_core_resends_total"), 2);
    // No second live copy.
    let more = delivers(&mut con, 0, Duration::from_secs(2), Duration::from_secs(2));
    assert!(more.is_empty(), "a resend was delivered again: {more:?}");
    // The offline recipient finds each message once.
    let (mut coff, _) = V2::hello(c.edge(1), &offline);
    let drained = delivers(
        &mut coff,
        2,
        Duration::from_secs(1),
        Duration::from_secs(30),
    );
    let got: Vec<(u64, &[u8])> = drained.iter().map(|(id, _, p)| (*id, &p[..])).collect();
    assert_eq!(
        got,
        vec![
            (first[&7], &b"stored once"[..]),
            (again[&9], &b"second"[..])
        ]
    );
}

/// `kill -9` of the sender's edge while v2 SENDs are in flight: every acknowledged message is
/// delivered, and the client's resends of the unacknowledged ones (through the restarted edge
/// and the other one) are delivered exactly once with the rest: the edge's outbox replays what
/// it had read, the core keeps whichever copy of a client id comes first.
#[test]
fn kill9_of_the_senders_edge_loses_no_acknowledged_v2_message_and_resends_are_delivered_once() {
    const N: usize = 400;
    let mut c = region_with_v2();
    assert!(c.wait_startup_presence());
    let a = unique("ka");
    let b = unique("kb");
    let payload = |k: usize| numbered(k, 48);
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    let mut batch = Vec::new();
    for k in 0..N {
        iris_wire::v2::encode_client(
            &ClientFrame::Send {
                client_msg_id: k as u64,
                recipient: b.as_bytes().to_vec(),
                kind: iris_wire::v2::MsgKind::Plain,
                payload: payload(k),
            },
            &mut batch,
        );
    }
    ca.write_raw(&batch);
    // Some are acknowledged, then the edge dies with the rest in flight.
    let mut acked: HashMap<u64, u64> = send_acks(&mut ca, 20, Duration::from_secs(30))
        .into_iter()
        .collect();
    c.kill9_edge(1);
    drop(ca);
    let before_kill = acked.len();
    c.restart_edge(1);
    // The client resends every unacknowledged id, half through each edge.
    let mut resent = 0;
    for edge in [0, 1] {
        let (mut cr, _) = V2::hello(c.edge(edge), &a);
        let mut want = 0;
        for k in (0..N).filter(|k| k % 2 == edge && !acked.contains_key(&(*k as u64))) {
            cr.send(k as u64, &b, &payload(k));
            want += 1;
        }
        resent += want;
        for (client, id) in send_acks(&mut cr, want, Duration::from_secs(60)) {
            acked.insert(client, id);
        }
    }
    assert_eq!(acked.len(), N, "every message acknowledged");
    // The recipient gets each message exactly once, with the acknowledged id.
    let (mut cb, _) = V2::hello(c.edge(0), &b);
    let got = delivers(&mut cb, N, Duration::from_secs(2), Duration::from_secs(60));
    each_once_with_its_acked_id(&got, &acked, N, payload);
    println!(
        "v2 kill -9: {before_kill} acked before the kill, {resent} resent, {} resends found by the core",
        c.core_metric("iris_core_resends_total")
    );
}

/// The same with the broker stalled (SIGSTOP): the edge reads the SENDs into its outbox but
/// cannot have them confirmed, so none is acknowledged; it is killed (-9), the broker resumes,
/// the edge restarts and replays its outbox (confirms for the dead run are dropped), and the
/// client resends everything through the other edge: each resend is acknowledged with the id
/// of the replayed copy, and the recipient gets every message once.
#[test]
fn v2_sends_in_a_killed_edges_outbox_are_replayed_and_their_resends_acknowledged_with_those_ids() {
    const N: usize = 200;
    // No stall while the edge reads the SENDs (the broker is stopped from the first one): on a
    // loaded machine reading all of them may take longer than the default bus_stall_ms (5 s),
    // and the stall is not what this test is about.
    let mut c = Cluster::start(ClusterOpts {
        edge_args: vec!["--listen-v2".to_owned(), "127.0.0.1:0".to_owned()],
        edge_config: Some("[cluster]\nbus_stall_ms = 600000\n".to_owned()),
        ..ClusterOpts::default()
    });
    assert!(c.wait_startup_presence());
    let a = unique("sa");
    let b = unique("sb");
    let payload = |k: usize| numbered(k, 64);
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    c.stop_broker();
    for k in 0..N {
        ca.send(k as u64, &b, &payload(k));
    }
    let read_all = iris_tests::wait_until(Duration::from_secs(20), || {
        c.edge_metric(1, "iris_edge_outbox_records") >= N as u64
    });
    assert!(
        read_all,
        "the edge holds {} of {N} in its outbox",
        c.edge_metric(1, "iris_edge_outbox_records")
    );
    assert!(
        ca.recv_within(Duration::from_millis(300)).is_none(),
        "nothing is acknowledged while the broker is stalled"
    );
    c.kill9_edge(1);
    drop(ca);
    c.cont_broker();
    c.restart_edge(1);
    assert_eq!(
        c.edge_metric(1, "iris_edge_outbox_replayed_total"),
        N as u64,
        "records replayed at restart"
    );
    let (mut cr, _) = V2::hello(c.edge(0), &a);
    for k in 0..N {
        cr.send(k as u64, &b, &payload(k));
    }
    let acked: HashMap<u64, u64> = send_acks(&mut cr, N, Duration::from_secs(60))
        .into_iter()
        .collect();
    let (mut cb, _) = V2::hello(c.edge(0), &b);
    let got = delivers(&mut cb, N, Duration::from_secs(2), Duration::from_secs(60));
    each_once_with_its_acked_id(&got, &acked, N, payload);
    // Of the two copies of each message (the replayed one and the resend), the core kept the
    // first and confirmed the second with its id.
    assert_eq!(c.core_metric("iris_core_resends_total"), N as u64);
}

/// The core forgets a client message id after `--dedup-ttl-secs`: the expiry sweep deletes the
/// record (counted), and the same id sent later is a new message with a new server id.
#[test]
fn the_core_forgets_client_ids_after_dedup_ttl_secs() {
    let mut c = Cluster::start(ClusterOpts {
        edge_args: vec!["--listen-v2".to_owned(), "127.0.0.1:0".to_owned()],
        core_args: vec!["--dedup-ttl-secs".to_owned(), "1".to_owned()],
        ..ClusterOpts::default()
    });
    let a = unique("ta");
    let b = unique("tb");
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    ca.send(5, &b, b"first");
    let first = send_acks(&mut ca, 1, Duration::from_secs(30))[&5];
    // Within the TTL a resend is the same message.
    ca.send(5, &b, b"first");
    assert_eq!(send_acks(&mut ca, 1, Duration::from_secs(30))[&5], first);
    let t0 = Instant::now();
    while c.core_metric("iris_core_dedup_expired_total") == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the dedup record never expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ca.send(5, &b, b"later");
    let later = send_acks(&mut ca, 1, Duration::from_secs(30))[&5];
    assert_ne!(later, first, "after the TTL the id names a new message");
    let (mut cb, _) = V2::hello(c.edge(0), &b);
    let got = delivers(&mut cb, 2, Duration::from_secs(1), Duration::from_secs(30));
    let got: Vec<(u64, &[u8])> = got.iter().map(|(id, _, p)| (*id, &p[..])).collect();
    assert_eq!(got, vec![(first, &b"first"[..]), (later, &b"later"[..])]);
}

/// Connects to `edge` as `user` with HELLO's `resume_after`, and returns the server ids of the
/// DELIVERs that come within a quiet second (none acked).
fn resume_ids(c: &Cluster, edge: usize, user: &str, resume_after: u64) -> Vec<u64> {
    let mut v = V2::connect(c.edge(edge).v2.expect("edge serves v2"));
    v.write(&ClientFrame::Hello {
        client_name: b"v2-test".to_vec(),
        client_version: b"1".to_vec(),
        token: user.as_bytes().to_vec(),
        resume_after,
    });
    assert!(matches!(v.recv(), ServerFrame::HelloOk { .. }));
    let mut ids = Vec::new();
    while let Some(f) = v.recv_within(Duration::from_secs(1)) {
        if let ServerFrame::Deliver { server_id, .. } = f {
            ids.push(server_id);
        }
    }
    // Closed, and the close seen by the edge (its list handed over) before the next session:
    // a HELLO that overtakes the end of the last session finds no list (PROTOCOL-v2.md).
    let open = c.edge_metric(edge, "iris_edge_sessions_open");
    drop(v);
    let t0 = Instant::now();
    while c.edge_metric(edge, "iris_edge_sessions_open") >= open {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the edge never saw the session end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ids
}

/// `resume_after` in a cluster: the recipient's edge remembers what it wrote to the last
/// session and acks (through the bus, ahead of the drain request) those written up to the
/// named id; the rest is drained again.
#[test]
fn resume_after_in_a_cluster_skips_what_the_last_session_was_delivered_up_to_it() {
    let c = region_with_v2();
    let a = unique("ua");
    let b = unique("ub");
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    for k in 1..=4u64 {
        ca.send(k, &b, format!("m{k}").as_bytes());
    }
    let acks = send_acks(&mut ca, 4, Duration::from_secs(30));
    let sent: Vec<u64> = (1..=4).map(|k| acks[&k]).collect();
    // The first session is delivered all four and acks none.
    assert_eq!(resume_ids(&c, 0, &b, 0), sent);
    // The second resumes after the second message: the first two are acked for it.
    assert_eq!(resume_ids(&c, 0, &b, sent[1]), sent[2..].to_vec());
    // Gone for good: a plain login finds only the last two.
    assert_eq!(resume_ids(&c, 0, &b, 0), sent[2..].to_vec());
}

/// `kill -9` of the recipient's core while v2 SENDs stream in: every acknowledged message was
/// on that core's disk (its dedup record with it), so after the restart the client's resends of
/// every SEND (acknowledged or not) are acknowledged with the ids already given, and the
/// recipient gets each message exactly once.
#[test]
fn kill9_of_the_recipients_core_keeps_every_acknowledged_v2_message_and_its_dedup_record() {
    const N: usize = 300;
    let mut c = region_with_v2();
    assert!(c.wait_startup_presence());
    let a = unique("ca");
    let b = unique("cb");
    let payload = |k: usize| numbered(k, 40);
    let (mut ca, _) = V2::hello(c.edge(1), &a);
    for k in 0..N {
        ca.send(k as u64, &b, &payload(k));
    }
    let acked: HashMap<u64, u64> = send_acks(&mut ca, 30, Duration::from_secs(30))
        .into_iter()
        .collect();
    let member = c.core_of(&b);
    c.cores[member].kill9();
    let before_kill = acked.len();
    c.cores[member].restart();
    // The client resends everything, through the other edge.
    drop(ca);
    let (mut cr, _) = V2::hello(c.edge(0), &a);
    for k in 0..N {
        cr.send(k as u64, &b, &payload(k));
    }
    let again: HashMap<u64, u64> = send_acks(&mut cr, N, Duration::from_secs(60))
        .into_iter()
        .collect();
    for (client, id) in &acked {
        assert_eq!(
            again.get(client),
            Some(id),
            "client id {client}: acked again with another id"
        );
    }
    let (mut cb, _) = V2::hello(c.edge(0), &b);
    let got = delivers(&mut cb, N, Duration::from_secs(2), Duration::from_secs(60));
    each_once_with_its_acked_id(&got, &again, N, payload);
    println!("v2 core kill -9: {before_kill} acked before the kill, all {N} delivered once");
}
