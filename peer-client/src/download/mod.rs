//! [`Downloader`], the embeddable entry point, and the engine that runs one download.
//!
//! The engine is one loop that owns all scheduling state (no locks): it asks the
//! [`FallbackPolicy`] and the [`BanList`] which sources may be used now, offers pieces to them
//! through the [`Scheduler`] (fastest source first), and spawns one task per request into a
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

pub mod progress;
pub mod scheduler;

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
use crate::content::integrity::{self, PieceHashes, Sha256Digest};
use crate::content::partial::{
    encode_bitmap, PartialFile, PartialPaths, ResumeState, Validator, STATE_VERSION,
};
use crate::download::progress::{Event, Progress, SourceProgress, Status};
use crate::download::scheduler::{AttemptId, Claim, Completion, Scheduler};
use crate::error::{DownloadError, ErrorSource, FailureClass, FetchError};
use crate::net::bandwidth::{Bandwidth, RateProbe};
use crate::net::http::{HttpClients, RangeFailure, RangeRequest, RangeResponse};
use crate::sources::ban::{BanList, BanReason};
use crate::sources::cache_host::{self, CacheHost};
use crate::sources::fallback::{Backoff, FallbackPolicy, OriginGate};
use crate::sources::node_api::{
    ContentId, Manifest, ManifestExt, NodeApi, PeerEntry, PeerHoldings,
};
use crate::sources::source::{Source, SourceId, SourceKind, SourceSlot, SourceTable};

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
        Some(NodeApi::new(
            &host,
            self.local_address,
            self.config.raw.cache.connect_timeout,
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

/// What a request task takes along.
struct RequestContext {
    url: Uri,
    kind: SourceKind,
    http: HttpClients,
    meter: crate::net::bandwidth::BandwidthMeter,
    received: Arc<Vec<AtomicU64>>,
}

impl RequestContext {
    /// Sends the range request.
    async fn fetch(
        mut self,
        source: SourceId,
        range: std::ops::Range<u64>,
        file_len: Option<u64>,
        validator: Option<&Validator>,
    ) -> Result<RangeResponse, RangeFailure> {
        let request = RangeRequest {
            url: &self.url,
            kind: self.kind,
            range,
            file_len,
            validator,
        };
        self.http
            .fetch_range(request, &mut self.meter, &self.received[source])
            .await
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

    /// With a manifest: asks the tracker for peers once (so they are known before the first
    /// piece) and starts the task that refreshes the list. Losing the node later changes nothing:
    /// the peers stay.
    async fn start_peering(&mut self) {
        let Some(manifest) = self.request.manifest.clone() else {
            return;
        };
        let Some(api) = self.downloader.node_api(&self.request.url) else {
            return;
        };
        let config = Arc::clone(&self.downloader.config);
        let ask = move |api: NodeApi, content_id: ContentId| {
            let config = Arc::clone(&config);
            async move {
                api.peers(
                    content_id,
                    config.download_mode,
                    &config.raw.group_id,
                    config.raw.peering.max_peers,
                )
                .await
            }
        };
        let first = ask(api.clone(), manifest.content_id).await;
        let (sender, updates) = tokio::sync::mpsc::channel(4);
        let interval = self.downloader.config.raw.peering.peer_refresh_interval;
        let content_id = manifest.content_id;
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match ask(api.clone(), content_id).await {
                    Ok(peers) => {
                        if sender.send(peers).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::debug!(%error, "peer list refresh failed"),
                }
            }
        });
        let delay = Duration::from_secs(self.downloader.config.raw.delay_http_fallback_secs);
        self.peering = Some(PeeringState {
            manifest,
            updates,
            _refresher: AbortOnDrop(refresher.abort_handle()),
            origin_opens_at: self.started + delay,
            peers_known: 0,
        });
        match first {
            Ok(peers) => self.add_peers(peers),
            Err(error) => tracing::info!(%error, "no peer list yet"),
        }
        let peers = self.sources.peers().len();
        self.emit(Event::PeersFound { peers });
    }

    /// Adds the peers the tracker offered (up to `peering.max_peers`) and updates what the
    /// known ones hold.
    fn add_peers(&mut self, entries: Vec<PeerEntry>) {
        let Some(peering) = &mut self.peering else {
            return;
        };
        let piece_count = peering.manifest.piece_count();
        let max_peers = self.downloader.config.raw.peering.max_peers;
        for entry in entries {
            let holdings = entry.holdings(piece_count);
            let known = self.sources.slots.iter_mut().find(|slot| {
                matches!(&slot.source, Source::Peer { address, .. } if *address == entry.address)
            });
            if let Some(slot) = known {
                slot.holdings = Some(holdings);
                continue;
            }
            if self.sources.peers().len() >= max_peers {
                continue;
            }
            let Ok(url) = format!(
                "http://{}/content/{}",
                entry.address, peering.manifest.content_id
            )
            .parse::<Uri>() else {
                continue;
            };
            let mut slot = SourceSlot::new(
                Source::Peer {
                    address: entry.address,
                    url,
                },
                self.downloader.config.raw.peering.connections_per_peer,
            );
            slot.holdings = Some(holdings);
            peering.peers_known += 1;
            tracing::debug!(peer = %entry.address, complete = entry.complete, "peer added");
            self.sources.slots.push(slot);
        }
    }

    /// A download with a manifest knows its length and version before any request.
    fn layout_from_manifest(&mut self) -> Result<(), DownloadError> {
        let Some(manifest) = self.request.manifest.clone() else {
            return Ok(());
        };
        if self.layout.is_some() {
            return Ok(());
        }
        let file = PartialFile::create(&self.paths.partial, manifest.size).map_err(|error| {
            DownloadError::disk(format!("creating {}", self.paths.partial.display()), error)
        })?;
        self.piece_len = manifest.piece_size;
        self.emit(Event::Started {
            file_len: manifest.size,
            resumed_bytes: 0,
        });
        let mut scheduler = Scheduler::new(manifest.size, manifest.piece_size, &[]);
        scheduler.start_at(random_u64());
        self.layout = Some(Layout {
            scheduler,
            file,
            validator: manifest.validator(),
        });
        self.start_rate_probe();
        Ok(())
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

    /// Loads the resume state when it belongs to this download. With piece hashes, the pieces
    /// it records are checked again first: one altered on disk since is fetched again.
    async fn try_resume(&mut self) -> Result<(), DownloadError> {
        let Some((state, done)) = self.paths.load_resumable(&self.request.url) else {
            self.paths.remove_all();
            return Ok(());
        };
        let manifest_len = self
            .request
            .piece_hashes
            .as_ref()
            .map(|hashes| hashes.piece_len());
        if manifest_len.is_some_and(|len| len != state.piece_len) {
            self.paths.remove_all();
            return Ok(());
        }
        let file = PartialFile::open_existing(&self.paths.partial).map_err(|error| {
            DownloadError::disk(format!("opening {}", self.paths.partial.display()), error)
        })?;
        let done = match self.request.piece_hashes.clone() {
            Some(hashes) => {
                let path = self.paths.partial.clone();
                let (file_len, piece_len) = (state.file_len, state.piece_len);
                let recorded = done.iter().filter(|done| **done).count();
                let checked = tokio::task::spawn_blocking(move || {
                    integrity::recheck_pieces(&path, file_len, piece_len, &done, hashes.as_ref())
                })
                .await
                .map_err(|error| {
                    DownloadError::disk("checking resumed pieces", std::io::Error::other(error))
                })?
                .map_err(|error| {
                    DownloadError::disk(format!("checking {}", self.paths.partial.display()), error)
                })?;
                let dropped = recorded - checked.iter().filter(|done| **done).count();
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        partial = %self.paths.partial.display(),
                        "resumed pieces fail their hash: fetching them again"
                    );
                }
                checked
            }
            None => done,
        };
        self.piece_len = state.piece_len;
        let scheduler = Scheduler::new(state.file_len, state.piece_len, &done);
        self.resumed_bytes = scheduler.done_bytes();
        tracing::info!(
            url = %self.request.url,
            resumed_bytes = self.resumed_bytes,
            file_len = state.file_len,
            "resuming"
        );
        self.emit(Event::Started {
            file_len: state.file_len,
            resumed_bytes: self.resumed_bytes,
        });
        self.layout = Some(Layout {
            scheduler,
            file,
            validator: state.validator,
        });
        self.start_rate_probe();
        Ok(())
    }

    fn start_rate_probe(&mut self) {
        if self.downloader.bandwidth.wants_measurement() {
            self.rate_probe = Some(RateProbe::new(Instant::now(), self.received_total()));
        }
    }

    /// The sources that may take requests now, in the order to offer them work, and the next
    /// instant at which that may change (a backoff ending, the origin gate opening).
    fn eligible_sources(&mut self, now: Instant) -> (Vec<SourceId>, Option<Instant>) {
        let mut wake: Option<Instant> = None;
        let mut earliest = |instant: Instant| {
            wake = Some(wake.map_or(instant, |current: Instant| current.min(instant)));
        };
        let mut eligible = Vec::new();
        let cache_ids = self.sources.cache_hosts();
        let origin = self
            .sources
            .origin()
            .expect("the origin is always a source");

        if !self.repairing {
            for id in self.sources.peers() {
                let slot = self.sources.get(id);
                if slot.retired {
                    continue;
                }
                match slot.retry_at {
                    Some(retry_at) if retry_at > now => earliest(retry_at),
                    _ => eligible.push(id),
                }
            }
            let bans: Vec<Option<BanReason>> = cache_ids
                .iter()
                .map(|&id| {
                    let host = self
                        .sources
                        .get(id)
                        .source
                        .cache_host()
                        .expect("a cache source");
                    self.downloader
                        .bans
                        .ban_on(host, &self.origin_key, now)
                        .map(|ban| ban.reason)
                })
                .collect();
            let mut usable: Vec<SourceId> = cache_ids
                .iter()
                .zip(&bans)
                .filter(|(_, ban)| ban.is_none())
                .map(|(&id, _)| id)
                .collect();
            if usable.is_empty() && !cache_ids.is_empty() {
                self.policy.record_cache_failure(now);
                if self.policy.origin_forbidden() {
                    // Nothing else may be used: retry banned hosts at the backoff pace rather
                    // than wait out a fifteen-minute ban.
                    usable = cache_ids.clone();
                }
            }
            // One cache host at a time: the first usable one in rendezvous order that is not
            // backing off. The next one takes over while it backs off.
            match usable
                .iter()
                .find(|&&id| self.sources.get(id).backoff_over(now))
            {
                Some(&id) => eligible.push(id),
                None => {
                    for &id in &usable {
                        if let Some(retry_at) = self.sources.get(id).retry_at {
                            earliest(retry_at);
                        }
                    }
                }
            }
            let every_host_refused = !bans.is_empty()
                && bans
                    .iter()
                    .all(|ban| *ban == Some(BanReason::RefusedOrigin));
            match self.policy.gate(now, every_host_refused) {
                OriginGate::Open => {}
                OriginGate::OpensAt(instant) => {
                    earliest(instant);
                    return (eligible, wake);
                }
                OriginGate::Closed => return (eligible, wake),
            }
            // Peers and the cache get their head start (`delay_http_fallback_secs`).
            if let Some(peering) = &self.peering {
                if now < peering.origin_opens_at {
                    earliest(peering.origin_opens_at);
                    return (eligible, wake);
                }
            }
        }
        if !cache_ids.is_empty() && !self.fallback_announced {
            self.fallback_announced = true;
            tracing::info!(origin = %self.origin_key, "falling back to the origin");
            self.emit(Event::FallbackToOrigin);
        }
        match self.sources.get(origin).retry_at {
            Some(retry_at) if retry_at > now => earliest(retry_at),
            _ => eligible.push(origin),
        }
        (eligible, wake)
    }

    /// Starts every request the sources may take now; returns when to look again.
    fn dispatch(&mut self, now: Instant) -> Result<Option<Instant>, DownloadError> {
        let (mut eligible, wake) = self.eligible_sources(now);
        if self.layout.is_none() {
            if !self.probe_running {
                if let Some(&source) = eligible.first() {
                    self.spawn_probe(source, now);
                }
            }
            return Ok(wake);
        }
        // Feedback: the fastest source is offered work first; an unmeasured one counts as fast
        // so that it gets measured.
        eligible.sort_by(|&left, &right| {
            let rate = |id: SourceId| {
                self.sources
                    .get(id)
                    .stats
                    .rate_per_connection
                    .unwrap_or(f64::INFINITY)
            };
            rate(right).total_cmp(&rate(left))
        });
        for source in eligible {
            while self.sources.get(source).free_connections() > 0 {
                let layout = self.layout.as_mut().expect("checked above");
                let Some(claim) = layout.scheduler.next_for(source, &self.sources, now) else {
                    break;
                };
                self.spawn_fetch(source, claim, now);
            }
        }
        Ok(wake)
    }

    /// Counts a request to `source` and gathers what its task needs.
    fn start_request(&mut self, source: SourceId) -> RequestContext {
        let slot = self.sources.get_mut(source);
        slot.in_flight += 1;
        slot.stats.requests += 1;
        RequestContext {
            url: slot.source.url().clone(),
            kind: slot.source.kind(),
            http: self.downloader.http.clone(),
            meter: self.downloader.bandwidth.meter(),
            received: Arc::clone(&self.received),
        }
    }

    fn spawn_probe(&mut self, source: SourceId, now: Instant) {
        let context = self.start_request(source);
        let piece_len = self.piece_len;
        self.probe_running = true;
        self.tasks.spawn(async move {
            let result = context.fetch(source, 0..piece_len, None, None).await;
            TaskOutcome::Probed {
                source,
                started: now,
                result,
            }
        });
    }

    fn spawn_fetch(&mut self, source: SourceId, claim: Claim, now: Instant) {
        let context = self.start_request(source);
        let layout = self.layout.as_ref().expect("fetches need the layout");
        let file_len = layout.scheduler.file_len();
        let validator = layout.validator.clone();
        let piece_hashes = self.request.piece_hashes.clone();
        let Claim {
            attempt,
            index,
            range,
            prefix,
            duplicate,
        } = claim;
        tracing::trace!(index, duplicate, url = %context.url, "fetching piece");
        let received = Arc::clone(&context.received);
        let abort = self.tasks.spawn(async move {
            let result = context
                .fetch(source, range, Some(file_len), Some(&validator))
                .await
                .and_then(|response| {
                    let fetched = response.data.len() as u64;
                    let piece = Scheduler::assemble(prefix.clone(), response.data);
                    match &piece_hashes {
                        Some(hashes)
                            if !integrity::piece_matches(hashes.as_ref(), index, &piece) =>
                        {
                            // Bytes that failed their check were not downloaded in any useful
                            // sense: the source's count (BytesFromPeers...) keeps verified bytes.
                            received[source].fetch_sub(fetched, Ordering::Relaxed);
                            Err(RangeFailure::from(FetchError::PieceHash(index)))
                        }
                        _ => Ok(piece),
                    }
                });
            TaskOutcome::Fetched {
                attempt,
                index,
                source,
                started: now,
                prefix,
                result,
            }
        });
        self.attempts
            .insert(attempt, RunningAttempt { abort, source });
    }

    async fn handle(&mut self, outcome: TaskOutcome) -> Result<(), DownloadError> {
        match outcome {
            TaskOutcome::Probed {
                source,
                started,
                result,
            } => {
                self.probe_running = false;
                self.sources.get_mut(source).in_flight -= 1;
                match result {
                    Ok(response) => self.probed(source, started, response),
                    Err(failure) => self.source_failed(source, failure.error),
                }
            }
            TaskOutcome::Fetched {
                attempt,
                index,
                source,
                started,
                prefix,
                result,
            } => {
                if self.attempts.remove(&attempt).is_none() {
                    // Cancelled as an endgame loser, but it finished first; already accounted.
                    return Ok(());
                }
                self.sources.get_mut(source).in_flight -= 1;
                let kind = self.sources.get(source).source.kind();
                match result {
                    Ok(piece) => {
                        let fetched = piece.len() - prefix.len();
                        self.source_succeeded(source, fetched as u64, started);
                        self.piece_fetched(index, attempt, kind, piece);
                        Ok(())
                    }
                    Err(failure) => {
                        let layout = self.layout.as_mut().expect("fetches need the layout");
                        if matches!(failure.error, FetchError::PieceHash(_)) {
                            layout.scheduler.release(index, attempt, kind, Bytes::new());
                            layout.scheduler.reject_copy(index, source);
                            self.bad_piece(source, index);
                            return Ok(());
                        }
                        let received = Scheduler::assemble(prefix, failure.received);
                        layout.scheduler.release(index, attempt, kind, received);
                        self.source_failed(source, failure.error)
                    }
                }
            }
            TaskOutcome::Written { index, result } => self.written(index, result),
            TaskOutcome::Checkpointed { result } => {
                self.checkpoint_running = false;
                result
            }
        }
    }

    /// The probe answered: set up the partial file and keep the first piece.
    fn probed(
        &mut self,
        source: SourceId,
        started: Instant,
        response: RangeResponse,
    ) -> Result<(), DownloadError> {
        let file_len = response.file_len;
        let file = PartialFile::create(&self.paths.partial, file_len).map_err(|error| {
            DownloadError::disk(format!("creating {}", self.paths.partial.display()), error)
        })?;
        let mut scheduler = Scheduler::new(file_len, self.piece_len, &[]);
        self.emit(Event::Started {
            file_len,
            resumed_bytes: 0,
        });
        let kind = self.sources.get(source).source.kind();
        self.source_succeeded(source, response.data.len() as u64, started);
        if file_len > 0 {
            let claim = scheduler.claim_piece(0, source, Instant::now());
            self.layout = Some(Layout {
                scheduler,
                file,
                validator: response.validator,
            });
            let piece = response.data;
            if let Some(hashes) = &self.request.piece_hashes {
                if !integrity::piece_matches(hashes.as_ref(), 0, &piece) {
                    self.received[source].fetch_sub(piece.len() as u64, Ordering::Relaxed);
                    let layout = self.layout.as_mut().expect("just set");
                    layout
                        .scheduler
                        .release(0, claim.attempt, kind, Bytes::new());
                    layout.scheduler.reject_copy(0, source);
                    self.bad_piece(source, 0);
                    self.start_rate_probe();
                    return Ok(());
                }
            }
            self.piece_fetched(0, claim.attempt, kind, piece);
        } else {
            self.layout = Some(Layout {
                scheduler,
                file,
                validator: response.validator,
            });
        }
        self.start_rate_probe();
        Ok(())
    }

    fn source_succeeded(&mut self, source: SourceId, bytes: u64, started: Instant) {
        let slot = self.sources.get_mut(source);
        slot.stats
            .record_rate(bytes, started.elapsed().as_secs_f64());
        slot.consecutive_failures = 0;
        slot.retry_at = None;
        self.failures_without_progress = 0;
    }

    /// A piece arrived whole: the first copy is written, others are cancelled or discarded.
    fn piece_fetched(&mut self, index: u64, attempt: AttemptId, kind: SourceKind, piece: Bytes) {
        let layout = self.layout.as_mut().expect("pieces need the layout");
        match layout.scheduler.complete(index, attempt, kind) {
            Completion::Lost => {}
            Completion::Won { cancel } => {
                for loser in cancel {
                    if let Some(running) = self.attempts.remove(&loser) {
                        running.abort.abort();
                        self.sources.get_mut(running.source).in_flight -= 1;
                    }
                }
                let offset = layout.scheduler.piece_range(index).start;
                let file = layout.file.clone();
                self.pending_writes += 1;
                self.tasks.spawn(async move {
                    let result = file.write_at(offset, piece).await;
                    TaskOutcome::Written { index, result }
                });
            }
        }
    }

    fn written(&mut self, index: u64, result: std::io::Result<()>) -> Result<(), DownloadError> {
        self.pending_writes -= 1;
        let layout = self.layout.as_mut().expect("writes need the layout");
        match result {
            Ok(()) => {
                layout.scheduler.written(index);
                self.checkpoint_due = true;
                self.emit(Event::PieceWritten { index });
                Ok(())
            }
            Err(error) => {
                layout.scheduler.write_failed(index);
                Err(DownloadError::disk(
                    format!("writing piece {index} to {}", self.paths.partial.display()),
                    error,
                ))
            }
        }
    }

    /// Applies DO's fallback rules to a failed request.
    fn source_failed(&mut self, source: SourceId, error: FetchError) -> Result<(), DownloadError> {
        let now = Instant::now();
        if self.sources.get(source).source.kind() == SourceKind::Peer {
            self.peer_failed(source, &error, now);
            return Ok(());
        }
        let config = &self.downloader.config.raw;
        let class = error.class();
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        // Failures of requests that were already running when the source started backing off
        // belong to the same incident: they neither lengthen the backoff nor count again.
        let new_incident = slot.backoff_over(now);
        if new_incident {
            slot.consecutive_failures += 1;
            slot.retry_at = Some(now + self.backoff.delay(slot.consecutive_failures));
            self.failures_without_progress += 1;
        }
        let label = slot.source.label();
        let mut banned_for = None;
        match slot.source.clone() {
            Source::CacheHost { host, .. } => {
                self.policy.record_cache_failure(now);
                let ban = config.cache.ban_duration;
                match class {
                    FailureClass::Unreachable => {
                        self.downloader.bans.ban_unreachable(&host, now, ban);
                        banned_for = Some(ban);
                    }
                    // A cache that refuses this origin, or holds another version of the content,
                    // is no use for this origin for now.
                    FailureClass::Refused | FailureClass::VersionMismatch => {
                        self.downloader
                            .bans
                            .ban_for_origin(&host, &self.origin_key, now, ban);
                        banned_for = Some(ban);
                    }
                    FailureClass::Transient => {}
                }
            }
            Source::Peer { .. } => unreachable!("peer failures are handled by peer_failed"),
            Source::Origin { .. } => match (class, &error) {
                (FailureClass::Refused, FetchError::Status(status)) => {
                    return Err(DownloadError::OriginRefused {
                        url: self.request.url.clone(),
                        status: *status,
                    });
                }
                (FailureClass::VersionMismatch, FetchError::ContentChanged(detail)) => {
                    self.abort_all();
                    self.paths.remove_all();
                    return Err(DownloadError::ContentChanged {
                        url: self.request.url.clone(),
                        detail: detail.clone(),
                    });
                }
                _ => {}
            },
        }
        tracing::warn!(source = %label, %error, ?banned_for, "request failed");
        self.emit(Event::SourceFailed {
            label: label.clone(),
            error: error.to_string(),
            banned_for,
        });
        if self.failures_without_progress >= config.transfer.max_consecutive_failures {
            return Err(DownloadError::GaveUp {
                failures: self.failures_without_progress,
                source_label: label,
                origin_of_failure: match self.sources.get(source).source.kind() {
                    SourceKind::CacheHost => ErrorSource::CacheHost,
                    SourceKind::Origin => ErrorSource::Origin,
                    SourceKind::Peer => ErrorSource::Peer,
                },
                last: error,
            });
        }
        Ok(())
    }

    /// A peer request failed: the peer backs off, and after [`PEER_FAILURES_BEFORE_RETIRING`]
    /// failures in a row it is not asked again. Peers come and go, so their failures never count
    /// towards giving up the download, nor open the origin.
    fn peer_failed(&mut self, source: SourceId, error: &FetchError, now: Instant) {
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        if slot.backoff_over(now) {
            slot.consecutive_failures += 1;
            slot.retry_at = Some(now + self.backoff.delay(slot.consecutive_failures));
        }
        if slot.consecutive_failures >= PEER_FAILURES_BEFORE_RETIRING {
            slot.retired = true;
        }
        let label = slot.source.label();
        tracing::info!(source = %label, %error, retired = slot.retired, "peer request failed");
        self.emit(Event::SourceFailed {
            label,
            error: error.to_string(),
            banned_for: None,
        });
    }

    /// A piece failed its hash check. The piece goes to another source; the sender is not
    /// backed off (its transport works), but it counts as a cache failure for the fallback
    /// rules, and a cache host that sends [`BAD_PIECES_BEFORE_BAN`] bad pieces is banned for
    /// this origin, as DO bans a peer that sends several.
    fn bad_piece(&mut self, source: SourceId, index: u64) {
        let now = Instant::now();
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        slot.stats.bad_pieces += 1;
        let label = slot.source.label();
        let mut banned_for = None;
        if slot.source.kind() == SourceKind::Peer
            && slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN
            && !slot.retired
        {
            slot.retired = true;
            tracing::warn!(source = %label, "peer banned for the rest of the download");
            if let Some(events) = &self.request.events {
                let _ = events.send(Event::PeerBanned {
                    label: label.clone(),
                });
            }
        }
        if let Some(host) = slot.source.cache_host().cloned() {
            self.policy.record_cache_failure(now);
            if slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN {
                let ban = self.downloader.config.raw.cache.ban_duration;
                self.downloader
                    .bans
                    .ban_for_origin(&host, &self.origin_key, now, ban);
                banned_for = Some(ban);
            }
        }
        let error = FetchError::PieceHash(index);
        tracing::warn!(source = %label, %error, ?banned_for, "bad piece discarded");
        self.emit(Event::SourceFailed {
            label,
            error: error.to_string(),
            banned_for,
        });
    }

    fn no_source_left(&self) -> DownloadError {
        if let Some(layout) = &self.layout {
            let all: Vec<SourceId> = (0..self.sources.slots.len()).collect();
            if let Some(index) = layout.scheduler.piece_refused_by_all(&all) {
                return DownloadError::GaveUp {
                    failures: self.failures_without_progress,
                    source_label: "every source".into(),
                    last: FetchError::PieceHash(index),
                    origin_of_failure: ErrorSource::Origin,
                };
            }
        }
        DownloadError::GaveUp {
            failures: self.failures_without_progress,
            source_label: "every source".into(),
            last: FetchError::Connect(
                "no source may be used: the cache hosts are unavailable and delay_cache_fallback_secs = -1 forbids the origin".into(),
            ),
            origin_of_failure: ErrorSource::CacheHost,
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

    /// Writes the resume state now.
    async fn checkpoint(&mut self) -> Result<(), DownloadError> {
        match self.checkpoint_job() {
            Some(job) => job.await,
            None => Ok(()),
        }
    }

    /// The work of one checkpoint: the pieces written so far, flushed first with
    /// `storage.fsync`, then the state file replaced. The bitmap is taken before the flush, so it
    /// never names a piece the flush did not cover.
    fn checkpoint_job(
        &mut self,
    ) -> Option<impl std::future::Future<Output = Result<(), DownloadError>> + Send + 'static> {
        let layout = self.layout.as_ref()?;
        let state = ResumeState {
            version: STATE_VERSION,
            url: self.request.url.clone(),
            file_len: layout.scheduler.file_len(),
            piece_len: layout.scheduler.piece_len(),
            validator: layout.validator.clone(),
            done_pieces: encode_bitmap(&layout.scheduler.done_map()),
        };
        let fsync = self.downloader.config.raw.storage.fsync;
        let file = layout.file.clone();
        let paths = self.paths.clone();
        self.checkpoint_due = false;
        self.last_checkpoint = Instant::now();
        Some(async move {
            if fsync {
                file.sync_data().await.map_err(|error| {
                    DownloadError::disk(format!("flushing {}", paths.partial.display()), error)
                })?;
            }
            tokio::task::spawn_blocking(move || {
                paths.save_state(&state).map_err(|error| {
                    DownloadError::disk(format!("writing {}", paths.state.display()), error)
                })
            })
            .await
            .map_err(|error| {
                DownloadError::disk("writing the resume state", std::io::Error::other(error))
            })?
        })
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

    /// All pieces are on disk: verify the whole file. Returns true when it is good; on a
    /// mismatch, marks the pieces to refetch from the origin and returns false.
    async fn finish_or_repair(&mut self) -> Result<bool, DownloadError> {
        let Some(expected) = self.request.sha256 else {
            return Ok(true);
        };
        self.emit(Event::Verifying);
        let layout = self
            .layout
            .as_mut()
            .expect("complete downloads have a layout");
        layout.file.sync_data().await.map_err(|error| {
            DownloadError::disk(format!("flushing {}", self.paths.partial.display()), error)
        })?;
        let partial = self.paths.partial.clone();
        let actual = tokio::task::spawn_blocking(move || integrity::hash_file(&partial))
            .await
            .map_err(|error| {
                DownloadError::disk("hashing the partial file", std::io::Error::other(error))
            })?
            .map_err(|error| {
                DownloadError::disk(format!("hashing {}", self.paths.partial.display()), error)
            })?;
        if actual == expected {
            return Ok(true);
        }
        let mismatch = |detail: &str| DownloadError::IntegrityMismatch {
            expected: hex::encode(expected),
            actual: hex::encode(actual),
            detail: detail.to_owned(),
        };
        if self.repairing {
            self.paths.remove_all();
            return Err(mismatch(" after refetching from the origin"));
        }
        if self.policy.origin_forbidden() {
            self.paths.remove_all();
            return Err(mismatch(
                "; the origin cannot repair it because delay_cache_fallback_secs = -1",
            ));
        }
        let reset = layout.scheduler.reset_pieces_not_from_origin();
        if reset == 0 {
            self.paths.remove_all();
            return Err(mismatch(" and every byte came from the origin"));
        }
        tracing::warn!(
            pieces = reset,
            "SHA-256 mismatch: refetching from the origin what other sources sent"
        );
        self.emit(Event::Repairing { pieces: reset });
        self.repairing = true;
        self.checkpoint_due = true;
        Ok(false)
    }

    /// Renames the verified file into place and builds the status.
    async fn complete(mut self) -> Result<Status, DownloadError> {
        let progress = self.progress();
        let layout = self
            .layout
            .take()
            .expect("complete downloads have a layout");
        if self.downloader.config.raw.storage.fsync {
            layout.file.sync_data().await.map_err(|error| {
                DownloadError::disk(format!("flushing {}", self.paths.partial.display()), error)
            })?;
        }
        drop(layout);
        std::fs::rename(&self.paths.partial, &self.paths.output).map_err(|error| {
            DownloadError::disk(
                format!(
                    "renaming {} to {}",
                    self.paths.partial.display(),
                    self.paths.output.display()
                ),
                error,
            )
        })?;
        let _ = std::fs::remove_file(&self.paths.state);
        self.emit(Event::Progress(progress.clone()));
        let requests_of = |kind: SourceKind| -> u64 {
            self.sources
                .slots
                .iter()
                .filter(|slot| slot.source.kind() == kind)
                .map(|slot| slot.stats.requests)
                .sum()
        };
        let cache_host = self
            .sources
            .slots
            .iter()
            .enumerate()
            .filter(|(id, slot)| {
                slot.source.kind() == SourceKind::CacheHost
                    && self.received[*id].load(Ordering::Relaxed) > 0
            })
            .max_by_key(|(id, _)| self.received[*id].load(Ordering::Relaxed))
            .and_then(|(_, slot)| slot.source.cache_host().map(CacheHost::to_string))
            .unwrap_or_default();
        let total = progress.received_bytes;
        let from_cache = progress.bytes_from(SourceKind::CacheHost);
        let from_peers = progress.bytes_from(SourceKind::Peer);
        let duration = self.started.elapsed();
        Ok(Status {
            file_size: progress.file_len.unwrap_or(0),
            total_bytes_downloaded: total,
            bytes_from_cache_server: from_cache,
            bytes_from_peers: from_peers,
            bytes_from_http: progress.bytes_from(SourceKind::Origin),
            percent_peer_caching: progress::percent_of(from_cache + from_peers, total),
            download_duration: progress::format_duration(duration),
            status: "Complete".into(),
            cache_host,
            download_mode: self.downloader.config.download_mode.number(),
            cache_server_connection_count: requests_of(SourceKind::CacheHost),
            cdn_connection_count: requests_of(SourceKind::Origin),
            bytes_resumed: self.resumed_bytes,
            download_duration_secs: duration.as_secs_f64(),
            num_peers: self
                .peering
                .as_ref()
                .map_or(0, |peering| peering.peers_known),
            peer_connection_count: requests_of(SourceKind::Peer),
            banned_peers: self
                .sources
                .slots
                .iter()
                .filter(|slot| {
                    slot.source.kind() == SourceKind::Peer
                        && slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN
                })
                .count(),
            bytes_by_peer: progress
                .sources
                .iter()
                .filter(|source| source.kind == SourceKind::Peer && source.bytes > 0)
                .map(|source| (source.label.clone(), source.bytes))
                .collect(),
        })
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
