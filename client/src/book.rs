//! Bookkeeping with no I/O, unit-tested alone: the un-acked outbox ([`Outbox`]), the window
//! of recent deliveries that drops redeliveries ([`SeenWindow`]), the batch of pending acks
//! ([`AckBatch`]) and the seed of client_msg_ids ([`seed_client_msg_id`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use iris_wire::v2::{encode_client, ClientFrame, MAX_ACK_IDS};

/// Automatic acks pending that trigger a flush at once.
pub(crate) const ACK_FLUSH_COUNT: usize = 256;

/// The default first client_msg_id: unix microseconds now (at least 1).
pub(crate) fn seed_client_msg_id() -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    u64::try_from(micros).unwrap_or(u64::MAX).max(1)
}

/// One un-acked SEND: its encoded frame (sent again as is) and when a limited or refused
/// send is due again.
struct Pending {
    frame: Arc<[u8]>,
    resend_at: Option<Instant>,
}

/// Sends written but not acknowledged by SEND_ACK, in client_msg_id order (= send order).
pub(crate) struct Outbox {
    entries: BTreeMap<u64, Pending>,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            entries: BTreeMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn insert(&mut self, client_msg_id: u64, frame: Arc<[u8]>) {
        self.entries.insert(
            client_msg_id,
            Pending {
                frame,
                resend_at: None,
            },
        );
    }

    /// Removes an acknowledged (or refused for good) send; false if it was not there.
    pub(crate) fn remove(&mut self, client_msg_id: u64) -> bool {
        self.entries.remove(&client_msg_id).is_some()
    }

    pub(crate) fn contains(&self, client_msg_id: u64) -> bool {
        self.entries.contains_key(&client_msg_id)
    }

    /// Sends `client_msg_id` again at `at` (if still un-acked).
    pub(crate) fn schedule(&mut self, client_msg_id: u64, at: Instant) {
        if let Some(p) = self.entries.get_mut(&client_msg_id) {
            p.resend_at = Some(at);
        }
    }

    /// Every frame, in send order, for a new connection; schedules are cleared.
    pub(crate) fn all_for_resend(&mut self) -> Vec<Arc<[u8]>> {
        self.entries
            .values_mut()
            .map(|p| {
                p.resend_at = None;
                p.frame.clone()
            })
            .collect()
    }

    /// Frames whose scheduled resend is due, in send order; their schedules are cleared.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<Arc<[u8]>> {
        self.entries
            .values_mut()
            .filter(|p| p.resend_at.is_some_and(|at| at <= now))
            .map(|p| {
                p.resend_at = None;
                p.frame.clone()
            })
            .collect()
    }

    /// The earliest scheduled resend.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.entries.values().filter_map(|p| p.resend_at).min()
    }
}

/// Where a delivery id stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mark {
    /// Queued for `recv`, not handed to the app yet.
    Queued,
    /// Handed to the app, not acked (manual ack).
    Handed,
    /// Acked (automatically or by the app).
    Acked,
}

/// The last `cap` delivery ids and their [`Mark`].
pub(crate) struct SeenWindow {
    marks: HashMap<u64, Mark>,
    order: VecDeque<u64>,
    cap: usize,
}

impl SeenWindow {
    pub(crate) fn new(cap: usize) -> SeenWindow {
        SeenWindow {
            marks: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// A DELIVER arrived: `None` if new (now [`Mark::Queued`]), else its mark.
    pub(crate) fn arrive(&mut self, id: u64) -> Option<Mark> {
        if let Some(mark) = self.marks.get(&id) {
            return Some(*mark);
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.marks.remove(&old);
            }
        }
        self.order.push_back(id);
        self.marks.insert(id, Mark::Queued);
        None
    }

    /// Moves a remembered id to `mark` (ids no longer remembered are left alone).
    pub(crate) fn set(&mut self, id: u64, mark: Mark) {
        if let Some(m) = self.marks.get_mut(&id) {
            *m = mark;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// Ack ids waiting to be sent, and since when the oldest waits.
pub(crate) struct AckBatch {
    ids: Vec<u64>,
    since: Option<Instant>,
}

impl AckBatch {
    pub(crate) fn new() -> AckBatch {
        AckBatch {
            ids: Vec::new(),
            since: None,
        }
    }

    /// Adds an id; true when the batch should be flushed at once.
    pub(crate) fn push(&mut self, id: u64, now: Instant) -> bool {
        if self.ids.is_empty() {
            self.since = Some(now);
        }
        self.ids.push(id);
        self.ids.len() >= ACK_FLUSH_COUNT
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// When the batch must be flushed (oldest + `flush`), if any.
    pub(crate) fn deadline(&self, flush: Duration) -> Option<Instant> {
        self.since.map(|s| s + flush)
    }

    /// The pending ids as ACK frames of at most [`MAX_ACK_IDS`] ids, and the highest id;
    /// the batch is emptied.
    pub(crate) fn take_frames(&mut self) -> (Vec<Vec<u8>>, u64) {
        self.since = None;
        let ids = std::mem::take(&mut self.ids);
        let max = ids.iter().copied().max().unwrap_or(0);
        let frames = ids
            .chunks(MAX_ACK_IDS)
            .map(|chunk| {
                let mut out = Vec::with_capacity(7 + 8 * chunk.len());
                encode_client(
                    &ClientFrame::Ack {
                        ids: chunk.to_vec(),
                    },
                    &mut out,
                );
                out
            })
            .collect();
        (frames, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_wire::v2::{decode_client, Decoded, DEFAULT_MAX_FRAME_BYTES};

    fn frame(b: u8) -> Arc<[u8]> {
        Arc::from(vec![b])
    }

    #[test]
    fn outbox_resends_everything_in_send_order_and_forgets_acked() {
        let mut o = Outbox::new();
        for id in [30u64, 10, 20] {
            o.insert(id, frame(id as u8));
        }
        assert!(o.remove(20));
        assert!(
            !o.remove(20),
            "a second SEND_ACK of the same id removes nothing"
        );
        let all: Vec<u8> = o.all_for_resend().iter().map(|f| f[0]).collect();
        assert_eq!(all, vec![10, 30]);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn outbox_scheduled_resends_come_due_once() {
        let mut o = Outbox::new();
        let t0 = Instant::now();
        o.insert(1, frame(1));
        o.insert(2, frame(2));
        o.schedule(2, t0 + Duration::from_millis(50));
        o.schedule(99, t0); // not in the outbox: ignored
        assert_eq!(o.next_due(), Some(t0 + Duration::from_millis(50)));
        assert!(o.take_due(t0).is_empty());
        let due = o.take_due(t0 + Duration::from_millis(50));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0][0], 2);
        assert!(o.take_due(t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(o.next_due(), None);
        // A reconnect resends everything and clears schedules.
        o.schedule(1, t0);
        assert_eq!(o.all_for_resend().len(), 2);
        assert_eq!(o.next_due(), None);
    }

    #[test]
    fn seen_window_marks_and_forgets_the_oldest() {
        let mut w = SeenWindow::new(3);
        assert_eq!(w.arrive(1), None);
        assert_eq!(w.arrive(1), Some(Mark::Queued));
        w.set(1, Mark::Acked);
        assert_eq!(w.arrive(1), Some(Mark::Acked));
        assert_eq!(w.arrive(2), None);
        assert_eq!(w.arrive(3), None);
        assert_eq!(w.arrive(4), None); // evicts 1
        assert_eq!(w.len(), 3);
        assert_eq!(w.arrive(1), None, "1 is forgotten: new again");
        w.set(77, Mark::Handed); // unknown: no effect
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn ack_batch_flushes_at_256_and_splits_at_1024() {
        let mut b = AckBatch::new();
        let t0 = Instant::now();
        assert_eq!(b.deadline(Duration::from_millis(20)), None);
        for id in 1..ACK_FLUSH_COUNT as u64 {
            assert!(!b.push(id, t0 + Duration::from_millis(id)));
        }
        assert_eq!(
            b.deadline(Duration::from_millis(20)),
            Some(t0 + Duration::from_millis(21)),
            "the oldest pending id sets the deadline"
        );
        assert!(b.push(ACK_FLUSH_COUNT as u64, t0));
        for id in 257..=2100u64 {
            b.push(id, t0);
        }
        let (frames, max) = b.take_frames();
        assert_eq!(max, 2100);
        assert!(b.is_empty());
        assert_eq!(b.deadline(Duration::from_millis(20)), None);
        let mut all = Vec::new();
        for f in &frames {
            match decode_client(f, DEFAULT_MAX_FRAME_BYTES).unwrap() {
                Decoded::Frame {
                    frame: ClientFrame::Ack { ids },
                    consumed,
                } => {
                    assert_eq!(consumed, f.len());
                    assert!(ids.len() <= MAX_ACK_IDS);
                    all.extend(ids);
                }
                other => panic!("not an ACK: {other:?}"),
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(all, (1..=2100).collect::<Vec<u64>>());
    }

    #[test]
    fn seed_is_unix_micros() {
        let a = seed_client_msg_id();
        // After 2024 and before 2100, in microseconds.
        assert!(
            a > 1_704_067_200_000_000 && a < 4_102_444_800_000_000,
            "{a}"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(seed_client_msg_id() > a, "a later start seeds higher ids");
    }
}
