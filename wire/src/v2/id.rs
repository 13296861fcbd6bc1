//! Server message ids, as a client sees them.
//!
//! A server id is the `u64` the edge mints when it accepts a message (`edge/src/idgen.rs`):
//! `(µs since 2024-01-01T00:00:00Z / 16) << 18 | region << 14 | node << 6 | shard`. The top 46
//! bits are the accept time in 16 µs ticks, so [`id_unix_ms`] reads a message's accept time
//! from its id, and ids sort by accept time (to 16 µs, between shards). v1 shows the same id
//! as 16 lowercase hex digits ([`id_v1_text`]), which is what a v1 client ACKs.

/// Bits of an id below its clock (region 4, node 8, shard 6).
pub const ID_LOW_BITS: u32 = 18;
/// Microseconds per tick of the id clock.
pub const ID_TICK_MICROS: u64 = 16;
/// The id clock's epoch: 2024-01-01T00:00:00Z in Unix microseconds.
pub const ID_EPOCH_MICROS: u64 = 1_704_067_200_000_000;

/// The accept time an id carries, in Unix milliseconds (rounded down).
pub fn id_unix_ms(id: u64) -> u64 {
    let micros = (id >> ID_LOW_BITS)
        .saturating_mul(ID_TICK_MICROS)
        .saturating_add(ID_EPOCH_MICROS);
    micros / 1000
}

/// The id as v1 writes it: 16 lowercase hex digits, most significant first.
pub fn id_v1_text(id: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = HEX[((id >> (4 * (15 - i))) & 0xf) as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_time_of_an_id() {
        // 2025-01-01T00:00:00.000Z = 1735689600000 ms: 31,622,400 s after the epoch, in ticks.
        let ticks = 31_622_400u64 * 1_000_000 / 16;
        let id = (ticks << 18) | (3 << 14) | (7 << 6) | 5;
        assert_eq!(id_unix_ms(id), 1_735_689_600_000);
        // One tick later is 16 µs later: the same millisecond.
        assert_eq!(id_unix_ms(id + (1 << 18)), 1_735_689_600_000);
        // 63 ticks later: 1008 µs, the next millisecond.
        assert_eq!(id_unix_ms(id + (63 << 18)), 1_735_689_600_001);
        assert_eq!(id_unix_ms(0), ID_EPOCH_MICROS / 1000);
        // Never overflows.
        let _ = id_unix_ms(u64::MAX);
    }

    #[test]
    fn v1_text_is_fixed_width_lowercase_hex() {
        assert_eq!(&id_v1_text(0), b"0000000000000000");
        assert_eq!(&id_v1_text(0xdead_beef), b"00000000deadbeef");
        assert_eq!(&id_v1_text(u64::MAX), b"ffffffffffffffff");
        assert_eq!(&id_v1_text(0x0123_4567_89ab_cdef), b"0123456789abcdef");
    }
}
