//! A stream of numbered messages to one recipient, and the recipient's sessions checked for
//! every message they are owed: the checks of the drain's hand-over between sessions
//! (`tests/known_empty.rs` on one edge, `tests/cluster/live.rs` through a region).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{number_of, numbered, wire, Client, Frame, ReadEnd};

/// Sends `bursts` bursts of `per_burst` numbered messages from `a` to `rcpt`, each burst
/// synced (the edge has read and handled its SENDs) and then counted in the returned counter,
/// then sleeps `pause(burst)`.
pub fn stream(
    mut a: Client,
    rcpt: &str,
    bursts: usize,
    per_burst: usize,
    pause: fn(usize) -> Duration,
) -> (JoinHandle<()>, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let rcpt = rcpt.to_owned();
    let t = std::thread::spawn(move || {
        for b in 0..bursts {
            a.send_many(
                &rcpt,
                (b * per_burst..(b + 1) * per_burst).map(|i| numbered(i, 48)),
            );
            a.sync();
            counted.store((b + 1) * per_burst, Ordering::SeqCst);
            std::thread::sleep(pause(b));
        }
    });
    (t, accepted)
}

/// Reads session `session` of `r`: a LOGIN_OK first when `login` (a LOGIN written on the
/// socket), every message numbered below `before` not yet in `got` (each acked as it comes),
/// then, with `quiet`, whatever else comes until nothing does for that long. Panics when an
/// owed message has not come within `wait`.
pub fn read_owed(
    r: &mut Client,
    got: &mut BTreeSet<usize>,
    before: usize,
    login: bool,
    quiet: Option<Duration>,
    session: usize,
    wait: Duration,
) {
    let deadline = Instant::now() + wait;
    let mut logged_in = !login;
    loop {
        let owed = !logged_in || (0..before).any(|i| !got.contains(&i));
        let until = match (owed, quiet) {
            (true, _) => deadline,
            (false, Some(q)) => Instant::now() + q,
            (false, None) => return,
        };
        match r.next_raw(until) {
            Ok((Frame::LoginOk, _)) if login => logged_in = true,
            Ok((Frame::Reliable { id, payload }, _)) => {
                got.insert(number_of(&payload));
                r.ack(&id);
            }
            Ok((other, _)) => panic!("session {session}: got {other:?}"),
            Err(ReadEnd::Timeout) if !owed => return,
            Err(ReadEnd::Timeout) => {
                let missing: Vec<usize> = (0..before).filter(|i| !got.contains(i)).collect();
                panic!(
                    "session {session} (logged in: {logged_in}): {} messages accepted before \
                     its login never came within {wait:?} (first {:?})",
                    missing.len(),
                    &missing[..missing.len().min(10)],
                );
            }
            Err(ReadEnd::Closed(why)) => panic!("session {session}: closed: {why}"),
        }
    }
}

/// `rcpt` logs in again and again on one connection, `r` (a LOGIN while logged in starts a new
/// session and a new drain), while `sender` streams `n` messages to it. Every other LOGIN
/// follows the last LOGIN_OK at once, while that session's drain may still be unanswered; the
/// sessions in between must bring every message the edge had accepted before their LOGIN was
/// written and not yet received, each within `wait`. Returns the sessions it took.
///
/// A drain must not take the answer to the drain it replaced for its own: the live copies the
/// old session held for after its drain are dropped with it (they are stored), and an answer
/// read before they were stored would end the new drain without them.
pub fn relogins_under_a_stream(
    sender: Client,
    mut r: Client,
    rcpt: &str,
    n: usize,
    wait: Duration,
) -> usize {
    let (sender, accepted) = stream(sender, rcpt, n, 1, |_| Duration::ZERO);
    let mut got = BTreeSet::new();
    let mut sessions = 0;
    loop {
        let done = sender.is_finished();
        let before = accepted.load(Ordering::SeqCst);
        r.write(&wire::login(rcpt.as_bytes()));
        sessions += 1;
        if sessions % 2 == 0 || done {
            let quiet = done.then_some(Duration::from_millis(50));
            read_owed(&mut r, &mut got, before, true, quiet, sessions, wait);
        } else {
            // The next LOGIN right after this LOGIN_OK.
            read_owed(&mut r, &mut got, 0, true, None, sessions, wait);
        }
        if done {
            break;
        }
    }
    sender.join().unwrap();
    assert_eq!(got.len(), n, "after {sessions} sessions");
    sessions
}
