//! Helpers of the cluster tests: a paced sender thread, an acking receiver thread with exact
//! loss and duplicate accounting, status polling and a raw Kafka producer for corrupted records.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iris_tests::{
    assert_valid_id, decode_server, number_of, numbered, wire, Bytes, Client, Frame, ReadEnd,
};

/// Payload size of the numbered load messages.
pub const PAYLOAD: usize = 24;

/// A thread that sends the numbered messages `range` from one logged-in client to `to`, `batch`
/// messages per write with `pause` between writes, and counts what it has written (the number
/// after the last one written: `range.start` until the first write).
pub struct Sender {
    sent: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Client>>,
    started: Instant,
    /// `(elapsed, sent)` samples taken by [`Sender::mark`].
    marks: Vec<(Duration, usize)>,
}

impl Sender {
    pub fn start(
        mut c: Client,
        to: &str,
        range: std::ops::Range<usize>,
        batch: usize,
        pause: Duration,
    ) -> Sender {
        let sent = Arc::new(AtomicUsize::new(range.start));
        let counter = Arc::clone(&sent);
        let to = to.to_owned();
        let handle = std::thread::spawn(move || {
            let (mut i, n) = (range.start, range.end);
            while i < n {
                let end = (i + batch).min(n);
                let mut out = Vec::with_capacity((end - i) * (PAYLOAD + 8));
                for k in i..end {
                    out.extend_from_slice(&wire::send(to.as_bytes(), &numbered(k, PAYLOAD)));
                }
                c.write(&out);
                counter.store(end, Ordering::SeqCst);
                i = end;
                if i < n {
                    std::thread::sleep(pause);
                }
            }
            c
        });
        Sender {
            sent,
            handle: Some(handle),
            started: Instant::now(),
            marks: Vec::new(),
        }
    }

    /// Messages written so far (counted from 0).
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Records `(elapsed, sent)` now and returns `sent`.
    pub fn mark(&mut self) -> usize {
        let s = self.sent();
        self.marks.push((self.started.elapsed(), s));
        s
    }

    /// Waits for the last write; returns the client.
    pub fn finish(mut self) -> Client {
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("sender thread panicked")
    }
}

/// Why a [`collect`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every wanted number arrived.
    Done,
    /// The stop flag was raised.
    Stopped,
    /// The deadline passed.
    Timeout,
    /// The server closed or reset the connection.
    Closed(String),
}

/// Reads RELIABLE_MSGs of numbered payloads, acking each one (acks are written whenever no
/// complete frame is buffered, so they go out in arrival order), appending each number to `got`
/// in arrival order, until every number in `want` has arrived at least once (counting what
/// `got` already held), `stop` is raised, `deadline` passes or the connection closes. Any
/// other frame panics.
pub fn collect(
    c: &mut Client,
    got: &Mutex<Vec<usize>>,
    want: &HashSet<usize>,
    deadline: Instant,
    stop: &AtomicBool,
) -> End {
    let mut missing: HashSet<usize> = {
        let g = got.lock().unwrap();
        let have: HashSet<usize> = g.iter().copied().collect();
        want.difference(&have).copied().collect()
    };
    let mut acks = Vec::new();
    let end = loop {
        if missing.is_empty() {
            break End::Done;
        }
        if stop.load(Ordering::SeqCst) {
            break End::Stopped;
        }
        let now = Instant::now();
        if now >= deadline {
            break End::Timeout;
        }
        if !acks.is_empty() && !matches!(decode_server(c.unparsed()), Ok(Some(_))) {
            if let Err(e) = c.try_write(&acks) {
                return End::Closed(format!("writing acks: {e}"));
            }
            acks.clear();
        }
        match c.next_raw(deadline.min(now + Duration::from_millis(100))) {
            Ok((Frame::Reliable { id, payload }, _)) => {
                assert_valid_id(&id);
                let k = number_of(&payload);
                assert_eq!(
                    payload,
                    numbered(k, PAYLOAD),
                    "payload of message {k} altered"
                );
                got.lock().unwrap().push(k);
                missing.remove(&k);
                acks.extend_from_slice(&wire::ack(&id));
            }
            Ok((other, raw)) => panic!(
                "{:?}: expected only RELIABLE_MSGs, got {other:?} ({:?})",
                c.user,
                Bytes(&raw)
            ),
            Err(ReadEnd::Timeout) => {}
            Err(ReadEnd::Closed(why)) => return End::Closed(why),
        }
    };
    if !acks.is_empty() {
        let _ = c.try_write(&acks);
    }
    end
}

/// A thread running [`collect`] on a client, sharing what it received.
pub struct Receiver {
    pub got: Arc<Mutex<Vec<usize>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(Client, End)>>,
}

impl Receiver {
    /// Collects until every number of `want` arrived (`got` may already hold some), `timeout`
    /// passes, [`Receiver::stop`] or the connection closes.
    pub fn start(
        mut c: Client,
        got: Arc<Mutex<Vec<usize>>>,
        want: HashSet<usize>,
        timeout: Duration,
    ) -> Receiver {
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(&got), Arc::clone(&stop));
        let deadline = Instant::now() + timeout;
        let handle = std::thread::spawn(move || {
            let end = collect(&mut c, &g, &want, deadline, &s);
            (c, end)
        });
        Receiver {
            got,
            stop,
            handle: Some(handle),
        }
    }

    /// Messages received so far (with duplicates).
    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Distinct numbers received so far.
    pub fn distinct(&self) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .collect::<HashSet<_>>()
            .len()
    }

    /// Raises the stop flag (the thread ends within about 100 ms).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread: the client and why it stopped.
    pub fn join(mut self) -> (Client, End) {
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("receiver thread panicked")
    }
}

/// Waits until `r` holds every one of `n` numbers, or nothing new arrived for `quiet` after
/// the sender finished, or `timeout` passed; then stops it. Returns (client, end).
pub fn settle(r: Receiver, n: usize, quiet: Duration, timeout: Duration) -> (Client, End) {
    let deadline = Instant::now() + timeout;
    let mut last = (r.count(), Instant::now());
    while !r.is_finished() && Instant::now() < deadline {
        if r.distinct() >= n {
            break;
        }
        let c = r.count();
        if c != last.0 {
            last = (c, Instant::now());
        } else if last.1.elapsed() >= quiet {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    r.stop();
    r.join()
}

/// Numbers received more than once, and how many extra copies arrived in all.
pub fn duplicates(got: &[usize]) -> (Vec<usize>, usize) {
    let mut seen = HashSet::new();
    let mut dup = Vec::new();
    for &k in got {
        if !seen.insert(k) {
            dup.push(k);
        }
    }
    let extra = dup.len();
    dup.sort_unstable();
    dup.dedup();
    (dup, extra)
}

/// The numbers of `0..n` missing from `got`.
pub fn missing(got: &[usize], n: usize) -> Vec<usize> {
    let seen: HashSet<usize> = got.iter().copied().collect();
    (0..n).filter(|k| !seen.contains(k)).collect()
}

/// `got` with every repeat of an earlier number removed (first arrivals, in order).
pub fn first_arrivals(got: &[usize]) -> Vec<usize> {
    let mut seen = HashSet::new();
    got.iter().copied().filter(|k| seen.insert(*k)).collect()
}

/// Polls GET_STATUS of `user` through `c` until `pred(online, last_seen)` or `timeout`; returns
/// the last status and the time it took, or panics.
pub fn wait_status(
    c: &mut Client,
    user: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(u8, u64) -> bool,
) -> ((u8, u64), Duration) {
    let t0 = Instant::now();
    loop {
        let st = c.status(user);
        if pred(st.0, st.1) {
            return (st, t0.elapsed());
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: status of {user:?} seen by {:?} is still {st:?} after {timeout:?}",
            c.user
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Receives one RELIABLE_MSG within `timeout` (acked): (id, payload), or panics with `what`.
pub fn recv_one(c: &mut Client, timeout: Duration, what: &str) -> (Vec<u8>, Vec<u8>) {
    match c.recv_within(timeout) {
        Some(Frame::Reliable { id, payload }) => {
            assert_valid_id(&id);
            c.ack(&id);
            (id, payload)
        }
        Some(other) => panic!("{what}: expected a RELIABLE_MSG, got {other:?}"),
        None => panic!("{what}: no message within {timeout:?}"),
    }
}

/// Polls `f` every 50 ms until it returns true; panics with `what` after `timeout`. Returns the
/// time it took.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if f() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A raw Kafka producer (rdkafka, as `core/tests/service.rs` uses) for records the edges and
/// cores must survive.
pub struct RawProducer {
    producer: rdkafka::producer::BaseProducer,
}

impl RawProducer {
    pub fn new(brokers: &str) -> RawProducer {
        use rdkafka::config::ClientConfig;
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "1")
            .set("log_level", "3")
            .create()
            .expect("rdkafka producer");
        RawProducer { producer }
    }

    /// Produces `payload` with `key` to `topic`, partition `partition`.
    pub fn send(&self, topic: &str, partition: i32, key: &[u8], payload: &[u8]) {
        use rdkafka::producer::BaseRecord;
        let mut record = BaseRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(10));
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until the broker acknowledged everything (panics after 20 s).
    pub fn flush(&self) {
        use rdkafka::producer::Producer;
        self.producer
            .flush(Duration::from_secs(20))
            .expect("flush raw records");
    }
}
