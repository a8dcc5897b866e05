//! The node: a plain struct of handles to everything a request needs, built once at start-up
//! (by `server::startup`) and shared by the layers above the cache. It has no behaviour of its
//! own: each handle's owner (the index, the upstream client, the fill limits...) does the work.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::discovery::Discoveries;
use crate::cache::index::Index;
use crate::cache::key::CacheKey;
use crate::cache::store::Layout;
use crate::disk::SharedStorage;
use crate::stats::Stats;
use crate::upstream::origin::{Allowlist, UpstreamClient};

/// The most keys [`Node::uncacheable`] remembers.
pub const UNCACHEABLE_KEYS: u64 = 65_536;

/// How long an origin that could not be reached for a revalidation is not asked again for one
/// (stored versions are served as they are meanwhile).
pub const UNREACHABLE_ORIGIN_BACKOFF: Duration = Duration::from_secs(30);

/// Shared state of one running cache node.
pub struct Node {
    /// Which origins may be fetched, and where; replaced whole by a config reload.
    pub allowlist: arc_swap::ArcSwap<Allowlist>,
    /// The pooled origin client.
    pub client: UpstreamClient,
    /// The object index.
    pub index: Arc<Index>,
    /// Pending discoveries of unknown objects.
    pub discoveries: Arc<Discoveries>,
    /// The disk backend.
    pub storage: SharedStorage,
    /// On-disk paths.
    pub layout: Layout,
    /// Reusable buffers for reads of stored slices.
    pub read_buffers: crate::disk::pool::BufferPool,
    /// Counters.
    pub stats: Arc<Stats>,
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
    /// Redirects, `404`s and `410`s the origin said are fresh, served from memory meanwhile.
    pub status_answers: crate::cache::status_answer::StatusAnswers,
    /// Per URL, the request fields its stored responses vary on, and its variants.
    pub vary: crate::cache::vary::VaryIndex,
    /// `upstream.not_found_max_age`: the longest a `404` is kept.
    pub not_found_max_age: Duration,
    /// Origins (by upstream base URL) whose last revalidation could not connect or got no
    /// answer in time, for [`UNREACHABLE_ORIGIN_BACKOFF`]: while the WAN is down, stale hits are
    /// served at once instead of each waiting out a timeout.
    pub unreachable_origins: moka::sync::Cache<String, ()>,
    /// `server.max_ranges`.
    pub max_ranges: usize,
    /// `[[prefill.schedule]]`; replaced by a config reload.
    pub prefill_schedules: arc_swap::ArcSwap<Vec<crate::schedule::Schedule>>,
    /// `admin.token`; replaced by a config reload.
    pub admin_token: arc_swap::ArcSwap<String>,
    /// Piece manifests and the tracker; `None` when `peering.enabled` is off.
    pub peering: Option<crate::peering::Peering>,
    /// The memory, concurrency and per-client bounds of fills (`[fill]`).
    pub fill_limits: Arc<crate::cache::fill_limits::FillLimits>,
    /// The client listener's connection caps and timeouts (`[server]`), resolved when the node
    /// opened (after the open-file limit was raised).
    pub connection_limits: crate::http::connection_limits::ConnectionLimits,
    /// `storage.max_object_size` in bytes.
    pub max_object_size: u64,
    /// `storage.verify_hits`.
    pub verify_hits: f64,
    /// The counters' last 24 hours, sampled every `admin.history_interval`.
    pub history: crate::history::History,
    /// `[prefill]`, for the admin listener's prefill jobs.
    pub prefill: crate::cache::fill_limits::PrefillSettings,
    /// The access log, when `log.access` is on.
    pub access_log: Option<crate::http::access_log::AccessLog>,
    /// The TLS listener's certificate (`[tls]`), reloaded in place; `None` when TLS is off.
    pub tls: Option<Arc<crate::tls::serving::ServingCertificate>>,
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
    /// The narrow view of the store that piece hashing works with.
    pub fn piece_store(&self) -> crate::cache::pieces::PieceStore<'_> {
        crate::cache::pieces::PieceStore {
            index: &self.index,
            storage: &self.storage,
            layout: &self.layout,
            read_buffers: &self.read_buffers,
            stats: &self.stats,
            fsync: self.fsync,
        }
    }
}
