//! End-to-end tests of the embedded core: real fjall files in temporary directories, the real
//! core thread, and shard links driven from the test thread (or from extra threads).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iris_core::embedded::{leased_floor, CoreStats, EmbeddedConfig, EmbeddedCore};
use iris_core::store::MessageStore;
use iris_core::{CoreReply, CoreRequest, ShardLink, StoredMsg};

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn cfg(dir: &tempfile::TempDir) -> EmbeddedConfig {
    EmbeddedConfig {
        data_dir: dir.path().join("core"),
        // The ids of these tests are small numbers, i.e. minted in 2024: no expiry.
        message_ttl_secs: 0,
        ..EmbeddedConfig::default()
    }
}

fn msg(to: &str, id: u64, payload: impl Into<Vec<u8>>) -> StoredMsg {
    StoredMsg {
        id,
        recipient: to.as_bytes().to_vec(),
        sender: b"alice".to_vec(),
        payload: payload.into(),
        kind: 0,
    }
}

fn store(link: &ShardLink, m: StoredMsg) {
    link.to_core
        .send(CoreRequest::Store {
            msg: m,
            conn: 0,
            client: None,
            accepted: Instant::now(),
        })
        .unwrap();
}

fn ack(link: &ShardLink, user: &str, id: u64) {
    link.to_core
        .send(CoreRequest::Ack {
            user: user.as_bytes().to_vec(),
            id,
        })
        .unwrap();
}

/// Sends a drain on `link` and waits for its reply there: `(msgs, more)`.
fn drain(
    link: &ShardLink,
    user: &str,
    conn: u64,
    after: u64,
    limit: usize,
) -> (Vec<(u64, Vec<u8>)>, bool) {
    link.to_core
        .send(CoreRequest::Drain {
            user: user.as_bytes().to_vec(),
            conn,
            after,
            limit,
            resume_after: 0,
        })
        .unwrap();
    match link.from_core.recv_timeout(REPLY_TIMEOUT).unwrap() {
        CoreReply::Drain {
            conn: c,
            user: u,
            msgs,
            more,
            complete,
        } => {
            assert_eq!(c, conn);
            assert_eq!(u, user.as_bytes());
            assert!(complete, "a drain of a healthy store reads it completely");
            (msgs.into_iter().map(|m| (m.id, m.payload)).collect(), more)
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

fn ids(msgs: &[(u64, Vec<u8>)]) -> Vec<u64> {
    msgs.iter().map(|(id, _)| *id).collect()
}

/// Waits until `f(stats)` holds (the core works asynchronously).
fn wait_for(core: &EmbeddedCore, what: &str, f: impl Fn(&CoreStats) -> bool) {
    let m = core.metrics();
    let start = Instant::now();
    while !f(&m.snapshot()) {
        assert!(
            start.elapsed() < REPLY_TIMEOUT,
            "timed out waiting for {what}: {:?}",
            m.snapshot()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Messages minted by three shards (id low bits = shard, each shard increasing) and queued on
/// three links interleaved: a drain returns them in id order, whatever link they came over.
#[test]
fn messages_from_interleaved_shards_drain_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 3).unwrap();
    let mut expected = Vec::new();
    for round in 0..200u64 {
        for shard in [1u64, 2, 0] {
            let id = ((10_000 + round) << 10) | shard;
            store(
                &links[shard as usize],
                msg("bob", id, id.to_be_bytes().to_vec()),
            );
            expected.push(id);
        }
    }
    expected.sort_unstable();
    let (got, more) = drain(&links[1], "bob", 1, 0, 1000);
    assert!(!more);
    assert_eq!(ids(&got), expected);
    for (id, payload) in &got {
        assert_eq!(payload, &id.to_be_bytes());
    }
    // And the same from disk after shutdown.
    core.shutdown().unwrap();
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(ids(&s.scan(b"bob", 0, 1000).unwrap()), expected);
}

/// 1,000 messages from one sender, sent back to back, come back complete and in send order.
#[test]
fn thousand_messages_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 2).unwrap();
    for i in 1..=1000u64 {
        store(&links[0], msg("carol", i, format!("m{i}")));
    }
    let (got, more) = drain(&links[1], "carol", 9, 0, 1024);
    assert!(!more);
    assert_eq!(ids(&got), (1..=1000).collect::<Vec<_>>());
    for (id, payload) in &got {
        assert_eq!(payload, format!("m{id}").as_bytes());
    }
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.stored, 1000);
    assert_eq!(stats.drains, 1);
    assert_eq!(stats.drained_messages, 1000);
}

/// Acks of committed messages delete them: they are never drained again, and they are gone
/// from disk.
#[test]
fn acks_delete_committed_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 2).unwrap();
    for id in 1..=10 {
        store(&links[0], msg("dave", id, "x"));
    }
    wait_for(&core, "the stores to commit", |s| s.stored == 10);
    for id in [2, 4, 6] {
        ack(&links[1], "dave", id);
    }
    let (got, _) = drain(&links[0], "dave", 1, 0, 100);
    assert_eq!(
        ids(&got),
        vec![1, 3, 5, 7, 8, 9, 10],
        "pending deletes hide acked messages"
    );
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.acked, 3);
    assert_eq!(stats.cancelled_before_store, 0);
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(
        ids(&s.scan(b"dave", 0, 100).unwrap()),
        vec![1, 3, 5, 7, 8, 9, 10]
    );
}

/// After a restart every committed, unacked message is there, acked ones are not, and the id
/// floor covers every id the core ever accepted (including one acked before it was written).
#[test]
fn restart_keeps_unacked_and_not_acked() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (core, links) = EmbeddedCore::start(cfg(&dir), 2).unwrap();
        assert_eq!(core.id_floor(), 0);
        for id in 1..=20 {
            store(&links[id as usize % 2], msg("erin", id, format!("p{id}")));
        }
        wait_for(&core, "the stores to commit", |s| s.stored == 20);
        for id in (1..=20).filter(|id: &u64| id.is_multiple_of(3)) {
            ack(&links[0], "erin", id);
        }
        wait_for(&core, "the acks", |s| s.acked == 6);
        core.shutdown().unwrap();
    }
    let (core, links) = EmbeddedCore::start(cfg(&dir), 2).unwrap();
    assert_eq!(core.id_floor(), leased_floor(20));
    let (got, more) = drain(&links[1], "erin", 1, 0, 100);
    assert!(!more);
    let expected: Vec<u64> = (1..=20).filter(|id: &u64| !id.is_multiple_of(3)).collect();
    assert_eq!(ids(&got), expected);
    for (id, payload) in &got {
        assert_eq!(payload, format!("p{id}").as_bytes());
    }
    core.shutdown().unwrap();
}

/// An ack that arrives inside the commit window cancels the store: the message never reaches
/// disk, and the counter says so. The id floor still remembers the id.
#[test]
fn ack_inside_window_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        commit_window_ms: 500,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 2).unwrap();
    store(&links[0], msg("frank", 77, "short-lived"));
    store(&links[0], msg("frank", 78, "kept"));
    // The ack goes over another shard's link, so make sure the stores were taken in first
    // (otherwise this would be the ack-before-store case).
    wait_for(&core, "the stores to be pending", |s| s.pending_ops == 2);
    ack(&links[1], "frank", 77);
    wait_for(&core, "the ack", |s| s.acked == 1);
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.cancelled_before_store, 1);
    assert_eq!(stats.stored, 1, "only the unacked message was written");
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(ids(&s.scan(b"frank", 0, 10).unwrap()), vec![78]);
    // The floor is leased a second of id clock ahead (written once an id passes it).
    assert_eq!(s.id_floor(), leased_floor(78));
    drop(s);

    // A cancelled message with an id past the floor still raises it.
    let past = leased_floor(78) + (1 << 18);
    let (core, links) = EmbeddedCore::start(
        EmbeddedConfig {
            commit_window_ms: 500,
            ..cfg(&dir)
        },
        1,
    )
    .unwrap();
    store(&links[0], msg("frank", past, "gone"));
    ack(&links[0], "frank", past);
    let stats = core.shutdown().unwrap();
    assert_eq!((stats.cancelled_before_store, stats.stored), (1, 0));
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(s.count(b"frank").unwrap(), 1);
    assert_eq!(s.id_floor(), leased_floor(past));
}

/// A store that arrives after its own ack (they travel on different shards' queues) is
/// dropped, not stored forever.
#[test]
fn ack_before_store_drops_the_late_store() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 2).unwrap();
    ack(&links[1], "gina", 5);
    wait_for(&core, "the ack", |s| s.acked == 1);
    store(&links[0], msg("gina", 5, "late"));
    store(&links[0], msg("gina", 6, "normal"));
    // A store of the same id for another user is a different message and is kept.
    store(&links[0], msg("hank", 5, "other user"));
    let (got, _) = drain(&links[0], "gina", 1, 0, 10);
    assert_eq!(ids(&got), vec![6]);
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.late_stores_dropped, 1);
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(ids(&s.scan(b"gina", 0, 10).unwrap()), vec![6]);
    assert_eq!(ids(&s.scan(b"hank", 0, 10).unwrap()), vec![5]);
}

/// A drain sees a store queued on another shard's link just before the drain request, whatever
/// the links' order, whether or not the core is busy, and whether the message is still pending
/// or already committed. Repeated many times to catch races.
///
/// Background load on link 1 keeps the core busy between its visits to link 0 and links 2/3,
/// which is exactly when a store on link 0 and a drain on link 2 or 3 can slip in behind the
/// core's sweep: without the take-in pass before each drain this test fails within a few
/// hundred iterations.
#[test]
fn drain_sees_store_queued_just_before_on_another_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 4).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let noise_link = links[1].clone();
    let noise_stop = Arc::clone(&stop);
    let noise = std::thread::spawn(move || {
        let mut id = 0u64;
        while !noise_stop.load(Ordering::Relaxed) {
            id += 1;
            let req = if id.is_multiple_of(5) {
                CoreRequest::Ack {
                    user: b"noise".to_vec(),
                    id: id - 4,
                }
            } else {
                CoreRequest::Store {
                    msg: msg("noise", id, "n"),
                    conn: 0,
                    client: None,
                    accepted: Instant::now(),
                }
            };
            // Keep a backlog of a few hundred requests, not a flood: a full queue would make
            // every drain wait for a whole queue's worth of requests (correct, but slow in a
            // debug build).
            while noise_link.to_core.len() > 256 && !noise_stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(50));
            }
            noise_link.to_core.send(req).unwrap();
        }
    });

    // (store link, drain link): mostly the orders where the drain's link is swept after the
    // store's, plus the others.
    let pairs = [
        (0, 2),
        (0, 3),
        (2, 3),
        (0, 2),
        (3, 0),
        (2, 0),
        (0, 3),
        (3, 2),
    ];
    for i in 0..1000u64 {
        let user = format!("u{i}");
        let (store_link, drain_link) = pairs[i as usize % pairs.len()];
        let id = 1_000_000 + i;
        // Sometimes there is an older, committed message as well.
        if i.is_multiple_of(7) {
            store(&links[store_link], msg(&user, id - 500_000, "old"));
            if i.is_multiple_of(14) {
                std::thread::sleep(Duration::from_millis(3));
            }
        }
        store(&links[store_link], msg(&user, id, "fresh"));
        let (got, more) = drain(&links[drain_link], &user, i, 0, 10);
        assert!(!more);
        assert!(
            ids(&got).contains(&id),
            "iteration {i}: drain missed the store: {got:?}"
        );
        assert_eq!(got.len(), if i.is_multiple_of(7) { 2 } else { 1 });
    }
    stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    core.shutdown().unwrap();
}

/// A long inbox is drained in chunks with `after`: limits are honoured and capped at
/// `drain_chunk`, `more` is set exactly while more may follow, and nothing is lost or repeated.
#[test]
fn drain_chunks_with_after_over_3000_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        drain_chunk: 512,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 2).unwrap();
    for i in 1..=3000u64 {
        store(&links[(i % 2) as usize], msg("ivy", i * 10, format!("{i}")));
    }
    // Requested 1000 per drain, capped at 512: 5 full chunks, then 440 with more = false.
    let mut all = Vec::new();
    let mut after = 0;
    let mut sizes = Vec::new();
    loop {
        let (got, more) = drain(&links[1], "ivy", 3, after, 1000);
        sizes.push(got.len());
        assert_eq!(more, got.len() == 512);
        if let Some((last, _)) = got.last() {
            after = *last;
        }
        all.extend(got);
        if !more {
            break;
        }
    }
    assert_eq!(sizes, vec![512, 512, 512, 512, 512, 440]);
    assert_eq!(ids(&all), (1..=3000).map(|i| i * 10).collect::<Vec<_>>());

    // A limit that divides the total exactly ends with an empty reply; limit 0 = drain_chunk.
    let (got, more) = drain(&links[0], "ivy", 3, 0, 0);
    assert_eq!((got.len(), more), (512, true));
    let (got, more) = drain(&links[0], "ivy", 3, 29_000, 100);
    assert_eq!(
        (ids(&got), more),
        ((2901..=3000).map(|i| i * 10).collect(), true)
    );
    let (got, more) = drain(&links[0], "ivy", 3, 30_000, 100);
    assert!(got.is_empty() && !more);
    // `after` in the middle of the committed range with acks in between.
    for i in 1001..=1010u64 {
        ack(&links[0], "ivy", i * 10);
    }
    let (got, _) = drain(&links[0], "ivy", 3, 10_000, 5);
    assert_eq!(ids(&got), vec![10_110, 10_120, 10_130, 10_140, 10_150]);
    core.shutdown().unwrap();
}

/// Prekey bundles: put, fetch (the reply goes to the shard that asked), unknown user, replace,
/// and survival across a restart.
#[test]
fn prekeys_put_fetch_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fetch = |link: &ShardLink, user: &str, conn: u64| {
        link.to_core
            .send(CoreRequest::FetchPrekeys {
                user: user.as_bytes().to_vec(),
                conn,
            })
            .unwrap();
        match link.from_core.recv_timeout(REPLY_TIMEOUT).unwrap() {
            CoreReply::Prekeys {
                conn: c,
                user: u,
                bundle,
            } => {
                assert_eq!((c, u.as_slice()), (conn, user.as_bytes()));
                bundle
            }
            other => panic!("unexpected reply {other:?}"),
        }
    };
    let put = |link: &ShardLink, user: &str, bundle: &[u8]| {
        link.to_core
            .send(CoreRequest::PutPrekeys {
                user: user.as_bytes().to_vec(),
                bundle: bundle.to_vec(),
            })
            .unwrap();
    };
    {
        let (core, links) = EmbeddedCore::start(cfg(&dir), 3).unwrap();
        put(&links[0], "jo", b"\xa1\x01\x41\x01");
        assert_eq!(
            fetch(&links[2], "jo", 42),
            Some(b"\xa1\x01\x41\x01".to_vec())
        );
        assert!(links[0].from_core.is_empty() && links[1].from_core.is_empty());
        assert_eq!(fetch(&links[1], "nobody", 1), None);
        put(&links[1], "jo", b"\xa1\x01\x41\x02");
        assert_eq!(
            fetch(&links[0], "jo", 7),
            Some(b"\xa1\x01\x41\x02".to_vec())
        );
        core.shutdown().unwrap();
    }
    let (core, links) = EmbeddedCore::start(cfg(&dir), 1).unwrap();
    assert_eq!(
        fetch(&links[0], "jo", 1),
        Some(b"\xa1\x01\x41\x02".to_vec())
    );
    core.shutdown().unwrap();
}

/// Shutdown commits everything still pending, even with a commit window far longer than the
/// test, and requests still queued when stop is called are taken in first.
#[test]
fn shutdown_flushes_pending() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        commit_window_ms: 3_600_000,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 2).unwrap();
    for id in 1..=100 {
        store(&links[(id % 2) as usize], msg("kim", id, "p"));
    }
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.stored, 100);
    assert_eq!(stats.commits, 1, "one group commit at shutdown");
    assert_eq!(stats.pending_ops, 0);
    let s = MessageStore::open(dir.path().join("core")).unwrap();
    assert_eq!(s.count(b"kim").unwrap(), 100);
    assert_eq!(s.id_floor(), leased_floor(100));
}

/// Dropping every link ends the core thread on its own, after committing.
#[test]
fn dropping_all_links_ends_the_core() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        commit_window_ms: 3_600_000,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 2).unwrap();
    store(&links[0], msg("lee", 1, "p"));
    drop(links);
    let start = Instant::now();
    while !core.is_finished() {
        assert!(start.elapsed() < REPLY_TIMEOUT, "core thread did not end");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(core.shutdown().unwrap().stored, 1);
    assert_eq!(
        MessageStore::open(dir.path().join("core"))
            .unwrap()
            .count(b"lee")
            .unwrap(),
        1
    );
}

/// A shard that does not read its replies never blocks the core (other shards are still
/// served), and none of its replies are lost: they arrive, in order, once it reads.
#[test]
fn full_reply_queue_defers_replies_without_loss_or_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        queue_capacity: 4,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 2).unwrap();
    // Shard 0 asks 20 times (in a thread: its request queue holds only 4) and does not read.
    let l0 = links[0].clone();
    let asker = std::thread::spawn(move || {
        for conn in 0..20 {
            l0.to_core
                .send(CoreRequest::FetchPrekeys {
                    user: b"x".to_vec(),
                    conn,
                })
                .unwrap();
        }
    });
    asker.join().unwrap();
    wait_for(&core, "deferred replies", |s| s.replies_deferred >= 16);
    // Shard 1 is still served.
    store(&links[1], msg("mia", 1, "p"));
    let (got, _) = drain(&links[1], "mia", 1, 0, 10);
    assert_eq!(ids(&got), vec![1]);
    // Shard 0's replies all arrive, in order.
    for conn in 0..20 {
        match links[0].from_core.recv_timeout(REPLY_TIMEOUT).unwrap() {
            CoreReply::Prekeys {
                conn: c, bundle, ..
            } => {
                assert_eq!((c, bundle), (conn, None));
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    core.shutdown().unwrap();
}

/// Requests the store cannot represent are counted and answered empty, never crash the core.
#[test]
fn oversized_user_names_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (core, links) = EmbeddedCore::start(cfg(&dir), 1).unwrap();
    let huge = "u".repeat(70_000);
    store(&links[0], msg(&huge, 1, "p"));
    let (got, more) = drain(&links[0], &huge, 1, 0, 10);
    assert!(got.is_empty() && !more);
    store(&links[0], msg("ok", 2, "p"));
    let (got, _) = drain(&links[0], "ok", 1, 0, 10);
    assert_eq!(ids(&got), vec![2]);
    let stats = core.shutdown().unwrap();
    assert_eq!(stats.invalid_requests, 2);
    assert_eq!(stats.stored, 1);
}

#[test]
fn start_rejects_zero_sizes() {
    let dir = tempfile::tempdir().unwrap();
    assert!(EmbeddedCore::start(cfg(&dir), 0).is_err());
    let config = EmbeddedConfig {
        queue_capacity: 0,
        ..cfg(&dir)
    };
    assert!(EmbeddedCore::start(config, 1).is_err());
}

/// `drain_chunk_bytes` bounds a reply's payload bytes: the reply is cut before the message that
/// would exceed it (with `more` set), and a single message larger than the bound still goes
/// alone so a drain always progresses.
#[test]
fn drain_replies_are_byte_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        drain_chunk_bytes: 100,
        ..cfg(&dir)
    };
    let (core, links) = EmbeddedCore::start(config, 1).unwrap();
    for id in 1..=5 {
        store(&links[0], msg("nora", id, vec![b'x'; 30]));
    }
    store(&links[0], msg("nora", 6, vec![b'y'; 500]));
    store(&links[0], msg("nora", 7, vec![b'z'; 10]));
    let (got, more) = drain(&links[0], "nora", 1, 0, 100);
    assert_eq!((ids(&got), more), (vec![1, 2, 3], true));
    let (got, more) = drain(&links[0], "nora", 1, 3, 100);
    assert_eq!((ids(&got), more), (vec![4, 5], true));
    let (got, more) = drain(&links[0], "nora", 1, 5, 100);
    assert_eq!(
        (ids(&got), more),
        (vec![6], true),
        "an oversized message goes alone"
    );
    let (got, more) = drain(&links[0], "nora", 1, 6, 100);
    assert_eq!((ids(&got), more), (vec![7], false));
    core.shutdown().unwrap();
}
