//! Fuzz target for the CBOR well-formedness check (`iris_edge::protocol::cbor`), checked against
//! an independent reference: the recursive well-formedness algorithm of RFC 8949 Appendix F,
//! written here from the RFC with the same nesting limit. For any bytes:
//! - `item_len` never panics and agrees with the reference (same length, or both refuse);
//! - an accepted item re-validates alone (`check_item`), and with any bytes after it;
//! - no strict prefix of an accepted item is accepted (CBOR items are prefix-free);
//! - `check_map` accepts exactly the accepted single items of major type 5.

#![no_main]

use iris_edge::protocol::cbor::{self, MAX_DEPTH};
use libfuzzer_sys::fuzz_target;

/// RFC 8949 Appendix F, recursive. `depth` counts the arrays and maps open around the item; a
/// container (empty ones included) nested deeper than [`MAX_DEPTH`] is refused.
struct Ref<'a> {
    b: &'a [u8],
    pos: usize,
}

#[derive(Debug)]
struct Bad;

impl Ref<'_> {
    fn take(&mut self, n: u64) -> Result<(), Bad> {
        let n = usize::try_from(n).map_err(|_| Bad)?;
        let end = self.pos.checked_add(n).ok_or(Bad)?;
        if end > self.b.len() {
            return Err(Bad);
        }
        self.pos = end;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, Bad> {
        let v = *self.b.get(self.pos).ok_or(Bad)?;
        self.pos += 1;
        Ok(v)
    }

    fn uint(&mut self, bytes: usize) -> Result<u64, Bad> {
        let mut v = 0u64;
        for _ in 0..bytes {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Ok(v)
    }

    /// One data item; `Ok(None)` is a break (allowed only where `breakable`).
    fn item(&mut self, depth: usize, breakable: bool) -> Result<Option<()>, Bad> {
        let ib = self.byte()?;
        let mt = ib >> 5;
        let ai = ib & 0x1f;
        let val = match ai {
            0..=23 => u64::from(ai),
            24 => self.uint(1)?,
            25 => self.uint(2)?,
            26 => self.uint(4)?,
            27 => self.uint(8)?,
            28..=30 => return Err(Bad),
            _ => {
                // ai == 31: indefinite length or break.
                return match mt {
                    2 | 3 => {
                        loop {
                            let c = self.byte()?;
                            if c == 0xff {
                                break;
                            }
                            if c >> 5 != mt || c & 0x1f == 31 {
                                return Err(Bad);
                            }
                            self.pos -= 1;
                            self.item(depth, false)?;
                        }
                        Ok(Some(()))
                    }
                    4 | 5 => {
                        if depth + 1 > MAX_DEPTH {
                            return Err(Bad);
                        }
                        let mut n = 0u64;
                        while self.item(depth + 1, true)?.is_some() {
                            n += 1;
                        }
                        if mt == 5 && n % 2 == 1 {
                            return Err(Bad);
                        }
                        Ok(Some(()))
                    }
                    7 if breakable => Ok(None),
                    _ => Err(Bad),
                };
            }
        };
        match mt {
            0 | 1 => {}
            2 | 3 => self.take(val)?,
            4 | 5 => {
                let items = if mt == 5 {
                    val.checked_mul(2).ok_or(Bad)?
                } else {
                    val
                };
                // An empty container counts too: it is nested at depth + 1 all the same.
                if depth + 1 > MAX_DEPTH {
                    return Err(Bad);
                }
                for _ in 0..items {
                    if self.item(depth + 1, false)?.is_none() {
                        return Err(Bad);
                    }
                }
            }
            6 => {
                if self.item(depth, false)?.is_none() {
                    return Err(Bad);
                }
            }
            _ => {
                if ai == 24 && val < 32 {
                    return Err(Bad);
                }
            }
        }
        Ok(Some(()))
    }
}

fn reference_len(b: &[u8]) -> Option<usize> {
    let mut r = Ref { b, pos: 0 };
    match r.item(0, false) {
        Ok(Some(())) => Some(r.pos),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let got = cbor::item_len(data).ok();
    let want = reference_len(data);
    assert_eq!(got, want, "item_len disagrees with RFC 8949 Appendix F");

    match got {
        Some(n) => {
            assert!(n >= 1 && n <= data.len(), "item_len {n} of {}", data.len());
            let item = &data[..n];
            assert_eq!(cbor::check_item(item), Ok(()));
            assert_eq!(cbor::item_len(item), Ok(n));
            // Prefix-free: a few strict prefixes (the first, the last, one chosen by the data).
            for cut in [0, n - 1, usize::from(data[0]) * n / 256] {
                if cut < n {
                    assert!(
                        cbor::check_item(&item[..cut]).is_err(),
                        "strict prefix of {n} bytes accepted at {cut}"
                    );
                }
            }
            // Trailing bytes do not change the answer; they refuse the single-item checks.
            assert_eq!(cbor::check_item(data).is_ok(), n == data.len());
            assert_eq!(
                cbor::check_map(data).is_ok(),
                n == data.len() && data[0] >> 5 == 5
            );
        }
        None => {
            assert!(cbor::check_item(data).is_err());
            assert!(cbor::check_map(data).is_err());
        }
    }
});
