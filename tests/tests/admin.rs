//! The admin endpoint (`/health`, `/metrics` reflecting activity, per-shard lines) and
//! `--check` (accepts a good file, rejects an unknown key and bad TOML).

use std::time::Duration;

use iris_tests::{metric_value, run_check, wait_until, wire, Client, Server, ServerOpts};

#[test]
fn health_is_ok() {
    let s = Server::with_shards(2);
    let (code, body) = s.admin_get("/health");
    assert_eq!((code, body.trim()), (200, "ok"));
}

#[test]
fn metrics_reflect_activity() {
    let s = Server::with_shards(2);
    let m = s.metrics();
    for name in [
        "iris_edge_connections_open",
        "iris_edge_logins_total",
        "iris_edge_messages_accepted_total",
        "iris_edge_protocol_errors_total",
        "iris_edge_slow_consumer_disconnects_total",
    ] {
        assert!(
            m.contains(&format!("# TYPE {name} ")),
            "no TYPE line for {name}:\n{m}"
        );
        let total = metric_value(&m, name, None).unwrap_or_else(|| panic!("{name} missing"));
        let per_shard: u64 = (0..2)
            .map(|i| {
                metric_value(&m, name, Some(i))
                    .unwrap_or_else(|| panic!("{name}{{shard={i}}} missing"))
            })
            .sum();
        assert_eq!(total, per_shard, "{name}: total is the sum of the shards");
    }
    // The harness's readiness probes are closed; wait until the server has seen that.
    assert!(
        wait_until(Duration::from_secs(2), || s
            .metric("iris_edge_connections_open")
            == 0),
        "connections_open = {} with no client",
        s.metric("iris_edge_connections_open")
    );
    let logins0 = s.metric("iris_edge_logins_total");
    let accepted0 = s.metric("iris_edge_messages_accepted_total");
    let errors0 = s.metric("iris_edge_protocol_errors_total");

    let mut a = s.login("m-a");
    let mut b = s.login("m-b");
    for i in 0..5 {
        a.send("m-b", format!("m{i}").as_bytes());
    }
    for _ in 0..5 {
        b.recv_acked();
    }
    b.flush_acks();
    let expect = |name: &str, want: u64| {
        let mut got = 0;
        let ok = wait_until(Duration::from_secs(2), || {
            got = s.metric(name);
            got == want
        });
        assert!(ok, "{name} = {got}, expected {want}");
    };
    expect("iris_edge_connections_open", 2);
    expect("iris_edge_logins_total", logins0 + 2);
    expect("iris_edge_messages_accepted_total", accepted0 + 5);

    let mut bad = s.login("m-bad");
    bad.write(&wire::send(b"", b"x"));
    bad.expect_error_and_close("bad_target");
    expect("iris_edge_protocol_errors_total", errors0 + 1);
    // An unknown opcode is answered and counted apart; the connection stays.
    let unknown0 = s.metric("iris_edge_unknown_opcodes_total");
    let mut odd = s.login("m-odd");
    odd.write(&[0x99]);
    assert_eq!(
        odd.recv(),
        iris_tests::Frame::Error("unknown_opcode".into())
    );
    odd.sync();
    expect("iris_edge_unknown_opcodes_total", unknown0 + 1);
    drop(odd);

    drop(a);
    drop(b);
    expect("iris_edge_connections_open", 0);
}

#[test]
fn check_accepts_a_good_file() {
    let good = "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nshards = 2\nmax_output_bytes = 1048576\n\
                login_settle_us = 1000\ncommit_window_ms = 2\n[auth]\nenabled = false\n";
    let out = run_check(good);
    assert!(
        out.status.success(),
        "--check refused a good file: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The empty file is all defaults.
    assert!(
        run_check("").status.success(),
        "--check refused an empty file"
    );
}

#[test]
fn check_rejects_unknown_keys_and_bad_toml() {
    for (text, needle) in [
        ("shardz = 3\n", "shardz"),
        ("[auth]\nenable = true\n", "enable"),
        ("shards = \"two\"\n", "shards"),
        ("this is not toml\n", ""),
    ] {
        let out = run_check(text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--check accepted {text:?}");
        assert!(
            err.contains(needle),
            "--check message for {text:?} does not name {needle:?}: {err}"
        );
    }
}

#[test]
fn unknown_admin_path_is_404_and_metrics_survive_bad_clients() {
    let s = Server::with_shards(2);
    let (code, _) = s.admin_get("/nope");
    assert_eq!(code, 404);
    let mut c = s.login("adm-x");
    c.write(&wire::send(b"", b""));
    c.expect_error_and_close("bad_target");
    assert_eq!(s.admin_get("/health").0, 200);
}

#[test]
fn listening_line_means_every_shard_serves() {
    // The line is printed "once serving": connections made right after it must be served at
    // once, whichever shard's SO_REUSEPORT listener the kernel gives them to.
    let s = Server::start(ServerOpts {
        shards: 4,
        no_ready_probe: true,
        ..ServerOpts::default()
    });
    let t0 = std::time::Instant::now();
    let mut clients: Vec<Client> = (0..24).map(|_| Client::connect(s.client)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write(&wire::login(format!("early-{i}").as_bytes()));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        c.timeout = Duration::from_secs(3);
        let got = c.recv_within(Duration::from_secs(3));
        assert_eq!(
            got,
            Some(iris_tests::Frame::LoginOk),
            "connection {i} made right after the listening line: no LOGIN_OK {:?} after the line",
            t0.elapsed()
        );
    }
}

/// `max_input_bytes` may not be below the largest legal frame: a BATCH_SEND of 1 MiB to a
/// 256-byte target is 1 + 2 + 256 + 4 + 1,048,576 = 1,048,839 bytes (the old bound was
/// 1,048,592). At exactly that value such a batch is accepted and delivered.
#[test]
fn max_input_bytes_holds_the_largest_legal_frame() {
    let out = run_check("max_input_bytes = 1048600\n");
    assert!(
        !out.status.success(),
        "--check accepted max_input_bytes = 1048600"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_input_bytes") && err.contains("1048839"),
        "{err}"
    );
    assert!(run_check("max_input_bytes = 1048839\n").status.success());

    let s = Server::start(ServerOpts::shards(2).config("max_input_bytes = 1048839\n"));
    let target = "t".repeat(256);
    let mut r = s.login(&target);
    let mut a = s.login("big-batch-sender");
    let entry = vec![b'b'; 65534];
    let entries: Vec<&[u8]> = (0..16).map(|_| entry.as_slice()).collect();
    let frame = wire::batch_send(target.as_bytes(), &entries);
    assert_eq!(frame.len(), 1_048_839);
    a.write(&frame);
    for i in 0..16 {
        assert_eq!(r.recv_acked().len(), 65534, "entry {i}");
    }
    a.sync();
}
