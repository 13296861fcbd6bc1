//! Changing a user's home (docs/REGIONS.md, "Changing a user's home"): the home table is
//! rewritten and every process restarted, then `POST /rehome?user=U` on the old home's core
//! moves U's stored messages (and prekeys) to the new home; U drains the moved and the newer
//! messages there in id order, exactly once. Messages sent meanwhile by an edge still on the old
//! table reach the new home through the old home's core (forwarded, not dropped). A rehome is
//! refused (409) while the core's table still homes U there, and sent to the right member (421)
//! otherwise; a `kill -9` of the old home's core in the middle of a move loses nothing, and a
//! second rehome finishes it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use iris_tests::cluster::{
    region_names, users_homed_in, write_home_table, Cluster, ClusterOpts, Regions, RegionsOpts,
};
use iris_tests::{cbor, core_bin, describe_sequence_diff, numbered, unique, wire, Frame};

use crate::common::{eventually, PAYLOAD};
use crate::delivery::{recv_numbers, CROSS};

/// `POST path` on an admin endpoint; (status code, body).
fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(150))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// `POST /rehome?user=U` on member `member` of region `c`.
fn rehome(c: &Cluster, member: usize, user: &str) -> (u16, String) {
    let admin = c.cores[member].admin.expect("core admin address");
    http_post(admin, &format!("/rehome?user={user}"))
}

/// The number in an answer "moved N messages ...".
fn moved(body: &str) -> u64 {
    body.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {body:?}"))
}

/// Restarts (SIGTERM, start again on the same data) every core of region `c`.
fn restart_cores(c: &mut Cluster) {
    for core in &mut c.cores {
        core.sigterm();
        core.restart();
    }
}

/// Restarts (SIGTERM, start again on the same data) every edge of region `c`.
fn restart_edges(c: &mut Cluster) {
    for e in &mut c.edges {
        e.sigterm();
        e.restart();
    }
}

/// One edge of one shard and two cores per region (two regions share a 2-CPU machine; two
/// members so a request to the wrong one is tested).
fn opts() -> ClusterOpts {
    ClusterOpts {
        edges: 1,
        cores: 2,
        shards: 1,
        ..ClusterOpts::default()
    }
}

#[test]
fn rehome_moves_stored_messages_to_the_new_home_in_order_exactly_once() {
    const STORED: usize = 50;
    const DURING: usize = 5; // sent by an edge still on the old table
    const AFTER: usize = 5; // sent once everything is restarted
    let names = region_names(2);
    // Hashed into region 1, pinned to region 0 by the table at first.
    let u = users_homed_in(&unique("rh"), &names[1], &names, 1).remove(0);
    let mut r = Regions::start_with(
        &names,
        RegionsOpts {
            cluster: opts(),
            global_delay_ms: None,
            home_table: vec![(u.clone(), names[0].clone())],
        },
    );
    let table = r.home_table.clone().expect("home table file");
    let s = r.user_homed_in(0, "rs");
    let m = r.region(0).core_of(&u);
    let other = 1 - m;

    // At its first home: prekeys uploaded, then offline.
    let ik = [0x6bu8; 32];
    let bundle = cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("opk", cbor::V::Uint(9))]);
    let mut cu = r.region(0).login(0, &u);
    cu.write(&wire::upload_prekeys(&bundle));
    cu.write(&wire::fetch_prekeys(u.as_bytes()));
    match cu.recv_within(CROSS) {
        Some(Frame::Prekeys(got)) => assert_eq!(got, bundle),
        other => panic!("own prekeys: {other:?}"),
    }
    cu.shutdown();

    // 50 messages stored at the first home while U is offline.
    let mut cs = r.region(0).login(0, &s);
    cs.send_many(&u, (0..STORED).map(|k| numbered(k, PAYLOAD)));
    eventually("stored at the first home", CROSS, || {
        r.region(0).core_metric_of(m, "iris_core_delivers_total") >= STORED as u64
    });
    cs.shutdown();

    // Refused while the table still homes U here.
    let (code, body) = rehome(r.region(0), m, &u);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("still homes"), "{body}");

    // (1) The table now homes U in region 1; the cores restart first: the region-0 edge still
    // has the old table and sends U's messages to region 0's core, which forwards them.
    write_home_table(&table, &[(u.as_str(), names[1].as_str())]);
    for i in 0..2 {
        restart_cores(r.region_mut(i));
    }
    let mut cs = r.region(0).login(0, &s);
    cs.send_many(&u, (STORED..STORED + DURING).map(|k| numbered(k, PAYLOAD)));
    eventually("forwarded to the new home", CROSS, || {
        r.region(0)
            .core_metric_of(m, "iris_core_forwarded_home_total")
            >= DURING as u64
    });
    assert_eq!(
        r.region(0)
            .core_metric_of(m, "iris_core_forwarded_home_total"),
        DURING as u64
    );
    cs.shutdown();
    for i in 0..2 {
        restart_edges(r.region_mut(i));
    }

    // (2) The wrong member names the right one; the right one moves the 50.
    let (code, body) = rehome(r.region(0), other, &u);
    assert_eq!(code, 421, "{body}");
    assert!(body.contains(&format!("member {m}")), "{body}");
    let t0 = Instant::now();
    let (code, body) = rehome(r.region(0), m, &u);
    let took = t0.elapsed();
    assert_eq!(code, 200, "{body}");
    assert_eq!(moved(&body), STORED as u64, "{body}");
    assert!(body.contains("1 prekey bundles"), "{body}");
    assert_eq!(
        r.region(0).core_metric_of(m, "iris_core_rehomed_total"),
        STORED as u64
    );

    // Newer messages, from a restarted edge: straight to the new home.
    let mut cs = r.region(0).login(0, &s);
    cs.send_many(
        &u,
        (STORED + DURING..STORED + DURING + AFTER).map(|k| numbered(k, PAYLOAD)),
    );
    let total = STORED + DURING + AFTER;
    let home_core = r.region(1).core_of(&u);
    eventually("everything stored at the new home", CROSS, || {
        r.region(1)
            .core_metric_of(home_core, "iris_core_delivers_total")
            >= total as u64
    });

    // U logs in at its new home: all of them, in order, once.
    let mut cu = r.region(1).login(0, &u);
    let got = recv_numbers(&mut cu, total);
    assert_eq!(
        describe_sequence_diff(&got, &(0..total).collect::<Vec<_>>()),
        None
    );
    cu.expect_silence(Duration::from_millis(800));
    // Its prekeys moved too: fetched (from region 0, routed to the new home).
    cs.write(&wire::fetch_prekeys(u.as_bytes()));
    match cs.recv_within(CROSS) {
        Some(Frame::Prekeys(got)) => assert_eq!(got, bundle, "prekeys at the new home"),
        other => panic!("prekeys of {u}: {other:?}"),
    }
    // Nothing left at the old home: a second rehome (by the CLI wrapper) moves nothing.
    let admin = r.region(0).cores[m].admin.expect("admin").to_string();
    let out = std::process::Command::new(core_bin())
        .args(["rehome", "--admin", &admin, "--user", &u])
        .output()
        .expect("iris-core rehome");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(moved(&body), 0, "{body}");
    assert!(body.contains("0 prekey bundles"), "{body}");
    // The new home's core refuses: its table homes U there.
    let admin = r.region(1).cores[home_core]
        .admin
        .expect("admin")
        .to_string();
    let out = std::process::Command::new(core_bin())
        .args(["rehome", "--admin", &admin, "--user", &u])
        .output()
        .expect("iris-core rehome");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("still homes"),
        "{out:?}"
    );
    r.assert_running();
    eprintln!("rehome: {STORED} moved in {took:?}, {DURING} forwarded, {total} drained in order");
}

#[test]
fn kill9_of_the_old_home_core_mid_move_then_a_second_rehome_loses_nothing() {
    const N: usize = 4000;
    let names = region_names(2);
    let u = users_homed_in(&unique("rk"), &names[1], &names, 1).remove(0);
    let mut r = Regions::start_with(
        &names,
        RegionsOpts {
            cluster: ClusterOpts {
                edges: 1,
                cores: 1,
                shards: 1,
                ..ClusterOpts::default()
            },
            global_delay_ms: None,
            home_table: vec![(u.clone(), names[0].clone())],
        },
    );
    let table = r.home_table.clone().expect("home table file");
    let s = r.user_homed_in(0, "rks");
    let mut cs = r.region(0).login(0, &s);
    cs.send_many(&u, (0..N).map(|k| numbered(k, PAYLOAD)));
    eventually("stored at the first home", Duration::from_secs(60), || {
        r.region(0).core_metric_of(0, "iris_core_delivers_total") >= N as u64
    });
    cs.shutdown();
    write_home_table(&table, &[(u.as_str(), names[1].as_str())]);
    for i in 0..2 {
        restart_cores(r.region_mut(i));
        restart_edges(r.region_mut(i));
    }

    // The move starts; kill -9 once part of it is acknowledged and deleted.
    let admin = r.region(0).cores[0].admin.expect("admin");
    let path = format!("/rehome?user={u}");
    let first = std::thread::spawn(move || http_post(admin, &path));
    // Polled without a pause: a step is one round trip to the global broker.
    let t0 = Instant::now();
    let at_kill = loop {
        let n = r.region(0).core_metric_of(0, "iris_core_rehomed_total");
        if n > 0 {
            break n;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the move did not start"
        );
    };
    let mid = t0.elapsed();
    r.region_mut(0).cores[0].kill9();
    let (code, body) = first.join().expect("first rehome");
    assert!(
        at_kill < N as u64,
        "the move was over ({at_kill} moved) before the kill; first answer {code} {body}"
    );
    assert_ne!(code, 200, "the first rehome answered {body}");

    // Restarted, asked again: it finishes.
    r.region_mut(0).cores[0].restart();
    let (code, body) = rehome(r.region(0), 0, &u);
    assert_eq!(code, 200, "{body}");
    let second = moved(&body);
    // (More may have been deleted between the last scrape and the kill.)
    assert!(
        second <= N as u64 - at_kill,
        "moved at least {at_kill} before the kill and {second} after, of {N}"
    );
    eventually(
        "all stored at the new home",
        Duration::from_secs(60),
        || r.region(1).core_metric_of(0, "iris_core_delivers_total") >= N as u64,
    );
    let mut cu = r.region(1).login(0, &u);
    let got = recv_numbers(&mut cu, N);
    assert_eq!(
        describe_sequence_diff(&got, &(0..N).collect::<Vec<_>>()),
        None
    );
    cu.expect_silence(Duration::from_millis(1000));
    let (code, body) = rehome(r.region(0), 0, &u);
    assert_eq!((code, moved(&body)), (200, 0), "{body}");
    eprintln!(
        "rehome kill -9: {at_kill} of {N} moved when killed (after {mid:?}), {second} by the second rehome, {N} drained once in order"
    );
}
