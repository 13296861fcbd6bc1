//! The edge's durable outbox: a group-committed, append-only write-ahead log on local disk that
//! holds every message a cluster edge accepted until the broker acknowledged it.
//!
//! In cluster mode a message would otherwise live only in memory between the socket read and the
//! broker's ack (shard queue, bridge, producer ring, librdkafka). The bridge thread of
//! [`crate::remote`] appends each `Deliver` and `PrekeyPut` frame here with a sequence number and
//! hands the same frame to the producer at once, with the sequence number as its ticket
//! ([`iris_bus::kafka::OutFrame::ticket`]): producing does not wait for the disk. The producer
//! reports each ticket once ([`iris_bus::kafka::ProducerRing::take_done`]) and [`Outbox::done`]
//! trims it.
//!
//! - **Files**: `{dir}/{first_seq:020}.log` segments. A record is `u32 len | u32 crc32 | u64 seq
//!   | body` with `body = u64 message id | u16 key len | key | encoded bus frame`; the crc covers
//!   the seq and the body. [`Outbox::write_pending`] writes the appended records to the active
//!   segment (one `write` per bridge pass: the page cache already survives a kill -9 of the
//!   process); the `iris-outbox-sync` thread fsyncs at most every `commit_ms` (a machine crash
//!   loses at most that window, like the embedded store's group commit), and parks while nothing
//!   is written (the writer wakes it). A segment rolls at
//!   `segment_bytes` and is deleted once every record in it was acknowledged.
//! - **Watermark**: `{dir}/trim` holds the lowest sequence number not yet known acknowledged
//!   (every lower one is at the broker). It is rewritten (temp file + rename, no fsync) every
//!   [`WATERMARK_EVERY`], or after [`WATERMARK_MIN_GAP`] once it moved by [`WATERMARK_BURST`]
//!   records, so a restart replays only records at or above it: duplicates after a crash are
//!   the records acknowledged since the last rewrite (fewer than [`WATERMARK_BURST`] plus what
//!   was acknowledged in the last [`WATERMARK_MIN_GAP`]) plus those acknowledged out of order
//!   behind an older unacknowledged one (other partitions).
//! - **Recovery** ([`Outbox::open`]): every segment is scanned; a record whose length or crc does
//!   not check (a torn tail after a crash) ends the scan of its segment, which is truncated there.
//!   Records at or above the watermark come back as [`Replayed`] and are tracked like new ones;
//!   new records go to a fresh segment.
//! - **Bounds**: [`Outbox::over_bytes`] (not-acked bytes ≥ `max_bytes`) and
//!   [`Outbox::oldest_age`] feed the [`AcceptGate`], the shared atomic the shards poll to stop
//!   reading their clients. A write or fsync error marks the outbox failed ([`Outbox::failed`]):
//!   the edge stops accepting for good and `/health` says so.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

/// Bytes of a record header: length, crc, sequence number.
pub const HEADER_BYTES: usize = 16;
/// Bytes of the body before the key: message id and key length.
const BODY_PREFIX: usize = 10;
/// A record body larger than this is corrupt (bus frames are far smaller).
const MAX_BODY: usize = 64 << 20;
/// How often the trim watermark is persisted when it moves little.
pub const WATERMARK_EVERY: Duration = Duration::from_millis(50);
/// A watermark that moved by this many records is persisted sooner (acks come in bursts)...
pub const WATERMARK_BURST: u64 = 1024;
/// ...but not more often than this.
pub const WATERMARK_MIN_GAP: Duration = Duration::from_millis(5);
const TRIM_FILE: &str = "trim";

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The directory or a segment could not be created, read, written or synced.
    #[error("outbox i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record cannot be represented (key longer than 65535 bytes).
    #[error("outbox record invalid: {0}")]
    Invalid(&'static str),
    /// An earlier write or fsync failed; the outbox accepts nothing more.
    #[error("outbox failed earlier and accepts nothing more")]
    Failed,
    /// Another process holds the outbox directory (two edges on one data directory).
    #[error("outbox {0} is locked by another process")]
    Locked(PathBuf),
}

fn io_err(path: &Path, source: std::io::Error) -> OutboxError {
    OutboxError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Settings of the outbox (edge `[cluster]` keys `outbox_*`, `bus_stall_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Directory of the segments and the watermark (`{data_dir}/outbox`).
    pub dir: PathBuf,
    /// Longest time between a write and its fsync, ms.
    pub commit_ms: u64,
    /// A segment rolls once it holds this many bytes.
    pub segment_bytes: u64,
    /// Not-acknowledged bytes at which the edge stops accepting.
    pub max_bytes: u64,
    /// Age of the oldest not-acknowledged record at which the edge stops accepting, ms.
    pub stall_ms: u64,
}

impl OutboxConfig {
    /// The defaults under `dir`: 2 ms commits, 64 MiB segments, 256 MiB bound, 5 s stall.
    pub fn new(dir: PathBuf) -> Self {
        OutboxConfig {
            dir,
            commit_ms: 2,
            segment_bytes: 64 << 20,
            max_bytes: 256 << 20,
            stall_ms: 5_000,
        }
    }
}

/// A record found at startup that the broker may not have: produce it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub seq: u64,
    /// The message id (0 for frames that carry none).
    pub id: u64,
    /// The key user (partition key).
    pub key: Vec<u8>,
    /// The encoded bus frame.
    pub frame: Vec<u8>,
}

impl Replayed {
    /// Where this record goes again: the target region of a `Route` frame (the global bus,
    /// topic `iris.global.route.{region}`), `None` for a regional frame (the deliver topic).
    /// A frame that does not decode any more is regional too: the deliver topic's consumers
    /// count and skip it, as they would have the first time.
    pub fn route_region(&self) -> Option<String> {
        match iris_bus::decode(&self.frame) {
            Ok(iris_bus::ArchivedBusFrame::Route(r)) => Some(r.region.as_str().to_owned()),
            _ => None,
        }
    }
}

/// The outbox's counters and gauges, read by `/metrics` from any thread.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Records appended since start (replays not counted).
    pub appended: AtomicU64,
    /// Records not yet acknowledged.
    pub records: AtomicU64,
    /// Bytes (headers included) of those records.
    pub bytes: AtomicU64,
    /// Unix µs when the oldest not-acknowledged record was appended (0: none).
    pub oldest_unix_micros: AtomicU64,
    /// Segment files on disk.
    pub segments: AtomicU64,
    /// fsyncs done.
    pub fsyncs: AtomicU64,
    /// Records replayed at startup.
    pub replayed: AtomicU64,
    /// Times the edge stopped accepting (bound or age reached, or a disk error).
    pub stalls: AtomicU64,
    /// Records the producer reported as never producible (dropped by the producer).
    pub rejected: AtomicU64,
    /// 1 once a write or fsync failed.
    pub failed: AtomicBool,
}

/// A point-in-time copy of [`OutboxStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxSnapshot {
    pub appended: u64,
    pub records: u64,
    pub bytes: u64,
    /// Age of the oldest not-acknowledged record, µs (0: none).
    pub oldest_age_micros: u64,
    pub segments: u64,
    pub fsyncs: u64,
    pub replayed: u64,
    pub stalls: u64,
    pub rejected: u64,
    pub failed: bool,
}

impl OutboxStats {
    pub fn snapshot(&self) -> OutboxSnapshot {
        let oldest = self.oldest_unix_micros.load(Ordering::Relaxed);
        OutboxSnapshot {
            appended: self.appended.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            oldest_age_micros: if oldest == 0 {
                0
            } else {
                iris_bus::hops::unix_micros().saturating_sub(oldest)
            },
            segments: self.segments.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            stalls: self.stalls.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Whether the edge accepts client input: one atomic word written by the bridge thread and
/// polled by every shard (a relaxed load per connection poll, never a wait). Bit 0 is "stalled";
/// the rest counts stalls, so a shard tells each connection once per stall.
#[derive(Debug, Default)]
pub struct AcceptGate {
    word: AtomicU64,
}

impl AcceptGate {
    /// The current word: [`AcceptGate::is_stalled`] and [`AcceptGate::epoch`] read it.
    pub fn load(&self) -> u64 {
        self.word.load(Ordering::Relaxed)
    }

    /// True while the edge must not read client input.
    pub fn stalled(&self) -> bool {
        Self::is_stalled(self.load())
    }

    pub fn is_stalled(word: u64) -> bool {
        word & 1 == 1
    }

    /// Which stall a word belongs to (increases by one per stall).
    pub fn epoch(word: u64) -> u64 {
        word >> 1
    }

    /// Sets the state; true when this starts a new stall.
    pub fn set(&self, stalled: bool) -> bool {
        let w = self.word.load(Ordering::Relaxed);
        if Self::is_stalled(w) == stalled {
            return false;
        }
        let next = if stalled {
            ((w >> 1) + 1) << 1 | 1
        } else {
            w & !1
        };
        self.word.store(next, Ordering::Relaxed);
        stalled
    }
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// The highest sequence number in it (0: none yet).
    last_seq: u64,
    bytes: u64,
}

/// One not-yet-retired sequence number.
#[derive(Debug, Clone, Copy)]
struct Slot {
    bytes: u32,
    id: u64,
    at_micros: u64,
    done: bool,
    /// A `Route` for the global bus: its age does not stall the edge (see [`Outbox::must_stall`]).
    routed: bool,
}

/// What the sync thread shares with the outbox.
#[derive(Debug, Default)]
struct SyncShared {
    /// Files with writes since their last fsync (the active segment is always last).
    files: Mutex<Vec<(PathBuf, File)>>,
    dirty: AtomicBool,
    /// A segment was created: its directory entry needs an fsync of the directory.
    dir: PathBuf,
    dir_dirty: AtomicBool,
    stop: AtomicBool,
}

/// The outbox, owned by the bridge thread.
#[derive(Debug)]
pub struct Outbox {
    cfg: OutboxConfig,
    segments: VecDeque<Segment>,
    active: File,
    next_seq: u64,
    /// Encoded records appended and not yet written.
    pending: Vec<u8>,
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: VecDeque<Slot>,
    unacked_records: u64,
    unacked_bytes: u64,
    /// The highest sequence number written to a segment.
    written_seq: u64,
    watermark_written: u64,
    watermark_at: Instant,
    stats: Arc<OutboxStats>,
    sync: Arc<SyncShared>,
    syncer: Option<JoinHandle<()>>,
    /// Held (locked) while the outbox is open.
    _lock: File,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

/// Encodes one record onto `out`.
fn encode_record(out: &mut Vec<u8>, seq: u64, id: u64, key: &[u8], frame: &[u8]) -> usize {
    let body_len = BODY_PREFIX + key.len() + frame.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(frame);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// A record read back from a segment.
struct Parsed<'a> {
    seq: u64,
    id: u64,
    key: &'a [u8],
    frame: &'a [u8],
    /// Bytes of the whole record.
    len: usize,
}

/// Parses the record at the start of `buf`, or `None` when it is incomplete or does not check.
fn parse_record(buf: &[u8]) -> Option<Parsed<'_>> {
    let head = buf.get(..HEADER_BYTES)?;
    let body_len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
    if !(BODY_PREFIX..=MAX_BODY).contains(&body_len) {
        return None;
    }
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let total = HEADER_BYTES + body_len;
    let rec = buf.get(..total)?;
    if crc32fast::hash(&rec[8..]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(rec[8..16].try_into().ok()?);
    let body = &rec[HEADER_BYTES..];
    let id = u64::from_le_bytes(body[0..8].try_into().ok()?);
    let klen = u16::from_le_bytes(body[8..10].try_into().ok()?) as usize;
    let key = body.get(BODY_PREFIX..BODY_PREFIX + klen)?;
    let frame = &body[BODY_PREFIX + klen..];
    Some(Parsed {
        seq,
        id,
        key,
        frame,
        len: total,
    })
}

fn read_watermark(dir: &Path) -> Option<u64> {
    let mut b = Vec::new();
    File::open(dir.join(TRIM_FILE))
        .ok()?
        .read_to_end(&mut b)
        .ok()?;
    if b.len() != 12 {
        return None;
    }
    let w = u64::from_le_bytes(b[0..8].try_into().ok()?);
    let crc = u32::from_le_bytes(b[8..12].try_into().ok()?);
    (crc32fast::hash(&b[0..8]) == crc).then_some(w)
}

fn write_watermark(dir: &Path, w: u64) -> std::io::Result<()> {
    let tmp = dir.join("trim.tmp");
    let mut b = w.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    std::fs::write(&tmp, &b)?;
    std::fs::rename(&tmp, dir.join(TRIM_FILE))
}

impl Outbox {
    /// Opens (or creates) the outbox in `cfg.dir`, recovers what a previous run left and starts
    /// the sync thread. Returns the records to produce again, in sequence order.
    pub fn open(cfg: OutboxConfig) -> Result<(Outbox, Vec<Replayed>), OutboxError> {
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        // One process per outbox: the lock goes with the process (a kill -9 releases it).
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(OutboxError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        let watermark = read_watermark(&dir).unwrap_or(0);
        let mut names: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
            .map_err(|e| io_err(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first = name.strip_suffix(".log")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut replay = Vec::new();
        let mut segments = VecDeque::new();
        let mut max_seq = 0u64;
        for (_, path) in names {
            let mut data = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(|e| io_err(&path, e))?;
            let mut pos = 0;
            let mut last_seq = 0;
            while pos < data.len() {
                match parse_record(&data[pos..]) {
                    Some(r) if r.seq > max_seq => {
                        if r.seq >= watermark {
                            replay.push(Replayed {
                                seq: r.seq,
                                id: r.id,
                                key: r.key.to_vec(),
                                frame: r.frame.to_vec(),
                            });
                        }
                        max_seq = r.seq;
                        last_seq = r.seq;
                        pos += r.len;
                    }
                    _ => break,
                }
            }
            if pos < data.len() {
                warn!(
                    path = %path.display(),
                    valid_bytes = pos,
                    dropped_bytes = data.len() - pos,
                    "outbox segment has a torn or corrupt tail, truncated"
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(pos as u64))
                    .map_err(|e| io_err(&path, e))?;
            }
            if last_seq == 0 || last_seq < watermark {
                // Empty, or everything in it is at the broker.
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                continue;
            }
            segments.push_back(Segment {
                path,
                last_seq,
                bytes: pos as u64,
            });
        }
        let next_seq = max_seq.max(watermark.saturating_sub(1)) + 1;
        let path = dir.join(segment_name(next_seq));
        let active = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        // Make the new file's name durable before anything lands in it.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        let sync = Arc::new(SyncShared {
            dir: dir.clone(),
            ..SyncShared::default()
        });
        let clone = active.try_clone().map_err(|e| io_err(&path, e))?;
        sync.files
            .lock()
            .map_err(|_| OutboxError::Failed)?
            .push((path.clone(), clone));
        segments.push_back(Segment {
            path,
            last_seq: 0,
            bytes: 0,
        });
        let stats = Arc::new(OutboxStats::default());
        let syncer = {
            let sync = Arc::clone(&sync);
            let stats = Arc::clone(&stats);
            let every = Duration::from_millis(cfg.commit_ms.max(1));
            std::thread::Builder::new()
                .name("iris-outbox-sync".to_owned())
                .spawn(move || sync_loop(&sync, &stats, every))
                .map_err(|e| io_err(&dir, e))?
        };
        let now = iris_bus::hops::unix_micros();
        let mut ob = Outbox {
            cfg,
            segments,
            active,
            next_seq,
            pending: Vec::new(),
            base: replay.first().map_or(next_seq, |r| r.seq),
            slots: VecDeque::new(),
            unacked_records: 0,
            unacked_bytes: 0,
            written_seq: next_seq - 1,
            watermark_written: watermark,
            watermark_at: Instant::now(),
            stats,
            sync,
            syncer: Some(syncer),
            _lock: lock,
        };
        for r in &replay {
            let bytes = HEADER_BYTES + BODY_PREFIX + r.key.len() + r.frame.len();
            ob.track(r.seq, bytes, r.id, now, r.route_region().is_some());
        }
        ob.stats
            .replayed
            .store(replay.len() as u64, Ordering::Relaxed);
        ob.publish();
        if !replay.is_empty() {
            info!(
                records = replay.len(),
                from_seq = ob.base,
                to_seq = max_seq,
                "outbox replays records the broker may not have"
            );
        }
        Ok((ob, replay))
    }

    /// The counters, for `/metrics`.
    pub fn stats(&self) -> Arc<OutboxStats> {
        Arc::clone(&self.stats)
    }

    /// True once a write or fsync failed: nothing more may be accepted.
    pub fn failed(&self) -> bool {
        self.stats.failed.load(Ordering::Relaxed)
    }

    /// Not-acknowledged records.
    pub fn unacked(&self) -> u64 {
        self.unacked_records
    }

    /// Not-acknowledged bytes (headers included).
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked_bytes
    }

    /// True when the not-acknowledged bytes reached `max_bytes`.
    pub fn over_bytes(&self) -> bool {
        self.unacked_bytes >= self.cfg.max_bytes
    }

    /// How long ago the oldest not-acknowledged record was appended (or replayed).
    pub fn oldest_age(&self) -> Option<Duration> {
        let oldest = self.slots.iter().find(|s| !s.done)?;
        Some(Duration::from_micros(
            iris_bus::hops::unix_micros().saturating_sub(oldest.at_micros),
        ))
    }

    /// How long ago the oldest not-acknowledged regional record (not a `Route` for the global
    /// bus) was appended.
    pub fn oldest_regional_age(&self) -> Option<Duration> {
        let oldest = self.slots.iter().find(|s| !s.done && !s.routed)?;
        Some(Duration::from_micros(
            iris_bus::hops::unix_micros().saturating_sub(oldest.at_micros),
        ))
    }

    /// True when the edge must stop accepting: the byte bound, the age bound of the regional
    /// records, or a disk error. Records routed to the global bus have no age bound: a global
    /// bus outage keeps them on disk (up to `max_bytes`) while the region's own traffic goes on.
    pub fn must_stall(&self) -> bool {
        self.failed()
            || self.over_bytes()
            || self
                .oldest_regional_age()
                .is_some_and(|a| a >= Duration::from_millis(self.cfg.stall_ms))
    }

    /// Appends a record (written by the next [`Outbox::write_pending`]) and returns its sequence
    /// number, the ticket to produce it with.
    pub fn append(&mut self, id: u64, key: &[u8], frame: &[u8]) -> Result<u64, OutboxError> {
        self.append_as(id, key, frame, false)
    }

    /// Like [`Self::append`], for a `Route` frame bound for the global bus: its age does not
    /// stall the edge (a global bus outage must not stop the region's own traffic); its bytes
    /// count towards `max_bytes` like any record's.
    pub fn append_routed(&mut self, id: u64, key: &[u8], frame: &[u8]) -> Result<u64, OutboxError> {
        self.append_as(id, key, frame, true)
    }

    fn append_as(
        &mut self,
        id: u64,
        key: &[u8],
        frame: &[u8],
        routed: bool,
    ) -> Result<u64, OutboxError> {
        if self.failed() {
            return Err(OutboxError::Failed);
        }
        if key.len() > usize::from(u16::MAX) {
            return Err(OutboxError::Invalid("key longer than 65535 bytes"));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let n = encode_record(&mut self.pending, seq, id, key, frame);
        self.track(seq, n, id, iris_bus::hops::unix_micros(), routed);
        Ok(seq)
    }

    fn track(&mut self, seq: u64, bytes: usize, id: u64, at_micros: u64, routed: bool) {
        if self.slots.is_empty() {
            self.base = seq;
        }
        // Gaps (records lost to a corrupt segment) count as done.
        while self.base + (self.slots.len() as u64) < seq {
            self.slots.push_back(Slot {
                bytes: 0,
                id: 0,
                at_micros,
                done: true,
                routed: false,
            });
        }
        self.slots.push_back(Slot {
            bytes: bytes as u32,
            id,
            at_micros,
            done: false,
            routed,
        });
        self.unacked_records += 1;
        self.unacked_bytes += bytes as u64;
    }

    /// Writes the appended records to the active segment (one `write`) and rolls it when full;
    /// only then are they counted as appended (a kill -9 of the process no longer loses them).
    /// On error the outbox is failed for good (the caller stops accepting).
    pub fn write_pending(&mut self) -> Result<(), OutboxError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.failed() {
            return Err(OutboxError::Failed);
        }
        if let Err(e) = self.active.write_all(&self.pending) {
            self.fail("write", &e);
            let path = self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            return Err(io_err(&path, e));
        }
        let seg = self.segments.back_mut().ok_or(OutboxError::Failed)?;
        seg.bytes += self.pending.len() as u64;
        let written = (self.next_seq - 1) - self.written_seq;
        self.written_seq = self.next_seq - 1;
        seg.last_seq = self.next_seq - 1;
        self.stats.appended.fetch_add(written, Ordering::Relaxed);
        self.pending.clear();
        if self.pending.capacity() > 4 << 20 {
            self.pending = Vec::new();
        }
        let roll = seg.bytes >= self.cfg.segment_bytes;
        if !self.sync.dirty.swap(true, Ordering::AcqRel) {
            self.wake_syncer();
        }
        if roll {
            self.roll()?;
        }
        Ok(())
    }

    fn fail(&self, what: &str, e: &std::io::Error) {
        if !self.stats.failed.swap(true, Ordering::Relaxed) {
            error!(op = what, error = %e, dir = %self.cfg.dir.display(),
                "outbox write failed: the edge stops accepting messages");
        }
    }

    /// Starts a new segment at `next_seq`.
    fn roll(&mut self) -> Result<(), OutboxError> {
        let path = self.cfg.dir.join(segment_name(self.next_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|f| f.try_clone().map(|c| (f, c)));
        let (file, clone) = match file {
            Ok(f) => f,
            Err(e) => {
                self.fail("roll", &e);
                return Err(io_err(&path, e));
            }
        };
        if let Ok(mut files) = self.sync.files.lock() {
            files.push((path.clone(), clone));
        }
        if !self.sync.dir_dirty.swap(true, Ordering::AcqRel) {
            self.wake_syncer();
        }
        self.active = file;
        self.segments.push_back(Segment {
            path,
            last_seq: 0,
            bytes: 0,
        });
        debug!(segments = self.segments.len(), "outbox segment rolled");
        self.publish();
        Ok(())
    }

    /// The producer is done with record `seq` (acknowledged, or never producible when `acked` is
    /// false). Returns the record's message id (for the hop histogram) the first time.
    pub fn done(&mut self, seq: u64, acked: bool) -> Option<u64> {
        let i = seq.checked_sub(self.base)? as usize;
        let slot = self.slots.get_mut(i)?;
        if slot.done {
            return None;
        }
        slot.done = true;
        let id = slot.id;
        self.unacked_records -= 1;
        self.unacked_bytes -= u64::from(slot.bytes);
        if !acked {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        }
        let before = self.base;
        while self.slots.front().is_some_and(|s| s.done) {
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.is_empty() {
            self.base = self.next_seq;
        }
        if self.base != before {
            self.delete_trimmed();
        }
        Some(id)
    }

    /// The lowest sequence number not known acknowledged.
    pub fn watermark(&self) -> u64 {
        if self.slots.is_empty() {
            self.next_seq
        } else {
            self.base
        }
    }

    /// Deletes the closed segments whose records are all acknowledged.
    fn delete_trimmed(&mut self) {
        let w = self.watermark();
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.last_seq < w) {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            if let Ok(mut files) = self.sync.files.lock() {
                files.retain(|(p, _)| *p != seg.path);
            }
            match std::fs::remove_file(&seg.path) {
                Ok(()) => debug!(path = %seg.path.display(), "outbox segment deleted"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %seg.path.display(), error = %e, "outbox segment not deleted")
                }
            }
        }
    }

    /// Housekeeping for each bridge pass: persists the watermark (see the module doc) and
    /// publishes the gauges.
    pub fn tick(&mut self) {
        let since = self.watermark_at.elapsed();
        let moved = self.watermark().saturating_sub(self.watermark_written);
        if since >= WATERMARK_EVERY || (since >= WATERMARK_MIN_GAP && moved >= WATERMARK_BURST) {
            self.persist_watermark();
        }
        self.publish();
    }

    fn persist_watermark(&mut self) {
        self.watermark_at = Instant::now();
        let w = self.watermark();
        if w != self.watermark_written {
            match write_watermark(&self.cfg.dir, w) {
                Ok(()) => self.watermark_written = w,
                // Harmless: a restart replays more (duplicates, never losses).
                Err(e) => debug!(error = %e, "outbox watermark not written"),
            }
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        s.records.store(self.unacked_records, Ordering::Relaxed);
        s.bytes.store(self.unacked_bytes, Ordering::Relaxed);
        let oldest = self
            .slots
            .iter()
            .find(|s| !s.done)
            .map_or(0, |s| s.at_micros);
        s.oldest_unix_micros.store(oldest, Ordering::Relaxed);
        s.segments
            .store(self.segments.len() as u64, Ordering::Relaxed);
    }

    /// Writes what is pending, fsyncs it, persists the watermark and stops the sync thread.
    /// Returns the records not acknowledged (they are replayed by the next start).
    pub fn close(mut self) -> Result<u64, OutboxError> {
        let written = self.write_pending();
        self.stop_syncer();
        written?;
        if self.failed() {
            return Err(OutboxError::Failed);
        }
        let seg = self.segments.back().ok_or(OutboxError::Failed)?;
        self.active.sync_data().map_err(|e| io_err(&seg.path, e))?;
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.persist_watermark();
        self.publish();
        Ok(self.unacked_records)
    }

    /// Wakes the sync thread from its idle park (it then keeps its `commit_ms` cadence).
    fn wake_syncer(&self) {
        if let Some(t) = &self.syncer {
            t.thread().unpark();
        }
    }

    fn stop_syncer(&mut self) {
        self.sync.stop.store(true, Ordering::Release);
        if let Some(t) = self.syncer.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.stop_syncer();
    }
}

/// The sync thread: every `every`, fsyncs the files written since the last pass; keeps only the
/// active segment's handle afterwards.
/// How long the sync thread parks when nothing was written; a write wakes it at once.
const SYNC_IDLE_PARK: Duration = Duration::from_secs(1);

/// The `iris-outbox-sync` thread: fsyncs what was written, then waits `every` before the next
/// fsync (writes meanwhile wait for it: the cadence bounds the fsyncs per second). With nothing
/// written it parks until the writer wakes it ([`Outbox::wake_syncer`]), so an idle edge does not
/// wake it `1000 / commit_ms` times a second.
fn sync_loop(sync: &SyncShared, stats: &OutboxStats, every: Duration) {
    loop {
        let stop = sync.stop.load(Ordering::Acquire);
        let mut worked = false;
        if sync.dir_dirty.swap(false, Ordering::AcqRel) {
            worked = true;
            // New segments' names, before their first records count as synced.
            if let Err(e) = File::open(&sync.dir).and_then(|d| d.sync_all()) {
                if !stats.failed.swap(true, Ordering::Relaxed) {
                    error!(path = %sync.dir.display(), error = %e,
                        "outbox directory fsync failed: the edge stops accepting messages");
                }
                return;
            }
        }
        if sync.dirty.swap(false, Ordering::AcqRel) {
            worked = true;
            let files: Vec<(PathBuf, File)> = match sync.files.lock() {
                Ok(f) => f
                    .iter()
                    .filter_map(|(p, f)| f.try_clone().ok().map(|c| (p.clone(), c)))
                    .collect(),
                Err(_) => return,
            };
            for (path, f) in &files {
                if let Err(e) = f.sync_data() {
                    if !stats.failed.swap(true, Ordering::Relaxed) {
                        error!(path = %path.display(), error = %e,
                            "outbox fsync failed: the edge stops accepting messages");
                    }
                    return;
                }
            }
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut f) = sync.files.lock() {
                // Rolled segments are complete and synced: only the active one gets writes.
                let keep = f.len().saturating_sub(1);
                let synced: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
                let mut i = 0;
                f.retain(|(p, _)| {
                    i += 1;
                    i > keep || !synced.contains(p)
                });
            }
        }
        if stop {
            return;
        }
        if worked {
            // The whole interval, whatever wakes the thread meanwhile (a write's unpark).
            let until = std::time::Instant::now() + every;
            loop {
                let now = std::time::Instant::now();
                if now >= until || sync.stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::park_timeout(until - now);
            }
        } else {
            // A write (or the stop) unparks it; an unpark that came first returns at once.
            std::thread::park_timeout(SYNC_IDLE_PARK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> OutboxConfig {
        OutboxConfig {
            segment_bytes: 4096,
            ..OutboxConfig::new(dir.join("outbox"))
        }
    }

    fn frame(i: u64) -> Vec<u8> {
        format!("frame-{i}-").repeat(10).into_bytes()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_replayed_route_names_its_region_and_other_frames_none() {
        let deliver = iris_bus::Deliver {
            id: 7,
            recipient: b"bob".to_vec(),
            sender: b"alice".to_vec(),
            payload: b"hi".to_vec(),
            origin: "ra".to_owned(),
            kind: 0,
            confirm: None,
        };
        let routed = iris_bus::BusFrame::Route(iris_bus::Route {
            region: "rb".to_owned(),
            inner: iris_bus::Routed::Deliver(deliver.clone()),
        });
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        let plain = iris_bus::encode(&iris_bus::BusFrame::Deliver(deliver)).unwrap();
        ob.append(7, b"bob", &iris_bus::encode(&routed).unwrap())
            .unwrap();
        ob.append(8, b"bob", &plain).unwrap();
        ob.append(9, b"bob", b"not a frame").unwrap();
        ob.close().unwrap();
        let (_, replay) = Outbox::open(cfg(t.path())).unwrap();
        let regions: Vec<Option<String>> = replay.iter().map(Replayed::route_region).collect();
        assert_eq!(regions, vec![Some("rb".to_owned()), None, None]);
    }

    #[test]
    fn append_write_and_replay_after_restart() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert!(replay.is_empty());
        let mut seqs = Vec::new();
        for i in 0..10 {
            seqs.push(ob.append(100 + i, b"bob", &frame(i)).unwrap());
        }
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
        ob.write_pending().unwrap();
        assert_eq!(ob.unacked(), 10);
        // A kill -9: no close, nothing but the written bytes survive.
        drop(ob); // as a kill -9: no pending write, no watermark, no fsync
        let (ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert_eq!(replay.len(), 10);
        for (i, r) in replay.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.id, 100 + i as u64);
            assert_eq!(r.key, b"bob");
            assert_eq!(r.frame, frame(i as u64));
        }
        assert_eq!(ob.unacked(), 10);
        assert_eq!(ob.stats().snapshot().replayed, 10);
        // New records continue the sequence.
        let mut ob = ob;
        assert_eq!(ob.append(1, b"x", b"y").unwrap(), 11);
    }

    #[test]
    fn fsyncs_happen_within_the_commit_window() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        ob.append(1, b"a", b"b").unwrap();
        ob.write_pending().unwrap();
        let stats = ob.stats();
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.fsyncs.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(stats.fsyncs.load(Ordering::Relaxed) >= 1);
        assert_eq!(ob.close().unwrap(), 1);
    }

    #[test]
    fn torn_tail_is_truncated_and_ignored() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        for i in 0..3 {
            ob.append(i, b"k", &frame(i)).unwrap();
        }
        ob.write_pending().unwrap();
        drop(ob);
        let dir = t.path().join("outbox");
        let seg = segment_files(&dir).pop().unwrap();
        let good = std::fs::metadata(&seg).unwrap().len();
        // Half a record at the end, as a crash mid-write leaves it.
        let mut extra = Vec::new();
        encode_record(&mut extra, 4, 9, b"k", &frame(9));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&extra[..extra.len() / 2]).unwrap();
        drop(f);
        let (mut ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert_eq!(replay.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
        assert_eq!(ob.append(0, b"k", b"f").unwrap(), 4);
        drop(ob);
        // A flipped byte inside a record ends the segment there, too.
        let mut data = std::fs::read(&seg).unwrap();
        let second = HEADER_BYTES + BODY_PREFIX + 1 + frame(0).len();
        data[second + HEADER_BYTES + 3] ^= 0x55;
        std::fs::write(&seg, &data).unwrap();
        let (_ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert_eq!(replay.iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn acked_records_are_trimmed_and_segments_deleted() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("outbox");
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        // ~130-byte records, 4 KiB segments: 100 records make several segments.
        for i in 0..100 {
            ob.append(i, b"user", &frame(i)).unwrap();
            ob.write_pending().unwrap();
        }
        let segs = segment_files(&dir).len();
        assert!(segs >= 3, "{segs} segments");
        assert_eq!(ob.stats().snapshot().segments, segs as u64);
        // Out of order: acking 2..=100 keeps every segment (seq 1 holds the first).
        for s in 2..=100 {
            assert_eq!(ob.done(s, true), Some(s - 1));
        }
        assert_eq!(ob.done(5, true), None, "reported twice");
        assert_eq!(ob.watermark(), 1);
        assert_eq!(segment_files(&dir).len(), segs);
        assert_eq!(ob.unacked(), 1);
        ob.done(1, true);
        assert_eq!(ob.unacked(), 0);
        assert_eq!(ob.unacked_bytes(), 0);
        assert_eq!(ob.watermark(), 101);
        // Only the active segment is left.
        assert_eq!(segment_files(&dir).len(), 1);
        ob.tick();
        assert_eq!(ob.stats().snapshot().segments, 1);
    }

    #[test]
    fn watermark_limits_the_replay() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        for i in 0..20 {
            ob.append(i, b"u", &frame(i)).unwrap();
        }
        ob.write_pending().unwrap();
        for s in 1..=12 {
            ob.done(s, true);
        }
        // Acked out of order behind 13: replayed again (a bounded duplicate).
        ob.done(15, true);
        std::thread::sleep(WATERMARK_EVERY);
        ob.tick();
        assert_eq!(read_watermark(&t.path().join("outbox")), Some(13));
        // Acked after the last watermark write: replayed again too.
        ob.done(13, true);
        drop(ob); // as a kill -9: no pending write, no watermark, no fsync
        let (ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert_eq!(
            replay.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (13..=20).collect::<Vec<_>>()
        );
        assert_eq!(ob.watermark(), 13);
        // A clean close persists the watermark: nothing acked comes back.
        let mut ob = ob;
        for s in 13..=20 {
            ob.done(s, true);
        }
        assert_eq!(ob.close().unwrap(), 0);
        let (ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert!(replay.is_empty());
        assert_eq!(ob.watermark(), 21);
    }

    #[test]
    fn a_burst_of_acks_moves_the_watermark_sooner() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        let n = WATERMARK_BURST + 10;
        for i in 0..n {
            ob.append(i, b"u", b"f").unwrap();
        }
        ob.write_pending().unwrap();
        ob.tick();
        std::thread::sleep(WATERMARK_MIN_GAP);
        for s in 1..=10 {
            ob.done(s, true);
        }
        for s in 11..=n {
            ob.done(s, true);
        }
        std::thread::sleep(WATERMARK_MIN_GAP);
        ob.tick();
        // Without waiting for WATERMARK_EVERY.
        assert_eq!(read_watermark(&t.path().join("outbox")), Some(n + 1));
    }

    #[test]
    fn a_corrupt_watermark_replays_everything() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        for i in 0..5 {
            ob.append(i, b"u", &frame(i)).unwrap();
        }
        ob.write_pending().unwrap();
        ob.done(1, true);
        ob.done(2, true);
        ob.close().unwrap();
        std::fs::write(t.path().join("outbox").join(TRIM_FILE), b"garbage").unwrap();
        let (_ob, replay) = Outbox::open(cfg(t.path())).unwrap();
        assert_eq!(replay.len(), 5);
    }

    #[test]
    fn bounds_stall_on_bytes_and_age() {
        let t = tempfile::tempdir().unwrap();
        let c = OutboxConfig {
            max_bytes: 1000,
            stall_ms: 50,
            ..cfg(t.path())
        };
        let (mut ob, _) = Outbox::open(c).unwrap();
        assert!(!ob.must_stall());
        let mut seqs = Vec::new();
        while !ob.over_bytes() {
            seqs.push(ob.append(0, b"u", &frame(0)).unwrap());
        }
        assert!(ob.unacked_bytes() >= 1000);
        assert!(ob.must_stall());
        for s in &seqs {
            ob.done(*s, true);
        }
        assert!(!ob.must_stall());
        ob.append(0, b"u", b"f").unwrap();
        assert!(!ob.must_stall());
        std::thread::sleep(Duration::from_millis(60));
        assert!(ob.oldest_age().unwrap() >= Duration::from_millis(50));
        assert!(ob.must_stall());
        ob.tick();
        assert!(ob.stats().snapshot().oldest_age_micros >= 50_000);
    }

    /// A record routed to the global bus does not stall by age (a global outage must not stop
    /// the region's own traffic), also after a restart replays it; its bytes still count, and a
    /// regional record still stalls by age behind it.
    #[test]
    fn routed_records_do_not_stall_by_age() {
        let routed = iris_bus::encode(&iris_bus::BusFrame::Route(iris_bus::Route {
            region: "rb".to_owned(),
            inner: iris_bus::Routed::Ack(iris_bus::Ack {
                user: b"bob".to_vec(),
                id: 1,
            }),
        }))
        .unwrap();
        let t = tempfile::tempdir().unwrap();
        let c = OutboxConfig {
            stall_ms: 50,
            ..cfg(t.path())
        };
        let (mut ob, _) = Outbox::open(c.clone()).unwrap();
        ob.append_routed(1, b"bob", &routed).unwrap();
        ob.write_pending().unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(ob.oldest_age().unwrap() >= Duration::from_millis(50));
        assert!(ob.oldest_regional_age().is_none());
        assert!(!ob.must_stall(), "a routed record stalled by age");
        ob.close().unwrap();
        let (mut ob, replay) = Outbox::open(c).unwrap();
        assert_eq!(replay.len(), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(!ob.must_stall(), "a replayed routed record stalled by age");
        let s = ob.append(2, b"u", &frame(2)).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(ob.must_stall(), "a regional record behind it stalls by age");
        ob.done(s, true);
        assert!(!ob.must_stall());
    }

    #[test]
    fn a_write_error_fails_the_outbox() {
        let t = tempfile::tempdir().unwrap();
        let (mut ob, _) = Outbox::open(cfg(t.path())).unwrap();
        // A read-only handle in place of the segment: the next write fails.
        let seg = segment_files(&t.path().join("outbox")).pop().unwrap();
        ob.active = File::open(&seg).unwrap();
        ob.append(1, b"u", b"f").unwrap();
        assert!(ob.write_pending().is_err());
        assert!(ob.failed());
        assert!(ob.must_stall());
        assert!(matches!(ob.append(2, b"u", b"f"), Err(OutboxError::Failed)));
        assert!(ob.stats().snapshot().failed);
    }

    /// Garbage after valid records, and records cut at every byte, never panic the recovery:
    /// the valid prefix comes back and the rest is truncated.
    #[test]
    fn recovery_survives_garbage_and_every_cut() {
        let mut rec = Vec::new();
        for i in 0..3 {
            encode_record(&mut rec, i + 1, i, b"key", &frame(i));
        }
        let one = rec.len() / 3;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for cut in (0..rec.len()).step_by(7).chain([rec.len()]) {
            let t = tempfile::tempdir().unwrap();
            let dir = t.path().join("outbox");
            std::fs::create_dir_all(&dir).unwrap();
            let mut data = rec[..cut].to_vec();
            // Pseudo-random garbage after the cut.
            for _ in 0..(cut % 50) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(x as u8);
            }
            std::fs::write(dir.join(segment_name(1)), &data).unwrap();
            let (mut ob, replay) = Outbox::open(cfg(t.path())).unwrap();
            assert_eq!(replay.len(), cut / one, "cut at {cut}");
            let seq = ob.append(9, b"k", b"f").unwrap();
            assert!(seq > replay.len() as u64);
            ob.write_pending().unwrap();
        }
    }

    #[test]
    fn a_second_open_of_the_same_outbox_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(cfg(t.path())).unwrap();
        assert!(matches!(
            Outbox::open(cfg(t.path())),
            Err(OutboxError::Locked(_))
        ));
        drop(ob);
        Outbox::open(cfg(t.path())).unwrap();
    }

    #[test]
    fn gate_counts_stalls() {
        let g = AcceptGate::default();
        assert!(!g.stalled());
        assert!(g.set(true));
        assert!(!g.set(true));
        let w = g.load();
        assert!(AcceptGate::is_stalled(w));
        assert_eq!(AcceptGate::epoch(w), 1);
        assert!(!g.set(false));
        assert!(!g.stalled());
        g.set(true);
        assert_eq!(AcceptGate::epoch(g.load()), 2);
    }
}
