//! The in-memory index of cached objects: a moka cache from [`CacheKey`] to [`ObjectEntry`] per
//! drive, weighted by the bytes each object holds on disk and bounded by that drive's `max_size`.
//! A key is looked up in the cache of the drive [`Layout::drive_of`] assigns it, so each drive
//! evicts its own least recently used objects when it fills.
//!
//! An [`ObjectEntry`] is one version (generation) of one object: its metadata, which slices are
//! on disk, and which are being filled right now. When moka evicts an entry, or the node drops a
//! version because the origin changed it, the entry is marked removed and its directory deleted
//! by a background task, so eviction really frees the disk.
//!
//! Per-object state follows what is stored or in flight, never the length an origin declared:
//! stored slices are a [`SliceSet`] of runs, so a complete object and an object holding one
//! slice of a declared terabyte cost the same few bytes.
//!
//! A drive whose filesystem runs out of space before `max_size` (a write fails with `ENOSPC`)
//! gets an *effective* size: [`Index::disk_full`] lowers it to what the drive held at that
//! moment and evicts the least recently used objects down to a margin below it, so the objects
//! being filled find room instead of fetching their missing slices again on every request.

use outpost_shared::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use http::HeaderMap;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::sync::mpsc;

use crate::cache::freshness::{
    self, Check, ClientDirectives, Freshness, FreshnessPolicy, StaleDirectives,
};
use crate::cache::header_section;
use crate::cache::key::CacheKey;
use crate::cache::slice_buffer::SliceBuffer;
use crate::cache::store::{Layout, ObjectMeta};
use crate::disk::full::RefusedWrite;
use crate::disk::SharedStorage;
use crate::error::DiskError;
use crate::stats::{DriveUsage, Stats, StoredTally};

/// moka weights are `u32`, so objects are weighed in units of this many bytes; that still allows
/// objects of up to 16 TiB.
const WEIGHT_UNIT_BYTES: u64 = 4096;

/// A clock that ticks on every lookup, for the least-recently-used order of
/// [`DriveIndex::shrink_to`] (moka keeps its own order but does not expose it).
static USE_CLOCK: AtomicU64 = AtomicU64::new(1);

/// The slices of one object that are complete on disk, as sorted, disjoint, non-adjacent runs.
/// Its size follows how fragmented the stored part is, never how long the object claims to be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceSet {
    /// How many slices the object has; indexes at or beyond it are not slices of the object.
    slice_count: u64,
    /// Run start → run end (exclusive).
    runs: BTreeMap<u64, u64>,
    /// How many slices the runs hold.
    len: u64,
}

impl SliceSet {
    /// An empty set for an object of `slice_count` slices.
    pub fn new(slice_count: u64) -> SliceSet {
        SliceSet {
            slice_count,
            ..SliceSet::default()
        }
    }

    /// Like `slice::get`: `Some(stored)` for a slice of the object, `None` beyond its end.
    pub fn get(&self, index: u64) -> Option<bool> {
        (index < self.slice_count).then(|| self.contains(index))
    }

    /// True when slice `index` is stored.
    pub fn contains(&self, index: u64) -> bool {
        self.run_containing(index).is_some()
    }

    fn run_containing(&self, index: u64) -> Option<(u64, u64)> {
        self.runs
            .range(..=index)
            .next_back()
            .filter(|(_, end)| **end > index)
            .map(|(start, end)| (*start, *end))
    }

    /// Marks slice `index` stored; false when it already was or is not a slice of the object.
    pub fn insert(&mut self, index: u64) -> bool {
        if index >= self.slice_count || self.contains(index) {
            return false;
        }
        let mut start = index;
        let mut end = index + 1;
        if let Some((&before_start, &before_end)) = self.runs.range(..index).next_back() {
            if before_end == index {
                start = before_start;
            }
        }
        if let Some(after_end) = self.runs.get(&end).copied() {
            self.runs.remove(&end);
            end = after_end;
        }
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    /// Marks slice `index` missing; false when it was not stored.
    pub fn remove(&mut self, index: u64) -> bool {
        let Some((start, end)) = self.run_containing(index) else {
            return false;
        };
        self.runs.remove(&start);
        if start < index {
            self.runs.insert(start, index);
        }
        if index + 1 < end {
            self.runs.insert(index + 1, end);
        }
        self.len -= 1;
        true
    }

    /// How many slices are stored.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no slice is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when every slice of the object is stored.
    pub fn is_full(&self) -> bool {
        self.len == self.slice_count
    }

    /// How many of the slices `first..=last` are stored, in time proportional to the runs.
    pub fn count_in(&self, first: u64, last: u64) -> u64 {
        if first > last {
            return 0;
        }
        let from = self
            .runs
            .range(..=first)
            .next_back()
            .map_or(first, |(start, _)| *start);
        self.runs
            .range(from..=last)
            .map(|(start, end)| {
                let overlap_start = (*start).max(first);
                let overlap_end = (*end).min(last.saturating_add(1));
                overlap_end.saturating_sub(overlap_start)
            })
            .sum()
    }

    /// The stored runs, as `start..end` ranges in order.
    pub fn runs(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.runs.iter().map(|(start, end)| *start..*end)
    }
}

/// Which slices of an object are stored and which are being filled.
#[derive(Debug)]
pub struct SliceTable {
    /// The slices complete on disk.
    pub present: SliceSet,
    /// Slices being filled from the origin right now, with the buffer readers stream from.
    pub inflight: HashMap<u64, Arc<SliceBuffer>>,
    /// What running fills reserved beyond the slices they claimed, and what responses want:
    /// ranges, not slices.
    pub claims: crate::cache::slice_buffer::Claims,
}

/// One object being filled, for `/stats` `fills` (see [`Index::fills_in_progress`]).
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct FillProgress {
    /// Its cache key.
    pub key: String,
    /// Its bytes stored so far.
    pub stored_bytes: u64,
    /// Its whole length.
    pub length: u64,
}

/// One version of one cached object.
#[derive(Debug)]
pub struct ObjectEntry {
    /// The content identity.
    pub key: CacheKey,
    /// The stored version's metadata.
    pub meta: ObjectMeta,
    /// The version's piece hashes (see [`crate::cache::piece_state`]).
    pub pieces: crate::cache::piece_state::PieceState,
    table: Mutex<SliceTable>,
    stored_bytes: AtomicU64,
    removed: AtomicBool,
    /// When the origin last confirmed this version, and for how long that holds.
    validated: Mutex<Validation>,
    /// Held while this version is being revalidated, so concurrent requests wait for one check.
    pub revalidation: tokio::sync::Mutex<()>,
    /// True while a background check of this version runs (see [`BackgroundCheckClaim`]).
    background_check: AtomicBool,
    /// [`USE_CLOCK`] at the last lookup, for eviction when a disk fills before `max_size`.
    last_used: AtomicU64,
    /// The stored header section as answers replay it (validators, `Content-Encoding` and every
    /// stored field; see [`crate::cache::header_section`]): parsed once, replaced whole when a
    /// revalidation refreshes it, and cloned (refcounted values) into each answer.
    replay: Mutex<Arc<HeaderMap>>,
}

/// When the origin last confirmed a version, and for how long a confirmation holds.
#[derive(Debug, Clone, Copy)]
struct Validation {
    /// `None` when unknown, which means the version is checked before it is next served.
    at: Option<std::time::Instant>,
    /// From the origin's last answer about this version.
    freshness: Freshness,
    /// What the origin's last answer allows once the version is stale.
    directives: StaleDirectives,
}

/// The one background check of a version at a time: held by the task that checks, released
/// when dropped, however the task ends.
#[derive(Debug)]
pub struct BackgroundCheckClaim {
    entry: Arc<ObjectEntry>,
}

impl BackgroundCheckClaim {
    /// The version being checked.
    pub fn entry(&self) -> &Arc<ObjectEntry> {
        &self.entry
    }
}

impl Drop for BackgroundCheckClaim {
    fn drop(&mut self) {
        self.entry.background_check.store(false, Ordering::Release);
    }
}

impl ObjectEntry {
    /// Creates an entry for a new version, just confirmed by the origin, with no slices stored.
    pub fn new(meta: ObjectMeta) -> ObjectEntry {
        let entry = Self::with_present(meta, &[]);
        entry.mark_validated();
        entry
    }

    fn validation(&self) -> MutexGuard<'_, Validation> {
        lock(&self.validated)
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

    /// Records that the origin confirmed this version now, with new freshness information and
    /// stale directives.
    pub fn mark_validated_with(&self, freshness: Freshness, directives: StaleDirectives) {
        let mut validation = self.validation();
        validation.at = Some(std::time::Instant::now());
        validation.freshness = freshness;
        validation.directives = directives;
    }

    /// True when the origin confirmed this version at or after `instant` (a request that arrived
    /// then and must see a check is satisfied by it).
    pub fn validated_since(&self, instant: std::time::Instant) -> bool {
        self.validation().at.is_some_and(|at| at >= instant)
    }

    /// What a request with the client's `client` directives must do about this version before
    /// serving it, under its origin's `policy` (see [`freshness::check_needed`]).
    pub fn check_needed(&self, policy: &FreshnessPolicy, client: ClientDirectives) -> Check {
        let validation = *self.validation();
        freshness::check_needed(
            policy,
            validation.freshness,
            validation.directives,
            validation.at.map(|at| at.elapsed()),
            client,
        )
    }

    /// Claims the one background check of this version; `None` while another runs.
    pub fn claim_background_check(self: &Arc<Self>) -> Option<BackgroundCheckClaim> {
        self.background_check
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| BackgroundCheckClaim {
                entry: self.clone(),
            })
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

    /// The header section every answer about this version replays.
    pub fn replay_headers(&self) -> Arc<HeaderMap> {
        lock(&self.replay).clone()
    }

    /// Replaces the replayed header section (after a revalidation refreshed it).
    pub fn set_replay_headers(&self, headers: HeaderMap) {
        *lock(&self.replay) = Arc::new(headers);
    }

    /// The metadata as `meta.json` holds it now: the stored header section and the freshness
    /// of the last confirmation included.
    pub fn meta_for_disk(&self) -> ObjectMeta {
        let mut meta = self.meta.clone();
        meta.headers = header_section::fields_of_map(&self.replay_headers());
        let validation = *self.validation();
        meta.fresh_for_secs = validation.freshness.to_secs();
        meta.heuristic_fresh_for_secs = validation.freshness.heuristic_secs();
        (
            meta.stale_while_revalidate_secs,
            meta.stale_if_error_secs,
            meta.must_revalidate,
        ) = validation.directives.to_stored();
        meta.confirmed_at_unix = validation
            .at
            .map(|at| crate::cache::store::unix_now().saturating_sub(at.elapsed().as_secs()));
        meta
    }

    /// Creates an entry whose listed slices are already on disk (after a restart). The stored
    /// header fields move out of `meta` into the entry's parsed map.
    pub fn with_present(mut meta: ObjectMeta, present_slices: &[u64]) -> ObjectEntry {
        let fields = std::mem::take(&mut meta.headers);
        // Discovery builds valid fields and recovery rejects invalid ones, so this drops
        // nothing in practice.
        let replay =
            header_section::replay_map(&meta.typed_fields(), &fields).unwrap_or_else(|problem| {
                tracing::warn!(
                    key = meta.key,
                    problem,
                    "stored header section not replayed"
                );
                HeaderMap::new()
            });
        let mut present = SliceSet::new(meta.slice_count());
        let mut stored_bytes = 0;
        for &index in present_slices {
            if present.insert(index) {
                stored_bytes += meta.slice_length(index);
            }
        }
        let freshness = Freshness::from_stored(meta.fresh_for_secs, meta.heuristic_fresh_for_secs);
        let directives = StaleDirectives::from_stored(
            meta.stale_while_revalidate_secs,
            meta.stale_if_error_secs,
            meta.must_revalidate,
        );
        ObjectEntry {
            key: CacheKey::from_text(meta.key.clone()),
            meta,
            pieces: crate::cache::piece_state::PieceState::default(),
            table: Mutex::new(SliceTable {
                present,
                inflight: HashMap::new(),
                claims: Default::default(),
            }),
            stored_bytes: AtomicU64::new(stored_bytes),
            removed: AtomicBool::new(false),
            validated: Mutex::new(Validation {
                at: None,
                freshness,
                directives,
            }),
            revalidation: tokio::sync::Mutex::new(()),
            background_check: AtomicBool::new(false),
            last_used: AtomicU64::new(0),
            replay: Mutex::new(Arc::new(replay)),
        }
    }

    /// Locks the slice table. Hold it only for bookkeeping, never across I/O.
    pub fn table(&self) -> MutexGuard<'_, SliceTable> {
        lock(&self.table)
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
        self.table().present.is_full()
    }

    fn touch(&self) {
        self.last_used
            .store(USE_CLOCK.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
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
    /// The size the drive's filesystem really allows: `max_bytes` until a write fails with
    /// `ENOSPC`, then what the drive held at that moment (until the node restarts).
    effective_max_bytes: AtomicU64,
    /// The part of `used_bytes` that belongs to removed entries whose directories the
    /// background task has not deleted yet.
    removing_bytes: Arc<AtomicU64>,
    /// `storage.slice_size`, for the margin freed below the effective size.
    slice_len: u64,
    /// The background deleter's queue: removed entries with the stored bytes to uncount.
    removals: mpsc::UnboundedSender<(Arc<ObjectEntry>, u64)>,
    /// When the deleter last freed space on the drive.
    last_freed: Arc<Mutex<Option<std::time::Instant>>>,
}

/// What [`Index::disk_full`] did about a full drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskFullOutcome {
    /// The drive's effective size before.
    pub previous_max_bytes: u64,
    /// Its effective size now.
    pub effective_max_bytes: u64,
    /// Objects evicted to make room.
    pub evicted_objects: u64,
    /// Their stored bytes.
    pub evicted_bytes: u64,
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
    /// current tokio runtime. `slice_len` sizes the room freed when a drive turns out full.
    pub fn new(layout: Layout, storage: SharedStorage, slice_len: u64) -> Index {
        let drives = layout
            .drives()
            .map(|drive| {
                DriveIndex::new(drive.max_bytes, layout.clone(), storage.clone(), slice_len)
            })
            .collect();
        Index { drives, layout }
    }

    fn drive(&self, key: &CacheKey) -> &DriveIndex {
        &self.drives[self.layout.drive_of(key)]
    }

    /// Looks up the current version of `key`.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<ObjectEntry>> {
        let entry = self.drive(key).cache.get(key)?;
        entry.touch();
        Some(entry)
    }

    /// Installs a new entry (a new object, or one recovered at start-up).
    pub fn insert(&self, entry: Arc<ObjectEntry>) {
        entry.touch();
        self.drive(&entry.key).insert(entry);
    }

    /// Drops `entry` if it is still the current version of its key (its files are deleted).
    pub fn remove(&self, entry: &Arc<ObjectEntry>) {
        self.drive(&entry.key).remove(entry);
    }

    /// Drops the current version of `key`, if there is one (RFC 9111 §4.4: an unsafe method on
    /// its URL succeeded). Returns whether a version was dropped. A fill still writing it stops
    /// storing, as it does for any removed entry; the next request discovers the content anew.
    pub fn invalidate(&self, key: &CacheKey) -> bool {
        let drive = self.drive(key);
        match drive.cache.get(key) {
            Some(entry) => {
                drive.remove(&entry);
                true
            }
            None => false,
        }
    }

    /// Records that slice `index` of `entry` is now complete on disk and re-weighs the entry,
    /// which may evict others on its drive. Returns false when the entry was removed meanwhile
    /// (the caller deletes the orphan file).
    pub fn mark_slice_stored(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        self.drive(&entry.key).mark_slice_stored(entry, index)
    }

    /// Records that slice `index` of `entry`, which the index had as stored, turned out missing
    /// or damaged on disk: it is no longer served from disk, and the next request fills it
    /// again. Returns false when it was not marked stored (another reader got there first) or
    /// the entry is gone.
    pub fn forget_slice(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        self.drive(&entry.key).forget_slice(entry, index)
    }

    /// Reacts to a write under `path` that failed for lack of space: the drive holding `path`
    /// gets an effective size of what it holds (if that is lower): its stored bytes, plus the
    /// writes still in flight, which may yet land. Its least recently used objects that are not
    /// being filled are then evicted down to a margin below that. A write submitted before the
    /// drive last freed space says nothing about the disk now (an eviction may have made room
    /// since), so it changes nothing. `None` when `path` is on no drive of the store.
    pub fn disk_full(
        &self,
        path: &std::path::Path,
        refused: RefusedWrite,
    ) -> Option<DiskFullOutcome> {
        let drive_position = self.layout.drive_of_path(path)?;
        Some(self.drives[drive_position].disk_full(refused))
    }

    /// A read of slice `index` of `entry`, which the index has as stored, failed with `error`.
    /// When the file is missing, short or damaged (and the entry was not removed meanwhile, which
    /// deletes its files), the slice is forgotten so that it is filled again: a lost slice is a
    /// miss, never a truncated hit. Returns true when the caller should fill it. An error of the
    /// moment (no file descriptor left) forgets nothing: the caller fails the response.
    pub fn slice_lost(
        &self,
        entry: &Arc<ObjectEntry>,
        index: u64,
        error: &DiskError,
        stats: &Stats,
    ) -> bool {
        if entry.is_removed() || !error.is_missing_or_damaged() {
            return false;
        }
        if self.forget_slice(entry, index) {
            stats.slices_lost.inc();
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
    pub fn integrity_failure(&self, entry: &Arc<ObjectEntry>, slice: u64, stats: &Stats) {
        stats.integrity_failures.inc();
        tracing::warn!(
            key = entry.key.as_str(),
            slice,
            "stored slice does not match its piece hashes; the stored version is dropped"
        );
        self.remove(entry);
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

    /// The bound in force: the sum of the drives' effective sizes (see [`Index::disk_full`]).
    pub fn effective_max_bytes(&self) -> u64 {
        self.drives.iter().fold(0u64, |sum, drive| {
            sum.saturating_add(drive.effective_max_bytes.load(Ordering::Relaxed))
        })
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

    /// The objects with slices being filled now, at most `limit` of them (those with the most
    /// still to come first): each one's key, its bytes stored so far and its length. For the
    /// admin's view of fills in flight; walks every entry, so it is for readers at scrape rate.
    pub fn fills_in_progress(&self, limit: usize) -> Vec<FillProgress> {
        let mut fills: Vec<FillProgress> = self
            .drives
            .iter()
            .flat_map(|drive| drive.cache.iter().map(|(_, entry)| entry))
            .filter(|entry| !entry.is_removed() && !entry.table().inflight.is_empty())
            .map(|entry| FillProgress {
                key: entry.key.as_str().to_owned(),
                stored_bytes: entry.stored_bytes(),
                length: entry.meta.length,
            })
            .collect();
        fills.sort_by_key(|fill| std::cmp::Reverse(fill.length.saturating_sub(fill.stored_bytes)));
        fills.truncate(limit);
        fills
    }

    /// How many objects are indexed, on every drive.
    pub fn object_count(&self) -> u64 {
        self.drives.iter().map(DriveIndex::object_count).sum()
    }

    /// What the index holds per group, for `groups` groups: `group_of` names the group of each
    /// object's key (a number below `groups`), or `None` for an object of no group. It walks
    /// every entry (without locking their tables), so it is for readers at scrape rate, not for
    /// requests; recovered objects count as soon as they are indexed.
    pub fn tally_by(
        &self,
        groups: usize,
        mut group_of: impl FnMut(&CacheKey) -> Option<usize>,
    ) -> Vec<StoredTally> {
        let mut tallies = vec![StoredTally::default(); groups];
        for drive in &self.drives {
            for (key, entry) in drive.cache.iter() {
                if entry.is_removed() {
                    continue;
                }
                if let Some(tally) = group_of(&key).and_then(|group| tallies.get_mut(group)) {
                    tally.objects += 1;
                    tally.bytes += entry.stored_bytes();
                }
            }
        }
        tallies
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
                effective_max_bytes: drive.effective_max_bytes.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl DriveIndex {
    fn new(max_bytes: u64, layout: Layout, storage: SharedStorage, slice_len: u64) -> DriveIndex {
        let used_bytes = Arc::new(AtomicU64::new(0));
        let removing_bytes = Arc::new(AtomicU64::new(0));
        let (removal_sender, mut removal_receiver) =
            mpsc::unbounded_channel::<(Arc<ObjectEntry>, u64)>();
        let deleter_used_bytes = used_bytes.clone();
        let deleter_removing_bytes = removing_bytes.clone();
        let last_freed = Arc::new(Mutex::new(None));
        let deleter_last_freed = last_freed.clone();
        tokio::spawn(async move {
            while let Some((entry, stored_bytes)) = removal_receiver.recv().await {
                let directory = layout.generation_dir(&entry.key, entry.meta.generation);
                if let Err(error) = storage.remove_dir_all(directory).await {
                    tracing::warn!(key = entry.key.as_str(), %error, "could not delete evicted object");
                }
                if stored_bytes > 0 {
                    *lock(&deleter_last_freed) = Some(std::time::Instant::now());
                }
                deleter_used_bytes.fetch_sub(stored_bytes, Ordering::Relaxed);
                deleter_removing_bytes.fetch_sub(stored_bytes, Ordering::Relaxed);
            }
        });
        let listener_removing_bytes = removing_bytes.clone();
        let removals = removal_sender.clone();
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
                // Once `removed` is set (under the table lock), the entry's stored bytes no
                // longer change, so this figure is what the deleter will subtract.
                let stored_bytes = {
                    let _table = entry.table();
                    entry.removed.store(true, Ordering::Release);
                    entry.stored_bytes()
                };
                listener_removing_bytes.fetch_add(stored_bytes, Ordering::Relaxed);
                tracing::debug!(
                    key = entry.key.as_str(),
                    ?cause,
                    "object removed from index"
                );
                let _ = removal_sender.send((entry, stored_bytes));
            })
            .build();
        DriveIndex {
            cache,
            used_bytes,
            max_bytes,
            effective_max_bytes: AtomicU64::new(max_bytes),
            removing_bytes,
            slice_len,
            removals,
            last_freed,
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

    /// Puts `entry` again so moka re-weighs it, if it is still the current version.
    fn reweigh(&self, entry: &Arc<ObjectEntry>) {
        let _ = self
            .cache
            .entry(entry.key.clone())
            .and_compute_with(|current| match current {
                Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Put(entry.clone()),
                _ => Op::Nop,
            });
        self.cache.run_pending_tasks();
    }

    fn mark_slice_stored(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        {
            let mut table = entry.table();
            if entry.is_removed() {
                table.inflight.remove(&index);
                // The write landed after the directory was deleted (and recreated it): delete it
                // again, so a purge or eviction in mid-write leaves nothing behind.
                let _ = self.removals.send((entry.clone(), 0));
                return false;
            }
            if table.present.insert(index) {
                let slice_length = entry.meta.slice_length(index);
                entry
                    .stored_bytes
                    .fetch_add(slice_length, Ordering::Relaxed);
                self.used_bytes.fetch_add(slice_length, Ordering::Relaxed);
            }
            table.inflight.remove(&index);
        }
        self.reweigh(entry);
        let effective_max = self.effective_max_bytes.load(Ordering::Relaxed);
        if effective_max < self.max_bytes && self.live_bytes() > effective_max {
            // The object just written is in use: others make room.
            let target = effective_max.saturating_sub(self.margin(effective_max));
            self.shrink_to(target, Some(entry));
        }
        true
    }

    fn forget_slice(&self, entry: &Arc<ObjectEntry>, index: u64) -> bool {
        {
            let mut table = entry.table();
            if entry.is_removed() || !table.present.remove(index) {
                return false;
            }
            let slice_length = entry.meta.slice_length(index);
            entry
                .stored_bytes
                .fetch_sub(slice_length, Ordering::Relaxed);
            self.used_bytes.fetch_sub(slice_length, Ordering::Relaxed);
        }
        self.reweigh(entry);
        true
    }

    /// Stored bytes of the entries still indexed (not counting removed ones awaiting deletion).
    fn live_bytes(&self) -> u64 {
        self.used_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.removing_bytes.load(Ordering::Relaxed))
    }

    /// The room freed below an effective size, so that the fills under way can land without
    /// evicting again at every slice: a sixteenth of it, and at least two slices.
    fn margin(&self, effective_max: u64) -> u64 {
        (effective_max / 16).max(2 * self.slice_len)
    }

    fn disk_full(&self, refused: RefusedWrite) -> DiskFullOutcome {
        let current = self.effective_max_bytes.load(Ordering::Relaxed);
        if lock(&self.last_freed).is_some_and(|freed| freed > refused.submitted) {
            return DiskFullOutcome {
                previous_max_bytes: current,
                effective_max_bytes: current,
                evicted_objects: 0,
                evicted_bytes: 0,
            };
        }
        // Everything counted in `used_bytes` is still on the disk (removed objects included, until
        // their directories are gone), and the disk is full: that, with what the writes in flight
        // may still add, is what the drive holds.
        let used = self.used_bytes.load(Ordering::Relaxed);
        let holds = used.saturating_add(refused.other_pending_bytes);
        let previous = self.effective_max_bytes.fetch_min(holds, Ordering::Relaxed);
        let effective = previous.min(holds);
        // The disk is full now: room is made below what it holds for sure.
        let target = used.min(effective).saturating_sub(self.margin(effective));
        let (evicted_objects, evicted_bytes) = self.shrink_to(target, None);
        DiskFullOutcome {
            previous_max_bytes: previous,
            effective_max_bytes: effective,
            evicted_objects,
            evicted_bytes,
        }
    }

    /// Evicts the least recently used entries that are not being filled (nor `spared`) until
    /// the live bytes are at most `target`. Returns how many objects and bytes went.
    fn shrink_to(&self, target: u64, spared: Option<&Arc<ObjectEntry>>) -> (u64, u64) {
        let mut live = self.live_bytes();
        if live <= target {
            return (0, 0);
        }
        // Collected first, so no table lock is taken inside a moka call.
        let entries: Vec<Arc<ObjectEntry>> = self.cache.iter().map(|(_, entry)| entry).collect();
        let mut candidates: Vec<(u64, Arc<ObjectEntry>)> = entries
            .into_iter()
            .filter(|entry| {
                entry.stored_bytes() > 0
                    && !spared.is_some_and(|spared| Arc::ptr_eq(spared, entry))
                    && entry.table().inflight.is_empty()
            })
            .map(|entry| (entry.last_used.load(Ordering::Relaxed), entry))
            .collect();
        candidates.sort_by_key(|(last_used, _)| *last_used);
        let (mut objects, mut bytes) = (0, 0);
        for (_, entry) in candidates {
            if live <= target {
                break;
            }
            let stored = entry.stored_bytes();
            self.remove(&entry);
            live = live.saturating_sub(stored);
            objects += 1;
            bytes += stored;
        }
        (objects, bytes)
    }

    fn object_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

/// A response's interest in slices being filled: while it lives, the fills of those slices keep
/// going even after the client that started them left. Dropping it withdraws the interest.
/// It is one range per registration, held against the entry weakly.
#[derive(Debug, Default)]
pub struct Demand {
    registrations: Vec<(Weak<ObjectEntry>, u64)>,
}

impl Demand {
    /// Adds interest in slices `first..=last`, and marks them for a prefill when asked. The
    /// caller holds the entry's table lock, so a fill deciding whether to stop sees this demand
    /// or has already released its slices.
    pub(crate) fn register(
        &mut self,
        entry: &Arc<ObjectEntry>,
        table: &mut SliceTable,
        first: u64,
        last: u64,
        prefill: bool,
    ) {
        if prefill {
            let present = &table.present;
            table
                .claims
                .prefills
                .retain(|(from, to)| present.count_in(*from, *to) < to - from + 1);
            if !table.claims.prefills.contains(&(first, last)) {
                table.claims.prefills.push((first, last));
            }
        }
        let id = table.claims.new_id();
        table.claims.demands.insert(id, (first, last));
        self.registrations.push((Arc::downgrade(entry), id));
    }

    /// Takes over `other`'s interest.
    pub fn merge(&mut self, mut other: Demand) {
        self.registrations.append(&mut other.registrations);
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        for (entry, id) in self.registrations.drain(..) {
            if let Some(entry) = entry.upgrade() {
                entry.table().claims.demands.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::time::Instant;

    #[test]
    fn a_slice_set_merges_and_splits_runs() {
        let mut set = SliceSet::new(10);
        assert_eq!(set.get(10), None, "beyond the object");
        assert!(!set.insert(10));
        for index in [3, 5, 4, 0, 9] {
            assert!(set.insert(index));
        }
        assert!(!set.insert(4), "already stored");
        assert_eq!(set.runs().collect::<Vec<_>>(), vec![0..1, 3..6, 9..10]);
        assert_eq!(set.len(), 5);
        assert_eq!(set.count_in(2, 4), 2);
        assert_eq!(set.count_in(0, 9), 5);
        assert_eq!(set.count_in(6, 8), 0);
        assert!(set.remove(4));
        assert!(!set.remove(4));
        assert_eq!(
            set.runs().collect::<Vec<_>>(),
            vec![0..1, 3..4, 5..6, 9..10]
        );
        assert_eq!(set.get(4), Some(false));
        assert_eq!(set.get(5), Some(true));
        assert!(!set.is_full());
    }

    #[test]
    fn a_slice_set_for_an_enormous_declared_length_costs_only_its_runs() {
        // 2^60 bytes in 64 KiB slices: a Vec<bool> would need 16 TiB.
        let mut set = SliceSet::new(1 << 44);
        assert!(set.insert(0));
        assert!(set.insert((1 << 44) - 1));
        assert_eq!(set.count_in(0, (1 << 44) - 1), 2);
        assert!(!set.is_full());
        let mut full = SliceSet::new(3);
        (0..3).for_each(|index| assert!(full.insert(index)));
        assert!(full.is_full());
        assert_eq!(full.runs().count(), 1);
    }

    proptest! {
        #[test]
        fn a_slice_set_behaves_like_a_set_of_indexes(
            operations in proptest::collection::vec((any::<bool>(), 0u64..40), 0..200),
            first in 0u64..45,
            span in 0u64..45,
        ) {
            let mut set = SliceSet::new(40);
            let mut model = BTreeSet::new();
            for (insert, index) in operations {
                if insert {
                    prop_assert_eq!(set.insert(index), model.insert(index));
                } else {
                    prop_assert_eq!(set.remove(index), model.remove(&index));
                }
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            for index in 0..40 {
                prop_assert_eq!(set.contains(index), model.contains(&index));
            }
            let last = first + span;
            prop_assert_eq!(
                set.count_in(first, last),
                model.range(first..=last).count() as u64
            );
            // Runs are disjoint and never adjacent: the representation is canonical.
            let runs: Vec<_> = set.runs().collect();
            for pair in runs.windows(2) {
                prop_assert!(pair[0].end < pair[1].start);
            }
        }
    }

    fn entry(layout: &Layout, name: &str, slices: u64) -> Arc<ObjectEntry> {
        let key = CacheKey::new("h.example", name);
        let meta = ObjectMeta::for_tests(key.as_str(), slices * 1024, 1024);
        std::fs::create_dir_all(layout.generation_dir(&key, 1)).unwrap();
        let present: Vec<u64> = (0..slices).collect();
        Arc::new(ObjectEntry::with_present(meta, &present))
    }

    /// A write refused now, with no other write in flight.
    fn refused_now() -> RefusedWrite {
        RefusedWrite {
            submitted: Instant::now(),
            other_pending_bytes: 0,
        }
    }

    /// An index of slices of 1 KiB on one unbounded drive in `dir`.
    fn index_in(dir: &std::path::Path) -> (Layout, Index) {
        let layout = Layout::create(dir).unwrap();
        let storage: SharedStorage = Arc::new(crate::disk::portable::PortableStorage::new());
        (layout.clone(), Index::new(layout, storage, 1024))
    }

    #[tokio::test]
    async fn a_full_disk_lowers_the_effective_size_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, index) = index_in(dir.path());
        let objects: Vec<_> = (0..4)
            .map(|number| entry(&layout, &format!("/{number}"), 8))
            .collect();
        for object in &objects {
            index.insert(object.clone());
        }
        // Object 0 was used last; object 3 is being filled.
        index.get(&objects[0].key).unwrap();
        objects[3]
            .table()
            .inflight
            .insert(8, Arc::new(SliceBuffer::new(1)));
        assert_eq!(index.effective_max_bytes(), u64::MAX);

        let failed_write = layout.slice_path(&objects[3].key, 1, 0);
        let outcome = index.disk_full(&failed_write, refused_now()).unwrap();
        // 32 KiB stored: the margin is 2 slices (a sixteenth is less), so one 8 KiB object goes,
        // the least recently used one that is not being filled: object 1.
        assert_eq!(outcome.effective_max_bytes, 32 * 1024);
        assert_eq!(
            (outcome.evicted_objects, outcome.evicted_bytes),
            (1, 8 * 1024)
        );
        assert!(objects[1].is_removed());
        assert!(!objects[0].is_removed() && !objects[3].is_removed());
        assert_eq!(index.effective_max_bytes(), 32 * 1024);
        assert_eq!(index.drive_usage()[0].effective_max_bytes, 32 * 1024);

        // A second failure before the deletion landed lowers nothing and evicts nothing more.
        let submitted_before_the_deletion = Instant::now();
        let again = index.disk_full(&failed_write, refused_now()).unwrap();
        assert_eq!(again.effective_max_bytes, 32 * 1024);
        assert_eq!(again.evicted_objects, 0);
        let deleted = async {
            while index.used_bytes() > 24 * 1024 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), deleted)
            .await
            .expect("the evicted object is deleted");
        // Nor does a write submitted before the space was freed, whenever it reports.
        let stale = index
            .disk_full(
                &failed_write,
                RefusedWrite {
                    submitted: submitted_before_the_deletion,
                    other_pending_bytes: 0,
                },
            )
            .unwrap();
        assert_eq!(
            (stale.effective_max_bytes, stale.evicted_objects),
            (32 * 1024, 0)
        );
        // A write refused after that means the disk holds less than thought: object 2, the
        // least recently used of those not being filled, goes.
        let fresh = index.disk_full(&failed_write, refused_now()).unwrap();
        assert_eq!(fresh.effective_max_bytes, 24 * 1024);
        assert_eq!(fresh.evicted_objects, 1);
        assert!(objects[2].is_removed());
        assert!(index
            .disk_full(std::path::Path::new("/elsewhere"), refused_now())
            .is_none());
    }

    #[tokio::test]
    async fn writes_still_in_flight_count_as_held_when_the_disk_refuses_one() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, index) = index_in(dir.path());
        let filling = entry(&layout, "/filling", 4);
        index.insert(filling.clone());
        filling
            .table()
            .inflight
            .insert(4, Arc::new(SliceBuffer::new(1)));
        // Three more KiB were submitted before the refused write and may still land.
        let refused = RefusedWrite {
            submitted: Instant::now(),
            other_pending_bytes: 3 * 1024,
        };
        let outcome = index
            .disk_full(&layout.slice_path(&filling.key, 1, 5), refused)
            .unwrap();
        assert_eq!(outcome.effective_max_bytes, 7 * 1024);
        assert_eq!(outcome.evicted_objects, 0, "an object being filled stays");
        // The earlier writes land: still within the effective size, nothing is evicted.
        for index_of_slice in [0, 1, 2] {
            assert!(index.forget_slice(&filling, index_of_slice));
        }
        assert!(index.mark_slice_stored(&filling, 0));
        assert!(!filling.is_removed());
    }

    #[tokio::test]
    async fn below_a_lowered_size_each_stored_slice_makes_room_from_other_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, index) = index_in(dir.path());
        let old = entry(&layout, "/old", 4);
        let new = entry(&layout, "/new", 4);
        index.insert(old.clone());
        index.insert(new.clone());
        assert!(index.forget_slice(&new, 3));
        // /old was used last, so /new is the least recently used one.
        index.get(&old.key).unwrap();
        // Both are being filled when the disk refuses a write at 7 KiB: nothing can go yet.
        let buffer = Arc::new(SliceBuffer::new(1));
        old.table().inflight.insert(4, buffer.clone());
        new.table().inflight.insert(3, buffer);
        let outcome = index
            .disk_full(&layout.slice_path(&new.key, 1, 3), refused_now())
            .unwrap();
        assert_eq!(
            (outcome.effective_max_bytes, outcome.evicted_objects),
            (7 * 1024, 0)
        );
        old.table().inflight.clear();
        // /new's slice lands after all, past the effective size: /old makes room, not /new,
        // which is in use.
        assert!(index.mark_slice_stored(&new, 3));
        assert!(old.is_removed());
        assert!(!new.is_removed());
        assert!(new.is_complete());
    }

    #[tokio::test]
    async fn a_forgotten_slice_is_no_longer_stored_nor_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, index) = index_in(dir.path());
        let object = entry(&layout, "/lost", 4);
        index.insert(object.clone());
        assert!(object.is_complete());
        assert!(index.forget_slice(&object, 2));
        assert!(!index.forget_slice(&object, 2), "only once");
        assert!(!object.is_complete());
        assert_eq!(object.stored_bytes(), 3 * 1024);
        assert_eq!(index.used_bytes(), 3 * 1024);
        assert!(index.mark_slice_stored(&object, 2));
        assert!(object.is_complete());
        assert_eq!(index.used_bytes(), 4 * 1024);
    }
}
