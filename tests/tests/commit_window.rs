//! Each message has its own commit window, counted from the edge's accept: under sparse
//! traffic whose acks come well within the window, the store writes no message, though the
//! window of each earlier message closes while later ones are still unacked.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use iris_tests::{wait_until, Server, ServerOpts};

#[test]
fn messages_acked_within_their_own_window_are_never_written() {
    let s = Server::start(ServerOpts::shards(1).config("commit_window_ms = 300\n"));
    let mut a = s.login("cw-a");
    let mut b = s.login("cw-b");
    // The first id writes the id floor, leased a second of id clock ahead, and that commit
    // takes along whatever is pending: get it done first.
    a.send("cw-b", b"first");
    let (id, _) = b.recv_msg();
    b.ack(&id);
    b.sync();
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_core_commits_total")
            >= 1),
        "no commit of the id floor"
    );
    // Then, well inside the lease, one message every 20 ms, each acked 60 ms after it came:
    // about three are unacked at any moment, so every 300 ms window (had it counted from the
    // first message after a commit) would close on some, and write them.
    let mut unacked: VecDeque<(Vec<u8>, Instant)> = VecDeque::new();
    let start = Instant::now();
    for i in 0..20u32 {
        let tick = start + Duration::from_millis(20 * u64::from(i));
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        a.send("cw-b", format!("m{i}").as_bytes());
        let (id, payload) = b.recv_msg();
        assert_eq!(payload, format!("m{i}").as_bytes());
        unacked.push_back((id, Instant::now()));
        while unacked
            .front()
            .is_some_and(|(_, at)| at.elapsed() >= Duration::from_millis(60))
        {
            let (id, _) = unacked.pop_front().unwrap();
            b.ack(&id);
        }
    }
    for (id, _) in unacked.drain(..) {
        b.ack(&id);
    }
    b.sync();
    assert!(
        wait_until(Duration::from_secs(5), || s
            .metric("iris_core_cancelled_before_store_total")
            >= 21),
        "cancelled before store: {}, stored: {}",
        s.metric("iris_core_cancelled_before_store_total"),
        s.metric("iris_core_stored_total")
    );
    // Past every window: no message was written.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(s.metric("iris_core_stored_total"), 0);
    assert_eq!(s.metric("iris_core_cancelled_before_store_total"), 21);
}
