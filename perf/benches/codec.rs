//! Frame encode/decode, the per-message work of every connection: client SEND and ACK frames
//! decoded by the server, RELIABLE_MSG frames encoded by the server and decoded by a client,
//! all with 64-byte payloads.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iris_edge::protocol::frame::{decode_server, encode_reliable};
use iris_edge::protocol::{decode, ClientFrame, Decoded, Limits, MsgId};

const N: usize = 1000;
const PAYLOAD: [u8; 64] = [b'x'; 64];

fn sends() -> Vec<u8> {
    let mut buf = Vec::new();
    for _ in 0..N {
        ClientFrame::Send {
            target: b"user-000123",
            msg: &PAYLOAD,
        }
        .encode(&mut buf);
    }
    buf
}

fn decode_all(buf: &[u8], limits: &Limits) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Ok(Decoded::Frame(f, used)) = decode(&buf[pos..], limits) {
        black_box(f);
        pos += used;
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(N as u64));

    let send_buf = sends();
    g.bench_function("decode_send_64B_x1000", |b| {
        b.iter(|| assert_eq!(decode_all(black_box(&send_buf), &limits), N))
    });

    let mut ack_buf = Vec::new();
    for i in 0..N as u64 {
        ClientFrame::Ack { id: MsgId(i) }.encode(&mut ack_buf);
    }
    g.bench_function("decode_ack_x1000", |b| {
        b.iter(|| assert_eq!(decode_all(black_box(&ack_buf), &limits), N))
    });

    let mut out = Vec::with_capacity(send_buf.len());
    g.bench_function("encode_send_64B_x1000", |b| {
        b.iter(|| {
            out.clear();
            for _ in 0..N {
                ClientFrame::Send {
                    target: black_box(b"user-000123"),
                    msg: black_box(&PAYLOAD),
                }
                .encode(&mut out);
            }
            black_box(out.len())
        })
    });

    g.bench_function("encode_reliable_64B_x1000", |b| {
        b.iter(|| {
            out.clear();
            for i in 0..N as u64 {
                encode_reliable(&mut out, MsgId(black_box(i)), black_box(&PAYLOAD));
            }
            black_box(out.len())
        })
    });

    let mut rel = Vec::new();
    for i in 0..N as u64 {
        encode_reliable(&mut rel, MsgId(i), &PAYLOAD);
    }
    g.bench_function("decode_server_reliable_64B_x1000", |b| {
        b.iter(|| {
            let mut pos = 0;
            let mut n = 0;
            while let Ok(Some((f, used))) = decode_server(black_box(&rel[pos..])) {
                black_box(f);
                pos += used;
                n += 1;
            }
            assert_eq!(n, N);
        })
    });
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
