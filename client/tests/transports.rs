//! The client over TLS, WebSocket and WebSocket over TLS against a real `iris-edge` with every
//! v2 port (its certificate made here with rcgen, signed by a test CA the client trusts): two
//! clients exchange messages with sent ticks on each transport, a reconnect keeps the
//! transport, and a client trusting another CA fails with [`ClientError::Tls`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use iris_client::{roots_from_pem, Client, ClientError, ClientOptions, Event, MsgKind, Transport};
use iris_tests::tls::TestCa as Ca;
use iris_tests::{unique, Server, ServerOpts};

/// An edge with TLS, WS and WSS ports, its certificate issued by `ca` into `dir`.
fn server(ca: &Ca, dir: &Path) -> Server {
    let (cert, key) = (dir.join("edge.crt"), dir.join("edge.key"));
    ca.issue(&cert, &key);
    let config = format!(
        "[v2]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let any = "127.0.0.1:0".to_owned();
    let mut args = Vec::new();
    for flag in [
        "--listen-v2",
        "--listen-v2-tls",
        "--listen-v2-ws",
        "--listen-v2-wss",
    ] {
        args.push(flag.to_owned());
        args.push(any.clone());
    }
    Server::start(
        ServerOpts {
            args,
            ..ServerOpts::shards(2)
        }
        .config(&config),
    )
}

fn tls(ca: &Ca) -> Transport {
    Transport::Tls {
        server_name: "localhost".into(),
        roots: roots_from_pem(ca.pem().as_bytes()).unwrap(),
    }
}

fn ws() -> Transport {
    Transport::Ws {
        path: "/chat".into(),
    }
}

fn wss(ca: &Ca) -> Transport {
    Transport::Wss {
        server_name: "localhost".into(),
        roots: roots_from_pem(ca.pem().as_bytes()).unwrap(),
        path: "/".into(),
    }
}

fn connect(addr: SocketAddr, user: &str, transport: Transport) -> Result<Client, ClientError> {
    let mut o = ClientOptions::new(user);
    o.auto_reconnect = false;
    o.transport = transport;
    Client::connect(addr, o)
}

/// Events until `done` or 5 s.
fn collect(c: &Client, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < deadline {
        if let Some(e) = c.recv(Duration::from_millis(200)).expect("recv") {
            out.push(e);
        }
    }
    out
}

fn acks(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SendAck { client_msg_id, .. } => Some(*client_msg_id),
            _ => None,
        })
        .collect()
}

fn delivered(events: &[Event]) -> Vec<(Vec<u8>, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Deliver {
                sender, payload, ..
            } => Some((sender.clone(), payload.clone())),
            _ => None,
        })
        .collect()
}

/// `n` messages from `a` to `b` (sent ticks for all, delivered in order, once).
fn one_way(a: &Client, a_name: &str, b: &Client, b_name: &str, n: usize, tag: &str) {
    let mut ids = Vec::new();
    for i in 0..n {
        let payload = format!("{tag} {i}");
        ids.push(
            a.send(b_name.as_bytes(), MsgKind::Plain, payload.as_bytes())
                .unwrap(),
        );
    }
    let ticks = collect(a, |e| acks(e).len() >= n);
    assert_eq!(acks(&ticks), ids, "sent ticks of {tag}");
    let got = collect(b, |e| delivered(e).len() >= n);
    let want: Vec<_> = (0..n)
        .map(|i| {
            (
                a_name.as_bytes().to_vec(),
                format!("{tag} {i}").into_bytes(),
            )
        })
        .collect();
    assert_eq!(delivered(&got), want, "deliveries of {tag}");
}

/// Alice over `ta` and bob over `tb` exchange messages both ways, then alice reconnects (over
/// the same transport) and sends again.
fn exchange(addr_a: SocketAddr, ta: Transport, addr_b: SocketAddr, tb: Transport) {
    let (a, b) = (unique("alice"), unique("bob"));
    let alice = connect(addr_a, &a, ta).expect("alice logs in");
    let bob = connect(addr_b, &b, tb).expect("bob logs in");
    assert_eq!(alice.server_limits().version, 2);
    one_way(&alice, &a, &bob, &b, 20, "to bob");
    one_way(&bob, &b, &alice, &a, 20, "to alice");
    // A payload larger than one TLS record and than tungstenite's read chunk.
    let big = vec![0x5a_u8; 200_000];
    let id = alice.send(b.as_bytes(), MsgKind::Plain, &big).unwrap();
    assert_eq!(acks(&collect(&alice, |e| !acks(e).is_empty())), vec![id]);
    let got = collect(&bob, |e| !delivered(e).is_empty());
    assert_eq!(delivered(&got), vec![(a.as_bytes().to_vec(), big)]);
    alice
        .reconnect()
        .expect("reconnect over the same transport");
    one_way(&alice, &a, &bob, &b, 5, "after reconnect");
    alice.close();
    bob.close();
}

#[test]
fn tls_clients_exchange_messages_and_a_foreign_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("iris client test ca");
    let s = server(&ca, dir.path());
    let addr = s.v2_tls.expect("tls port");
    exchange(addr, tls(&ca), addr, tls(&ca));
    // TLS to a TCP client.
    exchange(addr, tls(&ca), s.v2.unwrap(), Transport::Tcp);

    let other = Ca::new("another ca");
    match connect(addr, &unique("mallory"), tls(&other)) {
        Err(ClientError::Tls { reason, .. }) => {
            assert!(reason.contains("UnknownIssuer"), "{reason}")
        }
        other => panic!("expected a tls error, got {other:?}"),
    }
    // The right CA but a name the certificate is not for.
    let wrong_name = Transport::Tls {
        server_name: "iris.example".into(),
        roots: roots_from_pem(ca.pem().as_bytes()).unwrap(),
    };
    match connect(addr, &unique("mallory"), wrong_name) {
        Err(ClientError::Tls { reason, .. }) => {
            assert!(reason.contains("not valid for name"), "{reason}")
        }
        other => panic!("expected a tls error, got {other:?}"),
    }
    assert!(matches!(
        roots_from_pem(b"not a certificate"),
        Err(ClientError::Invalid(_))
    ));
}

#[test]
fn websocket_clients_exchange_messages() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("iris client test ca");
    let s = server(&ca, dir.path());
    let addr = s.v2_ws.expect("ws port");
    exchange(addr, ws(), addr, ws());
    exchange(addr, ws(), s.v2.unwrap(), Transport::Tcp);
    // A plain TCP v2 port does not upgrade.
    match connect(s.v2.unwrap(), &unique("carol"), ws()) {
        Err(ClientError::WebSocket { .. }) => {}
        other => panic!("expected a websocket error, got {other:?}"),
    }
}

#[test]
fn websocket_over_tls_clients_exchange_messages() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("iris client test ca");
    let s = server(&ca, dir.path());
    let addr = s.v2_wss.expect("wss port");
    exchange(addr, wss(&ca), addr, wss(&ca));
    exchange(addr, wss(&ca), s.v2_tls.unwrap(), tls(&ca));
    let other = Ca::new("another ca");
    let foreign = Transport::Wss {
        server_name: "localhost".into(),
        roots: roots_from_pem(other.pem().as_bytes()).unwrap(),
        path: "/".into(),
    };
    assert!(matches!(
        connect(addr, &unique("mallory"), foreign),
        Err(ClientError::Tls { .. })
    ));
}

/// Events until the client reports [`ClientError::Disconnected`]; panics after 10 s.
fn until_disconnected(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "still connected after 10 s");
        match c.recv(Duration::from_millis(200)) {
            Err(ClientError::Disconnected) => return,
            Err(e) => panic!("recv: {e}"),
            Ok(_) => {}
        }
    }
}

#[test]
fn a_server_shutdown_disconnects_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("iris client test ca");
    let mut s = server(&ca, dir.path());
    let clients = [
        connect(s.v2_tls.unwrap(), &unique("t"), tls(&ca)).unwrap(),
        connect(s.v2_ws.unwrap(), &unique("w"), ws()).unwrap(),
        connect(s.v2_wss.unwrap(), &unique("s"), wss(&ca)).unwrap(),
    ];
    for c in &clients {
        assert!(c.is_connected());
    }
    // The edge closes each session (close_notify, a WebSocket close frame) and exits.
    assert!(s.sigterm().success());
    for c in &clients {
        until_disconnected(c);
        assert!(!c.is_connected());
    }
}
