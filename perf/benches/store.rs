//! The embedded message store (`iris_core::store::MessageStore`, fjall) in a temporary
//! directory: appending a batch of 64 messages (as the core commits a batch window), with and
//! without the fsync of the journal, acking (deleting) 64 stored messages (with and without the
//! point lookup the embedded core does first), acks of 64 ids that were never stored (the
//! tombstones written before, the lookups that replace them now), the scan of a login
//! drain, and the v2 dedup lookups of 64 sends (`dedup/*`: 900,000 records in one bucket, as
//! with a TTL of 0, or in nine, as a server with the default 24 h TTL holds them; all in
//! the older buckets flushed to disk, as the store does when the next bucket opens).

use std::cell::Cell;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iris_core::api::StoredMsg;
use iris_core::store::{Batch, MessageStore, SentRecord};

const BATCH: u64 = 64;

fn batch(next_id: &Cell<u64>, users: u64) -> Vec<StoredMsg> {
    (0..BATCH)
        .map(|_| {
            let id = next_id.get() + 1;
            next_id.set(id);
            StoredMsg {
                id,
                recipient: format!("user-{:06}", id % users).into_bytes(),
                sender: b"sender-1".to_vec(),
                payload: vec![b'x'; 64],
                kind: 0,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(dir.path().join("store")).expect("open store");
    let next_id = Cell::new(0u64);
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(BATCH));
    // A batch stored (not synced), returned as the acks that delete it.
    let stored = |next_id: &Cell<u64>| {
        let msgs = batch(next_id, 1000);
        store.commit(&msgs, &[], false).unwrap();
        msgs.into_iter()
            .map(|m| (m.recipient, m.id))
            .collect::<Vec<_>>()
    };

    g.bench_function("append_64", |b| {
        b.iter_batched(
            || batch(&next_id, 1000),
            |msgs| store.commit(&msgs, &[], false).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("append_64_fsync", |b| {
        b.iter_batched(
            || batch(&next_id, 1000),
            |msgs| store.commit(&msgs, &[], true).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ack_64", |b| {
        b.iter_batched(
            || stored(&next_id),
            |acks| store.commit(&[], &acks, false).unwrap(),
            BatchSize::SmallInput,
        )
    });
    // Real acks as the embedded core now handles them: a point lookup (the payload size, for
    // the recipient's quota), then the delete.
    g.bench_function("ack_64_lookup_then_delete", |b| {
        b.iter_batched(
            || stored(&next_id),
            |acks| {
                for (user, id) in &acks {
                    assert!(store.payload_len(user, *id).unwrap().is_some());
                }
                store.commit(&[], &acks, false).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    // Acks of ids that were never stored (never delivered). Before: one tombstone each, in a
    // group commit with its fsync. Now: one point lookup each and nothing written.
    let absent = |next_id: &Cell<u64>| {
        batch(next_id, 1000)
            .into_iter()
            .map(|m| (m.recipient, m.id + (1 << 40)))
            .collect::<Vec<_>>()
    };
    g.bench_function("ack_64_absent_tombstones", |b| {
        b.iter_batched(
            || absent(&next_id),
            |acks| store.commit(&[], &acks, false).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ack_64_absent_tombstones_fsync", |b| {
        b.iter_batched(
            || absent(&next_id),
            |acks| store.commit(&[], &acks, true).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ack_64_absent_lookup", |b| {
        b.iter_batched(
            || absent(&next_id),
            |acks| {
                for (user, id) in &acks {
                    assert!(store.payload_len(user, *id).unwrap().is_none());
                }
            },
            BatchSize::SmallInput,
        )
    });
    // A user with 1000 stored messages, drained in chunks of 100 as the edge does.
    let drain_user = b"drain-user".to_vec();
    let msgs: Vec<StoredMsg> = (0..1000u64)
        .map(|i| StoredMsg {
            id: 10_000_000 + i,
            recipient: drain_user.clone(),
            sender: b"s".to_vec(),
            payload: vec![b'y'; 64],
            kind: 0,
        })
        .collect();
    store.commit(&msgs, &[], true).unwrap();
    g.throughput(Throughput::Elements(100));
    g.bench_function("scan_100_of_1000", |b| {
        b.iter(|| {
            let got = store.scan(black_box(&drain_user), 0, 100).unwrap();
            assert_eq!(got.len(), 100);
            got
        })
    });
    g.finish();
    dedup(c);
}

/// Dedup records of the `dedup/*` benches, and their senders.
const DEDUP_RECORDS: u64 = 900_000;
const DEDUP_SENDERS: u64 = 1_000;

/// `sent_id` for 64 client ids never sent (a new send, each above its sender's highest client
/// id: answered by the store's per-sender mark), for 64 that were (a resend: every bucket is
/// read until the record is found), new sends of 64 senders whose marks are learnt first, and
/// new sends with no marks (every bucket read), over 900,000 records of 1,000 senders in one
/// bucket or in nine.
fn dedup(c: &mut Criterion) {
    const RECORDS: u64 = DEDUP_RECORDS;
    const SENDERS: u64 = DEDUP_SENDERS;
    // Ids spread over 27 hours: nine buckets of 3 h with the 24 h TTL.
    let bucket = (3 * 3600 * (1_000_000 / 16)) << 18;
    let span = 9 * bucket;
    let first = (1u64 << 60) / bucket * bucket;
    let mut g = c.benchmark_group("dedup");
    g.throughput(Throughput::Elements(64));
    for (name, ttl) in [("one_bucket", 0u64), ("nine_buckets", 24 * 3600)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = MessageStore::open(dir.path().join("store"))
            .expect("open store")
            .with_dedup_ttl_secs(ttl);
        let records: Vec<SentRecord> = (0..RECORDS)
            .map(|i| SentRecord {
                sender: format!("sender-{:06}", i % SENDERS).into_bytes(),
                client: i / SENDERS,
                id: first + i * (span / RECORDS),
            })
            .collect();
        for chunk in records.chunks(10_000) {
            let batch = Batch {
                sent: chunk,
                ..Batch::default()
            };
            store.write(&batch, false).unwrap();
        }
        // The older buckets' flushes (queued when each next bucket was made) finish.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let buckets = store.sent_buckets().len();
        assert_eq!(buckets, if ttl == 0 { 1 } else { 9 }, "{name}");
        let next = Cell::new(0u64);
        g.bench_function(format!("new_ids_64_{name}"), |b| {
            b.iter(|| new_ids_64(&store, &next))
        });
        g.bench_function(format!("resends_64_{name}"), |b| {
            b.iter(|| {
                for _ in 0..64 {
                    let i = next.get() % RECORDS;
                    next.set(next.get() + 7919);
                    let r = &records[i as usize];
                    assert_eq!(store.sent_id(&r.sender, r.client).unwrap(), Some(r.id));
                }
            })
        });
        // Marks forgotten before each 64 lookups of 64 senders: each learns its mark first
        // (learnt at the first lookup here).
        let store = store.with_sent_marks(iris_core::store::SENT_MARKS_MAX, 1);
        g.bench_function(format!("new_ids_64_{name}_marks_learnt"), |b| {
            b.iter_batched(
                || store.forget_sent_marks(),
                |()| new_ids_64(&store, &next),
                BatchSize::PerIteration,
            )
        });
        // No marks (a full table): every bucket is read, as before the marks.
        let store = store.with_sent_marks(0, 1);
        g.bench_function(format!("new_ids_64_{name}_no_marks"), |b| {
            b.iter(|| new_ids_64(&store, &next))
        });
    }
    g.finish();
}

/// 64 sends of new client ids (each its sender's highest), from the senders in turn.
fn new_ids_64(store: &MessageStore, next: &Cell<u64>) {
    for _ in 0..64 {
        let i = next.get();
        next.set(i + 1);
        let sender = format!("sender-{:06}", i % DEDUP_SENDERS);
        let miss = store.sent_id(sender.as_bytes(), DEDUP_RECORDS + i).unwrap();
        assert!(miss.is_none());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
