//! The node: everything a request handler needs, built once at start-up and shared.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response};
use hyper::body::Incoming;

use crate::cache::index::{Index, ObjectEntry};
use crate::cache::key::CacheKey;
use crate::cache::store::Layout;
use crate::config::ValidConfig;
use crate::disk::{self, SharedStorage};
use crate::error::{DiskError, OriginError};
use crate::fill::Discoveries;
use crate::stats::Stats;
use crate::upstream::origin::{Allowlist, FetchRequest, UpstreamClient};
use crate::upstream::router::Route;

/// The most keys [`Node::uncacheable`] remembers.
const UNCACHEABLE_KEYS: u64 = 65_536;

/// How long an origin that could not be reached for a revalidation is not asked again for one
/// (stored versions are served as they are meanwhile).
pub const UNREACHABLE_ORIGIN_BACKOFF: Duration = Duration::from_secs(30);

/// Shared state of one running cache node.
pub struct Node {
    /// Which origins may be fetched, and where.
    pub allowlist: Allowlist,
    /// The pooled origin client.
    pub client: UpstreamClient,
    /// The object index.
    pub index: Arc<Index>,
    /// Pending discoveries of unknown objects.
    pub discoveries: Discoveries,
    /// The disk backend.
    pub storage: SharedStorage,
    /// On-disk paths.
    pub layout: Layout,
    /// Reusable buffers for reads of stored slices.
    pub read_buffers: crate::disk::pool::BufferPool,
    /// Counters.
    pub stats: Stats,
    /// `storage.slice_size` in bytes.
    pub slice_len: u64,
    /// `storage.fsync`.
    pub fsync: bool,
    /// `upstream.idle_read_timeout`.
    pub idle_read_timeout: Duration,
    /// `upstream.merge_gap_slices`.
    pub merge_gap_slices: u64,
    /// `log.summary_interval`.
    pub summary_interval: Duration,
    /// Content found not storable (no length, `no-store`, `private`), remembered for
    /// `revalidate_after` so that later requests go straight to the origin instead of
    /// rediscovering it.
    pub uncacheable: moka::sync::Cache<CacheKey, crate::cache::freshness::NotStorable>,
    /// Origins (by upstream base URL) whose last revalidation could not connect or got no
    /// answer in time, for [`UNREACHABLE_ORIGIN_BACKOFF`]: while the WAN is down, stale hits are
    /// served at once instead of each waiting out a timeout.
    pub unreachable_origins: moka::sync::Cache<String, ()>,
    /// `server.max_ranges`.
    pub max_ranges: usize,
    /// `admin.token`.
    pub admin_token: String,
    /// Piece manifests and the tracker; `None` when `peering.enabled` is off.
    pub peering: Option<crate::api::peering::Peering>,
    /// The memory, concurrency and per-client bounds of fills (`[fill]`).
    pub fill_limits: Arc<crate::cache::fill_limits::FillLimits>,
    /// The client listener's connection caps and timeouts (`[server]`), resolved when the node
    /// opened (after the open-file limit was raised).
    pub connection_limits: crate::server::connections::ConnectionLimits,
    /// Failed admin-token attempts per client address, for throttling them.
    pub admin_auth: crate::api::auth_throttle::AuthThrottle,
    /// `storage.max_object_size` in bytes.
    pub max_object_size: u64,
    /// `storage.verify_hits`.
    pub verify_hits: f64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Node")
            .field("backend", &self.storage.backend_name())
            .field("index", &self.index)
            .finish()
    }
}

impl Node {
    /// Opens the store (recovering what a previous run left), builds the index and the origin
    /// client. Must run inside a tokio runtime.
    pub fn open(config: &ValidConfig) -> Result<Arc<Node>, DiskError> {
        let layout = Layout::create_drives(&config.drives)?;
        let (storage, backend_reason) =
            disk::open_backend(config.io_backend, &config.raw.storage.path)?;
        tracing::info!("disk backend: {backend_reason}");
        if let Some(proxy) = &config.proxy {
            tracing::info!(
                proxy = %proxy.address(),
                no_proxy = config.raw.upstream.no_proxy.as_str(),
                "origins are reached through the outbound proxy"
            );
        }
        Self::open_with_storage(config, layout, storage)
    }

    /// Like [`Node::open`], with a storage backend chosen by the caller (fault-injection tests
    /// wrap a real backend).
    pub fn open_with_storage(
        config: &ValidConfig,
        layout: Layout,
        storage: SharedStorage,
    ) -> Result<Arc<Node>, DiskError> {
        let backend_name = storage.backend_name();
        let index = Arc::new(Index::new(
            layout.clone(),
            storage.clone(),
            config.slice_len,
        ));
        // Content stored with another slice size, or declaring more than the limit, is deleted.
        let recovered = layout.recover(crate::cache::store::RecoveryLimits {
            slice_len: config.slice_len,
            max_object_size: config.max_object_size_bytes,
        })?;
        let mut recovered_bytes = 0;
        let recovered_objects = recovered.len();
        for object in recovered {
            let age = crate::cache::store::unix_now().saturating_sub(object.meta.stored_at_unix);
            let entry = Arc::new(ObjectEntry::with_present(
                object.meta,
                &object.present_slices,
            ));
            entry.mark_validated_ago(Duration::from_secs(age));
            if let Some(piece_len) = object.pieces_file {
                entry.pieces.mark_on_disk(piece_len);
                // The files may have changed while the node was down: they are compared with
                // the hashes before they back a manifest.
                entry.pieces.require_check();
            }
            recovered_bytes += entry.stored_bytes();
            index.insert(entry);
        }
        tracing::info!(
            objects = recovered_objects,
            bytes = recovered_bytes,
            backend = storage.backend_name(),
            "cache store opened"
        );
        let stats = Stats::new(backend_name);
        let fill_limits =
            crate::cache::fill_limits::FillLimits::new(&config.fill, stats.fills.clone());
        Ok(Arc::new_cyclic(|node: &std::sync::Weak<Node>| Node {
            storage: Self::reporting_full_disk(storage, node.clone()),
            allowlist: Allowlist::from_config(&config.raw),
            client: UpstreamClient::new(&config.raw.upstream, config.proxy.clone()),
            index,
            discoveries: Discoveries::default(),
            layout,
            read_buffers: crate::disk::pool::BufferPool::new(),
            stats,
            slice_len: config.slice_len,
            fsync: config.raw.storage.fsync,
            idle_read_timeout: config.raw.upstream.idle_read_timeout,
            merge_gap_slices: config.raw.upstream.merge_gap_slices,
            summary_interval: config.raw.log.summary_interval,
            uncacheable: moka::sync::Cache::builder()
                .max_capacity(UNCACHEABLE_KEYS)
                .time_to_live(config.raw.upstream.revalidate_after)
                .build(),
            unreachable_origins: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(UNREACHABLE_ORIGIN_BACKOFF)
                .build(),
            max_ranges: config.raw.server.max_ranges,
            admin_token: config.raw.admin.token.clone(),
            peering: crate::api::peering::Peering::start(&config.peering),
            fill_limits,
            connection_limits: crate::server::connections::ConnectionLimits::client(
                &config.raw.server,
            ),
            admin_auth: crate::api::auth_throttle::AuthThrottle::default(),
            max_object_size: config.max_object_size_bytes,
            verify_hits: config.verify_hits,
        }))
    }

    /// `storage` with every write refused for lack of space reported to [`Node::disk_full`].
    fn reporting_full_disk(storage: SharedStorage, node: std::sync::Weak<Node>) -> SharedStorage {
        Arc::new(disk::full::ReportsFullDisk::new(
            storage,
            Arc::new(move |path: &std::path::Path, refused| {
                if let Some(node) = node.upgrade() {
                    node.disk_full(path, refused);
                }
            }),
        ))
    }

    /// A write under `path` failed because the filesystem is full: the drive's effective size
    /// is lowered to what it holds and its least recently used objects make room (see
    /// [`Index::disk_full`]).
    pub fn disk_full(&self, path: &std::path::Path, refused: disk::full::RefusedWrite) {
        self.stats.disk_full_events.inc();
        let Some(outcome) = self.index.disk_full(path, refused) else {
            return;
        };
        if outcome.effective_max_bytes < outcome.previous_max_bytes || outcome.evicted_objects > 0 {
            tracing::warn!(
                path = %path.display(),
                previous_max_bytes = outcome.previous_max_bytes,
                effective_max_bytes = outcome.effective_max_bytes,
                evicted_objects = outcome.evicted_objects,
                evicted_bytes = outcome.evicted_bytes,
                "disk full below storage.max_size: the drive's effective size is lowered (until restart) and the least recently used objects are evicted"
            );
        }
    }

    /// Refuses a discovered object whose declared length is above `storage.max_object_size`,
    /// before anything is sized from it.
    pub fn check_object_size(&self, key: &CacheKey, length: u64) -> Result<(), OriginError> {
        if length <= self.max_object_size {
            return Ok(());
        }
        self.stats.objects_refused_too_large.inc();
        tracing::warn!(
            key = key.as_str(),
            length,
            max_object_size = self.max_object_size,
            "origin declares an object longer than storage.max_object_size; refused"
        );
        Err(OriginError::TooLarge {
            length,
            max: self.max_object_size,
        })
    }

    /// True when a slice read from disk for a hit should be checked against its piece hashes
    /// (`storage.verify_hits`).
    pub fn sample_hit_check(&self) -> bool {
        self.verify_hits >= 1.0
            || (self.verify_hits > 0.0 && rand::random::<f64>() < self.verify_hits)
    }

    /// A read of slice `index` of `entry`, which the index has as stored, failed with `error`.
    /// When the file is missing, short or damaged (and the entry was not removed meanwhile, which
    /// deletes its files), the slice is forgotten so that it is filled again: a lost slice is a
    /// miss, never a truncated hit. Returns true when the caller should fill it. An error of the
    /// moment (no file descriptor left) forgets nothing: the caller fails the response.
    pub fn slice_lost(&self, entry: &Arc<ObjectEntry>, index: u64, error: &DiskError) -> bool {
        if entry.is_removed() || !error.is_missing_or_damaged() {
            return false;
        }
        if self.index.forget_slice(entry, index) {
            self.stats.slices_lost.inc();
            tracing::warn!(
                key = entry.key.as_str(),
                slice = index,
                %error,
                "stored slice missing or unreadable; it is filled again"
            );
        }
        !entry.is_removed()
    }

    /// Slice `slice` of `entry` does not match its piece hashes: the whole stored version is
    /// dropped (its files deleted), so it is fetched again and hashed anew.
    pub fn integrity_failure(&self, entry: &Arc<ObjectEntry>, slice: u64) {
        self.stats.integrity_failures.inc();
        tracing::warn!(
            key = entry.key.as_str(),
            slice,
            "stored slice does not match its piece hashes; the stored version is dropped"
        );
        self.index.remove(entry);
    }

    /// Sends one request for the route's content upstream (counted in `origin_requests`).
    pub async fn fetch_origin(
        &self,
        route: &Route,
        method: Method,
        range: Option<String>,
        if_range: Option<String>,
    ) -> Result<Response<Incoming>, OriginError> {
        self.stats.origin_requests.inc();
        self.client
            .fetch(FetchRequest {
                target: &route.target,
                path_and_query: &route.path_and_query,
                method,
                range,
                if_range,
            })
            .await
    }

    /// Refreshes the gauges and returns the `/stats` document.
    pub fn stats_snapshot(&self) -> crate::stats::StatsSnapshot {
        let drives = self.refresh_gauges();
        let mut snapshot = self.stats.snapshot(self.storage.backend_name());
        snapshot.drives = drives;
        snapshot
    }

    /// Copies index figures into the gauges, and returns each drive's.
    pub fn refresh_gauges(&self) -> Vec<crate::stats::DriveUsage> {
        self.stats
            .set_effective_max_bytes(self.index.effective_max_bytes());
        let drives = self.index.drive_usage();
        self.stats.set_cache_gauges(
            self.index.used_bytes(),
            self.index.max_bytes(),
            self.index.object_count(),
            &drives,
        );
        drives
    }
}
