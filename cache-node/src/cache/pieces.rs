//! Piece hashes: the SHA-256 of every piece of a stored object, which the node vouches for in
//! the piece manifests it serves to peer-clients (the role Delivery Optimization's cloud metadata
//! plays).
//!
//! - **Geometry.** A piece is `min(peering.piece_size, storage.slice_size)` bytes (both are powers
//!   of two, so pieces tile slices exactly and a piece never spans two slices); the last piece of an
//!   object may be short.
//! - **Hashing during fills.** When a fill completes a slice buffer (its bytes passed the fill's
//!   validation), [`crate::fill`] hashes the slice's pieces off the worker thread and records them
//!   here *before* the slice is written, so a stored slice always has its hashes in memory or on
//!   disk, and a slice that could not be written (full disk) still has them.
//! - **Persistence.** Once every piece of a version is known, the hashes are written through the
//!   [`crate::disk::Storage`] trait, atomically, as `pieces.sha256` in the version's generation
//!   directory, and dropped from memory. A new version lives in a new generation directory, so its
//!   hashes start empty and the old file goes with the old directory.
//! - **Fallback.** Slices stored before hashing existed, with peering off, or in a run that
//!   crashed before the file landed are hashed from disk when a manifest needs them.
//! - **Memory.** Hashes wait in memory in a map keyed by piece, so a version costs what its
//!   filled pieces cost, never what its declared length would.
//! - **Checking reads.** The hashes are also the node's check on its own disk: a sampled share
//!   of the slices read for hits (`storage.verify_hits`) is read whole and compared before any
//!   byte of it is sent ([`verify_slice`]), and before a version found at start-up backs its
//!   first manifest, every stored slice is compared with its `pieces.sha256`. A mismatch drops
//!   the version (counted in `integrity_failures`); it is fetched again.
//!
//! **Invariant:** a piece hash is computed only from bytes that passed fill validation: a
//! complete slice buffer, or a slice file of the object's current generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::cache::index::ObjectEntry;
use crate::cache::store::ObjectMeta;
use crate::error::DiskError;
use crate::node::Node;

/// A SHA-256 digest.
pub type PieceHash = [u8; 32];

/// The header of `pieces.sha256`: the piece length as a little-endian u64, then one 32-byte
/// digest per piece in order.
const FILE_HEADER_LEN: usize = 8;

/// The piece length used for objects stored with slices of `slice_len` bytes.
pub fn piece_len(configured_piece_len: u64, slice_len: u64) -> u64 {
    configured_piece_len.min(slice_len)
}

/// How many pieces an object of `length` bytes has.
pub fn piece_count(length: u64, piece_len: u64) -> u64 {
    length.div_ceil(piece_len)
}

/// Hashes consecutive pieces of `piece_len` bytes of the bytes in `chunks` (the last may be
/// short). Runs on the blocking pool: hashing a MiB takes about a millisecond, which a worker
/// serving hits should not spend.
pub async fn hash_chunks(chunks: Vec<Bytes>, piece_len: u64) -> Vec<PieceHash> {
    let hashing = tokio::task::spawn_blocking(move || hash_pieces(&chunks, piece_len));
    match hashing.await {
        Ok(hashes) => hashes,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The synchronous core of [`hash_chunks`].
pub fn hash_pieces(chunks: &[Bytes], piece_len: u64) -> Vec<PieceHash> {
    let mut hashes = Vec::new();
    let mut hasher = Sha256::new();
    let mut in_piece = 0u64;
    for chunk in chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let take = ((piece_len - in_piece) as usize).min(rest.len());
            hasher.update(&rest[..take]);
            rest = &rest[take..];
            in_piece += take as u64;
            if in_piece == piece_len {
                hashes.push(hasher.finalize_reset().into());
                in_piece = 0;
            }
        }
    }
    if in_piece > 0 {
        hashes.push(hasher.finalize().into());
    }
    hashes
}

/// Encodes the `pieces.sha256` file.
pub fn encode_file(piece_len: u64, hashes: &[PieceHash]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FILE_HEADER_LEN + hashes.len() * 32);
    bytes.extend_from_slice(&piece_len.to_le_bytes());
    for hash in hashes {
        bytes.extend_from_slice(hash);
    }
    bytes
}

/// The length of the `pieces.sha256` file of an object of `length` bytes.
pub fn file_len(length: u64, piece_len: u64) -> usize {
    FILE_HEADER_LEN + piece_count(length, piece_len) as usize * 32
}

/// Decodes a `pieces.sha256` file, which must be for `piece_len` and hold exactly the pieces of
/// an object of `length` bytes.
pub fn decode_file(bytes: &[u8], length: u64, piece_len: u64) -> Option<Vec<PieceHash>> {
    if bytes.len() != file_len(length, piece_len) {
        return None;
    }
    let (header, digests) = bytes.split_at(FILE_HEADER_LEN);
    if u64::from_le_bytes(header.try_into().ok()?) != piece_len {
        return None;
    }
    Some(
        digests
            .chunks_exact(32)
            .map(|digest| digest.try_into().expect("chunks of 32"))
            .collect(),
    )
}

/// The piece hashes of one object version while they are being collected.
#[derive(Debug, Default)]
struct PieceInner {
    /// The piece length of `hashes` (0 until the first record).
    piece_len: u64,
    /// How many pieces of `piece_len` the object has.
    piece_count: u64,
    /// The hashes known so far, by piece index, while collecting; empty once persisted.
    hashes: BTreeMap<u64, PieceHash>,
    /// The piece length of a complete `pieces.sha256` on disk, if there is one.
    on_disk: Option<u64>,
    /// True while a task writes `pieces.sha256`, so only one does.
    writing: bool,
}

/// The piece hashes of one [`ObjectEntry`], with a signal for waiters.
#[derive(Debug)]
pub struct PieceState {
    inner: Mutex<PieceInner>,
    changed: watch::Sender<()>,
    /// True while the stored slices have not been compared with the `pieces.sha256` found at
    /// start-up (see [`PieceState::require_check`]).
    unchecked: AtomicBool,
}

impl Default for PieceState {
    fn default() -> Self {
        PieceState {
            inner: Mutex::new(PieceInner::default()),
            changed: watch::channel(()).0,
            unchecked: AtomicBool::new(false),
        }
    }
}

/// What a caller gets from [`PieceState::record`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a complete set must be persisted by the caller"]
pub enum Recorded {
    /// Some pieces are still unknown.
    Partial,
    /// Every piece is known now; the caller should persist them.
    Complete(Vec<PieceHash>),
    /// Nothing to do (the hashes are already on disk, or being written).
    Nothing,
}

impl PieceState {
    fn lock(&self) -> MutexGuard<'_, PieceInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes that a complete `pieces.sha256` for `piece_len` is on disk (found at start-up, or
    /// just written), and frees the in-memory copy.
    pub fn mark_on_disk(&self, piece_len: u64) {
        {
            let mut inner = self.lock();
            inner.on_disk = Some(piece_len);
            inner.hashes = BTreeMap::new();
            inner.writing = false;
        }
        self.changed.send_replace(());
    }

    /// Asks for every stored slice to be compared with the hashes before they back a manifest:
    /// for a version found on disk at start-up, whose files may have changed while the node was
    /// down.
    pub fn require_check(&self) {
        self.unchecked.store(true, Ordering::Relaxed);
    }

    /// True until the check [`PieceState::require_check`] asked for has passed.
    pub fn needs_check(&self) -> bool {
        self.unchecked.load(Ordering::Relaxed)
    }

    /// The piece length of the hashes on disk, if they are there.
    pub fn on_disk(&self) -> Option<u64> {
        self.lock().on_disk
    }

    /// A receiver that wakes whenever hashes are recorded.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Records the hashes of consecutive pieces starting at `first_piece`.
    pub fn record(
        &self,
        meta: &ObjectMeta,
        piece_len: u64,
        first_piece: u64,
        hashes: &[PieceHash],
    ) -> Recorded {
        let recorded = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            if inner.on_disk == Some(piece_len) || inner.writing {
                Recorded::Nothing
            } else {
                if inner.piece_len != piece_len {
                    inner.piece_len = piece_len;
                    inner.piece_count = piece_count(meta.length, piece_len);
                    inner.hashes = BTreeMap::new();
                }
                for (offset, hash) in (first_piece..).zip(hashes) {
                    if offset < inner.piece_count {
                        inner.hashes.insert(offset, *hash);
                    }
                }
                if inner.hashes.len() as u64 == inner.piece_count {
                    inner.writing = true;
                    Recorded::Complete(inner.hashes.values().copied().collect())
                } else {
                    Recorded::Partial
                }
            }
        };
        self.changed.send_replace(());
        recorded
    }

    /// The hashes known in memory, by piece, if they are for `piece_len`.
    fn known(&self, piece_len: u64) -> BTreeMap<u64, PieceHash> {
        let inner = self.lock();
        if inner.piece_len == piece_len {
            inner.hashes.clone()
        } else {
            BTreeMap::new()
        }
    }

    /// The in-memory hashes of pieces `pieces` when all of them are known, with their piece
    /// length.
    fn known_range(&self, pieces: impl Fn(u64) -> std::ops::Range<u64>) -> Option<HashesOf> {
        let inner = self.lock();
        if inner.piece_len == 0 {
            return None;
        }
        let wanted = pieces(inner.piece_len);
        let hashes: Vec<PieceHash> = inner
            .hashes
            .range(wanted.clone())
            .map(|(_, hash)| *hash)
            .collect();
        (hashes.len() as u64 == wanted.end - wanted.start).then_some(HashesOf {
            piece_len: inner.piece_len,
            hashes,
        })
    }

    /// Every hash for `piece_len`, when all are known in memory and no copy is on disk or being
    /// written; the caller must then write them.
    fn take_for_write(&self, piece_len: u64) -> Option<Vec<PieceHash>> {
        let mut inner = self.lock();
        let ready = inner.piece_len == piece_len
            && inner.piece_count > 0
            && inner.hashes.len() as u64 == inner.piece_count
            && inner.on_disk != Some(piece_len)
            && !inner.writing;
        if !ready {
            return None;
        }
        inner.writing = true;
        Some(inner.hashes.values().copied().collect())
    }

    /// Gives up a write that failed, so a later record or manifest tries again.
    fn write_failed(&self) {
        self.lock().writing = false;
    }
}

/// Hashes slice `index` of `entry` (whose bytes are `chunks`) and records the result; persists the
/// hashes when they are complete. Called by fills for every completed slice buffer.
pub async fn record_slice(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    configured_piece_len: u64,
    index: u64,
    chunks: Vec<Bytes>,
) {
    let piece_len = piece_len(configured_piece_len, entry.meta.slice_len);
    let hashes = hash_chunks(chunks, piece_len).await;
    let first_piece = index * (entry.meta.slice_len / piece_len);
    if let Recorded::Complete(all) =
        entry
            .pieces
            .record(&entry.meta, piece_len, first_piece, &hashes)
    {
        persist(node, entry, piece_len, &all).await;
    }
}

async fn persist(node: &Node, entry: &ObjectEntry, piece_len: u64, hashes: &[PieceHash]) {
    if entry.is_removed() {
        return;
    }
    let path = node.layout.pieces_path(&entry.key, entry.meta.generation);
    let bytes = Bytes::from(encode_file(piece_len, hashes));
    match node
        .storage
        .write_file_atomic(path, vec![bytes], node.fsync)
        .await
    {
        Ok(()) => entry.pieces.mark_on_disk(piece_len),
        Err(error) => {
            node.stats.disk_write_errors.inc();
            tracing::warn!(key = entry.key.as_str(), %error, "could not store piece hashes");
            entry.pieces.write_failed();
        }
    }
}

/// Why [`collect`] could not return every hash.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// Some pieces are neither hashed nor stored yet: the fill is still running (or failed and
    /// must be started again, as it must for a stored slice found missing on disk).
    #[error("{missing_slices} slices are not stored yet")]
    NotYet {
        /// How many slices lack hashes.
        missing_slices: u64,
    },
    /// A stored slice or the hash file could not be read.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A stored slice does not match its hashes: the version was dropped.
    #[error(
        "stored slice {slice} does not match its piece hashes; the stored version was dropped"
    )]
    Integrity {
        /// The slice that failed.
        slice: u64,
    },
}

/// Some consecutive piece hashes and their piece length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HashesOf {
    piece_len: u64,
    hashes: Vec<PieceHash>,
}

/// The pieces of `slice` when pieces are `piece_len` long: `first..end` piece indexes.
fn pieces_of_slice(meta: &ObjectMeta, slice: u64, piece_len: u64) -> std::ops::Range<u64> {
    let pieces_per_slice = meta.slice_len / piece_len;
    let first = slice * pieces_per_slice;
    first..(first + pieces_per_slice).min(piece_count(meta.length, piece_len))
}

/// Every piece hash of `entry`: from `pieces.sha256` when it is on disk, else from memory, hashing
/// stored slices whose hashes are unknown from disk. Writes the file when it completes the set.
/// A version found at start-up has its stored slices compared with the hashes first.
///
/// Nothing is sized from the declared length before every slice is known to be hashed or
/// stored, so a manifest request for a partly stored object costs what is stored.
pub async fn collect(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    configured_piece_len: u64,
) -> Result<Vec<PieceHash>, CollectError> {
    let piece_len = piece_len(configured_piece_len, entry.meta.slice_len);
    let hashes = match read_hash_file(node, entry, piece_len).await {
        Some(hashes) => hashes,
        None => collect_from_slices(node, entry, piece_len).await?,
    };
    if entry.pieces.needs_check() {
        check_stored_slices(node, entry, piece_len, &hashes).await?;
    }
    Ok(hashes)
}

/// The hashes of `pieces.sha256`, when it is on disk for `piece_len` and reads back whole.
async fn read_hash_file(
    node: &Node,
    entry: &ObjectEntry,
    piece_len: u64,
) -> Option<Vec<PieceHash>> {
    let meta = &entry.meta;
    if entry.pieces.on_disk() != Some(piece_len) {
        return None;
    }
    let path = node.layout.pieces_path(&entry.key, meta.generation);
    let length = file_len(meta.length, piece_len);
    let read = node.storage.read_at(path, 0, length, Vec::new()).await;
    let decoded = read
        .ok()
        .and_then(|bytes| decode_file(&bytes, meta.length, piece_len));
    if decoded.is_none() {
        tracing::warn!(
            key = entry.key.as_str(),
            "piece hash file unreadable; hashing the stored slices again"
        );
        entry.pieces.write_failed();
        entry.pieces.lock().on_disk = None;
    }
    decoded
}

/// Every hash from memory and, for slices whose hashes are unknown, from the stored slices.
async fn collect_from_slices(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    piece_len: u64,
) -> Result<Vec<PieceHash>, CollectError> {
    let meta = &entry.meta;
    let mut known = entry.pieces.known(piece_len);
    // Slices whose every piece is known; the others must be stored, to be hashed from disk.
    let mut known_per_slice: BTreeMap<u64, u64> = BTreeMap::new();
    let pieces_per_slice = meta.slice_len / piece_len;
    for piece in known.keys() {
        *known_per_slice.entry(piece / pieces_per_slice).or_default() += 1;
    }
    let hashed_slices = known_per_slice
        .iter()
        .filter(|(slice, count)| {
            let pieces = pieces_of_slice(meta, **slice, piece_len);
            **count == pieces.end - pieces.start
        })
        .count() as u64;
    let stored_unhashed: Vec<u64> = {
        let table = entry.table();
        table
            .present
            .runs()
            .flatten()
            .filter(|slice| {
                let pieces = pieces_of_slice(meta, *slice, piece_len);
                known_per_slice.get(slice).copied() != Some(pieces.end - pieces.start)
            })
            .collect()
    };
    let covered = hashed_slices + stored_unhashed.len() as u64;
    if covered < meta.slice_count() {
        return Err(CollectError::NotYet {
            missing_slices: meta.slice_count() - covered,
        });
    }
    for slice in stored_unhashed {
        let bytes = match read_whole_slice(node, entry, slice, Vec::new()).await {
            Ok(bytes) => bytes,
            Err(error) => return Err(slice_unreadable(node, entry, slice, error)),
        };
        let slice_hashes = hash_chunks(vec![Bytes::from(bytes)], piece_len).await;
        let first_piece = slice * pieces_per_slice;
        known.extend((first_piece..).zip(slice_hashes.iter().copied()));
        let recorded = entry
            .pieces
            .record(meta, piece_len, first_piece, &slice_hashes);
        if let Recorded::Complete(all) = recorded {
            persist(node, entry, piece_len, &all).await;
        }
    }
    if let Some(all) = entry.pieces.take_for_write(piece_len) {
        persist(node, entry, piece_len, &all).await;
    }
    Ok(known.into_values().collect())
}

/// Reads stored slice `slice` of `entry` whole into `buffer`.
async fn read_whole_slice(
    node: &Node,
    entry: &ObjectEntry,
    slice: u64,
    buffer: Vec<u8>,
) -> Result<Vec<u8>, DiskError> {
    let meta = &entry.meta;
    let path = node.layout.slice_path(&entry.key, meta.generation, slice);
    let length = meta.slice_length(slice) as usize;
    node.storage.read_at(path, 0, length, buffer).await
}

/// What a failed read of a slice the index has as stored means for a manifest: a slice found
/// missing or short is forgotten (the manifest's fill stores it again), anything else is a disk
/// error.
fn slice_unreadable(
    node: &Node,
    entry: &Arc<ObjectEntry>,
    slice: u64,
    error: DiskError,
) -> CollectError {
    if node.slice_lost(entry, slice, &error) {
        CollectError::NotYet { missing_slices: 1 }
    } else {
        CollectError::Disk(error)
    }
}

/// Compares every stored slice of a version found at start-up with its hashes, once.
async fn check_stored_slices(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    piece_len: u64,
    hashes: &[PieceHash],
) -> Result<(), CollectError> {
    let meta = &entry.meta;
    let stored: Vec<u64> = entry.table().present.runs().flatten().collect();
    for slice in stored {
        let pieces = pieces_of_slice(meta, slice, piece_len);
        let Some(expected) = hashes.get(pieces.start as usize..pieces.end as usize) else {
            return Err(CollectError::NotYet { missing_slices: 1 });
        };
        let bytes = match read_whole_slice(node, entry, slice, Vec::new()).await {
            Ok(bytes) => Bytes::from(bytes),
            Err(error) => return Err(slice_unreadable(node, entry, slice, error)),
        };
        node.stats.slices_verified.inc();
        if hash_chunks(vec![bytes], piece_len).await != expected {
            node.integrity_failure(entry, slice);
            return Err(CollectError::Integrity { slice });
        }
    }
    entry.pieces.unchecked.store(false, Ordering::Relaxed);
    Ok(())
}

/// Why [`verify_slice`] refused a stored slice.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The slice could not be read whole.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// Its bytes do not match its piece hashes; the version has been dropped.
    #[error(
        "stored slice {slice} does not match its piece hashes; the stored version was dropped"
    )]
    Mismatch {
        /// The slice that failed.
        slice: u64,
    },
}

/// The known hashes of the pieces of `slice`: from memory when all are there, else from
/// `pieces.sha256` (one positional read of just those digests). `None` when they are not known.
async fn slice_hashes(node: &Node, entry: &ObjectEntry, slice: u64) -> Option<HashesOf> {
    let meta = &entry.meta;
    if let Some(known) = entry
        .pieces
        .known_range(|piece_len| pieces_of_slice(meta, slice, piece_len))
    {
        return Some(known);
    }
    let piece_len = entry.pieces.on_disk()?;
    let pieces = pieces_of_slice(meta, slice, piece_len);
    let count = (pieces.end - pieces.start) as usize;
    let offset = FILE_HEADER_LEN as u64 + pieces.start * 32;
    let path = node.layout.pieces_path(&entry.key, meta.generation);
    let bytes = node
        .storage
        .read_at(path, offset, count * 32, Vec::new())
        .await
        .ok()?;
    let hashes = bytes
        .chunks_exact(32)
        .map(|digest| digest.try_into().expect("chunks of 32"))
        .collect();
    Some(HashesOf { piece_len, hashes })
}

/// Reads stored slice `slice` of `entry` whole and compares it with its piece hashes before any
/// of it is served. `Ok(Some(bytes))`: the slice, verified. `Ok(None)`: its hashes are not
/// known, so it cannot be checked. A mismatch drops the version (see [`Node::integrity_failure`]).
pub async fn verify_slice(
    node: &Node,
    entry: &Arc<ObjectEntry>,
    slice: u64,
) -> Result<Option<Bytes>, VerifyError> {
    let Some(expected) = slice_hashes(node, entry, slice).await else {
        return Ok(None);
    };
    let read = read_whole_slice(node, entry, slice, node.read_buffers.take()).await?;
    let bytes = node.read_buffers.into_bytes(read);
    node.stats.slices_verified.inc();
    if hash_chunks(vec![bytes.clone()], expected.piece_len).await != expected.hashes {
        node.integrity_failure(entry, slice);
        return Err(VerifyError::Mismatch { slice });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(length: u64, slice_len: u64) -> ObjectMeta {
        ObjectMeta::for_tests("h/x", length, slice_len)
    }

    fn sha(bytes: &[u8]) -> PieceHash {
        Sha256::digest(bytes).into()
    }

    #[test]
    fn pieces_never_span_slices() {
        assert_eq!(piece_len(1 << 20, 64 << 10), 64 << 10);
        assert_eq!(piece_len(1 << 20, 1 << 20), 1 << 20);
        assert_eq!(piece_len(1 << 20, 4 << 20), 1 << 20);
        assert_eq!(piece_count(0, 4), 0);
        assert_eq!(piece_count(9, 4), 3);
    }

    #[test]
    fn hashes_do_not_depend_on_how_the_bytes_were_chunked() {
        let content: Vec<u8> = (0..23u8).collect();
        let expected: Vec<PieceHash> = content.chunks(5).map(sha).collect();
        for cuts in [
            vec![23],
            vec![1, 22],
            vec![5, 5, 5, 5, 3],
            vec![7, 9, 7],
            vec![4, 6, 13],
        ] {
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(Bytes::copy_from_slice(&content[start..start + cut]));
                start += cut;
            }
            assert_eq!(hash_pieces(&chunks, 5), expected);
        }
        assert!(hash_pieces(&[], 5).is_empty());
    }

    #[test]
    fn the_hash_file_round_trips_and_refuses_the_wrong_geometry() {
        let hashes = vec![sha(b"a"), sha(b"b"), sha(b"c")];
        let file = encode_file(4, &hashes);
        assert_eq!(file.len(), file_len(10, 4));
        assert_eq!(decode_file(&file, 10, 4), Some(hashes));
        assert_eq!(decode_file(&file, 10, 8), None, "another piece length");
        assert_eq!(decode_file(&file, 20, 4), None, "another object length");
        assert_eq!(
            decode_file(&file[..file.len() - 1], 10, 4),
            None,
            "truncated"
        );
    }

    #[test]
    fn the_set_completes_once_and_only_then_asks_for_a_write() {
        let state = PieceState::default();
        let object = meta(10, 4); // pieces of 2: 5 pieces, slices of 4: 3 slices
        let hashes: Vec<PieceHash> = (0..5u8).map(|n| sha(&[n])).collect();
        assert_eq!(
            state.record(&object, 2, 2, &hashes[2..4]),
            Recorded::Partial
        );
        assert_eq!(state.record(&object, 2, 4, &hashes[4..]), Recorded::Partial);
        // Recording a slice twice (a refill after a lost write) does not count it twice.
        assert_eq!(state.record(&object, 2, 4, &hashes[4..]), Recorded::Partial);
        assert_eq!(
            state.record(&object, 2, 0, &hashes[..2]),
            Recorded::Complete(hashes.clone())
        );
        // The write is under way: later records ask for nothing.
        assert_eq!(state.record(&object, 2, 0, &hashes[..2]), Recorded::Nothing);
        state.mark_on_disk(2);
        assert_eq!(state.on_disk(), Some(2));
        assert!(state.known(2).is_empty(), "persisted hashes leave memory");
    }

    #[test]
    fn hashes_of_an_enormous_declared_length_cost_only_the_pieces_recorded() {
        let state = PieceState::default();
        // 2^60 bytes in pieces of 64 KiB: one slot per piece would need 2^44 of them.
        let object = meta(1 << 60, 64 << 10);
        let hashes = [sha(b"first")];
        assert_eq!(
            state.record(&object, 64 << 10, 0, &hashes),
            Recorded::Partial
        );
        assert_eq!(state.known(64 << 10).len(), 1);
        let of_first = state.known_range(|_| 0..1).unwrap();
        assert_eq!(of_first.hashes, hashes);
        assert!(state.known_range(|_| 0..2).is_none(), "not all known");
        assert!(state.take_for_write(64 << 10).is_none());
    }
}
