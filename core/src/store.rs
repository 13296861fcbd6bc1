//! The durable message store of the embedded deployment: an fjall LSM database on local disk.
//!
//! [`MessageStore`] keeps its keyspaces in one fjall [`Database`]:
//!
//! - `inbox`: every stored, not yet acked message. Key = `u16 BE len(user) | user | u64 BE id`.
//!   The length prefix makes one user's keys a prefix-free range (user `ab` never sees the keys
//!   of user `abc`), and the big-endian id makes key order equal id order, so a drain is one
//!   forward range scan. Value = `u8 version (2) | u8 kind | u16 BE len(sender) | sender |
//!   payload`, `kind` being the message's protocol v2 kind ([`StoredMsg::kind`]). Values of
//!   version 1 (`u8 version (1) | u16 BE len(sender) | sender | payload`, written before kinds
//!   were stored) are still read, as [`KIND_UNRECORDED`]: a store written by an older build
//!   opens and drains unchanged after an upgrade, and is never rewritten.
//! - `prekeys`: key = user, value = the user's E2EE prekey bundle (CBOR bytes, stored as given).
//! - `meta`: `id_floor` = at least the highest message id the store has ever been told about
//!   (the embedded core writes it a second of id clock ahead, see [`crate::embedded`]; u64 BE),
//!   written in the same atomic batch as the messages that raise it. Edge shards seed their id
//!   generators with it so a restart never reuses an id.
//! - `sent.{lo}.{hi}` (the **dedup buckets**; `lo`, `hi` as 16 hex digits): the dedup records of
//!   v2 sends (a client message id is an idempotency key unique per sender) whose server id lies
//!   in `lo..hi`. Key = `u16 BE len(sender) | sender | u64 BE client`, value =
//!   `u8 version (1) | u64 BE id`: the server id of the first message the sender sent with that
//!   client id. Written in the same atomic batch as that message ([`Batch::sent`]), so a
//!   message is durable exactly when its record is ([`MessageStore::sent_id`] looks it up, in
//!   the newest bucket first). An id carries its accept time ([`crate::api::min_live_id`]), so a
//!   bucket is a slice of time: `dedup_ttl_secs / 8` wide (at least a second; one bucket for
//!   all ids when the TTL is 0, "forever"), and it expires whole: once its last id is older
//!   than `dedup_ttl_secs`, [`MessageStore::drop_expired_sent`] deletes the keyspace. Records
//!   therefore live `dedup_ttl_secs` and at most an eighth more, and each costs one insert:
//!   no time index, no tombstone, no sweep of single records.
//!
//!   A send with a new client id would read every live bucket (up to nine) to find nothing.
//!   The store keeps **marks** ([`SentMarks`]): for up to [`SENT_MARKS_MAX`] senders, an upper
//!   bound of the client ids of their records in the LSM. A client id above its sender's mark
//!   is answered "not sent" without a read, which is every send of a client that counts its ids
//!   up (the Iris client does). Learning a mark costs one range read per bucket, about ten
//!   point reads' worth (nothing at or above the id: the mark is the id minus one, else the
//!   highest record, read backwards), so a sender's mark is learnt at its
//!   [`SENT_MARKS_LEARN_AFTER`]th lookup in a period, when it has shown it sends enough for the
//!   marks to pay; lighter senders' lookups read the buckets as without marks. Every write of a
//!   record raises a known mark under the same lock, so a mark never falls below a record. The
//!   table holds [`SENT_MARKS_MAX`] senders and is cleared every [`SENT_MARKS_RESET`]: a full
//!   table admits no one until then, so learning costs at most one range read per sender per
//!   period, never one per send.
//! - `sent` and `sent_by_id`: the dedup records of builds before the buckets (the same key and
//!   value in `sent`; `sent_by_id` = `u64 BE id | sent key`, empty value, their time index).
//!   Nothing writes them any more; they are read after the buckets, and swept until empty:
//!   [`MessageStore::expired_sent`] reads expired ones in bounded turns and
//!   [`Batch::sent_expired`] deletes both entries (the `sent` entry only if it still names that
//!   id). A store written by an older build thus opens and answers resends unchanged.
//!
//! Every write goes through [`MessageStore::write`] / [`MessageStore::commit`]: one fjall write
//! batch (atomic across keyspaces), optionally followed by an fsync of the journal. Anything a
//! durable commit returned `Ok` for survives a crash (fjall replays its journal on open).
//! The store is used by a single writer, the embedded core thread ([`crate::embedded`]), but is
//! `Send + Sync` and safe to read from elsewhere (tests do).
//!
//! Corrupt stored values are reported (logged with the [`CoreError`], counted in
//! [`MessageStore::corrupt_skipped`]) and skipped; they never cause a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tracing::{debug, error};

use crate::api::{DrainedMsg, StoredMsg, KIND_UNRECORDED};
use crate::error::CoreError;

/// Version byte of the inbox values this build writes (with the kind).
const VALUE_VERSION: u8 = 2;
/// Version byte of the inbox values of older builds (no kind); still read.
const VALUE_VERSION_NO_KIND: u8 = 1;
/// Bytes of a key besides the user name: `u16` length prefix and `u64` id.
const KEY_OVERHEAD: usize = 2 + 8;
/// fjall's key size limit.
const FJALL_MAX_KEY: usize = 65_536;
/// Longest user name the inbox key layout can hold (fjall limits keys to 64 KiB).
pub const MAX_USER_LEN: usize = FJALL_MAX_KEY - KEY_OVERHEAD;
/// Longest sender the inbox value layout can hold (`u16` length).
pub const MAX_SENDER_LEN: usize = u16::MAX as usize;
/// Key of the id floor in the `meta` keyspace.
const ID_FLOOR_KEY: &[u8] = b"id_floor";
/// Version byte of a `sent` value.
const SENT_VERSION: u8 = 1;
/// Senders whose mark the store keeps (see the module doc): about 60 bytes each with a short
/// name.
pub const SENT_MARKS_MAX: usize = 262_144;
/// How long marks are kept before the table is cleared (and marks learnt again).
pub const SENT_MARKS_RESET: Duration = Duration::from_secs(600);
/// Lookups of a sender in a period before its mark is learnt (see the module doc).
pub const SENT_MARKS_LEARN_AFTER: u32 = 16;
/// Name prefix of a dedup bucket keyspace: `sent.{lo:016x}.{hi:016x}`.
const BUCKET_PREFIX: &str = "sent.";
/// Dedup buckets per `dedup_ttl_secs`: a record outlives its TTL by at most one bucket.
const BUCKETS_PER_TTL: u64 = 8;
/// The dedup TTL a store opened without one ([`MessageStore::open`]) sizes its buckets for.
const DEFAULT_DEDUP_TTL_SECS: u64 = 24 * 3600;

/// A dedup record for tests: `sender`'s client message id `client` is message `id`.
#[cfg(test)]
pub(crate) fn test_record(sender: &str, client: u64, id: u64) -> SentRecord {
    SentRecord {
        sender: sender.as_bytes().to_vec(),
        client,
        id,
    }
}

/// Entries one turn of an expiry sweep looks at, at most.
pub const SWEEP_BUDGET: usize = 1024;
/// Pause between two turns of one expiry sweep pass.
pub const SWEEP_TURN: Duration = Duration::from_millis(10);

/// The schedule of one bounded, resumable expiry sweep ([`MessageStore::sweep_expired`],
/// [`MessageStore::expired_sent`]): a turn every [`SWEEP_TURN`] while a pass goes on, a pass
/// every `ttl_secs / 10` (1 to 60 s), none with a TTL of 0. Shared by the embedded and the
/// cluster core's sweeps of expired messages and dedup records.
#[derive(Debug)]
pub struct SweepSchedule {
    ttl_secs: u64,
    cursor: Vec<u8>,
    next: Instant,
}

impl SweepSchedule {
    /// A schedule for entries older than `ttl_secs`, its first turn at `first`.
    pub fn new(ttl_secs: u64, first: Instant) -> Self {
        Self {
            ttl_secs,
            cursor: Vec::new(),
            next: first,
        }
    }

    /// When the next turn is due; None if the TTL is 0 (no sweep).
    pub fn next_due(&self) -> Option<Instant> {
        (self.ttl_secs > 0).then_some(self.next)
    }

    /// True if a turn is due at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.next_due().is_some_and(|t| now >= t)
    }

    /// True between the turns of a pass (a new pass starts from the beginning).
    pub fn mid_pass(&self) -> bool {
        !self.cursor.is_empty()
    }

    /// The due turn waits one [`SWEEP_TURN`] (its caller is busy).
    pub fn defer(&mut self, now: Instant) {
        self.next = now + SWEEP_TURN;
    }

    /// Starts the due turn: the lowest id still alive (ids carry their mint time) and where
    /// the turn resumes. End it with [`SweepSchedule::done`].
    pub fn start(&mut self) -> (u64, Vec<u8>) {
        let min_live = crate::api::min_live_id(iris_bus::hops::unix_micros(), self.ttl_secs);
        (min_live, std::mem::take(&mut self.cursor))
    }

    /// Ends a turn: the pass continues at `next` one turn later, or (None: it reached the end,
    /// or failed) the next pass starts a pass interval later.
    pub fn done(&mut self, now: Instant, next: Option<Vec<u8>>) {
        match next {
            Some(k) => {
                self.cursor = k;
                self.next = now + SWEEP_TURN;
            }
            None => {
                let pass = Duration::from_secs((self.ttl_secs / 10).clamp(1, 60));
                self.next = now + pass;
            }
        }
    }
}

/// A dedup record: `sender`'s client message id `client` was first sent as message `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRecord {
    pub sender: Vec<u8>,
    pub client: u64,
    pub id: u64,
}

/// Everything one atomic commit writes: see [`MessageStore::write`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Batch<'a> {
    /// Messages to store (a message already present is overwritten with the same bytes).
    pub inserts: &'a [StoredMsg],
    /// `(recipient, id)` of messages to delete (acked); deleting an absent message is harmless.
    pub deletes: &'a [(Vec<u8>, u64)],
    /// `(user, bundle)` prekey bundles to store (replace).
    pub prekeys: &'a [(Vec<u8>, Vec<u8>)],
    /// Raise the id floor to at least this id even if no insert carries it (the embedded core
    /// passes the highest id it has accepted, including messages acked before they were
    /// written), 0 for none.
    pub id_hint: u64,
    /// Dedup records to write (see the `sent` keyspace in the module doc).
    pub sent: &'a [SentRecord],
    /// Expired dedup records to delete (as [`MessageStore::expired_sent`] returned them): the
    /// time-index entry always, the `sent` entry if it still names that id (or is corrupt).
    pub sent_expired: &'a [SentRecord],
}

impl Batch<'_> {
    fn is_empty(&self) -> bool {
        self.inserts.is_empty()
            && self.deletes.is_empty()
            && self.prekeys.is_empty()
            && self.sent.is_empty()
            && self.sent_expired.is_empty()
    }
}

/// Stored messages of one user: count and payload bytes (see [`MessageStore::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub payload_bytes: u64,
}

/// What one turn of [`MessageStore::sweep_expired`] found.
#[derive(Debug, Default)]
pub struct SweepTurn {
    /// `(user, id, payload bytes)` of expired messages.
    pub expired: Vec<(Vec<u8>, u64, u64)>,
    /// Where the next turn starts; `None` when this pass reached the end of the inboxes.
    pub next: Option<Vec<u8>>,
}

/// One dedup bucket: the records of the ids in `lo..hi` (see the module doc).
struct SentBucket {
    lo: u64,
    hi: u64,
    keyspace: Keyspace,
}

/// The durable store: per-user inboxes ordered by message id, prekey bundles, and the id floor.
pub struct MessageStore {
    dir: PathBuf,
    db: Database,
    inbox: Keyspace,
    prekeys: Keyspace,
    meta: Keyspace,
    /// The dedup records of older builds (read and swept, never written).
    sent: Keyspace,
    sent_by_id: Keyspace,
    /// The dedup buckets, by `lo`. Written by the single writer only; read by anyone.
    buckets: RwLock<Vec<SentBucket>>,
    /// Width of a new bucket, in ids (`u64::MAX`: one bucket for all ids).
    bucket_ids: u64,
    /// Cached `meta/id_floor`; only raised after the batch that raised it on disk committed.
    id_floor: AtomicU64,
    corrupt_skipped: AtomicU64,
    /// The senders' marks. Written under this lock by the lookup that learns one and by every
    /// write of records, which holds it across its commit.
    sent_marks: Mutex<SentMarks>,
}

/// Per sender, an upper bound of the client ids of its records in the LSM, or how many of its
/// lookups came before one is learnt; see the module doc.
#[derive(Debug)]
pub struct SentMarks {
    marks: HashMap<Box<[u8]>, Mark, foldhash::fast::RandomState>,
    max: usize,
    learn_after: u32,
    since: Instant,
}

/// One sender's entry in [`SentMarks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Lookups so far in this period; no mark yet.
    Counting(u32),
    /// Every record's client id is at most this (`None`: it has none).
    Known(Option<u64>),
}

impl SentMarks {
    fn new(max: usize, learn_after: u32) -> Self {
        Self {
            marks: HashMap::default(),
            max,
            learn_after,
            since: Instant::now(),
        }
    }

    /// Whether a mark may be learnt for one more sender (clearing the table once its period
    /// is over).
    fn room(&mut self) -> bool {
        if self.since.elapsed() >= SENT_MARKS_RESET {
            self.marks = HashMap::default();
            self.since = Instant::now();
        }
        self.marks.len() < self.max
    }
}

impl std::fmt::Debug for MessageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageStore")
            .field("dir", &self.dir)
            .field("id_floor", &self.id_floor())
            .field("corrupt_skipped", &self.corrupt_skipped())
            .finish_non_exhaustive()
    }
}

impl MessageStore {
    /// Opens (creating if needed) the store in directory `dir`, recovering everything that was
    /// committed before (fjall replays its journal).
    ///
    /// Only one process may hold a store open; a second open of the same directory fails.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, CoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir).open()?;
        let inbox = db.keyspace("inbox", KeyspaceCreateOptions::default)?;
        let prekeys = db.keyspace("prekeys", KeyspaceCreateOptions::default)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let sent = db.keyspace("sent", KeyspaceCreateOptions::default)?;
        let sent_by_id = db.keyspace("sent_by_id", KeyspaceCreateOptions::default)?;
        let mut buckets = Vec::new();
        for name in db.list_keyspace_names() {
            if let Some((lo, hi)) = parse_bucket_name(&name) {
                let keyspace = db.keyspace(&name, KeyspaceCreateOptions::default)?;
                buckets.push(SentBucket { lo, hi, keyspace });
            }
        }
        buckets.sort_by_key(|b| b.lo);
        // The journal's replay left every bucket's records in memory: all but the newest are
        // closed, so they go to disk (see `close_buckets_before`).
        if let Some(newest) = buckets.last().map(|b| b.lo) {
            close_buckets_before(&buckets, newest);
        }
        let id_floor = match meta.get(ID_FLOOR_KEY)? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    CoreError::corrupt("id_floor", format!("{} bytes, expected 8", v.len()))
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        debug!(dir = %dir.display(), id_floor, "message store opened");
        Ok(Self {
            dir: dir.to_path_buf(),
            db,
            inbox,
            prekeys,
            meta,
            sent,
            sent_by_id,
            buckets: RwLock::new(buckets),
            bucket_ids: bucket_ids(DEFAULT_DEDUP_TTL_SECS),
            id_floor: AtomicU64::new(id_floor),
            corrupt_skipped: AtomicU64::new(0),
            sent_marks: Mutex::new(SentMarks::new(SENT_MARKS_MAX, SENT_MARKS_LEARN_AFTER)),
        })
    }

    /// Keeps the marks of at most `senders` senders (default [`SENT_MARKS_MAX`]; 0: none, every
    /// lookup reads the buckets), each learnt at its sender's `learn_after`th lookup in a
    /// period (default [`SENT_MARKS_LEARN_AFTER`]; 0 and 1: at the first).
    #[must_use]
    pub fn with_sent_marks(self, senders: usize, learn_after: u32) -> Self {
        *self.sent_marks() = SentMarks::new(senders, learn_after);
        self
    }

    /// How many senders have a mark now.
    #[cfg(test)]
    fn sent_marks_known(&self) -> usize {
        let marks = self.sent_marks();
        marks
            .marks
            .values()
            .filter(|m| matches!(m, Mark::Known(_)))
            .count()
    }

    /// Forgets every sender's mark (each is learnt again at its sender's next lookup).
    pub fn forget_sent_marks(&self) {
        self.sent_marks().marks.clear();
    }

    fn sent_marks(&self) -> std::sync::MutexGuard<'_, SentMarks> {
        self.sent_marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sizes the dedup buckets this store creates from now on for records that live
    /// `dedup_ttl_secs` (0: forever, one bucket); [`MessageStore::open`] assumes 24 h. Buckets
    /// already on disk keep their width: a changed TTL only changes new ones.
    #[must_use]
    pub fn with_dedup_ttl_secs(mut self, dedup_ttl_secs: u64) -> Self {
        self.bucket_ids = bucket_ids(dedup_ttl_secs);
        self
    }

    /// Stores `inserts` and deletes `deletes` (`(recipient, id)`) in ONE atomic write batch, then
    /// fsyncs the journal if `durable`. The id floor is raised to the highest inserted id in the
    /// same batch. With `durable` and nothing to write, only the fsync happens (it makes earlier
    /// non-durable writes durable).
    pub fn commit(
        &self,
        inserts: &[StoredMsg],
        deletes: &[(Vec<u8>, u64)],
        durable: bool,
    ) -> Result<(), CoreError> {
        self.write(
            &Batch {
                inserts,
                deletes,
                ..Batch::default()
            },
            durable,
        )
    }

    /// Writes everything in `batch` as one atomic fjall batch, then fsyncs if `durable`.
    ///
    /// Inputs are validated first: if any user name or sender is too long for the layout,
    /// nothing is written and [`CoreError::InvalidInput`] is returned.
    pub fn write(&self, batch: &Batch<'_>, durable: bool) -> Result<(), CoreError> {
        #[cfg(test)]
        if fault::take(&self.dir) {
            return Err(CoreError::Io(std::io::Error::other(
                "injected write failure",
            )));
        }
        for m in batch.inserts {
            check_user(&m.recipient)?;
            if m.sender.len() > MAX_SENDER_LEN {
                return Err(CoreError::InvalidInput(format!(
                    "sender of {} bytes (max {MAX_SENDER_LEN})",
                    m.sender.len()
                )));
            }
        }
        for (user, _) in batch.deletes {
            check_user(user)?;
        }
        for (user, _) in batch.prekeys {
            check_user(user)?;
        }
        for r in batch.sent.iter().chain(batch.sent_expired) {
            check_sender(&r.sender)?;
        }

        let floor = self.id_floor();
        if !batch.is_empty() || batch.id_hint > floor {
            let new_floor = batch
                .inserts
                .iter()
                .map(|m| m.id)
                .chain(std::iter::once(batch.id_hint))
                .fold(floor, u64::max);

            let mut wb = self.db.batch();
            for m in batch.inserts {
                wb.insert(&self.inbox, inbox_key(&m.recipient, m.id), encode_value(m));
            }
            for (user, id) in batch.deletes {
                wb.remove(&self.inbox, inbox_key(user, *id));
            }
            for (user, bundle) in batch.prekeys {
                wb.insert(&self.prekeys, user.as_slice(), bundle.as_slice());
            }
            for r in batch.sent_expired {
                wb.remove(&self.sent_by_id, sent_index_key(r));
                let key = sent_key(&r.sender, r.client);
                // Single writer: nothing can change the record between this read and the commit.
                let names_it = self
                    .sent
                    .get(&key)?
                    .is_some_and(|v| decode_sent_value(&v).is_none_or(|id| id == r.id));
                if names_it {
                    wb.remove(&self.sent, key);
                }
            }
            for r in batch.sent {
                let bucket = self.bucket_for(r.id)?;
                wb.insert(&bucket, sent_key(&r.sender, r.client), sent_value(r.id));
            }
            if new_floor > floor {
                wb.insert(&self.meta, ID_FLOOR_KEY, new_floor.to_be_bytes());
            }
            if batch.sent.is_empty() {
                wb.commit()?;
            } else {
                // Held across the commit: no lookup sees these records without the marks
                // raised, or learns a mark from before them after it.
                let mut marks = self.sent_marks();
                wb.commit()?;
                for r in batch.sent {
                    if let Some(Mark::Known(mark)) = marks.marks.get_mut(r.sender.as_slice()) {
                        *mark = Some(mark.map_or(r.client, |m| m.max(r.client)));
                    }
                }
            }
            self.id_floor.fetch_max(new_floor, Ordering::Relaxed);
        }
        if durable {
            self.db.persist(PersistMode::SyncAll)?;
        }
        Ok(())
    }

    /// Up to `limit` of `user`'s stored messages with an id greater than `after`, as
    /// `(id, payload)` in id order. Corrupt entries are logged, counted and skipped (they do
    /// not count towards `limit`).
    pub fn scan(
        &self,
        user: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, CoreError> {
        check_user(user)?;
        let mut out = Vec::new();
        if limit == 0 || after == u64::MAX {
            return Ok(out);
        }
        let start = inbox_key(user, after + 1);
        let end = inbox_key(user, u64::MAX);
        for guard in self.inbox.range(start..=end) {
            let (key, value) = guard.into_inner()?;
            match decode_entry(user.len(), &key, &value) {
                Ok((id, payload)) => {
                    out.push((id, payload.to_vec()));
                    if out.len() == limit {
                        break;
                    }
                }
                Err(e) => self.report_corrupt(user, &e),
            }
        }
        Ok(out)
    }

    /// Like [`MessageStore::scan`], as the [`DrainedMsg`]s of a drain reply (with the sender).
    /// Corrupt entries are logged, counted and skipped.
    pub fn scan_drained(
        &self,
        user: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<Vec<DrainedMsg>, CoreError> {
        check_user(user)?;
        #[cfg(test)]
        if fault::take_read(&self.dir) {
            return Err(CoreError::Io(std::io::Error::other(
                "injected read failure",
            )));
        }
        let mut out = Vec::new();
        if limit == 0 || after == u64::MAX {
            return Ok(out);
        }
        let start = inbox_key(user, after + 1);
        let end = inbox_key(user, u64::MAX);
        for guard in self.inbox.range(start..=end) {
            let (key, value) = guard.into_inner()?;
            let decoded = decode_entry(user.len(), &key, &value).and_then(|(id, _)| {
                decode_value(&value)
                    .map(|v| DrainedMsg {
                        id,
                        sender: v.sender.to_vec(),
                        payload: v.payload.to_vec(),
                        kind: v.kind,
                    })
                    .map_err(|detail| CoreError::corrupt("inbox value", detail))
            });
            match decoded {
                Ok(m) => {
                    out.push(m);
                    if out.len() == limit {
                        break;
                    }
                }
                Err(e) => self.report_corrupt(user, &e),
            }
        }
        Ok(out)
    }

    /// The id of the message `sender` first sent with client message id `client`, if its
    /// dedup record is stored (durable once a durable commit wrote it). A corrupt record is
    /// logged, counted and read as absent.
    pub fn sent_id(&self, sender: &[u8], client: u64) -> Result<Option<u64>, CoreError> {
        check_sender(sender)?;
        match self.sent_mark(sender, client)? {
            Some(None) => return Ok(None),
            Some(Some(max)) if client > max => return Ok(None),
            _ => {}
        }
        let key = sent_key(sender, client);
        // The newest bucket first, the records of older builds last.
        let buckets = self.buckets();
        let newest_first = buckets.iter().rev().map(|b| &b.keyspace);
        let mut found = None;
        for keyspace in newest_first.chain(std::iter::once(&self.sent)) {
            found = keyspace.get(&key)?;
            if found.is_some() {
                break;
            }
        }
        let Some(v) = found else {
            return Ok(None);
        };
        match decode_sent_value(&v) {
            Some(id) => Ok(Some(id)),
            None => {
                let e = CoreError::corrupt("sent value", format!("{} bytes", v.len()));
                self.report_corrupt(sender, &e);
                Ok(None)
            }
        }
    }

    /// `sender`'s mark (`Some`: every record's client id is at most the inner value, `None`
    /// inside when it has none), counting this lookup and learning the mark at the
    /// `learn_after`th; `None` while it has none. Learnt under the lock: no write of this
    /// sender's records can come between the read and the mark.
    fn sent_mark(&self, sender: &[u8], client: u64) -> Result<Option<Option<u64>>, CoreError> {
        let mut marks = self.sent_marks();
        let seen = match marks.marks.get(sender).copied() {
            Some(Mark::Known(mark)) => return Ok(Some(mark)),
            Some(Mark::Counting(n)) => n + 1,
            None if marks.room() => 1,
            None => return Ok(None),
        };
        if seen < marks.learn_after {
            marks.marks.insert(sender.into(), Mark::Counting(seen));
            return Ok(None);
        }
        // Nothing at or above `client`: every record is below it, whatever they are.
        let mark = if self.any_sent_from(sender, client) {
            match self.highest_sent_client(sender) {
                Ok(mark) => mark,
                // A corrupt key: no mark, the lookup decides.
                Err(e @ CoreError::Corrupt { .. }) => {
                    self.report_corrupt(sender, &e);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        } else {
            client.checked_sub(1)
        };
        marks.marks.insert(sender.into(), Mark::Known(mark));
        Ok(Some(mark))
    }

    /// Whether any of `sender`'s dedup records has a client id of `client` or more: one forward
    /// read per bucket and of the records of older builds. A read error counts as "maybe".
    fn any_sent_from(&self, sender: &[u8], client: u64) -> bool {
        let from = sent_key(sender, client);
        let to = sent_key(sender, u64::MAX);
        let buckets = self.buckets();
        let keyspaces = buckets.iter().rev().map(|b| &b.keyspace);
        keyspaces
            .chain(std::iter::once(&self.sent))
            .any(|k| k.range(from.as_slice()..=to.as_slice()).next().is_some())
    }

    /// The highest client id among `sender`'s dedup records (`None`: it has none): the last
    /// key of its prefix in every bucket and in the records of older builds.
    fn highest_sent_client(&self, sender: &[u8]) -> Result<Option<u64>, CoreError> {
        let prefix = user_prefix(sender);
        let buckets = self.buckets();
        let keyspaces = buckets.iter().map(|b| &b.keyspace);
        let mut max = None;
        for keyspace in keyspaces.chain(std::iter::once(&self.sent)) {
            let Some(last) = keyspace.prefix(&prefix).next_back() else {
                continue;
            };
            let key = last.key()?;
            let client = key
                .strip_prefix(prefix.as_slice())
                .and_then(|c| <[u8; 8]>::try_from(c).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| CoreError::corrupt("sent key", format!("{} bytes", key.len())))?;
            max = max.max(Some(client));
        }
        Ok(max)
    }

    /// Deletes the dedup buckets whose every id is below `min_live_id` (minted more than the
    /// TTL ago; 0 deletes none), oldest first, and returns about how many records they held
    /// (fjall's approximate count). Its caller is the store's single writer.
    pub fn drop_expired_sent(&self, min_live_id: u64) -> Result<u64, CoreError> {
        let mut dropped = 0u64;
        loop {
            let expired = {
                let buckets = self.buckets();
                match buckets.first() {
                    Some(b) if b.hi <= min_live_id => b.keyspace.clone(),
                    _ => return Ok(dropped),
                }
            };
            let records = expired.approximate_len() as u64;
            self.db.delete_keyspace(expired)?;
            self.buckets
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(0);
            dropped += records;
        }
    }

    /// Writes `records` the way builds before the dedup buckets did (`sent` and `sent_by_id`),
    /// durably: the tests of the upgrade path.
    #[cfg(test)]
    pub(crate) fn write_legacy_sent(&self, records: &[SentRecord]) -> Result<(), CoreError> {
        let mut wb = self.db.batch();
        for r in records {
            wb.insert(&self.sent, sent_key(&r.sender, r.client), sent_value(r.id));
            wb.insert(&self.sent_by_id, sent_index_key(r), b"");
        }
        wb.commit()?;
        self.db.persist(PersistMode::SyncAll)?;
        self.forget_sent_marks();
        Ok(())
    }

    /// The dedup buckets on disk, as `(lo, hi)` id ranges, oldest first.
    pub fn sent_buckets(&self) -> Vec<(u64, u64)> {
        self.buckets().iter().map(|b| (b.lo, b.hi)).collect()
    }

    fn buckets(&self) -> std::sync::RwLockReadGuard<'_, Vec<SentBucket>> {
        self.buckets.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bucket that holds `id`'s record: an existing one whose range holds it (whatever its
    /// width), else a new one of this store's width, aligned on it.
    fn bucket_for(&self, id: u64) -> Result<Keyspace, CoreError> {
        if let Some(b) = self
            .buckets()
            .iter()
            .rev()
            .find(|b| b.lo <= id && id < b.hi)
        {
            return Ok(b.keyspace.clone());
        }
        let (lo, hi) = if self.bucket_ids == u64::MAX {
            (0, u64::MAX)
        } else {
            let lo = id - id % self.bucket_ids;
            (lo, lo.saturating_add(self.bucket_ids))
        };
        let keyspace = self
            .db
            .keyspace(&bucket_name(lo, hi), KeyspaceCreateOptions::default)?;
        let mut buckets = self.buckets.write().unwrap_or_else(PoisonError::into_inner);
        close_buckets_before(&buckets, lo);
        buckets.push(SentBucket {
            lo,
            hi,
            keyspace: keyspace.clone(),
        });
        buckets.sort_by_key(|b| b.lo);
        debug!(lo, hi, "dedup bucket created");
        Ok(keyspace)
    }

    /// One bounded turn of the expiry of the dedup records older builds wrote (the `sent` and
    /// `sent_by_id` keyspaces): starting at time-index key `from` (empty = the beginning), up
    /// to `budget` records minted before `min_live_id`, oldest first, with the key to continue
    /// from (`None`: no more expired records after these).
    pub fn expired_sent(
        &self,
        from: &[u8],
        min_live_id: u64,
        budget: usize,
    ) -> Result<(Vec<SentRecord>, Option<Vec<u8>>), CoreError> {
        let mut out = Vec::new();
        if min_live_id == 0 || budget == 0 {
            return Ok((out, None));
        }
        let end = min_live_id.to_be_bytes().to_vec();
        if from >= end.as_slice() {
            return Ok((out, None));
        }
        for guard in self.sent_by_id.range(from.to_vec()..end) {
            let key = guard.key()?;
            match split_sent_index_key(&key) {
                Some(r) => out.push(r),
                None => {
                    let e = CoreError::corrupt("sent_by_id key", format!("{} bytes", key.len()));
                    self.report_corrupt(b"", &e);
                }
            }
            if out.len() >= budget {
                let mut next = key.to_vec();
                next.push(0); // the next key after this one
                return Ok((out, Some(next)));
            }
        }
        Ok((out, None))
    }

    /// Like [`MessageStore::scan`], with the sender: up to `limit` of `user`'s stored messages
    /// with an id greater than `after`, in id order, as [`StoredMsg`]s (the cluster core's drain
    /// answers carry the sender). Corrupt entries are logged, counted and skipped.
    pub fn scan_messages(
        &self,
        user: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMsg>, CoreError> {
        check_user(user)?;
        let mut out = Vec::new();
        if limit == 0 || after == u64::MAX {
            return Ok(out);
        }
        let start = inbox_key(user, after + 1);
        let end = inbox_key(user, u64::MAX);
        for guard in self.inbox.range(start..=end) {
            let (key, value) = guard.into_inner()?;
            let decoded = decode_entry(user.len(), &key, &value).and_then(|(id, _)| {
                decode_value(&value)
                    .map(|v| (id, v))
                    .map_err(|detail| CoreError::corrupt("inbox value", detail))
            });
            match decoded {
                Ok((id, v)) => {
                    out.push(StoredMsg {
                        id,
                        recipient: user.to_vec(),
                        sender: v.sender.to_vec(),
                        payload: v.payload.to_vec(),
                        kind: v.kind,
                    });
                    if out.len() == limit {
                        break;
                    }
                }
                Err(e) => self.report_corrupt(user, &e),
            }
        }
        Ok(out)
    }

    /// Number of messages stored for `user` (walks the whole inbox range; for tests and tools).
    pub fn count(&self, user: &[u8]) -> Result<usize, CoreError> {
        check_user(user)?;
        let mut n = 0;
        for guard in self.inbox.prefix(user_prefix(user)) {
            guard.key()?;
            n += 1;
        }
        Ok(n)
    }

    /// Payload bytes of `user`'s stored message `id`, or `None` when it is not stored: one point
    /// lookup (bloom filters make a miss cheap), no write. A corrupt value counts as 0 bytes.
    pub fn payload_len(&self, user: &[u8], id: u64) -> Result<Option<u64>, CoreError> {
        check_user(user)?;
        Ok(self
            .inbox
            .get(inbox_key(user, id))?
            .map(|v| decode_value(&v).map_or(0, |v| v.payload.len() as u64)))
    }

    /// How many messages `user` has stored and their payload bytes: one walk of the user's key
    /// range (the embedded core calls it once per user and then keeps the count in memory).
    pub fn usage(&self, user: &[u8]) -> Result<Usage, CoreError> {
        check_user(user)?;
        let mut u = Usage::default();
        for guard in self.inbox.prefix(user_prefix(user)) {
            let (_, value) = guard.into_inner()?;
            u.messages += 1;
            u.payload_bytes += decode_value(&value).map_or(0, |v| v.payload.len() as u64);
        }
        Ok(u)
    }

    /// Up to `limit` of `user`'s stored messages with an id below `min_live_id` (expired), as
    /// `(id, payload bytes)` in id order.
    pub fn expired(
        &self,
        user: &[u8],
        min_live_id: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>, CoreError> {
        check_user(user)?;
        let mut out = Vec::new();
        if limit == 0 || min_live_id == 0 {
            return Ok(out);
        }
        for guard in self
            .inbox
            .range(inbox_key(user, 0)..inbox_key(user, min_live_id))
        {
            let (key, value) = guard.into_inner()?;
            if let Some((_, id)) = split_key(&key) {
                out.push((
                    id,
                    decode_value(&value).map_or(0, |v| v.payload.len() as u64),
                ));
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// One bounded turn of the expiry sweep over every inbox: starting at key `from` (empty =
    /// the beginning), looks at no more than `budget` entries and returns the expired ones (id
    /// below `min_live_id`) with the key to continue from (`None`: the pass reached the end).
    /// Ids are time-ordered within a user, so the first live message of a user ends that user:
    /// the sweep seeks to the next user, and a pass costs about one step per user plus one per
    /// expired message.
    pub fn sweep_expired(
        &self,
        from: &[u8],
        min_live_id: u64,
        budget: usize,
    ) -> Result<SweepTurn, CoreError> {
        let mut turn = SweepTurn::default();
        let mut start = from.to_vec();
        let mut examined = 0usize;
        loop {
            let mut next_user = None;
            for guard in self.inbox.range(start.clone()..) {
                let (key, value) = guard.into_inner()?;
                examined += 1;
                match split_key(&key) {
                    Some((user, id)) if id < min_live_id => turn.expired.push((
                        user.to_vec(),
                        id,
                        decode_value(&value).map_or(0, |v| v.payload.len() as u64),
                    )),
                    Some((user, _)) => {
                        let mut k = inbox_key(user, u64::MAX);
                        k.push(0);
                        next_user = Some(k);
                        break;
                    }
                    None => {} // not an inbox key of this layout: skip it
                }
                if examined >= budget {
                    let mut k = key.to_vec();
                    k.push(0); // the next key after this one
                    turn.next = Some(k);
                    return Ok(turn);
                }
            }
            match next_user {
                None => return Ok(turn),
                Some(k) if examined >= budget => {
                    turn.next = Some(k);
                    return Ok(turn);
                }
                Some(k) => start = k,
            }
        }
    }

    /// Stores (replaces) `user`'s prekey bundle in its own batch (not fsynced; a later durable
    /// commit makes it durable).
    pub fn put_prekeys(&self, user: &[u8], bundle: &[u8]) -> Result<(), CoreError> {
        let prekeys = [(user.to_vec(), bundle.to_vec())];
        self.write(
            &Batch {
                prekeys: &prekeys,
                ..Batch::default()
            },
            false,
        )
    }

    /// Deletes `user`'s prekey bundle (absent: harmless), fsynced when `durable` (a rehome
    /// deletes it once the new home's bus acknowledged the copy).
    pub fn delete_prekeys(&self, user: &[u8], durable: bool) -> Result<(), CoreError> {
        check_user(user)?;
        self.prekeys.remove(user)?;
        if durable {
            self.db.persist(PersistMode::SyncAll)?;
        }
        Ok(())
    }

    /// `user`'s prekey bundle, if one is stored.
    pub fn get_prekeys(&self, user: &[u8]) -> Result<Option<Vec<u8>>, CoreError> {
        check_user(user)?;
        Ok(self.prekeys.get(user)?.map(|v| v.to_vec()))
    }

    /// Fsyncs everything written so far.
    pub fn sync(&self) -> Result<(), CoreError> {
        self.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// The highest message id ever committed (or passed as [`Batch::id_hint`]); 0 for a new
    /// store.
    pub fn id_floor(&self) -> u64 {
        self.id_floor.load(Ordering::Relaxed)
    }

    /// How many corrupt inbox entries scans have skipped since open.
    pub fn corrupt_skipped(&self) -> u64 {
        self.corrupt_skipped.load(Ordering::Relaxed)
    }

    fn report_corrupt(&self, user: &[u8], e: &CoreError) {
        self.corrupt_skipped.fetch_add(1, Ordering::Relaxed);
        error!(user = %String::from_utf8_lossy(user), error = %e, "skipping corrupt inbox entry");
    }

    /// Writes a raw inbox value (tests only: to plant corrupt data).
    #[cfg(test)]
    pub(crate) fn put_raw_inbox(
        &self,
        user: &[u8],
        id: u64,
        value: &[u8],
    ) -> Result<(), CoreError> {
        self.inbox.insert(inbox_key(user, id), value)?;
        Ok(())
    }
}

/// Test-only fault injection: make the next writes (or drain reads) of the store in a
/// directory fail.
#[cfg(test)]
pub(crate) mod fault {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static FAILURES: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());
    static READ_FAILURES: Mutex<Vec<(PathBuf, u32)>> = Mutex::new(Vec::new());

    /// The next `n` writes of the store opened at `dir` fail with an I/O error.
    pub(crate) fn fail_next_writes(dir: &Path, n: u32) {
        arm(&FAILURES, dir, n);
    }

    /// The next `n` drain reads ([`super::MessageStore::scan_drained`]) of the store opened at
    /// `dir` fail with an I/O error.
    pub(crate) fn fail_next_drain_reads(dir: &Path, n: u32) {
        arm(&READ_FAILURES, dir, n);
    }

    fn arm(list: &Mutex<Vec<(PathBuf, u32)>>, dir: &Path, n: u32) {
        let mut f = list.lock().unwrap_or_else(|e| e.into_inner());
        f.retain(|(d, _)| d != dir);
        f.push((dir.to_path_buf(), n));
    }

    /// Consumes one injected write failure for `dir`, if any is left.
    pub(crate) fn take(dir: &Path) -> bool {
        take_from(&FAILURES, dir)
    }

    /// Consumes one injected drain read failure for `dir`, if any is left.
    pub(crate) fn take_read(dir: &Path) -> bool {
        take_from(&READ_FAILURES, dir)
    }

    fn take_from(list: &Mutex<Vec<(PathBuf, u32)>>, dir: &Path) -> bool {
        let mut f = list.lock().unwrap_or_else(|e| e.into_inner());
        match f.iter_mut().find(|(d, n)| d == dir && *n > 0) {
            Some((_, n)) => {
                *n -= 1;
                true
            }
            None => false,
        }
    }
}

fn check_sender(sender: &[u8]) -> Result<(), CoreError> {
    if sender.len() > MAX_SENDER_LEN {
        return Err(CoreError::InvalidInput(format!(
            "sender of {} bytes (max {MAX_SENDER_LEN})",
            sender.len()
        )));
    }
    Ok(())
}

/// `u16 BE len(sender) | sender | u64 BE client`; callers have checked the length.
fn sent_key(sender: &[u8], client: u64) -> Vec<u8> {
    let mut k = user_prefix(sender);
    k.extend_from_slice(&client.to_be_bytes());
    k
}

/// `u8 version | u64 BE id`.
fn sent_value(id: u64) -> [u8; 9] {
    let mut v = [SENT_VERSION; 9];
    v[1..].copy_from_slice(&id.to_be_bytes());
    v
}

/// The id of a `sent` value; `None` if it is corrupt.
fn decode_sent_value(v: &[u8]) -> Option<u64> {
    match v.split_first() {
        Some((&SENT_VERSION, id)) => id.try_into().ok().map(u64::from_be_bytes),
        _ => None,
    }
}

/// Flushes the memtables of the buckets that end at or before `lo` (older than a new bucket
/// there: nothing but a straggler is written to them any more). A send with a new client id
/// reads every bucket; a bucket in a memtable costs a skip-list search, one on disk mostly a
/// bloom filter's answer (BENCHMARKS.md, "2026-12-07 (day)"). fjall flushes in the background;
/// a failure leaves the records where they were, readable, and is only logged.
fn close_buckets_before(buckets: &[SentBucket], lo: u64) {
    for b in buckets.iter().filter(|b| b.hi <= lo) {
        // `rotate_memtable` is fjall's own (hidden from its docs, used by its tests and its
        // journal): seal the active memtable and queue its flush.
        if let Err(e) = b.keyspace.rotate_memtable() {
            debug!(lo = b.lo, hi = b.hi, error = %e, "dedup bucket flush not queued");
        }
    }
}

/// Width of a dedup bucket, in ids, for records that live `ttl_secs` (0: forever, one bucket
/// for all ids, `u64::MAX`): an eighth of the TTL, at least a second.
fn bucket_ids(ttl_secs: u64) -> u64 {
    use iris_bus::hops::{ID_LOW_BITS, ID_TICK_MICROS};
    if ttl_secs == 0 {
        return u64::MAX;
    }
    let secs = (ttl_secs / BUCKETS_PER_TTL).max(1);
    let ticks = secs.saturating_mul(1_000_000) / ID_TICK_MICROS;
    if ticks > u64::MAX >> ID_LOW_BITS {
        u64::MAX
    } else {
        ticks << ID_LOW_BITS
    }
}

fn bucket_name(lo: u64, hi: u64) -> String {
    format!("{BUCKET_PREFIX}{lo:016x}.{hi:016x}")
}

/// `(lo, hi)` of a bucket's keyspace name; `None` for any other keyspace.
fn parse_bucket_name(name: &str) -> Option<(u64, u64)> {
    let (lo, hi) = name.strip_prefix(BUCKET_PREFIX)?.split_once('.')?;
    if lo.len() != 16 || hi.len() != 16 {
        return None;
    }
    let lo = u64::from_str_radix(lo, 16).ok()?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    (lo < hi).then_some((lo, hi))
}

/// `u64 BE id | u16 BE len(sender) | sender | u64 BE client`; callers have checked the length.
fn sent_index_key(r: &SentRecord) -> Vec<u8> {
    let mut k = Vec::with_capacity(18 + r.sender.len());
    k.extend_from_slice(&r.id.to_be_bytes());
    k.extend_from_slice(&sent_key(&r.sender, r.client));
    k
}

/// Splits a `sent_by_id` key; `None` for a key of another layout.
fn split_sent_index_key(key: &[u8]) -> Option<SentRecord> {
    let id = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
    let (sender, client) = split_key(key.get(8..)?)?;
    Some(SentRecord {
        sender: sender.to_vec(),
        client,
        id,
    })
}

fn check_user(user: &[u8]) -> Result<(), CoreError> {
    if user.len() > MAX_USER_LEN {
        return Err(CoreError::InvalidInput(format!(
            "user name of {} bytes (max {MAX_USER_LEN})",
            user.len()
        )));
    }
    Ok(())
}

/// `u16 BE len(user) | user`; callers have checked the length.
fn user_prefix(user: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + KEY_OVERHEAD);
    k.extend_from_slice(&(user.len() as u16).to_be_bytes());
    k.extend_from_slice(user);
    k
}

/// Splits an inbox key into `(user, id)`; `None` for a key of another layout.
fn split_key(key: &[u8]) -> Option<(&[u8], u64)> {
    let len = usize::from(u16::from_be_bytes(key.get(..2)?.try_into().ok()?));
    let user = key.get(2..2 + len)?;
    let id: [u8; 8] = key.get(2 + len..)?.try_into().ok()?;
    Some((user, u64::from_be_bytes(id)))
}

/// `u16 BE len(user) | user | u64 BE id`; callers have checked the length.
fn inbox_key(user: &[u8], id: u64) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// `u8 version (2) | u8 kind | u16 BE len(sender) | sender | payload`; callers have checked
/// the length.
fn encode_value(m: &StoredMsg) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + m.sender.len() + m.payload.len());
    v.push(VALUE_VERSION);
    v.push(m.kind);
    v.extend_from_slice(&(m.sender.len() as u16).to_be_bytes());
    v.extend_from_slice(&m.sender);
    v.extend_from_slice(&m.payload);
    v
}

/// Decodes an inbox entry of a user whose name is `user_len` bytes: `(id, payload)`.
fn decode_entry<'v>(
    user_len: usize,
    key: &[u8],
    value: &'v [u8],
) -> Result<(u64, &'v [u8]), CoreError> {
    let id_bytes: [u8; 8] = key
        .get(2 + user_len..)
        .and_then(|rest| rest.try_into().ok())
        .ok_or_else(|| CoreError::corrupt("inbox key", format!("{} bytes", key.len())))?;
    let id = u64::from_be_bytes(id_bytes);
    let v = decode_value(value).map_err(|detail| CoreError::Corrupt {
        what: "inbox value",
        detail: format!("id {id}: {detail}"),
    })?;
    Ok((id, v.payload))
}

/// An inbox value, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Value<'v> {
    /// The message's v2 kind; [`KIND_UNRECORDED`] for a value of version 1.
    kind: u8,
    sender: &'v [u8],
    payload: &'v [u8],
}

/// Splits an inbox value of either version (see the module doc).
fn decode_value(v: &[u8]) -> Result<Value<'_>, String> {
    let (&version, rest) = v.split_first().ok_or("empty value")?;
    let (kind, rest) = match version {
        VALUE_VERSION => {
            let (&kind, rest) = rest.split_first().ok_or("truncated kind")?;
            (kind, rest)
        }
        VALUE_VERSION_NO_KIND => (KIND_UNRECORDED, rest),
        _ => return Err(format!("unknown version {version}")),
    };
    let len_bytes: [u8; 2] = rest
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated sender length")?;
    let slen = usize::from(u16::from_be_bytes(len_bytes));
    let body = &rest[2..];
    if body.len() < slen {
        return Err(format!(
            "sender length {slen} exceeds the {} bytes left",
            body.len()
        ));
    }
    let (sender, payload) = body.split_at(slen);
    Ok(Value {
        kind,
        sender,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(to: &str, id: u64, payload: &str) -> StoredMsg {
        StoredMsg {
            id,
            recipient: to.as_bytes().to_vec(),
            sender: b"sender".to_vec(),
            payload: payload.as_bytes().to_vec(),
            kind: 0,
        }
    }

    fn ids(v: &[(u64, Vec<u8>)]) -> Vec<u64> {
        v.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn value_roundtrip_and_corrupt_values_are_errors() {
        let mut m = msg("bob", 7, "hello");
        m.kind = 1;
        let v = encode_value(&m);
        assert_eq!(&v[..2], &[VALUE_VERSION, 1]);
        let want = Value {
            kind: 1,
            sender: b"sender",
            payload: b"hello",
        };
        assert_eq!(decode_value(&v), Ok(want));
        assert!(decode_value(&[]).is_err());
        assert!(decode_value(&[3, 0, 0, 0]).is_err(), "unknown version");
        assert!(decode_value(&[2]).is_err(), "no kind");
        assert!(decode_value(&[2, 1, 0]).is_err());
        assert!(decode_value(&[2, 1, 0, 9, b'a']).is_err());
        assert!(decode_value(&[1, 0]).is_err());
        assert!(decode_value(&[1, 0, 9, b'a']).is_err());
        let empty = |kind| Value {
            kind,
            sender: b"",
            payload: b"",
        };
        assert_eq!(decode_value(&[2, 2, 0, 0]), Ok(empty(2)));
        assert_eq!(decode_value(&[1, 0, 0]), Ok(empty(KIND_UNRECORDED)));
    }

    /// A store written by a build that kept no kind (inbox values of version 1) opens, scans
    /// and drains its messages unchanged, as kind [`KIND_UNRECORDED`], beside messages written
    /// by this build with their kind; acks and usage work on both.
    #[test]
    fn a_store_of_the_previous_value_layout_still_drains() {
        let dir = tempfile::tempdir().unwrap();
        // The previous build's value: `u8 version (1) | u16 len(sender) | sender | payload`.
        let old_value = |sender: &[u8], payload: &[u8]| {
            let mut v = vec![1u8];
            v.extend_from_slice(&(sender.len() as u16).to_be_bytes());
            v.extend_from_slice(sender);
            v.extend_from_slice(payload);
            v
        };
        {
            let s = MessageStore::open(dir.path()).unwrap();
            s.put_raw_inbox(b"bob", 10, &old_value(b"alice", b"\xa1\x61\x61\x01"))
                .unwrap();
            s.put_raw_inbox(b"bob", 20, &old_value(b"carol", b"plain"))
                .unwrap();
            s.sync().unwrap();
        }
        let s = MessageStore::open(dir.path()).unwrap();
        let mut new = msg("bob", 30, "{cbor}");
        new.kind = 1;
        s.commit(&[new], &[], true).unwrap();
        let got = s.scan_drained(b"bob", 0, 10).unwrap();
        let want = [
            (10, &b"alice"[..], &b"\xa1\x61\x61\x01"[..], KIND_UNRECORDED),
            (20, b"carol", b"plain", KIND_UNRECORDED),
            (30, b"sender", b"{cbor}", 1),
        ];
        assert_eq!(got.len(), want.len());
        for (m, (id, sender, payload, kind)) in got.iter().zip(want) {
            assert_eq!(
                (m.id, &m.sender[..], &m.payload[..], m.kind),
                (id, sender, payload, kind)
            );
        }
        assert_eq!(s.corrupt_skipped(), 0);
        let msgs = s.scan_messages(b"bob", 0, 10).unwrap();
        assert_eq!(
            msgs.iter().map(|m| m.kind).collect::<Vec<_>>(),
            [KIND_UNRECORDED, KIND_UNRECORDED, 1]
        );
        assert_eq!(
            s.usage(b"bob").unwrap(),
            Usage {
                messages: 3,
                payload_bytes: 4 + 5 + 6
            }
        );
        assert_eq!(s.payload_len(b"bob", 20).unwrap(), Some(5));
        s.commit(&[], &[(b"bob".to_vec(), 10)], true).unwrap();
        assert_eq!(ids(&s.scan(b"bob", 0, 10).unwrap()), vec![20, 30]);
    }

    /// Ids minted by several shards (low bits = shard) arrive interleaved and out of order;
    /// a scan returns them in id order, and user prefixes do not leak into each other.
    #[test]
    fn scan_is_in_id_order_across_interleaved_shards_and_users_are_prefix_free() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path()).unwrap();
        let mut all = Vec::new();
        // Three "shards" with their own increasing sequences, committed in shuffled batches.
        for round in 0..50u64 {
            let mut batch = Vec::new();
            for shard in [2u64, 0, 1] {
                let id = ((1000 + round * 3 + (2 - shard)) << 10) | shard;
                batch.push(msg("ab", id, &format!("{id}")));
                all.push(id);
            }
            batch.reverse();
            s.commit(&batch, &[], round.is_multiple_of(10)).unwrap();
        }
        // A user whose name extends "ab", and one that is a prefix of it.
        s.commit(&[msg("abc", 1, "x"), msg("a", u64::MAX, "y")], &[], true)
            .unwrap();
        all.sort_unstable();

        let got = s.scan(b"ab", 0, usize::MAX).unwrap();
        assert_eq!(ids(&got), all);
        for (id, p) in &got {
            assert_eq!(p, id.to_string().as_bytes());
        }
        assert_eq!(s.count(b"ab").unwrap(), 150);
        assert_eq!(s.count(b"abc").unwrap(), 1);
        assert_eq!(ids(&s.scan(b"a", 0, 10).unwrap()), vec![u64::MAX]);
        assert!(s.scan(b"a", u64::MAX, 10).unwrap().is_empty());
        assert_eq!(s.id_floor(), u64::MAX);

        // `after` and `limit`.
        let mid = all[70];
        assert_eq!(ids(&s.scan(b"ab", mid, 5).unwrap()), all[71..76].to_vec());
        assert!(s.scan(b"ab", 0, 0).unwrap().is_empty());
    }

    #[test]
    fn deletes_and_inserts_commit_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = MessageStore::open(dir.path()).unwrap();
            let ins: Vec<_> = (1..=10).map(|i| msg("u", i, "p")).collect();
            s.commit(&ins, &[], true).unwrap();
            s.commit(
                &[msg("u", 11, "p")],
                &[(b"u".to_vec(), 3), (b"u".to_vec(), 5)],
                true,
            )
            .unwrap();
            // Deleting something never stored is harmless.
            s.commit(&[], &[(b"nobody".to_vec(), 1)], true).unwrap();
            s.put_prekeys(b"u", b"\xa1\x01\x02").unwrap();
            s.commit(&[], &[], true).unwrap();
            assert_eq!(s.id_floor(), 11);
        }
        let s = MessageStore::open(dir.path()).unwrap();
        assert_eq!(
            ids(&s.scan(b"u", 0, 100).unwrap()),
            vec![1, 2, 4, 6, 7, 8, 9, 10, 11]
        );
        assert_eq!(s.id_floor(), 11);
        assert_eq!(s.get_prekeys(b"u").unwrap(), Some(b"\xa1\x01\x02".to_vec()));
        assert_eq!(s.get_prekeys(b"v").unwrap(), None);
    }

    #[test]
    fn id_hint_raises_the_floor_without_inserts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = MessageStore::open(dir.path()).unwrap();
            s.write(
                &Batch {
                    deletes: &[(b"u".to_vec(), 1)],
                    id_hint: 99,
                    ..Batch::default()
                },
                true,
            )
            .unwrap();
            // A lower id never lowers it.
            s.commit(&[msg("u", 5, "p")], &[], true).unwrap();
            assert_eq!(s.id_floor(), 99);
        }
        assert_eq!(MessageStore::open(dir.path()).unwrap().id_floor(), 99);
    }

    #[test]
    fn corrupt_values_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path()).unwrap();
        s.commit(
            &[msg("u", 1, "a"), msg("u", 3, "c"), msg("u", 5, "e")],
            &[],
            false,
        )
        .unwrap();
        s.put_raw_inbox(b"u", 2, &[9, 9]).unwrap();
        s.put_raw_inbox(b"u", 4, &[]).unwrap();
        let got = s.scan(b"u", 0, 2).unwrap();
        assert_eq!(
            ids(&got),
            vec![1, 3],
            "corrupt entries do not count towards the limit"
        );
        assert_eq!(ids(&s.scan(b"u", 0, 10).unwrap()), vec![1, 3, 5]);
        assert_eq!(s.corrupt_skipped(), 3);
    }

    /// The sweep finds exactly the expired entries of every user, in bounded turns that resume
    /// where the last one stopped, and skips a user's live messages.
    #[test]
    fn sweep_finds_expired_entries_in_bounded_turns() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path()).unwrap();
        let mut all = Vec::new();
        for u in 0..20 {
            let user = format!("u{u:02}");
            for id in 1..=10u64 {
                // ids below 100 are "expired", 1000+ live.
                all.push(msg(&user, id, "pp"));
                all.push(msg(&user, 1000 + id, "p"));
            }
        }
        s.commit(&all, &[], true).unwrap();
        assert_eq!(
            s.usage(b"u03").unwrap(),
            Usage {
                messages: 20,
                payload_bytes: 30
            }
        );
        assert_eq!(s.payload_len(b"u03", 1001).unwrap(), Some(1));
        assert_eq!(s.payload_len(b"u03", 999).unwrap(), None);
        assert_eq!(
            s.expired(b"u03", 100, 3).unwrap(),
            vec![(1, 2), (2, 2), (3, 2)]
        );
        let mut found = Vec::new();
        let mut cursor = Vec::new();
        let mut turns = 0;
        loop {
            turns += 1;
            let t = s.sweep_expired(&cursor, 100, 7).unwrap();
            assert!(t.expired.len() <= 7);
            found.extend(t.expired);
            match t.next {
                Some(k) => cursor = k,
                None => break,
            }
        }
        assert_eq!(found.len(), 200);
        assert!(found.iter().all(|(_, id, len)| *id < 100 && *len == 2));
        // 200 expired + one live entry per user, 7 per turn: no walk over the live ones.
        assert!(turns <= 220 / 7 + 2, "{turns} turns");
    }

    #[test]
    fn oversized_names_are_rejected_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path()).unwrap();
        let long = "x".repeat(MAX_USER_LEN + 1);
        let err = s
            .commit(&[msg("ok", 1, "p"), msg(&long, 2, "p")], &[], true)
            .unwrap_err();
        assert!(matches!(err, CoreError::InvalidInput(_)), "{err}");
        assert_eq!(
            s.count(b"ok").unwrap(),
            0,
            "nothing of a rejected batch is written"
        );
        let mut m = msg("ok", 3, "p");
        m.sender = vec![0; MAX_SENDER_LEN + 1];
        assert!(matches!(
            s.commit(&[m], &[], false),
            Err(CoreError::InvalidInput(_))
        ));
        assert_eq!(s.id_floor(), 0);
    }

    use super::test_record as rec;

    /// Writes a durable batch of dedup records alone.
    fn write_sent(s: &MessageStore, sent: &[SentRecord]) {
        let batch = Batch {
            sent,
            ..Batch::default()
        };
        s.write(&batch, true).unwrap();
    }

    /// Dedup records commit with their batch into time buckets of the store's width, survive
    /// a reopen and keep senders apart; the newest record of a client id wins; a bucket goes
    /// whole, once its last id is expired, and only then.
    #[test]
    fn dedup_buckets_hold_records_and_expire_whole() {
        let dir = tempfile::tempdir().unwrap();
        let w = bucket_ids(8);
        assert_eq!(
            w,
            (1_000_000 / 16) << 18,
            "8 s of TTL: buckets of 1 s of ids"
        );
        {
            let s = MessageStore::open(dir.path())
                .unwrap()
                .with_dedup_ttl_secs(8);
            let sent = [
                rec("sam", 1, 10 * w + 1),
                rec("sam", 2, 10 * w + 2),
                rec("sa", 1, 11 * w),
                rec("samuel", 1, 12 * w + 7),
            ];
            s.write(
                &Batch {
                    inserts: &[msg("ruth", 10 * w + 1, "p")],
                    sent: &sent,
                    ..Batch::default()
                },
                true,
            )
            .unwrap();
            let want = vec![(10 * w, 11 * w), (11 * w, 12 * w), (12 * w, 13 * w)];
            assert_eq!(s.sent_buckets(), want);
        }
        // Reopened with the default width (3 h): the buckets on disk keep theirs.
        let s = MessageStore::open(dir.path()).unwrap();
        assert_eq!(s.sent_buckets().len(), 3);
        assert_eq!(s.sent_id(b"sam", 1).unwrap(), Some(10 * w + 1));
        assert_eq!(s.sent_id(b"sam", 2).unwrap(), Some(10 * w + 2));
        assert_eq!(s.sent_id(b"sa", 1).unwrap(), Some(11 * w));
        assert_eq!(s.sent_id(b"samuel", 1).unwrap(), Some(12 * w + 7));
        assert_eq!(s.sent_id(b"sam", 3).unwrap(), None);
        assert_eq!(s.sent_id(b"sa", 2).unwrap(), None);
        // An id inside an existing bucket goes into it; a later record of a client id (sent
        // again after its TTL) is the one read.
        write_sent(
            &s,
            &[rec("sam", 3, 11 * w + 9), rec("samuel", 1, 12 * w + 9)],
        );
        assert_eq!(s.sent_buckets().len(), 3);
        assert_eq!(s.sent_id(b"sam", 3).unwrap(), Some(11 * w + 9));
        assert_eq!(s.sent_id(b"samuel", 1).unwrap(), Some(12 * w + 9));
        write_sent(&s, &[rec("sam", 1, 12 * w + 1)]);
        assert_eq!(s.sent_id(b"sam", 1).unwrap(), Some(12 * w + 1));

        // Nothing goes while any id of the oldest bucket is alive; 0 = no expiry.
        assert_eq!(s.drop_expired_sent(0).unwrap(), 0);
        assert_eq!(s.drop_expired_sent(11 * w - 1).unwrap(), 0);
        assert_eq!(s.sent_buckets().len(), 3);
        assert_eq!(
            s.drop_expired_sent(12 * w).unwrap(),
            4,
            "sam 1, 2, 3 and sa 1"
        );
        assert_eq!(s.sent_buckets(), vec![(12 * w, 13 * w)]);
        assert_eq!(s.sent_id(b"sam", 2).unwrap(), None);
        assert_eq!(s.sent_id(b"sa", 1).unwrap(), None);
        assert_eq!(s.sent_id(b"sam", 1).unwrap(), Some(12 * w + 1));
        drop(s);
        let s = MessageStore::open(dir.path()).unwrap();
        assert_eq!(s.sent_buckets(), vec![(12 * w, 13 * w)]);
        assert_eq!(s.sent_id(b"sam", 3).unwrap(), None);
        assert_eq!(s.sent_id(b"samuel", 1).unwrap(), Some(12 * w + 9));
        assert_eq!(
            s.count(b"ruth").unwrap(),
            1,
            "messages are not dedup records"
        );
    }

    /// The highest recorded client id a sender's lookups stop at follows every write (a mark
    /// learnt as "no records", a mark raised by a later record), is learnt again after it was
    /// forgotten or the store reopened, spans every bucket and the records of older builds.
    #[test]
    fn the_highest_client_id_mark_follows_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let w = bucket_ids(8);
        {
            let s = MessageStore::open(dir.path())
                .unwrap()
                .with_dedup_ttl_secs(8)
                .with_sent_marks(2, 1);
            assert_eq!(
                s.sent_id(b"ann", 5).unwrap(),
                None,
                "no records: mark learnt"
            );
            write_sent(&s, &[rec("ann", 3, 10 * w + 1)]);
            assert_eq!(
                s.sent_id(b"ann", 3).unwrap(),
                Some(10 * w + 1),
                "below no mark"
            );
            assert_eq!(s.sent_id(b"ann", 4).unwrap(), None);
            write_sent(&s, &[rec("ann", 10, 10 * w + 2)]);
            assert_eq!(
                s.sent_id(b"ann", 10).unwrap(),
                Some(10 * w + 2),
                "mark raised"
            );
            assert_eq!(s.sent_id(b"ann", 9).unwrap(), None);
            assert_eq!(s.sent_id(b"ann", 3).unwrap(), Some(10 * w + 1));
            // A table of two is full with `bob`: `cat` gets no mark, its lookups read.
            assert_eq!(s.sent_id(b"bob", 1).unwrap(), None);
            write_sent(&s, &[rec("cat", 1, 10 * w + 3), rec("ann", 11, 10 * w + 3)]);
            assert_eq!(s.sent_marks_known(), 2);
            assert_eq!(s.sent_id(b"cat", 1).unwrap(), Some(10 * w + 3), "no mark");
            assert_eq!(s.sent_id(b"cat", 2).unwrap(), None);
            assert_eq!(s.sent_marks_known(), 2);
            assert_eq!(s.sent_id(b"ann", 11).unwrap(), Some(10 * w + 3));
            // Forgotten: learnt again, from the records.
            s.forget_sent_marks();
            assert_eq!(s.sent_id(b"ann", 12).unwrap(), None);
            assert_eq!(
                s.sent_id(b"ann", 11).unwrap(),
                Some(10 * w + 3),
                "learnt again"
            );
            assert_eq!(s.sent_id(b"ann", 3).unwrap(), Some(10 * w + 1));
            // The highest record in an older bucket than the newest one of the sender.
            write_sent(&s, &[rec("dan", 50, 10 * w + 4), rec("dan", 7, 11 * w + 1)]);
            assert_eq!(s.sent_buckets().len(), 2);
        }
        let s = MessageStore::open(dir.path())
            .unwrap()
            .with_sent_marks(16, 1);
        assert_eq!(s.sent_id(b"dan", 30).unwrap(), None);
        assert_eq!(
            s.sent_id(b"dan", 50).unwrap(),
            Some(10 * w + 4),
            "older bucket's max"
        );
        assert_eq!(s.sent_id(b"dan", 7).unwrap(), Some(11 * w + 1));
        assert_eq!(s.sent_id(b"dan", 51).unwrap(), None);
        assert_eq!(s.sent_id(b"ann", 11).unwrap(), Some(10 * w + 3), "reopened");
        assert_eq!(s.sent_id(b"ann", 12).unwrap(), None);
        // Records of older builds count too.
        s.write_legacy_sent(&[rec("ann", 20, 9 * w)]).unwrap();
        assert_eq!(s.sent_id(b"ann", 20).unwrap(), Some(9 * w));
        drop(s);
        let s = MessageStore::open(dir.path())
            .unwrap()
            .with_sent_marks(16, 1);
        assert_eq!(
            s.sent_id(b"ann", 20).unwrap(),
            Some(9 * w),
            "legacy, reopened"
        );
        assert_eq!(s.sent_id(b"ann", 21).unwrap(), None);
    }

    /// A sender's mark is learnt at its `learn_after`th lookup, not before; a record written
    /// while it was counting is found after.
    #[test]
    fn a_mark_is_learnt_after_enough_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path())
            .unwrap()
            .with_sent_marks(16, 3);
        write_sent(&s, &[rec("fay", 1, 1)]);
        assert_eq!(s.sent_id(b"fay", 2).unwrap(), None);
        write_sent(&s, &[rec("fay", 2, 2)]);
        assert_eq!(s.sent_id(b"fay", 2).unwrap(), Some(2));
        assert_eq!(s.sent_marks_known(), 0, "two lookups: counting");
        write_sent(&s, &[rec("fay", 5, 3)]);
        assert_eq!(s.sent_id(b"fay", 3).unwrap(), None);
        assert_eq!(s.sent_marks_known(), 1, "the third learns");
        assert_eq!(s.sent_id(b"fay", 5).unwrap(), Some(3), "the highest record");
        assert_eq!(s.sent_id(b"fay", 6).unwrap(), None);
        write_sent(&s, &[rec("fay", 6, 4)]);
        assert_eq!(s.sent_id(b"fay", 6).unwrap(), Some(4));
        // With no room at all, no mark, every lookup reads.
        let s = MessageStore::open(dir.path().join("none"))
            .unwrap()
            .with_sent_marks(0, 1);
        assert_eq!(s.sent_id(b"gus", 1).unwrap(), None);
        assert_eq!(s.sent_marks_known(), 0);
    }

    /// A lookup on another thread finds every record whose write returned before it began,
    /// while the writer keeps raising the mark.
    #[test]
    fn lookups_beside_the_writer_find_every_written_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(
            MessageStore::open(dir.path())
                .unwrap()
                .with_sent_marks(16, 1),
        );
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let writer = {
            let (s, written) = (s.clone(), written.clone());
            std::thread::spawn(move || {
                for client in 1..=3000u64 {
                    let sent = [rec("eve", client, client)];
                    let batch = Batch {
                        sent: &sent,
                        ..Batch::default()
                    };
                    s.write(&batch, false).unwrap();
                    written.store(client, Ordering::Release);
                }
            })
        };
        let mut checked = 0u64;
        while !writer.is_finished() || checked < 3000 {
            let c = written.load(Ordering::Acquire);
            if c > 0 {
                assert_eq!(s.sent_id(b"eve", c).unwrap(), Some(c), "client {c}");
                checked = c;
            }
            if writer.is_finished() && c == 3000 {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(s.sent_id(b"eve", 3001).unwrap(), None);
    }

    /// With a TTL of 0 (records kept forever) every record goes into one bucket that never
    /// expires; widths are an eighth of the TTL, at least a second.
    #[test]
    fn dedup_bucket_widths() {
        let dir = tempfile::tempdir().unwrap();
        let s = MessageStore::open(dir.path())
            .unwrap()
            .with_dedup_ttl_secs(0);
        write_sent(&s, &[rec("sam", 1, 5), rec("sam", 2, u64::MAX - 1)]);
        assert_eq!(s.sent_buckets(), vec![(0, u64::MAX)]);
        assert_eq!(
            s.drop_expired_sent(crate::api::min_live_id(u64::MAX, 0))
                .unwrap(),
            0
        );
        let second = (1_000_000 / 16) << 18;
        assert_eq!(bucket_ids(1), second);
        assert_eq!(bucket_ids(24 * 3600), 3 * 3600 * second);
        assert_eq!(bucket_ids(u64::MAX), u64::MAX);
        assert_eq!(parse_bucket_name(&bucket_name(7, 9)), Some((7, 9)));
        assert_eq!(parse_bucket_name("sent"), None);
        assert_eq!(parse_bucket_name("sent.1.2"), None);
        assert_eq!(parse_bucket_name(&bucket_name(9, 7)), None);
    }

    /// Dedup records written by builds before the buckets are still read, and come back oldest
    /// first in bounded turns for expiry; an expiry deletes the record only while it names the
    /// expired id.
    #[test]
    fn dedup_records_of_older_builds_are_read_and_expire_in_bounded_turns() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = MessageStore::open(dir.path()).unwrap();
            let sent: Vec<_> = (1..=10u64)
                .map(|i| rec("sam", i, 100 + i))
                .chain([rec("sa", 1, 50), rec("samuel", 1, 900)])
                .collect();
            s.commit(&[msg("ruth", 101, "p")], &[], true).unwrap();
            s.write_legacy_sent(&sent).unwrap();
        }
        let s = MessageStore::open(dir.path()).unwrap();
        assert_eq!(s.sent_id(b"sam", 3).unwrap(), Some(103));
        assert_eq!(s.sent_id(b"sa", 1).unwrap(), Some(50));
        assert_eq!(s.sent_id(b"samuel", 1).unwrap(), Some(900));
        assert_eq!(s.sent_id(b"sam", 11).unwrap(), None);
        assert_eq!(s.id_floor(), 101);

        // Minted before 106: "sa"/1 (50) and sam 1..=5 (101..=105), oldest first, 4 per turn.
        let (first, next) = s.expired_sent(&[], 106, 4).unwrap();
        assert_eq!(
            first.iter().map(|r| r.id).collect::<Vec<_>>(),
            [50, 101, 102, 103]
        );
        assert_eq!(first[0], rec("sa", 1, 50));
        let (rest, end) = s.expired_sent(&next.unwrap(), 106, 4).unwrap();
        assert_eq!(rest, vec![rec("sam", 4, 104), rec("sam", 5, 105)]);
        assert_eq!(end, None);
        assert!(
            s.expired_sent(&[], 0, 4).unwrap().0.is_empty(),
            "0: no expiry"
        );

        // A record that no longer names the expired id keeps its key (only the index goes).
        let mut expired = first.clone();
        expired.extend(rest);
        expired.push(rec("samuel", 1, 7));
        s.write(
            &Batch {
                sent_expired: &expired,
                ..Batch::default()
            },
            true,
        )
        .unwrap();
        for c in 1..=5 {
            assert_eq!(s.sent_id(b"sam", c).unwrap(), None);
        }
        assert_eq!(s.sent_id(b"sam", 6).unwrap(), Some(106));
        assert_eq!(s.sent_id(b"sa", 1).unwrap(), None);
        assert_eq!(s.sent_id(b"samuel", 1).unwrap(), Some(900));
        assert!(s.expired_sent(&[], 106, 100).unwrap().0.is_empty());
        assert_eq!(s.expired_sent(&[], u64::MAX, 100).unwrap().0.len(), 6);
        assert_eq!(s.count(b"ruth").unwrap(), 1);
        // A bucket's record of the same client id is read before the old one.
        write_sent(&s, &[rec("sam", 6, 1_000)]);
        assert_eq!(s.sent_id(b"sam", 6).unwrap(), Some(1_000));
        assert_eq!(s.sent_id(b"sam", 7).unwrap(), Some(107));
    }
}
