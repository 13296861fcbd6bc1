//! Test helpers shared by the protocol tests: hex literals, generators of well-formed CBOR, and
//! owned client and server frames for the property tests (frames borrow, generators own).

use proptest::collection::vec;
use proptest::prelude::*;

use super::frame::{op, push_batch_entry, ClientFrame, ServerFrame};
use super::msgid::MsgId;

/// Bytes from a hex string (spaces allowed).
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// A CBOR head with the shortest argument encoding, or a wider one when `wide` (still
/// well-formed).
pub(crate) fn head(out: &mut Vec<u8>, major: u8, arg: u64, wide: bool) {
    let m = major << 5;
    if arg < 24 && !wide {
        out.push(m | arg as u8);
    } else if arg <= 0xff && !wide {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

fn cbor_leaf() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (0u8..2, any::<u64>(), any::<bool>()).prop_map(|(major, v, wide)| {
            let mut o = Vec::new();
            head(&mut o, major, v, wide);
            o
        }),
        (0u8..2, 0u64..30).prop_map(|(major, v)| {
            let mut o = Vec::new();
            head(&mut o, major, v, false);
            o
        }),
        (2u8..4, vec(any::<u8>(), 0..40), any::<bool>()).prop_map(|(major, s, wide)| {
            let mut o = Vec::new();
            head(&mut o, major, s.len() as u64, wide);
            o.extend_from_slice(&s);
            o
        }),
        // Indefinite-length strings made of definite chunks.
        (2u8..4, vec(vec(any::<u8>(), 0..8), 0..4)).prop_map(|(major, chunks)| {
            let mut o = vec![(major << 5) | 31];
            for c in chunks {
                head(&mut o, major, c.len() as u64, false);
                o.extend_from_slice(&c);
            }
            o.push(0xff);
            o
        }),
        // Simple values and floats.
        (0u8..24).prop_map(|v| vec![0xe0 | v]),
        (32u8..=255).prop_map(|v| vec![0xf8, v]),
        any::<u16>().prop_map(|v| {
            let mut o = vec![0xf9];
            o.extend_from_slice(&v.to_be_bytes());
            o
        }),
        any::<f32>().prop_map(|v| {
            let mut o = vec![0xfa];
            o.extend_from_slice(&v.to_be_bytes());
            o
        }),
        any::<f64>().prop_map(|v| {
            let mut o = vec![0xfb];
            o.extend_from_slice(&v.to_be_bytes());
            o
        }),
    ]
}

/// Any well-formed CBOR data item (nested arrays, maps and tags, definite and indefinite).
pub(crate) fn cbor_value() -> impl Strategy<Value = Vec<u8>> {
    cbor_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            (vec(inner.clone(), 0..6), any::<bool>()).prop_map(|(items, indef)| {
                let mut o = Vec::new();
                if indef {
                    o.push(0x9f);
                } else {
                    head(&mut o, 4, items.len() as u64, false);
                }
                items.iter().for_each(|i| o.extend_from_slice(i));
                if indef {
                    o.push(0xff);
                }
                o
            }),
            (vec((inner.clone(), inner.clone()), 0..4), any::<bool>())
                .prop_map(|(pairs, indef)| encode_map(&pairs, indef)),
            (any::<u64>(), inner).prop_map(|(tag, item)| {
                let mut o = Vec::new();
                head(&mut o, 6, tag, false);
                o.extend_from_slice(&item);
                o
            }),
        ]
    })
}

fn encode_map(pairs: &[(Vec<u8>, Vec<u8>)], indef: bool) -> Vec<u8> {
    let mut o = Vec::new();
    if indef {
        o.push(0xbf);
    } else {
        head(&mut o, 5, pairs.len() as u64, false);
    }
    for (k, v) in pairs {
        o.extend_from_slice(k);
        o.extend_from_slice(v);
    }
    if indef {
        o.push(0xff);
    }
    o
}

/// Any well-formed CBOR map.
pub(crate) fn cbor_map() -> impl Strategy<Value = Vec<u8>> {
    (vec((cbor_value(), cbor_value()), 0..4), any::<bool>())
        .prop_map(|(pairs, indef)| encode_map(&pairs, indef))
}

/// A small CBOR map (for frames in split tests).
pub(crate) fn small_cbor_map() -> impl Strategy<Value = Vec<u8>> {
    (vec((cbor_leaf(), cbor_leaf()), 0..3), any::<bool>())
        .prop_map(|(pairs, indef)| encode_map(&pairs, indef))
}

/// An owned client frame; [`OwnedFrame::as_frame`] borrows it as a [`ClientFrame`].
#[derive(Debug, Clone)]
pub(crate) enum OwnedFrame {
    Login(Vec<u8>),
    Send(Vec<u8>, Vec<u8>),
    Ack(u64),
    BatchSend(Vec<u8>, Vec<u8>),
    GetStatus(Vec<u8>),
    SendSeq(Vec<u8>, u64, Vec<u8>),
    CborMsg(Vec<u8>, Vec<u8>),
    UploadPrekeys(Vec<u8>),
    FetchPrekeys(Vec<u8>),
    E2eeMsg(Vec<u8>, Vec<u8>, Vec<u8>),
    Group(u8, Vec<u8>),
    Typing(Vec<u8>, bool),
    ReadReceipt(Vec<u8>, Vec<u8>),
}

impl OwnedFrame {
    pub(crate) fn as_frame(&self) -> ClientFrame<'_> {
        match self {
            OwnedFrame::Login(b) => ClientFrame::Login { body: b },
            OwnedFrame::Send(t, m) => ClientFrame::Send { target: t, msg: m },
            OwnedFrame::Ack(id) => ClientFrame::Ack { id: MsgId(*id) },
            OwnedFrame::BatchSend(t, b) => ClientFrame::BatchSend { target: t, blob: b },
            OwnedFrame::GetStatus(t) => ClientFrame::GetStatus { target: t },
            OwnedFrame::SendSeq(t, s, m) => ClientFrame::SendSeq {
                target: t,
                seq: *s,
                msg: m,
            },
            OwnedFrame::CborMsg(t, c) => ClientFrame::CborMsg { target: t, cbor: c },
            OwnedFrame::UploadPrekeys(b) => ClientFrame::UploadPrekeys { bundle: b },
            OwnedFrame::FetchPrekeys(u) => ClientFrame::FetchPrekeys { user: u },
            OwnedFrame::E2eeMsg(r, h, c) => ClientFrame::E2eeMsg {
                recipient: r,
                header: h,
                ciphertext: c,
            },
            OwnedFrame::Group(op, raw) => ClientFrame::Group { op: *op, raw },
            OwnedFrame::Typing(t, on) => ClientFrame::Typing { target: t, on: *on },
            OwnedFrame::ReadReceipt(i, s) => ClientFrame::ReadReceipt { id: i, sender: s },
        }
    }

    pub(crate) fn encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.as_frame().encode(&mut out);
        out
    }
}

/// Sizes of generated fields: small for split-at-every-byte tests, up to the limits otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub target: usize,
    pub msg: usize,
    pub entries: usize,
    pub cipher: usize,
}

pub(crate) const SMALL: Sizes = Sizes {
    target: 12,
    msg: 24,
    entries: 4,
    cipher: 24,
};

pub(crate) const LARGE: Sizes = Sizes {
    target: 256,
    msg: 600,
    entries: 40,
    cipher: 2000,
};

fn target(s: Sizes) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 1..=s.target.min(8)),
        1 => vec(any::<u8>(), 1..=s.target),
    ]
    .boxed()
}

fn bytes(max: usize) -> BoxedStrategy<Vec<u8>> {
    vec(any::<u8>(), 0..=max).boxed()
}

/// A printable user name (`user` or `user:token`-like): never looks like a frame.
pub(crate) fn login_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-z][a-z0-9_]{0,15}".prop_map(String::into_bytes),
        "[ -~]{1,64}".prop_map(String::into_bytes),
        "[a-zA-Z0-9 :._-]{1,256}".prop_map(String::into_bytes),
    ]
}

fn group_frame(s: Sizes) -> impl Strategy<Value = OwnedFrame> {
    let t = || target(s);
    prop_oneof![
        (
            prop_oneof![
                Just(op::GROUP_CREATE),
                Just(op::GROUP_LEAVE),
                Just(op::GROUP_ROSTER)
            ],
            t()
        )
            .prop_map(|(o, g)| raw_group(o, &[&g], &[])),
        (t(), t()).prop_map(|(g, u)| raw_group(op::GROUP_ADD, &[&g, &u], &[])),
        (t(), bytes(s.msg), bytes(s.cipher)).prop_map(|(g, h, c)| raw_group(
            op::GROUP_MSG,
            &[&g, &h],
            &[&c]
        )),
        (t(), bytes(s.cipher)).prop_map(|(g, k)| raw_group(op::SENDER_KEY_DIST, &[&g], &[&k])),
    ]
}

/// A group frame: `opcode`, the `u16` fields, then the `u32` fields.
pub(crate) fn raw_group(opcode: u8, f16: &[&[u8]], f32: &[&[u8]]) -> OwnedFrame {
    let mut raw = vec![opcode];
    for f in f16 {
        raw.extend_from_slice(&(f.len() as u16).to_be_bytes());
        raw.extend_from_slice(f);
    }
    for f in f32 {
        raw.extend_from_slice(&(f.len() as u32).to_be_bytes());
        raw.extend_from_slice(f);
    }
    OwnedFrame::Group(opcode, raw)
}

/// Any valid client frame except LOGIN, with fields up to `s`.
pub(crate) fn framed(s: Sizes) -> BoxedStrategy<OwnedFrame> {
    let t = move || target(s);
    let cbor = move || {
        if s.msg > 100 {
            cbor_map().boxed()
        } else {
            small_cbor_map().boxed()
        }
    };
    prop_oneof![
        (t(), bytes(s.msg)).prop_map(|(t, m)| OwnedFrame::Send(t, m)),
        any::<u64>().prop_map(OwnedFrame::Ack),
        (t(), vec(bytes(s.msg), 1..=s.entries)).prop_map(|(t, entries)| {
            let mut blob = Vec::new();
            entries.iter().for_each(|e| push_batch_entry(&mut blob, e));
            OwnedFrame::BatchSend(t, blob)
        }),
        t().prop_map(OwnedFrame::GetStatus),
        (t(), any::<u64>(), bytes(s.msg)).prop_map(|(t, q, m)| OwnedFrame::SendSeq(t, q, m)),
        (t(), cbor()).prop_map(|(t, c)| OwnedFrame::CborMsg(t, c)),
        cbor().prop_map(OwnedFrame::UploadPrekeys),
        t().prop_map(OwnedFrame::FetchPrekeys),
        (t(), small_cbor_map(), bytes(s.cipher)).prop_map(|(r, h, c)| OwnedFrame::E2eeMsg(r, h, c)),
        group_frame(s),
        (t(), any::<bool>()).prop_map(|(t, on)| OwnedFrame::Typing(t, on)),
        (t(), t()).prop_map(|(i, s)| OwnedFrame::ReadReceipt(i, s)),
    ]
    .boxed()
}

/// Any valid client frame, LOGIN (with a printable body) included.
pub(crate) fn any_frame(s: Sizes) -> BoxedStrategy<OwnedFrame> {
    prop_oneof![
        1 => login_body().prop_map(OwnedFrame::Login),
        12 => framed(s),
    ]
    .boxed()
}

/// An owned server frame.
#[derive(Debug, Clone)]
pub(crate) enum OwnedServer {
    LoginOk,
    Reliable(Vec<u8>, Vec<u8>),
    Status(Vec<u8>, bool, u64),
    Typing(Vec<u8>, bool),
    ReceiptRelay(Vec<u8>, Vec<u8>, u64),
    Error(Vec<u8>),
    RateLimited(u32),
    PrekeyResponse(Vec<u8>),
}

impl OwnedServer {
    pub(crate) fn as_frame(&self) -> ServerFrame<'_> {
        match self {
            OwnedServer::LoginOk => ServerFrame::LoginOk,
            OwnedServer::Reliable(id, p) => ServerFrame::Reliable { id, payload: p },
            OwnedServer::Status(u, online, ls) => ServerFrame::Status {
                user: u,
                online: *online,
                last_seen: *ls,
            },
            OwnedServer::Typing(s, on) => ServerFrame::Typing { sender: s, on: *on },
            OwnedServer::ReceiptRelay(i, r, ms) => ServerFrame::ReceiptRelay {
                id: i,
                reader: r,
                unix_ms: *ms,
            },
            OwnedServer::Error(r) => ServerFrame::Error { reason: r },
            OwnedServer::RateLimited(ms) => ServerFrame::RateLimited {
                retry_after_ms: *ms,
            },
            OwnedServer::PrekeyResponse(c) => ServerFrame::PrekeyResponse { cbor: c },
        }
    }
}

/// Any server frame.
pub(crate) fn server_frame() -> impl Strategy<Value = OwnedServer> {
    prop_oneof![
        Just(OwnedServer::LoginOk),
        (any::<u64>(), bytes(300))
            .prop_map(|(id, p)| OwnedServer::Reliable(MsgId(id).encode().to_vec(), p)),
        (bytes(300), bytes(300)).prop_map(|(id, p)| OwnedServer::Reliable(id, p)),
        (bytes(40), any::<bool>(), any::<u64>()).prop_map(|(u, o, l)| OwnedServer::Status(u, o, l)),
        (bytes(40), any::<bool>()).prop_map(|(s, on)| OwnedServer::Typing(s, on)),
        (bytes(40), bytes(40), any::<u64>())
            .prop_map(|(i, r, ms)| OwnedServer::ReceiptRelay(i, r, ms)),
        "[a-z_]{0,40}".prop_map(|r| OwnedServer::Error(r.into_bytes())),
        any::<u32>().prop_map(OwnedServer::RateLimited),
        cbor_map().prop_map(OwnedServer::PrekeyResponse),
    ]
}
