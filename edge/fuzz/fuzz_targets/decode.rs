//! Fuzz target for the v1 protocol codec: arbitrary bytes through the client-frame decoder
//! (consuming frames in a loop as the server does, with the split-vs-whole check), the
//! server-frame decoder and the CBOR check. Any panic, or a consumed count out of range, is a bug.

#![no_main]

use iris_edge::protocol::frame::{decode_e2ee_delivery, decode_server};
use iris_edge::protocol::{cbor, decode, decode::frame_len_hint, Decoded, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();

    // Client frames, consumed one after another.
    let mut at = 0;
    while at < data.len() {
        let buf = &data[at..];
        let _ = frame_len_hint(buf);
        match decode(buf, &limits) {
            Ok(Decoded::Frame(frame, n)) => {
                assert!(n >= 1 && n <= buf.len(), "consumed {n} of {}", buf.len());
                // A non-LOGIN frame is self-delimiting: re-encoding gives back its bytes.
                if buf[0] != 0x01 {
                    let mut out = Vec::new();
                    frame.encode(&mut out);
                    if let iris_edge::protocol::ClientFrame::Ack { .. } = frame {
                        assert_eq!(out.len(), n);
                    } else {
                        assert_eq!(out, &buf[..n]);
                    }
                }
                at += n;
            }
            Ok(Decoded::Incomplete) => break,
            Err(_) => break,
        }
    }

    // Split vs whole: a prefix of a non-LOGIN frame is incomplete or already the final answer.
    if data.first().is_some_and(|&b| b != 0x01) && data.len() > 1 {
        let whole = decode(data, &limits);
        let cut = usize::from(data[0]) * data.len() / 256;
        let part = decode(&data[..cut], &limits);
        if part != Ok(Decoded::Incomplete) {
            assert_eq!(part, whole);
        }
    }

    // Server frames.
    let mut at = 0;
    while at < data.len() {
        match decode_server(&data[at..]) {
            Ok(Some((_, n))) => {
                assert!(n >= 1 && n <= data.len() - at);
                at += n;
            }
            _ => break,
        }
    }
    let _ = decode_e2ee_delivery(data);

    // CBOR.
    let _ = cbor::check_map(data);
    if let Ok(n) = cbor::item_len(data) {
        assert!(n >= 1 && n <= data.len());
        assert_eq!(cbor::check_item(&data[..n]), Ok(()));
    }
});
