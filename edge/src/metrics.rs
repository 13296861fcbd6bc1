//! Per-shard counters, summed at scrape time.
//!
//! Each shard owns one [`ShardMetrics`] and is its only writer (relaxed atomic adds on its own
//! cache lines, so no shard ever contends with another). The admin thread reads every shard's
//! counters and sums them when `/metrics` is scraped; per-shard values are exported too, with a
//! `shard` label, so an imbalance between shards is visible. Per-hop latency histograms
//! ([`EdgeHops`], `iris_edge_hop_seconds{hop="..."}`) are summed the same way.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use iris_bus::hops::{HopHistogram, HopSnapshot};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident : $kind:literal ),* $(,)?) => {
        /// The counters and gauges of one shard.
        #[derive(Debug, Default)]
        #[repr(align(128))]
        pub struct ShardMetrics {
            $( $(#[doc = $doc])* pub $name: AtomicU64, )*
            /// Per-hop latency histograms.
            pub hops: EdgeHops,
        }

        impl ShardMetrics {
            /// `(name, kind, help, value)` for every metric.
            pub fn snapshot(&self) -> Vec<(&'static str, &'static str, &'static str, u64)> {
                vec![$( (stringify!($name), $kind, concat!($($doc),*), self.$name.load(Ordering::Relaxed)) ),*]
            }
        }
    };
}

counters! {
    /// Connections accepted.
    connections_accepted_total: "counter",
    /// Connections currently open.
    connections_open: "gauge",
    /// v2 connections accepted on the TLS listener (tls_listen).
    v2_tls_connections_accepted_total: "counter",
    /// v2 connections accepted on the WebSocket listener (ws_listen).
    v2_ws_connections_accepted_total: "counter",
    /// v2 connections accepted on the WebSocket-over-TLS listener (wss_listen).
    v2_wss_connections_accepted_total: "counter",
    /// TLS handshakes (tls_listen, wss_listen) that failed or timed out.
    tls_handshakes_failed_total: "counter",
    /// TLS handshakes that resumed a session with a ticket (`tls_session_tickets`).
    tls_handshakes_resumed_total: "counter",
    /// WebSocket upgrades (ws_listen, wss_listen) that failed or timed out.
    ws_handshakes_failed_total: "counter",
    /// Connections currently logged in.
    sessions_open: "gauge",
    /// LOGINs accepted (LOGIN_OK sent).
    logins_total: "counter",
    /// LOGINs refused (bad token, bad name).
    logins_refused_total: "counter",
    /// Client frames decoded.
    frames_in_total: "counter",
    /// Bytes read from clients.
    bytes_in_total: "counter",
    /// Bytes written to clients.
    bytes_out_total: "counter",
    /// Messages accepted from senders and handed to the store.
    messages_accepted_total: "counter",
    /// Messages written to a recipient's connection by the live path.
    messages_delivered_live_total: "counter",
    /// Messages written to a recipient's connection by a login drain.
    messages_drained_total: "counter",
    /// Login drains not asked of the store: the presence owner knew the user's inbox empty
    /// (its last session drained nothing and no stored message was routed to it since).
    login_drains_skipped_total: "counter",
    /// Live messages not written because the recipient was offline (they stay stored).
    messages_live_offline_total: "counter",
    /// Live copies of messages a login drain had already written, dropped.
    duplicates_suppressed_total: "counter",
    /// ACKs received.
    acks_total: "counter",
    /// ACKs not passed to the store: their id's time is in the future (never minted).
    acks_dropped_total: "counter",
    /// Ids of messages written to a v2 connection and not acked, forgotten beyond the
    /// connection's resume list (the last 1024): `resume_after` cannot acknowledge them.
    v2_resume_ids_forgotten_total: "counter",
    /// Messages the store refused (recipient over its quota, or a failed write): the sender was
    /// told with 0xFE (one frame per connection and core pass).
    sends_refused_total: "counter",
    /// Logins (LOGIN, HELLO) refused by `logins_per_sec_per_address`.
    rate_limited_logins_total: "counter",
    /// Messages refused by a send rate limit (per user, v1 or v2 per connection).
    rate_limited_sends_total: "counter",
    /// Prekey fetches refused by `prekey_fetches_per_sec`.
    rate_limited_prekey_fetches_total: "counter",
    /// Runs of relays (typing, receipts) over the relay limit the client was told about.
    rate_limited_relays_total: "counter",
    /// v2 SEND_ACKs written for messages the store made durable.
    v2_send_acks_total: "counter",
    /// v2 SENDs recognised as resends of a stored message (acknowledged again, not delivered).
    v2_resends_total: "counter",
    /// Typing and read-receipt relays delivered.
    relays_delivered_total: "counter",
    /// Malformed frames answered with 0xFE and a close.
    protocol_errors_total: "counter",
    /// Connections closed because their queued output exceeded max_output_bytes.
    slow_consumer_disconnects_total: "counter",
    /// Of those, connections closed because the shard's queued output exceeded
    /// max_output_bytes_per_shard (they held the most).
    output_budget_disconnects_total: "counter",
    /// Output queued for the shard's connections, not yet written (bytes).
    output_queued_bytes: "gauge",
    /// Batches sent to other shards over the rings.
    ring_batches_out_total: "counter",
    /// Items sent to other shards over the rings.
    ring_items_out_total: "counter",
    /// Requests waiting for room in the queue to the core.
    core_backlog: "gauge",
    /// Accept errors (for example the open-file limit).
    accept_errors_total: "counter",
    /// Cluster: messages the core routed to this edge's inbox.
    bus_delivers_in_total: "counter",
    /// Cluster: live copies other edges produced straight to this edge's inbox.
    bus_direct_in_total: "counter",
    /// Cluster: live copies (messages and relays) sent straight to other edges' inboxes.
    bus_forwards_out_total: "counter",
    /// Cluster: second copies of messages this edge had already delivered live (the core's
    /// routed copy or a sender edge's direct copy), dropped.
    bus_duplicates_suppressed_total: "counter",
    /// Cluster: connections told 0xFF RATE_LIMITED because the bus stalled (once per stall).
    rate_limited_total: "counter",
    /// Unknown opcodes answered with 0xFE unknown_opcode (the connection stays open).
    unknown_opcodes_total: "counter",
    /// Connections closed for more than unknown_opcode_limit errors in unknown_opcode_window_ms.
    error_limit_disconnects_total: "counter",
    /// TYPING frames not relayed: over typing_relays_per_sec for their connection.
    typing_dropped_total: "counter",
    /// Times the shard went to sleep in its io_uring, each ending in a wake-up (batch_wait_us
    /// gathers events per wake-up); published after each idle wait of the shard's core poller
    /// (a shard sleeps only then; at least every 100 ms while idle).
    shard_sleeps_total: "counter",
    /// Logged-in connections closed after idle_timeout_ms with a partial frame or unsent output.
    idle_timeouts_total: "counter",
    /// Requests with a reply (prekey fetches) waiting at the core.
    pending_replies: "gauge",
    /// Times a shard's connections stopped reading because max_pending_replies was reached.
    reply_backpressure_total: "counter",
    /// Users with at least one session whose presence this shard owns.
    presence_users: "gauge",
    /// Offline users whose last-seen time this shard remembers (presence_last_seen_max).
    presence_last_seen_users: "gauge",
}

/// True the first time it is called for `flag`: a limit hit is logged once per process, then
/// only counted.
pub fn first_time(flag: &std::sync::atomic::AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

impl ShardMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn set(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }
}

/// Latency of messages from their acceptance (the time their id carries) to a point on this
/// edge, per shard.
#[derive(Debug, Default)]
pub struct EdgeHops {
    /// Cluster: a message's live copy, produced straight to this edge's inbox by the sender's
    /// edge, taken from the inbox (every copy, duplicate or not).
    pub inbox_direct: HopHistogram,
    /// Cluster: the core's routed copy of a message taken from this edge's inbox (every copy,
    /// duplicate or not).
    pub inbox_core: HopHistogram,
    /// A message written by the live path to a recipient's connection (the first copy, once
    /// per session; drains are not counted).
    pub written: HopHistogram,
}

impl EdgeHops {
    /// `(hop label, histogram)` of every hop.
    pub fn each(&self) -> [(&'static str, &HopHistogram); 3] {
        [
            ("inbox_direct", &self.inbox_direct),
            ("inbox_core", &self.inbox_core),
            ("written", &self.written),
        ]
    }
}

/// Renders every shard's metrics plus extra `(name, kind, help, value)` lines as Prometheus text.
/// `hops` are hop histograms measured outside the shards, rendered in the same family.
pub fn render(
    shards: &[Arc<ShardMetrics>],
    extra: &[(&str, &str, &str, u64)],
    hops: &[(&str, HopSnapshot)],
) -> String {
    let mut out = String::with_capacity(8192);
    let snaps: Vec<_> = shards.iter().map(|s| s.snapshot()).collect();
    if let Some(first) = snaps.first() {
        for (i, (name, kind, help, _)) in first.iter().enumerate() {
            let total: u64 = snaps.iter().map(|s| s[i].3).sum();
            let _ = writeln!(out, "# HELP iris_edge_{name} {help}");
            let _ = writeln!(out, "# TYPE iris_edge_{name} {kind}");
            let _ = writeln!(out, "iris_edge_{name} {total}");
            for (shard, s) in snaps.iter().enumerate() {
                let _ = writeln!(out, "iris_edge_{name}{{shard=\"{shard}\"}} {}", s[i].3);
            }
        }
    }
    if let Some(first) = shards.first() {
        let _ = writeln!(
            out,
            "# HELP iris_edge_hop_seconds Time from a message's acceptance to this hop."
        );
        let _ = writeln!(out, "# TYPE iris_edge_hop_seconds histogram");
        for (i, (hop, _)) in first.hops.each().iter().enumerate() {
            let mut sum = HopSnapshot::default();
            for s in shards {
                sum.add(&s.hops.each()[i].1.snapshot());
            }
            sum.render(&mut out, "iris_edge_hop_seconds", hop);
        }
        for (hop, snap) in hops {
            snap.render(&mut out, "iris_edge_hop_seconds", hop);
        }
    }
    for (name, kind, help, value) in extra {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_sums_shards() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::add(&a.acks_total, 2);
        ShardMetrics::add(&b.acks_total, 3);
        let text = render(
            &[a, b],
            &[("iris_core_stored_total", "counter", "x", 7)],
            &[],
        );
        assert!(text.contains("iris_edge_acks_total 5\n"));
        assert!(text.contains("iris_edge_acks_total{shard=\"1\"} 3\n"));
        assert!(text.contains("iris_core_stored_total 7\n"));
    }

    #[test]
    fn hop_histograms_are_summed_over_shards() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.hops.inbox_direct.record_micros(800);
        b.hops.inbox_direct.record_micros(4_000);
        b.hops.written.record_micros(100);
        let text = render(&[a, b], &[], &[]);
        assert!(text.contains("# TYPE iris_edge_hop_seconds histogram\n"));
        assert!(text.contains("iris_edge_hop_seconds_count{hop=\"inbox_direct\"} 2\n"));
        assert!(
            text.contains("iris_edge_hop_seconds_bucket{hop=\"inbox_direct\",le=\"0.001\"} 1\n")
        );
        assert!(text.contains("iris_edge_hop_seconds_count{hop=\"inbox_core\"} 0\n"));
        assert!(text.contains("iris_edge_hop_seconds_count{hop=\"written\"} 1\n"));
    }
}
