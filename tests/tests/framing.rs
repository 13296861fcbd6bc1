//! Framing over a real socket: every client frame type split at every byte (two writes with a
//! pause between them), a frame dribbled one byte per write, and a random chunking of a stream
//! of mixed frames. Each split frame's effect is checked, so a mis-parse fails at once.

use std::time::Duration;

use iris_tests::{cbor, numbered, wire, Bytes, Client, Frame, Server, ServerOpts};

/// Pause between the two halves of a split frame.
const PAUSE: Duration = Duration::from_millis(5);

/// For every split point `k` in `1..len`, builds frame `make(k)` (all the same length), writes
/// it in two parts split at `k`, and runs `check(k)`.
fn each_split(
    c: &mut Client,
    make: impl Fn(usize) -> Vec<u8>,
    mut check: impl FnMut(usize, &mut Client),
) {
    let len = make(1).len();
    for k in 1..len {
        let f = make(k);
        assert_eq!(
            f.len(),
            len,
            "test bug: frames must all have the same length"
        );
        c.write_split(&f, k, PAUSE);
        check(k, c);
    }
}

fn pair(s: &Server, a: &str, b: &str) -> (Client, Client) {
    (s.login(a), s.login(b))
}

#[test]
fn split_send_send_seq_batch_and_cbor() {
    let s = Server::with_shards(2);
    let (mut a, mut b) = pair(&s, "sp-a", "sp-b");

    each_split(
        &mut a,
        |k| wire::send(b"sp-b", format!("send-{k:04}").as_bytes()),
        |k, _| {
            assert_eq!(
                b.recv_acked(),
                format!("send-{k:04}").as_bytes(),
                "SEND split at {k}"
            );
        },
    );
    each_split(
        &mut a,
        |k| wire::send_seq(b"sp-b", k as u64, format!("seq-{k:04}").as_bytes()),
        |k, _| {
            assert_eq!(
                b.recv_acked(),
                format!("seq-{k:04}").as_bytes(),
                "SEND_SEQ split at {k}"
            )
        },
    );
    each_split(
        &mut a,
        |k| {
            wire::batch_send(
                b"sp-b",
                &[
                    format!("b{k:04}-1").as_bytes(),
                    format!("b{k:04}-2").as_bytes(),
                ],
            )
        },
        |k, _| {
            assert_eq!(
                b.recv_acked(),
                format!("b{k:04}-1").as_bytes(),
                "BATCH split at {k}"
            );
            assert_eq!(
                b.recv_acked(),
                format!("b{k:04}-2").as_bytes(),
                "BATCH split at {k}"
            );
        },
    );
    let cb = |k: usize| {
        let t = format!("{k:04}");
        cbor::map(&[("k", cbor::V::Text(&t)), ("x", cbor::V::Uint(1000))])
    };
    each_split(
        &mut a,
        |k| wire::cbor_msg(b"sp-b", &cb(k)),
        |k, _| {
            assert_eq!(b.recv_acked(), cb(k), "CBOR_MSG split at {k}");
        },
    );
    b.flush_acks();
}

#[test]
fn split_ack_get_status_typing_and_read_receipt() {
    let s = Server::with_shards(2);
    let (mut a, mut b) = pair(&s, "sq-a", "sq-b");

    // ACK: each split ack is followed by a whole GET_STATUS; its reply proves the stream is
    // still in step (a mis-split ack would be bad_ack or an unknown opcode and a close).
    let n_acks = 17;
    for k in 1..n_acks {
        a.send("sq-b", format!("to-ack-{k:02}").as_bytes());
        let (id, p) = b.recv_msg();
        assert_eq!(p, format!("to-ack-{k:02}").as_bytes());
        b.write_split(&wire::ack(&id), k, PAUSE);
        assert_eq!(b.status("sq-a"), (1, 0), "after ACK split at {k}");
    }
    b.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    let mut b = s.login("sq-b");
    b.expect_silence(Duration::from_millis(500));

    // GET_STATUS: exact reply bytes.
    each_split(
        &mut a,
        |_| wire::get_status(b"sq-b"),
        |k, a| {
            let (f, raw) = a.recv_raw();
            let mut want = vec![0x06, 0x00, 0x04];
            want.extend_from_slice(b"sq-b");
            want.push(1);
            want.extend_from_slice(&[0; 8]);
            assert_eq!(raw, want, "GET_STATUS split at {k}: {f:?}");
        },
    );

    // TYPING start and stop: exact relay bytes (relays reach users presence knows online).
    a.wait_online("sq-b");
    for on in [true, false] {
        each_split(
            &mut a,
            |_| wire::typing(b"sq-b", on),
            |k, _| {
                let (f, raw) = b.recv_raw();
                assert_eq!(
                    raw,
                    [&[0x72, 0x00, 0x04][..], b"sq-a", &[u8::from(on)]].concat(),
                    "TYPING({on}) split at {k}: {f:?}"
                );
            },
        );
    }

    // READ_RECEIPT from b about message "id" sent by a.
    each_split(
        &mut b,
        |k| wire::read_receipt(format!("{k:016x}").as_bytes(), b"sq-a"),
        |k, _| match a.recv() {
            Frame::Receipt { id, reader, .. } => {
                assert_eq!(
                    id,
                    format!("{k:016x}").as_bytes(),
                    "READ_RECEIPT split at {k}"
                );
                assert_eq!(reader, b"sq-b");
            }
            other => panic!("READ_RECEIPT split at {k}: got {other:?}"),
        },
    );
}

#[test]
fn split_prekeys_e2ee_and_groups() {
    let s = Server::with_shards(2);
    let (mut a, mut b) = pair(&s, "se-a", "se-b");
    let ik = [7u8; 32];
    let bundle = |k: usize| {
        let t = format!("{k:04}");
        cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("n", cbor::V::Text(&t))])
    };
    // UPLOAD_PREKEYS split, then a whole FETCH of our own bundle returns it.
    each_split(
        &mut a,
        |k| wire::upload_prekeys(&bundle(k)),
        |k, a| {
            a.write(&wire::fetch_prekeys(b"se-a"));
            assert_eq!(
                a.recv(),
                Frame::Prekeys(bundle(k)),
                "UPLOAD_PREKEYS split at {k}"
            );
        },
    );
    // FETCH_PREKEYS split.
    let last = bundle(wire::upload_prekeys(&bundle(1)).len() - 1);
    each_split(
        &mut b,
        |_| wire::fetch_prekeys(b"se-a"),
        |k, b| {
            assert_eq!(
                b.recv(),
                Frame::Prekeys(last.clone()),
                "FETCH_PREKEYS split at {k}"
            );
        },
    );
    // E2EE_MSG split: b gets the 0x24 delivery inside a 0x10.
    let header = |k: usize| {
        let t = format!("{k:04}");
        cbor::map(&[("v", cbor::V::Text(&t))])
    };
    each_split(
        &mut a,
        |k| wire::e2ee_msg(b"se-b", &header(k), format!("ct-{k:04}").as_bytes()),
        |k, _| {
            let want = wire::e2ee_delivery(b"se-a", &header(k), format!("ct-{k:04}").as_bytes());
            assert_eq!(b.recv_acked(), want, "E2EE_MSG split at {k}");
        },
    );
    b.flush_acks();
    // Every group frame split: group_service_unavailable, connection stays open.
    let groups: Vec<Vec<u8>> = vec![
        wire::raw(0x30, &wire::l16(b"team")),
        wire::raw(0x31, &[wire::l16(b"g1"), wire::l16(b"se-b")].concat()),
        wire::raw(0x32, &wire::l16(b"g1")),
        wire::raw(
            0x33,
            &[wire::l16(b"g1"), wire::l16(b"\xa0"), wire::l32(b"ct")].concat(),
        ),
        wire::raw(0x35, &wire::l16(b"g1")),
        wire::raw(0x36, &[wire::l16(b"g1"), wire::l32(b"key")].concat()),
    ];
    for g in &groups {
        each_split(
            &mut a,
            |_| g.clone(),
            |k, a| {
                let (f, raw) = a.recv_raw();
                assert_eq!(
                    raw, b"\xFE\x00\x19group_service_unavailable",
                    "group 0x{:02x} split at {k}: {f:?}",
                    g[0]
                );
            },
        );
    }
    a.sync();
}

#[test]
fn split_login_within_settle_time() {
    // LOGIN has no length: the edge waits login_settle_us after its first byte. Make that 50 ms
    // and pause 5 ms between the halves.
    let s = Server::start(ServerOpts::shards(2).config("login_settle_us = 50000\n"));
    let mut a = s.login("sl-sender");
    let name = |k: usize| format!("split-login-{k:04}");
    let len = wire::login(name(1).as_bytes()).len();
    for k in 1..len {
        let mut c = s.connect();
        c.write_split(&wire::login(name(k).as_bytes()), k, PAUSE);
        assert_eq!(c.recv(), Frame::LoginOk, "LOGIN split at {k}");
        a.send(&name(k), b"hi");
        assert_eq!(
            c.recv_acked(),
            b"hi",
            "LOGIN split at {k}: message to {:?}",
            name(k)
        );
    }
    // A re-login split on one socket. Each message is acked before the next re-login.
    let mut c = s.login("sl-relogin-0000");
    let mut ids: Vec<Vec<u8>> = Vec::new();
    for k in 1..len {
        let n = format!("sl-relogin-{k:04}");
        c.write_split(&wire::login(n.as_bytes()), k, PAUSE);
        match c.recv() {
            Frame::LoginOk => {}
            Frame::Reliable { id, payload } => panic!(
                "re-LOGIN split at {k}: got message {:?} id {:?} before LOGIN_OK; it is {} \
                 (ids so far: {:?})",
                Bytes(&payload),
                Bytes(&id),
                if ids.contains(&id) {
                    "a second delivery of an earlier (acked) message"
                } else {
                    "a new id"
                },
                ids.iter()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
                    .collect::<Vec<_>>()
            ),
            other => panic!("re-LOGIN split at {k}: got {other:?}"),
        }
        a.send(&n, b"re");
        let (id, p) = c.recv_msg();
        assert_eq!(p, b"re", "re-LOGIN split at {k}");
        c.ack(&id);
        c.write(&wire::get_status(b"sl-sender"));
        match c.recv() {
            Frame::Status { .. } => {}
            Frame::Reliable { id: id2, payload } => panic!(
                "re-LOGIN split at {k}: message {:?} id {:?} delivered again right after the \
                 first delivery (id {:?}){}",
                Bytes(&payload),
                Bytes(&id2),
                Bytes(&id),
                if id2 == id {
                    ": same id, a duplicate in one session"
                } else {
                    ""
                }
            ),
            other => panic!("re-LOGIN split at {k}: expected STATUS, got {other:?}"),
        }
        ids.push(id);
    }
}

#[test]
fn frames_dribbled_one_byte_per_write() {
    let s = Server::with_shards(2);
    let (mut a, mut b) = pair(&s, "dr-a", "dr-b");
    a.wait_online("dr-b");
    let mut bytes = wire::send(b"dr-b", b"dribbled message");
    bytes.extend(wire::typing(b"dr-b", true));
    bytes.extend(wire::batch_send(b"dr-b", &[b"e1", b"e2"]));
    bytes.extend(wire::get_status(b"dr-b"));
    for byte in &bytes {
        a.write(std::slice::from_ref(byte));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(a.recv_status("dr-b"), (1, 0));
    assert_eq!(b.recv_acked(), b"dribbled message");
    assert_eq!(
        b.recv(),
        Frame::Typing {
            sender: b"dr-a".to_vec(),
            on: 1
        }
    );
    assert_eq!(b.recv_acked(), b"e1");
    assert_eq!(b.recv_acked(), b"e2");
}

/// A stream of mixed frames cut at random points into many writes parses as if whole.
#[test]
fn random_chunking_of_a_frame_stream() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::{Cell, RefCell};

    let s = Server::with_shards(2);
    let (a, b) = pair(&s, "rc-a", "rc-b");
    let (a, b) = (RefCell::new(a), RefCell::new(b));
    let round = Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(0usize..5, 1..30),
        proptest::collection::vec(1usize..40, 1..60),
    );
    runner
        .run(&strategy, |(kinds, cuts)| {
            let (mut a, mut b) = (a.borrow_mut(), b.borrow_mut());
            round.set(round.get() + 1);
            let round = round.get();
            let mut bytes = Vec::new();
            let mut want_msgs = Vec::new();
            let mut statuses = 0;
            for (i, kind) in kinds.iter().enumerate() {
                let p = numbered(round * 1000 + i, 16 + i);
                let as_cbor = cbor::map(&[("p", cbor::V::Bytes(&p))]);
                match kind {
                    0 => bytes.extend(wire::send(b"rc-b", &p)),
                    1 => bytes.extend(wire::send_seq(b"rc-b", i as u64, &p)),
                    2 => bytes.extend(wire::batch_send(b"rc-b", &[&p])),
                    3 => bytes.extend(wire::cbor_msg(b"rc-b", &as_cbor)),
                    _ => {
                        bytes.extend(wire::get_status(b"rc-b"));
                        statuses += 1;
                        continue;
                    }
                }
                want_msgs.push(if *kind == 3 { as_cbor } else { p });
            }
            let mut pos = 0;
            for c in cuts.iter().cycle() {
                if pos >= bytes.len() {
                    break;
                }
                let end = (pos + c).min(bytes.len());
                a.write(&bytes[pos..end]);
                pos = end;
                std::thread::sleep(Duration::from_micros(300));
            }
            for _ in 0..statuses {
                prop_assert_eq!(a.recv_status("rc-b"), (1, 0), "round {}", round);
            }
            for (i, w) in want_msgs.iter().enumerate() {
                let got = b.recv_acked();
                prop_assert_eq!(&got, w, "round {} message {}", round, i);
            }
            b.flush_acks();
            Ok(())
        })
        .unwrap();
}
