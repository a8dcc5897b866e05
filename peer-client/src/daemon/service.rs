//! The daemon's service: runs this machine's downloads into its content cache, hands the
//! cached pieces to the peer port, announces them to the cache node, and keeps the records the
//! local control API (`daemon::control`, which sits above this module) reports.
//!
//! **Downloads count.** `peer-client get` hands its work to a running daemon (over the control
//! API) rather than writing into the daemon's cache itself. One process then owns the cache: it
//! knows which pieces of a running download are on disk the moment they are written (so they
//! are served and announced at once), it alone deletes content (no reader ever sees a file
//! vanish mid-way through a foreign process's write), and the cache directory stays private to
//! the daemon's user (the CLI never needs write access to it). The CLI then copies the file out
//! through the same local API. Without a daemon, `get` downloads on its own, peers included,
//! but serves nothing.
//!
//! **What the daemon fetches and hands back.** Unless `daemon.allow_private_urls` is set, it
//! refuses URLs on non-public addresses (`net::url_policy`). Content already in the cache is
//! checked against its manifest's piece hashes before it is handed over: a copy altered on disk
//! is dropped and downloaded again, and a `--sha256` it does not match is an error.
//!
//! Layout: [`Daemon`] (the shared state and [`Daemon::download`]) and the announcer task
//! ([`AnnounceSchedule`] is its timing). The peer port is [`crate::daemon::peer_server`] (it
//! sees only [`DaemonShared::peer_port`]), the cache [`crate::content::store`], the limits
//! [`crate::daemon::uploads`]. `Daemon::run`, which starts the peer port, the control API and
//! the background tasks together, is in the `daemon` module above this one.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_shared::sync::lock;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::ValidConfig;
use crate::content::integrity::{self, Sha256Digest};
use crate::content::store::{Begin, ContentStore};
use crate::daemon::file_refs::FileRefs;
use crate::daemon::peer_server::{PeerPort, UploadCounters};
use crate::daemon::uploads::UploadLimits;
use crate::download::progress::{Event, Status};
use crate::download::{DownloadRequest, Downloader};
use crate::error::DownloadError;
use crate::net::http::SourceKind;
use crate::sources::node_api::{Announcement, ContentId, Manifest};

/// Announcements of a changing download are sent at most this often.
const MIN_ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// After a failed announcement, the next try waits this long.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(5);

/// How often the cache limits are applied.
const EVICTION_INTERVAL: Duration = Duration::from_secs(600);

/// Counters for `perf-snap`.
#[derive(Debug, Default)]
pub struct DaemonStats {
    /// Downloads completed.
    pub files_downloaded: AtomicU64,
    /// Bytes received, per source kind.
    pub bytes_from_peers: AtomicU64,
    /// Bytes received from cache nodes.
    pub bytes_from_cache_server: AtomicU64,
    /// Bytes received from origins.
    pub bytes_from_http: AtomicU64,
    /// Requests sent to peers.
    pub peer_connections: AtomicU64,
    /// Requests sent to cache nodes.
    pub cache_server_connections: AtomicU64,
    /// Requests sent to origins.
    pub http_connections: AtomicU64,
    /// Uploads served whole.
    pub uploads: Arc<AtomicU64>,
    /// Bytes sent to peers.
    pub bytes_uploaded: Arc<AtomicU64>,
    /// Content files opened to serve a peer.
    pub files_opened: Arc<AtomicU64>,
    /// Announcements the tracker accepted.
    pub announcements: AtomicU64,
    /// Peer requests answered `503` (every slot, or this address's share, taken; monthly cap).
    pub uploads_refused: Arc<AtomicU64>,
    /// Peer connections dropped for not reading, or reading under the minimum rate.
    pub slow_peers_dropped: Arc<AtomicU64>,
    /// Download hand-overs refused because the caller is not the daemon's user or root.
    pub control_refused: AtomicU64,
    /// Downloads refused because their URL names a non-public address.
    pub urls_refused: AtomicU64,
    /// Cached copies that failed their piece hashes (altered on disk) and were dropped.
    pub corrupt_copies_dropped: AtomicU64,
}

/// One download the daemon runs or ran, as `peer-client status` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DownloadRecord {
    /// The URL.
    pub url: String,
    /// The content id, when it has a manifest.
    pub content_id: Option<String>,
    /// `Downloading`, `Complete`, `Cached` (in the cache from an earlier run) or `Error`.
    pub status: String,
    /// The length, once known.
    pub file_size: u64,
    /// Bytes on disk.
    pub bytes_done: u64,
    /// Bytes from peers.
    pub bytes_from_peers: u64,
    /// Bytes from cache nodes.
    pub bytes_from_cache_server: u64,
    /// Bytes from the origin.
    pub bytes_from_http: u64,
    /// Share of the bytes that did not come from the origin, in percent.
    pub percent_peer_caching: f64,
    /// Peers the tracker offered.
    pub num_peers: usize,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// State shared by the daemon's tasks.
#[derive(Debug)]
pub struct DaemonShared {
    /// The configuration.
    pub config: Arc<ValidConfig>,
    /// Runs downloads (its requests to the node leave from the peer address).
    pub downloader: Downloader,
    /// The content cache.
    pub store: ContentStore,
    /// Upload limits.
    pub uploads: UploadLimits,
    /// Counters.
    pub stats: DaemonStats,
    /// The peer port announced to the tracker.
    pub peer_port: u16,
    /// Files handed back through the control API, by reference.
    pub file_refs: FileRefs,
    records: Mutex<Vec<DownloadRecord>>,
    busy: Mutex<Vec<ContentId>>,
    /// Evicted content (with its URL) the announcer has still to withdraw.
    withdrawals: Mutex<Vec<(ContentId, String)>>,
    announce_now: Notify,
    next_transient: AtomicU64,
}

impl DaemonShared {
    /// What the peer port needs of the daemon: the store, the upload limits and the upload
    /// counters (shared with [`DaemonStats`]).
    pub fn peer_port(&self) -> PeerPort {
        PeerPort {
            store: self.store.clone(),
            uploads: self.uploads.clone(),
            counters: UploadCounters {
                uploads: Arc::clone(&self.stats.uploads),
                bytes_uploaded: Arc::clone(&self.stats.bytes_uploaded),
                files_opened: Arc::clone(&self.stats.files_opened),
                uploads_refused: Arc::clone(&self.stats.uploads_refused),
            },
        }
    }
}

/// A running daemon's handle.
#[derive(Debug, Clone)]
pub struct Daemon {
    shared: Arc<DaemonShared>,
}

/// What [`Daemon::download`] returns.
#[derive(Debug, Clone)]
pub struct DaemonDownload {
    /// The final status.
    pub status: Status,
    /// The content id, when the content is in the cache (it has a manifest).
    pub content_id: Option<ContentId>,
    /// The manifest, when the content has one (cached or not).
    pub manifest: Option<Arc<Manifest>>,
    /// Where the file is now.
    pub path: PathBuf,
}

/// When the announcement of one content is due: when what it holds changed (at most every
/// `MIN_ANNOUNCE_INTERVAL`), and before its TTL runs out (at half of it).
#[derive(Debug, Clone, Default)]
pub struct AnnounceSchedule {
    sent_generation: Option<u64>,
    last_sent: Option<Instant>,
    renew_at: Option<Instant>,
    retry_at: Option<Instant>,
}

impl AnnounceSchedule {
    /// True when an announcement of `generation` should be sent at `now`.
    pub fn due(&self, now: Instant, generation: u64) -> bool {
        if self.retry_at.is_some_and(|retry_at| now < retry_at) {
            return false;
        }
        let changed = self.sent_generation != Some(generation);
        let spaced = self
            .last_sent
            .is_none_or(|last| now.duration_since(last) >= MIN_ANNOUNCE_INTERVAL);
        (changed && spaced) || self.renew_at.is_none_or(|renew_at| now >= renew_at)
    }

    /// The tracker accepted `generation` with this TTL.
    pub fn sent(&mut self, now: Instant, generation: u64, ttl: Duration) {
        self.sent_generation = Some(generation);
        self.last_sent = Some(now);
        self.renew_at = Some(now + ttl / 2);
        self.retry_at = None;
    }

    /// The announcement failed.
    pub fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + ANNOUNCE_RETRY);
    }
}

impl Daemon {
    /// A daemon for `config` whose peers reach it at `peer_address` (the bound listener's
    /// address: its IP is also the source address of requests to the node).
    pub fn new(config: ValidConfig, peer_address: SocketAddr) -> std::io::Result<Daemon> {
        let cache_dir = config.raw.daemon.cache_dir.clone();
        let store = ContentStore::open(&cache_dir)?;
        let uploads = UploadLimits::new(
            &cache_dir,
            config.daemon.max_upload_bandwidth,
            config.raw.daemon.max_concurrent_uploads,
            config.raw.daemon.max_uploads_per_address,
            config.daemon.monthly_upload_cap,
        );
        let transient = cache_dir.join("transient");
        let _ = std::fs::remove_dir_all(&transient);
        std::fs::create_dir_all(&transient)?;
        let downloader =
            Downloader::new(config.clone()).with_local_address(Some(peer_address.ip()));
        Ok(Daemon {
            shared: Arc::new(DaemonShared {
                config: Arc::new(config),
                downloader,
                store,
                uploads,
                stats: DaemonStats::default(),
                peer_port: peer_address.port(),
                file_refs: FileRefs::default(),
                records: Mutex::new(Vec::new()),
                busy: Mutex::new(Vec::new()),
                withdrawals: Mutex::new(Vec::new()),
                announce_now: Notify::new(),
                next_transient: AtomicU64::new(0),
            }),
        })
    }

    /// The shared state (tests read the counters and the store).
    pub fn shared(&self) -> &Arc<DaemonShared> {
        &self.shared
    }

    /// The announcer and the cache policy, until `shutdown` resolves.
    pub async fn background(&self, shutdown: impl Future<Output = ()>) {
        let shared = &self.shared;
        let mut schedules: HashMap<ContentId, (AnnounceSchedule, String)> = HashMap::new();
        let mut last_eviction = Instant::now();
        self.enforce_cache_policy(None);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = shared.announce_now.notified() => {}
                () = tokio::time::sleep(MIN_ANNOUNCE_INTERVAL) => {}
            }
            if last_eviction.elapsed() >= EVICTION_INTERVAL {
                last_eviction = Instant::now();
                self.enforce_cache_policy(None);
            }
            self.announce_due(&mut schedules).await;
        }
    }

    /// Applies the cache limits, keeping the downloads running and `keep` (content just
    /// downloaded, which its caller is about to read).
    fn enforce_cache_policy(&self, keep: Option<ContentId>) {
        let shared = &self.shared;
        let mut busy = lock(&shared.busy).clone();
        busy.extend(keep);
        let urls: HashMap<ContentId, String> = shared
            .store
            .entries()
            .into_iter()
            .map(|(id, entry)| (id, entry.url))
            .collect();
        let removed = shared.store.enforce(
            shared.config.raw.daemon.max_cache_age,
            shared.config.daemon.max_cache_size,
            &busy,
        );
        if !removed.is_empty() {
            tracing::info!(evicted = removed.len(), "cache limits applied");
            // Withdrawn by the announcer, including content a previous run announced.
            let mut withdrawals = lock(&shared.withdrawals);
            withdrawals.extend(
                removed
                    .into_iter()
                    .filter_map(|id| urls.get(&id).map(|url| (id, url.clone()))),
            );
            shared.announce_now.notify_one();
        }
    }

    /// Sends the announcements that are due. Content that left the cache is withdrawn.
    async fn announce_due(&self, schedules: &mut HashMap<ContentId, (AnnounceSchedule, String)>) {
        let shared = &self.shared;
        let entries = shared.store.entries();
        let now = Instant::now();
        let evicted = std::mem::take(&mut *lock(&shared.withdrawals));
        let mut gone: Vec<(ContentId, String)> = schedules
            .iter()
            .filter(|(id, _)| !entries.iter().any(|(held, _)| held == *id))
            .map(|(id, (_, url))| (*id, url.clone()))
            .collect();
        for (id, url) in evicted {
            if !gone.iter().any(|(listed, _)| *listed == id) {
                gone.push((id, url));
            }
        }
        for (id, url) in gone {
            // Evicted or abandoned: withdrawn (an announcement holding nothing), so downloaders
            // are not sent here until the TTL would have run out.
            schedules.remove(&id);
            if let Some(api) = shared.downloader.node_api(&url) {
                let withdrawal = Announcement {
                    content_id: id,
                    port: shared.peer_port,
                    group_id: None,
                    pieces: Vec::new(),
                    complete: false,
                    active_uploads: 0,
                };
                if let Err(error) = api.announce(&withdrawal).await {
                    tracing::debug!(%error, content = %id, "withdrawal failed");
                }
            }
        }
        for (id, entry) in entries {
            let (schedule, _) = schedules
                .entry(id)
                .or_insert_with(|| (AnnounceSchedule::default(), entry.url.clone()));
            if entry.held.iter().all(|held| !held) || !schedule.due(now, entry.generation) {
                continue;
            }
            let Some(api) = shared.downloader.node_api(&entry.url) else {
                continue;
            };
            let announcement = Announcement {
                content_id: id,
                port: shared.peer_port,
                group_id: Some(shared.config.raw.group_id.clone()).filter(|g| !g.is_empty()),
                pieces: entry.ranges(),
                complete: entry.complete,
                active_uploads: u32::try_from(shared.uploads.active()).unwrap_or(u32::MAX),
            };
            match api.announce(&announcement).await {
                Ok(answer) => {
                    shared.stats.announcements.fetch_add(1, Ordering::Relaxed);
                    schedule.sent(now, entry.generation, Duration::from_secs(answer.ttl_secs));
                }
                Err(error) => {
                    tracing::debug!(%error, content = %id, "announcement failed");
                    schedule.failed(now);
                }
            }
        }
    }

    /// Downloads `url` into the cache (or, without a manifest, into a transient file), serving
    /// and announcing its pieces as they arrive. `events` receives the engine's events too.
    pub async fn download(
        &self,
        url: &str,
        sha256: Option<Sha256Digest>,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<DaemonDownload, DownloadError> {
        let shared = &self.shared;
        if !shared.config.raw.daemon.allow_private_urls {
            if let Err(refusal) = crate::net::url_policy::check_public(url).await {
                shared.stats.urls_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(url, %refusal, "download refused");
                return Err(DownloadError::InvalidRequest(refusal.to_string()));
            }
        }
        let manifest = shared.downloader.fetch_manifest(url).await.map(Arc::new);
        let record_index = {
            let mut records = lock(&shared.records);
            records.push(DownloadRecord {
                url: url.to_owned(),
                content_id: manifest.as_ref().map(|m| m.content_id.to_string()),
                status: "Downloading".into(),
                file_size: manifest.as_ref().map_or(0, |m| m.size),
                bytes_done: 0,
                bytes_from_peers: 0,
                bytes_from_cache_server: 0,
                bytes_from_http: 0,
                percent_peer_caching: 0.0,
                num_peers: 0,
                error: None,
            });
            records.len() - 1
        };
        let begin_entry = |manifest: &Arc<Manifest>| {
            shared
                .store
                .begin(url, Arc::clone(manifest))
                .map_err(|error| {
                    self.failed(
                        record_index,
                        DownloadError::disk("creating a cache entry", error),
                    )
                })
        };
        let mut begin = match &manifest {
            Some(manifest) => Some(begin_entry(manifest)?),
            None => None,
        };
        if let (Some(manifest), Some(Begin::Complete)) = (&manifest, begin) {
            // Nothing leaves the cache unchecked: a copy altered on disk is dropped and
            // downloaded again.
            match self.intact_cached_copy(manifest).await {
                Some(check) => {
                    if let Some(expected) = sha256.filter(|expected| *expected != check.sha256) {
                        return Err(self.failed(
                            record_index,
                            DownloadError::IntegrityMismatch {
                                expected: hex::encode(expected),
                                actual: hex::encode(check.sha256),
                                detail: " (the cached copy matches the cache node's piece hashes)"
                                    .into(),
                            },
                        ));
                    }
                    return Ok(self.cached(record_index, manifest));
                }
                None => {
                    shared
                        .stats
                        .corrupt_copies_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(url, content = %manifest.content_id, "the cached copy fails its piece hashes: downloading it again");
                    shared.store.drop_complete(manifest.content_id);
                    begin = Some(begin_entry(manifest)?);
                }
            }
        }
        // The content is cached only by the download that created its entry; a second download
        // of content already being downloaded runs beside it into a transient file.
        let cached_id = manifest
            .as_ref()
            .filter(|_| begin == Some(Begin::Fresh))
            .map(|manifest| manifest.content_id);
        let output = match (&manifest, begin) {
            (Some(manifest), Some(Begin::Complete)) => {
                return Ok(self.cached(record_index, manifest));
            }
            (Some(manifest), Some(Begin::Fresh)) => {
                let id = manifest.content_id;
                lock(&shared.busy).push(id);
                shared.store.data_path(id)
            }
            _ => {
                let number = shared.next_transient.fetch_add(1, Ordering::Relaxed);
                shared
                    .config
                    .raw
                    .daemon
                    .cache_dir
                    .join("transient")
                    .join(format!("download-{number}"))
            }
        };
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let mut request = DownloadRequest::new(url, output.clone());
        request.sha256 = sha256;
        request.manifest = manifest.clone();
        request.events = Some(sender);
        let forwarder = {
            let daemon = self.clone();
            let id = cached_id;
            tokio::spawn(async move {
                while let Some(event) = receiver.recv().await {
                    daemon.observe(record_index, id, &event);
                    if let Some(events) = &events {
                        let _ = events.send(event);
                    }
                }
            })
        };
        let result = shared.downloader.download(request).await;
        let _ = forwarder.await;
        let id = cached_id;
        if let Some(id) = id {
            lock(&shared.busy).retain(|busy| *busy != id);
            match &result {
                Ok(_) => {
                    shared.store.completed(id);
                    // The cache grew: older content goes now rather than at the next periodic
                    // pass, and is withdrawn from the tracker by the announcer.
                    self.enforce_cache_policy(Some(id));
                }
                Err(_) => shared.store.abandon(id),
            }
            shared.announce_now.notify_one();
        }
        let mut records = lock(&shared.records);
        let record = &mut records[record_index];
        match result {
            Ok(status) => {
                record.status = "Complete".into();
                record.file_size = status.file_size;
                record.bytes_done = status.file_size;
                record.bytes_from_peers = status.bytes_from_peers;
                record.bytes_from_cache_server = status.bytes_from_cache_server;
                record.bytes_from_http = status.bytes_from_http;
                record.percent_peer_caching = status.percent_peer_caching;
                record.num_peers = status.num_peers;
                let stats = &shared.stats;
                stats.files_downloaded.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes_from_peers
                    .fetch_add(status.bytes_from_peers, Ordering::Relaxed);
                stats
                    .bytes_from_cache_server
                    .fetch_add(status.bytes_from_cache_server, Ordering::Relaxed);
                stats
                    .bytes_from_http
                    .fetch_add(status.bytes_from_http, Ordering::Relaxed);
                stats
                    .peer_connections
                    .fetch_add(status.peer_connection_count, Ordering::Relaxed);
                stats
                    .cache_server_connections
                    .fetch_add(status.cache_server_connection_count, Ordering::Relaxed);
                stats
                    .http_connections
                    .fetch_add(status.cdn_connection_count, Ordering::Relaxed);
                Ok(DaemonDownload {
                    status,
                    content_id: id,
                    manifest,
                    path: output,
                })
            }
            Err(error) => {
                record.status = "Error".into();
                record.error = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Marks the download of `record_index` failed with `error`, and returns the error.
    fn failed(&self, record_index: usize, error: DownloadError) -> DownloadError {
        let mut records = lock(&self.shared.records);
        let record = &mut records[record_index];
        record.status = "Error".into();
        record.error = Some(error.to_string());
        error
    }

    /// Checks the cached copy of `manifest`'s content against its piece hashes; `None` when it
    /// is unreadable, of another length or altered.
    async fn intact_cached_copy(&self, manifest: &Arc<Manifest>) -> Option<integrity::FileCheck> {
        let path = self.shared.store.data_path(manifest.content_id);
        let hashes = Arc::clone(manifest);
        let check = tokio::task::spawn_blocking(move || integrity::check_file(&path, &*hashes))
            .await
            .ok()?
            .ok()?;
        (check.len == manifest.size && check.first_bad_piece.is_none()).then_some(check)
    }

    /// The content is complete in the cache already (and checked): nothing to fetch.
    fn cached(&self, record_index: usize, manifest: &Arc<Manifest>) -> DaemonDownload {
        let size = manifest.size;
        let id = manifest.content_id;
        let mut records = lock(&self.shared.records);
        let record = &mut records[record_index];
        record.status = "Complete".into();
        record.bytes_done = size;
        DaemonDownload {
            status: Status {
                file_size: size,
                total_bytes_downloaded: 0,
                bytes_from_cache_server: 0,
                bytes_from_peers: 0,
                bytes_from_http: 0,
                percent_peer_caching: 0.0,
                download_duration: crate::download::progress::format_duration(Duration::ZERO),
                status: "Complete".into(),
                cache_host: String::new(),
                download_mode: self.shared.config.download_mode.number(),
                cache_server_connection_count: 0,
                cdn_connection_count: 0,
                bytes_resumed: size,
                download_duration_secs: 0.0,
                num_peers: 0,
                peer_connection_count: 0,
                banned_peers: 0,
                bytes_by_peer: Default::default(),
            },
            content_id: Some(id),
            manifest: Some(Arc::clone(manifest)),
            path: self.shared.store.data_path(id),
        }
    }

    /// Follows a running download: written pieces become servable and are announced.
    fn observe(&self, record_index: usize, id: Option<ContentId>, event: &Event) {
        let shared = &self.shared;
        match event {
            Event::PieceWritten { index } => {
                if let Some(id) = id {
                    shared.store.piece_written(id, *index);
                    shared.announce_now.notify_one();
                }
            }
            Event::Progress(progress) => {
                let mut records = lock(&shared.records);
                let record = &mut records[record_index];
                record.file_size = progress.file_len.unwrap_or(0);
                record.bytes_done = progress.done_bytes;
                record.bytes_from_peers = progress.bytes_from(SourceKind::Peer);
                record.bytes_from_cache_server = progress.bytes_from(SourceKind::CacheHost);
                record.bytes_from_http = progress.bytes_from(SourceKind::Origin);
                record.percent_peer_caching = crate::download::progress::percent_of(
                    record.bytes_from_peers + record.bytes_from_cache_server,
                    progress.received_bytes,
                );
                record.num_peers = progress
                    .sources
                    .iter()
                    .filter(|source| source.kind == SourceKind::Peer)
                    .count();
            }
            _ => {}
        }
    }

    /// `peer-client status`: this run's downloads, then cached content from earlier runs.
    pub fn status(&self) -> Vec<DownloadRecord> {
        let shared = &self.shared;
        let mut records = lock(&shared.records).clone();
        for (id, entry) in shared.store.entries() {
            let listed = records
                .iter()
                .any(|record| record.content_id.as_deref() == Some(&id.to_string()));
            if entry.complete && !listed {
                records.push(DownloadRecord {
                    url: entry.url.clone(),
                    content_id: Some(id.to_string()),
                    status: "Cached".into(),
                    file_size: entry.manifest.size,
                    bytes_done: entry.manifest.size,
                    bytes_from_peers: 0,
                    bytes_from_cache_server: 0,
                    bytes_from_http: 0,
                    percent_peer_caching: 0.0,
                    num_peers: 0,
                    error: None,
                });
            }
        }
        records
    }

    /// `peer-client perf-snap`: totals since the daemon started.
    pub fn perf_snap(&self) -> serde_json::Value {
        let shared = &self.shared;
        let stats = &shared.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let downloaded = load(&stats.bytes_from_peers)
            + load(&stats.bytes_from_cache_server)
            + load(&stats.bytes_from_http);
        serde_json::json!({
            "FilesDownloaded": load(&stats.files_downloaded),
            "FilesCached": shared.store.entries().iter().filter(|(_, entry)| entry.complete).count(),
            "BytesDownloaded": downloaded,
            "BytesFromPeers": load(&stats.bytes_from_peers),
            "BytesFromCacheServer": load(&stats.bytes_from_cache_server),
            "BytesFromHttp": load(&stats.bytes_from_http),
            "BytesUploaded": load(&stats.bytes_uploaded),
            "UploadsServed": load(&stats.uploads),
            "ActiveUploads": shared.uploads.active(),
            "BytesUploadedThisMonth": shared.uploads.uploaded_this_month(),
            "CacheSizeBytes": shared.store.size_bytes(),
            "Announcements": load(&stats.announcements),
            "UploadsRefused": load(&stats.uploads_refused),
            "SlowPeersDropped": load(&stats.slow_peers_dropped),
            "HandOversRefused": load(&stats.control_refused),
            "UrlsRefused": load(&stats.urls_refused),
            "CorruptCopiesDropped": load(&stats.corrupt_copies_dropped),
            "ConnectionsBySource": {
                "Peers": load(&stats.peer_connections),
                "CacheServer": load(&stats.cache_server_connections),
                "Http": load(&stats.http_connections),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn announcements_renew_at_half_the_ttl_and_follow_changes_at_a_bounded_pace() {
        let mut schedule = AnnounceSchedule::default();
        let start = Instant::now();
        assert!(schedule.due(start, 0));
        schedule.sent(start, 0, Duration::from_secs(300));
        assert!(!schedule.due(start, 0));
        // A new piece: announced, but not more often than the minimum interval.
        assert!(!schedule.due(start + Duration::from_millis(100), 1));
        tokio::time::advance(MIN_ANNOUNCE_INTERVAL).await;
        assert!(schedule.due(Instant::now(), 1));
        schedule.sent(Instant::now(), 1, Duration::from_secs(300));
        // Nothing new: renewed just before half the TTL has run, never after it expired.
        tokio::time::advance(Duration::from_secs(149)).await;
        assert!(!schedule.due(Instant::now(), 1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(schedule.due(Instant::now(), 1));
        // The node is down: retried after a pause, not in a loop.
        schedule.failed(Instant::now());
        assert!(!schedule.due(Instant::now(), 1));
        tokio::time::advance(ANNOUNCE_RETRY).await;
        assert!(schedule.due(Instant::now(), 1));
    }
}
