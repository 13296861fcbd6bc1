//! The direct live path: a message's live copy goes from the sender's edge straight to the
//! inbox of every edge holding the recipient (one broker hop), the stored copy to the core (the
//! fallback), and the receiving edge writes whichever copy comes first and drops the other.
//! Every session of a user, on every edge, gets every message live; a user hopping between edges
//! under load gets everything and its session record ends pointing only where it is.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iris_tests::cluster::{redis_hgetall, signal_pid, Cluster, ClusterOpts};
use iris_tests::owed::relogins_under_a_stream;
use iris_tests::{describe_sequence_diff, number_of, numbered, unique, Client};

use crate::common::*;

const FORWARDS: &str = "iris_edge_bus_forwards_out_total";
const DIRECT_IN: &str = "iris_edge_bus_direct_in_total";
const CORE_IN: &str = "iris_edge_bus_delivers_in_total";
const SUPPRESSED: &str = "iris_edge_bus_duplicates_suppressed_total";

/// The count of edge `i`'s `iris_edge_hop_seconds` histogram for `hop`.
fn hop_count(c: &Cluster, i: usize, hop: &str) -> u64 {
    c.edge_metric(i, &format!("iris_edge_hop_seconds_count{{hop=\"{hop}\"}}"))
}

/// Sends probe messages from `sender` (logged in on edge `from`) to `user` until edge `from`
/// forwards one straight to another edge (its presence cache knows `user` there); every client
/// in `devices` (the sessions of `user`) receives each probe. Returns the probes sent.
fn wait_direct(
    c: &Cluster,
    from: usize,
    sender: &mut Client,
    user: &str,
    devices: &mut [&mut Client],
) -> u64 {
    let t0 = Instant::now();
    let mut probes = 0;
    loop {
        let before = c.edge_metric(from, FORWARDS);
        sender.send(user, b"probe");
        probes += 1;
        for d in devices.iter_mut() {
            let (_, p) = recv_one(d, Duration::from_secs(15), "probe");
            assert_eq!(p, b"probe");
        }
        if c.edge_metric(from, FORWARDS) > before {
            return probes;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "edge {} never learnt where {user} is",
            from + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With the core member that owns the recipient stopped (SIGSTOP), messages still arrive live
/// through the direct path, in order; after SIGCONT the core's copies reach the recipient's edge
/// and are dropped there, none written twice. (The recipient acks only then: the core does not
/// route a copy whose ack it consumed in the same window.)
#[test]
fn direct_copies_arrive_while_the_recipients_core_is_stopped() {
    const N: usize = 200;
    let mut c = Cluster::default_region();
    assert!(c.wait_startup_presence());
    let a = unique("da");
    let b = unique("db");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    let probes = wait_direct(&c, 0, &mut ca, &b, &mut [&mut cb]);
    // The probes' core copies are in (and dropped) before the core stops.
    eventually("core copies of the probes", Duration::from_secs(15), || {
        c.edge_metric(1, CORE_IN) >= probes
    });
    // The second copy of a probe can trail its first by a fetch: wait for the drops (a probe
    // written twice would never be counted as dropped).
    eventually(
        "second copies of the probes dropped",
        Duration::from_secs(15),
        || c.edge_metric(1, SUPPRESSED) >= probes - 1,
    );
    let core_in = c.edge_metric(1, CORE_IN);
    let direct_in = c.edge_metric(1, DIRECT_IN);
    let suppressed = c.edge_metric(1, SUPPRESSED);

    // (Probes may have been written by b's login drain rather than live.)
    let written = hop_count(&c, 1, "written");
    let delivered = c.edge_metric(1, "iris_edge_messages_delivered_live_total");
    let k = c.core_of(&b);
    let pid = c.cores[k].pid();
    signal_pid(pid, "STOP");
    let t0 = Instant::now();
    ca.send_many(&b, (0..N).map(|i| numbered(i, PAYLOAD)));
    let msgs = cb.recv_msgs(N, false);
    let live = t0.elapsed();
    let got: Vec<usize> = msgs.iter().map(|(_, p)| number_of(p)).collect();
    let want: Vec<usize> = (0..N).collect();
    assert_eq!(describe_sequence_diff(&got, &want), None, "direct path");
    assert_eq!(
        c.edge_metric(1, CORE_IN),
        core_in,
        "nothing can come through a stopped core"
    );
    assert!(c.edge_metric(1, DIRECT_IN) >= direct_in + N as u64);
    c.cores[k].assert_running();

    signal_pid(pid, "CONT");
    let t1 = Instant::now();
    eventually(
        "the core's copies reach edge 2 and are dropped",
        Duration::from_secs(30),
        || {
            c.edge_metric(1, CORE_IN) >= core_in + N as u64
                && c.edge_metric(1, SUPPRESSED) >= suppressed + N as u64
        },
    );
    let fallback = t1.elapsed();
    cb.expect_silence(Duration::from_millis(1000));
    for (id, _) in &msgs {
        cb.ack_later(id);
    }
    cb.flush_acks();
    // Acked: nothing is left stored for a new login.
    eventually("acks consumed", Duration::from_secs(15), || {
        c.cores[k].metric("iris_core_acks_total") >= N as u64 + probes
    });
    cb.shutdown();
    let mut again = c.login(0, &b);
    again.expect_silence(Duration::from_millis(1000));
    // Every copy is in the per-hop histograms, and every message was written once.
    let hops = ["inbox_direct", "inbox_core", "written"].map(|h| hop_count(&c, 1, h));
    let n = N as u64;
    assert!(
        hops[0] > n && hops[1] >= n + probes && hops[2] >= written + n,
        "hop counts {hops:?} for {N} messages and {probes} probes ({written} written before)"
    );
    assert_eq!(
        c.edge_metric(1, "iris_edge_messages_delivered_live_total"),
        delivered + n,
        "each written once"
    );
    eprintln!(
        "cluster timing: {N} messages live with the core stopped in {live:?}; \
         core copies dropped {fallback:?} after SIGCONT"
    );
}

/// The same user on both edges (two devices), two senders (one per edge): both devices get
/// every message live, exactly once, in each sender's order.
#[test]
fn two_devices_on_two_edges_both_get_every_message_live() {
    const N: usize = 400;
    let c = Cluster::default_region();
    assert!(c.wait_startup_presence());
    let b = unique("mb");
    let mut b0 = c.login(0, &b);
    let mut b1 = c.login(1, &b);
    let s0 = unique("ms0");
    let s1 = unique("ms1");
    let mut c0 = c.login(0, &s0);
    let mut c1 = c.login(1, &s1);
    let probes = wait_direct(&c, 0, &mut c0, &b, &mut [&mut b0, &mut b1])
        + wait_direct(&c, 1, &mut c1, &b, &mut [&mut b0, &mut b1]);
    let snapshot = |c: &Cluster, i: usize| {
        [
            c.edge_metric(i, SUPPRESSED),
            c.edge_metric(i, CORE_IN),
            c.edge_metric(i, "iris_edge_messages_delivered_live_total"),
        ]
    };
    let before = [snapshot(&c, 0), snapshot(&c, 1)];

    let all: HashSet<usize> = (0..2 * N).collect();
    let got = [
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    ];
    let r0 = Receiver::start(
        b0,
        Arc::clone(&got[0]),
        all.clone(),
        Duration::from_secs(60),
    );
    let r1 = Receiver::start(b1, Arc::clone(&got[1]), all, Duration::from_secs(60));
    let t0 = Instant::now();
    let p0 = Sender::start(c0, &b, 0..N, 20, Duration::from_millis(10));
    let p1 = Sender::start(c1, &b, N..2 * N, 20, Duration::from_millis(10));
    p0.finish();
    p1.finish();
    let mut ends = Vec::new();
    for r in [r0, r1] {
        let (mut cl, end) = r.join();
        ends.push(end);
        // Copies that trail (a duplicate would come within this time).
        let i = ends.len() - 1;
        let never: HashSet<usize> = [usize::MAX].into_iter().collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let trail = collect(
            &mut cl,
            &got[i],
            &never,
            Instant::now() + Duration::from_millis(1500),
            &stop,
        );
        assert_eq!(trail, End::Timeout);
    }
    let took = t0.elapsed();
    for (i, end) in ends.iter().enumerate() {
        let g = got[i].lock().unwrap().clone();
        assert_eq!(
            *end,
            End::Done,
            "device on edge {}: missing {:?}",
            i + 1,
            missing(&g, 2 * N)
        );
        let (dup, extra) = duplicates(&g);
        assert_eq!(extra, 0, "device on edge {} got duplicates {dup:?}", i + 1);
        for (from, range) in [(1, 0..N), (2, N..2 * N)] {
            let seq: Vec<usize> = g.iter().copied().filter(|k| range.contains(k)).collect();
            let want: Vec<usize> = range.collect();
            assert_eq!(
                describe_sequence_diff(&seq, &want),
                None,
                "device on edge {}, sender on edge {from}",
                i + 1
            );
        }
    }
    // Each edge forwarded its sender's messages to the other edge, wrote each message once to
    // its device, and dropped every second copy: one per copy the core routed to it (the core
    // routes a copy unless it consumed the recipient's ack in the same window; it arrives before
    // or after the direct or local one).
    for (i, before) in before.iter().enumerate() {
        assert!(c.edge_metric(i, FORWARDS) >= N as u64);
        let mut last = [0; 3];
        let settled = iris_tests::wait_until(Duration::from_secs(10), || {
            let now = snapshot(&c, i);
            last = [0, 1, 2].map(|k| now[k] - before[k]);
            // A probe's second copy may still have been on its way at the snapshot.
            last[0] >= last[1] && last[0] <= last[1] + probes
        });
        assert!(
            settled,
            "edge {}: [dropped, core copies, written] = {last:?}",
            i + 1
        );
        assert_eq!(last[2], 2 * N as u64, "edge {}: written once each", i + 1);
        eprintln!(
            "edge {}: {} core copies, all dropped; {} written",
            i + 1,
            last[1],
            last[2]
        );
    }
    eprintln!(
        "cluster timing: {} messages to two devices in {took:?}",
        2 * N
    );
}

/// The field names of `user`'s session record in Redis that name an edge node.
fn session_nodes(c: &Cluster, user: &str) -> Vec<String> {
    let mut key = b"session:".to_vec();
    key.extend_from_slice(user.as_bytes());
    let mut f: Vec<String> = redis_hgetall(c.redis.port(), &key)
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .filter(|k| k.starts_with('@'))
        .collect();
    f.sort();
    f
}

/// A user hops between the two edges again and again while messages are sent to it all the
/// time (login on the other edge first, then the old connection closes): it gets every message,
/// and its session record ends naming only the edge it is on.
#[test]
fn a_user_hopping_between_edges_under_load_gets_everything() {
    const N: usize = 2500;
    const HOPS: usize = 8;
    let c = Cluster::default_region();
    assert!(c.wait_startup_presence());
    let a = unique("ha");
    let b = unique("hb");
    let ca = c.login(0, &a);
    let mut edge = 1;
    let cb = c.login(edge, &b);
    let all: HashSet<usize> = (0..N).collect();
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut r = Receiver::start(cb, Arc::clone(&got), all.clone(), Duration::from_secs(120));
    let t0 = Instant::now();
    // About 500 messages/s for 5 s.
    let s = Sender::start(ca, &b, 0..N, 10, Duration::from_millis(20));
    let mut records = Vec::new();
    for _ in 0..HOPS {
        std::thread::sleep(Duration::from_millis(450));
        edge = 1 - edge;
        let next = c.login(edge, &b);
        r.stop();
        let (old, _) = r.join();
        r = Receiver::start(
            next,
            Arc::clone(&got),
            all.clone(),
            Duration::from_secs(120),
        );
        old.shutdown();
        records.push(session_nodes(&c, &b));
    }
    s.finish();
    let (_cb, end) = settle(r, N, Duration::from_secs(10), Duration::from_secs(60));
    let g = got.lock().unwrap().clone();
    assert_eq!(
        missing(&g, N),
        Vec::<usize>::new(),
        "lost while hopping ({end:?})"
    );
    let (_, extra) = duplicates(&g);
    let took = t0.elapsed();
    // The record names exactly the edge the user is on (the old edge's offline is written).
    let want = vec![format!("@{}/{}", c.region, edge + 1)];
    let mut last = Vec::new();
    let pointed = iris_tests::wait_until(Duration::from_secs(10), || {
        last = session_nodes(&c, &b);
        last == want
    });
    assert!(
        pointed,
        "session record of {b} names {last:?}, the user is on {want:?} (during the hops: {records:?})"
    );
    eprintln!(
        "cluster timing: {N} messages to a user hopping {HOPS} times in {took:?}, \
         {extra} duplicates (redelivered after a hop)"
    );
}

/// With `[cluster] direct_live = false` nothing goes straight to another edge: every live copy is
/// the core's (two broker hops), and every message still arrives live, in order, exactly once.
#[test]
fn with_direct_live_off_only_the_core_routes_live_copies() {
    const N: usize = 300;
    let opts = iris_tests::cluster::ClusterOpts {
        edge_config: Some("[cluster]\ndirect_live = false\n".to_owned()),
        ..iris_tests::cluster::ClusterOpts::default()
    };
    let c = Cluster::start(opts);
    assert!(c.wait_startup_presence());
    let a = unique("oa");
    let b = unique("ob");
    let mut cb = c.login(1, &b);
    let mut ca = c.login(0, &a);
    // Until edge 1 has seen b's presence the test proves nothing: wait for it to be visible.
    eventually(
        "b online as seen from edge 1",
        Duration::from_secs(10),
        || ca.status(&b).0 == 1,
    );
    for i in 0..N {
        ca.send(&b, &numbered(i, 64));
    }
    let mut got = Vec::with_capacity(N);
    while got.len() < N {
        let (_, p) = recv_one(
            &mut cb,
            Duration::from_secs(20),
            "a message routed by the core",
        );
        got.push(number_of(&p));
    }
    let want: Vec<usize> = (0..N).collect();
    assert!(
        got == want,
        "{}",
        describe_sequence_diff(&got, &want).unwrap_or_default()
    );
    assert!(
        cb.recv_within(Duration::from_millis(300)).is_none(),
        "a copy written twice"
    );
    assert_eq!(
        c.edge_metric(0, FORWARDS),
        0,
        "edge 1 forwarded with direct_live off"
    );
    assert_eq!(c.edge_metric(1, DIRECT_IN), 0);
    assert!(c.edge_metric(1, CORE_IN) >= N as u64);
}

/// A recipient on edge 2 logs in again and again on one connection while a stream from edge 1
/// goes on, every other LOGIN right after the last LOGIN_OK, while that session's drain request
/// or its answer is still on the bus ([`relogins_under_a_stream`]). Each session must bring
/// every message edge 1 had accepted before its LOGIN, although the new drain takes the old
/// one's answer: the core writes that answer and the copies it routes after it into the edge's
/// inbox in order (docs/ARCHITECTURE.md, "Login and the drain").
fn relogins_through_a_region(direct_live: bool) {
    let c = Cluster::start(ClusterOpts {
        edge_config: Some(format!(
            "login_settle_us = 0\n[cluster]\ndirect_live = {direct_live}\n"
        )),
        ..ClusterOpts::default()
    });
    assert!(c.wait_startup_presence());
    let rcpt = unique("relogin-r");
    let sessions = relogins_under_a_stream(
        c.login(0, &unique("relogin-s")),
        c.edge(1).connect(),
        &rcpt,
        600,
        Duration::from_secs(20),
    );
    eprintln!("relogins (direct_live = {direct_live}): {sessions} sessions");
}

#[test]
fn a_recipient_logging_in_again_on_one_socket_under_a_stream_gets_every_message() {
    relogins_through_a_region(true);
}

/// The same with only the core routing live copies: each message has one live copy, so one
/// held by the old session and dropped with it can only come from the drain.
#[test]
fn a_recipient_logging_in_again_on_one_socket_gets_every_message_with_direct_copies_off() {
    relogins_through_a_region(false);
}
