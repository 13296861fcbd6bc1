//! Starting and stopping a whole edge: the in-process core, one listener socket and one pinned
//! glommio executor per shard, the shard mesh, and the admin endpoint.
//!
//! Startup order: start the core (the embedded store's thread, or in cluster mode the bus link
//! to Kafka and Redis, [`iris_core::remote`]), bind every shard's `SO_REUSEPORT` socket on
//! the main thread (so `--listen 127.0.0.1:0` resolves to one port shared by all shards), start
//! the admin endpoint, announce the bound addresses, start the shards. With a v2 TLS listener,
//! SIGHUP makes the main thread reload the certificate files ([`crate::tls`]). Shutdown (the
//! `shutdown` flag, set by SIGTERM/SIGINT): shards stop accepting, flush their connections'
//! queued output for up to `drain_timeout_ms`, hand everything pending to the core and exit;
//! then the core commits everything it holds durably and the process exits 0.
//!
//! In cluster mode the same stop begins by itself when the broker lost the edge's topics (a
//! memory-storage broker restarted, [`iris_core::remote`] "Lost topics"): the link's outbox
//! takes and fsyncs everything the shards read, and [`run`] returns [`TopicsLost`], on which
//! `iris-edge` exits with [`TOPICS_LOST_EXIT`] (75) for its supervisor to restart it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};
use iris_bus::kafka::KafkaConfig;
use iris_core::embedded::{CoreStats, EmbeddedConfig, EmbeddedCore};
use iris_core::outbox::OutboxConfig;
use iris_core::remote::{RemoteConfig, RemoteCore, RemoteSnapshot};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::admin;
use crate::config::{BusKind, EdgeConfig};
use crate::metrics::ShardMetrics;
use crate::shard::{self, ShardStart};
use crate::tls::TlsCerts;

/// Exit status of a process that lost a thread (a shard, the core, the admin endpoint): the
/// edge never runs on with part of itself dead.
pub const DEAD_THREAD_EXIT: i32 = 70;

/// Exit status (`EX_TEMPFAIL`) asking the supervisor for a restart: the broker lost this
/// edge's topics and they were re-created ([`TopicsLost`]).
pub const TOPICS_LOST_EXIT: i32 = 75;

/// [`run`] stopped because the broker lost the edge's topics and they were re-created (a
/// memory-storage broker restarted): the cluster link cannot follow the new logs in place. What
/// the edge accepted is in its outbox, fsynced; the process is to exit with
/// [`TOPICS_LOST_EXIT`] and be started again.
#[derive(Debug, thiserror::Error)]
#[error("the broker lost the topics {topics:?} and they were re-created; restart to read them from their beginning")]
pub struct TopicsLost {
    /// The re-created topics.
    pub topics: Vec<String>,
}

/// Makes any panic, in any thread, fatal for the process: logs it (thread, location, message)
/// and exits with [`DEAD_THREAD_EXIT`]. A shard or the core thread that unwound would otherwise
/// leave the edge half alive (its connections gone, the other shards stopping once their rings
/// to it fill) while `/health` still answered 200. Nothing accepted is lost: the process ends
/// as after a kill -9, which the store (or, in a cluster, the outbox) is built to survive.
pub fn install_fatal_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            panic = %info,
            "a thread panicked: the edge stops (a dead thread is fatal)"
        );
        std::process::exit(DEAD_THREAD_EXIT);
    }));
}

/// The addresses the edge actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub client: SocketAddr,
    pub admin: SocketAddr,
    pub shards: usize,
    /// The protocol v2 listener, when `[v2] listen` is set.
    pub v2: Option<SocketAddr>,
    /// The v2 over TLS listener, when `[v2] tls_listen` is set.
    pub v2_tls: Option<SocketAddr>,
    /// The v2 over WebSocket listener, when `[v2] ws_listen` is set.
    pub v2_ws: Option<SocketAddr>,
    /// The v2 over WebSocket over TLS listener, when `[v2] wss_listen` is set.
    pub v2_wss: Option<SocketAddr>,
}

/// One `SO_REUSEPORT` socket per shard on `addr` (the first resolves port 0), or none per shard
/// when `addr` is not set.
fn bind_optional(
    addr: Option<SocketAddr>,
    nshards: usize,
    what: &str,
) -> anyhow::Result<(Vec<Option<Socket>>, Option<SocketAddr>)> {
    let Some(addr) = addr else {
        return Ok(((0..nshards).map(|_| None).collect(), None));
    };
    let first = bind_listener(addr).with_context(|| format!("cannot listen ({what}) on {addr}"))?;
    let bound = first
        .local_addr()?
        .as_socket()
        .with_context(|| format!("{what} listener has no inet address"))?;
    let mut sockets = vec![Some(first)];
    for _ in 1..nshards {
        sockets.push(Some(
            bind_listener(bound).with_context(|| format!("cannot listen ({what}) on {bound}"))?,
        ));
    }
    Ok((sockets, Some(bound)))
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    let ids = iris_tuning::facts::affinity_cpus().unwrap_or_default();
    if ids.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        ids
    }
}

pub(crate) fn bind_listener(addr: SocketAddr) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit `TCP_NODELAY` from the listener (no `setsockopt` per
    // connection), and a non-blocking listener is accepted from with one `accept4` per
    // connection (glommio patch 10, vendor/glommio/IRIS-PATCH.md); both are tested in
    // `shard::transport::tests`.
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s)
}

/// Runs the edge until `shutdown` is set, calling `ready` once every socket is bound.
pub fn run(
    cfg: EdgeConfig,
    shutdown: Arc<AtomicBool>,
    ready: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    cfg.validate()?;
    let cpus = if cfg.cpus.is_empty() {
        allowed_cpus()
    } else {
        cfg.cpus.clone()
    };
    let nshards = cfg.resolved_shards(cpus.len());
    crate::hostcheck::startup(&cfg, nshards)?;

    let (mut core, links) = start_core(&cfg, nshards)?;
    let id_floor = match &core {
        Core::Embedded(c) => c.id_floor(),
        Core::Remote(_) => 0,
    };

    // All shard sockets bind the same port: the first one resolves port 0.
    let first =
        bind_listener(cfg.listen).with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let client_addr = first
        .local_addr()?
        .as_socket()
        .context("listener has no inet address")?;
    let mut sockets = vec![first];
    for _ in 1..nshards {
        sockets.push(
            bind_listener(client_addr)
                .with_context(|| format!("cannot listen on {client_addr}"))?,
        );
    }

    // Protocol v2 on its own ports (TCP, TLS, WebSocket, WebSocket over TLS), likewise one
    // SO_REUSEPORT socket per shard each.
    let v2c = &cfg.v2;
    let (v2_sockets, v2_addr) = bind_optional(v2c.listen, nshards, "v2")?;
    let (mut tls_sockets, v2_tls) = bind_optional(v2c.tls_listen, nshards, "v2 tls")?;
    let (mut ws_sockets, v2_ws) = bind_optional(v2c.ws_listen, nshards, "v2 ws")?;
    let (mut wss_sockets, v2_wss) = bind_optional(v2c.wss_listen, nshards, "v2 wss")?;
    let certs = match (&v2c.tls_cert_file, &v2c.tls_key_file) {
        (Some(cert), Some(key)) if v2_tls.is_some() || v2_wss.is_some() => Some(Arc::new(
            TlsCerts::load(cert, key, v2c.tls_session_tickets)
                .context("cannot load the v2 TLS certificate")?,
        )),
        _ => None,
    };
    // SIGHUP reloads the certificate (on this thread, in the watch loop below).
    let reload = Arc::new(AtomicBool::new(false));
    if certs.is_some() {
        signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
            .context("cannot install the SIGHUP handler")?;
    }

    let metrics: Vec<Arc<ShardMetrics>> = (0..nshards)
        .map(|_| Arc::new(ShardMetrics::default()))
        .collect();
    let tls_counts = certs.clone();
    let extra = match &core {
        Core::Embedded(c) => {
            let m = c.metrics();
            admin::Extras::lines(Arc::new(move || {
                let mut lines = core_lines(&m.snapshot());
                lines.extend(tls_lines(tls_counts.as_deref()));
                lines
            }))
        }
        Core::Remote(c) => {
            let (m, h, a, u) = (c.metrics(), c.metrics(), c.metrics(), c.metrics());
            admin::Extras {
                lines: Arc::new(move || remote_lines(&m.snapshot())),
                text: Arc::new(move |out| {
                    let s = h.snapshot();
                    let _ = writeln!(
                        out,
                        "# HELP iris_edge_outbox_oldest_age_seconds Age of the oldest outbox \
                         record not yet acknowledged by the broker (0: none).\n\
                         # TYPE iris_edge_outbox_oldest_age_seconds gauge\n\
                         iris_edge_outbox_oldest_age_seconds {}",
                        s.outbox.oldest_age_micros as f64 / 1e6
                    );
                    routed_out_text(out, &s);
                }),
                hops: Arc::new(move || {
                    let s = a.snapshot();
                    vec![
                        ("produce_acked", s.produce_acked),
                        ("cross_region", s.cross_region),
                    ]
                }),
                unhealthy: Arc::new(move || (!u.outbox_healthy()).then_some("outbox_failed")),
            }
        }
    };
    // A shard that stopped before shutdown (it cannot panic: see install_fatal_panic_hook):
    // `/health` says so while the others drain and the process exits non-zero.
    let dead = Arc::new(AtomicBool::new(false));
    let extra = {
        let (dead, unhealthy) = (dead.clone(), extra.unhealthy.clone());
        admin::Extras {
            unhealthy: Arc::new(move || {
                if dead.load(Ordering::Relaxed) {
                    Some("shard_stopped")
                } else {
                    unhealthy()
                }
            }),
            ..extra
        }
    };
    let admin_addr = admin::start(cfg.admin, metrics.clone(), extra, shutdown.clone())
        .with_context(|| format!("cannot bind admin endpoint {}", cfg.admin))?;

    let cfg = Arc::new(cfg);
    let mesh = (nshards > 1).then(|| MeshBuilder::full(nshards, cfg.ring_capacity));
    let mut handles = Vec::with_capacity(nshards);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let ring_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let id_high = Arc::new(crate::idgen::HighWater::default());
    for (i, ((sock, link), v2_sock)) in sockets.into_iter().zip(links).zip(v2_sockets).enumerate() {
        let start = ShardStart {
            id: i,
            nshards,
            cfg: cfg.clone(),
            metrics: metrics[i].clone(),
            core: link,
            id_floor,
            id_high: id_high.clone(),
            listener_fd: OwnedFd::from(sock),
            v2_listener_fd: v2_sock.map(OwnedFd::from),
            v2_transports: shard::transport::Listeners {
                tls: tls_sockets[i].take().map(OwnedFd::from),
                ws: ws_sockets[i].take().map(OwnedFd::from),
                wss: wss_sockets[i].take().map(OwnedFd::from),
                certs: certs.clone(),
            },
            mesh: mesh.clone(),
            shutdown: shutdown.clone(),
            ready: ready_tx.clone(),
            ring_bytes: ring_bytes.clone(),
            exited: exit_tx.clone(),
        };
        let cpu = cpus[i % cpus.len()];
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("iris-shard-{i}"))
            .io_memory(cfg.io_memory_bytes)
            .ring_depth(cfg.ring_depth)
            .batch_wait(Duration::from_micros(cfg.batch_wait_us))
            .spawn(move || shard::run(start))
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start shard {i} on cpu {cpu}: {e} (io_uring and memlock: run `iris-tune check`)"
                )
            })?;
        handles.push(h);
    }
    drop(ready_tx);
    // Announce only once every shard accepts connections.
    for _ in 0..nshards {
        if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
            shutdown.store(true, Ordering::Relaxed);
            bail!("a shard did not start (see the log above)");
        }
    }
    if !cfg.auth.enabled && !client_addr.ip().is_loopback() {
        warn!(
            client = %client_addr,
            "AUTH IS OFF ON A NON-LOOPBACK LISTENER: anyone who can reach this port can log in \
             as any user, read, ack and delete that user's messages and replace its prekeys; \
             set [auth] enabled = true with a secret (see README, running in production), or \
             listen on 127.0.0.1"
        );
    }
    info!(
        client = %client_addr,
        admin = %admin_addr,
        v2 = ?v2_addr,
        v2_tls = ?v2_tls,
        v2_ws = ?v2_ws,
        v2_wss = ?v2_wss,
        shards = nshards,
        "iris-edge serving"
    );
    ready(Bound {
        client: client_addr,
        admin: admin_addr,
        shards: nshards,
        v2: v2_addr,
        v2_tls,
        v2_ws,
        v2_wss,
    });

    drop(exit_tx);
    // Watch the shards: each says when it returns; one that returns before shutdown is dead.
    // Watch the cluster link too: lost topics stop the edge for a restart.
    let mut failed = false;
    let mut lost: Option<Vec<String>> = None;
    let mut running = nshards;
    while running > 0 {
        if let (Core::Remote(c), None) = (&mut core, &lost) {
            let topics = c.lost_topics();
            if !topics.is_empty() {
                warn!(
                    topics = ?topics,
                    "the broker lost this edge's topics: the edge stops and exits with status {TOPICS_LOST_EXIT} for a restart"
                );
                lost = Some(topics);
                shutdown.store(true, Ordering::Relaxed);
            }
        }
        if let Some(certs) = &certs {
            if reload.swap(false, Ordering::Relaxed) {
                // Logged and counted inside; the old certificate stays on failure.
                let _ = certs.reload();
            }
        }
        match exit_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(i) => {
                running -= 1;
                if !shutdown.load(Ordering::Relaxed) {
                    tracing::error!(
                        shard = i,
                        "a shard stopped while serving: the edge drains and exits non-zero"
                    );
                    dead.store(true, Ordering::Relaxed);
                    failed = true;
                    shutdown.store(true, Ordering::Relaxed);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for h in handles {
        if let Err(e) = h.join() {
            warn!(error = %e, "shard ended with an error");
            failed = true;
        }
    }
    match core {
        Core::Embedded(c) => {
            let stats = c.shutdown();
            info!(?stats, "store flushed; iris-edge stopped");
        }
        Core::Remote(c) if lost.is_some() => {
            let topics = lost.unwrap_or_default();
            match c.stop_for_restart() {
                Ok(r) => info!(
                    left_in_outbox = r.left_in_outbox,
                    "outbox fsynced; iris-edge stops for a restart"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cluster link did not stop cleanly");
                    bail!("accepted messages may be lost: {e}");
                }
            }
            return Err(TopicsLost { topics }.into());
        }
        Core::Remote(c) => match c.shutdown(Duration::from_millis(cfg.drain_timeout_ms)) {
            Ok(r) => info!(
                produced = r.producer.produced_ok,
                left_in_outbox = r.left_in_outbox,
                "bus flushed; iris-edge stopped"
            ),
            Err(e) => {
                // Something accepted was neither acknowledged nor kept: not a clean exit.
                tracing::error!(error = %e, "cluster link did not stop cleanly");
                bail!("accepted messages may be lost: {e}");
            }
        },
    }
    if failed {
        bail!("a shard failed");
    }
    Ok(())
}

/// The core behind the shards' links.
enum Core {
    /// One box: the in-process core and its store.
    Embedded(EmbeddedCore),
    /// Cluster: the bus bridge to Kafka and Redis.
    Remote(Box<RemoteCore>),
}

/// Starts the core the configuration asks for and returns one link per shard.
fn start_core(
    cfg: &EdgeConfig,
    nshards: usize,
) -> anyhow::Result<(Core, Vec<iris_core::api::ShardLink>)> {
    match cfg.cluster.bus {
        BusKind::Embedded => {
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
            let core_cfg = EmbeddedConfig {
                data_dir: cfg.data_dir.join("store"),
                commit_window_ms: cfg.commit_window_ms,
                queue_capacity: cfg.core_queue_capacity,
                drain_chunk: cfg.drain_chunk,
                drain_chunk_bytes: cfg.drain_chunk_bytes,
                max_messages_per_user: cfg.store.max_messages_per_user,
                max_bytes_per_user: cfg.store.max_bytes_per_user,
                message_ttl_secs: cfg.store.message_ttl_secs,
                dedup_ttl_secs: cfg.store.dedup_ttl_secs,
                hot_log_secs: cfg.store.hot_log_secs,
                hot_log_max_bytes: cfg.store.hot_log_max_bytes,
                // The core thread frees the requests and batches of a burst: give the pages
                // back once it is idle, as the shards do.
                idle_hook: Some(crate::alloc::collect_idle_heap),
                ..EmbeddedConfig::default()
            };
            let (core, links) = EmbeddedCore::start(core_cfg, nshards).with_context(|| {
                format!("cannot open the store under {}", cfg.data_dir.display())
            })?;
            Ok((Core::Embedded(core), links))
        }
        BusKind::Kafka => {
            let c = &cfg.cluster;
            let homes = cfg.homes().context("invalid region configuration")?;
            let kafka = KafkaConfig {
                linger_ms: c.linger_ms,
                compression: c.compression.clone(),
                ring_capacity: c.producer_ring_capacity,
                producer_cpu: usize::try_from(c.producer_cpu).ok(),
                fetch_wait_max_ms: c.fetch_wait_max_ms,
                ..KafkaConfig::default()
            };
            let global = homes.is_multi().then(|| KafkaConfig {
                brokers: c.global_brokers.clone(),
                ..kafka.clone()
            });
            let remote = RemoteConfig {
                brokers: c.brokers.clone(),
                redis_url: c.redis_url.clone(),
                region: c.region.clone(),
                node: c.node_id,
                partitions: c.partitions,
                // Small: a message is in memory only between the socket read and the bridge's
                // outbox write; a full queue stops the shard reading (Shard::backpressured).
                queue_capacity: cfg.core_queue_capacity.min(CLUSTER_QUEUE_CAPACITY),
                kafka,
                outbox: OutboxConfig {
                    dir: cfg.data_dir.join("outbox"),
                    commit_ms: c.outbox_commit_ms,
                    segment_bytes: c.outbox_segment_bytes,
                    max_bytes: c.outbox_max_bytes,
                    stall_ms: c.bus_stall_ms,
                },
                homes,
                global,
                // What a login burst freed on the bridge and session threads goes back to the
                // OS once they are idle (as on the shards and the embedded core thread).
                idle_hook: Some(crate::alloc::collect_idle_heap),
            };
            let (core, links) = RemoteCore::start(remote, nshards).with_context(|| {
                format!(
                    "cannot join region {} (brokers {}, redis {})",
                    c.region, c.brokers, c.redis_url
                )
            })?;
            Ok((Core::Remote(Box::new(core)), links))
        }
    }
}

/// Capacity of each shard's request queue to the cluster link, at most: what a shard has read
/// and the bridge has not yet written to the outbox (lost by a kill -9) stays below this plus
/// one socket read per connection.
const CLUSTER_QUEUE_CAPACITY: usize = 256;

/// The cluster link's counters as Prometheus lines.
fn remote_lines(s: &RemoteSnapshot) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    vec![
        (
            "iris_bus_frames_out_total",
            "counter",
            "Frames handed to the Kafka producer.",
            s.frames_out,
        ),
        (
            "iris_core_resume_acked_total",
            "counter",
            "Stored messages acked by a v2 HELLO's resume_after.",
            s.resume_acked,
        ),
        (
            "iris_core_resume_lists_evicted_total",
            "counter",
            "Users whose list of ids delivered to their last v2 session was forgotten (bound).",
            s.resume_lists_evicted,
        ),
        (
            "iris_bus_frames_in_total",
            "counter",
            "Records consumed from the edge inbox and presence topics.",
            s.frames_in,
        ),
        (
            "iris_bus_bad_frames_total",
            "counter",
            "Consumed records skipped: invalid or of an unknown version.",
            s.frames.invalid + s.frames.unknown_version,
        ),
        (
            "iris_bus_unknown_version_frames_total",
            "counter",
            "Consumed records skipped for an unknown version byte.",
            s.frames.unknown_version,
        ),
        (
            "iris_bus_ignored_frames_total",
            "counter",
            "Consumed frames not meant for this edge.",
            s.ignored,
        ),
        (
            "iris_bus_producer_ring_full_total",
            "counter",
            "Times the producer ring was full (broker slow or down): clients stop being read.",
            s.ring_full,
        ),
        (
            "iris_bus_produced_total",
            "counter",
            "Frames the broker acknowledged.",
            s.producer.produced_ok,
        ),
        (
            "iris_bus_delivery_errors_total",
            "counter",
            "Produce attempts that failed and were retried.",
            s.producer.delivery_errors,
        ),
        (
            "iris_bus_producer_queue_full_total",
            "counter",
            "Times librdkafka's queue was full (QueueFull backpressure).",
            s.producer.queue_full_events,
        ),
        (
            "iris_bus_producer_in_flight",
            "gauge",
            "Frames handed to librdkafka and not yet acknowledged.",
            s.producer.in_flight,
        ),
        (
            "iris_bus_global_produced_total",
            "counter",
            "Frames the global brokers acknowledged (route topics; included in iris_bus_produced_total).",
            s.global_producer.produced_ok,
        ),
        (
            "iris_bus_global_producer_in_flight",
            "gauge",
            "Frames handed to the global producer and not yet acknowledged.",
            s.global_producer.in_flight,
        ),
        (
            "iris_bus_global_delivery_errors_total",
            "counter",
            "Produce attempts to the global brokers that failed and were retried.",
            s.global_producer.delivery_errors,
        ),
        (
            "iris_edge_routes_parked",
            "gauge",
            "Frames for other regions kept because no global bus is configured (never dropped).",
            s.routes_parked,
        ),
        (
            "iris_bus_replies_deferred_total",
            "counter",
            "Inbound frames that waited for room in a shard's queue.",
            s.replies_deferred,
        ),
        (
            "iris_edge_outbox_appended_total",
            "counter",
            "Accepted messages written to the outbox (a kill -9 of the edge no longer loses them).",
            s.outbox.appended,
        ),
        (
            "iris_edge_outbox_records",
            "gauge",
            "Accepted messages in the outbox not yet acknowledged by the broker.",
            s.outbox.records,
        ),
        (
            "iris_edge_outbox_bytes",
            "gauge",
            "Bytes of the outbox records not yet acknowledged.",
            s.outbox.bytes,
        ),
        (
            "iris_edge_outbox_segments",
            "gauge",
            "Outbox segment files on disk.",
            s.outbox.segments,
        ),
        (
            "iris_edge_outbox_fsyncs_total",
            "counter",
            "Outbox group commits (fsync).",
            s.outbox.fsyncs,
        ),
        (
            "iris_edge_outbox_replayed_total",
            "counter",
            "Outbox records produced again at startup (the broker may not have had them).",
            s.outbox.replayed,
        ),
        (
            "iris_edge_outbox_stalls_total",
            "counter",
            "Times the edge stopped reading clients: outbox bound or bus_stall_ms reached.",
            s.outbox.stalls,
        ),
        (
            "iris_edge_outbox_rejected_total",
            "counter",
            "Outbox records the producer reported as never producible (dropped).",
            s.outbox.rejected,
        ),
        (
            "iris_edge_outbox_failed",
            "gauge",
            "1 once an outbox write or fsync failed: the edge accepts nothing more.",
            u64::from(s.outbox.failed),
        ),
        (
            "iris_sessions_ops_total",
            "counter",
            "Session changes handed to the Redis writer.",
            s.sessions.ops_in,
        ),
        (
            "iris_sessions_errors_total",
            "counter",
            "Failed Redis session writes (retried).",
            s.sessions.errors,
        ),
        (
            "iris_sessions_pending_users",
            "gauge",
            "Users whose session write waits for Redis.",
            s.sessions.pending_users,
        ),
        (
            "iris_sessions_deferred_total",
            "counter",
            "Session changes that waited for room in the writer's queue.",
            s.session_deferred,
        ),
    ]
}

/// `iris_edge_routed_out_total{region="<home>"}`: frames sent to the global bus per target
/// region, one series per configured region (none when single-region).
fn routed_out_text(out: &mut String, s: &RemoteSnapshot) {
    if s.routed_out.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP iris_edge_routed_out_total Frames sent to the global bus (route topics) per \
         target home region.\n# TYPE iris_edge_routed_out_total counter"
    );
    for (region, n) in &s.routed_out {
        let _ = writeln!(out, "iris_edge_routed_out_total{{region=\"{region}\"}} {n}");
    }
}

/// The v2 TLS certificate's reload counters as Prometheus lines (none without TLS).
fn tls_lines(certs: Option<&TlsCerts>) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    let Some(certs) = certs else {
        return Vec::new();
    };
    let (ok, failed) = certs.reload_counts();
    vec![
        (
            "iris_edge_tls_reloads_total",
            "counter",
            "v2 TLS certificate reloads (SIGHUP) that took effect.",
            ok,
        ),
        (
            "iris_edge_tls_reloads_failed_total",
            "counter",
            "v2 TLS certificate reloads (SIGHUP) that failed: the previous certificate stays.",
            failed,
        ),
    ]
}

/// The core's counters as Prometheus lines.
fn core_lines(s: &CoreStats) -> Vec<(&'static str, &'static str, &'static str, u64)> {
    vec![
        (
            "iris_core_stored_total",
            "counter",
            "Messages written to the store.",
            s.stored,
        ),
        (
            "iris_core_acked_total",
            "counter",
            "Acks taken in by the core.",
            s.acked,
        ),
        (
            "iris_core_cancelled_before_store_total",
            "counter",
            "Messages acked inside the commit window, never written.",
            s.cancelled_before_store,
        ),
        (
            "iris_core_late_stores_dropped_total",
            "counter",
            "Stores that arrived after their own ack.",
            s.late_stores_dropped,
        ),
        (
            "iris_core_commits_total",
            "counter",
            "Group commits (batch + fsync).",
            s.commits,
        ),
        (
            "iris_core_commit_micros_total",
            "counter",
            "Time spent in group commits, microseconds.",
            s.commit_micros_total,
        ),
        (
            "iris_core_drains_total",
            "counter",
            "Drain requests answered.",
            s.drains,
        ),
        (
            "iris_core_drained_messages_total",
            "counter",
            "Messages sent in drain replies.",
            s.drained_messages,
        ),
        (
            "iris_core_store_errors_total",
            "counter",
            "Failed store operations.",
            s.store_errors,
        ),
        (
            "iris_core_invalid_requests_total",
            "counter",
            "Requests the store cannot represent.",
            s.invalid_requests,
        ),
        (
            "iris_core_corrupt_skipped_total",
            "counter",
            "Corrupt inbox entries skipped.",
            s.corrupt_skipped,
        ),
        (
            "iris_core_replies_deferred_total",
            "counter",
            "Replies that waited for room in a shard's queue.",
            s.replies_deferred,
        ),
        (
            "iris_core_pending_ops",
            "gauge",
            "Operations waiting for the next commit.",
            s.pending_ops,
        ),
        (
            "iris_core_refused_over_quota_total",
            "counter",
            "Messages refused: recipient at max_messages_per_user or max_bytes_per_user.",
            s.refused_over_quota,
        ),
        (
            "iris_core_failed_messages_total",
            "counter",
            "Messages not stored because their commit failed (disk full, I/O error).",
            s.failed_messages,
        ),
        (
            "iris_core_store_reopens_total",
            "counter",
            "Times the store was reopened after a failed write.",
            s.store_reopens,
        ),
        (
            "iris_core_expired_deleted_total",
            "counter",
            "Messages older than message_ttl_secs deleted.",
            s.expired_deleted,
        ),
        (
            "iris_core_acks_not_stored_total",
            "counter",
            "Acks of ids not stored: answered by a lookup, nothing written.",
            s.acks_not_stored,
        ),
        (
            "iris_core_acks_of_recent_stores_total",
            "counter",
            "Acks of messages committed in the last 1-2 s: deleted without a lookup.",
            s.acks_of_recent_stores,
        ),
        (
            "iris_core_hot_logged_total",
            "counter",
            "Messages written to the hot log instead of the LSM at their commit.",
            s.hot_logged,
        ),
        (
            "iris_core_acks_of_hot_total",
            "counter",
            "Acks of messages in the hot tier: one hot log record, the LSM untouched.",
            s.acks_of_hot,
        ),
        (
            "iris_core_hot_moved_total",
            "counter",
            "Hot messages not acked within one to two hot_log_secs, moved into the LSM.",
            s.hot_moved,
        ),
        (
            "iris_core_duplicate_sends_total",
            "counter",
            "v2 sends whose client message id was seen before: acknowledged, not stored.",
            s.duplicate_sends,
        ),
        (
            "iris_core_dedup_expired_total",
            "counter",
            "Dedup records of v2 sends older than dedup_ttl_secs deleted.",
            s.dedup_expired,
        ),
        (
            "iris_core_resume_acked_total",
            "counter",
            "Stored messages acked by a v2 HELLO's resume_after.",
            s.resume_acked,
        ),
        (
            "iris_core_resume_lists_evicted_total",
            "counter",
            "Users whose list of ids delivered to their last v2 session was forgotten (bound).",
            s.resume_lists_evicted,
        ),
    ]
}
