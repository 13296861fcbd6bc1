//! The Kafka topic layout of a region and the partitioning of users over it.
//!
//! Topic names (documented with what each carries in `docs/BUS.md`):
//!
//! | topic                        | carries                                            | partitioned by |
//! |------------------------------|----------------------------------------------------|----------------|
//! | `iris.{region}.deliver`      | deliver, ack, drain request, relay, prekey put and fetch → core | user shard |
//! | `iris.{region}.edge.{node}`  | deliver, drain chunk, relay, prekey bundle → one edge | one partition (0) |
//! | `iris.{region}.presence`     | presence, edge reset → every edge                  | user shard     |
//! | `iris.global.route.{region}` | route (another region's frames) inbound            | user shard     |
//!
//! "User shard" is [`partition_of`]: [`user_hash`] (64-bit FNV-1a of the user id bytes, the same
//! function as `iris_edge::shard::owner_of`) modulo the topic's partition count. The bus chooses
//! the partition itself instead of leaving it to the Kafka client's key partitioner (murmur2),
//! so edges, cores and any client language agree on it; the record key is still the user id.
//! On the deliver topic a partition is a core shard: everything about one user lands, in
//! order, on the one core shard that owns that user.

/// Region names: 1 to 64 bytes of `[a-z0-9-]`, not `global` (reserved for cross-region topics).
/// No dots, so a topic name splits unambiguously.
pub fn is_valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region != "global"
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The core-bound topic of `region`: deliver, ack and drain request frames.
pub fn deliver(region: &str) -> String {
    format!("iris.{region}.deliver")
}

/// The inbox of edge node `node` in `region`: deliver (to a user connected there), drain chunk
/// and relay frames.
pub fn edge_inbox(region: &str, node: u32) -> String {
    format!("iris.{region}.edge.{node}")
}

/// The presence topic of `region`, consumed by every edge of the region.
pub fn presence(region: &str) -> String {
    format!("iris.{region}.presence")
}

/// The cross-region inbound topic of `region`: route frames sent by other regions to users homed
/// in `region`. Lives on the global cluster.
pub fn route(region: &str) -> String {
    format!("iris.global.route.{region}")
}

/// The 64-bit FNV-1a hash of a user id: the one user hash of Iris.
///
/// Must stay identical to `iris_edge::shard::owner_of` (which is `user_hash(user) % shards`):
/// test vector `user_hash(b"alice") == 0x508b_2abb_65a0_3907`.
pub fn user_hash(user: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in user {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The partition of `user` in a topic of `partitions` partitions (0 is taken as 1).
pub fn partition_of(user: &[u8], partitions: u32) -> u32 {
    (user_hash(user) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(deliver("eu-west"), "iris.eu-west.deliver");
        assert_eq!(edge_inbox("eu-west", 12), "iris.eu-west.edge.12");
        assert_eq!(presence("eu-west"), "iris.eu-west.presence");
        assert_eq!(route("eu-west"), "iris.global.route.eu-west");
    }

    #[test]
    fn region_names() {
        assert!(is_valid_region("eu-west-1"));
        assert!(is_valid_region("r1"));
        for bad in ["", "global", "eu.west", "EU", "eu_west", &"a".repeat(65)] {
            assert!(!is_valid_region(bad), "{bad}");
        }
        // Every topic of a valid region is a valid Kafka topic name.
        let r = "a".repeat(64);
        for t in [
            deliver(&r),
            edge_inbox(&r, u32::MAX),
            presence(&r),
            route(&r),
        ] {
            assert!(t.len() <= 249);
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)));
        }
    }

    /// The vector `iris_edge::shard::owner_of` must agree on (its tests should assert
    /// `owner_of(b"alice", n) == (0x508b_2abb_65a0_3907 % n)`).
    #[test]
    fn fnv1a_test_vectors() {
        assert_eq!(user_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_hash(b"alice"), 0x508b_2abb_65a0_3907);
        assert_eq!(user_hash(b"bob"), 0x004d_4419_134a_0a54);
        assert_eq!(partition_of(b"alice", 4), 3);
        assert_eq!(partition_of(b"alice", 64), 7);
        assert_eq!(partition_of(b"bob", 4), 0);
    }

    #[test]
    fn partitions_in_range_and_zero_is_one() {
        for i in 0..1000u32 {
            let user = format!("user{i}");
            assert!(partition_of(user.as_bytes(), 7) < 7);
            assert_eq!(partition_of(user.as_bytes(), 0), 0);
            assert_eq!(partition_of(user.as_bytes(), 1), 0);
        }
    }

    #[test]
    fn partitions_spread_users() {
        let mut counts = [0u32; 16];
        for i in 0..16_000u32 {
            counts[partition_of(format!("user{i}").as_bytes(), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
