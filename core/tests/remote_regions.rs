//! The edge's cross-region out-path against real brokers: a regional tansu and a separate
//! global tansu. A request about a user homed in another region leaves the edge as a `Route`
//! frame on that region's route topic of the GLOBAL broker (never on the regional deliver
//! topic); a user homed here is handled as before; presence never reaches a global topic; and
//! routed messages accepted while the global broker hangs survive a kill -9 of the edge (the
//! outbox replays them to the global topic).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::consumer_from_beginning;
use iris_bus::home::Homes;
use iris_bus::kafka::KafkaConfig;
use iris_bus::{
    decode, to_owned, topics, BusFrame, Deliver, DrainRequest, PrekeyFetch, Relay, Route, Routed,
};
use iris_core::outbox::OutboxConfig;
use iris_core::remote::{RemoteConfig, RemoteCore, RemoteSnapshot};
use iris_core::{CoreRequest, StoredMsg};
use iris_tests::cluster::signal_pid;
use iris_tests::services::{RedisServer, Tansu};
use iris_tests::{number_of, numbered, wait_until, wire, Server, ServerOpts};
use rdkafka::message::Message;

/// This edge's region and the other one.
const OWN: &str = "ra";
const OTHER: &str = "rb";
const PARTITIONS: u32 = 2;

fn regions() -> Vec<String> {
    vec![OWN.to_owned(), OTHER.to_owned()]
}

/// The home table of these tests: `*-a` users live here, `*-b` users in the other region.
fn table() -> HashMap<Vec<u8>, String> {
    let mut t = HashMap::new();
    for u in ["alice-a", "dave-a"] {
        t.insert(u.as_bytes().to_vec(), OWN.to_owned());
    }
    for u in ["bob-b", "carol-b"] {
        t.insert(u.as_bytes().to_vec(), OTHER.to_owned());
    }
    t
}

/// The records of `topic` (all `parts` partitions) from its beginning: at least `want` of them
/// (30 s at most), then whatever else arrives until nothing came for 2 s; decoded.
fn read_topic(brokers: &str, topic: &str, parts: u32, want: usize) -> Vec<BusFrame> {
    let parts: Vec<(String, i32)> = (0..parts as i32).map(|p| (topic.to_owned(), p)).collect();
    let consumer = consumer_from_beginning(
        brokers,
        &format!("test-read-{topic}"),
        &[("fetch.wait.max.ms", "50")],
        &parts,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let quiet = Duration::from_secs(2);
    let mut last = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline && (out.len() < want || last.elapsed() < quiet) {
        if let Some(r) = consumer.poll(Duration::from_millis(100)) {
            let m = r.unwrap();
            out.push(to_owned(decode(m.payload().unwrap()).unwrap()).unwrap());
            last = Instant::now();
        }
    }
    assert!(
        out.len() >= want,
        "{topic}: {} of {want} records",
        out.len()
    );
    out
}

/// Every frame on a global topic must be a route for that topic's region (presence, resets and
/// plain frames never go there).
fn routes_of(frames: Vec<BusFrame>, region: &str) -> Vec<Routed> {
    frames
        .into_iter()
        .map(|f| match f {
            BusFrame::Route(Route { region: r, inner }) if r == region => inner,
            other => panic!("not a route for {region} on its global topic: {other:?}"),
        })
        .collect()
}

fn remote_config(
    regional: &Tansu,
    global: &Tansu,
    redis: &RedisServer,
    dir: &Path,
) -> RemoteConfig {
    let homes = Homes::new(OWN, &regions(), table()).unwrap();
    RemoteConfig {
        brokers: regional.brokers(),
        redis_url: redis.url(),
        region: OWN.to_owned(),
        node: 1,
        partitions: PARTITIONS,
        queue_capacity: 64,
        kafka: KafkaConfig::default(),
        outbox: OutboxConfig::new(dir.join("outbox")),
        homes: Arc::new(homes),
        global: Some(KafkaConfig {
            brokers: global.brokers(),
            ..KafkaConfig::default()
        }),
        idle_hook: None,
    }
}

/// Waits until the producers took `frames` frames and the brokers acknowledged all of them.
fn wait_produced(m: &dyn Fn() -> RemoteSnapshot, frames: u64) -> RemoteSnapshot {
    let ok = wait_until(Duration::from_secs(30), || {
        let s = m();
        s.producer.frames_in >= frames
            && s.producer.produced_ok == s.producer.frames_in
            && s.outbox.records == 0
    });
    let s = m();
    assert!(ok, "not produced: {:?} outbox {:?}", s.producer, s.outbox);
    s
}

#[test]
fn requests_about_users_homed_elsewhere_go_to_their_region_on_the_global_bus() {
    let regional = Tansu::memory();
    let global = Tansu::memory();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (core, links) =
        RemoteCore::start(remote_config(&regional, &global, &redis, dir.path()), 1).unwrap();
    let metrics = core.metrics();
    let snap = move || metrics.snapshot();
    let tx = &links[0].to_core;
    let bob = b"bob-b".to_vec(); // homed in the other region
    let dave = b"dave-a".to_vec(); // homed here
    let alice = b"alice-a".to_vec();
    let typing = vec![0x72, 0, 7, b'a', b'l', b'i', b'c', b'e', b'-', b'a', 1];
    // A message to bob (other region) and to dave (here).
    tx.send(CoreRequest::Store {
        msg: StoredMsg {
            id: 1001,
            recipient: bob.clone(),
            sender: alice.clone(),
            payload: b"to bob".to_vec(),
            kind: 0,
        },
        conn: 0,
        client: None,
        accepted: std::time::Instant::now(),
    })
    .unwrap();
    tx.send(CoreRequest::Store {
        msg: StoredMsg {
            id: 1002,
            recipient: dave.clone(),
            sender: alice.clone(),
            payload: b"to dave".to_vec(),
            kind: 0,
        },
        conn: 0,
        client: None,
        accepted: std::time::Instant::now(),
    })
    .unwrap();
    // bob roams into this region: his ack, drain, prekeys go to his home.
    tx.send(CoreRequest::Ack {
        user: bob.clone(),
        id: 77,
    })
    .unwrap();
    tx.send(CoreRequest::Online {
        user: bob.clone(),
        shard: 0,
    })
    .unwrap();
    tx.send(CoreRequest::Drain {
        user: bob.clone(),
        conn: 5,
        after: 0,
        limit: 10,
        resume_after: 0,
    })
    .unwrap();
    tx.send(CoreRequest::Relay {
        recipient: bob.clone(),
        frame: typing.clone(),
    })
    .unwrap();
    tx.send(CoreRequest::FetchPrekeys {
        user: bob.clone(),
        conn: 6,
    })
    .unwrap();
    tx.send(CoreRequest::PutPrekeys {
        user: bob.clone(),
        bundle: b"bundle".to_vec(),
    })
    .unwrap();
    // dave's ack and drain stay regional.
    tx.send(CoreRequest::Ack {
        user: dave.clone(),
        id: 1002,
    })
    .unwrap();
    tx.send(CoreRequest::Drain {
        user: dave.clone(),
        conn: 8,
        after: 0,
        limit: 10,
        resume_after: 0,
    })
    .unwrap();
    // 6 routed + EdgeReset, Deliver(dave), Presence(bob), Ack(dave), DrainRequest(dave).
    let s = wait_produced(&snap, 11);
    assert_eq!(
        s.routed_out,
        vec![(OWN.to_owned(), 0), (OTHER.to_owned(), 6)]
    );
    assert_eq!(s.global_producer.produced_ok, 6);

    let routed = routes_of(
        read_topic(&global.brokers(), &topics::route(OTHER), PARTITIONS, 6),
        OTHER,
    );
    let expected = vec![
        Routed::Deliver(Deliver {
            id: 1001,
            recipient: bob.clone(),
            sender: alice.clone(),
            payload: b"to bob".to_vec(),
            origin: OWN.to_owned(),
            kind: 0,
            confirm: None,
        }),
        Routed::Ack(iris_bus::Ack {
            user: bob.clone(),
            id: 77,
        }),
        Routed::DrainRequest(DrainRequest {
            user: bob.clone(),
            node: 1,
            shard: 0,
            conn: 5,
            after: 0,
            limit: 10,
            region: OWN.to_owned(),
        }),
        Routed::Relay(Relay {
            recipient: bob.clone(),
            kind: iris_bus::RelayKind::TypingStart,
            frame: typing,
        }),
        Routed::PrekeyFetch(PrekeyFetch {
            user: bob.clone(),
            node: 1,
            shard: 0,
            conn: 6,
            region: OWN.to_owned(),
        }),
        Routed::PrekeyPut(iris_bus::PrekeyPut {
            user: bob.clone(),
            bundle: b"bundle".to_vec(),
        }),
    ];
    // Every one exactly once (their order follows the bridge's drain rule: requests queued
    // before a drain's turn go first).
    assert_eq!(routed.len(), expected.len(), "{routed:?}");
    for e in &expected {
        assert!(routed.contains(e), "missing {e:?} in {routed:?}");
    }
    // Nothing for this region's own route topic.
    assert!(read_topic(&global.brokers(), &topics::route(OWN), PARTITIONS, 0).is_empty());

    // Regional: dave's frames as before, bob's presence; nothing of bob's messages.
    let deliver = read_topic(&regional.brokers(), &topics::deliver(OWN), PARTITIONS, 3);
    assert_eq!(deliver.len(), 3, "{deliver:?}");
    assert!(deliver.iter().all(|f| f.key_user() == dave.as_slice()));
    assert!(deliver.iter().any(|f| matches!(
        f,
        BusFrame::Deliver(d) if d.id == 1002 && d.origin == OWN
    )));
    assert!(deliver.iter().any(|f| matches!(
        f,
        BusFrame::DrainRequest(r) if r.region.is_empty() && r.conn == 8
    )));
    let presence = read_topic(&regional.brokers(), &topics::presence(OWN), PARTITIONS, 2);
    assert!(presence
        .iter()
        .any(|f| matches!(f, BusFrame::Presence(p) if p.user == bob && p.online)));
    core.shutdown(Duration::from_secs(5)).unwrap();
}

/// A v2 session's `resume_after` on the cluster link: the ids its user's last session on this
/// edge was written up to and including `resume_after` (and not above it) leave as one `Ack`
/// each, ahead of the drain request on the same partition (or route, for a user homed in the
/// other region); an id written after it, or a list without it, acknowledges nothing.
#[test]
fn resume_after_goes_out_as_acks_ahead_of_the_drain_request() {
    let regional = Tansu::memory();
    let global = Tansu::memory();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (core, links) =
        RemoteCore::start(remote_config(&regional, &global, &redis, dir.path()), 1).unwrap();
    let metrics = core.metrics();
    let snap = move || metrics.snapshot();
    let tx = &links[0].to_core;
    let dave = b"dave-a".to_vec(); // homed here
    let bob = b"bob-b".to_vec(); // homed in the other region
    let alice = b"alice-a".to_vec();
    let drain = |user: &[u8], conn, resume_after| CoreRequest::Drain {
        user: user.to_vec(),
        conn,
        after: 0,
        limit: 10,
        resume_after,
    };
    // Written to dave in this order: 15 (a smaller id from another shard) comes after 20.
    tx.send(CoreRequest::Delivered {
        user: dave.clone(),
        ids: vec![10, 30, 20, 15],
    })
    .unwrap();
    tx.send(drain(&dave, 1, 20)).unwrap();
    tx.send(CoreRequest::Delivered {
        user: bob.clone(),
        ids: vec![5, 7],
    })
    .unwrap();
    tx.send(drain(&bob, 2, 7)).unwrap();
    // alice's list does not hold the id she names: no ack.
    tx.send(CoreRequest::Delivered {
        user: alice.clone(),
        ids: vec![40],
    })
    .unwrap();
    tx.send(drain(&alice, 3, 41)).unwrap();
    // The lists are used once: dave's second drain acknowledges nothing.
    tx.send(drain(&dave, 4, 20)).unwrap();
    // EdgeReset, dave: 2 acks + 2 drains, bob (routed): 2 acks + 1 drain, alice: 1 drain.
    let s = wait_produced(&snap, 9);
    assert_eq!(s.resume_acked, 4);
    assert_eq!(s.resume_lists_evicted, 0);

    let regional_frames = read_topic(&regional.brokers(), &topics::deliver(OWN), PARTITIONS, 5);
    let of = |user: &[u8]| -> Vec<String> {
        regional_frames
            .iter()
            .filter(|f| f.key_user() == user)
            .map(|f| match f {
                BusFrame::Ack(a) => format!("ack {}", a.id),
                BusFrame::DrainRequest(r) => format!("drain {}", r.conn),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    };
    // The acks first; the two drains in either order (a drain takes in what is queued behind
    // it first, see the module doc of `remote.rs`), and only two acks in all.
    let mut d = of(&dave);
    assert_eq!(d[..2], ["ack 10", "ack 20"], "{d:?}");
    d[2..].sort();
    assert_eq!(d[2..], ["drain 1", "drain 4"], "{d:?}");
    assert_eq!(of(&alice), ["drain 3"]);
    let routed = routes_of(
        read_topic(&global.brokers(), &topics::route(OTHER), PARTITIONS, 3),
        OTHER,
    );
    let routed: Vec<String> = routed
        .iter()
        .map(|f| match f {
            Routed::Ack(a) => format!("ack {}", a.id),
            Routed::DrainRequest(r) => format!("drain {}", r.conn),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(routed, ["ack 5", "ack 7", "drain 2"]);
    core.shutdown(Duration::from_secs(5)).unwrap();
}

/// The edge binary, kill -9'd while the GLOBAL broker hangs (SIGSTOP) with routed messages
/// accepted: after the restart its outbox replays them to the global route topic.
#[test]
fn kill9_with_the_global_broker_stopped_replays_routed_messages_to_the_global_topic() {
    const N: usize = 300;
    const LEN: usize = 64;
    let regional = Tansu::memory();
    let global = Tansu::memory();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let table_path = dir.path().join("homes.txt");
    let mut text = String::from("# test homes\n");
    for (u, r) in table() {
        text.push_str(&format!("{} {r}\n", String::from_utf8(u).unwrap()));
    }
    std::fs::write(&table_path, text).unwrap();
    let args: Vec<String> = [
        "--bus",
        "kafka",
        "--brokers",
        &regional.brokers(),
        "--redis",
        &redis.url(),
        "--region",
        OWN,
        "--node-id",
        "1",
        "--partitions",
        &PARTITIONS.to_string(),
        "--regions",
        &regions().join(","),
        "--global-brokers",
        &global.brokers(),
        "--home-table",
        table_path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut edge = Server::start(ServerOpts {
        shards: 2,
        args,
        ..Default::default()
    });
    let mut alice = edge.login("alice-a");
    let gpid = global.pid().expect("global broker pid");
    signal_pid(gpid, "STOP");
    let mut batch = Vec::new();
    for k in 0..N {
        batch.extend_from_slice(&wire::send(b"carol-b", &numbered(k, LEN)));
    }
    alice.write(&batch);
    let held = wait_until(Duration::from_secs(20), || {
        edge.metric("iris_edge_outbox_records") >= N as u64
    });
    assert!(
        held,
        "outbox records {}",
        edge.metric("iris_edge_outbox_records")
    );
    assert_eq!(
        edge.metric("iris_edge_messages_accepted_total"),
        N as u64,
        "accepted"
    );
    assert!(edge.metric("iris_edge_routed_out_total{region=\"rb\"}") >= N as u64);
    // Let one more group commit pass (the records are fsynced by then).
    let fsyncs = edge.metric("iris_edge_outbox_fsyncs_total");
    wait_until(Duration::from_secs(5), || {
        edge.metric("iris_edge_outbox_fsyncs_total") > fsyncs
    });
    edge.kill9();
    drop(alice);
    signal_pid(gpid, "CONT");
    edge.restart();
    assert_eq!(
        edge.metric("iris_edge_outbox_replayed_total"),
        N as u64,
        "records replayed at restart"
    );
    let trimmed = wait_until(Duration::from_secs(60), || {
        edge.metric("iris_edge_outbox_records") == 0
    });
    assert!(
        trimmed,
        "outbox not trimmed: {} records left",
        edge.metric("iris_edge_outbox_records")
    );
    assert!(edge.metric("iris_edge_routed_out_total{region=\"rb\"}") >= N as u64);

    let routed = routes_of(
        read_topic(&global.brokers(), &topics::route(OTHER), PARTITIONS, N),
        OTHER,
    );
    let mut numbers = HashSet::new();
    let mut ids = HashSet::new();
    for r in &routed {
        match r {
            Routed::Deliver(d) => {
                assert_eq!(d.recipient, b"carol-b");
                assert_eq!(d.origin, OWN);
                assert!(d.payload.len() >= LEN);
                numbers.insert(number_of(&d.payload[d.payload.len() - LEN..]));
                ids.insert(d.id);
            }
            other => panic!("unexpected routed frame {other:?}"),
        }
    }
    assert_eq!(numbers.len(), N, "distinct messages on the global topic");
    assert_eq!(ids.len(), N, "distinct ids on the global topic");
    assert!(numbers.iter().all(|&k| k < N));
    let dups = routed.len() - N;
    assert!(dups <= N, "{dups} duplicates");
    assert!(read_topic(&global.brokers(), &topics::route(OWN), PARTITIONS, 0).is_empty());
    // None of them on the regional deliver topic.
    let deliver = read_topic(&regional.brokers(), &topics::deliver(OWN), PARTITIONS, 0);
    assert!(
        !deliver
            .iter()
            .any(|f| matches!(f, BusFrame::Deliver(d) if d.recipient == b"carol-b")),
        "a routed message reached the regional deliver topic"
    );
    println!(
        "global kill -9: {N} routed messages accepted with the global broker stopped, replayed \
         {N}, on the global topic {} records ({} distinct, {dups} duplicates)",
        routed.len(),
        numbers.len()
    );
    edge.assert_running();
}
