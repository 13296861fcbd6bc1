//! The edge's CPU per TLS handshake (`iris_edge::tls`, the configuration every shard uses): a
//! full handshake with session tickets off, one with tickets on (it also seals and sends a
//! ticket), and a resumption with a ticket (`tls_session_tickets`). Client and server run in
//! memory on this thread; only the server's calls are timed, so the figure is the edge's share
//! (the client verifying the certificate is not in it). TLS 1.3, X25519 offered first (as
//! browsers and `iris-load` do), a P-256 certificate, AES-256-GCM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use iris_edge::tls::{ShardCerts, TlsCerts};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The edge's configuration for a new certificate in `dir`, with or without tickets, and the
/// PEM certificate file.
fn server_config(dir: &std::path::Path, tickets: bool) -> (Arc<ServerConfig>, std::path::PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("edge.crt"), dir.join("edge.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let certs = Arc::new(TlsCerts::load(&cert, &key, tickets).expect("certificate"));
    (ShardCerts::new(certs).current(), cert)
}

fn client_config(cert: &std::path::Path, resume: bool) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(cert).unwrap())
        .unwrap();
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(iris_perf::load::transport::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Arc::new(config)
}

/// Runs one handshake in memory (and delivers the server's ticket, if any, to the client);
/// returns the time spent in the server's calls and whether it resumed.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, bool) {
    let mut c = ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut spent = Duration::ZERO;
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    spent += t.elapsed();
    let mut wire = Vec::with_capacity(8192);
    loop {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let client_sent = !wire.is_empty();
        let t = Instant::now();
        let mut input = &wire[..];
        while !input.is_empty() {
            s.read_tls(&mut input).unwrap();
        }
        s.process_new_packets().expect("server handshake");
        let mut out = Vec::with_capacity(8192);
        while s.wants_write() {
            s.write_tls(&mut out).unwrap();
        }
        spent += t.elapsed();
        let mut input = &out[..];
        while !input.is_empty() {
            c.read_tls(&mut input).unwrap();
        }
        c.process_new_packets().expect("client handshake");
        if !client_sent && out.is_empty() {
            break;
        }
    }
    assert!(!s.is_handshaking() && !c.is_handshaking());
    (
        spent,
        s.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    )
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("tls_handshake_server");
    g.throughput(Throughput::Elements(1));
    for (name, tickets, resume) in [
        ("full_tickets_off", false, false),
        ("full_tickets_on", true, false),
        ("resumed", true, true),
    ] {
        let (server, cert) = server_config(dir.path(), tickets);
        let client = client_config(&cert, resume);
        // The first handshake leaves the client a ticket; every resumption brings a new one.
        let (_, first_resumed) = handshake(&server, &client);
        assert!(!first_resumed);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (spent, resumed) = handshake(&server, &client);
                    assert_eq!(resumed, resume, "{name}");
                    total += spent;
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
