//! The node: everything a request handler needs, built once at start-up and shared.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Response};
use hyper::body::Incoming;

use crate::config::ValidConfig;
use crate::disk::{self, SharedStorage};
use crate::error::{DiskError, OriginError};
use crate::fill::Discoveries;
use crate::index::{Index, ObjectEntry};
use crate::key::CacheKey;
use crate::origin::{Allowlist, FetchRequest, UpstreamClient};
use crate::router::Route;
use crate::stats::Stats;
use crate::store::Layout;

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
    pub index: Index,
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
    pub uncacheable: moka::sync::Cache<CacheKey, crate::freshness::NotStorable>,
    /// Origins (by upstream base URL) whose last revalidation could not connect or got no
    /// answer in time, for [`UNREACHABLE_ORIGIN_BACKOFF`]: while the WAN is down, stale hits are
    /// served at once instead of each waiting out a timeout.
    pub unreachable_origins: moka::sync::Cache<String, ()>,
    /// `server.max_ranges`.
    pub max_ranges: usize,
    /// `admin.token`.
    pub admin_token: String,
    /// Piece manifests and the tracker; `None` when `peering.enabled` is off.
    pub peering: Option<crate::peering::Peering>,
    /// The memory, concurrency and per-client bounds of fills (`[fill]`).
    pub fill_limits: Arc<crate::fill_limits::FillLimits>,
    /// The client listener's connection caps and timeouts (`[server]`), resolved when the node
    /// opened (after the open-file limit was raised).
    pub connection_limits: crate::connections::ConnectionLimits,
    /// Failed admin-token attempts per client address, for throttling them.
    pub admin_auth: crate::admin::AuthThrottle,
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
        let index = Index::new(layout.clone(), storage.clone());
        let recovered = layout.recover()?;
        let mut recovered_bytes = 0;
        let recovered_objects = recovered.len();
        for object in recovered {
            // Content stored with another slice size cannot be read with this one.
            if object.meta.slice_len != config.slice_len {
                continue;
            }
            let age = crate::store::unix_now().saturating_sub(object.meta.stored_at_unix);
            let entry = Arc::new(ObjectEntry::with_present(
                object.meta,
                &object.present_slices,
            ));
            entry.mark_validated_ago(Duration::from_secs(age));
            if let Some(piece_len) = object.pieces_file {
                entry.pieces.mark_on_disk(piece_len);
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
        let fill_limits = crate::fill_limits::FillLimits::new(&config.fill, stats.fills.clone());
        Ok(Arc::new(Node {
            allowlist: Allowlist::from_config(&config.raw),
            client: UpstreamClient::new(&config.raw.upstream, config.proxy.clone()),
            index,
            discoveries: Discoveries::default(),
            storage,
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
            peering: crate::peering::Peering::start(&config.peering),
            fill_limits,
            connection_limits: crate::connections::ConnectionLimits::client(&config.raw.server),
            admin_auth: crate::admin::AuthThrottle::default(),
        }))
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
    pub fn refresh_gauges(&self) -> Vec<crate::index::DriveUsage> {
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
