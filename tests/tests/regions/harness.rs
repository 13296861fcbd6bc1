//! The multi-region harness itself: two regions and a global broker start, each region still
//! delivers between two of its own users, and the global broker works through the delay proxy
//! (and keeps its data across `kill -9`).

use std::time::{Duration, Instant};

use iris_tests::cluster::{
    region_names, rendezvous, users_homed_in, write_home_table, ClusterOpts, Regions, RegionsOpts,
};
use iris_tests::services::{DelayProxy, Tansu};
use iris_tests::{describe_sequence_diff, number_of, numbered};

use crate::common::{eventually, recv_one, RawProducer, PAYLOAD};

/// The harness's rendezvous is the bus's, and its home table files load as the processes load
/// them.
#[test]
fn harness_homes_match_the_bus() {
    let lists: Vec<Vec<String>> = vec![
        vec!["a".into(), "b".into()],
        vec!["tokyo".into(), "frankfurt".into(), "ohio".into()],
        region_names(4),
    ];
    for regions in &lists {
        for i in 0..2000 {
            let u = format!("user-{i}");
            assert_eq!(
                rendezvous(u.as_bytes(), regions),
                iris_bus::home::rendezvous(u.as_bytes(), regions),
                "{u} over {regions:?}"
            );
        }
        for r in regions {
            for u in users_homed_in("h", r, regions, 3) {
                assert_eq!(
                    iris_bus::home::rendezvous(u.as_bytes(), regions),
                    Some(r.as_str())
                );
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("homes.txt");
    write_home_table(&path, &[("alice", "tokyo"), ("bob", "ohio")]);
    let table = iris_bus::home::Homes::load_table(&path).expect("load the harness's table");
    assert_eq!(table.len(), 2);
    assert_eq!(
        table.get(b"alice".as_slice()).map(String::as_str),
        Some("tokyo")
    );
    assert_eq!(
        table.get(b"bob".as_slice()).map(String::as_str),
        Some("ohio")
    );
}

/// One core and two edges of one shard per region: the smallest region with an edge-to-edge
/// path (two regions share a 2-CPU machine with the rest of the suite).
fn small() -> ClusterOpts {
    ClusterOpts {
        edges: 2,
        cores: 1,
        shards: 1,
        ..ClusterOpts::default()
    }
}

#[test]
fn two_regions_start_and_each_delivers_between_its_own_users() {
    let t0 = Instant::now();
    let names = region_names(2);
    let mut r = Regions::start(&names, small());
    let started = t0.elapsed();
    assert_eq!(r.clusters.len(), 2);
    for (i, name) in names.iter().enumerate() {
        let c = r.region(i);
        assert_eq!(&c.region, name);
        for core in &c.cores {
            assert!(
                core.ready_line.contains(&format!("region={name} ")),
                "{}",
                core.ready_line
            );
        }
    }
    for i in 0..2 {
        let users = r.users_homed_in(i, "loc", 2);
        let (a, b) = (&users[0], &users[1]);
        assert_eq!(r.home_index(a), i);
        assert_eq!(r.home_index(b), i);
        let c = r.region(i);
        let other_before = r
            .region(1 - i)
            .core_metric_of(0, "iris_core_delivers_total");
        let mut ca = c.login(0, a);
        let mut cb = c.login(1, b);
        ca.send(b, &numbered(0, PAYLOAD));
        let (_, p) = recv_one(&mut cb, Duration::from_secs(15), "first message in region");
        assert_eq!(p, numbered(0, PAYLOAD));
        ca.send_many(b, (1..20).map(|n| numbered(n, PAYLOAD)));
        let got: Vec<usize> = cb
            .recv_msgs(19, true)
            .iter()
            .map(|(_, p)| number_of(p))
            .collect();
        let want: Vec<usize> = (1..20).collect();
        assert_eq!(describe_sequence_diff(&got, &want), None, "region {i}");
        cb.expect_silence(Duration::from_millis(300));
        // The home region's core stored all 20 (it reads them from its deliver topic at the
        // broker's pace: b got them live first, by the direct path); the other region saw none.
        eventually(
            "the home core took in the 20 messages",
            Duration::from_secs(15),
            || c.core_metric_of(0, "iris_core_delivers_total") >= 20,
        );
        assert_eq!(c.core_metric_of(0, "iris_core_delivers_total"), 20);
        let other = r.region(1 - i);
        assert_eq!(
            other.core_metric_of(0, "iris_core_delivers_total"),
            other_before
        );
    }
    r.assert_running();
    eprintln!(
        "regions timing: started in {started:?}, test {:?}",
        t0.elapsed()
    );
}

/// A home table moves a user against the rendezvous hash (every process loads the file at
/// startup and refuses one naming an unknown region), and the regions start with the global
/// broker behind a delay proxy.
#[test]
fn regions_start_behind_a_delayed_global_broker_with_a_home_table() {
    let names = region_names(2);
    // A user the hash homes in region 0, pinned to region 1 by the table.
    let pinned = users_homed_in(&iris_tests::unique("pin"), &names[0], &names, 1).remove(0);
    let r = Regions::start_with(
        &names,
        RegionsOpts {
            cluster: small(),
            global_delay_ms: Some(20),
            home_table: vec![(pinned.clone(), names[1].clone())],
        },
    );
    assert_eq!(r.home_of(&pinned), names[1]);
    assert_eq!(
        rendezvous(pinned.as_bytes(), &names),
        Some(names[0].as_str())
    );
    assert!(r.home_table.as_ref().is_some_and(|p| p.is_file()));
    assert_eq!(
        r.global_brokers(),
        r.proxy.as_ref().expect("proxy").addr(),
        "processes are given the proxy"
    );
    // The pinned user is at home in region 1: a message from a region-1 user is stored there.
    let other = r.user_homed_in(1, "loc");
    let c = r.region(1);
    let mut cp = c.login(0, &pinned);
    let mut co = c.login(1, &other);
    co.send(&pinned, &numbered(7, PAYLOAD));
    let (id, p) = recv_one(
        &mut cp,
        Duration::from_secs(15),
        "message to the pinned user",
    );
    assert_eq!(p, numbered(7, PAYLOAD));
    cp.ack(&id);
    assert_eq!(c.core_metric_of(0, "iris_core_delivers_total"), 1);
    assert_eq!(r.region(0).core_metric_of(0, "iris_core_delivers_total"), 0);
}

#[test]
fn the_global_broker_is_reachable_through_the_delay_proxy_and_survives_kill9() {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    const DELAY_MS: u64 = 100;
    let proxy_port = iris_tests::services::free_port();
    let mut global = Tansu::sqlite_advertising(proxy_port);
    let _proxy = DelayProxy::start(proxy_port, &global.brokers(), DELAY_MS);
    assert_eq!(
        global.advertised_brokers(),
        format!("127.0.0.1:{proxy_port}")
    );
    let topic = "iris.global.route.harness";
    // Created through the proxy, as a region's first process would.
    let cfg = iris_bus::kafka::KafkaConfig {
        brokers: format!("127.0.0.1:{proxy_port}"),
        ..iris_bus::kafka::KafkaConfig::default()
    };
    iris_bus::kafka::ensure_topics(&cfg, &[(topic.to_owned(), 1)]).expect("create the topic");

    // Produce through the proxy; the produce waits for the ack (one request there, one
    // answer back: at least two delays).
    let p = RawProducer::new(&format!("127.0.0.1:{proxy_port}"));
    p.send(topic, 0, b"warm", b"up");
    p.flush();
    let t0 = Instant::now();
    p.send(topic, 0, b"k", b"through the proxy");
    p.flush();
    let acked = t0.elapsed();
    assert!(
        acked >= Duration::from_millis(2 * DELAY_MS),
        "produce acked after {acked:?} through a {DELAY_MS} ms proxy"
    );
    drop(p);

    // kill -9 and restart on the same sqlite file: the records are still there, read through
    // the proxy again (bootstrapping at the broker itself: the metadata sends the client to the
    // advertised address, the proxy).
    global.kill();
    global.restart();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", global.brokers())
        .set("group.id", "harness-check")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            got.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    assert_eq!(
        got,
        vec![b"up".to_vec(), b"through the proxy".to_vec()],
        "records after kill -9 and restart"
    );
    eprintln!("produce through a {DELAY_MS} ms proxy acked in {acked:?}");
}
