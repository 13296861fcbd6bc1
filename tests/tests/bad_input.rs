//! Bad input: every malformed or oversized frame of every opcode gets `0xFE | u16 len | reason`
//! and a close, while a bystander pair on the same server keeps exchanging messages (checked
//! after each bad client). Unknown opcodes get `0xFE unknown_opcode`, the rest of that read is
//! discarded and the connection stays usable, until more than `unknown_opcode_limit` arrive in
//! `unknown_opcode_window_ms`. A valid frame before a bad one in one write is kept.

use std::time::{Duration, Instant};

use iris_tests::{
    cbor, wire, write_in_background, Bystander, Bytes, Client, Frame, ReadEnd, Server,
};

/// One bad-input case: log in first (or not), write `bytes`, expect `reason` then a close.
struct Case {
    name: &'static str,
    login: bool,
    bytes: Vec<u8>,
    reason: &'static str,
}

fn case(name: &'static str, bytes: Vec<u8>, reason: &'static str) -> Case {
    Case {
        name,
        login: true,
        bytes,
        reason,
    }
}

/// Runs one case; returns a description of what went wrong, if anything.
fn run_case(s: &Server, c: &Case, n: usize) -> Result<(), String> {
    let mut cl = Client::connect(s.client);
    if c.login {
        cl.login(&format!("bad-{n}"));
    }
    // Big frames are written from another thread: the server may refuse them and close
    // before reading them whole.
    let writer = write_in_background(cl.stream(), c.bytes.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut want = vec![0xFE];
    want.extend_from_slice(&(c.reason.len() as u16).to_be_bytes());
    want.extend_from_slice(c.reason.as_bytes());
    let res = match cl.next_raw(deadline) {
        Ok((_, raw)) if raw == want => match cl.next_raw(deadline) {
            Err(ReadEnd::Closed(_)) => Ok(()),
            Err(ReadEnd::Timeout) => {
                Err("error frame right, but the connection stayed open".into())
            }
            Ok((f2, _)) => Err(format!("error frame right, then another frame {f2:?}")),
        },
        Ok((f, raw)) => Err(format!("got {f:?} = {:?}", Bytes(&raw))),
        Err(e) => Err(format!("got {e:?} (unparsed {:?})", Bytes(cl.unparsed()))),
    };
    drop(cl);
    writer.join().unwrap();
    res.map_err(|e| format!("{} (expected 0xFE {:?}): {e}", c.name, c.reason))
}

fn run_all(cases: Vec<Case>) {
    let mut s = Server::with_shards(2);
    let mut bystander = Bystander::new(&s);
    bystander.check("start");
    let mut failures = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        if let Err(e) = run_case(&s, c, n) {
            failures.push(e);
        }
        s.assert_running();
        bystander.check(c.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad-input cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

fn long(n: usize) -> Vec<u8> {
    vec![b'u'; n]
}

/// Every byte that is not a client opcode, as the first byte of a frame.
const UNKNOWN_OPS: [u8; 13] = [
    0x00, 0x06, 0x08, 0x0F, 0x11, 0x22, 0x24, 0x40, 0x72, 0x75, 0x99, 0xFE, 0xFF,
];

#[test]
fn unknown_opcodes_are_answered_and_the_connection_stays_usable() {
    // PROTOCOL.md: 0xFE "unknown_opcode", the rest of that read discarded, the connection kept.
    // The v1 suite (compatibility/test_protocol_versions.py) sends four unknown opcodes 0.1 s
    // apart on one connection and then uses it.
    let s = Server::with_shards(2);
    let mut bystander = Bystander::new(&s);
    let mut b = s.login("uo-b");
    let mut a = s.login("uo-a");
    for op in [0x00u8, 0x99, 0x40, 0xFF] {
        a.write(&[op, 0, 1, b'x', 0, 0]);
        assert_eq!(
            a.recv(),
            Frame::Error("unknown_opcode".into()),
            "op {op:#04x}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    a.send("uo-b", b"still usable");
    assert_eq!(b.recv_acked(), b"still usable");
    bystander.check("four unknown opcodes 0.1 s apart");

    // Every unknown opcode, one connection each, before and after login.
    for (i, op) in UNKNOWN_OPS.into_iter().enumerate() {
        let mut c = s.connect();
        c.write(&[op, 1, 2, 3]);
        assert_eq!(
            c.recv(),
            Frame::Error("unknown_opcode".into()),
            "op {op:#04x} before login"
        );
        let name = format!("uo-{i}");
        c.login(&name);
        c.write(&[op, 0, 1, b'x', 0, 0]);
        assert_eq!(
            c.recv(),
            Frame::Error("unknown_opcode".into()),
            "op {op:#04x}"
        );
        c.send("uo-b", name.as_bytes());
        assert_eq!(b.recv_acked(), name.as_bytes(), "after op {op:#04x}");
    }
    bystander.check("every unknown opcode");
    assert!(s.metric("iris_edge_unknown_opcodes_total") >= 4 + 2 * UNKNOWN_OPS.len() as u64);
    assert_eq!(s.metric("iris_edge_error_limit_disconnects_total"), 0);
}

#[test]
fn the_rest_of_a_read_after_an_unknown_opcode_is_discarded() {
    let s = Server::with_shards(2);
    let mut b = s.login("ud-b");
    let mut a = s.login("ud-a");
    let mut bytes = wire::send(b"ud-b", b"before");
    bytes.push(0x99);
    bytes.extend(wire::send(b"ud-b", b"discarded with the rest of the read"));
    a.write(&bytes);
    assert_eq!(b.recv_acked(), b"before");
    assert_eq!(a.recv(), Frame::Error("unknown_opcode".into()));
    b.expect_silence(Duration::from_millis(300));
    a.send("ud-b", b"after");
    assert_eq!(b.recv_acked(), b"after");
}

#[test]
fn repeated_unknown_opcodes_close_the_connection() {
    let s = Server::start(
        iris_tests::ServerOpts::shards(2)
            .config("unknown_opcode_limit = 3\nunknown_opcode_window_ms = 5000\n"),
    );
    let mut bystander = Bystander::new(&s);
    let mut a = s.login("ur-a");
    for _ in 0..3 {
        a.write(&[0x99, 0, 0]);
        assert_eq!(a.recv(), Frame::Error("unknown_opcode".into()));
    }
    a.write(&[0x99, 0, 0]);
    // Said with 0xFE first, then closed.
    assert_eq!(
        a.expect_closed(),
        vec![Frame::Error("too_many_errors".into())]
    );
    assert_eq!(s.metric("iris_edge_error_limit_disconnects_total"), 1);
    bystander.check("after the error limit");
}

#[test]
fn malformed_frames_of_every_opcode_are_refused() {
    let ok_map = cbor::map(&[("a", cbor::V::Uint(1))]);
    let cases = vec![
        // LOGIN
        Case {
            name: "LOGIN too long",
            login: false,
            bytes: wire::login(&long(300)),
            reason: "login_too_long",
        },
        Case {
            name: "LOGIN empty user",
            login: false,
            bytes: wire::login(b":tok"),
            reason: "bad_login",
        },
        // SEND
        case("SEND empty target", wire::send(b"", b"x"), "bad_target"),
        case(
            "SEND target 257 bytes",
            wire::send(&long(257), b"x"),
            "bad_target",
        ),
        // ACK
        case("ACK not hex", wire::ack(b"zzzzzzzzzzzzzzzz"), "bad_ack"),
        case("ACK partly hex", wire::ack(b"00000000000000g0"), "bad_ack"),
        // BATCH_SEND
        case(
            "BATCH empty blob",
            wire::batch_send_blob(b"t", b""),
            "too_many_entries",
        ),
        case(
            "BATCH 1001 entries",
            wire::batch_send_blob(b"t", &[0u8, 1, b'x'].repeat(1001)),
            "too_many_entries",
        ),
        case(
            "BATCH entries do not fill blob",
            wire::batch_send_blob(b"t", b"\x00\x05ab"),
            "bad_frame",
        ),
        case(
            "BATCH trailing byte",
            wire::batch_send_blob(b"t", b"\x00\x01ab"),
            "bad_frame",
        ),
        case(
            "BATCH empty target",
            wire::batch_send(b"", &[b"x"]),
            "bad_target",
        ),
        // GET_STATUS
        case("GET_STATUS empty", wire::get_status(b""), "bad_target"),
        case(
            "GET_STATUS 300 bytes",
            wire::get_status(&long(300)),
            "bad_target",
        ),
        // SEND_SEQ
        case(
            "SEND_SEQ empty target",
            wire::send_seq(b"", 1, b"x"),
            "bad_target",
        ),
        // CBOR_MSG
        case(
            "CBOR_MSG not a map",
            wire::cbor_msg(b"t", b"\x01"),
            "bad_cbor",
        ),
        case(
            "CBOR_MSG truncated map",
            wire::cbor_msg(b"t", b"\xa2\x61a\x01"),
            "bad_cbor",
        ),
        case(
            "CBOR_MSG map then junk",
            wire::cbor_msg(b"t", &[&ok_map[..], b"\x01"].concat()),
            "bad_cbor",
        ),
        case(
            "CBOR_MSG empty target",
            wire::cbor_msg(b"", &ok_map),
            "bad_target",
        ),
        // UPLOAD_PREKEYS
        case(
            "UPLOAD_PREKEYS array",
            wire::upload_prekeys(b"\x80"),
            "bad_cbor",
        ),
        case(
            "UPLOAD_PREKEYS empty",
            wire::upload_prekeys(b""),
            "bad_cbor",
        ),
        // FETCH_PREKEYS
        case(
            "FETCH_PREKEYS empty user",
            wire::fetch_prekeys(b""),
            "bad_target",
        ),
        // E2EE_MSG
        case(
            "E2EE empty recipient",
            wire::e2ee_msg(b"", &ok_map, b"ct"),
            "bad_target",
        ),
        case(
            "E2EE header not a map",
            wire::e2ee_msg(b"t", b"\x01", b"ct"),
            "bad_cbor",
        ),
        // Groups
        case(
            "GROUP_CREATE empty name",
            wire::raw(0x30, &wire::l16(b"")),
            "bad_target",
        ),
        case(
            "GROUP_ADD empty user",
            wire::raw(0x31, &[wire::l16(b"g"), wire::l16(b"")].concat()),
            "bad_target",
        ),
        case(
            "GROUP_LEAVE 300-byte id",
            wire::raw(0x32, &wire::l16(&long(300))),
            "bad_target",
        ),
        case(
            "GROUP_ROSTER empty id",
            wire::raw(0x35, &wire::l16(b"")),
            "bad_target",
        ),
        // TYPING
        case("TYPING_START empty", wire::typing(b"", true), "bad_target"),
        case(
            "TYPING_STOP 300 bytes",
            wire::typing(&long(300), false),
            "bad_target",
        ),
        // READ_RECEIPT
        case(
            "READ_RECEIPT empty id",
            wire::read_receipt(b"", b"s"),
            "bad_frame",
        ),
        case(
            "READ_RECEIPT 257-byte id",
            wire::read_receipt(&long(257), b"s"),
            "bad_frame",
        ),
        case(
            "READ_RECEIPT empty sender",
            wire::read_receipt(b"0000000000000001", b""),
            "bad_target",
        ),
    ];
    run_all(cases);
}

#[test]
fn oversized_frames_are_refused() {
    let mb = 1usize << 20;
    let cases = vec![
        // Declared lengths over the limit, only the header (and a few bytes) sent: refused
        // without waiting for the body.
        case(
            "BATCH blen 1 MiB + 1 (header only)",
            [
                wire::raw(0x04, &wire::l16(b"t")),
                ((mb + 1) as u32).to_be_bytes().to_vec(),
                vec![0, 1],
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "BATCH blen 4 GiB - 1 (header only)",
            [
                wire::raw(0x04, &wire::l16(b"t")),
                u32::MAX.to_be_bytes().to_vec(),
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "CBOR_MSG 256 KiB + 1 (header only)",
            [
                wire::raw(0x10, &wire::l16(b"t")),
                ((256 << 10) + 1u32).to_be_bytes().to_vec(),
                vec![0xa0],
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "UPLOAD_PREKEYS 8 KiB + 1 (header only)",
            [vec![0x20], ((8 << 10) + 1u32).to_be_bytes().to_vec()].concat(),
            "frame_too_large",
        ),
        case(
            "E2EE header 1 KiB + 1 (header only)",
            [
                wire::raw(0x23, &wire::l16(b"t")),
                1025u16.to_be_bytes().to_vec(),
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "E2EE ciphertext 64 KiB + 1 (header only)",
            [
                wire::raw(0x23, &wire::l16(b"t")),
                wire::l16(&cbor::map(&[])),
                ((64 << 10) + 1u32).to_be_bytes().to_vec(),
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "GROUP_MSG header 1 KiB + 1",
            [
                wire::raw(0x33, &wire::l16(b"g")),
                1025u16.to_be_bytes().to_vec(),
            ]
            .concat(),
            "frame_too_large",
        ),
        case(
            "SENDER_KEY_DIST key 64 KiB + 1",
            [
                wire::raw(0x36, &wire::l16(b"g")),
                ((64 << 10) + 1u32).to_be_bytes().to_vec(),
            ]
            .concat(),
            "frame_too_large",
        ),
        // The same, with the whole oversized body sent.
        case(
            "BATCH 16 x 65535 (1 MiB + 16) sent whole",
            wire::batch_send_blob(b"t", &wire::l16(&[b'z'; 65535]).repeat(16)),
            "frame_too_large",
        ),
        case(
            "CBOR_MSG 256 KiB + 1 sent whole",
            wire::cbor_msg(b"t", &{
                let mut v = vec![0xa1, 0x61, b'k', 0x5a];
                let n = (256 << 10) + 1 - 4 - 4;
                v.extend_from_slice(&(n as u32).to_be_bytes());
                v.extend(vec![0u8; n]);
                v
            }),
            "frame_too_large",
        ),
        case(
            "E2EE ciphertext 64 KiB + 1 sent whole",
            wire::e2ee_msg(b"t", &cbor::map(&[]), &vec![1u8; (64 << 10) + 1]),
            "frame_too_large",
        ),
    ];
    run_all(cases);
}

#[test]
fn valid_frames_before_a_bad_one_are_not_lost() {
    let s = Server::with_shards(2);
    let mut bystander = Bystander::new(&s);
    let mut b = s.login("vb-b");
    let mut a = s.login("vb-a");
    let mut bytes = wire::send(b"vb-b", b"first");
    bytes.extend(wire::send(b"vb-b", b"second"));
    bytes.extend(wire::send(b"", b"bad target"));
    bytes.extend(wire::send(b"vb-b", b"after the bad frame"));
    a.write(&bytes);
    a.expect_error_and_close("bad_target");
    assert_eq!(b.recv_acked(), b"first");
    assert_eq!(b.recv_acked(), b"second");
    b.expect_silence(Duration::from_millis(300));
    bystander.check("after mixed write");
    // A bad frame split across two writes is refused the same way.
    let mut a = s.login("vb-a2");
    a.write_split(&wire::send(b"", b"x"), 2, Duration::from_millis(5));
    a.expect_error_and_close("bad_target");
    bystander.check("after split bad frame");
}

#[test]
fn silent_connection_without_login_times_out() {
    let s = Server::start(iris_tests::ServerOpts::shards(2).config("login_timeout_ms = 300\n"));
    let mut c = s.connect();
    let frames = c.expect_closed();
    // The timeout is announced with 0xFE "login_timeout" (docs/CONFIG.md).
    assert_eq!(
        frames,
        vec![iris_tests::Frame::Error("login_timeout".into())]
    );
    let mut ok = s.login("lt-ok");
    ok.sync();
}
