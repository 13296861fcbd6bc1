//! The cross-shard ring hop: glommio's channel mesh between two executors, pinned to two CPUs
//! when there are two, carrying the edge's own ring type (`iris_edge::shard::Batch`, a
//! `Vec<ShardMsg>`) with one 64-byte RELIABLE_MSG delivery per message.
//!
//! - `round_trip`: one message to the peer and back, one at a time (two hops; latency).
//! - `pipelined_x1000`: 1000 one-message batches each way, sent back to back (throughput).
//! - `batched_64`: the same 1000 messages, 64 per ring slot as the edge batches its outbox.
//! - `round_trip_spin100us`: `round_trip` with executors that busy-poll 100 µs before parking,
//!   which shows how much of the parked round trip is the wake-up of a sleeping executor.
//!
//! Criterion runs on the main thread and drives executor A through a std channel; A times the
//! work itself, so the command hand-off is not in the figures.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use iris_edge::shard::{Batch, Delivery, ShardMsg, Via};

enum Cmd {
    RoundTrip(u64),
    Pipelined { messages: u64, per_batch: usize },
    Stop,
}

fn msg(i: u64) -> ShardMsg {
    let mut frame = Vec::with_capacity(87);
    iris_edge::protocol::frame::encode_reliable(
        &mut frame,
        iris_edge::protocol::MsgId(i),
        &[b'x'; 64],
    );
    ShardMsg::Route {
        to: b"user-000123".to_vec(),
        d: Delivery {
            id: Some(i),
            frame,
            meta: Default::default(),
        },
        via: Via::Local,
    }
}

fn placement(i: usize) -> Placement {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus >= 2 {
        Placement::Fixed(i % cpus)
    } else {
        Placement::Unbound
    }
}

fn builder(i: usize, spin: Duration) -> LocalExecutorBuilder {
    let b = LocalExecutorBuilder::new(placement(i)).io_memory(128 << 10);
    if spin.is_zero() {
        b
    } else {
        b.spin_before_park(spin)
    }
}

struct Rig {
    cmd: Sender<Cmd>,
    done: Receiver<Duration>,
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

fn start(spin: Duration) -> Rig {
    let mesh = MeshBuilder::<Batch, _>::full(2, 1024);
    let (cmd, cmd_rx) = channel::<Cmd>();
    let (done_tx, done) = channel::<Duration>();
    let m = mesh.clone();
    let a = builder(0, spin)
        .spawn(move || async move {
            let (tx, rx) = m.join().await.expect("join mesh");
            let peer = 1 - tx.peer_id();
            while let Ok(c) = cmd_rx.recv() {
                let t0 = Instant::now();
                match c {
                    Cmd::RoundTrip(n) => {
                        for i in 0..n {
                            tx.send_to(peer, vec![msg(i)]).await.ok();
                            rx.recv_from(peer).await.ok();
                        }
                    }
                    Cmd::Pipelined {
                        messages,
                        per_batch,
                    } => {
                        let batches = messages.div_ceil(per_batch as u64);
                        let recv = async {
                            let mut got = 0u64;
                            while got < messages {
                                match rx.recv_from(peer).await {
                                    Ok(Some(b)) => got += b.len() as u64,
                                    _ => break,
                                }
                            }
                        };
                        let send = async {
                            let mut i = 0u64;
                            for _ in 0..batches {
                                let n = per_batch.min((messages - i) as usize);
                                let b: Batch = (0..n as u64).map(|k| msg(i + k)).collect();
                                i += n as u64;
                                tx.send_to(peer, b).await.ok();
                            }
                        };
                        futures_lite::future::zip(send, recv).await;
                    }
                    Cmd::Stop => break,
                }
                done_tx.send(t0.elapsed()).ok();
            }
            tx.close();
        })
        .expect("executor A");
    let b = builder(1, spin)
        .spawn(move || async move {
            let (tx, rx) = mesh.join().await.expect("join mesh");
            let peer = 1 - tx.peer_id();
            // Echo every batch back until A closes its side.
            while let Ok(Some(batch)) = rx.recv_from(peer).await {
                if tx.send_to(peer, batch).await.is_err() {
                    break;
                }
            }
        })
        .expect("executor B");
    Rig {
        cmd,
        done,
        handles: vec![a, b],
    }
}

fn bench(c: &mut Criterion) {
    let spinning = start(Duration::from_micros(100));
    let mut g = c.benchmark_group("ring_hop");
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip_spin100us", |b| {
        b.iter_custom(|iters| {
            spinning.cmd.send(Cmd::RoundTrip(iters)).unwrap();
            spinning.done.recv().unwrap()
        })
    });
    g.finish();
    spinning.cmd.send(Cmd::Stop).ok();
    for h in spinning.handles {
        h.join().ok();
    }
    let rig = start(Duration::ZERO);
    let mut g = c.benchmark_group("ring_hop");
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip", |b| {
        b.iter_custom(|iters| {
            rig.cmd.send(Cmd::RoundTrip(iters)).unwrap();
            rig.done.recv().unwrap()
        })
    });
    for per_batch in [1usize, 64] {
        g.throughput(Throughput::Elements(1000));
        g.bench_function(format!("pipelined_x1000_batch{per_batch}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    rig.cmd
                        .send(Cmd::Pipelined {
                            messages: 1000,
                            per_batch,
                        })
                        .unwrap();
                    total += rig.done.recv().unwrap();
                }
                total
            })
        });
    }
    g.finish();
    rig.cmd.send(Cmd::Stop).ok();
    for h in rig.handles {
        h.join().ok();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
