//! Crashes while load runs: `kill -9` of the recipient's edge, of the core that owns the
//! recipient, of the broker (sqlite storage) and of Redis. A sends numbered messages from edge 1
//! to B on edge 2 (about 500/s, so the load runs before, during and after the crash); B acks
//! everything it gets. Nothing the core stored may be lost; duplicates are counted and must come
//! from messages in flight at the crash.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iris_tests::cluster::{BrokerStorage, Cluster, ClusterOpts};
use iris_tests::{describe_sequence_diff, unique, Client};

use crate::common::*;

/// Messages per crash test.
const N: usize = 2000;
/// Messages per write and the pause between writes of the sender: about 500/s, so the load
/// runs before, during and after the crash.
const BATCH: usize = 10;
const PAUSE: Duration = Duration::from_millis(20);
/// B must have received this many live before the crash.
const BEFORE_CRASH: usize = 300;

/// Reads whatever else arrives within `d` (duplicates that trail), acking and recording it.
fn linger(c: &mut Client, got: &Mutex<Vec<usize>>, d: Duration) {
    let never: HashSet<usize> = [usize::MAX].into_iter().collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let end = collect(c, got, &never, Instant::now() + d, &stop);
    assert_eq!(end, End::Timeout, "while lingering");
}

/// Waits until `key` summed over the running cores stays the same for `still` (at most
/// `timeout`); returns the value.
fn settle_metric(c: &mut Cluster, key: &str, still: Duration, timeout: Duration) -> u64 {
    let t0 = Instant::now();
    let mut last = (c.core_metric(key), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let v = c.core_metric(key);
        if v != last.0 {
            last = (v, Instant::now());
        } else if last.1.elapsed() >= still {
            return v;
        }
        assert!(
            t0.elapsed() < timeout,
            "{key} still moving after {timeout:?}"
        );
    }
}

/// A fresh pair of users exchanges a message across the edges (the region works again).
fn fresh_pair_works(c: &Cluster, what: &str) {
    let u = unique("fu");
    let v = unique("fv");
    let mut cu = c.login(0, &u);
    let mut cv = c.login(1, &v);
    cu.send(&v, b"fresh");
    let (_, p) = recv_one(
        &mut cv,
        Duration::from_secs(20),
        &format!("{what}: fresh u → v"),
    );
    assert_eq!(p, b"fresh");
    cv.send(&u, b"fresh back");
    let (_, p) = recv_one(
        &mut cu,
        Duration::from_secs(20),
        &format!("{what}: fresh v → u"),
    );
    assert_eq!(p, b"fresh back");
}

#[test]
fn kill9_of_the_recipients_edge_under_load_loses_nothing() {
    let mut c = Cluster::default_region();
    let a = unique("ea");
    let b = unique("eb");
    let k = c.core_of(&b);
    let ca = c.login(0, &a);
    let cb = c.login(1, &b);
    let all: HashSet<usize> = (0..N).collect();
    let got = Arc::new(Mutex::new(Vec::new()));
    let r = Receiver::start(cb, Arc::clone(&got), all, Duration::from_secs(60));
    let t0 = Instant::now();
    let mut s = Sender::start(ca, &b, 0..N, BATCH, PAUSE);
    eventually(
        "live messages before the kill",
        Duration::from_secs(30),
        || r.count() >= BEFORE_CRASH,
    );
    let acks_before_kill = c.cores[k].metric("iris_core_acks_total");
    c.kill9_edge(1);
    let sent_at_kill = s.mark();
    let (_, end) = r.join();
    assert!(
        matches!(end, End::Closed(_)),
        "B's connection must end with its edge: {end:?}"
    );
    let pre = got.lock().unwrap().clone();
    let in_order: Vec<usize> = (0..pre.len()).collect();
    assert_eq!(
        describe_sequence_diff(&pre, &in_order),
        None,
        "live phase before the kill"
    );
    let t_restart = Instant::now();
    c.restart_edge(1);
    let restart_took = t_restart.elapsed();
    let _ca = s.finish();
    // Everything A sent is consumed by B's core, acks included (they precede the later delivers
    // on B's partition); then the acks it applied are a prefix of what B acked, in order.
    eventually("every deliver consumed", Duration::from_secs(30), || {
        c.cores[k].metric("iris_core_delivers_total") >= N as u64
    });
    let acked = settle_metric(
        &mut c,
        "iris_core_acks_total",
        Duration::from_millis(1500),
        Duration::from_secs(20),
    ) as usize;
    eprintln!(
        "edge kill: {} received before the kill, {acks_before_kill} acks applied just before it, \
         {acked} after it settled",
        pre.len()
    );
    assert!(
        acked <= pre.len(),
        "the core applied {acked} acks but B received only {} messages",
        pre.len()
    );
    // Log in on the restarted edge: exactly what the core did not see acked, in order.
    let acked_set: HashSet<usize> = pre[..acked].iter().copied().collect();
    let expected: Vec<usize> = (0..N).filter(|n| !acked_set.contains(n)).collect();
    let post = Arc::new(Mutex::new(Vec::new()));
    let t_login = Instant::now();
    let cb = c.login(1, &b);
    let r = Receiver::start(
        cb,
        Arc::clone(&post),
        expected.iter().copied().collect(),
        Duration::from_secs(20),
    );
    let (mut cb, end) = r.join();
    if end != End::Done {
        let p = post.lock().unwrap().clone();
        panic!(
            "after the restart and a login on it, B got {} of the {} stored messages within \
             20 s ({end:?}): {}; the restarted edge consumed {} records in {:?} since its \
             restart ({} received before the kill, {acked} acked)",
            p.len(),
            expected.len(),
            describe_sequence_diff(&p, &expected).unwrap_or_default(),
            c.edge_metric(1, "iris_bus_frames_in_total"),
            t_restart.elapsed(),
            pre.len()
        );
    }
    linger(&mut cb, &post, Duration::from_secs(1));
    let post = post.lock().unwrap().clone();
    assert_eq!(
        describe_sequence_diff(&post, &expected),
        None,
        "after the restart B gets exactly what the core had not seen acked ({acked} of {} \
         received before the kill were)",
        pre.len()
    );
    let mut everything = pre.clone();
    everything.extend_from_slice(&post);
    assert!(missing(&everything, N).is_empty());
    let (dups, extra) = duplicates(&everything);
    // Duplicates: exactly the messages B received but whose acks died with its edge.
    assert_eq!(extra, pre.len() - acked);
    assert!(
        dups.iter().all(|&d| d < sent_at_kill),
        "only messages sent before the kill may come twice: {dups:?}"
    );
    assert!(
        extra <= 1000,
        "{extra} duplicates: more than a second of load was in flight"
    );
    fresh_pair_works(&c, "after the edge restart");
    eprintln!(
        "cluster timing: edge kill -9 under load: {N} sent, {} received before the kill \
         ({sent_at_kill} sent), edge restart {restart_took:?}, {} delivered after the login in \
         {:?}, {extra} duplicates (unacked at the kill), test {:?}",
        pre.len(),
        post.len(),
        t_login.elapsed(),
        t0.elapsed()
    );
}

/// The part of the region a crash test kills.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// The core that owns B's partition.
    Core,
    /// The broker (sqlite storage: restarted on its file).
    Broker,
    /// Redis (comes back empty).
    Redis,
}

/// Load from A (edge 1) to B (edge 2); `part` is killed after B got [`BEFORE_CRASH`] and
/// restarted a second later. Everything must arrive (live, or at a new login of B when the
/// live phase stalls); duplicates only of messages in flight at the crash.
fn crash_under_load(part: Part) {
    let opts = ClusterOpts {
        broker: match part {
            Part::Broker => BrokerStorage::Sqlite,
            _ => BrokerStorage::Memory,
        },
        ..ClusterOpts::default()
    };
    let mut c = Cluster::start(opts);
    let a = unique("la");
    let b = unique("lb");
    let k = c.core_of(&b);
    let ca = c.login(0, &a);
    let cb = c.login(1, &b);
    let all: HashSet<usize> = (0..N).collect();
    let got = Arc::new(Mutex::new(Vec::new()));
    let r = Receiver::start(cb, Arc::clone(&got), all.clone(), Duration::from_secs(90));
    let t0 = Instant::now();
    let mut s = Sender::start(ca, &b, 0..N, BATCH, PAUSE);
    eventually(
        "live messages before the crash",
        Duration::from_secs(30),
        || r.count() >= BEFORE_CRASH,
    );
    let acked_before = c.cores[k].metric("iris_core_acks_total") as usize;
    let t_crash = Instant::now();
    match part {
        Part::Core => c.cores[k].kill9(),
        Part::Broker => c.broker.kill(),
        Part::Redis => c.redis.kill(),
    }
    let sent_at_crash = s.mark();
    std::thread::sleep(Duration::from_secs(1));
    match part {
        Part::Core => c.cores[k].restart(),
        Part::Broker => c.broker.restart(),
        Part::Redis => c.redis.restart(),
    }
    let down = t_crash.elapsed();
    let sent_at_recovery = s.mark();
    let _ca = s.finish();
    let sent_all = t0.elapsed();
    let (mut cb, end) = settle(r, N, Duration::from_secs(8), Duration::from_secs(60));
    let live_end = t0.elapsed();
    let live = got.lock().unwrap().clone();
    let live_missing = missing(&live, N);
    let mut relogin = None;
    if live_missing.is_empty() {
        linger(&mut cb, &got, Duration::from_secs(1));
    } else {
        // The live phase stalled (routes lost at the crash): what is stored comes with the next
        // login, once the acks B sent have all been applied.
        assert!(
            !matches!(end, End::Closed(_)),
            "B's edge closed its connection: {end:?}"
        );
        settle_metric(
            &mut c,
            "iris_core_acks_total",
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        cb.shutdown();
        let t = Instant::now();
        let cb = c.login(1, &b);
        let r = Receiver::start(cb, Arc::clone(&got), all, Duration::from_secs(30));
        let (mut cb, end) = r.join();
        assert_eq!(
            end,
            End::Done,
            "after a new login, still missing {:?}",
            missing(&got.lock().unwrap(), N)
        );
        linger(&mut cb, &got, Duration::from_secs(1));
        relogin = Some((live_missing.len(), t.elapsed()));
    }
    let everything = got.lock().unwrap().clone();
    assert!(
        missing(&everything, N).is_empty(),
        "lost: {:?}",
        missing(&everything, N)
    );
    // Per sender → recipient order: first arrivals increase within each phase.
    let firsts = first_arrivals(&live);
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "live phase out of order: {}",
        describe_sequence_diff(&firsts, &{
            let mut v = firsts.clone();
            v.sort_unstable();
            v
        })
        .unwrap_or_default()
    );
    let (dups, extra) = duplicates(&everything);
    assert!(
        dups.iter().all(|&d| d < sent_at_recovery),
        "duplicates of messages sent after the recovery ({sent_at_recovery} sent then): {dups:?}"
    );
    let in_flight = sent_at_recovery.saturating_sub(acked_before);
    assert!(
        extra <= in_flight,
        "{extra} duplicates but only {in_flight} messages were in flight ({sent_at_recovery} \
         sent at the recovery, {acked_before} acked before the crash)"
    );
    c.assert_running();
    fresh_pair_works(&c, &format!("after the {part:?} restart"));
    eprintln!(
        "cluster timing: {part:?} kill -9 under load: {N} sent in {sent_all:?} \
         ({sent_at_crash} at the crash, {sent_at_recovery} at the restart, down {down:?}), \
         live phase ended after {live_end:?} with {} missing, relogin {relogin:?}, {extra} \
         duplicates ({} numbers), test {:?}",
        live_missing.len(),
        dups.len(),
        t0.elapsed()
    );
}

#[test]
fn kill9_of_the_recipients_core_under_load_loses_nothing() {
    crash_under_load(Part::Core);
}

#[test]
fn broker_restart_under_load_loses_nothing() {
    crash_under_load(Part::Broker);
}

#[test]
fn redis_restart_under_load_loses_nothing() {
    crash_under_load(Part::Redis);
}
