//! Messages across two regions: delivery both ways with per-sender order and exact counts (and
//! the cross-region hop metric at the origin), a home table that overrides the hash, an offline
//! recipient who drains at its next login at home (nothing stored in the sender's region),
//! typing and read receipts across regions, and the recipient's ack deleting the message at
//! home.

use std::time::Duration;

use iris_tests::cluster::{region_names, users_homed_in, ClusterOpts, Regions, RegionsOpts};
use iris_tests::{describe_sequence_diff, number_of, numbered, unique, wire, Client, Frame};

use crate::common::{eventually, recv_one, PAYLOAD};

/// One core and two edges of one shard per region (two regions share a 2-CPU machine).
pub fn small() -> ClusterOpts {
    ClusterOpts {
        edges: 2,
        cores: 1,
        shards: 1,
        ..ClusterOpts::default()
    }
}

/// Cross-region deliveries take a produce on the global broker, an import and a regional
/// produce: allow for tansu's fetch waits.
pub const CROSS: Duration = Duration::from_secs(20);

/// Receives `n` numbered messages (acking each) and returns their numbers in arrival order.
pub fn recv_numbers(c: &mut Client, n: usize) -> Vec<usize> {
    c.recv_msgs(n, true)
        .iter()
        .map(|(_, p)| number_of(p))
        .collect()
}

/// `iris_core_<name>` of region `i`'s only core.
pub fn core_m(r: &Regions, i: usize, key: &str) -> u64 {
    r.region(i).core_metric_of(0, key)
}

/// The count of a core hop histogram.
pub fn hop_count(r: &Regions, i: usize, hop: &str) -> u64 {
    core_m(
        r,
        i,
        &format!("iris_core_hop_seconds_count{{hop=\"{hop}\"}}"),
    )
}

#[test]
fn delivery_both_ways_between_two_regions_in_order_exactly_once() {
    const N: usize = 200;
    /// The second sender's numbers start here.
    const SECOND: usize = 10_000;
    let names = region_names(2);
    let r = Regions::start(&names, small());
    let a = r.users_homed_in(0, "da", 2);
    let b = r.user_homed_in(1, "db");
    // Each logged in at home; the two senders of region 0 on different edges.
    let mut ca = r.region(0).login(0, &a[0]);
    let mut ca1 = r.region(0).login(1, &a[1]);
    let mut cb = r.region(1).login(1, &b);
    // The first message each way opens the path.
    ca.send(&b, &numbered(0, PAYLOAD));
    let (_, p) = recv_one(&mut cb, CROSS, "first message a (region 0) → b (region 1)");
    assert_eq!(p, numbered(0, PAYLOAD));
    cb.send(&a[0], &numbered(0, PAYLOAD));
    let (_, p) = recv_one(&mut ca, CROSS, "first message b (region 1) → a (region 0)");
    assert_eq!(p, numbered(0, PAYLOAD));
    // Then both directions at once, two senders towards b.
    ca.send_many(&b, (1..N).map(|k| numbered(k, PAYLOAD)));
    ca1.send_many(&b, (SECOND..SECOND + N).map(|k| numbered(k, PAYLOAD)));
    cb.send_many(&a[0], (1..N).map(|k| numbered(k, PAYLOAD)));
    let got_b = recv_numbers(&mut cb, 2 * N - 1);
    let got_a = recv_numbers(&mut ca, N - 1);
    let from_a0: Vec<usize> = got_b.iter().copied().filter(|&k| k < SECOND).collect();
    let from_a1: Vec<usize> = got_b.iter().copied().filter(|&k| k >= SECOND).collect();
    assert_eq!(
        describe_sequence_diff(&from_a0, &(1..N).collect::<Vec<_>>()),
        None,
        "a0 → b"
    );
    assert_eq!(
        describe_sequence_diff(&from_a1, &(SECOND..SECOND + N).collect::<Vec<_>>()),
        None,
        "a1 → b"
    );
    assert_eq!(
        describe_sequence_diff(&got_a, &(1..N).collect::<Vec<_>>()),
        None,
        "b → a0"
    );
    ca.expect_silence(Duration::from_millis(800));
    ca1.expect_silence(Duration::from_millis(10));
    cb.expect_silence(Duration::from_millis(800));
    // Each message stored once, in its recipient's home region only.
    assert_eq!(
        core_m(&r, 1, "iris_core_delivers_total"),
        2 * N as u64,
        "b's home"
    );
    assert_eq!(
        core_m(&r, 0, "iris_core_delivers_total"),
        N as u64,
        "a's home"
    );
    assert_eq!(core_m(&r, 0, "iris_core_duplicates_total"), 0);
    assert_eq!(core_m(&r, 1, "iris_core_duplicates_total"), 0);
    // Through the global bus: each region's edges routed its N sends to the other.
    for (i, other) in [(0usize, 1usize), (1, 0)] {
        let out = r.region(i).edges_metric(&format!(
            "iris_edge_routed_out_total{{region=\"{}\"}}",
            names[other]
        ));
        assert!(
            out >= N as u64,
            "region {i} routed {out} frames to region {other}"
        );
        let imported = core_m(
            &r,
            other,
            &format!("iris_core_imported_total{{region=\"{}\"}}", names[i]),
        );
        assert!(
            imported >= N as u64,
            "region {other} imported {imported} from region {i}"
        );
    }
    // The cross-region latency hop exists at the origin: the homes sent Stored notices back.
    for i in 0..2 {
        eventually(
            &format!("stored_at_home hop counted in region {i}"),
            Duration::from_secs(15),
            || hop_count(&r, i, "stored_at_home") > 0,
        );
    }
    let stored_a = hop_count(&r, 0, "stored_at_home");
    assert!(
        stored_a <= 2 * N as u64,
        "{stored_a} stored_at_home records in region 0 for {} messages sent from it",
        2 * N
    );
    // The cross-region end-to-end hop at the receiving edges counts exactly the messages minted
    // in the other region (every message of this test crossed).
    let cross = |i: usize| {
        r.region(i)
            .edges_metric("iris_edge_hop_seconds_count{hop=\"cross_region\"}")
    };
    assert_eq!(
        cross(1),
        2 * N as u64,
        "cross_region hop at region 1's edges"
    );
    assert_eq!(cross(0), N as u64, "cross_region hop at region 0's edges");
    eprintln!(
        "regions: {} to region 1 (two senders) and {N} back, in order; stored_at_home hop counts {} / {}",
        2 * N,
        stored_a,
        hop_count(&r, 1, "stored_at_home")
    );
}

#[test]
fn the_home_table_overrides_the_hash() {
    const N: usize = 30;
    let names = region_names(2);
    // Hashed into region 0, pinned to region 1 by the table.
    let pinned = users_homed_in(&unique("pin"), &names[0], &names, 1).remove(0);
    let r = Regions::start_with(
        &names,
        RegionsOpts {
            cluster: small(),
            global_delay_ms: None,
            home_table: vec![(pinned.clone(), names[1].clone())],
        },
    );
    assert_eq!(r.home_index(&pinned), 1);
    // A sender of region 0 (the hash's home of `pinned`) while `pinned` is offline.
    let s = r.user_homed_in(0, "ps");
    let mut cs = r.region(0).login(0, &s);
    cs.send_many(&pinned, (0..N).map(|k| numbered(k, PAYLOAD)));
    // Stored in region 1 (the table's home), never in region 0 (the hash's).
    eventually("stored in region 1", CROSS, || {
        core_m(&r, 1, "iris_core_offline_total") >= N as u64
    });
    assert_eq!(core_m(&r, 1, "iris_core_delivers_total"), N as u64);
    assert_eq!(core_m(&r, 1, "iris_core_offline_total"), N as u64);
    assert_eq!(
        core_m(&r, 0, "iris_core_delivers_total"),
        0,
        "region 0 stored none"
    );
    assert_eq!(
        r.region(0).edges_metric(&format!(
            "iris_edge_routed_out_total{{region=\"{}\"}}",
            names[1]
        )),
        N as u64,
        "region 0's edge sent every message to region 1"
    );
    // Logging in at the hash's home (region 0) is roaming; at the table's home it drains.
    let mut cp = r.region(1).login(0, &pinned);
    let got = recv_numbers(&mut cp, N);
    assert_eq!(
        describe_sequence_diff(&got, &(0..N).collect::<Vec<_>>()),
        None
    );
    cp.expect_silence(Duration::from_millis(500));
    // Live: the pinned user answers; a (homed in region 0) receives in region 0.
    cp.send(&s, &numbered(7, PAYLOAD));
    let (_, p) = recv_one(&mut cs, CROSS, "pinned → s");
    assert_eq!(p, numbered(7, PAYLOAD));
    assert_eq!(
        core_m(&r, 0, "iris_core_delivers_total"),
        1,
        "s's message, in s's home"
    );
}

#[test]
fn an_offline_recipient_in_the_other_region_drains_in_order_at_home() {
    const N: usize = 300;
    let names = region_names(2);
    let r = Regions::start(&names, small());
    let a = r.user_homed_in(0, "oa");
    let b = r.user_homed_in(1, "ob");
    let mut ca = r.region(0).login(0, &a);
    ca.send_many(&b, (0..N).map(|k| numbered(k, PAYLOAD)));
    let stored = eventually("stored at b's home", Duration::from_secs(30), || {
        core_m(&r, 1, "iris_core_offline_total") >= N as u64
    });
    assert_eq!(core_m(&r, 1, "iris_core_delivers_total"), N as u64);
    assert_eq!(core_m(&r, 1, "iris_core_offline_total"), N as u64);
    // Nothing stored (or even consumed as a deliver) in the sender's region.
    for key in [
        "iris_core_delivers_total",
        "iris_core_offline_total",
        "iris_core_visitors_total",
    ] {
        assert_eq!(core_m(&r, 0, key), 0, "{key} in the sender's region");
    }
    // b logs in at home (the other edge of its region): everything, in order, once.
    let mut cb = r.region(1).login(1, &b);
    let got = recv_numbers(&mut cb, N);
    assert_eq!(
        describe_sequence_diff(&got, &(0..N).collect::<Vec<_>>()),
        None
    );
    cb.expect_silence(Duration::from_millis(800));
    assert_eq!(core_m(&r, 0, "iris_core_delivers_total"), 0);
    eprintln!("regions: {N} stored across regions in {stored:?}, drained in order at home");
}

/// TYPING on then off from `fname` (on `from`) reaches `tname` (on `to`).
fn typing_crosses(from: &mut Client, to: &mut Client, fname: &str, tname: &str) {
    for on in [true, false] {
        from.write(&wire::typing(tname.as_bytes(), on));
        match to.recv_within(Duration::from_secs(15)) {
            Some(Frame::Typing { sender, on: got }) => {
                assert_eq!(sender, fname.as_bytes());
                assert_eq!(got, u8::from(on));
            }
            other => panic!("expected TYPING_RELAY ({on}) from {fname}, got {other:?}"),
        }
    }
}

#[test]
fn typing_and_read_receipts_cross_regions_and_the_ack_deletes_at_home() {
    let names = region_names(2);
    let r = Regions::start(&names, small());
    let a = r.user_homed_in(0, "ta");
    let b = r.user_homed_in(1, "tb");
    let mut ca = r.region(0).login(0, &a);
    let mut cb = r.region(1).login(0, &b);
    ca.send(&b, b"hello b");
    let (id_b, p) = recv_one(&mut cb, CROSS, "a → b");
    assert_eq!(p, b"hello b");
    cb.send(&a, b"hello a");
    let (_, p) = recv_one(&mut ca, CROSS, "b → a");
    assert_eq!(p, b"hello a");
    // Typing, both ways.
    typing_crosses(&mut ca, &mut cb, &a, &b);
    typing_crosses(&mut cb, &mut ca, &b, &a);
    // b read a's message: a (in the other region) gets the receipt.
    let before = iris_tests::unix_ms();
    cb.write(&wire::read_receipt(&id_b, a.as_bytes()));
    match ca.recv_within(Duration::from_secs(15)) {
        Some(Frame::Receipt {
            id,
            reader,
            unix_ms,
        }) => {
            assert_eq!(id, id_b);
            assert_eq!(reader, b.as_bytes());
            assert!(
                unix_ms + 2000 >= before && unix_ms <= iris_tests::unix_ms() + 2000,
                "receipt time {unix_ms} vs {before}"
            );
        }
        other => panic!("expected READ_RECEIPT_RELAY from {b}, got {other:?}"),
    }
    // b's ack (sent by recv_one) reached b's home core and deleted the message there: a new
    // login of b at home gets nothing (neither the message nor the relays).
    eventually("b's ack applied at home", CROSS, || {
        core_m(&r, 1, "iris_core_acks_total") >= 1
    });
    cb.sync();
    cb.shutdown();
    let mut cb = r.region(1).login(1, &b);
    cb.expect_silence(Duration::from_millis(1500));
    // Same for a, at its home.
    eventually("a's ack applied at home", CROSS, || {
        core_m(&r, 0, "iris_core_acks_total") >= 1
    });
    ca.shutdown();
    let mut ca = r.region(0).login(1, &a);
    ca.expect_silence(Duration::from_millis(1000));
}
