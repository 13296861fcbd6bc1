//! One sender's messages keep their order across a reconnect that lands on another shard
//! (PROTOCOL.md: a stored message is "delivered right after that user's next LOGIN_OK, in the
//! order it was sent"; the drain is in id order).
//!
//! The suspicion: each shard mints ids from its own generator (`edge/src/idgen.rs`), which runs
//! ahead of the clock when it issues more than one id per 16 µs tick. A sender whose burst pushed
//! its shard's generator ahead, and who then reconnects and lands on the other shard, gets ids
//! from a generator that is at the clock: lower than its previous messages, so the recipient's
//! drain puts the later messages first. Confirmed by this test (every run failed before the
//! fix, the burst's ids 5–70 ms ahead of the clock in a debug build) and fixed in `idgen.rs`: a
//! LOGIN reads the edge's high-water mark of ids minted ahead of the clock, and the
//! connection's first message is minted above it.
//!
//! The test builds it deliberately: 2 shards, the sender's shard found from the id of a message
//! it sends itself (ids carry the minting shard in their low 6 bits), a burst of BATCH_SENDs
//! (many ids per read) on that shard, a GET_STATUS round trip (so the burst has been accepted
//! before anything else is sent), a reconnect that lands on the other shard (a connection that
//! shard accepted beforehand, found from the per-shard accept counters), a few more messages
//! there, then the recipient logs in and drains. Eight rounds.

use std::time::Duration;

use iris_tests::{id_micros, number_of, numbered, wire, Server};

/// The id clock's epoch, 2024-01-01T00:00:00Z, in Unix µs (`edge/src/idgen.rs`).
const ID_EPOCH_MICROS: u64 = 1_704_067_200_000_000;

#[test]
fn a_sender_that_reconnects_to_another_shard_mid_burst_keeps_its_order() {
    const BURST_BATCHES: usize = 20;
    const PER_BATCH: usize = 1000;
    const AFTER: usize = 50;
    const ROUNDS: usize = 8;
    let s = Server::with_shards(2);
    for round in 0..ROUNDS {
        let me = format!("ord-sender-{round}");
        let rcpt = format!("ord-rcpt-{round}");
        let mut a = s.login(&me);
        let shard_a = a.which_shard();
        // The connection the sender reconnects on, already accepted by the other shard (the
        // TCP handshake is all it has done), so the reconnect costs only the LOGIN.
        let shard_b = 1 - shard_a;
        let mut b = s.connect_to_shard(shard_b);

        // The burst: 20 BATCH_SENDs of 1000 entries in one write, so the shard mints thousands
        // of ids within a few milliseconds.
        let mut out = Vec::new();
        let mut n = 0;
        for _ in 0..BURST_BATCHES {
            let entries: Vec<Vec<u8>> = (n..n + PER_BATCH).map(|i| numbered(i, 16)).collect();
            let refs: Vec<&[u8]> = entries.iter().map(|e| e.as_slice()).collect();
            out.extend(wire::batch_send(rcpt.as_bytes(), &refs));
            n += PER_BATCH;
        }
        a.write(&out);
        // Everything written before this round trip has been read and accepted.
        a.sync();
        a.shutdown();

        let synced = iris_tests::unix_ms() * 1000 - ID_EPOCH_MICROS;
        // Reconnect on the other shard, then go on sending.
        b.login(&me);
        b.send_many(&rcpt, (n..n + AFTER).map(|i| numbered(i, 16)));
        b.sync();
        b.shutdown();
        let total = n + AFTER;

        // The recipient was offline throughout: its drain must be the send order.
        std::thread::sleep(Duration::from_millis(100));
        let mut r = s.login(&rcpt);
        let msgs = r.recv_msgs(total, true);
        let got: Vec<usize> = msgs.iter().map(|(_, p)| number_of(p)).collect();
        let want: Vec<usize> = (0..total).collect();
        // How far the first shard's ids ran ahead of the clock by the end of the burst, and
        // where the first id minted after the reconnect sorts.
        let last_a = &msgs.iter().find(|(_, p)| number_of(p) == n - 1).unwrap().0;
        let first_b = &msgs.iter().find(|(_, p)| number_of(p) == n).unwrap().0;
        eprintln!(
            "round {round}: shard {shard_a} -> {shard_b}; the burst's last id is {:+} µs from \
             the clock at the end of the burst; the first id after the reconnect {:+} µs from it",
            id_micros(last_a) as i64 - synced as i64,
            id_micros(first_b) as i64 - id_micros(last_a) as i64
        );
        if let Some(diff) = iris_tests::describe_sequence_diff(&got, &want) {
            panic!(
                "round {round}: the drain reorders one sender's messages (burst on shard \
                 {shard_a}, then shard {shard_b}): {diff}"
            );
        }
        r.expect_silence(Duration::from_millis(100));
    }
}
