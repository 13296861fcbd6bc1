//! A well-formedness check for the CBOR (RFC 8949) payloads some frames carry.
//!
//! The server never interprets CBOR: CBOR_MSG bodies, prekey bundles and E2EE headers are stored
//! and forwarded as bytes. It only makes sure that each one is exactly one well-formed data item
//! of the expected type, so that a recipient never gets garbage the sender's frame claimed was
//! CBOR. "Well-formed" is RFC 8949 §3 / Appendix F: every major type, tags, simple values and
//! floats, definite and indefinite lengths (indefinite strings made of definite chunks of the same
//! type, indefinite arrays and maps closed by a break, maps with an even number of items), no
//! reserved additional-information values, no two-byte simple values below 32. Text strings are
//! not checked for valid UTF-8 (that is validity, not well-formedness).
//!
//! The check is iterative: containers live on a fixed stack of [`MAX_DEPTH`] entries, so deep
//! nesting costs neither recursion nor allocation, and deeper input is rejected. A claimed length
//! or item count larger than the bytes left is rejected at once; nothing is allocated.

use super::error::ProtoError;

/// Maximum number of arrays and maps open at once (the outermost container counts as 1).
pub const MAX_DEPTH: usize = 64;

/// The prekey bundle answered when a user has none: the CBOR map `{"status": "not_found"}`.
pub const NOT_FOUND_BUNDLE: &[u8] = b"\xa1\x66status\x69not_found";

const MAJOR_MAP: u8 = 5;
const BREAK: u8 = 0xff;

/// Checks that `b` is exactly one well-formed CBOR data item whose major type is map (5).
pub fn check_map(b: &[u8]) -> Result<(), ProtoError> {
    match b.first() {
        Some(&ib) if ib >> 5 == MAJOR_MAP => check_item(b),
        _ => Err(ProtoError::BadCbor),
    }
}

/// Checks that `b` is exactly one well-formed CBOR data item of any type, nothing trailing.
pub fn check_item(b: &[u8]) -> Result<(), ProtoError> {
    if item_len(b)? == b.len() {
        Ok(())
    } else {
        Err(ProtoError::BadCbor)
    }
}

/// The length of the well-formed CBOR data item at the start of `b` (bytes after it are ignored).
pub fn item_len(b: &[u8]) -> Result<usize, ProtoError> {
    let mut r = Reader { b, pos: 0 };
    let mut stack = [Open::default(); MAX_DEPTH];
    let mut depth = 0usize;
    // Set after a tag head: the next head must start a data item (a break is not one).
    let mut tagged = false;
    loop {
        let ib = r.byte()?;
        let major = ib >> 5;
        let ai = ib & 0x1f;
        let complete = if ib == BREAK {
            if tagged {
                return Err(ProtoError::BadCbor);
            }
            let top = depth
                .checked_sub(1)
                .and_then(|i| stack.get(i))
                .ok_or(ProtoError::BadCbor)?;
            if !top.indefinite || (top.map && top.odd) {
                return Err(ProtoError::BadCbor);
            }
            depth -= 1;
            // The closed container is one finished item of its parent.
            true
        } else {
            match major {
                0 | 1 => {
                    r.arg(ai)?;
                    true
                }
                2 | 3 => {
                    if ai == 31 {
                        r.chunks(major)?;
                    } else {
                        let n = r.arg(ai)?;
                        r.skip(n)?;
                    }
                    true
                }
                4 | 5 => {
                    let slot = stack.get_mut(depth).ok_or(ProtoError::BadCbor)?;
                    let map = major == MAJOR_MAP;
                    if ai == 31 {
                        *slot = Open {
                            remaining: 0,
                            indefinite: true,
                            map,
                            odd: false,
                        };
                        depth += 1;
                        false
                    } else {
                        let n = r.arg(ai)?;
                        let items = if map { n.checked_mul(2) } else { Some(n) }
                            .ok_or(ProtoError::BadCbor)?;
                        if items == 0 {
                            true
                        } else {
                            // Every item takes at least one byte.
                            if items > r.left() {
                                return Err(ProtoError::BadCbor);
                            }
                            *slot = Open {
                                remaining: items,
                                indefinite: false,
                                map,
                                odd: false,
                            };
                            depth += 1;
                            false
                        }
                    }
                }
                6 => {
                    r.arg(ai)?;
                    tagged = true;
                    continue;
                }
                _ => {
                    match ai {
                        0..=23 => {}
                        24 => {
                            if r.byte()? < 32 {
                                return Err(ProtoError::BadCbor);
                            }
                        }
                        25 => r.skip(2)?,
                        26 => r.skip(4)?,
                        27 => r.skip(8)?,
                        _ => return Err(ProtoError::BadCbor),
                    }
                    true
                }
            }
        };
        tagged = false;
        if !complete {
            continue;
        }
        // One item finished: count it in the enclosing containers, closing the definite ones
        // it fills.
        loop {
            let Some(i) = depth.checked_sub(1) else {
                return Ok(r.pos);
            };
            let top = stack.get_mut(i).ok_or(ProtoError::BadCbor)?;
            if top.indefinite {
                top.odd = !top.odd;
                break;
            }
            top.remaining = top.remaining.saturating_sub(1);
            if top.remaining > 0 {
                break;
            }
            depth = i;
        }
    }
}

/// An open array or map.
#[derive(Clone, Copy, Default)]
struct Open {
    /// Items still expected (definite length only; a map counts keys and values).
    remaining: u64,
    indefinite: bool,
    map: bool,
    /// An odd number of items so far (indefinite maps must close on an even count).
    odd: bool,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn left(&self) -> u64 {
        self.b.len().saturating_sub(self.pos) as u64
    }

    fn byte(&mut self) -> Result<u8, ProtoError> {
        let v = *self.b.get(self.pos).ok_or(ProtoError::BadCbor)?;
        self.pos += 1;
        Ok(v)
    }

    fn skip(&mut self, n: u64) -> Result<(), ProtoError> {
        if n > self.left() {
            return Err(ProtoError::BadCbor);
        }
        // n <= left <= usize::MAX.
        self.pos += n as usize;
        Ok(())
    }

    /// The argument of a head with additional information `ai` (28..=31 are not arguments).
    fn arg(&mut self, ai: u8) -> Result<u64, ProtoError> {
        let width = match ai {
            0..=23 => return Ok(u64::from(ai)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(ProtoError::BadCbor),
        };
        let mut v = 0u64;
        for _ in 0..width {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Ok(v)
    }

    /// The chunks of an indefinite-length string of `major` type, up to and including the break.
    fn chunks(&mut self, major: u8) -> Result<(), ProtoError> {
        loop {
            let ib = self.byte()?;
            if ib == BREAK {
                return Ok(());
            }
            if ib >> 5 != major || ib & 0x1f == 31 {
                return Err(ProtoError::BadCbor);
            }
            let n = self.arg(ib & 0x1f)?;
            self.skip(n)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::testutil::{cbor_map, cbor_value, hex};
    use proptest::prelude::*;

    /// RFC 8949 Appendix A: well-formed items.
    const WELL_FORMED: &[&str] = &[
        "00",
        "01",
        "0a",
        "17",
        "1818",
        "1819",
        "1864",
        "1903e8",
        "1a000f4240",
        "1b000000e8d4a51000",
        "1bffffffffffffffff",
        "c249010000000000000000",
        "3bffffffffffffffff",
        "c349010000000000000000",
        "20",
        "29",
        "3863",
        "3903e7",
        "f90000",
        "f98000",
        "f93c00",
        "fb3ff199999999999a",
        "f93e00",
        "f97bff",
        "fa47c35000",
        "fa7f7fffff",
        "fb7e37e43c8800759c",
        "f90001",
        "f90400",
        "f9c400",
        "fbc010666666666666",
        "f97c00",
        "f97e00",
        "f9fc00",
        "fa7f800000",
        "faff800000",
        "fb7ff0000000000000",
        "f4",
        "f5",
        "f6",
        "f7",
        "f0",
        "f820",
        "f8ff",
        "c074323031332d30332d32315432303a30343a30305a",
        "c11a514b67b0",
        "c1fb41d452d9ec200000",
        "d74401020304",
        "d818456449455446",
        "d82076687474703a2f2f7777772e6578616d706c652e636f6d",
        "40",
        "4401020304",
        "60",
        "6161",
        "6449455446",
        "62225c",
        "62c3bc",
        "63e6b0b4",
        "64f0908591",
        "80",
        "83010203",
        "8301820203820405",
        "98190102030405060708090a0b0c0d0e0f101112131415161718181819",
        "a0",
        "a201020304",
        "a26161016162820203",
        "826161a161626163",
        "a56161614161626142616361436164614461656145",
        "5f42010243030405ff",
        "7f657374726561646d696e67ff",
        "9fff",
        "9f018202039f0405ffff",
        "9f01820203820405ff",
        "83018202039f0405ff",
        "83019f0203ff820405",
        "9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff",
        "bf61610161629f0203ffff",
        "826161bf61626163ff",
        "bf6346756ef563416d7421ff",
        // Extra: empty indefinite strings, nested tags, tag on a container.
        "5fff",
        "7fff",
        "c0c1c200",
        "d9d9f7a0",
    ];

    /// RFC 8949 Appendix F.1: items that are not well-formed.
    const NOT_WELL_FORMED: &[&str] = &[
        // End of input in a head.
        "18",
        "19",
        "1a",
        "1b",
        "1901",
        "1a0102",
        "1b01020304050607",
        "38",
        "58",
        "78",
        "98",
        "9a01ff00",
        "b8",
        "d8",
        "f8",
        "f900",
        "fa0000",
        "fb000000",
        // Definite-length strings with short data.
        "41",
        "61",
        "5affffffff00",
        "5bffffffffffffffff010203",
        "7affffffff00",
        "7b7fffffffffffffff010203",
        // Definite-length maps and arrays not closed with enough items.
        "81",
        "818181818181818181",
        "8200",
        "a1",
        "a20102",
        "a100",
        "a2000000",
        // Tag number not followed by tag content.
        "c0",
        // Indefinite-length strings not closed by a break.
        "5f4100",
        "7f6100",
        // Indefinite-length maps and arrays not closed by a break.
        "9f",
        "9f0102",
        "bf",
        "bf01020102",
        "819f",
        "9f8000",
        "9f9f9f9f9fffffffff",
        "9f819f819f9fffffff",
        // Reserved additional information values.
        "1c",
        "1d",
        "1e",
        "3c",
        "3d",
        "3e",
        "5c",
        "5d",
        "5e",
        "7c",
        "7d",
        "7e",
        "9c",
        "9d",
        "9e",
        "bc",
        "bd",
        "be",
        "dc",
        "dd",
        "de",
        "fc",
        "fd",
        "fe",
        // Reserved two-byte encodings of simple values.
        "f800",
        "f801",
        "f818",
        "f81f",
        // Indefinite-length string chunks not of the correct type.
        "5f00ff",
        "5f21ff",
        "5f6100ff",
        "5f80ff",
        "5fa0ff",
        "5fc000ff",
        "5fe0ff",
        "7f4100ff",
        // Indefinite-length string chunks not definite length.
        "5f5f4100ffff",
        "7f7f6100ffff",
        // Break on its own or in a definite-length container or after a tag.
        "ff",
        "81ff",
        "8200ff",
        "a1ff",
        "a1ff00",
        "a100ff",
        "a20000ff",
        "9f81ff",
        "9f829f819f9fffffffff",
        "c0ff",
        "9fc0ffff",
        // Break in the value position of an indefinite map.
        "bf00ff",
        "bf000000ff",
        // Major types 0, 1, 6 with additional information 31.
        "1f",
        "3f",
        "df",
        // Claimed counts far beyond the input.
        "9bffffffffffffffff",
        "bbffffffffffffffff00",
        "bb8000000000000000",
        "",
    ];

    #[test]
    fn rfc_8949_appendix_a_is_well_formed() {
        for h in WELL_FORMED {
            let b = hex(h);
            assert_eq!(check_item(&b), Ok(()), "{h}");
            assert_eq!(item_len(&b), Ok(b.len()), "{h}");
            // Any of them is fine as a map value.
            let mut m = vec![0xa1, 0x00];
            m.extend_from_slice(&b);
            assert_eq!(check_map(&m), Ok(()), "map with {h}");
        }
    }

    #[test]
    fn rfc_8949_appendix_f_is_not_well_formed() {
        for h in NOT_WELL_FORMED {
            let b = hex(h);
            assert_eq!(check_item(&b), Err(ProtoError::BadCbor), "{h}");
            let mut m = vec![0xa1, 0x00];
            m.extend_from_slice(&b);
            assert_eq!(check_map(&m), Err(ProtoError::BadCbor), "map with {h}");
        }
    }

    #[test]
    fn check_map_wants_a_map_and_nothing_else() {
        assert_eq!(check_map(&hex("a0")), Ok(()));
        assert_eq!(check_map(&hex("bfff")), Ok(()));
        assert_eq!(check_map(&hex("a1616101")), Ok(()));
        assert_eq!(check_map(&hex("80")), Err(ProtoError::BadCbor));
        assert_eq!(check_map(&hex("00")), Err(ProtoError::BadCbor));
        assert_eq!(check_map(&hex("c0a0")), Err(ProtoError::BadCbor));
        assert_eq!(check_map(&hex("6161")), Err(ProtoError::BadCbor));
        assert_eq!(check_map(b""), Err(ProtoError::BadCbor));
        // Trailing bytes.
        assert_eq!(check_map(&hex("a000")), Err(ProtoError::BadCbor));
        assert_eq!(check_map(&hex("a0a0")), Err(ProtoError::BadCbor));
        assert_eq!(item_len(&hex("a0a0")), Ok(1));
    }

    #[test]
    fn not_found_bundle_is_the_status_map() {
        assert_eq!(
            NOT_FOUND_BUNDLE,
            hex("a166737461747573696e6f745f666f756e64").as_slice()
        );
        assert_eq!(check_map(NOT_FOUND_BUNDLE), Ok(()));
    }

    #[test]
    fn depth_limit_is_64_open_containers() {
        // 63 nested one-item arrays around an empty array: 64 containers.
        let mut ok = vec![0x81; MAX_DEPTH - 1];
        ok.push(0x80);
        assert_eq!(check_item(&ok), Ok(()));
        let mut deep = vec![0x81; MAX_DEPTH];
        deep.push(0x80);
        assert_eq!(check_item(&deep), Err(ProtoError::BadCbor));
        // An empty container takes a level too, also inside an indefinite map (the `cbor` fuzz
        // target's reference once exempted it: `bf 00 81×63 a0 ff` nests an empty map 65 deep).
        let mut in_map = vec![0xbf, 0x00];
        in_map.extend(std::iter::repeat_n(0x81, MAX_DEPTH - 1));
        in_map.extend_from_slice(&[0xa0, 0xff]);
        assert_eq!(item_len(&in_map), Err(ProtoError::BadCbor));
        in_map.remove(2);
        assert_eq!(item_len(&in_map), Ok(in_map.len()));
        // Same with indefinite maps: `bf 00 <inner> ff`.
        let nest = |n: usize| {
            let mut v = Vec::new();
            for _ in 0..n - 1 {
                v.extend_from_slice(&[0xbf, 0x00]);
            }
            v.push(0xa0);
            v.extend(std::iter::repeat_n(0xff, n - 1));
            v
        };
        assert_eq!(check_map(&nest(MAX_DEPTH)), Ok(()));
        assert_eq!(check_map(&nest(MAX_DEPTH + 1)), Err(ProtoError::BadCbor));
        // Tags do not nest containers: a long tag chain is fine.
        let mut tags = vec![0xa1, 0x00];
        tags.extend(std::iter::repeat_n(0xc6, 10_000));
        tags.push(0x00);
        assert_eq!(check_map(&tags), Ok(()));
    }

    #[test]
    fn huge_input_is_linear_and_does_not_recurse() {
        // 200k nested-then-closed indefinite arrays in sequence inside one map.
        let mut b = vec![0xbf, 0x00, 0x9f];
        for _ in 0..100_000 {
            b.extend_from_slice(&[0x9f, 0xff]);
        }
        b.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(check_map(&b), Ok(()));
    }

    proptest! {
        #[test]
        fn generated_values_are_well_formed(v in cbor_value()) {
            prop_assert_eq!(check_item(&v), Ok(()));
            prop_assert_eq!(item_len(&v), Ok(v.len()));
        }

        #[test]
        fn generated_maps_pass_check_map(m in cbor_map()) {
            prop_assert_eq!(check_map(&m), Ok(()));
        }

        #[test]
        fn strict_prefixes_and_trailing_bytes_fail(v in cbor_value(), extra in any::<u8>()) {
            for cut in 0..v.len() {
                prop_assert_eq!(check_item(&v[..cut]), Err(ProtoError::BadCbor));
            }
            let mut longer = v.clone();
            longer.push(extra);
            prop_assert_eq!(check_item(&longer), Err(ProtoError::BadCbor));
            prop_assert_eq!(item_len(&longer), Ok(v.len()));
        }

        #[test]
        fn never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(n) = item_len(&b) {
                prop_assert!(n >= 1 && n <= b.len());
            }
            let _ = check_map(&b);
        }
    }
}
