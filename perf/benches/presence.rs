//! Presence lookups on one shard's slice (`iris_edge::shard::presence::Presence`): the status
//! and session lookups every routed message and GET_STATUS does, with 10,000 and 100,000 users
//! registered, and a register + unregister pair (a login and a logout).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iris_edge::shard::presence::Presence;

fn names(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("user-{i:08}").into_bytes())
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence");
    g.throughput(Throughput::Elements(1));
    for users in [10_000usize, 100_000] {
        let names = names(users);
        let mut p = Presence::default();
        for (i, n) in names.iter().enumerate() {
            if i % 2 == 0 {
                p.register(n, i % 4, i as u64);
            }
        }
        // A stride that walks the whole table, defeating the cache like real traffic.
        let stride = 7919 % users;
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("sessions", users), &users, |b, _| {
            b.iter(|| {
                i = (i + stride) % users;
                black_box(p.sessions(black_box(&names[i])))
            })
        });
        g.bench_with_input(BenchmarkId::new("status", users), &users, |b, _| {
            b.iter(|| {
                i = (i + stride) % users;
                black_box(p.status(black_box(&names[i])))
            })
        });
        g.bench_with_input(
            BenchmarkId::new("register_unregister", users),
            &users,
            |b, _| {
                b.iter(|| {
                    i = (i + stride) % users;
                    p.register(&names[i], 1, 99);
                    p.unregister(&names[i], 1, 99, 1, false);
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
