//! `iris-load --protocol v2` against a real `iris-edge --listen-v2`: an open-loop `pairs` run
//! delivers everything (every SEND acknowledged, every DELIVER acked in batches), and the login
//! scenarios speak HELLO/HELLO_OK; the same over TLS, WebSocket and WebSocket over TLS
//! (`--transport`, a self-signed certificate trusted with `--ca`).

mod common;

use common::{assert_sane_latency, run_load, Edge};

/// The `logins` step's short run: 50 users, one second after 0.2 s of warm-up.
const SHORT_LOGINS: [&str; 6] = ["--users", "50", "--duration", "1", "--warmup", "0.2"];

#[test]
fn pairs_v2_open_loop_two_seconds_nothing_lost() {
    let edge = Edge::start_v2(1);
    let target = edge.v2.unwrap().to_string();
    let pid = edge.pid.to_string();
    let r = run_load(&[
        "pairs",
        "--protocol",
        "v2",
        "--target",
        &target,
        "--pairs",
        "4",
        "--rate",
        "400",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--server-pid",
        &pid,
    ]);
    let sent = r.get("sent").unwrap();
    // 400/s for 2.5 s, give or take one message per pair at the edges of the schedule.
    assert!((990.0..=1010.0).contains(&sent), "sent {sent}");
    assert_eq!(r.get("delivered"), Some(sent));
    assert_eq!(r.lost, 0);
    assert_eq!((r.totals.duplicates, r.totals.reordered), (0, 0));
    assert_eq!(
        (r.totals.errors, r.totals.unexpected, r.totals.rate_limited),
        (0, 0, 0),
        "{:?}",
        r.notes
    );
    // Every SEND was acknowledged, and the SEND_ACK latency was measured for the window.
    assert_eq!(r.get("send_acks"), Some(sent));
    assert_eq!(r.totals.send_acks as f64, sent);
    let acks = r.send_ack_latency.expect("SEND_ACK latency");
    assert!((790.0..=810.0).contains(&(acks.count as f64)), "{acks:?}");
    assert!(acks.p50_us > 0.0 && acks.p50_us <= acks.max_us);
    assert_sane_latency(&r);
    assert!(r.server.is_some());
    assert_eq!(r.config["common"]["protocol"], "v2");
}

#[test]
fn pairs_v2_closed_loop_and_v1_beside_it() {
    let edge = Edge::start_v2(1);
    let v2 = edge.v2.unwrap().to_string();
    let v1 = edge.client.to_string();
    for (proto, target) in [("v2", &v2), ("v1", &v1)] {
        let r = run_load(&[
            "pairs",
            "--protocol",
            proto,
            "--target",
            target,
            "--pairs",
            "2",
            "--max",
            "--window",
            "8",
            "--duration",
            "1",
            "--warmup",
            "0.2",
        ]);
        let sent = r.get("sent").unwrap();
        assert!(sent > 0.0, "{proto}");
        assert_eq!(r.get("delivered"), Some(sent), "{proto}");
        assert_eq!(r.lost, 0, "{proto}");
        assert_eq!(r.totals.errors, 0, "{proto}: {:?}", r.notes);
        match proto {
            "v2" => assert_eq!(r.get("send_acks"), Some(sent)),
            _ => assert!(r.send_ack_latency.is_none() && r.get("send_acks").is_none()),
        }
    }
}

#[test]
fn logins_and_connect_v2() {
    let edge = Edge::start_v2(1);
    let target = edge.v2.unwrap().to_string();
    let args = [
        "logins",
        "--protocol",
        "v2",
        "--target",
        &target,
        "--conns",
        "4",
    ]
    .into_iter()
    .chain(SHORT_LOGINS)
    .collect::<Vec<_>>();
    let r = run_load(&args);
    assert!(r.get("logins_per_s").unwrap() > 0.0);
    assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
    let r = run_load(&[
        "connect",
        "--protocol",
        "v2",
        "--target",
        &target,
        "--conns",
        "40",
        "--rate",
        "400",
        "--hold",
        "0.5",
        "--settle",
        "0.2",
    ]);
    assert_eq!(r.get("connections_open"), Some(40.0));
    assert_eq!(r.get("still_open"), Some(40.0));
    // A v1 client's LOGIN on the v2 port is not a HELLO: refused.
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iris-load"))
        .args(["connect", "--protocol", "v1", "--target", &target])
        .args([
            "--conns", "1", "--hold", "0.2", "--settle", "0.1", "--quiet",
        ])
        .args(["--no-pin", "--cpus", "0", "--io-memory", "131072", "--json"])
        .arg(dir.path().join("r.json"))
        .output()
        .unwrap();
    let r = iris_perf::load::Report::read_json(&dir.path().join("r.json")).unwrap();
    assert!(out.status.success());
    assert_eq!(r.get("connections_open"), Some(0.0));
    assert!(r.totals.errors >= 1, "{:?}", r.notes);
}

/// `pairs` over TLS, WebSocket and WebSocket over TLS (a self-signed certificate trusted with
/// `--ca`): every message delivered, acked and its SEND acknowledged, nothing else.
#[test]
fn pairs_v2_over_tls_ws_and_wss_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start_v2_transports(dir.path());
    let ca = dir.path().join("edge.crt").display().to_string();
    for (transport, key) in [("tls", "v2tls"), ("ws", "v2ws"), ("wss", "v2wss")] {
        let target = edge.addr(key);
        let r = run_load(&[
            "pairs",
            "--protocol",
            "v2",
            "--transport",
            transport,
            "--ca",
            &ca,
            "--target",
            &target,
            "--pairs",
            "4",
            "--rate",
            "400",
            "--duration",
            "1",
            "--warmup",
            "0.5",
        ]);
        let sent = r.get("sent").unwrap();
        // 400/s for 1.5 s, give or take one message per pair at the edges of the schedule.
        assert!((590.0..=610.0).contains(&sent), "{transport}: sent {sent}");
        assert_eq!(r.get("delivered"), Some(sent), "{transport}");
        assert_eq!(r.totals.delivered as f64, sent, "{transport}");
        assert_eq!(r.get("send_acks"), Some(sent), "{transport}");
        assert_eq!(r.lost, 0, "{transport}");
        assert_eq!(
            (r.totals.duplicates, r.totals.reordered, r.totals.unexpected),
            (0, 0, 0),
            "{transport}"
        );
        assert_eq!(
            (r.totals.errors, r.totals.rate_limited),
            (0, 0),
            "{transport}: {:?}",
            r.notes
        );
        assert_eq!(r.totals.logins, 8, "{transport}");
        assert_sane_latency(&r);
        assert_eq!(r.config["common"]["transport"], transport);
    }
}

/// `connect` and `logins` over TLS and WebSocket: every connection logged in and still open,
/// every login loop without a failure; a certificate that is not trusted and a transport that
/// is not the listener's fail every connection.
#[test]
fn connect_and_logins_v2_over_tls_and_ws() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start_v2_transports(dir.path());
    let ca = dir.path().join("edge.crt").display().to_string();
    for (transport, key) in [("tls", "v2tls"), ("ws", "v2ws")] {
        let target = edge.addr(key);
        let common = [
            "--protocol",
            "v2",
            "--transport",
            transport,
            "--ca",
            &ca,
            "--target",
            &target,
        ];
        let mut args = vec!["connect"];
        args.extend(common);
        args.extend([
            "--conns", "40", "--rate", "400", "--hold", "0.5", "--settle", "0.2",
        ]);
        let r = run_load(&args);
        assert_eq!(r.get("connections_open"), Some(40.0), "{transport}");
        assert_eq!(r.get("still_open"), Some(40.0), "{transport}");
        assert_eq!(r.totals.logins, 40, "{transport}");
        assert_eq!(r.totals.errors, 0, "{transport}: {:?}", r.notes);
        let mut args = vec!["logins"];
        args.extend(common);
        args.extend(["--conns", "4"]);
        args.extend(SHORT_LOGINS);
        let r = run_load(&args);
        assert!(r.get("logins_per_s").unwrap() > 0.0, "{transport}");
        assert!(r.totals.logins > 4, "{transport}: {}", r.totals.logins);
        assert_eq!(r.totals.errors, 0, "{transport}: {:?}", r.notes);
    }
    // TLS clients with a session cache each (--tls-clients), used in turn: after each client's
    // first connection, its connections resume with the ticket the last one left it.
    let resumed = edge.metric("iris_edge_tls_handshakes_resumed_total");
    let accepted = edge.metric("iris_edge_v2_tls_connections_accepted_total");
    let tls = edge.addr("v2tls");
    let args = [
        "logins",
        "--protocol",
        "v2",
        "--transport",
        "tls",
        "--ca",
        &ca,
        "--target",
        &tls,
        "--tls-clients",
        "8",
        "--conns",
        "2",
    ]
    .into_iter()
    .chain(SHORT_LOGINS)
    .collect::<Vec<_>>();
    let r = run_load(&args);
    assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
    let resumed = edge.metric("iris_edge_tls_handshakes_resumed_total") - resumed;
    let handshakes = edge.metric("iris_edge_v2_tls_connections_accepted_total") - accepted;
    assert!(
        handshakes > 16 && resumed + 8 >= handshakes * 9 / 10,
        "{resumed} of {handshakes} handshakes resumed with 8 clients"
    );
    // Another self-signed certificate is not the edge's: TLS refuses every connection.
    let other = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong = other.path().join("other.crt");
    std::fs::write(&wrong, cert.cert.pem()).unwrap();
    let wrong = wrong.display().to_string();
    let tls = edge.addr("v2tls");
    let plain = edge.v2.unwrap().to_string();
    for (transport, target, ca) in [
        ("tls", &tls, &wrong),
        ("tls", &plain, &ca),
        ("ws", &plain, &ca),
        ("ws", &tls, &ca),
    ] {
        let r = run_load(&[
            "connect",
            "--protocol",
            "v2",
            "--transport",
            transport,
            "--ca",
            ca,
            "--target",
            target,
            "--conns",
            "2",
            "--hold",
            "0.2",
            "--settle",
            "0.1",
            "--connect-timeout",
            "2",
        ]);
        assert_eq!(
            r.get("connections_open"),
            Some(0.0),
            "{transport} to {target}"
        );
        assert_eq!(r.totals.errors, 2, "{transport} to {target}: {:?}", r.notes);
        assert!(
            r.notes.iter().any(|n| n.contains("handshake")),
            "{transport} to {target}: {:?}",
            r.notes
        );
    }
    // --transport is for v2 only, and TLS needs a certificate to trust.
    for bad in [
        &["--protocol", "v1", "--transport", "ws"][..],
        &["--protocol", "v2", "--transport", "tls"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_iris-load"))
            .args(["connect", "--target", &plain, "--conns", "1", "--quiet"])
            .args(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--protocol v2") || err.contains("--ca"),
            "{bad:?}: {err}"
        );
    }
}
