//! Amplifying requests: a few bytes in, many bytes out. FETCH_PREKEYS (12 bytes in, an 8 KiB
//! bundle out) from a client that never reads must not grow the edge (the replies waiting at the
//! core are bounded per shard by `max_pending_replies`, and count in backpressure); a TYPING
//! flood (4-byte frames relayed as 260-byte frames under a 256-byte sender name) is rate limited
//! per connection (`typing_relays_per_sec`), so it never makes its victim a slow consumer.

use std::time::{Duration, Instant};

use iris_tests::{cbor, wire, write_in_background, Bystander, Client, Frame, Server, ServerOpts};

#[test]
fn prekey_fetch_flood_from_a_silent_client_is_bounded() {
    const FETCHES: usize = 200_000;
    // The fetch rate limit off: this is about the replies waiting at the core
    // (tests/tests/rate_limits.rs has the limit).
    let s =
        Server::start(ServerOpts::shards(2).config("[rate_limits]\nprekey_fetches_per_sec = 0\n"));
    let mut bystander = Bystander::new(&s);
    // An 8 KiB bundle to fetch.
    let mut owner = s.login("pk-victim");
    let bundle = cbor::map(&[("k", cbor::V::Bytes(&vec![7u8; 8000]))]);
    owner.write(&wire::upload_prekeys(&bundle));
    owner.write(&wire::fetch_prekeys(b"pk-victim"));
    match owner.recv() {
        Frame::Prekeys(b) => assert_eq!(b, bundle),
        other => panic!("expected the bundle, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = s.rss_kib();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = s.rss_sampler(done.clone());
    // 200,000 fetches (2.4 MB in, 1.6 GB of replies) from a client that never reads.
    let mut attacker = Client::connect_small_rcvbuf(s.client, 8192);
    attacker.login("pk-attacker");
    let writer = write_in_background(
        attacker.stream(),
        wire::fetch_prekeys(b"pk-victim").repeat(FETCHES),
    );
    let t0 = Instant::now();
    let closed = iris_tests::wait_until(Duration::from_secs(30), || {
        s.metric("iris_edge_slow_consumer_disconnects_total") >= 1
    });
    bystander.check("during the prekey fetch flood");
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    drop(attacker);
    writer.join().unwrap();
    let mut s = s;
    s.assert_running();
    let pushback = s.metric("iris_edge_reply_backpressure_total");
    eprintln!(
        "prekey flood: VmRSS {rss0} KiB, peak {peak} KiB (+{} KiB); attacker closed after {:?}; \
         reply backpressure {pushback}",
        peak.saturating_sub(rss0),
        t0.elapsed()
    );
    assert!(closed, "the silent fetcher was never disconnected");
    assert!(
        peak < rss0 + (32 << 10),
        "VmRSS peaked {} KiB above its start during a prekey fetch flood",
        peak - rss0
    );
    assert!(
        pushback >= 1,
        "max_pending_replies never stopped the reading"
    );
    bystander.check("after the prekey fetch flood");
}

#[test]
fn typing_flood_is_rate_limited_and_never_disconnects_its_victim() {
    const FRAMES: usize = 40_000;
    let s = Server::start(ServerOpts::shards(2));
    let mut bystander = Bystander::new(&s);
    let mut victim = Client::connect_small_rcvbuf(s.client, 8192);
    victim.login("ty-victim");
    // A 256-byte sender name: each 12-byte TYPING frame becomes a 260-byte relay.
    let name = "t".repeat(256);
    let mut attacker = s.login(&name);
    attacker.wait_online("ty-victim");
    let t0 = Instant::now();
    // 40,000 frames (480 KB): 10.4 MB of relays unlimited, more than the victim's 4 MiB cap
    // and the kernel's socket buffers together.
    attacker.write(&wire::typing(b"ty-victim", true).repeat(FRAMES));
    // Told once per run of dropped relays (0xFF), not once per frame: a run ends when a token
    // comes back (10 per second), so a flood that takes a while is told a few times.
    attacker.write(&wire::get_status(b"sync-probe"));
    let mut told = 0usize;
    loop {
        match attacker.recv() {
            Frame::RateLimited(_) => told += 1,
            Frame::Status { .. } => break,
            other => panic!("attacker got {other:?}"),
        }
    }
    let most = (t0.elapsed().as_secs_f64() * 10.0).ceil() as usize + 2;
    assert!(
        (1..=most).contains(&told),
        "told {told} times (at most {most}: once per run of drops)"
    );
    std::thread::sleep(Duration::from_millis(300));
    let elapsed = t0.elapsed();
    assert_eq!(
        s.metric("iris_edge_slow_consumer_disconnects_total"),
        0,
        "the typing flood made its victim a slow consumer"
    );
    let dropped = s.metric("iris_edge_typing_dropped_total");
    // Now the victim reads: a few relays (the burst plus the rate), then a message.
    // (A flood under the default limits: 40,000 frames become at most a few dozen relays.)
    let mut relays = 0usize;
    while let Some(f) = victim.recv_within(Duration::from_millis(500)) {
        match f {
            Frame::Typing { sender, on: 1 } if sender == name.as_bytes() => relays += 1,
            other => panic!("victim got {other:?}"),
        }
    }
    // typing_relay_burst (32) plus typing_relays_per_sec (10) per second, and some slack.
    let allowed = 32 + (elapsed.as_secs_f64() * 10.0).ceil() as usize + 10;
    eprintln!("typing flood: {FRAMES} frames in {elapsed:?}: {relays} relayed, {dropped} dropped");
    assert!(
        relays >= 1 && relays <= allowed,
        "{relays} relays reached the victim (at most {allowed} allowed: burst 32, 10/s)"
    );
    assert!(
        dropped as usize + relays == FRAMES,
        "dropped {dropped} + relayed {relays}"
    );
    attacker.send("ty-victim", b"after the flood");
    assert_eq!(victim.recv_acked(), b"after the flood");
    // A second later the attacker's bucket has refilled: typing works again.
    std::thread::sleep(Duration::from_millis(1100));
    attacker.write(&wire::typing(b"ty-victim", false));
    assert_eq!(
        victim.recv(),
        Frame::Typing {
            sender: name.as_bytes().to_vec(),
            on: 0
        }
    );
    bystander.check("after the typing flood");
}

/// Frames behind a FETCH_PREKEYS that waited for `max_pending_replies` are decoded as soon as
/// replies come back, without the client writing anything more.
#[test]
fn frames_behind_held_prekey_fetches_are_not_stuck() {
    let s = Server::start(ServerOpts::shards(2).config("max_pending_replies = 1\n"));
    let mut r = s.login("pk-held-r");
    let mut a = s.login("pk-held-a");
    let mut bytes = wire::fetch_prekeys(b"nobody").repeat(50);
    bytes.extend(wire::send(b"pk-held-r", b"behind the fetches"));
    a.write(&bytes);
    for i in 0..50 {
        match a.recv() {
            Frame::Prekeys(_) => {}
            other => panic!("reply {i}: {other:?}"),
        }
    }
    assert_eq!(r.recv_acked(), b"behind the fetches");
    assert!(s.metric("iris_edge_reply_backpressure_total") >= 1);
}
