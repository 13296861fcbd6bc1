//! E2EE (prekey upload and fetch, not_found, E2EE_MSG delivery as a 0x24 frame inside 0x10,
//! live and stored) and groups (group_service_unavailable, connection stays usable).

use std::time::Duration;

use iris_edge::protocol::frame::{decode_e2ee_delivery, encode_e2ee_delivery};
use iris_tests::{cbor, wire, Frame, Server};

#[test]
fn prekeys_upload_fetch_and_not_found() {
    let s = Server::with_shards(2);
    let mut a = s.login("pk-a");
    let mut b = s.login("pk-b");

    // Unknown user: 0x22 | u32 len | {"status": "not_found"}.
    b.write(&wire::fetch_prekeys(b"pk-nobody"));
    let (f, raw) = b.recv_raw();
    let mut want = vec![0x22, 0, 0, 0, cbor::NOT_FOUND.len() as u8];
    want.extend_from_slice(cbor::NOT_FOUND);
    assert_eq!(raw, want, "not_found answer: {f:?}");

    let ik = [0x11u8; 32];
    let spk = [0x22u8; 32];
    let bundle = cbor::map(&[
        ("ik", cbor::V::Bytes(&ik)),
        ("spk", cbor::V::Bytes(&spk)),
        ("opk", cbor::V::Uint(1234)),
    ]);
    a.write(&wire::upload_prekeys(&bundle));
    // Upload has no reply; our own fetch on the same connection comes after it.
    a.write(&wire::fetch_prekeys(b"pk-a"));
    let (f, raw) = a.recv_raw();
    assert_eq!(
        raw,
        [&[0x22][..], &wire::l32(&bundle)].concat(),
        "own bundle: {f:?}"
    );
    // Another user fetches the same bytes.
    b.write(&wire::fetch_prekeys(b"pk-a"));
    assert_eq!(b.recv(), Frame::Prekeys(bundle.clone()));

    // A new upload replaces the bundle.
    let bundle2 = cbor::map(&[("ik", cbor::V::Bytes(&ik)), ("v", cbor::V::Uint(2))]);
    a.write(&wire::upload_prekeys(&bundle2));
    a.write(&wire::fetch_prekeys(b"pk-a"));
    assert_eq!(a.recv(), Frame::Prekeys(bundle2.clone()));
    b.write(&wire::fetch_prekeys(b"pk-a"));
    assert_eq!(b.recv(), Frame::Prekeys(bundle2));
}

#[test]
fn e2ee_message_delivered_as_0x24_frame_live_and_stored() {
    let s = Server::with_shards(2);
    let mut a = s.login("e2-alice");
    let mut b = s.login("e2-bob");
    let header = cbor::map(&[("dh", cbor::V::Bytes(&[9u8; 32])), ("n", cbor::V::Uint(0))]);
    let ct: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();

    // Hand-written expectation of PROTOCOL.md: 0x24 | u16 slen | sender | u16 hlen | header |
    // u32 clen | ciphertext, the opcode byte included.
    let mut want = vec![0x24, 0x00, 0x08];
    want.extend_from_slice(b"e2-alice");
    want.extend_from_slice(&(header.len() as u16).to_be_bytes());
    want.extend_from_slice(&header);
    want.extend_from_slice(&(ct.len() as u32).to_be_bytes());
    want.extend_from_slice(&ct);
    assert_eq!(want, wire::e2ee_delivery(b"e2-alice", &header, &ct));
    // The server's own encoder agrees.
    let mut theirs = Vec::new();
    encode_e2ee_delivery(&mut theirs, b"e2-alice", &header, &ct);
    assert_eq!(
        theirs, want,
        "iris_edge encode_e2ee_delivery vs PROTOCOL.md"
    );

    // Live.
    a.write(&wire::e2ee_msg(b"e2-bob", &header, &ct));
    let got = b.recv_acked();
    assert_eq!(got, want, "E2EE delivery payload (live)");
    let d = decode_e2ee_delivery(&got).expect("server decoder reads it");
    assert_eq!(
        (d.sender, d.header, d.ciphertext),
        (&b"e2-alice"[..], &header[..], &ct[..])
    );

    // The largest ciphertext (64 KiB) and header (1 KiB), live.
    let big_header = cbor::map(&[("pad", cbor::V::Bytes(&[0u8; 1016]))]);
    assert_eq!(big_header.len(), 1024);
    let big_ct = vec![0x5Au8; 64 << 10];
    a.write(&wire::e2ee_msg(b"e2-bob", &big_header, &big_ct));
    assert_eq!(
        b.recv_acked(),
        wire::e2ee_delivery(b"e2-alice", &big_header, &big_ct)
    );
    b.flush_acks();

    // Stored for an offline recipient.
    a.write(&wire::e2ee_msg(b"e2-carol", &header, &ct));
    a.sync();
    std::thread::sleep(Duration::from_millis(100));
    let mut c = s.login("e2-carol");
    assert_eq!(c.recv_acked(), want, "E2EE delivery payload (stored)");
}

#[test]
fn groups_answer_group_service_unavailable_and_stay_open() {
    let s = Server::with_shards(2);
    let mut a = s.login("gr-a");
    let mut b = s.login("gr-b");
    let frames: Vec<(u8, Vec<u8>)> = vec![
        (0x30, wire::raw(0x30, &wire::l16(b"team"))),
        (
            0x31,
            wire::raw(0x31, &[wire::l16(b"g-1"), wire::l16(b"gr-b")].concat()),
        ),
        (0x32, wire::raw(0x32, &wire::l16(b"g-1"))),
        (
            0x33,
            wire::raw(
                0x33,
                &[
                    wire::l16(b"g-1"),
                    wire::l16(&cbor::map(&[])),
                    wire::l32(b"cipher"),
                ]
                .concat(),
            ),
        ),
        (0x35, wire::raw(0x35, &wire::l16(b"g-1"))),
        (
            0x36,
            wire::raw(0x36, &[wire::l16(b"g-1"), wire::l32(&[1u8; 32])].concat()),
        ),
    ];
    const UNAVAILABLE: &[u8] = b"\xFE\x00\x19group_service_unavailable";
    for (op, f) in &frames {
        a.write(f);
        let (got, raw) = a.recv_raw();
        assert_eq!(raw, UNAVAILABLE, "group op 0x{op:02x}: {got:?}");
        // Still usable after each.
        a.send("gr-b", format!("after 0x{op:02x}").as_bytes());
        assert_eq!(b.recv_acked(), format!("after 0x{op:02x}").as_bytes());
    }
    // All six in one write: six answers in order, then the connection still works.
    let all: Vec<u8> = frames.iter().flat_map(|(_, f)| f.clone()).collect();
    a.write(&all);
    for (op, _) in &frames {
        assert_eq!(a.recv_raw().1, UNAVAILABLE, "batched group op 0x{op:02x}");
    }
    assert_eq!(a.status("gr-b"), (1, 0));
    b.flush_acks();
}
