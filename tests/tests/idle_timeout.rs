//! Idle timeout after login (`idle_timeout_ms`): a logged-in client that holds a partial frame,
//! or has output queued that it does not read, and makes no progress is closed; a logged-in
//! client with nothing pending may stay silent (it is online while connected).

use std::time::{Duration, Instant};

use iris_tests::{numbered, Bystander, Client, Frame, Server, ServerOpts};

/// `max_output_bytes` is raised above the 5 MB a test queues, so a silent reader is always
/// closed for idleness, never as a slow consumer: how much of it the kernel's socket buffers
/// absorb varies with the machine's load.
fn server() -> Server {
    Server::start(
        ServerOpts::shards(2).config("idle_timeout_ms = 500\nmax_output_bytes = 16777216\n"),
    )
}

#[test]
fn a_partial_frame_held_after_login_times_out() {
    let s = server();
    let mut bystander = Bystander::new(&s);
    let mut c = s.login("it-partial");
    let t0 = Instant::now();
    // The first 3 bytes of a SEND, then nothing.
    c.write(&[0x02, 0x00, 0x05]);
    assert_eq!(c.expect_closed(), vec![Frame::Error("idle_timeout".into())]);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "closed after {waited:?} (idle_timeout_ms = 500)"
    );
    assert_eq!(s.metric("iris_edge_idle_timeouts_total"), 1);
    bystander.check("after an idle timeout");
}

#[test]
fn an_idle_client_with_nothing_pending_stays_connected() {
    let s = server();
    let mut a = s.login("it-quiet");
    let mut b = s.login("it-quiet-peer");
    std::thread::sleep(Duration::from_millis(1500));
    b.send("it-quiet", b"still here");
    assert_eq!(a.recv_acked(), b"still here");
    a.sync();
    assert_eq!(s.metric("iris_edge_idle_timeouts_total"), 0);
}

#[test]
fn queued_output_that_is_never_read_times_out() {
    let s = server();
    let mut silent = Client::connect_small_rcvbuf(s.client, 8192);
    silent.login("it-silent");
    let mut a = s.login("it-sender");
    // About 5 MB: more than the socket buffers take, less than max_output_bytes (16 MiB).
    a.send_many("it-silent", (0..5000).map(|i| numbered(i, 1000)));
    a.sync();
    assert!(
        iris_tests::wait_until(Duration::from_secs(10), || s
            .metric("iris_edge_idle_timeouts_total")
            == 1),
        "the silent reader was not closed for idleness (slow-consumer disconnects: {})",
        s.metric("iris_edge_slow_consumer_disconnects_total")
    );
    assert_eq!(s.metric("iris_edge_slow_consumer_disconnects_total"), 0);
    // Closed (in the middle of a frame: its output never moved). It acked nothing, so a new
    // login gets all 5000, in order.
    let mut frames = 0;
    loop {
        match silent.next_raw(Instant::now() + Duration::from_secs(10)) {
            Ok(_) => frames += 1,
            Err(iris_tests::ReadEnd::Closed(_)) => break,
            Err(iris_tests::ReadEnd::Timeout) => panic!("still open after {frames} frames"),
        }
    }
    drop(silent);
    let mut r = s.login("it-silent");
    let got = r.recv_msgs(5000, true);
    for (i, (_, p)) in got.iter().enumerate() {
        assert_eq!(iris_tests::number_of(p), i);
    }
}
