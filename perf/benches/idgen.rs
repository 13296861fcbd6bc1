//! Message id minting (`iris_edge::idgen`), once per accepted message: the cost of the edge-wide
//! high-water mark that keeps one sender's ids increasing across shards (raised by every id
//! minted ahead of the clock), against the previous per-shard-only generator (copied here as
//! the baseline).
//!
//! - `at_clock`: the clock advances one tick per id (a shard below 62,500 ids/s): nothing shared
//!   is touched.
//! - `ahead`: the clock stands still (a burst): every id is ahead and raises the mark.
//! - `ahead_contended`: the same while another thread (another shard) bursts on the same mark.
//! - `clock`: `next_id` with the real clock (`SystemTime::now` included), for scale.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iris_edge::idgen::{HighWater, IdGen};

/// The generator before the high-water mark: strictly increasing per shard only.
struct Previous {
    tag: u64,
    last_tick: u64,
}

impl Previous {
    fn next_id_at(&mut self, now: u64) -> u64 {
        self.last_tick = if now > self.last_tick {
            now
        } else {
            self.last_tick + 1
        };
        (self.last_tick << 18) | self.tag
    }
}

/// Runs `f` while another thread mints a burst of ids, on `high` when given.
fn with_neighbour<R>(high: Option<Arc<HighWater>>, f: impl FnOnce() -> R) -> R {
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let stop = stop.clone();
        std::thread::spawn(move || match high {
            Some(high) => {
                let mut g = IdGen::new(0, 0, 1, 0, high);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1000 {
                        black_box(g.next_id_at(black_box(1_000), 0));
                    }
                }
            }
            None => {
                let mut g = Previous {
                    tag: 1,
                    last_tick: 0,
                };
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1000 {
                        black_box(g.next_id_at(black_box(1_000)));
                    }
                }
            }
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
    r
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("idgen");
    g.throughput(Throughput::Elements(1));

    let mut prev = Previous {
        tag: 0,
        last_tick: 0,
    };
    let mut now = 0u64;
    g.bench_function("previous_at_clock", |b| {
        b.iter(|| {
            now += 1;
            black_box(prev.next_id_at(black_box(now)))
        })
    });
    let mut id = IdGen::new(0, 0, 0, 0, Arc::default());
    let mut now = 0u64;
    g.bench_function("at_clock", |b| {
        b.iter(|| {
            now += 1;
            black_box(id.next_id_at(black_box(now), 0))
        })
    });

    let mut prev = Previous {
        tag: 0,
        last_tick: 0,
    };
    g.bench_function("previous_ahead", |b| {
        b.iter(|| black_box(prev.next_id_at(black_box(1_000))))
    });
    let mut id = IdGen::new(0, 0, 0, 0, Arc::default());
    g.bench_function("ahead", |b| {
        b.iter(|| black_box(id.next_id_at(black_box(1_000), 0)))
    });

    with_neighbour(None, || {
        let mut prev = Previous {
            tag: 0,
            last_tick: 0,
        };
        g.bench_function("previous_ahead_neighbour_bursting", |b| {
            b.iter(|| black_box(prev.next_id_at(black_box(1_000))))
        });
    });
    let high: Arc<HighWater> = Arc::default();
    with_neighbour(Some(high.clone()), || {
        let mut id = IdGen::new(0, 0, 0, 0, high);
        g.bench_function("ahead_contended", |b| {
            b.iter(|| black_box(id.next_id_at(black_box(1_000), 0)))
        });
    });

    let mut id = IdGen::new(0, 0, 0, 0, Arc::default());
    g.bench_function("clock", |b| b.iter(|| black_box(id.next_id())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
