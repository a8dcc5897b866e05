//! [`Downloader`], the embeddable entry point, and the engine that runs one download.
//!
//! The engine is one loop that owns all scheduling state (no locks): it asks the
//! `FallbackPolicy` and the [`BanList`] which sources may be used now, offers pieces to them
//! through the `Scheduler` (fastest source first), and spawns one task per request into a
//! `JoinSet`. Fetch tasks return whole pieces (checked against the piece hashes when there are
//! some); the winner of each piece is written at its offset by a blocking-pool task, and only then
//! marked done. A ticker emits progress, writes the resume checkpoint and sets a percentage
//! bandwidth cap. When every piece is on disk the whole file is verified (`--sha256`), repaired
//! from the origin if it does not match, and renamed to its final name.
//!
//! The first request of a fresh download (the probe) asks for the first piece and learns the
//! length and validators from the answer; a resumed download knows them from its state file and
//! starts at full parallelism, and so does a download with a piece manifest.
//!
//! **Peers.** In download modes 1-3 the downloader first asks the cache node for the content's
//! piece manifest ([`Downloader::fetch_manifest`]); without one (node unreachable, content too
//! small, no length) the download runs without peers, as DO's simple mode. With one, it asks the
//! tracker for peers, adds each as a [`Source::Peer`] that is offered only the pieces it holds,
//! and refreshes the list every `peering.peer_refresh_interval` from a task beside the loop. The
//! manifest and the peers stay for the whole download, so losing the node does not stop it. Every
//! piece is checked against the manifest; a peer with [`BAD_PIECES_BEFORE_BAN`] bad pieces, or
//! [`PEER_FAILURES_BEFORE_RETIRING`] failed requests in a row, is not asked again in this
//! download. `delay_http_fallback_secs` keeps the origin closed for that long after the start.

mod dispatch;
mod failures;
mod finishing;
mod outcomes;
mod peering;
pub mod progress;
mod resume;
pub(crate) mod scheduler;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ValidConfig;
use crate::content::integrity::{PieceHashes, Sha256Digest};
use crate::content::partial::{PartialFile, PartialPaths, Validator};
use crate::download::progress::{Event, Progress, SourceProgress, Status};
use crate::download::scheduler::{AttemptId, Scheduler};
use crate::error::DownloadError;
use crate::net::bandwidth::{Bandwidth, RateProbe};
use crate::net::http::{HttpClients, RangeFailure, RangeResponse};
use crate::sources::ban::BanList;
use crate::sources::cache_host;
use crate::sources::fallback::{Backoff, FallbackPolicy};
use crate::sources::node_api::{Manifest, NodeApi, PeerEntry};
use crate::sources::source::{Source, SourceId, SourceSlot, SourceTable};

/// A cache host that sends this many pieces failing their hash is banned for the origin; a peer
/// is banned for the rest of the download.
pub const BAD_PIECES_BEFORE_BAN: u64 = 3;

/// A peer whose requests fail this many times in a row is not asked again in this download.
pub const PEER_FAILURES_BEFORE_RETIRING: u32 = 3;

/// How often progress events are sent and checkpoints considered.
const TICK: Duration = Duration::from_millis(200);

/// A downloader: configuration, HTTP clients, cache-host bans and the bandwidth cap, shared by
/// every download it runs (one at a time or concurrently).
#[derive(Debug, Clone)]
pub struct Downloader {
    config: Arc<ValidConfig>,
    http: HttpClients,
    bans: Arc<BanList>,
    bandwidth: Bandwidth,
    local_address: Option<std::net::IpAddr>,
}

/// One download to run.
#[derive(Debug, Clone)]
pub struct DownloadRequest {
    /// The origin URL (`http://` or `https://`).
    pub url: String,
    /// The final path of the file. The partial file and the resume state live beside it.
    pub output: PathBuf,
    /// The expected SHA-256 of the whole file.
    pub sha256: Option<Sha256Digest>,
    /// Trusted piece hashes, when the content has a manifest.
    pub piece_hashes: Option<Arc<dyn PieceHashes>>,
    /// The cache node's piece manifest, when the caller fetched it already
    /// ([`Downloader::fetch_manifest`]). It enables peers in download modes 1-3.
    pub manifest: Option<Arc<Manifest>>,
    /// Where to send [`Event`]s.
    pub events: Option<UnboundedSender<Event>>,
    /// Stops the download, keeping the partial file for a resume.
    pub cancel: CancellationToken,
}

impl DownloadRequest {
    /// A request for `url` into `output`, with no hash, no events and no cancellation.
    pub fn new(url: impl Into<String>, output: impl Into<PathBuf>) -> DownloadRequest {
        DownloadRequest {
            url: url.into(),
            output: output.into(),
            sha256: None,
            piece_hashes: None,
            manifest: None,
            events: None,
            cancel: CancellationToken::new(),
        }
    }
}

impl Downloader {
    /// A downloader for a validated configuration.
    pub fn new(config: ValidConfig) -> Downloader {
        let http = HttpClients::new(&config);
        let bandwidth = Bandwidth::new(config.bandwidth);
        Downloader {
            config: Arc::new(config),
            http,
            bans: Arc::new(BanList::new()),
            bandwidth,
            local_address: None,
        }
    }

    /// Sends requests to cache nodes from `address` (the daemon's peer address), so the
    /// tracker records and scopes this machine by the address peers reach it at.
    pub fn with_local_address(mut self, address: Option<std::net::IpAddr>) -> Downloader {
        self.local_address = address.filter(|address| !address.is_unspecified());
        self
    }

    /// The peering API of the cache host `url` would use first, when the download mode peers.
    pub fn node_api(&self, url: &str) -> Option<NodeApi> {
        if !self.config.download_mode.uses_peers() {
            return None;
        }
        let uri: Uri = url.parse().ok()?;
        let hosts = cache_host::resolve_cache_hosts(
            &self.config.cache_hosts,
            self.config.raw.cache_host_source_file.as_deref(),
        )
        .ok()?;
        let host = cache_host::rendezvous_order(&hosts, &cache_host::content_key(&uri))
            .into_iter()
            .next()?;
        Some(NodeApi::with_tls(
            &host,
            self.local_address,
            self.config.raw.cache.connect_timeout,
            crate::net::http::tls_client_config(&self.config.cache_roots),
        ))
    }

    /// The cache node's piece manifest of `url`, when the download mode peers and the content
    /// is at least `daemon.min_file_size_to_cache`. `None` means no peering for this download
    /// (DO's simple mode): the node is unreachable, still filling after
    /// `peering.manifest_timeout`, or has no manifest for it.
    pub async fn fetch_manifest(&self, url: &str) -> Option<Manifest> {
        let api = self.node_api(url)?;
        match api
            .manifest(url, self.config.raw.peering.manifest_timeout)
            .await
        {
            Ok(manifest) if manifest.size >= self.config.daemon.min_file_size_to_cache => {
                Some(manifest)
            }
            Ok(manifest) => {
                tracing::debug!(url, size = manifest.size, "too small to peer");
                None
            }
            Err(error) => {
                tracing::info!(url, %error, "no piece manifest: downloading without peers");
                None
            }
        }
    }

    /// The download cap in force, in bytes per second (a percentage cap once measured).
    pub fn bandwidth_cap(&self) -> Option<u64> {
        self.bandwidth.cap_bytes_per_sec()
    }

    /// The cache-host bans, kept across downloads.
    pub fn bans(&self) -> &BanList {
        &self.bans
    }

    /// The configuration.
    pub fn config(&self) -> &ValidConfig {
        &self.config
    }

    /// Runs one download to the end: the file is complete and verified under its final name, or
    /// an error says why not (the partial file is kept when a rerun can resume it).
    pub async fn download(&self, mut request: DownloadRequest) -> Result<Status, DownloadError> {
        if request.manifest.is_none() && self.config.download_mode.uses_peers() {
            request.manifest = self.fetch_manifest(&request.url).await.map(Arc::new);
        }
        if let Some(manifest) = &request.manifest {
            if request.piece_hashes.is_none() {
                request.piece_hashes = Some(Arc::clone(manifest) as Arc<dyn PieceHashes>);
            }
        }
        let mut engine = Engine::new(self, request)?;
        engine.start_peering().await;
        engine.run().await
    }
}

/// What a spawned task reports.
enum TaskOutcome {
    /// The first request of a fresh download.
    Probed {
        source: SourceId,
        started: Instant,
        result: Result<RangeResponse, RangeFailure>,
    },
    /// A piece request.
    Fetched {
        attempt: AttemptId,
        index: u64,
        source: SourceId,
        started: Instant,
        prefix: Bytes,
        result: Result<Bytes, RangeFailure>,
    },
    /// A piece write.
    Written {
        index: u64,
        result: std::io::Result<()>,
    },
    /// A checkpoint of the resume state.
    Checkpointed { result: Result<(), DownloadError> },
}

/// The peering side of a download that has a manifest.
struct PeeringState {
    manifest: Arc<Manifest>,
    /// Peer lists from the refresh task.
    updates: tokio::sync::mpsc::Receiver<Vec<PeerEntry>>,
    /// Stops the refresh task when the download ends.
    _refresher: AbortOnDrop,
    /// The origin stays closed until then (`delay_http_fallback_secs`).
    origin_opens_at: Instant,
    /// Peers ever offered by the tracker.
    peers_known: usize,
}

/// Aborts a task when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running piece request.
struct RunningAttempt {
    abort: AbortHandle,
    source: SourceId,
}

/// The file once its length is known.
struct Layout {
    scheduler: Scheduler,
    file: PartialFile,
    validator: Validator,
}

/// The state of one download.
struct Engine<'a> {
    downloader: &'a Downloader,
    request: DownloadRequest,
    origin_key: String,
    paths: PartialPaths,
    piece_len: u64,
    sources: SourceTable,
    received: Arc<Vec<AtomicU64>>,
    policy: FallbackPolicy,
    backoff: Backoff,
    layout: Option<Layout>,
    resumed_bytes: u64,
    tasks: JoinSet<TaskOutcome>,
    attempts: HashMap<AttemptId, RunningAttempt>,
    probe_running: bool,
    pending_writes: usize,
    failures_without_progress: u32,
    fallback_announced: bool,
    repairing: bool,
    checkpoint_due: bool,
    checkpoint_running: bool,
    last_checkpoint: Instant,
    rate_probe: Option<RateProbe>,
    started: Instant,
    peering: Option<PeeringState>,
}

impl<'a> Engine<'a> {
    fn new(
        downloader: &'a Downloader,
        request: DownloadRequest,
    ) -> Result<Engine<'a>, DownloadError> {
        let config = &downloader.config;
        let url: Uri = request.url.parse().map_err(|error| {
            DownloadError::InvalidRequest(format!("\"{}\" is not a URL: {error}", request.url))
        })?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(DownloadError::InvalidRequest(format!(
                "\"{}\" must be an absolute http:// or https:// URL",
                request.url
            )));
        }
        let cache_hosts = if config.download_mode.uses_cache_hosts() {
            cache_host::resolve_cache_hosts(
                &config.cache_hosts,
                config.raw.cache_host_source_file.as_deref(),
            )
            .map_err(|error| DownloadError::InvalidRequest(error.to_string()))?
        } else {
            Vec::new()
        };
        let ordered = cache_host::rendezvous_order(&cache_hosts, &cache_host::content_key(&url));
        let mut slots = Vec::with_capacity(ordered.len() + 1);
        for host in ordered {
            let mcc: Uri = host.mcc_url(&url).parse().map_err(|error| {
                DownloadError::InvalidRequest(format!(
                    "cannot rewrite {} for cache host {host}: {error}",
                    request.url
                ))
            })?;
            slots.push(SourceSlot::new(
                Source::CacheHost { host, url: mcc },
                config.raw.cache.connections_per_host,
            ));
        }
        slots.push(SourceSlot::new(
            Source::Origin { url: url.clone() },
            config.raw.origin.connections,
        ));
        // Peers join during the download; their counters exist from the start.
        let peer_capacity = if request.manifest.is_some() {
            config.raw.peering.max_peers
        } else {
            0
        };
        let received = Arc::new(
            (0..slots.len() + peer_capacity)
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
        let policy = FallbackPolicy::new(config.fallback_delay, slots.len() > 1);
        let piece_len = request
            .piece_hashes
            .as_ref()
            .map(|hashes| hashes.piece_len())
            .filter(|&len| len > 0)
            .unwrap_or(config.piece_len);
        let now = Instant::now();
        Ok(Engine {
            downloader,
            paths: PartialPaths::beside(&request.output),
            origin_key: cache_host::origin_authority(&url),
            request,
            piece_len,
            sources: SourceTable { slots },
            received,
            policy,
            backoff: Backoff {
                initial: config.raw.transfer.retry_initial_backoff,
                max: config.raw.transfer.retry_max_backoff,
            },
            layout: None,
            resumed_bytes: 0,
            tasks: JoinSet::new(),
            attempts: HashMap::new(),
            probe_running: false,
            pending_writes: 0,
            failures_without_progress: 0,
            fallback_announced: false,
            repairing: false,
            checkpoint_due: false,
            checkpoint_running: false,
            last_checkpoint: now,
            rate_probe: None,
            started: now,
            peering: None,
        })
    }

    fn emit(&self, event: Event) {
        if let Some(events) = &self.request.events {
            let _ = events.send(event);
        }
    }

    fn received_total(&self) -> u64 {
        self.received
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .sum()
    }

    async fn run(mut self) -> Result<Status, DownloadError> {
        if let Some(parent) = self
            .paths
            .output
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            if !parent.is_dir() {
                return Err(DownloadError::InvalidRequest(format!(
                    "the directory {} does not exist",
                    parent.display()
                )));
            }
        }
        self.try_resume().await?;
        self.layout_from_manifest()?;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cancel = self.request.cancel.clone();
        loop {
            if self.pending_writes == 0
                && !self.checkpoint_running
                && self
                    .layout
                    .as_ref()
                    .is_some_and(|layout| layout.scheduler.is_complete())
            {
                // Every piece is on disk, so any attempt still running lost its race.
                self.abort_all();
                if self.finish_or_repair().await? {
                    return self.complete().await;
                }
            }
            let wake = self.dispatch(Instant::now())?;
            if self.tasks.is_empty() && wake.is_none() {
                return Err(self.no_source_left());
            }
            tokio::select! {
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match joined {
                        Some(Ok(outcome)) => self.handle(outcome).await?,
                        Some(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                        _ => {}
                    }
                }
                () = sleep_until_or_forever(wake) => {}
                Some(peers) = next_peer_list(&mut self.peering) => self.add_peers(peers),
                _ = ticker.tick() => self.tick().await?,
                () = cancel.cancelled() => {
                    self.abort_all();
                    while self.pending_writes > 0 || self.checkpoint_running {
                        match self.tasks.join_next().await {
                            Some(Ok(TaskOutcome::Written { index, result })) => self.written(index, result)?,
                            Some(Ok(TaskOutcome::Checkpointed { result })) => {
                                self.checkpoint_running = false;
                                result?;
                            }
                            Some(_) => {}
                            None => break,
                        }
                    }
                    self.checkpoint().await?;
                    return Err(DownloadError::Cancelled);
                }
            }
        }
    }

    fn abort_all(&mut self) {
        for (_, running) in self.attempts.drain() {
            running.abort.abort();
            self.sources.get_mut(running.source).in_flight -= 1;
        }
    }

    async fn tick(&mut self) -> Result<(), DownloadError> {
        let now = Instant::now();
        if let Some(probe) = &self.rate_probe {
            if let Some(rate) = probe.finish(now, self.received_total()) {
                self.downloader.bandwidth.set_measured_rate(rate);
                self.rate_probe = None;
            }
        }
        self.emit(Event::Progress(self.progress()));
        if self.checkpoint_due
            && !self.checkpoint_running
            && now.duration_since(self.last_checkpoint)
                >= self.downloader.config.raw.storage.checkpoint_interval
        {
            // The flush can take as long as the disk needs to write a second of downloading;
            // it runs beside the engine, which keeps fetching meanwhile.
            if let Some(job) = self.checkpoint_job() {
                self.checkpoint_running = true;
                self.tasks
                    .spawn(async move { TaskOutcome::Checkpointed { result: job.await } });
            }
        }
        Ok(())
    }

    fn progress(&self) -> Progress {
        Progress {
            file_len: self
                .layout
                .as_ref()
                .map(|layout| layout.scheduler.file_len()),
            done_bytes: self
                .layout
                .as_ref()
                .map_or(0, |layout| layout.scheduler.done_bytes()),
            received_bytes: self.received_total(),
            sources: self
                .sources
                .slots
                .iter()
                .enumerate()
                .map(|(id, slot)| SourceProgress {
                    label: slot.source.label(),
                    kind: slot.source.kind(),
                    bytes: self.received[id].load(Ordering::Relaxed),
                    connections: slot.in_flight,
                })
                .collect(),
        }
    }
}

/// A random number (no dependency needed: the standard library's hasher keys are random).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0);
    hasher.finish()
}

/// The next peer list from the refresh task, or never without peering.
async fn next_peer_list(peering: &mut Option<PeeringState>) -> Option<Vec<PeerEntry>> {
    match peering {
        Some(peering) => peering.updates.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_forever(wake: Option<Instant>) {
    match wake {
        Some(instant) => tokio::time::sleep_until(instant).await,
        None => std::future::pending().await,
    }
}
