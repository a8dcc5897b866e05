//! Start-up: opening a node. The store is recovered from disk into a new index, the origin
//! client and the fill limits are built from the validated config, and the result is the
//! [`Node`] struct of handles every layer above the cache reads.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::fill_limits::FillLimits;
use crate::cache::index::{Index, ObjectEntry};
use crate::cache::store::Layout;
use crate::config::ValidConfig;
use crate::disk::{self, SharedStorage};
use crate::error::DiskError;
use crate::http::access_log::AccessLog;
use crate::node::{Node, UNCACHEABLE_KEYS, UNREACHABLE_ORIGIN_BACKOFF};
use crate::peering::Peering;
use crate::server::connections::client_limits;
use crate::stats::Stats;
use crate::tls::serving::ServingCertificate;
use crate::upstream::origin::UpstreamClient;

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
        let vary = crate::cache::vary::VaryIndex::default();
        for object in recovered {
            vary.learn_stored(&object.meta);
            let confirmed = (object.meta.confirmed_at_unix).unwrap_or(object.meta.stored_at_unix);
            let age = crate::cache::store::unix_now().saturating_sub(confirmed);
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
        let stats = Arc::new(Stats::new(backend_name, config.allowlist.labels()));
        let fill_limits = FillLimits::new(&config.fill, stats.fills.clone());
        let access_log = match &config.access_log {
            Some(settings) => {
                let log = AccessLog::start(
                    settings.clone(),
                    stats.access_log_lines.clone(),
                    stats.access_log_dropped.clone(),
                )
                .map_err(|error| DiskError::io("open the access log", &settings.path, error))?;
                tracing::info!(path = %settings.path.display(), "access log on");
                Some(log)
            }
            None => None,
        };
        Ok(Arc::new(Node {
            storage: reporting_full_disk(storage, index.clone(), stats.clone()),
            allowlist: arc_swap::ArcSwap::from_pointee(config.allowlist.clone()),
            client: UpstreamClient::new(
                &config.raw.upstream,
                config.proxy.clone(),
                config.allowlist.address_policy(),
                &config.upstream_roots,
                stats.origin_requests.clone(),
            ),
            index,
            discoveries: Arc::default(),
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
            status_answers: Default::default(),
            vary,
            not_found_max_age: config.raw.upstream.not_found_max_age,
            unreachable_origins: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(UNREACHABLE_ORIGIN_BACKOFF)
                .build(),
            max_ranges: config.raw.server.max_ranges,
            admin_token: arc_swap::ArcSwap::from_pointee(config.raw.admin.token.clone()),
            prefill_schedules: arc_swap::ArcSwap::from_pointee(config.prefill.schedule.clone()),
            peering: Peering::start(&config.peering),
            fill_limits,
            connection_limits: client_limits(&config.raw.server),
            max_object_size: config.max_object_size_bytes,
            verify_hits: config.verify_hits,
            access_log,
            prefill: config.prefill.clone(),
            history: crate::history::History::new(config.raw.admin.history_interval),
            tls: config.tls.as_ref().map(|tls| {
                Arc::new(ServingCertificate::new(
                    &tls.cert,
                    &tls.key,
                    tls.pair.clone(),
                ))
            }),
        }))
    }
}

/// `storage` with every write refused for lack of space reported: the drive's effective size is
/// lowered to what it holds and its least recently used objects make room (see
/// [`Index::disk_full`]).
fn reporting_full_disk(
    storage: SharedStorage,
    index: Arc<Index>,
    stats: Arc<Stats>,
) -> SharedStorage {
    Arc::new(disk::full::ReportsFullDisk::new(
        storage,
        Arc::new(move |path: &std::path::Path, refused| {
            stats.disk_full_events.inc();
            let Some(outcome) = index.disk_full(path, refused) else {
                return;
            };
            if outcome.effective_max_bytes < outcome.previous_max_bytes
                || outcome.evicted_objects > 0
            {
                tracing::warn!(
                    path = %path.display(),
                    previous_max_bytes = outcome.previous_max_bytes,
                    effective_max_bytes = outcome.effective_max_bytes,
                    evicted_objects = outcome.evicted_objects,
                    evicted_bytes = outcome.evicted_bytes,
                    "disk full below storage.max_size: the drive's effective size is lowered (until restart) and the least recently used objects are evicted"
                );
            }
        }),
    ))
}
