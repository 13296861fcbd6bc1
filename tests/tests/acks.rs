//! ACKs for ids no edge has minted (their time is in the future: a random 16-hex-digit id
//! almost always is) never reach the store, which would write a tombstone for each; a real
//! ack still deletes its message.

use std::time::Duration;

use iris_tests::{wait_until, wire, Server};

#[test]
fn acks_of_never_minted_ids_do_not_reach_the_store() {
    let s = Server::with_shards(2);
    let mut a = s.login("ack-a");
    let mut b = s.login("ack-b");
    let acked0 = s.metric("iris_core_acked_total");
    let mut bytes = Vec::new();
    for i in 0..1000u64 {
        bytes.extend(wire::ack(format!("{:016x}", u64::MAX - i).as_bytes()));
    }
    b.write(&bytes);
    b.sync();
    a.send("ack-b", b"real");
    let (id, _) = b.recv_msg();
    b.ack(&id);
    b.sync();
    assert!(
        wait_until(Duration::from_secs(2), || s.metric("iris_core_acked_total")
            == acked0 + 1),
        "core acks: {} (expected {})",
        s.metric("iris_core_acked_total"),
        acked0 + 1
    );
    assert_eq!(s.metric("iris_edge_acks_dropped_total"), 1000);
    // The real ack deleted the message: nothing comes back at the next login.
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    let mut b = s.login("ack-b");
    b.expect_silence(Duration::from_millis(300));
}
