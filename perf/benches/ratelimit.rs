//! The rate-limit tables of a shard (`iris_edge::ratelimit::Buckets`, 65,536 keys): a take for
//! a key already in the table (every limited SEND, a login from a known address), and a steady
//! stream of new keys into a full table whose oldest bucket refills just as the next key comes
//! (new source addresses, or new senders, arriving at the table's size per refill time).

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iris_edge::ratelimit::Buckets;

const MAX: usize = 65_536;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.throughput(Throughput::Elements(1));
    let t0 = Instant::now();
    // rate 1/s, burst 1: a bucket refills one second after its last take.
    let step = Duration::from_secs(1) / (MAX as u32 - 1);
    let mut m: Buckets<u64> = Buckets::new(MAX);
    let mut next = 0u64;
    let mut now = t0;
    for _ in 0..2 * MAX {
        let _ = m.take(&next, 1, 1, now);
        next += 1;
        now += step;
    }
    g.bench_function("new_key_full_table", |b| {
        b.iter(|| {
            let r = m.take(black_box(&next), 1, 1, now);
            next += 1;
            now += step;
            r
        })
    });
    let mut users: Buckets<Box<[u8]>> = Buckets::new(MAX);
    let names: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("user-{i:08}").into_bytes())
        .collect();
    for n in &names {
        let _ = users.take(n.as_slice(), 1_000_000, 1_000_000, t0);
    }
    let mut i = 0usize;
    g.bench_function("known_user", |b| {
        b.iter(|| {
            i = (i + 7919) % names.len();
            users.take(black_box(names[i].as_slice()), 1_000_000, 1_000_000, t0)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
