//! Edge configuration: one TOML file (`--config FILE`) plus command-line flags that override it.
//!
//! Every key has a documented default (see `docs/CONFIG.md` and [`EdgeConfig::default`]), units
//! are part of the key names (`_ms`, `_us`, `_bytes`), and unknown keys are rejected so a typo
//! never silently falls back to a default. `iris-edge --check` loads, validates and prints the
//! effective configuration, then exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iris_bus::home::Homes;

use serde::{Deserialize, Serialize};

/// The whole edge configuration. The TOML file has the same shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// Client protocol listener (`0.0.0.0:8085`). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Admin HTTP listener for `/metrics` and `/health` (`127.0.0.1:9085`).
    pub admin: SocketAddr,
    /// Where the embedded store keeps its files, and in cluster mode the outbox (`./data`).
    pub data_dir: PathBuf,
    /// Number of shards; 0 means one per CPU this process may run on (0).
    pub shards: usize,
    /// CPUs to pin shards to, in shard order; empty means the CPUs this process may run on,
    /// shard `i` on the `i % n`-th of them (empty).
    pub cpus: Vec<usize>,
    /// Locked memory glommio registers per shard for I/O buffers (524288 = 512 KiB).
    pub io_memory_bytes: usize,
    /// io_uring submission queue depth per ring (128).
    pub ring_depth: usize,
    /// How long a sleeping shard waits to gather a batch of socket events before it wakes, in
    /// microseconds (200). A shard that slept longer than this wakes at its first event; one that
    /// goes back to sleep right after a turn takes what comes in the next `batch_wait_us` in one
    /// wake-up. Fewer wake-ups (less CPU per message when traffic is sparse) for up to this
    /// much added latency. Needs Linux 6.12; 0, or an older kernel, wakes at the first event.
    /// At most 10000.
    pub batch_wait_us: u64,
    /// Capacity of each shard-to-shard ring, in batches (1024).
    pub ring_capacity: usize,
    /// Largest input a connection may buffer; bigger frames are refused (1114112 = 1 MiB + 64 KiB).
    pub max_input_bytes: usize,
    /// Largest output queued for a connection; a client that lets it fill up is disconnected and
    /// its undelivered messages stay stored (4194304 = 4 MiB).
    pub max_output_bytes: usize,
    /// Largest output queued for all the connections of one shard together. Over it,
    /// connections are disconnected as slow consumers until the shard is back under seven
    /// eighths of it, those whose output is stuck first, the largest first
    /// (268435456 = 256 MiB; at least `max_output_bytes`).
    pub max_output_bytes_per_shard: usize,
    /// A login drain asks the store for the next chunk only while the connection's queued output
    /// is below this (262144 = 256 KiB).
    pub drain_low_water_bytes: usize,
    /// Messages per drain chunk (1024).
    pub drain_chunk: usize,
    /// Payload bytes per drain chunk, at most; one message always fits (1048576 = 1 MiB).
    pub drain_chunk_bytes: usize,
    /// LOGIN carries no length: its body is what arrived with it. The edge waits this long after
    /// a LOGIN's first byte for the rest of a login split over several TCP segments (500); with
    /// auth on, not for a LOGIN that is exactly a user and a whole token (`auth::is_whole_login`).
    pub login_settle_us: u64,
    /// Group-commit window of the embedded store: a message lives only in memory at most this
    /// long after it is accepted (2).
    pub commit_window_ms: u64,
    /// Capacity of each shard's request queue to the core (65536).
    pub core_queue_capacity: usize,
    /// On SIGTERM/SIGINT, how long connections get to flush queued output (2000).
    pub drain_timeout_ms: u64,
    /// A connection that has not logged in after this long is closed (10000).
    pub login_timeout_ms: u64,
    /// A logged-in connection holding a partial frame or unsent output that makes no progress
    /// (no byte read or written) for this long is closed (30000).
    pub idle_timeout_ms: u64,
    /// Unknown opcodes a connection may send within `unknown_opcode_window_ms` (each answered
    /// with `0xFE unknown_opcode`, the rest of that read discarded); one more closes it (16).
    pub unknown_opcode_limit: u32,
    /// The window of `unknown_opcode_limit` (1000).
    pub unknown_opcode_window_ms: u64,
    /// TYPING frames relayed per connection and second, on average; more are dropped (10).
    pub typing_relays_per_sec: u32,
    /// TYPING frames a connection may send at once before `typing_relays_per_sec` applies (32).
    pub typing_relay_burst: u32,
    /// Requests with a reply (prekey fetches) a shard may have outstanding at the core; at the
    /// bound its connections stop reading (1024).
    pub max_pending_replies: usize,
    /// Offline users whose last-seen time the edge remembers, over all shards; the oldest are
    /// forgotten first and then read as never seen (1000000).
    pub presence_last_seen_max: usize,
    /// Bounds of the embedded store per recipient: quota and message lifetime.
    pub store: StoreConfig,
    /// Optional JWT authentication of LOGIN `user:token`.
    pub auth: AuthConfig,
    /// Where messages go beyond this box: the embedded core (default) or a regional cluster.
    pub cluster: ClusterConfig,
    /// Protocol v2 (docs/PROTOCOL-v2.md): its listener and limits; off unless `v2.listen` is set.
    pub v2: V2Config,
    /// Client rate limits beyond the per-connection ones (`[rate_limits]`).
    pub rate_limits: RateLimits,
}

/// Token-bucket rate limits (`[rate_limits]`), v1 and v2 alike: over a limit the action is
/// refused with `0xFF RATE_LIMITED u32 retry_after_ms` (v1) or `RATE_LIMITED` (v2) and the
/// connection stays open, except for a login, which is refused and closed (v1: raw
/// `RATE_LIMITED`). A rate of 0 turns a limit off. Buckets are kept per shard (a user's sessions
/// on `n` shards get up to `n` times a per-user rate).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// LOGINs and HELLOs per second from one source address (0: off, the default: behind a
    /// load balancer every client shares its address) (0).
    pub logins_per_sec_per_address: u32,
    /// Logins from one address at once before the rate applies (20).
    pub login_burst_per_address: u32,
    /// Messages per second one user may send, over all its connections on a shard (0: off) (0).
    pub sends_per_sec_per_user: u32,
    /// Messages a user may send at once before the rate applies (2000).
    pub send_burst_per_user: u32,
    /// Messages per second on one v1 connection (0: off, the default, as v1 clients may not
    /// expect a refusal) (0). v2 connections have `v2.send_rate_per_sec`.
    pub v1_sends_per_sec: u32,
    /// v1 messages at once before `v1_sends_per_sec` applies (2000).
    pub v1_send_burst: u32,
    /// Prekey fetches per second on one connection (20).
    pub prekey_fetches_per_sec: u32,
    /// Prekey fetches at once before the rate applies (100).
    pub prekey_fetch_burst: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            logins_per_sec_per_address: 0,
            login_burst_per_address: 20,
            sends_per_sec_per_user: 0,
            send_burst_per_user: 2_000,
            v1_sends_per_sec: 0,
            v1_send_burst: 2_000,
            prekey_fetches_per_sec: 20,
            prekey_fetch_burst: 100,
        }
    }
}

/// Protocol v2 (`[v2]`): framed, acknowledged to the sender (docs/PROTOCOL-v2.md). Served beside
/// v1 by the same shards, on its own port, in the embedded deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct V2Config {
    /// Plain-TCP v2 listener; none (the default) serves no v2. Port 0 picks a free port.
    pub listen: Option<SocketAddr>,
    /// v2 over TLS (1.2 or 1.3) listener; none (the default) serves none. Needs
    /// `tls_cert_file` and `tls_key_file`.
    pub tls_listen: Option<SocketAddr>,
    /// v2 over WebSocket (`ws://`, one frame per binary message) listener (none).
    pub ws_listen: Option<SocketAddr>,
    /// v2 over WebSocket over TLS (`wss://`) listener (none). Needs `tls_cert_file` and
    /// `tls_key_file`.
    pub wss_listen: Option<SocketAddr>,
    /// PEM file of the certificate chain (leaf first) for `tls_listen` and `wss_listen`; read
    /// again on SIGHUP (none).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`; read again on
    /// SIGHUP (none).
    pub tls_key_file: Option<PathBuf>,
    /// TLS session resumption with stateless tickets (true): each full handshake ends with one
    /// ticket, sealed with a key only this process holds (rotated every 6 hours, a ticket lives
    /// 12; a certificate reload starts a new key), and a client that reconnects to this process
    /// with it skips the certificate and its signature (the key exchange is still done: forward
    /// secrecy holds). Off: no tickets, no session cache; every handshake is a full one.
    pub tls_session_tickets: bool,
    /// Largest frame (`len` field) a client may send; larger is an error and a close; at
    /// least 262656 (256 KiB + 512, so every v1 message fits a DELIVER) (1049088 = 1 MiB + 512).
    /// Announced in HELLO_OK.
    pub max_frame_bytes: u32,
    /// The server PINGs a silent connection this often; one silent for three intervals is
    /// closed (30000). Announced in HELLO_OK.
    pub ping_interval_ms: u32,
    /// SENDs per connection and second, on average; more are answered RATE_LIMITED and not
    /// accepted (1000). Announced in HELLO_OK.
    pub send_rate_per_sec: u32,
    /// SENDs a connection may make at once before `send_rate_per_sec` applies (2000).
    pub send_burst: u32,
    /// SENDs of one connection waiting for their SEND_ACK; at the bound the connection reads
    /// nothing more until acks come (4096).
    pub max_unconfirmed_sends: u32,
    /// The read buffer of each WebSocket connection (`ws_listen`, `wss_listen`): tungstenite
    /// keeps it for the connection's life and reads at most this much at a time, so a larger
    /// message takes several reads; 256 to 1048576 (1024).
    pub ws_read_buffer_bytes: u32,
}

impl V2Config {
    /// Whether any v2 listener (TCP, TLS, WebSocket, WebSocket over TLS) is configured.
    pub fn serves(&self) -> bool {
        self.listen.is_some()
            || self.tls_listen.is_some()
            || self.ws_listen.is_some()
            || self.wss_listen.is_some()
    }
}

impl Default for V2Config {
    fn default() -> Self {
        Self {
            listen: None,
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_session_tickets: true,
            ws_read_buffer_bytes: 1024,
            max_frame_bytes: iris_wire::v2::DEFAULT_MAX_FRAME_BYTES as u32,
            ping_interval_ms: 30_000,
            send_rate_per_sec: 1_000,
            send_burst: 2_000,
            max_unconfirmed_sends: 4_096,
        }
    }
}

/// Which core the edge talks to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// The in-process core with its embedded store under `data_dir` (one box, no services).
    #[default]
    Embedded,
    /// A regional cluster: Kafka bus, `iris-core` nodes, Redis sessions.
    Kafka,
}

/// Cluster mode (`bus = "kafka"`): the edge publishes to Kafka and reads its inbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `embedded` or `kafka` ("embedded").
    pub bus: BusKind,
    /// Kafka bootstrap servers, `host:port[,host:port]` ("127.0.0.1:19092").
    pub brokers: String,
    /// Redis URL of the session store ("redis://127.0.0.1:6379").
    pub redis_url: String,
    /// Region name, `[a-z0-9-]`, not `global` ("local").
    pub region: String,
    /// This edge's node id in the region, 0 to 255; names its inbox topic and is part of every
    /// message id it mints (1).
    pub node_id: u32,
    /// Partitions of the deliver and presence topics if this edge creates them (16).
    pub partitions: u32,
    /// Producer `linger.ms`: the longest a message waits to fill a batch (1).
    pub linger_ms: u32,
    /// Producer compression: `none`, `lz4` or `zstd` ("lz4").
    pub compression: String,
    /// Frames the producer ring holds before the edge stops reading clients (65536).
    pub producer_ring_capacity: usize,
    /// CPU to pin the Kafka producer thread to; -1 leaves it unpinned (-1).
    pub producer_cpu: i64,
    /// Consumer `fetch.wait.max.ms`: the longest a fetch of the inbox and presence waits at the
    /// broker (5). A broker that answers a waiting fetch only at this deadline (tansu) adds up to
    /// this much latency; Kafka answers as soon as data arrives, so 500 costs nothing there and
    /// saves the idle fetches.
    pub fetch_wait_max_ms: u32,
    /// Outbox (`{data_dir}/outbox`, every accepted message until the broker acknowledged it):
    /// longest time between a write and its fsync (2). A kill -9 of the edge loses nothing
    /// written; a machine crash at most this window.
    pub outbox_commit_ms: u64,
    /// Outbox segment size: a segment rolls at this size and is deleted once all of it is
    /// acknowledged (67108864 = 64 MiB).
    pub outbox_segment_bytes: u64,
    /// Not-acknowledged outbox bytes at which the edge stops reading clients
    /// (268435456 = 256 MiB).
    pub outbox_max_bytes: u64,
    /// Age of the oldest not-acknowledged message at which the edge stops reading clients and
    /// tells them RATE_LIMITED (5000).
    pub bus_stall_ms: u64,
    /// Send the live copy of a message straight to the inbox of every other edge the presence
    /// topic shows holding the recipient (one broker hop), besides the stored copy to the core
    /// (true). Off: only the core routes live copies (two hops, one produce fewer per message).
    pub direct_live: bool,
    /// The ordered, append-only region list of a federated deployment; a region's index in it
    /// is part of every message id. Must contain `region` when not empty; at most 16. Empty:
    /// a single region, no global bus ([]).
    pub regions: Vec<String>,
    /// Kafka bootstrap servers of the global bus (`iris.global.route.{region}` topics);
    /// required when more than one region is listed ("").
    pub global_brokers: String,
    /// Home table file: one `user region` pair per line overriding the rendezvous home of
    /// those users (see docs/REGIONS.md); empty = none ("").
    pub home_table_file: String,
}

impl ClusterConfig {
    /// This region's index in the region list (0 when the list is empty or, before
    /// validation, when the region is missing from it): the region bits of minted ids.
    pub fn region_index(&self) -> u32 {
        self.regions
            .iter()
            .position(|r| *r == self.region)
            .map_or(0, |i| i as u32)
    }

    /// Builds the homes of this configuration (region list, own region, home table loaded from
    /// `home_table_file`), refusing an unknown region anywhere.
    pub fn homes(&self) -> Result<Arc<Homes>, ConfigError> {
        let table = if self.home_table_file.is_empty() {
            HashMap::new()
        } else {
            Homes::load_table(Path::new(&self.home_table_file))
                .map_err(|e| ConfigError::Invalid(format!("cluster.home_table_file: {e}")))?
        };
        let homes = Homes::new(&self.region, &self.regions, table)
            .map_err(|e| ConfigError::Invalid(format!("cluster: {e}")))?;
        if homes.is_multi() && self.global_brokers.trim().is_empty() {
            return Err(ConfigError::Invalid(format!(
                "cluster.global_brokers must name at least one broker when more than one region \
                 is listed (regions = {:?})",
                self.regions
            )));
        }
        Ok(Arc::new(homes))
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            bus: BusKind::Embedded,
            brokers: "127.0.0.1:19092".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            region: "local".to_owned(),
            node_id: 1,
            partitions: 16,
            linger_ms: 1,
            compression: "lz4".to_owned(),
            producer_ring_capacity: 65_536,
            producer_cpu: -1,
            fetch_wait_max_ms: 5,
            outbox_commit_ms: 2,
            outbox_segment_bytes: 64 << 20,
            direct_live: true,
            outbox_max_bytes: 256 << 20,
            bus_stall_ms: 5_000,
            regions: Vec::new(),
            global_brokers: String::new(),
            home_table_file: String::new(),
        }
    }
}

/// Bounds of the embedded store (`[store]`), so that nobody can fill the disk by sending to
/// names that never log in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most messages stored for one recipient; one more is refused with
    /// `0xFE recipient_inbox_full` to its sender and not stored. 0 = no limit (100000).
    pub max_messages_per_user: u64,
    /// Most payload bytes stored for one recipient, likewise. 0 = no limit
    /// (268435456 = 256 MiB).
    pub max_bytes_per_user: u64,
    /// A message not acked this long after it was accepted is never delivered again and is
    /// deleted (at its recipient's next login, or by the background sweep). 0 = forever
    /// (2592000 = 30 days).
    pub message_ttl_secs: u64,
    /// How long the store remembers a v2 send's client message id (its dedup record): a
    /// resend within this time, even after a restart, is acknowledged with the first id and
    /// neither stored nor delivered again. Older records are deleted by a background sweep.
    /// 0 = kept forever (86400 = 24 h).
    pub dedup_ttl_secs: u64,
    /// The hot tier's period: a message whose ack misses the commit window is written to the
    /// hot log (one append, synced at the commit) and kept in memory; one acked within one to
    /// two periods never reaches the LSM, one not acked by then is moved into it. 0 = every
    /// message goes to the LSM at its commit (1).
    pub hot_log_secs: u64,
    /// Most memory the hot tier may hold (names, payloads, ~160 B of index per message); over
    /// it, messages go to the LSM directly (67108864 = 64 MiB).
    pub hot_log_max_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_messages_per_user: 100_000,
            max_bytes_per_user: 256 << 20,
            message_ttl_secs: 30 * 24 * 3600,
            dedup_ttl_secs: 24 * 3600,
            hot_log_secs: 1,
            hot_log_max_bytes: 64 << 20,
        }
    }
}

/// LOGIN authentication (PROTOCOL.md "Auth"): off unless `enabled`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require `user:token` with a valid HS256 JWT (false).
    pub enabled: bool,
    /// HMAC secret, at least 32 bytes (empty).
    pub secret: String,
    /// Expected `iss` claim ("iris").
    pub issuer: String,
    /// Clock skew tolerated on `exp`/`nbf` (30000).
    pub leeway_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            secret: String::new(),
            issuer: "iris".to_owned(),
            leeway_ms: 30_000,
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8085)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9085)),
            data_dir: PathBuf::from("./data"),
            shards: 0,
            cpus: Vec::new(),
            io_memory_bytes: 512 << 10,
            ring_depth: 128,
            batch_wait_us: 200,
            ring_capacity: 1024,
            max_input_bytes: (1 << 20) + (64 << 10),
            max_output_bytes: 4 << 20,
            max_output_bytes_per_shard: 256 << 20,
            drain_low_water_bytes: 256 << 10,
            drain_chunk: 1024,
            drain_chunk_bytes: 1 << 20,
            login_settle_us: 500,
            commit_window_ms: 2,
            core_queue_capacity: 65_536,
            drain_timeout_ms: 2_000,
            login_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            unknown_opcode_limit: 16,
            unknown_opcode_window_ms: 1_000,
            typing_relays_per_sec: 10,
            typing_relay_burst: 32,
            max_pending_replies: 1024,
            presence_last_seen_max: 1_000_000,
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            cluster: ClusterConfig::default(),
            v2: V2Config::default(),
            rate_limits: RateLimits::default(),
        }
    }
}

/// A configuration that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl EdgeConfig {
    /// Loads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks the values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.shards > crate::idgen::MAX_SHARDS {
            return bad(format!(
                "shards = {} exceeds {} (message ids carry the shard in 6 bits)",
                self.shards,
                crate::idgen::MAX_SHARDS
            ));
        }
        let largest = crate::protocol::decode::largest_frame(&crate::protocol::Limits::default());
        if self.max_input_bytes < largest {
            return bad(format!(
                "max_input_bytes = {} is below the largest legal v1 frame ({largest} bytes: a 1 MiB \
                 batch to a 256-byte target)",
                self.max_input_bytes
            ));
        }
        if self.idle_timeout_ms < 100 || self.login_timeout_ms == 0 {
            return bad("idle_timeout_ms must be at least 100 and login_timeout_ms > 0".to_owned());
        }
        if self.unknown_opcode_limit == 0 || self.unknown_opcode_window_ms == 0 {
            return bad("unknown_opcode_limit and unknown_opcode_window_ms must be > 0".to_owned());
        }
        if self.typing_relays_per_sec == 0
            || self.typing_relay_burst == 0
            || self.max_pending_replies == 0
        {
            return bad(
                "typing_relays_per_sec, typing_relay_burst and max_pending_replies must be > 0"
                    .to_owned(),
            );
        }
        if self.max_output_bytes < 128 << 10 {
            return bad("max_output_bytes must be at least 131072".to_owned());
        }
        if self.max_output_bytes_per_shard < self.max_output_bytes {
            return bad("max_output_bytes_per_shard must be at least max_output_bytes".to_owned());
        }
        if self.drain_low_water_bytes >= self.max_output_bytes {
            return bad("drain_low_water_bytes must be below max_output_bytes".to_owned());
        }
        if self.drain_chunk == 0 || self.ring_capacity == 0 || self.core_queue_capacity == 0 {
            return bad(
                "drain_chunk, ring_capacity and core_queue_capacity must be > 0".to_owned(),
            );
        }
        if self.batch_wait_us > 10_000 {
            return bad("batch_wait_us must be at most 10000".to_owned());
        }
        if self.ring_depth == 0 || self.io_memory_bytes < 64 << 10 {
            return bad("ring_depth must be > 0 and io_memory_bytes at least 65536".to_owned());
        }
        let v2 = &self.v2;
        if v2.serves() {
            if (v2.max_frame_bytes as usize) < iris_wire::v2::MIN_MAX_FRAME_BYTES
                || v2.ping_interval_ms < 100
            {
                return bad(format!(
                    "v2.max_frame_bytes must be at least {} and v2.ping_interval_ms at least 100",
                    iris_wire::v2::MIN_MAX_FRAME_BYTES
                ));
            }
            if !(256..=1 << 20).contains(&v2.ws_read_buffer_bytes) {
                return bad("v2.ws_read_buffer_bytes must be 256 to 1048576".to_owned());
            }
            if v2.send_rate_per_sec == 0 || v2.send_burst == 0 || v2.max_unconfirmed_sends == 0 {
                return bad(
                    "v2.send_rate_per_sec, v2.send_burst and v2.max_unconfirmed_sends must be > 0"
                        .to_owned(),
                );
            }
        }
        if v2.tls_listen.is_some() || v2.wss_listen.is_some() {
            let (Some(cert), Some(key)) = (&v2.tls_cert_file, &v2.tls_key_file) else {
                return bad(
                    "v2.tls_listen and v2.wss_listen need v2.tls_cert_file and v2.tls_key_file \
                     (PEM files)"
                        .to_owned(),
                );
            };
            // The files are read and parsed here too, so `--check` catches a missing or bad one.
            if let Err(e) = crate::tls::load_server_config(cert, key) {
                return bad(format!("v2 TLS: {e}"));
            }
        }
        let r = &self.rate_limits;
        for (rate, burst, name) in [
            (
                r.logins_per_sec_per_address,
                r.login_burst_per_address,
                "login",
            ),
            (r.sends_per_sec_per_user, r.send_burst_per_user, "send"),
            (r.v1_sends_per_sec, r.v1_send_burst, "v1_send"),
            (
                r.prekey_fetches_per_sec,
                r.prekey_fetch_burst,
                "prekey_fetch",
            ),
        ] {
            if rate > 0 && burst == 0 {
                return bad(format!(
                    "rate_limits: the {name} burst must be > 0 when its rate is set"
                ));
            }
        }
        let st = &self.store;
        if st.max_bytes_per_user > 0 && st.max_bytes_per_user < 65_535 {
            return bad(format!(
                "store.max_bytes_per_user = {} must be 0 (no limit) or at least 65535 (one \
                 largest message)",
                st.max_bytes_per_user
            ));
        }
        if self.auth.enabled && self.auth.secret.len() < 32 {
            return bad("auth.secret must be at least 32 bytes when auth.enabled".to_owned());
        }
        let c = &self.cluster;
        if c.node_id > crate::idgen::MAX_NODE {
            return bad(format!(
                "cluster.node_id = {} exceeds {} (message ids carry the node in 8 bits)",
                c.node_id,
                crate::idgen::MAX_NODE
            ));
        }
        if c.bus == BusKind::Kafka {
            if !iris_bus::topics::is_valid_region(&c.region) {
                return bad(format!(
                    "cluster.region = {:?}: 1 to 64 of [a-z0-9-], not \"global\"",
                    c.region
                ));
            }
            if c.brokers.trim().is_empty() {
                return bad("cluster.brokers must name at least one broker".to_owned());
            }
            if !c.redis_url.starts_with("redis://") && !c.redis_url.starts_with("rediss://") {
                return bad(format!(
                    "cluster.redis_url = {:?} must start with redis://",
                    c.redis_url
                ));
            }
            if !["none", "lz4", "zstd"].contains(&c.compression.as_str()) {
                return bad(format!(
                    "cluster.compression = {:?}: none, lz4 or zstd",
                    c.compression
                ));
            }
            if c.fetch_wait_max_ms == 0 || c.fetch_wait_max_ms > 60_000 {
                return bad("cluster.fetch_wait_max_ms must be 1 to 60000".to_owned());
            }
            if c.outbox_commit_ms == 0 || c.outbox_commit_ms > 1_000 {
                return bad("cluster.outbox_commit_ms must be 1 to 1000".to_owned());
            }
            if c.outbox_segment_bytes < 64 << 10 || c.outbox_max_bytes < 1 << 20 {
                return bad("cluster.outbox_segment_bytes must be at least 65536 and \
                     cluster.outbox_max_bytes at least 1048576"
                    .to_owned());
            }
            if c.bus_stall_ms < 100 {
                return bad("cluster.bus_stall_ms must be at least 100".to_owned());
            }
            if c.partitions == 0 || c.producer_ring_capacity == 0 {
                return bad(
                    "cluster.partitions and cluster.producer_ring_capacity must be > 0".to_owned(),
                );
            }
        }
        if c.bus == BusKind::Kafka || !c.regions.is_empty() || !c.home_table_file.is_empty() {
            c.homes()?;
        }
        Ok(())
    }

    /// The homes (region list, own region, home table) for the cluster link: see
    /// [`ClusterConfig::homes`]. Loads the home table file again.
    pub fn homes(&self) -> Result<Arc<Homes>, ConfigError> {
        self.cluster.homes()
    }

    /// The shard count after resolving `shards = 0` against the CPUs we may run on.
    pub fn resolved_shards(&self, available_cpus: usize) -> usize {
        if self.shards == 0 {
            available_cpus.max(1)
        } else {
            self.shards
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = EdgeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 8085);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn batch_wait_is_bounded() {
        let c: EdgeConfig = toml::from_str("batch_wait_us = 0\n").unwrap();
        c.validate().unwrap();
        let c: EdgeConfig = toml::from_str("batch_wait_us = 10000\n").unwrap();
        c.validate().unwrap();
        let c: EdgeConfig = toml::from_str("batch_wait_us = 10001\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("batch_wait_us"));
    }

    #[test]
    fn the_shard_output_budget_holds_at_least_one_full_connection() {
        let mut c: EdgeConfig =
            toml::from_str("max_output_bytes = 1048576\nmax_output_bytes_per_shard = 1048575\n")
                .unwrap();
        assert!(
            c.validate().is_err(),
            "a budget below one connection's bound"
        );
        c.max_output_bytes_per_shard = 1 << 20;
        c.validate().unwrap();
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = toml::from_str::<EdgeConfig>("listen = \"127.0.0.1:1\"\nshardz = 3\n");
        assert!(e.unwrap_err().to_string().contains("shardz"));
    }

    #[test]
    fn partial_file_takes_defaults() {
        let c: EdgeConfig = toml::from_str("shards = 3\n[auth]\nissuer = \"x\"\n").unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.auth.issuer, "x");
        assert_eq!(c.max_output_bytes, EdgeConfig::default().max_output_bytes);
    }

    #[test]
    fn cluster_section_parses_and_validates() {
        let c: EdgeConfig = toml::from_str(
            "[cluster]\nbus = \"kafka\"\nbrokers = \"127.0.0.1:9\"\nregion = \"eu-west\"\nnode_id = 7\n",
        )
        .unwrap();
        assert_eq!(c.cluster.bus, BusKind::Kafka);
        assert_eq!(c.cluster.node_id, 7);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.cluster.region = "EU".into();
        assert!(bad.validate().is_err());
        let mut bad = c.clone();
        bad.cluster.node_id = 256;
        assert!(bad.validate().is_err());
        let mut bad = c;
        bad.cluster.compression = "gzip".into();
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<EdgeConfig>("[cluster]\nbus = \"zmq\"\n").is_err());
        assert!(toml::from_str::<EdgeConfig>("[cluster]\nnodeid = 1\n").is_err());
    }

    /// docs/CONFIG.md shows every key with its default: it must parse to exactly the defaults.
    #[test]
    fn store_keys_parse_and_validate() {
        let c: EdgeConfig = toml::from_str(
            "[store]\nmax_messages_per_user = 5\nmax_bytes_per_user = 0\nmessage_ttl_secs = 1\n\
             dedup_ttl_secs = 2\nhot_log_secs = 0\nhot_log_max_bytes = 4096\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.store,
            StoreConfig {
                max_messages_per_user: 5,
                max_bytes_per_user: 0,
                message_ttl_secs: 1,
                dedup_ttl_secs: 2,
                hot_log_secs: 0,
                hot_log_max_bytes: 4096,
            }
        );
        let small: EdgeConfig = toml::from_str("[store]\nmax_bytes_per_user = 1000\n").unwrap();
        assert!(small
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_bytes_per_user"));
        let typo = toml::from_str::<EdgeConfig>("[store]\nmax_message_per_user = 1\n");
        assert!(typo
            .unwrap_err()
            .to_string()
            .contains("max_message_per_user"));
    }

    #[test]
    fn documented_config_is_the_default() {
        let doc = include_str!("../../docs/CONFIG.md");
        let start = doc.find("```toml").expect("a toml block") + "```toml".len();
        let len = doc[start..].find("```").expect("closed block");
        let c: EdgeConfig = toml::from_str(&doc[start..start + len]).unwrap();
        assert_eq!(c, EdgeConfig::default());
    }

    #[test]
    fn v2_keys_parse_and_validate() {
        let c: EdgeConfig = toml::from_str(
            "[v2]\nlisten = \"127.0.0.1:8086\"\nping_interval_ms = 500\nsend_burst = 10\n",
        )
        .unwrap();
        assert_eq!(c.v2.listen, Some(SocketAddr::from(([127, 0, 0, 1], 8086))));
        assert_eq!((c.v2.ping_interval_ms, c.v2.send_burst), (500, 10));
        c.validate().unwrap();
        assert_eq!(
            EdgeConfig::default().v2.listen,
            None,
            "v2 is off by default"
        );
        let mut bad = c.clone();
        bad.v2.send_rate_per_sec = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("send_rate_per_sec"));
        let mut bad = c.clone();
        bad.v2.max_frame_bytes = 10;
        assert!(bad.validate().is_err());
        for (bytes, ok) in [
            (255, false),
            (256, true),
            (1 << 20, true),
            ((1 << 20) + 1, false),
        ] {
            let mut b = c.clone();
            b.v2.ws_read_buffer_bytes = bytes;
            assert_eq!(b.validate().is_ok(), ok, "ws_read_buffer_bytes = {bytes}");
        }
        let mut cluster = kafka("");
        cluster.v2.listen = c.v2.listen;
        cluster.validate().unwrap();
        assert!(toml::from_str::<EdgeConfig>("[v2]\nlisten_port = 1\n").is_err());
    }

    #[test]
    fn v2_transport_keys_need_the_tls_files() {
        let c: EdgeConfig =
            toml::from_str("[v2]\nws_listen = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n")
                .unwrap();
        assert!(c.v2.serves());
        assert!(invalid(&c).contains("tls_cert_file"));
        let mut ws_only = c.clone();
        ws_only.v2.tls_listen = None;
        ws_only.validate().unwrap();
        let mut files = c.clone();
        files.v2.tls_cert_file = Some("/nonexistent/edge.crt".into());
        files.v2.tls_key_file = Some("/nonexistent/edge.key".into());
        assert!(invalid(&files).contains("/nonexistent/edge.crt"));
        let mut cluster = kafka("");
        cluster.v2.ws_listen = ws_only.v2.ws_listen;
        cluster.validate().unwrap();
    }

    #[test]
    fn outbox_keys_parse_and_validate() {
        let c: EdgeConfig = toml::from_str(
            "[cluster]\nbus = \"kafka\"\noutbox_commit_ms = 5\noutbox_max_bytes = 1048576\n\
             bus_stall_ms = 2000\noutbox_segment_bytes = 65536\n",
        )
        .unwrap();
        assert_eq!(c.cluster.outbox_commit_ms, 5);
        assert_eq!(c.cluster.bus_stall_ms, 2000);
        c.validate().unwrap();
        for bad in [
            "outbox_commit_ms = 0",
            "outbox_commit_ms = 1001",
            "outbox_segment_bytes = 4096",
            "outbox_max_bytes = 1000",
            "bus_stall_ms = 10",
        ] {
            let c: EdgeConfig =
                toml::from_str(&format!("[cluster]\nbus = \"kafka\"\n{bad}\n")).unwrap();
            assert!(c.validate().is_err(), "{bad} accepted");
        }
    }

    fn kafka(extra: &str) -> EdgeConfig {
        toml::from_str(&format!(
            "[cluster]\nbus = \"kafka\"\nregion = \"tokyo\"\n{extra}\n"
        ))
        .unwrap()
    }

    fn invalid(c: &EdgeConfig) -> String {
        match c.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("accepted: {:?}", c.cluster),
        }
    }

    #[test]
    fn region_keys_parse_and_validate() {
        let c = kafka("regions = [\"tokyo\", \"frankfurt\"]\nglobal_brokers = \"127.0.0.1:9\"\n");
        c.validate().unwrap();
        assert_eq!(c.cluster.region_index(), 0);
        let h = c.homes().unwrap();
        assert!(h.is_multi());
        assert_eq!(h.home_of(b"alice"), "frankfurt");
        let mut f = c.clone();
        f.cluster.region = "frankfurt".into();
        f.validate().unwrap();
        assert_eq!(f.cluster.region_index(), 1);
        assert_eq!(f.homes().unwrap().own_index(), 1);

        // Single region: no list, no global brokers needed.
        let single = kafka("");
        single.validate().unwrap();
        assert!(!single.homes().unwrap().is_multi());
        assert_eq!(single.cluster.region_index(), 0);

        let e = invalid(&kafka(
            "regions = [\"tokyo\", \"mars!\"]\nglobal_brokers = \"127.0.0.1:9\"\n",
        ));
        assert!(e.contains("\"mars!\""), "{e}");
        let e = invalid(&kafka(
            "regions = [\"paris\", \"frankfurt\"]\nglobal_brokers = \"127.0.0.1:9\"\n",
        ));
        assert!(e.contains("own region \"tokyo\""), "{e}");
        let e = invalid(&kafka("regions = [\"tokyo\", \"frankfurt\"]\n"));
        assert!(e.contains("cluster.global_brokers"), "{e}");
        // A region list given in embedded mode is checked too.
        let mut emb = EdgeConfig::default();
        emb.cluster.regions = vec!["tokyo".into(), "frankfurt".into()];
        assert!(invalid(&emb).contains("own region \"local\""));
    }

    #[test]
    fn home_table_is_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("homes.txt");
        std::fs::write(&table, "# overrides\nalice tokyo\nbob paris\n").unwrap();
        let regions = "regions = [\"tokyo\", \"frankfurt\"]\nglobal_brokers = \"127.0.0.1:9\"\n";
        let c = kafka(&format!(
            "{regions}home_table_file = {:?}\n",
            table.to_str().unwrap()
        ));
        let e = invalid(&c);
        assert!(e.contains("\"paris\"") && e.contains("bob"), "{e}");

        std::fs::write(&table, "alice tokyo\nbob frankfurt\n").unwrap();
        c.validate().unwrap();
        let h = c.homes().unwrap();
        assert_eq!(
            h.home_of(b"alice"),
            "tokyo",
            "the table overrides rendezvous"
        );
        assert_eq!(h.home_of(b"bob"), "frankfurt");

        std::fs::write(&table, "alice tokyo\nbob\n").unwrap();
        let e = invalid(&c);
        assert!(e.contains("line 2"), "{e}");
        std::fs::remove_file(&table).unwrap();
        let e = invalid(&c);
        assert!(e.contains("cluster.home_table_file"), "{e}");
    }

    #[test]
    fn short_secret_is_invalid() {
        let mut c = EdgeConfig::default();
        c.auth.enabled = true;
        c.auth.secret = "short".into();
        assert!(c.validate().is_err());
    }
}
