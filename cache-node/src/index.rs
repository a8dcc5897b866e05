//! The in-memory index of cached objects: a moka cache from [`CacheKey`] to [`ObjectEntry`] per
//! drive, weighted by the bytes each object holds on disk and bounded by that drive's `max_size`.
//! A key is looked up in the cache of the drive [`Layout::drive_of`] assigns it, so each drive
//! evicts its own least recently used objects when it fills.
//!
//! An [`ObjectEntry`] is one version (generation) of one object: its metadata, which slices are
//! on disk, and which are being filled right now. When moka evicts an entry, or the node drops a
//! version because the origin changed it, the entry is marked removed and its directory deleted
//! by a background task, so eviction really frees the disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::sync::mpsc;

use crate::disk::SharedStorage;
use crate::fill::SliceBuffer;
use crate::freshness::Freshness;
use crate::key::CacheKey;
use crate::store::{Layout, ObjectMeta};

/// moka weights are `u32`, so objects are weighed in units of this many bytes; that still allows
/// objects of up to 16 TiB.
const WEIGHT_UNIT_BYTES: u64 = 4096;

/// Which slices of an object are stored and which are being filled.
#[derive(Debug)]
pub struct SliceTable {
    /// `present[i]` is true when slice `i` is complete on disk.
    pub present: Vec<bool>,
    /// Slices being filled from the origin right now, with the buffer readers stream from.
    pub inflight: HashMap<u64, Arc<SliceBuffer>>,
}

/// One version of one cached object.
#[derive(Debug)]
pub struct ObjectEntry {
    /// The content identity.
    pub key: CacheKey,
    /// The stored version's metadata.
    pub meta: ObjectMeta,
    /// The version's piece hashes (see [`crate::pieces`]).
    pub pieces: crate::pieces::PieceState,
    table: Mutex<SliceTable>,
    stored_bytes: AtomicU64,
    removed: AtomicBool,
    /// When the origin last confirmed this version, and for how long that holds.
    validated: Mutex<Validation>,
    /// Held while this version is being revalidated, so concurrent requests wait for one check.
    pub revalidation: tokio::sync::Mutex<()>,
}

/// When the origin last confirmed a version, and for how long a confirmation holds.
#[derive(Debug, Clone, Copy)]
struct Validation {
    /// `None` when unknown, which means the version is checked before it is next served.
    at: Option<std::time::Instant>,
    /// From the origin's last answer about this version.
    freshness: Freshness,
}

impl ObjectEntry {
    /// Creates an entry for a new version, just confirmed by the origin, with no slices stored.
    pub fn new(meta: ObjectMeta) -> ObjectEntry {
        let entry = Self::with_present(meta, &[]);
        entry.mark_validated();
        entry
    }

    fn validation(&self) -> MutexGuard<'_, Validation> {
        self.validated
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the origin confirmed this version now.
    pub fn mark_validated(&self) {
        self.mark_validated_ago(std::time::Duration::ZERO);
    }

    /// Records that the origin confirmed this version now, with new freshness information.
    pub fn mark_validated_for(&self, freshness: Freshness) {
        let mut validation = self.validation();
        validation.at = Some(std::time::Instant::now());
        validation.freshness = freshness;
    }

    /// Records that the origin confirmed this version `age` ago (for versions recovered from
    /// disk: the time their metadata was written).
    pub fn mark_validated_ago(&self, age: std::time::Duration) {
        self.validation().at = std::time::Instant::now().checked_sub(age);
    }

    /// The freshness the origin gave this version at its last confirmation.
    pub fn freshness(&self) -> Freshness {
        self.validation().freshness
    }

    /// How long ago the origin last confirmed this version (sent as `Age`); `None` when unknown.
    pub fn age(&self) -> Option<std::time::Duration> {
        self.validation().at.map(|at| at.elapsed())
    }

    /// True when the origin's last confirmation of this version no longer holds: older than the
    /// version's freshness lifetime, which is `default` when the origin gave none.
    pub fn needs_revalidation(&self, default: std::time::Duration) -> bool {
        let validation = *self.validation();
        match validation.at {
            Some(validated) => validated.elapsed() >= validation.freshness.lifetime(default),
            None => true,
        }
    }

    /// Creates an entry whose listed slices are already on disk (after a restart).
    pub fn with_present(meta: ObjectMeta, present_slices: &[u64]) -> ObjectEntry {
        let mut present = vec![false; meta.slice_count() as usize];
        let mut stored_bytes = 0;
        for &index in present_slices {
            if let Some(flag) = present.get_mut(index as usize) {
                *flag = true;
                stored_bytes += meta.slice_length(index);
            }
        }
        let freshness = Freshness::from_secs(meta.fresh_for_secs);
        ObjectEntry {
            key: CacheKey::from_text(meta.key.clone()),
            meta,
            pieces: crate::pieces::PieceState::default(),
            table: Mutex::new(SliceTable {
                present,
                inflight: HashMap::new(),
            }),
            stored_bytes: AtomicU64::new(stored_bytes),
            removed: AtomicBool::new(false),
            validated: Mutex::new(Validation {
                at: None,
                freshness,
            }),
            revalidation: tokio::sync::Mutex::new(()),
        }
    }

    /// Locks the slice table. Hold it only for bookkeeping, never across I/O.
    pub fn table(&self) -> MutexGuard<'_, SliceTable> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes of this object stored on disk.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// True once the entry was evicted or replaced; its files are gone or going.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// True when every slice is on disk.
    pub fn is_complete(&self) -> bool {
        self.table().present.iter().all(|present| *present)
    }

    fn weight(&self) -> u32 {
        let units = self.stored_bytes().div_ceil(WEIGHT_UNIT_BYTES) + 1;
        u32::try_from(units).unwrap_or(u32::MAX)
    }
}

/// The index itself: one bounded cache per drive.
pub struct Index {
    drives: Vec<DriveIndex>,
    layout: Layout,
}

/// The objects of one drive.
struct DriveIndex {
    cache: moka::sync::Cache<CacheKey, Arc<ObjectEntry>>,
    used_bytes: Arc<AtomicU64>,
    max_bytes: u64,
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
}

impl std::fmt::Debug for Index {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Index")
            .field("drives", &self.drives.len())
            .field("used_bytes", &self.used_bytes())
            .finish()
    }
}

impl Index {
    /// Creates an empty index over the layout's drives, each bounded by its size. Removed
    /// entries have their directory deleted through `storage` by a background task on the
    /// current tokio runtime.
    pub fn new(layout: Layout, storage: SharedStorage) -> Index {
        let drives = layout
            .drives()
            .map(|drive| DriveIndex::new(drive.max_bytes, layout.clone(), storage.clone()))
            .collect();
        Index { drives, layout }
    }

    fn drive(&self, key: &CacheKey) -> &DriveIndex {
        &self.drives[self.layout.drive_of(key)]
    }

    /// Looks up the current version of `key`.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<ObjectEntry>> {
        self.drive(key).cache.get(key)
    }

    /// Installs a new entry (a new object, or one recovered at start-up).
    pub fn insert(&self, entry: Arc<ObjectEntry>) {
        self.drive(&entry.key).insert(entry);
    }

    /// Drops `entry` if it is still the current version of its key (its files are deleted).
    pub fn remove(&self, entry: &Arc<ObjectEntry>) {
        self.drive(&entry.key).remove(entry);
    }

    /// Records that slice `index` of `entry` is now complete on disk and re-weighs the entry,
    /// which may evict others on its drive. Returns false when the entry was removed meanwhile
    /// (the caller deletes the orphan file).
    pub fn mark_slice_stored(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        self.drive(&entry.key).mark_slice_stored(entry, index)
    }

    /// Bytes stored on disk by all indexed objects, on every drive.
    pub fn used_bytes(&self) -> u64 {
        self.drives
            .iter()
            .map(|drive| drive.used_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// The configured bound: the sum of the drives' sizes.
    pub fn max_bytes(&self) -> u64 {
        self.drives
            .iter()
            .fold(0u64, |sum, drive| sum.saturating_add(drive.max_bytes))
    }

    /// How many slices are being filled right now, across all objects. Entries are collected
    /// before their tables are locked, so no table lock is taken inside a moka call.
    pub fn inflight_slice_count(&self) -> usize {
        let entries: Vec<Arc<ObjectEntry>> = self
            .drives
            .iter()
            .flat_map(|drive| drive.cache.iter().map(|(_, entry)| entry))
            .collect();
        entries
            .iter()
            .map(|entry| entry.table().inflight.len())
            .sum()
    }

    /// How many objects are indexed, on every drive.
    pub fn object_count(&self) -> u64 {
        self.drives.iter().map(DriveIndex::object_count).sum()
    }

    /// Each drive's figures, in configuration order.
    pub fn drive_usage(&self) -> Vec<DriveUsage> {
        self.layout
            .drives()
            .zip(&self.drives)
            .map(|(spec, drive)| DriveUsage {
                path: spec.root.display().to_string(),
                used_bytes: drive.used_bytes.load(Ordering::Relaxed),
                max_bytes: drive.max_bytes,
                objects: drive.object_count(),
            })
            .collect()
    }
}

impl DriveIndex {
    fn new(max_bytes: u64, layout: Layout, storage: SharedStorage) -> DriveIndex {
        let used_bytes = Arc::new(AtomicU64::new(0));
        let (removal_sender, mut removal_receiver) = mpsc::unbounded_channel::<Arc<ObjectEntry>>();
        let deleter_used_bytes = used_bytes.clone();
        tokio::spawn(async move {
            while let Some(entry) = removal_receiver.recv().await {
                let directory = layout.generation_dir(&entry.key, entry.meta.generation);
                if let Err(error) = storage.remove_dir_all(directory).await {
                    tracing::warn!(key = entry.key.as_str(), %error, "could not delete evicted object");
                }
                deleter_used_bytes.fetch_sub(entry.stored_bytes(), Ordering::Relaxed);
            }
        });
        let cache = moka::sync::Cache::builder()
            .max_capacity((max_bytes / WEIGHT_UNIT_BYTES).max(1))
            .eviction_policy(EvictionPolicy::lru())
            .weigher(|_key: &CacheKey, entry: &Arc<ObjectEntry>| entry.weight())
            .eviction_listener(move |_key, entry: Arc<ObjectEntry>, cause| {
                // A `Replaced` notification only ever means "the same entry, re-weighed": new
                // versions are installed after the old one was removed explicitly.
                if cause == RemovalCause::Replaced {
                    return;
                }
                {
                    let _table = entry.table();
                    entry.removed.store(true, Ordering::Release);
                }
                tracing::debug!(
                    key = entry.key.as_str(),
                    ?cause,
                    "object removed from index"
                );
                let _ = removal_sender.send(entry);
            })
            .build();
        DriveIndex {
            cache,
            used_bytes,
            max_bytes,
        }
    }

    fn insert(&self, entry: Arc<ObjectEntry>) {
        self.used_bytes
            .fetch_add(entry.stored_bytes(), Ordering::Relaxed);
        self.cache.insert(entry.key.clone(), entry);
        self.cache.run_pending_tasks();
    }

    fn remove(&self, entry: &Arc<ObjectEntry>) {
        let _ = self
            .cache
            .entry(entry.key.clone())
            .and_compute_with(|current| match current {
                Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Remove,
                _ => Op::Nop,
            });
        self.cache.run_pending_tasks();
    }

    fn mark_slice_stored(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        {
            let mut table = entry.table();
            if entry.is_removed() {
                table.inflight.remove(&index);
                return false;
            }
            if let Some(flag) = table.present.get_mut(index as usize) {
                if !*flag {
                    *flag = true;
                    let slice_length = entry.meta.slice_length(index);
                    entry
                        .stored_bytes
                        .fetch_add(slice_length, Ordering::Relaxed);
                    self.used_bytes.fetch_add(slice_length, Ordering::Relaxed);
                }
            }
            table.inflight.remove(&index);
        }
        let _ = self
            .cache
            .entry(entry.key.clone())
            .and_compute_with(|current| match current {
                Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Put(entry.clone()),
                _ => Op::Nop,
            });
        self.cache.run_pending_tasks();
        true
    }

    fn object_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}
