//! Fuzz target for the protocol v2 codec (`iris_wire::v2`): arbitrary bytes through
//! `decode_client` and `decode_server`, consuming frames in a loop as a connection does
//! (skipping unknown types and skippable refusals). For any bytes:
//! - nothing panics; a consumed or skipped count is between 5 and the bytes given;
//! - a decoded frame re-encodes to exactly the bytes it was decoded from, and decoding those
//!   gives the same frame (one canonical encoding per frame);
//! - a prefix of the input is `Incomplete` or gives the same answer as the whole input.
//!
//! The first byte picks the maximum frame: the default, or a small one (so that
//! `frame_too_large` and `payload_too_large` are reached with short inputs).

#![no_main]

use iris_wire::v2::{
    decode_client, decode_server, encode_client, encode_server, Decoded, WireError,
    DEFAULT_MAX_FRAME_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// Walks `data` frame by frame with `decode`; `check` re-encodes each frame.
fn walk<F>(
    data: &[u8],
    max: usize,
    decode: impl Fn(&[u8], usize) -> Result<Decoded<F>, WireError>,
    check: impl Fn(&F, &[u8], usize),
) {
    let mut at = 0;
    while at < data.len() {
        let buf = &data[at..];
        let n = match decode(buf, max) {
            Ok(Decoded::Frame { frame, consumed }) => {
                assert!((5..=buf.len()).contains(&consumed));
                check(&frame, &buf[..consumed], max);
                consumed
            }
            Ok(Decoded::Unknown { consumed, .. }) => {
                assert!((5..=buf.len()).contains(&consumed));
                consumed
            }
            Ok(Decoded::Incomplete { total }) => {
                if let Some(t) = total {
                    assert!(t > buf.len() && t >= 5);
                }
                break;
            }
            Err(e) => {
                assert!(!e.reason().is_empty() && e.code() >= 1000);
                match e.skip() {
                    Some(n) => {
                        assert!((5..=buf.len()).contains(&n));
                        n
                    }
                    None => break,
                }
            }
        };
        at += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let max = match data.first() {
        Some(&b) if b & 1 == 1 => usize::from(b) * 8,
        _ => DEFAULT_MAX_FRAME_BYTES,
    };

    walk(data, max, decode_client, |frame, bytes, max| {
        let mut out = Vec::new();
        encode_client(frame, &mut out);
        assert_eq!(out, bytes);
        match decode_client(&out, max) {
            Ok(Decoded::Frame { frame: again, consumed }) => {
                assert_eq!(&again, frame);
                assert_eq!(consumed, out.len());
            }
            other => panic!("re-decoding gave {other:?}"),
        }
    });
    walk(data, max, decode_server, |frame, bytes, max| {
        let mut out = Vec::new();
        encode_server(frame, &mut out);
        assert_eq!(out, bytes);
        match decode_server(&out, max) {
            Ok(Decoded::Frame { frame: again, consumed }) => {
                assert_eq!(&again, frame);
                assert_eq!(consumed, out.len());
            }
            other => panic!("re-decoding gave {other:?}"),
        }
    });

    // Split vs whole: a prefix is incomplete or already the final answer.
    if data.len() > 1 {
        let cut = usize::from(data[data.len() - 1]) * data.len() / 256;
        let part = decode_client(&data[..cut], max);
        if !matches!(part, Ok(Decoded::Incomplete { .. })) {
            assert_eq!(part, decode_client(data, max));
        }
        let part = decode_server(&data[..cut], max);
        if !matches!(part, Ok(Decoded::Incomplete { .. })) {
            assert_eq!(part, decode_server(data, max));
        }
    }
});
