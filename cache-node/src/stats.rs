//! Counters an admin reads: the `/stats` JSON and the Prometheus `/metrics` text are two views of
//! the same atomics, so they can never disagree.
//!
//! Byte accounting: `hit_bytes` are body bytes sent to clients from disk, `miss_bytes` body bytes
//! sent to clients straight from an origin fill, `egress_bytes` every body byte sent to clients
//! (hits, misses, pass-through and multipart framing), and `origin_bytes` every body byte
//! received from origins.
//!
//! The same figures are kept per origin label ([`OriginStats`]): one label per configured
//! `[[origin]]` entry (its content set's name, its host pattern or its address ranges) and
//! `default` for `server.default_upstream`, fixed at start-up, so what a client sends never
//! becomes a label and the number of series is bounded by the config. A request carries its
//! label's [`OriginIndex`] from routing on, so counting costs an index and an atomic add.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;
use std::sync::atomic::{AtomicI64, AtomicU64};

/// Rewrites an OpenMetrics exposition into the classic Prometheus text format (0.0.4). The
/// samples are the same lines; a counter's `HELP` and `TYPE` name its samples' `_total` name, and
/// the `UNIT` and `EOF` lines, which the classic format does not have, go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut classic = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(renamed) => classic.push_str(&renamed),
            None => classic.push_str(line),
        }
        classic.push('\n');
    }
    classic
}

/// The cache statuses latency is reported by, in [`LatencyHistograms`]'s order: `none` is an
/// answer of the node's own (a refusal, an API answer).
pub const LATENCY_STATUSES: [&str; 5] = ["hit", "miss", "partial", "bypass", "none"];

/// The histograms' upper bounds in seconds: 0.5 ms doubling to about 33 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17)
}

/// Histograms labelled by cache status.
type HistogramFamily = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// Time to first byte (until the response's headers are ready) and whole-response duration
/// (until the body ends or the client leaves), per cache status. Each status's histogram is
/// made once, so an observation costs no label lookup.
#[derive(Debug, Clone)]
pub struct LatencyHistograms {
    family_first_byte: HistogramFamily,
    family_duration: HistogramFamily,
    first_byte: [Histogram; 5],
    duration: [Histogram; 5],
}

impl Default for LatencyHistograms {
    fn default() -> Self {
        let new_histogram: fn() -> Histogram = || Histogram::new(latency_buckets());
        let family_first_byte = Family::new_with_constructor(new_histogram);
        let family_duration = Family::new_with_constructor(new_histogram);
        let of = |family: &HistogramFamily| {
            LATENCY_STATUSES.map(|status| {
                family
                    .get_or_create(&vec![("cache".to_owned(), status.to_owned())])
                    .clone()
            })
        };
        LatencyHistograms {
            first_byte: of(&family_first_byte),
            duration: of(&family_duration),
            family_first_byte,
            family_duration,
        }
    }
}

impl LatencyHistograms {
    /// The index of an `X-Cache` value in [`LATENCY_STATUSES`].
    pub fn index_of(x_cache: Option<&[u8]>) -> usize {
        match x_cache {
            Some(b"HIT") => 0,
            Some(b"MISS") => 1,
            Some(b"PARTIAL") => 2,
            Some(b"BYPASS") => 3,
            _ => 4,
        }
    }

    /// Records a time to first byte for the status at `index`.
    pub fn first_byte(&self, index: usize, seconds: f64) {
        self.first_byte[index.min(4)].observe(seconds);
    }

    /// Records a whole-response duration for the status at `index`.
    pub fn duration(&self, index: usize, seconds: f64) {
        self.duration[index.min(4)].observe(seconds);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "response_first_byte",
            "Time until a client response's headers were ready, by cache status",
            Unit::Seconds,
            self.family_first_byte.clone(),
        );
        registry.register_with_unit(
            "response_duration",
            "Time until a client response's body ended or the client left, by cache status",
            Unit::Seconds,
            self.family_duration.clone(),
        );
    }
}

/// Where the bytes of a response body came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteSource {
    /// Read from a stored slice.
    Disk,
    /// Streamed from an origin fill while it was being stored.
    Fill,
    /// Neither: pass-through bodies and multipart framing.
    Other,
}

/// The gauges the limits keep current (kept current by the fill limits).
#[derive(Debug, Clone, Default)]
pub struct FillGauges {
    /// Fills talking to origins now.
    pub in_flight: Gauge<u64, AtomicU64>,
    /// Fills waiting for a turn.
    pub waiting: Gauge<u64, AtomicU64>,
    /// Bytes reserved by slice buffers.
    pub memory_bytes: Gauge<u64, AtomicU64>,
}

/// One drive's figures, for `/stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DriveUsage {
    /// The drive's directory.
    pub path: String,
    /// Bytes stored on it.
    pub used_bytes: u64,
    /// Its `max_size`.
    pub max_bytes: u64,
    /// Objects stored on it.
    pub objects: u64,
    /// The size its filesystem really allows: `max_bytes`, or less after a write failed with
    /// `ENOSPC`.
    pub effective_max_bytes: u64,
}

/// All counters of one node.
#[derive(Debug)]
pub struct Stats {
    registry: Registry,
    /// Client requests received on the client listener.
    pub requests: Counter,
    /// Requests answered entirely from disk.
    pub hit_requests: Counter,
    /// Requests answered entirely from fills.
    pub miss_requests: Counter,
    /// Requests answered partly from disk and partly from fills.
    pub partial_requests: Counter,
    /// Requests refused (403, 405, 416) or failed.
    pub refused_requests: Counter,
    /// Body bytes sent to clients from disk.
    pub hit_bytes: Counter,
    /// The part of `hit_bytes` sent with `sendfile`, never copied through user space.
    pub zero_copy_bytes: Counter,
    /// Body bytes sent to clients straight from fills.
    pub miss_bytes: Counter,
    /// Every body byte sent to clients.
    pub egress_bytes: Counter,
    /// Body bytes received from origins.
    pub origin_bytes: Counter,
    /// Requests sent to origins.
    pub origin_requests: Counter,
    /// Origin requests that failed (connect, timeout, truncated body, bad response).
    pub origin_errors: Counter,
    /// Origin version changes detected (a new ETag or length under a stored object).
    pub version_changes: Counter,
    /// Checks of stored versions against the origin (`upstream.revalidate_after`).
    pub revalidations: Counter,
    /// Stale versions answered at once and checked in the background (`stale-while-revalidate`,
    /// `serve_stale_while_revalidating`).
    pub background_revalidations: Counter,
    /// Checks that failed when the stored version could not be served stale (`must-revalidate`,
    /// beyond `stale-if-error`), answered `504`.
    pub stale_refusals: Counter,
    /// Origin body bytes read by prefill jobs' fills (also in `origin_bytes`).
    pub prefill_bytes: Counter,
    /// Access log lines written.
    pub access_log_lines: Counter,
    /// Access log lines dropped because the writer was behind (a slow disk).
    pub access_log_dropped: Counter,
    /// Origin answers other than content (`301`, `308`, `404`, `410`) kept while fresh.
    pub status_answers_kept: Counter,
    /// Requests answered with a kept `301`, `308`, `404` or `410`, without the origin.
    pub status_answer_hits: Counter,
    /// Requests relayed from the origin without storing: no length, or the origin's
    /// `Cache-Control` forbids a shared cache to store the content.
    pub pass_through_requests: Counter,
    /// Slice writes that failed (full disk, I/O error); the bytes were still served.
    pub disk_write_errors: Counter,
    /// Slices written to disk.
    pub slices_stored: Counter,
    /// Peer announcements accepted by the tracker.
    pub peer_announcements: Counter,
    /// Peer queries answered by the tracker.
    pub peer_queries: Counter,
    /// Piece manifests served.
    pub manifests_served: Counter,
    cache_used_bytes: Gauge<u64, AtomicU64>,
    cache_max_bytes: Gauge<u64, AtomicU64>,
    objects: Gauge<u64, AtomicU64>,
    drive_used_bytes: DriveGauges,
    drive_max_bytes: DriveGauges,
    /// Fills in flight, fills waiting for a turn and fill memory (see the fill limits, `cache::fill_limits`).
    pub fills: FillGauges,
    /// Fills stopped before the end of their run because no client wanted the rest.
    pub fills_stopped: Counter,
    /// Requests answered `503` because their client had `fill.max_per_client` cold fills running.
    pub fill_refusals: Counter,
    /// Origin answers with a `Content-Encoding`, stored and served with it as sent.
    pub encoded_responses: Counter,
    /// The defences at the edge: connection caps and timeouts, malformed requests, the
    /// tracker's quotas and the admin token's throttle.
    pub edge: EdgeCounters,
    /// Time to first byte and whole-response duration, per cache status.
    pub latency: LatencyHistograms,
    /// Discoveries refused because the origin declared more than `storage.max_object_size`.
    pub objects_refused_too_large: Counter,
    /// Responses not stored (relayed) because their header section was above
    /// `MAX_STORED_HEADER_BYTES`.
    pub objects_refused_headers_too_large: Counter,
    /// Stored slices that did not match their piece hashes (each dropped its object).
    pub integrity_failures: Counter,
    /// Stored slices compared with their piece hashes (sampled hits, manifest checks).
    pub slices_verified: Counter,
    /// Stored slices found missing or short when read (each was filled again).
    pub slices_lost: Counter,
    /// Writes that failed because the filesystem was full.
    pub disk_full_events: Counter,
    /// Requests relayed to their origin with another method than GET or HEAD, never stored.
    pub relayed_requests: Counter,
    /// Request body bytes relayed from clients to origins.
    pub relayed_request_bytes: Counter,
    /// Stored objects dropped because an unsafe method on their URL (or naming it in
    /// `Location`/`Content-Location`) succeeded (RFC 9111 §4.4).
    pub invalidations: Counter,
    cache_effective_max_bytes: Gauge<u64, AtomicU64>,
    /// Seconds until the TLS listener's certificate expires, labelled `cert="<tls.cert>"`; no
    /// sample while TLS is off.
    pub tls_certificate_expiry: TlsExpiryGauge,
    /// The traffic and stored objects of each origin label.
    pub origins: OriginStats,
}

/// The gauge of seconds to the TLS certificate's expiry (negative once expired), by file.
pub type TlsExpiryGauge = Family<Vec<(String, String)>, Gauge<i64, AtomicI64>>;

/// A gauge per cache drive, labelled `drive="<path>"`.
type DriveGauges = Family<Vec<(String, String)>, Gauge<u64, AtomicU64>>;

/// The `/stats` document.
#[derive(Debug, Serialize)]
pub struct StatsSnapshot {
    /// Client requests received.
    pub requests: u64,
    /// Requests served entirely from disk.
    pub hit_requests: u64,
    /// Requests served entirely from fills.
    pub miss_requests: u64,
    /// Requests served from both.
    pub partial_requests: u64,
    /// Requests refused or failed.
    pub refused_requests: u64,
    /// Body bytes sent from disk.
    pub hit_bytes: u64,
    /// The part of `hit_bytes` sent with `sendfile`.
    pub zero_copy_bytes: u64,
    /// Body bytes sent from fills.
    pub miss_bytes: u64,
    /// Body bytes sent in all.
    pub egress_bytes: u64,
    /// Body bytes received from origins.
    pub origin_bytes: u64,
    /// `hit_bytes / (hit_bytes + miss_bytes)`, 0 when nothing was served.
    pub hit_ratio_bytes: f64,
    /// Requests sent to origins.
    pub origin_requests: u64,
    /// Failed origin requests.
    pub origin_errors: u64,
    /// Detected origin version changes.
    pub version_changes: u64,
    /// Checks of stored versions against the origin.
    pub revalidations: u64,
    /// Stale versions served while checked in the background.
    pub background_revalidations: u64,
    /// Failed checks answered `504` rather than with the stale version.
    pub stale_refusals: u64,
    /// Origin body bytes read by prefill jobs.
    pub prefill_bytes: u64,
    /// Access log lines written.
    pub access_log_lines: u64,
    /// Access log lines dropped because the writer was behind.
    pub access_log_dropped: u64,
    /// Redirects, `404`s and `410`s kept while fresh.
    pub status_answers_kept: u64,
    /// Requests answered with a kept redirect, `404` or `410`.
    pub status_answer_hits: u64,
    /// Requests relayed uncached.
    pub pass_through_requests: u64,
    /// Failed slice writes.
    pub disk_write_errors: u64,
    /// Slices written.
    pub slices_stored: u64,
    /// Peer announcements accepted.
    pub peer_announcements: u64,
    /// Peer queries answered.
    pub peer_queries: u64,
    /// Piece manifests served.
    pub manifests_served: u64,
    /// Bytes stored on disk.
    pub cache_used_bytes: u64,
    /// The sum of every drive's `max_size`.
    pub cache_max_bytes: u64,
    /// Objects in the index.
    pub objects: u64,
    /// `portable` or `io_uring`.
    pub disk_backend: String,
    /// Each cache drive's path, `used_bytes`, `max_bytes` and `objects` (filled in by the node).
    pub drives: Vec<DriveUsage>,
    /// Fills talking to origins now (at most `fill.max_concurrent`).
    pub fills_in_flight: u64,
    /// Fills waiting for a turn.
    pub fills_waiting: u64,
    /// Bytes fills hold in memory (at most `fill.max_memory`).
    pub fill_memory_bytes: u64,
    /// Fills stopped early because no client wanted the rest.
    pub fills_stopped: u64,
    /// Requests refused because their client had `fill.max_per_client` cold fills running.
    pub fill_refusals: u64,
    /// Origin answers with a `Content-Encoding`, stored and served as sent.
    pub encoded_responses: u64,
    /// The edge defences' counters, at the top level of the document.
    #[serde(flatten)]
    pub edge: EdgeSnapshot,
    /// Discoveries refused for declaring more than `storage.max_object_size`.
    pub objects_refused_too_large: u64,
    /// Responses relayed, not stored, for a header section above the stored bound.
    pub objects_refused_headers_too_large: u64,
    /// Stored slices that failed their piece-hash check.
    pub integrity_failures: u64,
    /// Stored slices checked against their piece hashes.
    pub slices_verified: u64,
    /// Stored slices found missing or short when read.
    pub slices_lost: u64,
    /// Writes that failed because the filesystem was full.
    pub disk_full_events: u64,
    /// Requests relayed with another method than GET or HEAD.
    pub relayed_requests: u64,
    /// Request body bytes relayed from clients to origins.
    pub relayed_request_bytes: u64,
    /// Stored objects dropped by a successful unsafe method.
    pub invalidations: u64,
    /// The size the drives really allow together: `cache_max_bytes`, or less after a write
    /// failed for lack of space (see each drive's `effective_max_bytes`).
    pub cache_effective_max_bytes: u64,
    /// Each origin label's traffic and stored objects, in configuration order.
    pub origins: Vec<OriginSnapshot>,
}

/// The traffic of one interval between two snapshots, for the periodic summary log line.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficSummary {
    /// Client requests received in the interval.
    pub requests: u64,
    /// Body bytes sent from disk in the interval.
    pub hit_bytes: u64,
    /// Body bytes sent from fills in the interval.
    pub miss_bytes: u64,
    /// Body bytes sent in all in the interval.
    pub egress_bytes: u64,
    /// Body bytes received from origins in the interval.
    pub origin_bytes: u64,
    /// `hit_bytes / (hit_bytes + miss_bytes)` over the interval, 0 when nothing was served.
    pub hit_ratio_bytes: f64,
}

impl TrafficSummary {
    /// What happened between `earlier` and `later`; `None` for a quiet interval.
    pub fn between(earlier: &StatsSnapshot, later: &StatsSnapshot) -> Option<TrafficSummary> {
        let delta = |pick: fn(&StatsSnapshot) -> u64| pick(later).saturating_sub(pick(earlier));
        let summary = TrafficSummary {
            requests: delta(|snapshot| snapshot.requests),
            hit_bytes: delta(|snapshot| snapshot.hit_bytes),
            miss_bytes: delta(|snapshot| snapshot.miss_bytes),
            egress_bytes: delta(|snapshot| snapshot.egress_bytes),
            origin_bytes: delta(|snapshot| snapshot.origin_bytes),
            hit_ratio_bytes: 0.0,
        };
        if summary.requests == 0 && summary.egress_bytes == 0 && summary.origin_bytes == 0 {
            return None;
        }
        let served = summary.hit_bytes + summary.miss_bytes;
        Some(TrafficSummary {
            hit_ratio_bytes: if served == 0 {
                0.0
            } else {
                summary.hit_bytes as f64 / served as f64
            },
            ..summary
        })
    }
}

impl Stats {
    /// Creates the counters and registers them under the `outpost_` prefix, with an info metric
    /// naming the disk backend. `origin_labels` are the allowlist's labels, in the order of the
    /// [`OriginIndex`]es routing hands out.
    pub fn new(disk_backend: &str, origin_labels: &[String]) -> Stats {
        let mut registry = Registry::with_prefix("outpost");
        let stats_without_registry = Stats {
            registry: Registry::default(),
            requests: Counter::default(),
            hit_requests: Counter::default(),
            miss_requests: Counter::default(),
            partial_requests: Counter::default(),
            refused_requests: Counter::default(),
            hit_bytes: Counter::default(),
            zero_copy_bytes: Counter::default(),
            miss_bytes: Counter::default(),
            egress_bytes: Counter::default(),
            origin_bytes: Counter::default(),
            origin_requests: Counter::default(),
            origin_errors: Counter::default(),
            version_changes: Counter::default(),
            revalidations: Counter::default(),
            background_revalidations: Counter::default(),
            stale_refusals: Counter::default(),
            prefill_bytes: Counter::default(),
            access_log_lines: Counter::default(),
            access_log_dropped: Counter::default(),
            status_answers_kept: Counter::default(),
            status_answer_hits: Counter::default(),
            pass_through_requests: Counter::default(),
            disk_write_errors: Counter::default(),
            slices_stored: Counter::default(),
            peer_announcements: Counter::default(),
            peer_queries: Counter::default(),
            manifests_served: Counter::default(),
            cache_used_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            objects: Gauge::default(),
            drive_used_bytes: DriveGauges::default(),
            drive_max_bytes: DriveGauges::default(),
            fills: FillGauges::default(),
            fills_stopped: Counter::default(),
            fill_refusals: Counter::default(),
            encoded_responses: Counter::default(),
            edge: EdgeCounters::default(),
            latency: LatencyHistograms::default(),
            objects_refused_too_large: Counter::default(),
            objects_refused_headers_too_large: Counter::default(),
            integrity_failures: Counter::default(),
            slices_verified: Counter::default(),
            slices_lost: Counter::default(),
            disk_full_events: Counter::default(),
            relayed_requests: Counter::default(),
            relayed_request_bytes: Counter::default(),
            invalidations: Counter::default(),
            cache_effective_max_bytes: Gauge::default(),
            tls_certificate_expiry: TlsExpiryGauge::default(),
            origins: OriginStats::new(origin_labels),
        };
        let stats = &stats_without_registry;
        let counters: [(&str, &str, &Counter, Option<Unit>); 27] = [
            (
                "requests",
                "Client requests received",
                &stats.requests,
                None,
            ),
            (
                "hit_requests",
                "Requests served entirely from disk",
                &stats.hit_requests,
                None,
            ),
            (
                "miss_requests",
                "Requests served entirely from origin fills",
                &stats.miss_requests,
                None,
            ),
            (
                "partial_requests",
                "Requests served partly from disk and partly from fills",
                &stats.partial_requests,
                None,
            ),
            (
                "refused_requests",
                "Requests refused or failed",
                &stats.refused_requests,
                None,
            ),
            (
                "hit",
                "Body bytes sent to clients from disk",
                &stats.hit_bytes,
                Some(Unit::Bytes),
            ),
            (
                "zero_copy",
                "Body bytes sent from disk with sendfile (part of the hit bytes)",
                &stats.zero_copy_bytes,
                Some(Unit::Bytes),
            ),
            (
                "miss",
                "Body bytes sent to clients from origin fills",
                &stats.miss_bytes,
                Some(Unit::Bytes),
            ),
            (
                "egress",
                "Body bytes sent to clients",
                &stats.egress_bytes,
                Some(Unit::Bytes),
            ),
            (
                "origin",
                "Body bytes received from origins",
                &stats.origin_bytes,
                Some(Unit::Bytes),
            ),
            (
                "origin_requests",
                "Requests sent to origins",
                &stats.origin_requests,
                None,
            ),
            (
                "origin_errors",
                "Origin requests that failed",
                &stats.origin_errors,
                None,
            ),
            (
                "version_changes",
                "Origin content changes detected under stored objects",
                &stats.version_changes,
                None,
            ),
            (
                "revalidations",
                "Checks of stored versions against the origin",
                &stats.revalidations,
                None,
            ),
            (
                "background_revalidations",
                "Stale versions served while checked in the background",
                &stats.background_revalidations,
                None,
            ),
            (
                "stale_refusals",
                "Failed checks answered 504 rather than with a stale version",
                &stats.stale_refusals,
                None,
            ),
            (
                "prefill_bytes",
                "Origin body bytes read by prefill jobs (also counted in origin_bytes)",
                &stats.prefill_bytes,
                Some(Unit::Bytes),
            ),
            (
                "access_log_lines",
                "Access log lines written",
                &stats.access_log_lines,
                None,
            ),
            (
                "access_log_dropped",
                "Access log lines dropped because the writer was behind (a slow disk)",
                &stats.access_log_dropped,
                None,
            ),
            (
                "status_answers_kept",
                "Redirects, 404s and 410s kept in memory while the origin says they are fresh",
                &stats.status_answers_kept,
                None,
            ),
            (
                "status_answer_hits",
                "Requests answered with a kept redirect, 404 or 410, without the origin",
                &stats.status_answer_hits,
                None,
            ),
            (
                "pass_through_requests",
                "Requests relayed from the origin without storing the content",
                &stats.pass_through_requests,
                None,
            ),
            (
                "disk_write_errors",
                "Slice writes that failed",
                &stats.disk_write_errors,
                None,
            ),
            (
                "slices_stored",
                "Slices written to disk",
                &stats.slices_stored,
                None,
            ),
            (
                "peer_announcements",
                "Peer announcements accepted by the tracker",
                &stats.peer_announcements,
                None,
            ),
            (
                "peer_queries",
                "Peer queries answered by the tracker",
                &stats.peer_queries,
                None,
            ),
            (
                "manifests_served",
                "Piece manifests served",
                &stats.manifests_served,
                None,
            ),
        ];
        for (name, help, counter, unit) in counters {
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, counter.clone()),
                None => registry.register(name, help, counter.clone()),
            }
        }
        registry.register_with_unit(
            "cache_used",
            "Bytes stored on disk",
            Unit::Bytes,
            stats.cache_used_bytes.clone(),
        );
        registry.register_with_unit(
            "cache_max",
            "Configured max_size of all cache drives together",
            Unit::Bytes,
            stats.cache_max_bytes.clone(),
        );
        registry.register("objects", "Objects in the index", stats.objects.clone());
        registry.register_with_unit(
            "tls_certificate_expiry",
            "Seconds until the TLS listener's certificate expires (negative once it has)",
            Unit::Seconds,
            stats.tls_certificate_expiry.clone(),
        );
        registry.register_with_unit(
            "drive_used",
            "Bytes stored on each cache drive",
            Unit::Bytes,
            stats.drive_used_bytes.clone(),
        );
        registry.register_with_unit(
            "drive_max",
            "Configured max_size of each cache drive",
            Unit::Bytes,
            stats.drive_max_bytes.clone(),
        );
        let store_counters: [(&str, &str, &Counter); 6] = [
            (
                "objects_refused_too_large",
                "Discoveries refused because the origin declared more than storage.max_object_size",
                &stats.objects_refused_too_large,
            ),
            (
                "objects_refused_headers_too_large",
                "Responses relayed, not stored, because their header section was above the stored bound (64 KiB)",
                &stats.objects_refused_headers_too_large,
            ),
            (
                "integrity_failures",
                "Stored slices that did not match their piece hashes",
                &stats.integrity_failures,
            ),
            (
                "slices_verified",
                "Stored slices compared with their piece hashes",
                &stats.slices_verified,
            ),
            (
                "slices_lost",
                "Stored slices found missing or short when read",
                &stats.slices_lost,
            ),
            (
                "disk_full_events",
                "Writes that failed because the filesystem was full",
                &stats.disk_full_events,
            ),
        ];
        for (name, help, counter) in store_counters {
            registry.register(name, help, counter.clone());
        }
        let relay_counters: [(&str, &str, &Counter, Option<Unit>); 3] = [
            (
                "relayed_requests",
                "Requests relayed to origins with another method than GET or HEAD",
                &stats.relayed_requests,
                None,
            ),
            (
                "relayed_request",
                "Request body bytes relayed from clients to origins",
                &stats.relayed_request_bytes,
                Some(Unit::Bytes),
            ),
            (
                "invalidations",
                "Stored objects dropped because an unsafe method on their URL succeeded",
                &stats.invalidations,
                None,
            ),
        ];
        for (name, help, counter, unit) in relay_counters {
            match unit {
                Some(unit) => registry.register_with_unit(name, help, unit, counter.clone()),
                None => registry.register(name, help, counter.clone()),
            }
        }
        registry.register_with_unit(
            "cache_effective_max",
            "The size the cache drives really allow together: cache_max, or less after a full filesystem",
            Unit::Bytes,
            stats.cache_effective_max_bytes.clone(),
        );
        registry.register(
            "fills_in_flight",
            "Fills talking to origins now",
            stats.fills.in_flight.clone(),
        );
        registry.register(
            "fills_waiting",
            "Fills waiting for a turn (fill.max_concurrent)",
            stats.fills.waiting.clone(),
        );
        registry.register_with_unit(
            "fill_memory",
            "Bytes fills hold in memory (fill.max_memory)",
            Unit::Bytes,
            stats.fills.memory_bytes.clone(),
        );
        for (name, help, counter) in [
            (
                "fills_stopped",
                "Fills stopped early because no client wanted the rest",
                &stats.fills_stopped,
            ),
            (
                "fill_refusals",
                "Requests refused because their client had fill.max_per_client cold fills running",
                &stats.fill_refusals,
            ),
            (
                "encoded_responses",
                "Origin answers with a Content-Encoding, stored and served as sent",
                &stats.encoded_responses,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        // A gauge of 1 labelled with the backend, not an OpenMetrics `info` metric: Prometheus's
        // classic text parser (and `promtool check metrics`) knows no `info` type.
        let backend: Family<Vec<(String, String)>, Gauge<u64, AtomicU64>> = Family::default();
        backend
            .get_or_create(&vec![("backend".to_owned(), disk_backend.to_owned())])
            .set(1);
        registry.register(
            "disk_backend_info",
            "The disk I/O backend in use (the gauge is 1 for it)",
            backend,
        );
        stats.edge.register(&mut registry);
        stats.latency.register(&mut registry);
        stats.origins.register(&mut registry);
        Stats {
            registry,
            ..stats_without_registry
        }
    }

    /// Counts `length` body bytes sent to a client from `source`, for a request routed to
    /// `origin`.
    pub fn count_egress(&self, origin: OriginIndex, source: ByteSource, length: u64) {
        self.egress_bytes.inc_by(length);
        let table = self.origins.table();
        let counters = table.get(origin);
        if let Some(counters) = counters {
            counters.add(OriginBytes::Egress, length);
        }
        match source {
            ByteSource::Disk => {
                self.hit_bytes.inc_by(length);
                if let Some(counters) = counters {
                    counters.add(OriginBytes::Hit, length);
                }
            }
            ByteSource::Fill => {
                self.miss_bytes.inc_by(length);
                if let Some(counters) = counters {
                    counters.add(OriginBytes::Miss, length);
                }
            }
            ByteSource::Other => {}
        }
    }

    /// Counts `length` body bytes received from `origin`.
    pub fn count_origin_bytes(&self, origin: OriginIndex, length: u64) {
        self.origin_bytes.inc_by(length);
        if let Some(counters) = self.origins.table().get(origin) {
            counters.add(OriginBytes::Origin, length);
        }
    }

    /// Updates the gauges that are read from the index rather than counted.
    pub fn set_cache_gauges(
        &self,
        used_bytes: u64,
        max_bytes: u64,
        objects: u64,
        drives: &[DriveUsage],
    ) {
        self.cache_used_bytes.set(used_bytes);
        self.cache_max_bytes.set(max_bytes);
        self.objects.set(objects);
        for drive in drives {
            let labels = vec![("drive".to_owned(), drive.path.clone())];
            self.drive_used_bytes
                .get_or_create(&labels)
                .set(drive.used_bytes);
            self.drive_max_bytes
                .get_or_create(&labels)
                .set(drive.max_bytes);
        }
    }

    /// Updates the gauge of the size the drives really allow (see `Index::disk_full`).
    pub fn set_effective_max_bytes(&self, effective_max_bytes: u64) {
        self.cache_effective_max_bytes.set(effective_max_bytes);
    }

    /// The `/stats` document.
    pub fn snapshot(&self, disk_backend: &str) -> StatsSnapshot {
        let hit_bytes = self.hit_bytes.get();
        let miss_bytes = self.miss_bytes.get();
        let served = hit_bytes + miss_bytes;
        StatsSnapshot {
            requests: self.requests.get(),
            hit_requests: self.hit_requests.get(),
            miss_requests: self.miss_requests.get(),
            partial_requests: self.partial_requests.get(),
            refused_requests: self.refused_requests.get(),
            hit_bytes,
            zero_copy_bytes: self.zero_copy_bytes.get(),
            miss_bytes,
            egress_bytes: self.egress_bytes.get(),
            origin_bytes: self.origin_bytes.get(),
            hit_ratio_bytes: if served == 0 {
                0.0
            } else {
                hit_bytes as f64 / served as f64
            },
            origin_requests: self.origin_requests.get(),
            origin_errors: self.origin_errors.get(),
            version_changes: self.version_changes.get(),
            revalidations: self.revalidations.get(),
            background_revalidations: self.background_revalidations.get(),
            stale_refusals: self.stale_refusals.get(),
            prefill_bytes: self.prefill_bytes.get(),
            access_log_lines: self.access_log_lines.get(),
            access_log_dropped: self.access_log_dropped.get(),
            status_answers_kept: self.status_answers_kept.get(),
            status_answer_hits: self.status_answer_hits.get(),
            pass_through_requests: self.pass_through_requests.get(),
            disk_write_errors: self.disk_write_errors.get(),
            slices_stored: self.slices_stored.get(),
            peer_announcements: self.peer_announcements.get(),
            peer_queries: self.peer_queries.get(),
            manifests_served: self.manifests_served.get(),
            cache_used_bytes: self.cache_used_bytes.get(),
            cache_max_bytes: self.cache_max_bytes.get(),
            objects: self.objects.get(),
            disk_backend: disk_backend.to_owned(),
            drives: Vec::new(),
            fills_in_flight: self.fills.in_flight.get(),
            fills_waiting: self.fills.waiting.get(),
            fill_memory_bytes: self.fills.memory_bytes.get(),
            fills_stopped: self.fills_stopped.get(),
            fill_refusals: self.fill_refusals.get(),
            encoded_responses: self.encoded_responses.get(),
            edge: self.edge.snapshot(),
            objects_refused_too_large: self.objects_refused_too_large.get(),
            objects_refused_headers_too_large: self.objects_refused_headers_too_large.get(),
            integrity_failures: self.integrity_failures.get(),
            slices_verified: self.slices_verified.get(),
            slices_lost: self.slices_lost.get(),
            disk_full_events: self.disk_full_events.get(),
            relayed_requests: self.relayed_requests.get(),
            relayed_request_bytes: self.relayed_request_bytes.get(),
            invalidations: self.invalidations.get(),
            cache_effective_max_bytes: self.cache_effective_max_bytes.get(),
            origins: self.origins.snapshot(),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn prometheus_text(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// The classic Prometheus text format (0.0.4) of the same figures, for clients that do not
    /// ask for OpenMetrics (curl, `promtool check metrics`, older scrapers): see [`classic_text`].
    pub fn prometheus_classic_text(&self) -> String {
        classic_text(&self.prometheus_text())
    }
}

/// Counters of the defences at the edge, shared by every worker (the handles share their atomics).
#[derive(Debug, Clone, Default)]
pub struct EdgeCounters {
    /// Client connections open now.
    pub connections_open: Gauge<u64, AtomicU64>,
    /// Client connections closed at once because a cap was reached and none could be shed.
    pub connections_refused: Counter,
    /// Idle client connections closed to make room for new ones.
    pub connections_shed: Counter,
    /// Client connections closed because a request's headers did not arrive in
    /// `server.header_read_timeout`.
    pub header_timeouts: Counter,
    /// Keep-alive connections closed after `server.idle_timeout` without a request.
    pub idle_timeouts: Counter,
    /// Requests refused with 400 before routing: a request-target that is not a path or an
    /// absolute URL, more than one `Host`, a malformed host.
    pub bad_requests: Counter,
    /// Tracker announcements evicted to make room, from the addresses holding the most.
    pub tracker_evictions: Counter,
    /// Admin requests with a missing or wrong token.
    pub admin_auth_failures: Counter,
    /// Admin requests refused with 429 because their address failed too often.
    pub admin_auth_throttled: Counter,
    /// TLS handshakes that failed (untrusted or malformed by the client, wrong protocol); a
    /// handshake cut by the header timeout counts in `header_timeouts` instead.
    pub tls_handshake_failures: Counter,
    /// Configuration reloads applied (`SIGHUP`, `POST /reload`).
    pub config_reloads: Counter,
    /// Configuration reloads refused (the new config did not load or validate).
    pub config_reload_failures: Counter,
}

/// [`EdgeCounters`] in the `/stats` document.
#[derive(Debug, Serialize)]
pub struct EdgeSnapshot {
    /// Client connections open now.
    pub connections_open: u64,
    /// Client connections refused at a cap.
    pub connections_refused: u64,
    /// Idle client connections shed for new ones.
    pub connections_shed: u64,
    /// Connections closed for slow request headers.
    pub connection_header_timeouts: u64,
    /// Keep-alive connections closed when idle.
    pub connection_idle_timeouts: u64,
    /// Requests refused with 400 before routing.
    pub bad_requests: u64,
    /// Tracker announcements evicted.
    pub tracker_evictions: u64,
    /// Admin requests with a missing or wrong token.
    pub admin_auth_failures: u64,
    /// Admin requests throttled with 429.
    pub admin_auth_throttled: u64,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: u64,
    /// Configuration reloads applied.
    pub config_reloads: u64,
    /// Configuration reloads refused.
    pub config_reload_failures: u64,
}

impl EdgeCounters {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_open",
            "Client connections open now",
            self.connections_open.clone(),
        );
        let counters: [(&str, &str, &Counter); 11] = [
            (
                "config_reloads",
                "Configuration reloads applied (SIGHUP, POST /reload)",
                &self.config_reloads,
            ),
            (
                "config_reload_failures",
                "Configuration reloads refused; the running configuration stayed",
                &self.config_reload_failures,
            ),
            (
                "tls_handshake_failures",
                "TLS handshakes on the client listener that failed",
                &self.tls_handshake_failures,
            ),
            (
                "connections_refused",
                "Client connections refused because a connection cap was reached",
                &self.connections_refused,
            ),
            (
                "connections_shed",
                "Idle client connections closed to make room for new ones",
                &self.connections_shed,
            ),
            (
                "connection_header_timeouts",
                "Client connections closed because request headers were too slow",
                &self.header_timeouts,
            ),
            (
                "connection_idle_timeouts",
                "Keep-alive client connections closed after server.idle_timeout",
                &self.idle_timeouts,
            ),
            (
                "bad_requests",
                "Requests refused with 400 before routing (request-target, Host)",
                &self.bad_requests,
            ),
            (
                "tracker_evictions",
                "Tracker announcements evicted from the addresses holding the most",
                &self.tracker_evictions,
            ),
            (
                "admin_auth_failures",
                "Admin requests with a missing or wrong token",
                &self.admin_auth_failures,
            ),
            (
                "admin_auth_throttled",
                "Admin requests refused with 429 after too many failed tokens",
                &self.admin_auth_throttled,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }

    fn snapshot(&self) -> EdgeSnapshot {
        EdgeSnapshot {
            connections_open: self.connections_open.get(),
            connections_refused: self.connections_refused.get(),
            connections_shed: self.connections_shed.get(),
            connection_header_timeouts: self.header_timeouts.get(),
            connection_idle_timeouts: self.idle_timeouts.get(),
            bad_requests: self.bad_requests.get(),
            tracker_evictions: self.tracker_evictions.get(),
            admin_auth_failures: self.admin_auth_failures.get(),
            admin_auth_throttled: self.admin_auth_throttled.get(),
            tls_handshake_failures: self.tls_handshake_failures.get(),
            config_reloads: self.config_reloads.get(),
            config_reload_failures: self.config_reload_failures.get(),
        }
    }
}

/// Which origin label a request was routed to: the position of the label among the allowlist's
/// labels, and of its counters in [`OriginStats`]. Routing hands it out; it is never built from
/// what a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OriginIndex(pub usize);

/// Labelled counters, one series per origin label.
type OriginFamily<M> = Family<Vec<(String, String)>, M>;

/// The byte counters kept per origin label, in [`OriginCounters::bytes`] order, with the global
/// counter each one breaks down (and the `/metrics` family name, `per_origin_<name>_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginBytes {
    /// Body bytes sent to clients from disk (`hit_bytes`).
    Hit,
    /// Body bytes sent to clients straight from fills (`miss_bytes`).
    Miss,
    /// Every body byte sent to clients (`egress_bytes`).
    Egress,
    /// Body bytes received from the origin (`origin_bytes`).
    Origin,
}

/// Each [`OriginBytes`] kind's `/metrics` name (before `_bytes_total`) and help.
const ORIGIN_BYTE_FAMILIES: [(&str, &str); 4] = [
    (
        "per_origin_hit",
        "Body bytes sent to clients from disk, per configured origin",
    ),
    (
        "per_origin_miss",
        "Body bytes sent to clients from origin fills, per configured origin",
    ),
    (
        "per_origin_egress",
        "Body bytes sent to clients, per configured origin",
    ),
    (
        "per_origin_origin",
        "Body bytes received from each configured origin",
    ),
];

/// One origin label's counters: the global counters' meanings, for the requests routed to it.
/// The handles share their atomics with the `/metrics` families.
#[derive(Debug, Clone, Default)]
pub struct OriginCounters {
    /// Client requests routed to this origin (content and relayed requests; not refusals, which
    /// have no origin, nor the node's own API).
    pub requests: Counter,
    /// Body bytes, by [`OriginBytes`] kind.
    bytes: [Counter; 4],
    /// Objects of this origin in the index, then their bytes on disk (set when read).
    stored: [Gauge<u64, AtomicU64>; 2],
}

impl OriginCounters {
    /// Counts `length` bytes of `kind`.
    pub fn add(&self, kind: OriginBytes, length: u64) {
        self.bytes[kind as usize].inc_by(length);
    }

    /// The bytes of `kind` so far.
    pub fn get(&self, kind: OriginBytes) -> u64 {
        self.bytes[kind as usize].get()
    }
}

/// What the index holds for one origin label (see [`OriginStats::set_stored`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredTally {
    /// Objects in the index.
    pub objects: u64,
    /// Their bytes on disk.
    pub bytes: u64,
}

/// The per-origin figures: the labels of the config at start-up, and those a config reload
/// added (labels are never removed, so their counters stay monotonic, and at most
/// [`MAX_ORIGIN_LABELS`]), one [`OriginCounters`] per label.
#[derive(Debug)]
pub struct OriginStats {
    /// Replaced whole when a reload adds labels; requests hold it for one count.
    table: arc_swap::ArcSwap<OriginTable>,
    /// Serialises adding labels.
    adding: std::sync::Mutex<()>,
    families: OriginFamilies,
}

/// Labels and their counters, in [`OriginIndex`] order.
#[derive(Debug, Default)]
pub struct OriginTable {
    labels: Vec<String>,
    counters: Vec<OriginCounters>,
}

impl OriginTable {
    /// The counters of the label at `origin`. `None` only for an index no allowlist of this
    /// node handed out (the stats' own tests).
    pub fn get(&self, origin: OriginIndex) -> Option<&OriginCounters> {
        let counters = self.counters.get(origin.0);
        debug_assert!(
            counters.is_some() || self.counters.is_empty(),
            "origin index {} out of {} labels",
            origin.0,
            self.counters.len()
        );
        counters
    }
}

/// Labels a node keeps at most, over all its reloads; past it, new labels count under
/// [`OVERFLOW_ORIGIN_LABEL`] until a restart.
pub const MAX_ORIGIN_LABELS: usize = 1024;

/// The label of origins added by reloads past [`MAX_ORIGIN_LABELS`].
pub const OVERFLOW_ORIGIN_LABEL: &str = "other (restart to split)";

/// The `/metrics` families behind [`OriginCounters`], field for field.
#[derive(Debug, Default)]
struct OriginFamilies {
    requests: OriginFamily<Counter>,
    bytes: [OriginFamily<Counter>; 4],
    stored: [OriginFamily<Gauge<u64, AtomicU64>>; 2],
}

/// One origin label in the `/stats` document.
#[derive(Debug, Clone, Serialize)]
pub struct OriginSnapshot {
    /// The label: a content set's name, a host pattern, address ranges, or `default`.
    pub label: String,
    /// Client requests routed to it.
    pub requests: u64,
    /// Body bytes sent from disk.
    pub hit_bytes: u64,
    /// Body bytes sent from fills.
    pub miss_bytes: u64,
    /// Body bytes sent in all.
    pub egress_bytes: u64,
    /// Body bytes received from it.
    pub origin_bytes: u64,
    /// Its objects in the index.
    pub objects: u64,
    /// Their bytes on disk.
    pub stored_bytes: u64,
}

/// A label value as the Prometheus text formats write it between quotes: backslash, double quote
/// and line feed escaped. (prometheus-client writes label values as given.)
pub fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for character in value.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            other => escaped.push(other),
        }
    }
    escaped
}

impl OriginStats {
    /// Counters for `labels`, each series created at once so that every configured origin
    /// appears (at zero) from the start.
    fn new(labels: &[String]) -> OriginStats {
        let stats = OriginStats {
            table: arc_swap::ArcSwap::from_pointee(OriginTable::default()),
            adding: std::sync::Mutex::new(()),
            families: OriginFamilies::default(),
        };
        stats.adopt_labels(labels);
        stats
    }

    /// The labels and counters now.
    pub fn table(&self) -> arc_swap::Guard<std::sync::Arc<OriginTable>> {
        self.table.load()
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.table.load().labels.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where each of `labels` (an allowlist's, in its own order) counts: its existing label's
    /// index, or a new one created for it (each series at once, so it appears at zero).
    pub fn adopt_labels(&self, labels: &[String]) -> Vec<OriginIndex> {
        let _adding = outpost_shared::sync::lock(&self.adding);
        let current = self.table.load_full();
        let mut table = OriginTable {
            labels: current.labels.clone(),
            counters: current.counters.clone(),
        };
        let indices = labels
            .iter()
            .map(|label| {
                // The last place is kept for the overflow label.
                let label =
                    if table.labels.contains(label) || table.labels.len() < MAX_ORIGIN_LABELS - 1 {
                        label.as_str()
                    } else {
                        OVERFLOW_ORIGIN_LABEL
                    };
                self.find_or_create(&mut table, label)
            })
            .collect();
        self.table.store(std::sync::Arc::new(table));
        indices
    }

    /// The index of `label` in `table`, adding it with its series if it is new.
    fn find_or_create(&self, table: &mut OriginTable, label: &str) -> OriginIndex {
        if let Some(position) = table.labels.iter().position(|known| known == label) {
            return OriginIndex(position);
        }
        let series = vec![("origin".to_owned(), escape_label_value(label))];
        let families = &self.families;
        table.labels.push(label.to_owned());
        table.counters.push(OriginCounters {
            requests: families.requests.get_or_create(&series).clone(),
            bytes: families
                .bytes
                .each_ref()
                .map(|family| family.get_or_create(&series).clone()),
            stored: families
                .stored
                .each_ref()
                .map(|family| family.get_or_create(&series).clone()),
        });
        OriginIndex(table.labels.len() - 1)
    }

    /// Counts a client request routed to `origin`.
    pub fn count_request(&self, origin: OriginIndex) {
        if let Some(counters) = self.table().get(origin) {
            counters.requests.inc();
        }
    }

    /// Sets what the index holds per label, in [`OriginIndex`] order (missing entries are 0).
    pub fn set_stored(&self, tallies: &[StoredTally]) {
        for (index, counters) in self.table().counters.iter().enumerate() {
            let tally = tallies.get(index).copied().unwrap_or_default();
            counters.stored[0].set(tally.objects);
            counters.stored[1].set(tally.bytes);
        }
    }

    fn snapshot(&self) -> Vec<OriginSnapshot> {
        let table = self.table();
        table
            .labels
            .iter()
            .zip(&table.counters)
            .map(|(label, counters)| OriginSnapshot {
                label: label.clone(),
                requests: counters.requests.get(),
                hit_bytes: counters.get(OriginBytes::Hit),
                miss_bytes: counters.get(OriginBytes::Miss),
                egress_bytes: counters.get(OriginBytes::Egress),
                origin_bytes: counters.get(OriginBytes::Origin),
                objects: counters.stored[0].get(),
                stored_bytes: counters.stored[1].get(),
            })
            .collect()
    }

    /// Registers the families as `per_origin_<global name>`, so that each sums (over `origin`)
    /// to the global figure of the same name.
    fn register(&self, registry: &mut Registry) {
        let families = &self.families;
        registry.register(
            "per_origin_requests",
            "Client requests routed to each configured origin",
            families.requests.clone(),
        );
        for ((name, help), family) in ORIGIN_BYTE_FAMILIES.iter().zip(&families.bytes) {
            registry.register_with_unit(*name, *help, Unit::Bytes, family.clone());
        }
        registry.register(
            "per_origin_stored_objects",
            "Objects in the index, per configured origin",
            families.stored[0].clone(),
        );
        registry.register_with_unit(
            "per_origin_stored",
            "Bytes stored on disk, per configured origin",
            Unit::Bytes,
            families.stored[1].clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails unless `text` has every one of `lines`.
    fn assert_has_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn a_summary_covers_its_interval_only_and_quiet_intervals_have_none() {
        let stats = Stats::new("portable", &[]);
        stats.count_egress(OriginIndex(0), ByteSource::Disk, 300);
        let snapshot = stats.snapshot("portable");
        assert_eq!(TrafficSummary::between(&snapshot, &snapshot), None);
        stats.requests.inc();
        stats.count_egress(OriginIndex(0), ByteSource::Disk, 100);
        stats.count_egress(OriginIndex(0), ByteSource::Fill, 300);
        let later = stats.snapshot("portable");
        let summary = TrafficSummary::between(&snapshot, &later).unwrap();
        assert_eq!(summary.requests, 1);
        assert_eq!(summary.hit_bytes, 100);
        assert_eq!(summary.egress_bytes, 400);
        assert!((summary.hit_ratio_bytes - 0.25).abs() < 1e-9);
    }

    #[test]
    fn both_views_report_the_same_counts() {
        let stats = Stats::new("portable", &[]);
        stats.count_egress(OriginIndex(0), ByteSource::Disk, 300);
        stats.count_egress(OriginIndex(0), ByteSource::Fill, 100);
        stats.count_egress(OriginIndex(0), ByteSource::Other, 7);
        let drive = DriveUsage {
            path: "/var/cache/outpost".into(),
            used_bytes: 10,
            max_bytes: 20,
            objects: 1,
            effective_max_bytes: 20,
        };
        stats.set_cache_gauges(10, 20, 1, &[drive]);
        let snapshot = stats.snapshot("portable");
        assert_eq!(snapshot.hit_bytes, 300);
        assert_eq!(snapshot.miss_bytes, 100);
        assert_eq!(snapshot.egress_bytes, 407);
        assert!((snapshot.hit_ratio_bytes - 0.75).abs() < 1e-9);
        let text = stats.prometheus_text();
        assert!(text.contains("outpost_hit_bytes_total 300"), "{text}");
        assert!(text.contains("outpost_egress_bytes_total 407"), "{text}");
        assert!(text.contains("outpost_cache_used_bytes 10"), "{text}");
        assert!(
            text.contains("outpost_drive_max_bytes{drive=\"/var/cache/outpost\"} 20"),
            "{text}"
        );
        assert!(
            text.contains("outpost_disk_backend_info{backend=\"portable\"} 1"),
            "{text}"
        );
        assert!(text.contains("outpost_fills_in_flight 0"), "{text}");
        assert!(text.contains("outpost_fill_memory_bytes 0"), "{text}");
        assert!(text.contains("outpost_fills_stopped_total 0"), "{text}");
        assert!(text.contains("# EOF"), "{text}");
    }

    #[test]
    fn the_store_defences_are_counted_in_both_views() {
        let stats = Stats::new("portable", &[]);
        stats.objects_refused_too_large.inc();
        stats.integrity_failures.inc();
        stats.slices_verified.inc_by(3);
        stats.slices_lost.inc();
        stats.disk_full_events.inc_by(2);
        stats.set_effective_max_bytes(4096);
        let snapshot = stats.snapshot("portable");
        assert_eq!(snapshot.objects_refused_too_large, 1);
        assert_eq!(snapshot.integrity_failures, 1);
        assert_eq!(snapshot.slices_verified, 3);
        assert_eq!(snapshot.slices_lost, 1);
        assert_eq!(snapshot.disk_full_events, 2);
        assert_eq!(snapshot.cache_effective_max_bytes, 4096);
        let text = stats.prometheus_text();
        for line in [
            "outpost_objects_refused_too_large_total 1",
            "outpost_integrity_failures_total 1",
            "outpost_slices_verified_total 3",
            "outpost_slices_lost_total 1",
            "outpost_disk_full_events_total 2",
            "outpost_cache_effective_max_bytes 4096",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn origin_figures_are_counted_per_label_in_both_views() {
        let labels = ["windows-update".to_owned(), "*.example.com".to_owned()];
        let stats = Stats::new("portable", &labels);
        let (set, hosts) = (OriginIndex(0), OriginIndex(1));
        stats.origins.count_request(set);
        stats.origins.count_request(hosts);
        stats.origins.count_request(hosts);
        stats.count_egress(set, ByteSource::Fill, 100);
        stats.count_egress(hosts, ByteSource::Disk, 30);
        stats.count_egress(hosts, ByteSource::Other, 2);
        stats.count_origin_bytes(set, 100);
        stats.origins.set_stored(&[StoredTally {
            objects: 1,
            bytes: 4096,
        }]);
        let snapshot = stats.snapshot("portable");
        let figures: Vec<_> = snapshot
            .origins
            .iter()
            .map(|origin| {
                (
                    origin.label.as_str(),
                    origin.requests,
                    origin.hit_bytes,
                    origin.miss_bytes,
                    origin.egress_bytes,
                    origin.origin_bytes,
                    origin.objects,
                    origin.stored_bytes,
                )
            })
            .collect();
        assert_eq!(
            figures,
            [
                ("windows-update", 1, 0, 100, 100, 100, 1, 4096),
                ("*.example.com", 2, 30, 0, 32, 0, 0, 0),
            ]
        );
        assert_eq!(snapshot.egress_bytes, 132);
        assert_eq!(snapshot.origin_bytes, 100);
        assert_has_lines(
            &stats.prometheus_classic_text(),
            &[
                "outpost_per_origin_requests_total{origin=\"*.example.com\"} 2",
                "outpost_per_origin_hit_bytes_total{origin=\"*.example.com\"} 30",
                "outpost_per_origin_miss_bytes_total{origin=\"windows-update\"} 100",
                "outpost_per_origin_egress_bytes_total{origin=\"*.example.com\"} 32",
                "outpost_per_origin_origin_bytes_total{origin=\"windows-update\"} 100",
                "outpost_per_origin_stored_objects{origin=\"windows-update\"} 1",
                "outpost_per_origin_stored_bytes{origin=\"windows-update\"} 4096",
                "outpost_per_origin_stored_bytes{origin=\"*.example.com\"} 0",
            ],
        );
    }

    #[test]
    fn label_values_are_escaped_for_the_text_formats() {
        assert_eq!(escape_label_value("*.example.com"), "*.example.com");
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("a\nb"), "a\\nb");
        let stats = Stats::new("portable", &["odd\"label".to_owned()]);
        let text = stats.prometheus_text();
        assert!(
            text.contains("outpost_per_origin_requests_total{origin=\"odd\\\"label\"} 0"),
            "{text}"
        );
        assert_eq!(stats.snapshot("portable").origins[0].label, "odd\"label");
    }
}
