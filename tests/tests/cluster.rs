//! The regional cluster end to end: every test starts its own region ([`Cluster`]: a tansu
//! broker, a `redis-server`, two `iris-core` members with static partition ownership and two
//! `iris-edge` processes in `--bus kafka` mode, unless it needs less), with a region name of
//! its own, and talks to the edges as unchanged v1 clients.
//!
//! Needs `tansu` (scripts/kafka.sh install), `redis-server` and the `iris-edge` and `iris-core`
//! binaries (`cargo build -p iris-edge -p iris-core`; scripts/test.sh builds both).
//!
//! Loss and duplicate accounting is exact: senders send numbered payloads, receivers ack
//! everything and record every arrival; a test checks the set of numbers (nothing lost), the
//! order of first arrivals and where duplicates may come from. The crash tests: the
//! recipient's edge, a core, the broker (sqlite storage) and Redis, each killed while load
//! runs. Each test prints its timings (`--nocapture`).

#[path = "cluster/common.rs"]
mod common;
#[path = "cluster/core_path.rs"]
mod core_path;
#[path = "cluster/crash.rs"]
mod crash;
#[path = "cluster/live.rs"]
mod live;
#[path = "cluster/lost_topics.rs"]
mod lost_topics;
#[path = "cluster/outbox.rs"]
mod outbox;
#[path = "cluster/v2.rs"]
mod v2;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use iris_bus::topics;
use iris_tests::cluster::{partition_of, Cluster};
use iris_tests::{
    cbor, describe_sequence_diff, number_of, numbered, unique, unix_secs, wire, Frame,
};

/// The harness's copy of the user hash agrees with the bus.
#[test]
fn harness_partitioning_matches_the_bus() {
    for i in 0..500 {
        let u = format!("user-{i}");
        for p in [1, 2, 4, 7, 16] {
            assert_eq!(
                partition_of(u.as_bytes(), p),
                topics::partition_of(u.as_bytes(), p),
                "{u} over {p}"
            );
        }
    }
}

#[test]
fn region_starts_with_static_partition_ownership_and_stops_cleanly() {
    let t0 = Instant::now();
    let mut c = Cluster::default_region();
    let started = t0.elapsed();
    // Member i of 2 owns the partitions p % 2 == i of the 4.
    assert_eq!(c.cores[0].assigned, vec![0, 2], "{}", c.cores[0].ready_line);
    assert_eq!(c.cores[1].assigned, vec![1, 3], "{}", c.cores[1].ready_line);
    for core in &c.cores {
        assert_eq!(core.partitions, 4, "{}", core.ready_line);
        assert!(
            core.ready_line.contains(&format!("region={} ", c.region)),
            "{}",
            core.ready_line
        );
        assert!(core.admin.is_some(), "{}", core.ready_line);
        assert_eq!(
            iris_tests::http_get(core.admin.unwrap(), "/health").0,
            200,
            "core /health"
        );
    }
    for e in &c.edges {
        assert_eq!(e.admin_get("/health").0, 200, "edge /health");
        // The cluster counters exist from the start.
        for m in [
            "iris_bus_frames_out_total",
            "iris_bus_frames_in_total",
            "iris_bus_bad_frames_total",
            "iris_bus_producer_ring_full_total",
        ] {
            e.metric(m);
        }
    }
    // SIGTERM: edges drain and exit 0, then cores commit and exit 0.
    let t1 = Instant::now();
    for e in &mut c.edges {
        let st = e.sigterm();
        assert!(st.success(), "iris-edge exit status after SIGTERM: {st}");
    }
    for core in &mut c.cores {
        let st = core.sigterm();
        assert!(st.success(), "iris-core exit status after SIGTERM: {st}");
    }
    eprintln!(
        "cluster timing: region start {started:?}, graceful stop {:?}",
        t1.elapsed()
    );
}

#[test]
fn cross_edge_delivery_both_ways() {
    let mut c = Cluster::default_region();
    let a = unique("xa");
    let b = unique("xb");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    // First message: measures the path sender edge → deliver topic → core → recipient edge.
    let t0 = Instant::now();
    ca.send(&b, &numbered(0, PAYLOAD));
    let (_, p) = recv_one(&mut cb, Duration::from_secs(15), "first cross-edge message");
    let first = t0.elapsed();
    assert_eq!(p, numbered(0, PAYLOAD));
    ca.send_many(&b, (1..50).map(|i| numbered(i, PAYLOAD)));
    let got: Vec<usize> = cb
        .recv_msgs(49, true)
        .iter()
        .map(|(_, p)| number_of(p))
        .collect();
    let want: Vec<usize> = (1..50).collect();
    assert_eq!(describe_sequence_diff(&got, &want), None, "a → b");
    // And back: edge 2 → edge 1.
    cb.send_many(&a, (0..50).map(|i| numbered(i, PAYLOAD)));
    let got: Vec<usize> = ca
        .recv_msgs(50, true)
        .iter()
        .map(|(_, p)| number_of(p))
        .collect();
    let want: Vec<usize> = (0..50).collect();
    assert_eq!(describe_sequence_diff(&got, &want), None, "b → a");
    ca.expect_silence(Duration::from_millis(300));
    cb.expect_silence(Duration::from_millis(300));
    // Through the bus: each edge produced its 50 sends, each core stored its recipient's.
    for e in 0..2 {
        assert!(c.edge_metric(e, "iris_bus_frames_out_total") >= 50);
        assert!(c.edge_metric(e, "iris_bus_frames_in_total") >= 50);
        assert_eq!(c.edge_metric(e, "iris_bus_bad_frames_total"), 0);
    }
    let (ka, kb) = (c.core_of(&a), c.core_of(&b));
    if ka != kb {
        assert_eq!(c.cores[kb].metric("iris_core_delivers_total"), 50);
        assert_eq!(c.cores[ka].metric("iris_core_delivers_total"), 50);
    } else {
        assert_eq!(c.cores[ka].metric("iris_core_delivers_total"), 100);
    }
    // Acks reach the core: both recipients acked 50.
    eventually("100 acks at the cores", Duration::from_secs(10), || {
        c.core_metric("iris_core_acks_total") >= 100
    });
    eprintln!(
        "cluster timing: first cross-edge delivery {first:?}, test {:?}",
        t0.elapsed()
    );
}

#[test]
fn offline_messages_wait_at_the_core_and_drain_in_order_on_the_other_edge() {
    let c = Cluster::default_region();
    let a = unique("oa");
    let carol = unique("oc");
    let mut ca = c.login(0, &a);
    let n = 300;
    ca.send_many(&carol, (0..n).map(|i| numbered(i, PAYLOAD)));
    let k = c.core_of(&carol);
    // Carol never logged in: nothing routed, everything kept (counted as offline once its
    // window is durable); the other member saw none of it.
    let t = eventually("300 delivers stored", Duration::from_secs(20), || {
        c.cores[k].metric("iris_core_offline_total") >= n as u64
    });
    assert_eq!(c.cores[k].metric("iris_core_delivers_total"), n as u64);
    assert_eq!(c.cores[k].metric("iris_core_offline_total"), n as u64);
    assert_eq!(c.cores[k].metric("iris_core_routed_total"), 0);
    assert_eq!(c.cores[1 - k].metric("iris_core_delivers_total"), 0);
    // Log in on the other edge: LOGIN_OK first, then everything in order.
    let t0 = Instant::now();
    let mut cc = c.login(1, &carol);
    let got: Vec<usize> = cc
        .recv_msgs(n, true)
        .iter()
        .map(|(_, p)| number_of(p))
        .collect();
    let drain = t0.elapsed();
    let want: Vec<usize> = (0..n).collect();
    assert_eq!(describe_sequence_diff(&got, &want), None);
    cc.expect_silence(Duration::from_millis(500));
    assert!(c.edge_metric(1, "iris_edge_messages_drained_total") >= n as u64);
    assert!(c.cores[k].metric("iris_core_drains_total") >= 1);
    eprintln!("cluster timing: {n} stored in {t:?}, drained at login in {drain:?}");
}

#[test]
fn acked_messages_are_not_delivered_again_after_relogin_on_another_edge() {
    let c = Cluster::default_region();
    let a = unique("aa");
    let d = unique("ad");
    let mut ca = c.login(0, &a);
    ca.send_many(&d, (0..20).map(|i| numbered(i, PAYLOAD)));
    let k = c.core_of(&d);
    eventually("20 delivers stored", Duration::from_secs(20), || {
        c.cores[k].metric("iris_core_delivers_total") >= 20
    });
    // First login (edge 2): all 20, ack only the first 10.
    let mut cd = c.login(1, &d);
    let msgs = cd.recv_msgs(20, false);
    let nums: Vec<usize> = msgs.iter().map(|(_, p)| number_of(p)).collect();
    assert_eq!(nums, (0..20).collect::<Vec<_>>());
    for (id, _) in &msgs[..10] {
        cd.ack(id);
    }
    cd.sync();
    eventually("10 acks at the core", Duration::from_secs(10), || {
        c.cores[k].metric("iris_core_acks_total") >= 10
    });
    cd.shutdown();
    // Second login (edge 1): exactly the 10 unacked, in order; ack them.
    let mut cd = c.login(0, &d);
    let nums: Vec<usize> = cd
        .recv_msgs(10, true)
        .iter()
        .map(|(_, p)| number_of(p))
        .collect();
    assert_eq!(nums, (10..20).collect::<Vec<_>>(), "unacked ones again");
    cd.expect_silence(Duration::from_millis(500));
    eventually("20 acks at the core", Duration::from_secs(10), || {
        c.cores[k].metric("iris_core_acks_total") >= 20
    });
    cd.shutdown();
    // Third login (edge 2): nothing.
    let mut cd = c.login(1, &d);
    cd.expect_silence(Duration::from_millis(1500));
}

#[test]
fn presence_crosses_edges_within_5s_and_logout_gives_last_seen() {
    let c = Cluster::default_region();
    assert!(c.wait_startup_presence());
    let obs = unique("po");
    let eve = unique("pe");
    let mut co = c.login(0, &obs);
    // Never seen: offline, last_seen 0, on both edges.
    assert_eq!(co.status(&eve), (0, 0));
    let mut local = c.login(1, &unique("pl"));
    assert_eq!(local.status(&eve), (0, 0));
    let ce = c.login(1, &eve);
    let (_, online_after) = wait_status(
        &mut co,
        &eve,
        Duration::from_secs(5),
        "login on the other edge",
        |on, ls| on == 1 && ls == 0,
    );
    assert_eq!(local.status(&eve), (1, 0), "local view");
    std::thread::sleep(Duration::from_millis(1100));
    let before = unix_secs();
    ce.shutdown();
    let ((_, last_seen), offline_after) = wait_status(
        &mut co,
        &eve,
        Duration::from_secs(5),
        "logout on the other edge",
        |on, ls| on == 0 && ls > 0,
    );
    let after = unix_secs();
    assert!(
        (before.saturating_sub(1)..=after + 1).contains(&last_seen),
        "last_seen {last_seen} not between {before} and {after}"
    );
    let ((_, local_seen), _) = wait_status(
        &mut local,
        &eve,
        Duration::from_secs(5),
        "local logout",
        |on, ls| on == 0 && ls > 0,
    );
    assert!(
        local_seen.abs_diff(last_seen) <= 1,
        "{local_seen} vs {last_seen}"
    );
    eprintln!(
        "cluster timing: remote online seen after {online_after:?}, offline after \
         {offline_after:?}"
    );
}

#[test]
fn status_across_edges_with_sessions_on_both() {
    let c = Cluster::default_region();
    assert!(c.wait_startup_presence());
    let u0 = unique("s0");
    let u1 = unique("s1");
    let both = unique("sb");
    let mut c0 = c.login(0, &u0);
    let mut c1 = c.login(1, &u1);
    for (cl, user) in [(&mut c0, &u1), (&mut c1, &u0)] {
        wait_status(cl, user, Duration::from_secs(5), "remote user", |on, _| {
            on == 1
        });
    }
    // The same user on both edges: online everywhere while either session lives.
    let b0 = c.login(0, &both);
    let b1 = c.login(1, &both);
    for cl in [&mut c0, &mut c1] {
        wait_status(
            cl,
            &both,
            Duration::from_secs(5),
            "two sessions",
            |on, _| on == 1,
        );
    }
    b0.shutdown();
    std::thread::sleep(Duration::from_millis(1500));
    for cl in [&mut c0, &mut c1] {
        assert_eq!(
            cl.status(&both),
            (1, 0),
            "{both} still has a session on edge 2 (asked by {:?})",
            cl.user
        );
    }
    b1.shutdown();
    for cl in [&mut c0, &mut c1] {
        wait_status(cl, &both, Duration::from_secs(5), "both gone", |on, ls| {
            on == 0 && ls > 0
        });
    }
    // A user nobody has seen.
    let ghost = unique("sg");
    assert_eq!(c0.status(&ghost), (0, 0));
    assert_eq!(c1.status(&ghost), (0, 0));
}

/// After an edge restarts (kill -9), its users log in again at once (a reconnect storm): the
/// other edges must see them online within 5 s, and the restarted edge must see the users of the
/// other edges.
#[test]
fn presence_of_users_who_log_in_right_after_an_edge_restart() {
    let mut c = Cluster::default_region();
    let obs = unique("ro");
    let mut co = c.login(0, &obs);
    let users: Vec<String> = (0..16).map(|_| unique("rs")).collect();
    c.kill9_edge(1);
    c.restart_edge(1);
    let t0 = Instant::now();
    let _sessions: Vec<_> = users.iter().map(|u| c.login(1, u)).collect();
    let mut stuck = Vec::new();
    for u in &users {
        let deadline = t0 + Duration::from_secs(5);
        let mut st = co.status(u);
        while st.0 != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            st = co.status(u);
        }
        if st.0 != 1 {
            stuck.push((u.clone(), st));
        }
    }
    assert!(
        stuck.is_empty(),
        "{} of {} users logged in on the restarted edge are not online on the other edge 5 s \
         later (status, last_seen): {stuck:?}",
        stuck.len(),
        users.len()
    );
    let seen_after = t0.elapsed();
    // The restarted edge sees the observer (on the other edge) too.
    let mut probe = c.login(1, &unique("rp"));
    wait_status(
        &mut probe,
        &obs,
        Duration::from_secs(5),
        "a user of the other edge, seen from the restarted edge",
        |on, _| on == 1,
    );
    eprintln!("cluster timing: 16 users on a restarted edge seen online after {seen_after:?}");
}

#[test]
fn ordering_per_sender_across_edges_through_offline_drain_and_live() {
    let c = Cluster::default_region();
    let a = unique("qa");
    let b = unique("qb");
    let n = 2000;
    let offline = 600;
    let mut ca = c.login(0, &a);
    let t0 = Instant::now();
    // 0..600 while b is offline, stored at b's core.
    ca.send_many(&b, (0..offline).map(|i| numbered(i, PAYLOAD)));
    let k = c.core_of(&b);
    let stored = eventually("600 stored", Duration::from_secs(20), || {
        c.cores[k].metric("iris_core_delivers_total") >= offline as u64
    });
    // The rest (about 1,000/s) while b logs in on the other edge: its drain and the live flow
    // overlap, then everything is live.
    let sender = Sender::start(ca, &b, offline..n, 20, Duration::from_millis(20));
    let cb = c.login(1, &b);
    let at_login = sender.sent();
    let got = Arc::new(Mutex::new(Vec::new()));
    let want: HashSet<usize> = (0..n).collect();
    let r = Receiver::start(cb, Arc::clone(&got), want, Duration::from_secs(45));
    let _ca = sender.finish();
    let sent_in = t0.elapsed();
    let (mut cb, end) = r.join();
    cb.expect_silence(Duration::from_millis(500));
    let got = got.lock().unwrap().clone();
    let want: Vec<usize> = (0..n).collect();
    assert_eq!(
        end,
        End::Done,
        "{}",
        describe_sequence_diff(&got, &want).unwrap_or_default()
    );
    assert_eq!(
        describe_sequence_diff(&got, &want),
        None,
        "b logged in after {at_login} were sent"
    );
    assert!(
        at_login < n,
        "the login came after everything was sent: nothing was live"
    );
    eprintln!(
        "cluster timing: {n} messages ({offline} stored in {stored:?}, b logged in after \
         {at_login}), sent in {sent_in:?}, all received in order in {:?}",
        t0.elapsed()
    );
}

#[test]
fn typing_and_read_receipts_cross_edges() {
    let c = Cluster::default_region();
    let a = unique("ta");
    let b = unique("tb");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    // A message each way first: both routes are in place.
    ca.send(&b, b"hello b");
    let (id_b, p) = recv_one(&mut cb, Duration::from_secs(15), "a → b");
    assert_eq!(p, b"hello b");
    cb.send(&a, b"hello a");
    let (_, p) = recv_one(&mut ca, Duration::from_secs(15), "b → a");
    assert_eq!(p, b"hello a");
    let t0 = Instant::now();
    ca.write(&wire::typing(b.as_bytes(), true));
    match cb.recv_within(Duration::from_secs(10)) {
        Some(Frame::Typing { sender, on }) => {
            assert_eq!(sender, a.as_bytes());
            assert_eq!(on, 1);
        }
        other => panic!("expected TYPING_RELAY (on) from {a}, got {other:?}"),
    }
    let typing = t0.elapsed();
    ca.write(&wire::typing(b.as_bytes(), false));
    match cb.recv_within(Duration::from_secs(10)) {
        Some(Frame::Typing { sender, on }) => {
            assert_eq!(sender, a.as_bytes());
            assert_eq!(on, 0);
        }
        other => panic!("expected TYPING_RELAY (off) from {a}, got {other:?}"),
    }
    // b read a's message: a (on the other edge) gets the receipt.
    let before = iris_tests::unix_ms();
    cb.write(&wire::read_receipt(&id_b, a.as_bytes()));
    match ca.recv_within(Duration::from_secs(10)) {
        Some(Frame::Receipt {
            id,
            reader,
            unix_ms,
        }) => {
            assert_eq!(id, id_b);
            assert_eq!(reader, b.as_bytes());
            assert!(
                unix_ms + 2000 >= before && unix_ms <= iris_tests::unix_ms() + 2000,
                "receipt time {unix_ms} vs {before}"
            );
        }
        other => panic!("expected READ_RECEIPT_RELAY from {b}, got {other:?}"),
    }
    // Never stored: a new login of b gets nothing.
    cb.shutdown();
    let mut cb = c.login(0, &b);
    cb.expect_silence(Duration::from_millis(800));
    eprintln!("cluster timing: typing relayed across edges in {typing:?}");
}

#[test]
fn prekeys_uploaded_on_one_edge_are_fetched_on_another() {
    let c = Cluster::default_region();
    let a = unique("ka");
    let b = unique("kb");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    // Unknown user: the not_found bundle.
    cb.write(&wire::fetch_prekeys(unique("nobody").as_bytes()));
    assert_eq!(
        cb.recv_within(Duration::from_secs(10)),
        Some(Frame::Prekeys(cbor::NOT_FOUND.to_vec()))
    );
    let ik = [0x11u8; 32];
    let bundle = cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("opk", cbor::V::Uint(1))]);
    ca.write(&wire::upload_prekeys(&bundle));
    let fetch = |cl: &mut iris_tests::Client, want: &[u8]| -> Duration {
        let t0 = Instant::now();
        loop {
            cl.write(&wire::fetch_prekeys(a.as_bytes()));
            match cl.recv_within(Duration::from_secs(10)) {
                Some(Frame::Prekeys(got)) if got == want => return t0.elapsed(),
                Some(Frame::Prekeys(_)) if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => panic!("fetching {a}'s prekeys: got {other:?}, want {want:?}"),
            }
        }
    };
    let took = fetch(&mut cb, &bundle);
    // A new upload replaces it, seen from both edges.
    let bundle2 = cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("opk", cbor::V::Uint(2))]);
    ca.write(&wire::upload_prekeys(&bundle2));
    fetch(&mut cb, &bundle2);
    fetch(&mut ca, &bundle2);
    eprintln!("cluster timing: prekeys visible on the other edge after {took:?}");
}

#[test]
fn corrupted_records_on_every_topic_are_skipped() {
    use iris_bus::{encode, BusFrame, Deliver};
    let mut c = Cluster::default_region();
    let a = unique("ca");
    let b = unique("cb");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    ca.send(&b, b"before the garbage");
    let (_, got) = recv_one(&mut cb, Duration::from_secs(15), "message before garbage");
    assert_eq!(got, b"before the garbage");
    let p = c.opts.partitions as i32;
    let edge_bad = |c: &Cluster, e: usize| c.edge_metric(e, "iris_bus_bad_frames_total");
    assert_eq!(edge_bad(&c, 0) + edge_bad(&c, 1), 0);
    // A well-formed frame under a version byte no build reads.
    let mut unknown_version = encode(&BusFrame::Deliver(Deliver {
        id: 1,
        recipient: b.as_bytes().to_vec(),
        sender: a.as_bytes().to_vec(),
        payload: b"from the future".to_vec(),
        origin: c.region.clone(),
        kind: 0,
        confirm: None,
    }))
    .unwrap();
    unknown_version[0] = iris_bus::VERSION.wrapping_add(1);
    // The right version byte, then garbage (invalid); and plain garbage (its first byte, 0, is
    // no version either).
    let mut bad_body = vec![iris_bus::VERSION];
    bad_body.extend_from_slice(b"\xff\xff\xff\xffno archive here at all, just bytes");
    let garbage = b"\x00\x01\x02 garbage \xfe\xff".to_vec();
    let records = [&unknown_version, &bad_body, &garbage];
    let unknown_per_topic = 2;
    let raw = RawProducer::new(&c.broker.brokers());
    for part in 0..p {
        for r in records {
            raw.send(&topics::deliver(&c.region), part, b.as_bytes(), r);
            raw.send(&topics::presence(&c.region), part, b.as_bytes(), r);
        }
    }
    for node in 1..=2 {
        for r in records {
            raw.send(&topics::edge_inbox(&c.region, node), 0, b.as_bytes(), r);
        }
    }
    raw.flush();
    let per_topic = records.len() as u64;
    // Every edge reads its inbox and every presence partition.
    let want_edge = per_topic * (p as u64 + 1);
    for e in 0..2 {
        eventually(
            &format!("edge {} counts {want_edge} bad frames", e + 1),
            Duration::from_secs(20),
            || edge_bad(&c, e) >= want_edge,
        );
        assert_eq!(edge_bad(&c, e), want_edge, "edge {}", e + 1);
        assert_eq!(
            c.edge_metric(e, "iris_bus_unknown_version_frames_total"),
            unknown_per_topic * (p as u64 + 1),
            "edge {}",
            e + 1
        );
    }
    // The cores read the deliver partitions and the same-numbered presence partitions (each its
    // own).
    let want_core = per_topic * 2 * p as u64;
    let core_bad = |c: &mut Cluster| {
        c.core_metric("iris_core_bus_frames_total{outcome=\"invalid\"}")
            + c.core_metric("iris_core_bus_frames_total{outcome=\"unknown_version\"}")
    };
    eventually(
        &format!("cores count {want_core} bad frames"),
        Duration::from_secs(20),
        || core_bad(&mut c) >= want_core,
    );
    assert_eq!(core_bad(&mut c), want_core);
    assert_eq!(
        c.core_metric("iris_core_bus_frames_total{outcome=\"unknown_version\"}"),
        unknown_per_topic * 2 * p as u64
    );
    c.assert_running();
    // Everything still works: a message each way, and presence.
    ca.send(&b, b"after the garbage");
    let (_, got) = recv_one(&mut cb, Duration::from_secs(15), "message after garbage");
    assert_eq!(got, b"after the garbage");
    cb.send(&a, b"and back");
    let (_, got) = recv_one(&mut ca, Duration::from_secs(15), "reply after garbage");
    assert_eq!(got, b"and back");
    cb.expect_silence(Duration::from_millis(300));
    let late = unique("cl");
    let _cl = c.login(1, &late);
    wait_status(
        &mut ca,
        &late,
        Duration::from_secs(5),
        "presence after garbage",
        |on, _| on == 1,
    );
}
