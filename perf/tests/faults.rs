//! Loss, duplicate and reorder detection, proven against a test server that drops, repeats and
//! reorders messages on purpose, and the reference echo server driven by `iris-load echo`.
//!
//! The fault server speaks just enough of the v1 protocol (LOGIN → LOGIN_OK, SEND → RELIABLE_MSG
//! to the logged-in target, ACK ignored) with the codec of `iris_edge::protocol`. It reads the
//! sequence number in each load-generator payload and, per target: drops every message whose
//! number ends in 3, delivers those ending in 5 twice, and holds those ending in 7 until the
//! next message for the same target has been delivered (a reorder). It counts exactly what it
//! did, and the report of `iris-load pairs` must show exactly those counts.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use common::{assert_sane_latency, run_load};
use iris_edge::protocol::decode::{decode, Decoded, Limits};
use iris_edge::protocol::frame::{encode_login_ok, encode_reliable};
use iris_edge::protocol::{ClientFrame, MsgId};
use iris_perf::load::payload;

#[derive(Default)]
struct Faults {
    delivered: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

#[derive(Default)]
struct Registry {
    outs: HashMap<Vec<u8>, Sender<Vec<u8>>>,
    /// Per target: a held message (its frame), released after the next delivery.
    held: HashMap<Vec<u8>, Vec<u8>>,
    next_id: u64,
}

struct FaultServer {
    addr: SocketAddr,
    faults: Arc<Faults>,
    reg: Arc<Mutex<Registry>>,
}

impl FaultServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let reg = Arc::new(Mutex::new(Registry::default()));
        let (f, r) = (faults.clone(), reg.clone());
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (f, r) = (f.clone(), r.clone());
                thread::spawn(move || serve(s, f, r));
            }
        });
        FaultServer { addr, faults, reg }
    }
}

fn serve(mut s: TcpStream, faults: Arc<Faults>, reg: Arc<Mutex<Registry>>) {
    s.set_nodelay(true).unwrap();
    let (tx, rx) = channel::<Vec<u8>>();
    let mut w = s.try_clone().unwrap();
    thread::spawn(move || {
        for frame in rx {
            if w.write_all(&frame).is_err() {
                return;
            }
        }
    });
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut pos = 0;
        while let Ok(Decoded::Frame(f, used)) = decode(&buf[pos..], &limits) {
            pos += used;
            match f {
                ClientFrame::Login { body } => {
                    reg.lock().unwrap().outs.insert(body.to_vec(), tx.clone());
                    let mut ok = Vec::new();
                    encode_login_ok(&mut ok);
                    let _ = tx.send(ok);
                }
                ClientFrame::Send { target, msg } => route(&faults, &reg, target, msg),
                _ => {}
            }
        }
        buf.drain(..pos);
    }
}

fn route(faults: &Faults, reg: &Mutex<Registry>, target: &[u8], msg: &[u8]) {
    let mut reg = reg.lock().unwrap();
    let seq = payload::decode(msg).expect("a load payload").seq;
    let Some(out) = reg.outs.get(target).cloned() else {
        faults.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    reg.next_id += 1;
    let mut frame = Vec::new();
    encode_reliable(&mut frame, MsgId(reg.next_id), msg);
    match seq % 10 {
        3 => {
            faults.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        7 => {
            reg.held.insert(target.to_vec(), frame);
            return;
        }
        5 => {
            let _ = out.send(frame.clone());
            faults.duplicated.fetch_add(1, Ordering::Relaxed);
            faults.delivered.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    let _ = out.send(frame);
    faults.delivered.fetch_add(1, Ordering::Relaxed);
    if let Some(h) = reg.held.remove(target) {
        let _ = out.send(h);
        faults.reordered.fetch_add(1, Ordering::Relaxed);
        faults.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn detects_exactly_the_injected_loss_duplicates_and_reordering() {
    let srv = FaultServer::start();
    let target = srv.addr.to_string();
    let r = run_load(&[
        "pairs",
        "--target",
        &target,
        "--pairs",
        "3",
        "--rate",
        "300",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--drain-timeout",
        "0.5",
    ]);
    let f = &srv.faults;
    let still_held = srv.reg.lock().unwrap().held.len() as u64;
    let dropped = f.dropped.load(Ordering::Relaxed) + still_held;
    let duplicated = f.duplicated.load(Ordering::Relaxed);
    let reordered = f.reordered.load(Ordering::Relaxed);
    let sent = r.get("sent").unwrap() as u64;
    assert!(sent >= 300, "sent {sent}");
    assert!(dropped > 0 && duplicated > 0 && reordered > 0);
    assert_eq!(r.lost, dropped, "lost");
    assert_eq!(r.get("lost"), Some(dropped as f64));
    assert_eq!(r.totals.duplicates, duplicated, "duplicates");
    assert_eq!(r.get("duplicated"), Some(duplicated as f64));
    assert_eq!(r.totals.reordered, reordered, "reordered");
    assert_eq!(r.get("reordered"), Some(reordered as f64));
    assert_eq!(r.get("delivered"), Some((sent - dropped) as f64));
    assert_eq!(r.totals.delivered, sent - dropped);
    assert_eq!(r.totals.unexpected, 0);
    assert!(r.notes.iter().any(|n| n.contains("drain-timeout")));
    assert_sane_latency(&r);
}

#[test]
fn echo_server_measures_the_loopback_ceiling() {
    /// Kills the echo server when the test ends, failed or not (a server left running keeps
    /// the test harness's output open, and the test run never ends).
    struct Echo(std::process::Child);
    impl Drop for Echo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Echo(
        Command::new(env!("CARGO_BIN_EXE_iris-echo"))
            .args(["--listen", "127.0.0.1:0", "--io-memory", "131072"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start iris-echo"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("iris-echo listening ")
        .unwrap_or_else(|| panic!("unexpected output {line:?}"))
        .trim()
        .to_string();
    for batch in ["1", "8"] {
        let r = run_load(&[
            "echo",
            "--target",
            &addr,
            "--conns",
            "4",
            "--batch",
            batch,
            // A second measured after a warm-up long enough for the four connections to be up
            // on a loaded machine (0.5 s after 0.1 s measured nothing once under the suite).
            "--duration",
            "1",
            "--warmup",
            "0.3",
        ]);
        let msgs = r.get("messages_per_s").unwrap();
        let rts = r.get("round_trips_per_s").unwrap();
        assert!(
            msgs > 0.0 && rts > 0.0,
            "batch {batch}: {msgs} messages/s, {rts} round trips/s; {:?}",
            r.notes
        );
        let b: f64 = batch.parse().unwrap();
        assert!((msgs / rts - b).abs() < 0.01 * b, "{msgs} vs {rts}");
        assert_eq!(r.totals.errors, 0, "{:?}", r.notes);
        assert_sane_latency(&r);
    }
    drop(child);
}
