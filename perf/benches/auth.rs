//! LOGIN token verification (`iris_edge::auth::Verifier`, the check each shard keeps): what a
//! login costs the shard with auth on, for a good token (the common case) and a token with a
//! bad signature (refused), and the one-off `auth::verify` that keys its HMAC per call.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use iris_edge::auth;
use iris_edge::config::AuthConfig;

fn bench(c: &mut Criterion) {
    let cfg = AuthConfig {
        enabled: true,
        secret: "0123456789abcdef0123456789abcdef".into(),
        ..AuthConfig::default()
    };
    let now_ms = 1_800_000_000_000u64;
    let token = auth::sign(
        cfg.secret.as_bytes(),
        &serde_json::json!({"sub": "user-00001234", "iss": "iris", "exp": 1_900_000_000u64}),
    );
    let mut bad = token.clone().into_bytes();
    let last = bad.len() - 2;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let user = b"user-00001234";
    let verifier = auth::Verifier::new(&cfg);
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify_good", |b| {
        b.iter(|| verifier.verify(black_box(user), Some(black_box(token.as_bytes())), now_ms))
    });
    g.bench_function("verify_bad_signature", |b| {
        b.iter(|| verifier.verify(black_box(user), Some(black_box(&bad)), now_ms))
    });
    g.bench_function("verify_one_off", |b| {
        b.iter(|| {
            auth::verify(
                black_box(&cfg),
                black_box(user),
                Some(black_box(token.as_bytes())),
                now_ms,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
