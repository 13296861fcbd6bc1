//! `batch_wait_us`: a shard that sleeps in batches (glommio patch 9, Linux 6.12). A shard that
//! slept longer than the batch wait still wakes at its first event; one that goes back to sleep
//! right after a turn gathers what comes in the next `batch_wait_us`. Both are checked with a
//! wait of 10 ms, far above a loopback round trip, so neither depends on the machine's speed:
//! the first takes the fastest of several tries, the second asks that some hop waited.

use std::time::{Duration, Instant};

use iris_tests::{Client, Server, ServerOpts};

/// The batch wait needs Linux 6.12 (`IORING_FEAT_MIN_TIMEOUT`); older kernels wake at once.
fn kernel_has_batch_wait() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    iris_tuning::facts::parse_kernel_version(release.trim()).is_some_and(|v| v >= (6, 12))
}

fn server(batch_wait_us: u64) -> Server {
    Server::start(ServerOpts::shards(1).config(&format!("batch_wait_us = {batch_wait_us}\n")))
}

/// An edge waiting 10 ms for a batch, with users `{prefix}-a` and `{prefix}-b` logged in; `None`
/// (the test is skipped, and says so) on a kernel without the batch wait.
fn two_users_on_a_10_ms_batch(prefix: &str) -> Option<(Server, Client, Client)> {
    if !kernel_has_batch_wait() {
        eprintln!("skipped: the batch wait needs Linux 6.12");
        return None;
    }
    let s = server(10_000);
    let a = s.login(&format!("{prefix}-a"));
    let b = s.login(&format!("{prefix}-b"));
    Some((s, a, b))
}

#[test]
fn the_shard_says_whether_it_sleeps_in_batches() {
    let s = server(10_000);
    let expect = if kernel_has_batch_wait() {
        "batch_wait=true"
    } else {
        "batch_wait=false"
    };
    assert!(
        iris_tests::wait_until(Duration::from_secs(5), || s.log().contains(expect)),
        "no `{expect}` in the log:\n{}",
        s.log_tail(20)
    );
    let off = server(0);
    assert!(
        iris_tests::wait_until(Duration::from_secs(5), || off
            .log()
            .contains("batch_wait=false")),
        "batch_wait_us = 0 must not batch:\n{}",
        off.log_tail(20)
    );
}

#[test]
fn a_shard_that_slept_longer_than_the_batch_wait_wakes_at_its_first_event() {
    let Some((_s, mut a, mut b)) = two_users_on_a_10_ms_batch("bw-sleeper") else {
        return;
    };
    let mut fastest = Duration::MAX;
    for i in 0..5 {
        // Longer than the batch wait: the shard's sleep is past it.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        a.send("bw-sleeper-b", format!("wake {i}").as_bytes());
        assert_eq!(b.recv_acked(), format!("wake {i}").as_bytes());
        fastest = fastest.min(t.elapsed());
    }
    // A send that waited out the batch would take 10 ms or more, every time.
    assert!(
        fastest < Duration::from_millis(8),
        "the fastest of 5 sends to a long-sleeping shard took {fastest:?} (batch wait 10 ms)"
    );
}

#[test]
fn events_right_after_a_turn_wait_for_the_batch_and_all_arrive() {
    let Some((_s, mut a, mut b)) = two_users_on_a_10_ms_batch("bw-pp") else {
        return;
    };
    let rounds = 20;
    let mut hops = Vec::with_capacity(2 * rounds);
    for r in 0..rounds {
        let t = Instant::now();
        a.send("bw-pp-b", format!("ping {r}").as_bytes());
        assert_eq!(b.recv_acked(), format!("ping {r}").as_bytes());
        hops.push(t.elapsed());
        let t = Instant::now();
        b.send("bw-pp-a", format!("pong {r}").as_bytes());
        assert_eq!(a.recv_acked(), format!("pong {r}").as_bytes());
        hops.push(t.elapsed());
    }
    // A send that reaches a shard which went back to sleep right after its last write waits
    // out the batch (10 ms); one that comes while the shard is still awake (busy with the
    // ack, or descheduled on a busy machine) is handled at once. So some hops wait: 12 of the
    // 40 on an idle machine, 4 to 27 beside two busy loops. Without the batch wait no hop
    // takes a millisecond.
    let held = hops
        .iter()
        .filter(|h| **h >= Duration::from_millis(5))
        .count();
    assert!(held >= 1, "no hop waited for the batch: {hops:?}");
    a.expect_silence(Duration::from_millis(30));
    b.expect_silence(Duration::from_millis(30));
}

/// `iris_edge_shard_sleeps_total` counts the shard's sleeps: an idle shard sleeps, and wakes
/// only for its housekeeping (every 100 ms), so a few times in 400 ms, not thousands.
#[test]
fn an_idle_shard_counts_a_few_sleeps() {
    let s = server(200);
    let _a = s.login("bw-idle-a");
    // Published by the shard at least every 100 ms.
    std::thread::sleep(Duration::from_millis(250));
    let before = s.metric("iris_edge_shard_sleeps_total");
    std::thread::sleep(Duration::from_millis(400));
    let after = s.metric("iris_edge_shard_sleeps_total");
    assert!(before > 0, "no sleep counted");
    assert!(
        (2..=200).contains(&(after - before)),
        "{} sleeps in 400 ms of an idle shard",
        after - before
    );
}
