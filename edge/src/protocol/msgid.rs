//! Server-chosen message ids: fixed-length, so an ACK frame delimits itself.
//!
//! v1 gives ACK (`0x03`) no length field: the client echoes the id it got in a RELIABLE_MSG
//! (`0x10`). Iris 2.0 chooses every id, and always chooses exactly [`MSG_ID_LEN`] (16) lowercase
//! hex digits of a `u64`, most significant digit first. An ACK on the wire is therefore exactly
//! `0x03` followed by these 16 bytes, and acks followed by other frames in one read all parse
//! (see [`mod@super::decode`]). Because the digits are big-endian and fixed-width, the byte order of
//! encoded ids sorts like the numbers, so stores can key on the encoded form.

use std::fmt;

/// Length of an encoded message id on the wire (and of the body of an ACK frame).
pub const MSG_ID_LEN: usize = 16;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// A message id: a `u64` chosen by the server, sent as 16 hex digits.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub u64);

impl MsgId {
    /// The wire form: 16 lowercase hex digits, most significant first.
    pub fn encode(&self) -> [u8; MSG_ID_LEN] {
        let mut out = [0u8; MSG_ID_LEN];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 4 * (MSG_ID_LEN - 1 - i);
            // The mask keeps the index below 16.
            *slot = HEX[((self.0 >> shift) & 0xf) as usize];
        }
        out
    }

    /// Parses the wire form: exactly 16 hex digits, lower or upper case. Anything else is `None`.
    pub fn parse(b: &[u8]) -> Option<MsgId> {
        if b.len() != MSG_ID_LEN {
            return None;
        }
        let mut v: u64 = 0;
        for &c in b {
            v = (v << 4) | u64::from(hex_value(c)?);
        }
        Some(MsgId(v))
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The value of one ASCII hex digit (either case).
pub(crate) fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encode_is_fixed_width_lowercase_hex() {
        assert_eq!(&MsgId(0).encode(), b"0000000000000000");
        assert_eq!(&MsgId(0xdead_beef).encode(), b"00000000deadbeef");
        assert_eq!(&MsgId(u64::MAX).encode(), b"ffffffffffffffff");
        assert_eq!(MsgId(0x1234_5678_9abc_def0).to_string(), "123456789abcdef0");
    }

    #[test]
    fn parse_accepts_both_cases() {
        assert_eq!(MsgId::parse(b"00000000DEADBEEF"), Some(MsgId(0xdead_beef)));
        assert_eq!(MsgId::parse(b"00000000deadBeef"), Some(MsgId(0xdead_beef)));
        assert_eq!(MsgId::parse(b"ffffffffffffffff"), Some(MsgId(u64::MAX)));
    }

    #[test]
    fn parse_rejects_wrong_length_or_digits() {
        assert_eq!(MsgId::parse(b""), None);
        assert_eq!(MsgId::parse(b"000000000000000"), None);
        assert_eq!(MsgId::parse(b"00000000000000000"), None);
        assert_eq!(MsgId::parse(b"000000000000000g"), None);
        assert_eq!(MsgId::parse(b"0x00000000000000"), None);
        assert_eq!(MsgId::parse(b" 000000000000000"), None);
    }

    proptest! {
        #[test]
        fn round_trip(v in any::<u64>()) {
            prop_assert_eq!(MsgId::parse(&MsgId(v).encode()), Some(MsgId(v)));
        }

        #[test]
        fn byte_order_sorts_like_the_number(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(MsgId(a).encode().cmp(&MsgId(b).encode()), a.cmp(&b));
        }

        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..20)) {
            let _ = MsgId::parse(&b);
        }
    }
}
