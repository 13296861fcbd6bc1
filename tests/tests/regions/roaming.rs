//! A user logged in outside its home region (a roamer): it gets what was stored at home before
//! (drained over the global bus) and what is sent live after its login, from both regions; its
//! acks delete at home; its prekeys (uploaded at home) are fetched from the other region. And
//! the global route topics never carry presence: after logins and logouts on both sides (a
//! roamer included) every record on every `iris.global.route.*` topic is a `Route` of a
//! routable frame.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use iris_tests::cluster::{region_names, Regions};
use iris_tests::{cbor, describe_sequence_diff, numbered, wire, Client, Frame};

use crate::common::{eventually, recv_one, PAYLOAD};
use crate::delivery::{core_m, recv_numbers, small, CROSS};

/// Fetches `user`'s prekeys through `c` until the answer is `want` (at most 20 s).
fn fetch_until(c: &mut Client, user: &str, want: &[u8]) -> Duration {
    let t0 = Instant::now();
    loop {
        c.write(&wire::fetch_prekeys(user.as_bytes()));
        match c.recv_within(CROSS) {
            Some(Frame::Prekeys(got)) if got == want => return t0.elapsed(),
            Some(Frame::Prekeys(got)) if t0.elapsed() < Duration::from_secs(20) => {
                let _ = got;
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("fetching {user}'s prekeys: got {other:?}, want {want:?}"),
        }
    }
}

#[test]
fn a_roaming_user_gets_stored_and_live_messages_and_acks_at_home() {
    const STORED: usize = 40;
    const LIVE: usize = 40;
    let names = region_names(2);
    let r = Regions::start(&names, small());
    let roamer = r.user_homed_in(1, "rm");
    let s0 = r.user_homed_in(0, "rs0"); // sender in the visited region
    let s1 = r.user_homed_in(1, "rs1"); // sender at the roamer's home
    let u0 = r.user_homed_in(0, "ru0"); // fetches the roamer's prekeys from the visited region

    // At home first: upload prekeys, then leave.
    let ik = [0x5au8; 32];
    let bundle = cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("opk", cbor::V::Uint(3))]);
    let mut home = r.region(1).login(0, &roamer);
    home.write(&wire::upload_prekeys(&bundle));
    fetch_until(&mut home, &roamer, &bundle);
    home.shutdown();

    // Stored at home while it is offline: from region 0 (across) and from region 1 (local).
    let mut c0 = r.region(0).login(0, &s0);
    let mut c1 = r.region(1).login(0, &s1);
    c0.send_many(&roamer, (0..STORED / 2).map(|k| numbered(k, PAYLOAD)));
    c1.send_many(&roamer, (STORED / 2..STORED).map(|k| numbered(k, PAYLOAD)));
    // (Counted as delivers, not necessarily as offline: the roamer's home session may still
    // be known for a moment after its logout.)
    eventually("stored at the roamer's home", CROSS, || {
        core_m(&r, 1, "iris_core_delivers_total") >= STORED as u64
    });
    assert_eq!(core_m(&r, 1, "iris_core_delivers_total"), STORED as u64);
    assert_eq!(core_m(&r, 0, "iris_core_delivers_total"), 0);

    // The roamer logs in to region 0: its home's stored messages come over the global bus.
    let t0 = Instant::now();
    let mut cr = r.region(0).login(1, &roamer);
    let mut got = recv_numbers(&mut cr, STORED);
    let drained = t0.elapsed();
    got.sort_unstable(); // two senders: per-sender order is checked below
    assert_eq!(
        got,
        (0..STORED).collect::<Vec<_>>(),
        "drained at the visited region"
    );
    eventually("roamer entry at home", CROSS, || {
        core_m(&r, 1, "iris_core_roamers") >= 1
    });

    // Live, after the login: from the visited region and from home, each in order.
    c0.send_many(&roamer, (100..100 + LIVE).map(|k| numbered(k, PAYLOAD)));
    let got = recv_numbers(&mut cr, LIVE);
    assert_eq!(
        describe_sequence_diff(&got, &(100..100 + LIVE).collect::<Vec<_>>()),
        None,
        "live from the visited region"
    );
    c1.send_many(&roamer, (200..200 + LIVE).map(|k| numbered(k, PAYLOAD)));
    let got = recv_numbers(&mut cr, LIVE);
    assert_eq!(
        describe_sequence_diff(&got, &(200..200 + LIVE).collect::<Vec<_>>()),
        None,
        "live from home"
    );
    cr.expect_silence(Duration::from_millis(800));
    // Everything was stored at home, nothing in the visited region.
    let total = (STORED + 2 * LIVE) as u64;
    assert_eq!(core_m(&r, 1, "iris_core_delivers_total"), total);
    assert_eq!(core_m(&r, 0, "iris_core_delivers_total"), 0);

    // The roamer's prekeys (uploaded at home) fetched by a user of the visited region.
    let mut cu = r.region(0).login(0, &u0);
    let took = fetch_until(&mut cu, &roamer, &bundle);

    // Its acks (sent from region 0) deleted everything at home.
    eventually("the roamer's acks applied at home", CROSS, || {
        core_m(&r, 1, "iris_core_acks_total") >= total
    });
    cr.sync();
    cr.shutdown();
    let mut again = r.region(1).login(1, &roamer);
    again.expect_silence(Duration::from_millis(1500));
    // And a live message at home reaches it at home again.
    c1.send(&roamer, &numbered(999, PAYLOAD));
    let (_, p) = recv_one(&mut again, CROSS, "at home again");
    assert_eq!(p, numbered(999, PAYLOAD));
    eprintln!(
        "regions: roamer drained {STORED} in {drained:?}; prekeys fetched across in {took:?}"
    );
}

/// Every record of `iris.global.route.{region}` for each region, from the beginning to the high
/// watermark: (topic region, record payload).
pub fn global_records(r: &Regions, partitions: u32) -> Vec<(String, Vec<u8>)> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", r.global.brokers())
        .set("group.id", iris_tests::unique("route-reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut out = Vec::new();
    for name in &r.names {
        let topic = iris_bus::topics::route(name);
        for p in 0..partitions as i32 {
            let (lo, hi) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks of {topic}/{p}: {e}"));
            if hi <= lo {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, p, Offset::Offset(lo))
                .unwrap();
            consumer.assign(&tpl).expect("assign");
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut next = lo;
            while next < hi {
                assert!(
                    Instant::now() < deadline,
                    "{topic}/{p}: read up to {next} of {hi} in 20 s"
                );
                if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                    let m = m.expect("consume");
                    next = m.offset() + 1;
                    out.push((name.clone(), m.payload().unwrap_or_default().to_vec()));
                }
            }
        }
    }
    out
}

#[test]
fn no_presence_frames_on_the_global_topics() {
    let names = region_names(2);
    let r = Regions::start(&names, small());
    let a = r.users_homed_in(0, "na", 2);
    let b = r.users_homed_in(1, "nb", 2);
    let roamer = r.user_homed_in(1, "nr");
    // Logins on both sides, messages both ways, status queries, a roamer, logouts.
    let mut ca = r.region(0).login(0, &a[0]);
    let mut cb = r.region(1).login(0, &b[0]);
    let ca2 = r.region(0).login(1, &a[1]);
    let cb2 = r.region(1).login(1, &b[1]);
    ca.send(&b[0], b"a to b");
    assert_eq!(recv_one(&mut cb, CROSS, "a → b").1, b"a to b");
    cb.send(&a[0], b"b to a");
    assert_eq!(recv_one(&mut ca, CROSS, "b → a").1, b"b to a");
    let _ = ca.status(&b[1]);
    let _ = cb.status(&a[1]);
    let mut cr = r.region(0).login(1, &roamer);
    ca.send(&roamer, b"to the roamer");
    assert_eq!(recv_one(&mut cr, CROSS, "a → roamer").1, b"to the roamer");
    ca2.shutdown();
    cb2.shutdown();
    cr.shutdown();
    let _ = r.region(1).login(1, &roamer);
    // Give the logouts' presence every chance to leak.
    std::thread::sleep(Duration::from_secs(2));
    let records = global_records(&r, r.region(0).opts.partitions);
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (topic_region, bytes) in &records {
        let f = iris_bus::decode(bytes)
            .unwrap_or_else(|e| panic!("record on the route topic of {topic_region}: {e}"));
        match f {
            iris_bus::ArchivedBusFrame::Route(route) => {
                assert_eq!(
                    route.region.as_str(),
                    topic_region,
                    "a route for {} on {topic_region}'s topic",
                    route.region
                );
                let inner = format!("{:?}", route.inner);
                let kind = inner.split('(').next().unwrap_or_default().to_owned();
                assert!(
                    !inner.contains("Presence") && !inner.contains("EdgeReset"),
                    "presence inside a route: {inner}"
                );
                *kinds.entry(kind).or_default() += 1;
            }
            other => panic!(
                "a {:?} frame on the global route topic of {topic_region} (only routes belong \
                 there)",
                other.kind()
            ),
        }
    }
    eprintln!(
        "regions: {} records on the global route topics: {kinds:?}",
        records.len()
    );
    assert!(
        kinds.get("Deliver").copied().unwrap_or(0) >= 2,
        "the scenario's cross-region messages are on the global topics: {kinds:?}"
    );
    assert!(
        kinds.contains_key("DrainRequest"),
        "the roamer's drain request is on the global topics: {kinds:?}"
    );
}
