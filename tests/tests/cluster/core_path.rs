//! The core's regional path end to end: drains of large messages across edges (chunks capped by
//! bytes), a message of the largest size a v1 SEND carries, and live delivery while Redis is
//! dead (the cores route from their presence-fed session cache).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iris_tests::cluster::{Cluster, ClusterOpts};
use iris_tests::{number_of, numbered, unique};

use crate::common::*;

/// The largest message a v1 SEND (`u16 mlen`) carries.
const MAX_SEND: usize = 65_535;

/// Waits until the cores have consumed `n` delivers in all (they are stored then).
fn wait_delivers(c: &mut Cluster, n: u64) {
    let t0 = Instant::now();
    while c.core_metric("iris_core_delivers_total") < n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the cores consumed {} of {n} delivers within 60 s",
            c.core_metric("iris_core_delivers_total")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn drain_of_100_messages_of_64_kb_across_edges_is_complete_in_order_and_exactly_once() {
    let mut c = Cluster::default_region();
    let a = unique("ga");
    let b = unique("gb");
    let mut ca = c.login(0, &a);
    // B never logged in: every message is stored by B's core, 100 × 64 KB = 6.4 MB, which no
    // single record could carry.
    for i in 0..100 {
        ca.send(&b, &numbered(i, 64_000));
    }
    wait_delivers(&mut c, 100);
    let t = Instant::now();
    let mut cb = c.login(1, &b);
    let got = cb.recv_msgs(100, true);
    let took = t.elapsed();
    let numbers: Vec<usize> = got.iter().map(|(_, p)| number_of(p)).collect();
    assert_eq!(numbers, (0..100).collect::<Vec<_>>(), "in order, each once");
    for (i, (_, p)) in got.iter().enumerate() {
        assert!(*p == numbered(i, 64_000), "payload of message {i}");
    }
    cb.expect_silence(Duration::from_secs(2));
    assert_eq!(
        c.core_metric("iris_core_producer_rejected_total"),
        0,
        "no chunk refused by the broker"
    );
    eprintln!("cluster timing: drain of 100 x 64 KB across edges in {took:?}");
}

#[test]
fn message_of_the_largest_send_size_is_routed_live_and_drained() {
    let mut c = Cluster::default_region();
    let a = unique("ma");
    let b = unique("mb");
    let d = unique("md");
    let mut ca = c.login(0, &a);
    let mut cb = c.login(1, &b);
    // Live, edge 1 → core → edge 2.
    let big = numbered(1, MAX_SEND);
    ca.send(&b, &big);
    let (_, p) = recv_one(
        &mut cb,
        Duration::from_secs(30),
        "the largest message, live",
    );
    assert!(p == big, "live payload intact ({} bytes)", p.len());
    // Stored, then drained on edge 2 with smaller ones around it.
    ca.send(&d, &numbered(2, 100));
    ca.send(&d, &numbered(3, MAX_SEND));
    ca.send(&d, &numbered(4, 100));
    wait_delivers(&mut c, 4);
    let mut cd = c.login(1, &d);
    let got = cd.recv_msgs(3, true);
    let sizes: Vec<(usize, usize)> = got.iter().map(|(_, p)| (number_of(p), p.len())).collect();
    assert_eq!(sizes, vec![(2, 100), (3, MAX_SEND), (4, 100)]);
    assert!(got[1].1 == numbered(3, MAX_SEND), "drained payload intact");
    cd.expect_silence(Duration::from_secs(1));
}

/// Messages of the Redis test and their pace (about 500/s).
const N: usize = 1500;
const BATCH: usize = 10;
const PAUSE: Duration = Duration::from_millis(20);

#[test]
fn redis_killed_under_load_online_recipient_keeps_getting_messages_live() {
    let mut c = Cluster::default_region();
    let a = unique("ra");
    let b = unique("rb");
    let ca = c.login(0, &a);
    let cb = c.login(1, &b);
    let all: HashSet<usize> = (0..N).collect();
    let got = Arc::new(Mutex::new(Vec::new()));
    let r = Receiver::start(cb, Arc::clone(&got), all, Duration::from_secs(120));
    let t0 = Instant::now();
    let mut s = Sender::start(ca, &b, 0..N, BATCH, PAUSE);
    eventually(
        "live messages before the kill",
        Duration::from_secs(30),
        || r.count() >= 300,
    );
    // The claim below is about the cores' presence cache: b must be in it before Redis dies (the
    // presence topic reaches the cores on its own pace; under load it came after the kill once,
    // and the messages all arrived by the direct path while the core's routes waited).
    eventually(
        "b's routes served from the core's presence cache",
        Duration::from_secs(30),
        || c.core_metric("iris_core_cache_hits_total") > 0,
    );
    c.redis.kill();
    let t_kill = Instant::now();
    let sent_at_kill = s.mark();
    let _ca = s.finish();
    // Redis stays dead: every message, also the ones sent after the kill, reaches B live (the
    // cores route from their presence cache), without a new login.
    let live = eventually(
        "every message live while Redis is dead",
        Duration::from_secs(60),
        || r.distinct() >= N,
    );
    let (mut cb, end) = settle(r, N, Duration::from_secs(2), Duration::from_secs(10));
    assert_eq!(end, End::Done, "receiver ended {end:?}");
    let outage = t_kill.elapsed();
    let everything = got.lock().unwrap().clone();
    assert!(missing(&everything, N).is_empty());
    let firsts = first_arrivals(&everything);
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "arrivals out of order"
    );
    let (dups, extra) = duplicates(&everything);
    assert_eq!(extra, 0, "duplicates: {dups:?}");
    cb.expect_silence(Duration::from_millis(500));
    let hits = c.core_metric("iris_core_cache_hits_total");
    assert!(
        hits >= (N - sent_at_kill) as u64,
        "{hits} routes from the presence cache, {} messages sent after the kill",
        N - sent_at_kill
    );
    c.redis.restart();
    c.assert_running();
    eprintln!(
        "cluster timing: Redis killed under load: {N} sent ({sent_at_kill} at the kill), all \
         live {live:?} after the last write, Redis down {outage:?}, test {:?}",
        t0.elapsed()
    );
}

/// The cluster core expires stored messages after `--message-ttl-secs`: the sweep deletes
/// them (counted), and a login after the TTL drains nothing, while a message sent after it is
/// delivered.
#[test]
fn the_core_expires_stored_messages_after_message_ttl_secs() {
    let mut c = Cluster::start(ClusterOpts {
        core_args: vec!["--message-ttl-secs".to_owned(), "1".to_owned()],
        ..ClusterOpts::default()
    });
    let a = unique("xa");
    let b = unique("xb");
    let mut ca = c.login(1, &a);
    ca.send_many(&b, (0..5).map(|i| numbered(i, 32)));
    ca.sync();
    let t0 = Instant::now();
    while c.core_metric("iris_core_expired_deleted_total") < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the messages never expired: {} deleted, {} delivers handled",
            c.core_metric("iris_core_expired_deleted_total"),
            c.core_metric("iris_core_delivers_total")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut cb = c.login(0, &b);
    cb.expect_silence(Duration::from_secs(1));
    ca.send(&b, b"after the ttl");
    assert_eq!(cb.recv_acked(), b"after the ttl");
}
