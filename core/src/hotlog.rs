//! The embedded store's hot tier: an append-only log on local disk, and the messages in it kept
//! in memory, for messages whose ack comes after the commit window but soon after it.
//!
//! Under load a recipient's ack often misses the 2 ms commit window ([`crate::embedded`]) by a
//! few milliseconds. Writing such a message into the LSM ([`crate::store`]) and deleting it a
//! moment later costs a memtable insert and a tombstone, each a skip-list search, and later a
//! flush and a compaction of both: about 12 µs of the core thread per message on the benchmark
//! VM, enough to keep an edge that once fell behind from ever catching up. The hot tier makes
//! such a message durable with one append instead:
//!
//! - **Commit** ([`HotLog::commit`]): the group commit's new messages, the v2 dedup records
//!   `(sender, client message id) -> id` of its sends (in the same frame as their messages, so
//!   atomic with them as in the LSM) and the deletes of acked hot messages are written as one
//!   frame and `fdatasync`ed. The messages and records then stay in memory, the messages
//!   indexed by id and by recipient.
//! - **Ack** ([`HotLog::take`]): removes the message from memory; its delete is logged at the
//!   next commit (within the window). Nothing touches the LSM.
//! - **Generations**: the log is a series of files `{dir}/{gen:020}.log`. Every `period` the
//!   current file is closed and a new one opened ([`HotLog::rotate_due`]). When a closed file is
//!   one whole period old, the messages it wrote that are still in memory (not acked within one
//!   to two periods) move into the LSM in one durable batch ([`HotLog::take_oldest`]), and only
//!   then is the file deleted ([`HotLog::retire_oldest`]). The file's dedup records move with
//!   them, acked or not: they must live `dedup_ttl_secs`. A silent recipient's messages thus
//!   reach the LSM after one to two periods, and the memory held is bounded by
//!   `max_bytes` (over it, new messages go to the LSM directly, as without the tier).
//! - **Frames**: `u32 LE len | u32 LE crc32(body) | body`, `body = u8 version (1) | u64 LE id
//!   floor | u32 LE records | records`. A record is `u8 1 | u64 id | u8 kind | u16 len |
//!   recipient | u16 len | sender | u32 len | payload` (a message) or `u8 2 | u64 id | u16 len |
//!   recipient` (the delete of an acked message) or `u8 3 | u64 id | u64 client | u16 len |
//!   sender` (a dedup record). The id floor is at or above every id the core
//!   had seen at the commit, so a restart never reuses an id even when the LSM never heard of it.
//! - **Recovery** ([`recover`]): every file is replayed in generation order (messages in, their
//!   deletes out); a frame whose length or crc does not check is a torn tail (a commit that
//!   never returned) and ends its file. A frame of an unknown version stops the open with an
//!   error: it was written by a newer build, and skipping it could lose messages. The
//!   survivors and every dedup record go into the LSM in one durable batch before the files are deleted
//!   ([`Recovery::remove_files`]), so the LSM is again the whole truth before the core serves.
//!
//! The hot tier is owned by the core thread alone, like the store.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};
use tracing::{debug, warn};

use crate::api::StoredMsg;
use crate::error::CoreError;
use crate::store::SentRecord;

/// Version byte of the frames this build writes.
const FRAME_VERSION: u8 = 1;
/// Frame header: length and crc.
const FRAME_HEADER: usize = 8;
/// The smallest frame body: version, id floor, record count.
const MIN_BODY: usize = 1 + 8 + 4;
/// A frame body larger than this is corrupt (one commit's messages are bounded by the queues).
const MAX_FRAME: usize = 1 << 30;
const TAG_MSG: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_SENT: u8 = 3;
/// Bytes of memory counted per hot message besides its names and payload (its index entries).
const MSG_OVERHEAD: usize = 160;

fn file_name(gen: u64) -> String {
    format!("{gen:020}.log")
}

fn gen_of(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".log")?.parse().ok()
}

/// The log files of `dir`, oldest generation first.
fn log_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CoreError> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let path = entry?.path();
        if let Some(gen) = gen_of(&path) {
            files.push((gen, path));
        }
    }
    files.sort_unstable_by_key(|(g, _)| *g);
    Ok(files)
}

/// What [`recover`] found: the messages to put into the LSM, the highest id floor, and the
/// files to delete once they are there.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Messages logged and not deleted, in log order.
    pub msgs: Vec<StoredMsg>,
    /// Every dedup record logged, in log order.
    pub sent: Vec<SentRecord>,
    /// The highest id floor of any frame (0 if none).
    pub floor: u64,
    /// Frames that did not check (torn tails), one per file at most.
    pub torn: usize,
    files: Vec<PathBuf>,
    next_gen: u64,
}

impl Recovery {
    /// Deletes the replayed files; call only once [`Recovery::msgs`] are durable in the LSM.
    pub fn remove_files(&mut self) -> Result<(), CoreError> {
        for f in self.files.drain(..) {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Reads every log file of `dir` (see the module doc). Creates `dir` if missing.
pub fn recover(dir: &Path) -> Result<Recovery, CoreError> {
    std::fs::create_dir_all(dir)?;
    let mut rec = Recovery::default();
    // (recipient, id) -> index in `order`; deletes clear the slot.
    let mut live: HashMap<(Vec<u8>, u64), usize> = HashMap::new();
    let mut order: Vec<Option<StoredMsg>> = Vec::new();
    for (gen, path) in log_files(dir)? {
        rec.next_gen = rec.next_gen.max(gen + 1);
        let mut buf = Vec::new();
        File::open(&path)?.read_to_end(&mut buf)?;
        let mut at = 0;
        while at < buf.len() {
            let Some((body, used)) = frame_at(&buf[at..]) else {
                rec.torn += 1;
                warn!(
                    file = %path.display(),
                    offset = at,
                    bytes = buf.len() - at,
                    "hot log: a torn frame ends this file (a commit that never returned)"
                );
                break;
            };
            at += used;
            let floor = apply_frame(body, |r| match r {
                Record::Msg(m) => {
                    let key = (m.recipient.clone(), m.id);
                    live.insert(key, order.len());
                    order.push(Some(m));
                }
                Record::Delete(user, id) => {
                    if let Some(i) = live.remove(&(user, id)) {
                        order[i] = None;
                    }
                }
                Record::Sent(r) => rec.sent.push(r),
            })
            .map_err(|detail| CoreError::corrupt("hot log frame", detail))?;
            rec.floor = rec.floor.max(floor);
        }
        rec.files.push(path);
    }
    rec.msgs = order.into_iter().flatten().collect();
    Ok(rec)
}

/// The body of the frame at the start of `buf` and the bytes it takes, if it is whole and
/// checks.
fn frame_at(buf: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    // A zero length is what a crash leaves where appended data was never written (the file's
    // size grew, its blocks did not): a torn tail like any other, though its crc "checks".
    if !(MIN_BODY..=MAX_FRAME).contains(&len) {
        return None;
    }
    let body = buf.get(FRAME_HEADER..FRAME_HEADER + len)?;
    (crc32fast::hash(body) == crc).then_some((body, FRAME_HEADER + len))
}

enum Record {
    Msg(StoredMsg),
    Delete(Vec<u8>, u64),
    Sent(SentRecord),
}

/// A cursor over a frame body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "record cut short: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize, String> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes16(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u16()?;
        Ok(self.take(n)?.to_vec())
    }
}

/// Decodes one (checked) frame body, handing each record to `f`; returns its id floor.
fn apply_frame(body: &[u8], mut f: impl FnMut(Record)) -> Result<u64, String> {
    let mut c = Cursor(body);
    let version = c.u8()?;
    if version != FRAME_VERSION {
        return Err(format!(
            "version {version} (this build reads {FRAME_VERSION}): written by a newer build"
        ));
    }
    let floor = c.u64()?;
    let n = c.u32()?;
    for _ in 0..n {
        match c.u8()? {
            TAG_MSG => {
                let id = c.u64()?;
                let kind = c.u8()?;
                let recipient = c.bytes16()?;
                let sender = c.bytes16()?;
                let len = c.u32()? as usize;
                let payload = c.take(len)?.to_vec();
                f(Record::Msg(StoredMsg {
                    id,
                    recipient,
                    sender,
                    payload,
                    kind,
                }));
            }
            TAG_DELETE => {
                let id = c.u64()?;
                let user = c.bytes16()?;
                f(Record::Delete(user, id));
            }
            TAG_SENT => {
                let id = c.u64()?;
                let client = c.u64()?;
                let sender = c.bytes16()?;
                f(Record::Sent(SentRecord { sender, client, id }));
            }
            tag => return Err(format!("unknown record tag {tag}")),
        }
    }
    if !c.0.is_empty() {
        return Err(format!("{} bytes after the last record", c.0.len()));
    }
    Ok(floor)
}

/// True if `m` can be written as a hot log record (names fit `u16`, payload `u32`).
pub fn fits(m: &StoredMsg) -> bool {
    m.recipient.len() <= usize::from(u16::MAX)
        && m.sender.len() <= usize::from(u16::MAX)
        && u32::try_from(m.payload.len()).is_ok()
}

fn put16(out: &mut Vec<u8>, b: &[u8]) {
    // Callers check `fits` (names) and MAX_USER_LEN (deletes): the length fits u16.
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&b[..usize::from(n)]);
}

/// True if `r` can be written as a hot log record (its sender fits `u16`).
pub fn fits_sent(r: &SentRecord) -> bool {
    r.sender.len() <= usize::from(u16::MAX)
}

/// Appends one frame holding `msgs`, `deletes` and `sent` to `out`.
fn encode_frame(
    out: &mut Vec<u8>,
    floor: u64,
    msgs: &[StoredMsg],
    deletes: &[(Vec<u8>, u64)],
    sent: &[SentRecord],
) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&floor.to_le_bytes());
    let n = u32::try_from(msgs.len() + deletes.len() + sent.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    for m in msgs {
        out.push(TAG_MSG);
        out.extend_from_slice(&m.id.to_le_bytes());
        out.push(m.kind);
        put16(out, &m.recipient);
        put16(out, &m.sender);
        let len = u32::try_from(m.payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&m.payload[..len as usize]);
    }
    for (user, id) in deletes {
        out.push(TAG_DELETE);
        out.extend_from_slice(&id.to_le_bytes());
        put16(out, user);
    }
    for r in sent {
        out.push(TAG_SENT);
        out.extend_from_slice(&r.id.to_le_bytes());
        out.extend_from_slice(&r.client.to_le_bytes());
        put16(out, &r.sender);
    }
    let body_len = u32::try_from(out.len() - start - FRAME_HEADER).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn bytes_of(m: &StoredMsg) -> usize {
    m.recipient.len() + m.sender.len() + m.payload.len() + MSG_OVERHEAD
}

fn bytes_of_sent(sender: &[u8]) -> usize {
    sender.len() + MSG_OVERHEAD / 2
}

/// What moves from the hot tier into the LSM: messages, dedup records, and the id floor.
#[derive(Debug, Default, PartialEq)]
pub struct Moved {
    pub msgs: Vec<StoredMsg>,
    pub sent: Vec<SentRecord>,
    pub floor: u64,
}

/// One log file: its messages (ids) and the highest id floor written to it.
struct Gen {
    gen: u64,
    path: PathBuf,
    opened: Instant,
    /// When the last frame was written to it: set when the next file takes over.
    closed: Option<Instant>,
    /// A frame was written to it (messages, deletes or only the id floor).
    written: bool,
    ids: Vec<u64>,
    /// The dedup records written to it.
    sent: Vec<(Vec<u8>, u64)>,
    floor: u64,
}

/// The hot tier (see the module doc).
pub struct HotLog {
    dir: PathBuf,
    period: Duration,
    max_bytes: usize,
    /// The current file (the last of `gens`); None after a failed write until the next commit
    /// opens a new one.
    file: Option<File>,
    /// Oldest first; the last is the one being written.
    gens: VecDeque<Gen>,
    next_gen: u64,
    by_id: HashMap<u64, (StoredMsg, u64)>,
    by_user: HashMap<Vec<u8>, BTreeSet<u64>>,
    /// Dedup records: `(sender, client) -> (id, generation)`.
    sent: HashMap<(Vec<u8>, u64), (u64, u64)>,
    bytes: usize,
    buf: Vec<u8>,
}

impl std::fmt::Debug for HotLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotLog")
            .field("dir", &self.dir)
            .field("messages", &self.by_id.len())
            .field("files", &self.gens.len())
            .finish_non_exhaustive()
    }
}

impl HotLog {
    /// A hot tier writing to `dir`, after [`recover`] (whose files it never touches: new files
    /// start at the generation after them).
    pub fn new(dir: &Path, rec: &Recovery, period: Duration, max_bytes: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            period,
            max_bytes,
            file: None,
            gens: VecDeque::new(),
            next_gen: rec.next_gen,
            by_id: HashMap::new(),
            by_user: HashMap::new(),
            sent: HashMap::new(),
            bytes: 0,
            buf: Vec::new(),
        }
    }

    /// Messages in memory.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True if no message is in memory.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Log files on disk (the current one included).
    pub fn files(&self) -> usize {
        self.gens.len()
    }

    /// Room for more messages in memory.
    pub fn has_room(&self) -> bool {
        self.bytes < self.max_bytes
    }

    /// True if `user`'s message `id` is here.
    pub fn contains(&self, user: &[u8], id: u64) -> bool {
        self.by_id
            .get(&id)
            .is_some_and(|(m, _)| m.recipient == user)
    }

    /// Removes `user`'s message `id` (acked) and returns it; its delete must then be logged
    /// (passed to the next [`HotLog::commit`]).
    pub fn take(&mut self, user: &[u8], id: u64) -> Option<StoredMsg> {
        if !self.contains(user, id) {
            return None;
        }
        let (m, _) = self.by_id.remove(&id)?;
        self.unindex(&m);
        Some(m)
    }

    fn unindex(&mut self, m: &StoredMsg) {
        self.bytes = self.bytes.saturating_sub(bytes_of(m));
        if let Some(ids) = self.by_user.get_mut(&m.recipient) {
            ids.remove(&m.id);
            if ids.is_empty() {
                self.by_user.remove(&m.recipient);
            }
        }
    }

    /// `user`'s messages with an id above `after`, in id order.
    pub fn range(&self, user: &[u8], after: u64) -> impl Iterator<Item = &StoredMsg> + '_ {
        self.by_user
            .get(user)
            .into_iter()
            .flat_map(move |ids| ids.range(after.saturating_add(1)..))
            .filter_map(|id| self.by_id.get(id).map(|(m, _)| m))
    }

    /// The id of `sender`'s first message with client message id `client`, if its dedup
    /// record is here.
    pub fn sent_id(&self, sender: &[u8], client: u64) -> Option<u64> {
        // The key is owned: one allocation per v2 send, only on the resend check.
        self.sent.get(&(sender.to_vec(), client)).map(|(id, _)| *id)
    }

    /// Count and payload bytes of `user`'s messages here.
    pub fn usage(&self, user: &[u8]) -> (u64, u64) {
        self.range(user, 0)
            .fold((0, 0), |(n, b), m| (n + 1, b + m.payload.len() as u64))
    }

    /// Writes one frame (`msgs`, the deletes of messages taken since the last commit, the
    /// dedup records `sent`, the id floor) and syncs it; then keeps `msgs` and `sent` in memory.
    /// On failure returns the error, `msgs` and `sent` (none of them is durable here) and starts
    /// a new file at the next commit.
    #[allow(clippy::type_complexity)]
    pub fn commit(
        &mut self,
        msgs: Vec<StoredMsg>,
        deletes: &[(Vec<u8>, u64)],
        sent: Vec<SentRecord>,
        floor: u64,
        now: Instant,
    ) -> Result<(), (std::io::Error, Vec<StoredMsg>, Vec<SentRecord>)> {
        if let Err(e) = self.write_frame(&msgs, deletes, &sent, floor, now) {
            // The file may end in a partial frame: never append after it.
            self.close_current(now);
            return Err((e, msgs, sent));
        }
        let Some(g) = self.gens.back_mut() else {
            return Ok(());
        };
        g.floor = g.floor.max(floor);
        g.written = true;
        let gen = g.gen;
        for r in sent {
            let key = (r.sender, r.client);
            let size = bytes_of_sent(&key.0);
            g.sent.push(key.clone());
            if self.sent.insert(key, (r.id, gen)).is_none() {
                self.bytes += size;
            }
        }
        for m in msgs {
            g.ids.push(m.id);
            self.bytes += bytes_of(&m);
            if !self.by_user.contains_key(&m.recipient) {
                self.by_user.insert(m.recipient.clone(), BTreeSet::new());
            }
            if let Some(ids) = self.by_user.get_mut(&m.recipient) {
                ids.insert(m.id);
            }
            if let Some((old, _)) = self.by_id.insert(m.id, (m, gen)) {
                // The same id again (a store taken in twice): keep one copy, counted once.
                self.bytes = self.bytes.saturating_sub(bytes_of(&old));
            }
        }
        Ok(())
    }

    fn write_frame(
        &mut self,
        msgs: &[StoredMsg],
        deletes: &[(Vec<u8>, u64)],
        sent: &[SentRecord],
        floor: u64,
        now: Instant,
    ) -> std::io::Result<()> {
        if self.file.is_none() {
            self.open_next(now)?;
        }
        self.buf.clear();
        encode_frame(&mut self.buf, floor, msgs, deletes, sent);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("hot log file not open"))?;
        file.write_all(&self.buf)?;
        file.sync_data()?;
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    fn open_next(&mut self, now: Instant) -> std::io::Result<()> {
        let gen = self.next_gen;
        let path = self.dir.join(file_name(gen));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        // The new name must survive a crash too, or its frames would be lost with it.
        File::open(&self.dir)?.sync_all()?;
        self.next_gen = gen + 1;
        self.file = Some(file);
        self.gens.push_back(Gen {
            gen,
            path,
            opened: now,
            closed: None,
            written: false,
            ids: Vec::new(),
            sent: Vec::new(),
            floor: 0,
        });
        debug!(gen, "hot log file opened");
        Ok(())
    }

    fn close_current(&mut self, now: Instant) {
        self.file = None;
        if let Some(g) = self.gens.back_mut() {
            g.closed.get_or_insert(now);
        }
    }

    /// When [`HotLog::rotate_due`] has something to do next, if ever.
    pub fn next_due(&self) -> Option<Instant> {
        let oldest = self.gens.front()?;
        if let Some(closed) = oldest.closed {
            return Some(closed + self.period);
        }
        oldest.written.then_some(oldest.opened + self.period)
    }

    /// Closes the current file if it is one period old and was written to (the next commit
    /// opens a new one), so that no file grows for longer than a period. Returns true if the oldest file is due for [`HotLog::take_oldest`]:
    /// closed one period ago, so its messages have waited one to two periods.
    pub fn rotate_due(&mut self, now: Instant) -> bool {
        if let Some(cur) = self.gens.back() {
            if cur.closed.is_none() && cur.written && now >= cur.opened + self.period {
                self.close_current(now);
            }
        }
        self.gens
            .front()
            .and_then(|g| g.closed)
            .is_some_and(|c| now >= c + self.period)
    }

    /// Takes out of memory the messages of the oldest file that were not acked and its dedup
    /// records, with the id floor the file recorded. Put them in the LSM, then call
    /// [`HotLog::retire_oldest`] (or [`HotLog::restore`] if that failed).
    pub fn take_oldest(&mut self) -> Moved {
        let Some(g) = self.gens.front_mut() else {
            return Moved::default();
        };
        let (gen, floor) = (g.gen, g.floor);
        let ids = std::mem::take(&mut g.ids);
        let keys = std::mem::take(&mut g.sent);
        let mut moved = Moved {
            floor,
            ..Moved::default()
        };
        for key in keys {
            if self.sent.get(&key).is_some_and(|(_, g)| *g == gen) {
                if let Some((id, _)) = self.sent.remove(&key) {
                    self.bytes = self.bytes.saturating_sub(bytes_of_sent(&key.0));
                    let (sender, client) = key;
                    moved.sent.push(SentRecord { sender, client, id });
                }
            }
        }
        for id in ids {
            if self.by_id.get(&id).is_some_and(|(_, g)| *g == gen) {
                if let Some((m, _)) = self.by_id.remove(&id) {
                    self.unindex(&m);
                    moved.msgs.push(m);
                }
            }
        }
        moved
    }

    /// Puts back what [`HotLog::take_oldest`] returned (the LSM write failed).
    pub fn restore(&mut self, moved: Moved) {
        let Some(g) = self.gens.front_mut() else {
            return;
        };
        let gen = g.gen;
        for r in moved.sent {
            let key = (r.sender, r.client);
            g.sent.push(key.clone());
            self.bytes += bytes_of_sent(&key.0);
            self.sent.insert(key, (r.id, gen));
        }
        for m in moved.msgs {
            g.ids.push(m.id);
            self.bytes += bytes_of(&m);
            self.by_user
                .entry(m.recipient.clone())
                .or_default()
                .insert(m.id);
            self.by_id.insert(m.id, (m, gen));
        }
    }

    /// Deletes the oldest file (its messages are acked or in the LSM).
    pub fn retire_oldest(&mut self) -> Result<(), CoreError> {
        let Some(g) = self.gens.pop_front() else {
            return Ok(());
        };
        if self.gens.is_empty() {
            // It was the current file: the next commit opens a new one.
            self.file = None;
        }
        match std::fs::remove_file(&g.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => {
                // Keep it listed so a restart's replay (which is harmless) is its only effect.
                Err(e.into())
            }
        }
    }

    /// Takes every message and dedup record out of memory (at shutdown), with the highest
    /// floor; put them in the LSM, then call [`HotLog::retire_all`].
    pub fn take_all(&mut self) -> Moved {
        let floor = self.gens.iter().map(|g| g.floor).max().unwrap_or(0);
        let mut msgs: Vec<StoredMsg> = self.by_id.drain().map(|(_, (m, _))| m).collect();
        msgs.sort_unstable_by_key(|m| m.id);
        let sent = self
            .sent
            .drain()
            .map(|((sender, client), (id, _))| SentRecord { sender, client, id })
            .collect();
        self.by_user.clear();
        self.bytes = 0;
        Moved { msgs, sent, floor }
    }

    /// Deletes every file.
    pub fn retire_all(&mut self) -> Result<(), CoreError> {
        while !self.gens.is_empty() {
            self.retire_oldest()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, to: &str) -> StoredMsg {
        StoredMsg {
            id,
            recipient: to.as_bytes().to_vec(),
            sender: b"s".to_vec(),
            payload: format!("payload {id}").into_bytes(),
            kind: 0,
        }
    }

    /// A hot tier on a fresh directory, with `period` and a memory bound of `max_bytes`.
    fn fresh(period: Duration, max_bytes: usize) -> (tempfile::TempDir, HotLog) {
        let dir = tempfile::tempdir().unwrap();
        let rec = recover(dir.path()).unwrap();
        let hot = HotLog::new(dir.path(), &rec, period, max_bytes);
        (dir, hot)
    }

    fn ids(v: &[StoredMsg]) -> Vec<u64> {
        v.iter().map(|m| m.id).collect()
    }

    #[test]
    fn committed_messages_survive_a_crash_and_deletes_remove_them() {
        let (dir, mut hot) = fresh(Duration::from_secs(1), 1 << 20);
        let now = Instant::now();
        hot.commit(
            vec![msg(1, "a"), msg(2, "b"), msg(3, "a")],
            &[],
            Vec::new(),
            3,
            now,
        )
        .unwrap();
        assert_eq!(hot.take(b"a", 1).map(|m| m.id), Some(1));
        assert!(
            hot.take(b"b", 1).is_none(),
            "another user's id is not taken"
        );
        hot.commit(vec![msg(4, "a")], &[(b"a".to_vec(), 1)], Vec::new(), 9, now)
            .unwrap();
        assert_eq!(
            ids(&hot.range(b"a", 0).cloned().collect::<Vec<_>>()),
            [3, 4]
        );
        assert_eq!(ids(&hot.range(b"a", 3).cloned().collect::<Vec<_>>()), [4]);
        assert_eq!(hot.usage(b"a"), (2, 18));
        // Dropped without a shutdown: the files are what a kill -9 leaves.
        drop(hot);
        let mut rec = recover(dir.path()).unwrap();
        assert_eq!(ids(&rec.msgs), [2, 3, 4]);
        assert_eq!(rec.floor, 9);
        assert_eq!(rec.torn, 0);
        assert_eq!(rec.msgs[0], msg(2, "b"));
        rec.remove_files().unwrap();
        assert!(recover(dir.path()).unwrap().msgs.is_empty());
    }

    #[test]
    fn a_torn_tail_is_ignored_and_new_files_come_after_it() {
        let (dir, mut hot) = fresh(Duration::from_secs(1), 1 << 20);
        hot.commit(vec![msg(1, "a")], &[], Vec::new(), 1, Instant::now())
            .unwrap();
        drop(hot);
        let (_, path) = log_files(dir.path()).unwrap().pop().unwrap();
        let mut frame = Vec::new();
        encode_frame(&mut frame, 2, &[msg(2, "a")], &[], &[]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&frame[..frame.len() - 3]).unwrap();
        drop(f);
        let rec = recover(dir.path()).unwrap();
        assert_eq!(ids(&rec.msgs), [1]);
        assert_eq!((rec.torn, rec.floor), (1, 1));
        let mut hot = HotLog::new(dir.path(), &rec, Duration::from_secs(1), 1 << 20);
        hot.commit(vec![msg(3, "a")], &[], Vec::new(), 3, Instant::now())
            .unwrap();
        drop(hot);
        let rec = recover(dir.path()).unwrap();
        assert_eq!(
            ids(&rec.msgs),
            [1, 3],
            "the new file is read after the torn one"
        );
    }

    use crate::store::test_record as rec;

    /// Dedup records are kept, found, replayed, and leave with their file whether or not
    /// their message was acked (they must outlive it).
    #[test]
    fn dedup_records_are_found_replayed_and_move_with_their_file() {
        let p = Duration::from_secs(1);
        let (dir, mut hot) = fresh(p, 1 << 20);
        let t0 = Instant::now();
        hot.commit(
            vec![msg(1, "a"), msg(2, "a")],
            &[],
            vec![rec("s", 10, 1), rec("s", 11, 2)],
            2,
            t0,
        )
        .unwrap();
        assert_eq!(hot.sent_id(b"s", 10), Some(1));
        assert_eq!(hot.sent_id(b"s", 12), None);
        assert_eq!(hot.sent_id(b"t", 10), None);
        hot.take(b"a", 1).unwrap();
        drop(hot);
        let r = recover(dir.path()).unwrap();
        assert_eq!(ids(&r.msgs), [1, 2]);
        assert_eq!(r.sent, [rec("s", 10, 1), rec("s", 11, 2)]);
        // A fresh tier (the replayed files are left alone here): rotate and move.
        let mut hot = HotLog::new(dir.path(), &r, p, 1 << 20);
        hot.commit(vec![msg(3, "a")], &[], vec![rec("s", 12, 3)], 3, t0)
            .unwrap();
        hot.take(b"a", 3).unwrap();
        assert!(!hot.rotate_due(t0 + p));
        assert!(hot.rotate_due(t0 + p + p));
        let moved = hot.take_oldest();
        assert!(moved.msgs.is_empty(), "the message was acked");
        assert_eq!(moved.sent, [rec("s", 12, 3)], "the record outlives it");
        assert_eq!(hot.sent_id(b"s", 12), None);
        hot.restore(moved);
        assert_eq!(hot.sent_id(b"s", 12), Some(3));
    }

    #[test]
    fn a_tail_of_zeros_is_torn_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = Vec::new();
        encode_frame(&mut file, 1, &[msg(1, "a")], &[], &[]);
        file.extend_from_slice(&[0; 64]);
        std::fs::write(dir.path().join(file_name(0)), &file).unwrap();
        let rec = recover(dir.path()).unwrap();
        assert_eq!((ids(&rec.msgs), rec.torn), (vec![1], 1));
    }

    #[test]
    fn a_frame_of_a_newer_version_stops_the_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut frame = Vec::new();
        encode_frame(&mut frame, 1, &[msg(1, "a")], &[], &[]);
        frame[FRAME_HEADER] = FRAME_VERSION + 1;
        let crc = crc32fast::hash(&frame[FRAME_HEADER..]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join(file_name(0)), &frame).unwrap();
        let err = recover(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer build"), "{err}");
    }

    #[test]
    fn files_rotate_and_the_oldest_gives_up_only_its_unacked_messages() {
        let p = Duration::from_secs(1);
        let (dir, mut hot) = fresh(p, 1 << 20);
        let t0 = Instant::now();
        hot.commit(vec![msg(1, "a"), msg(2, "a")], &[], Vec::new(), 2, t0)
            .unwrap();
        assert!(!hot.rotate_due(t0));
        assert_eq!(hot.next_due(), Some(t0 + p));
        // One period on: the file closes; the next commit opens the second.
        assert!(!hot.rotate_due(t0 + p));
        hot.take(b"a", 1).unwrap();
        hot.commit(
            vec![msg(3, "a")],
            &[(b"a".to_vec(), 1)],
            Vec::new(),
            3,
            t0 + p,
        )
        .unwrap();
        assert_eq!(hot.files(), 2);
        assert_eq!(hot.next_due(), Some(t0 + p + p));
        assert!(!hot.rotate_due(t0 + p + p / 2));
        assert!(hot.rotate_due(t0 + p + p));
        let moved = hot.take_oldest();
        assert_eq!((ids(&moved.msgs), moved.floor), (vec![2], 2));
        assert_eq!(hot.len(), 1);
        hot.retire_oldest().unwrap();
        assert_eq!(hot.files(), 1);
        // After a crash only the second file is replayed: message 3, and the delete of 1.
        drop(hot);
        let rec = recover(dir.path()).unwrap();
        assert_eq!(ids(&rec.msgs), [3]);
    }

    #[test]
    fn a_file_of_floors_only_is_closed_and_retired_too() {
        let p = Duration::from_secs(1);
        let (dir, mut hot) = fresh(p, 1 << 20);
        let t0 = Instant::now();
        assert_eq!(hot.next_due(), None);
        hot.commit(Vec::new(), &[], Vec::new(), 5, t0).unwrap();
        assert_eq!(hot.next_due(), Some(t0 + p));
        assert!(!hot.rotate_due(t0 + p), "closed, not yet due");
        assert!(hot.rotate_due(t0 + p + p));
        assert_eq!(
            hot.take_oldest(),
            Moved {
                floor: 5,
                ..Moved::default()
            }
        );
        hot.retire_oldest().unwrap();
        assert_eq!((hot.files(), hot.next_due()), (0, None));
        assert_eq!(log_files(dir.path()).unwrap().len(), 0);
    }

    #[test]
    fn restore_puts_messages_back_after_a_failed_move() {
        let (_dir, mut hot) = fresh(Duration::ZERO, 1 << 20);
        let t0 = Instant::now();
        hot.commit(vec![msg(1, "a")], &[], Vec::new(), 1, t0)
            .unwrap();
        assert!(hot.rotate_due(t0));
        let moved = hot.take_oldest();
        assert!(hot.is_empty());
        hot.restore(moved);
        assert!(hot.contains(b"a", 1));
        assert_eq!(hot.usage(b"a"), (1, 9));
    }

    #[test]
    fn memory_is_bounded() {
        let (_dir, mut hot) = fresh(Duration::from_secs(1), 300);
        assert!(hot.has_room());
        hot.commit(
            vec![msg(1, "a"), msg(2, "a")],
            &[],
            Vec::new(),
            2,
            Instant::now(),
        )
        .unwrap();
        assert!(!hot.has_room());
        hot.take(b"a", 1).unwrap();
        hot.take(b"a", 2).unwrap();
        assert!(hot.has_room());
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        fn arb_msg() -> impl Strategy<Value = StoredMsg> {
            (
                any::<u64>(),
                any::<u8>(),
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::collection::vec(any::<u8>(), 0..40),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(id, kind, recipient, sender, payload)| StoredMsg {
                    id,
                    recipient,
                    sender,
                    payload,
                    kind,
                })
        }

        proptest! {
            /// A frame decodes to what was encoded; any strict prefix of it is torn (never a
            /// panic, never a wrong record).
            #[test]
            fn frames_roundtrip_and_prefixes_are_torn(
                floor in any::<u64>(),
                msgs in proptest::collection::vec(arb_msg(), 0..8),
                deletes in proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..40), any::<u64>()), 0..8),
                sent in proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..40), any::<u64>(), any::<u64>())
                        .prop_map(|(sender, client, id)| SentRecord { sender, client, id }),
                    0..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut buf = Vec::new();
                encode_frame(&mut buf, floor, &msgs, &deletes, &sent);
                let (body, used) = frame_at(&buf).expect("a whole frame");
                prop_assert_eq!(used, buf.len());
                let (mut got_msgs, mut got_deletes, mut got_sent) =
                    (Vec::new(), Vec::new(), Vec::new());
                let got_floor = apply_frame(body, |r| match r {
                    Record::Msg(m) => got_msgs.push(m),
                    Record::Delete(u, id) => got_deletes.push((u, id)),
                    Record::Sent(r) => got_sent.push(r),
                })
                .unwrap();
                prop_assert_eq!(got_floor, floor);
                prop_assert_eq!(got_msgs, msgs);
                prop_assert_eq!(got_deletes, deletes);
                prop_assert_eq!(got_sent, sent);
                let cut = cut.index(buf.len());
                prop_assert!(frame_at(&buf[..cut]).is_none());
            }

            /// Arbitrary bytes never panic the reader.
            #[test]
            fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                if let Some((body, _)) = frame_at(&bytes) {
                    let _ = apply_frame(body, |_| {});
                }
            }
        }
    }
}
