//! The payload of every message the load generator sends.
//!
//! Layout (big-endian): `"IL" | u32 stream | u64 seq | u64 intended_ns | padding`, padded with a
//! fixed byte pattern to the requested size (at least [`MIN_SIZE`] bytes). `stream` names one
//! sender → receiver stream (a pair), `seq` counts that stream's messages from 0, and
//! `intended_ns` is the [`super::clock`] time at which the message was *meant* to be sent
//! (open loop) or was sent (closed loop). The receiver checks the stream, feeds the sequence
//! number to a [`super::seq::SeqTracker`] and records `now − intended_ns` as the latency.

/// Magic bytes that start every load-generator payload.
pub const MAGIC: [u8; 2] = *b"IL";
/// Smallest payload: magic, stream, sequence number and timestamp.
pub const MIN_SIZE: usize = 2 + 4 + 8 + 8;

/// What a payload says about its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub stream: u32,
    pub seq: u64,
    pub intended_ns: u64,
}

/// Appends a payload of `size` bytes (at least [`MIN_SIZE`]) carrying `stamp`.
pub fn encode(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&stamp.stream.to_be_bytes());
    out.extend_from_slice(&stamp.seq.to_be_bytes());
    out.extend_from_slice(&stamp.intended_ns.to_be_bytes());
    let target = start + size.max(MIN_SIZE);
    let mut b = 0u8;
    while out.len() < target {
        out.push(b'a' + b);
        b = (b + 1) % 26;
    }
}

/// Reads the stamp of a payload; `None` if it is not a load-generator payload.
pub fn decode(p: &[u8]) -> Option<Stamp> {
    if p.len() < MIN_SIZE || p[..2] != MAGIC {
        return None;
    }
    let stream = u32::from_be_bytes(p[2..6].try_into().ok()?);
    let seq = u64::from_be_bytes(p[6..14].try_into().ok()?);
    let intended_ns = u64::from_be_bytes(p[14..22].try_into().ok()?);
    Some(Stamp {
        stream,
        seq,
        intended_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let s = Stamp {
            stream: 7,
            seq: 1 << 40,
            intended_ns: 123_456_789,
        };
        for size in [0, MIN_SIZE, 64, 1000] {
            let mut v = vec![9];
            encode(&mut v, s, size);
            assert_eq!(v.len(), 1 + size.max(MIN_SIZE));
            assert_eq!(decode(&v[1..]), Some(s));
        }
        assert_eq!(decode(b"IL"), None);
        assert_eq!(decode(&[0u8; 64]), None);
    }
}
