//! Piece hashes: the SHA-256 of every piece of a stored object, which the node vouches for in
//! the piece manifests it serves to peer-clients (the role Delivery Optimization's cloud metadata
//! plays).
//!
//! - **Geometry.** A piece is `min(peering.piece_size, storage.slice_size)` bytes (both are powers
//!   of two, so pieces tile slices exactly and a piece never spans two slices); the last piece of an
//!   object may be short.
//! - **Hashing during fills.** When a fill completes a slice buffer (its bytes passed the fill's
//!   validation), the fill layer hashes the slice's pieces off the worker thread and records them
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
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::index::{Index, ObjectEntry};
use crate::cache::piece_file::{
    decode_file, encode_file, file_len, hash_chunks, piece_count, piece_len, PieceHash,
    FILE_HEADER_LEN,
};
use crate::cache::piece_state::{HashesOf, Recorded};
use crate::cache::store::{Layout, ObjectMeta};
use crate::disk::pool::BufferPool;
use crate::disk::SharedStorage;
use crate::error::DiskError;
use crate::stats::Stats;

/// What piece hashing needs of the store, and nothing more: where files are, the disk, the
/// index (to forget lost slices and drop damaged versions), read buffers and counters.
#[derive(Clone, Copy)]
pub struct PieceStore<'a> {
    /// The object index.
    pub index: &'a Index,
    /// The disk backend.
    pub storage: &'a SharedStorage,
    /// On-disk paths.
    pub layout: &'a Layout,
    /// Reusable buffers for reads of stored slices.
    pub read_buffers: &'a BufferPool,
    /// Counters.
    pub stats: &'a Stats,
    /// `storage.fsync`.
    pub fsync: bool,
}

/// Hashes slice `index` of `entry` (whose bytes are `chunks`) and records the result; persists the
/// hashes when they are complete. Called by fills for every completed slice buffer.
pub async fn record_slice(
    store: &PieceStore<'_>,
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
        persist(store, entry, piece_len, &all).await;
    }
}

async fn persist(
    store: &PieceStore<'_>,
    entry: &ObjectEntry,
    piece_len: u64,
    hashes: &[PieceHash],
) {
    if entry.is_removed() {
        return;
    }
    let path = store.layout.pieces_path(&entry.key, entry.meta.generation);
    let bytes = Bytes::from(encode_file(piece_len, hashes));
    match store
        .storage
        .write_file_atomic(path, vec![bytes], store.fsync)
        .await
    {
        Ok(()) => entry.pieces.mark_on_disk(piece_len),
        Err(error) => {
            store.stats.disk_write_errors.inc();
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
    store: &PieceStore<'_>,
    entry: &Arc<ObjectEntry>,
    configured_piece_len: u64,
) -> Result<Vec<PieceHash>, CollectError> {
    let piece_len = piece_len(configured_piece_len, entry.meta.slice_len);
    let hashes = match read_hash_file(store, entry, piece_len).await {
        Some(hashes) => hashes,
        None => collect_from_slices(store, entry, piece_len).await?,
    };
    if entry.pieces.needs_check() {
        check_stored_slices(store, entry, piece_len, &hashes).await?;
    }
    Ok(hashes)
}

/// The hashes of `pieces.sha256`, when it is on disk for `piece_len` and reads back whole.
async fn read_hash_file(
    store: &PieceStore<'_>,
    entry: &ObjectEntry,
    piece_len: u64,
) -> Option<Vec<PieceHash>> {
    let meta = &entry.meta;
    if entry.pieces.on_disk() != Some(piece_len) {
        return None;
    }
    let path = store.layout.pieces_path(&entry.key, meta.generation);
    let length = file_len(meta.length, piece_len);
    let read = store.storage.read_at(path, 0, length, Vec::new()).await;
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
    store: &PieceStore<'_>,
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
        let bytes = match read_whole_slice(store, entry, slice, Vec::new()).await {
            Ok(bytes) => bytes,
            Err(error) => return Err(slice_unreadable(store, entry, slice, error)),
        };
        let slice_hashes = hash_chunks(vec![Bytes::from(bytes)], piece_len).await;
        let first_piece = slice * pieces_per_slice;
        known.extend((first_piece..).zip(slice_hashes.iter().copied()));
        let recorded = entry
            .pieces
            .record(meta, piece_len, first_piece, &slice_hashes);
        if let Recorded::Complete(all) = recorded {
            persist(store, entry, piece_len, &all).await;
        }
    }
    if let Some(all) = entry.pieces.take_for_write(piece_len) {
        persist(store, entry, piece_len, &all).await;
    }
    Ok(known.into_values().collect())
}

/// Reads stored slice `slice` of `entry` whole into `buffer`.
async fn read_whole_slice(
    store: &PieceStore<'_>,
    entry: &ObjectEntry,
    slice: u64,
    buffer: Vec<u8>,
) -> Result<Vec<u8>, DiskError> {
    let meta = &entry.meta;
    let path = store.layout.slice_path(&entry.key, meta.generation, slice);
    let length = meta.slice_length(slice) as usize;
    store.storage.read_at(path, 0, length, buffer).await
}

/// What a failed read of a slice the index has as stored means for a manifest: a slice found
/// missing or short is forgotten (the manifest's fill stores it again), anything else is a disk
/// error.
fn slice_unreadable(
    store: &PieceStore<'_>,
    entry: &Arc<ObjectEntry>,
    slice: u64,
    error: DiskError,
) -> CollectError {
    if store.index.slice_lost(entry, slice, &error, store.stats) {
        CollectError::NotYet { missing_slices: 1 }
    } else {
        CollectError::Disk(error)
    }
}

/// Compares every stored slice of a version found at start-up with its hashes, once.
async fn check_stored_slices(
    store: &PieceStore<'_>,
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
        let bytes = match read_whole_slice(store, entry, slice, Vec::new()).await {
            Ok(bytes) => Bytes::from(bytes),
            Err(error) => return Err(slice_unreadable(store, entry, slice, error)),
        };
        store.stats.slices_verified.inc();
        if hash_chunks(vec![bytes], piece_len).await != expected {
            store.index.integrity_failure(entry, slice, store.stats);
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
async fn slice_hashes(store: &PieceStore<'_>, entry: &ObjectEntry, slice: u64) -> Option<HashesOf> {
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
    let path = store.layout.pieces_path(&entry.key, meta.generation);
    let bytes = store
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
/// known, so it cannot be checked. A mismatch drops the version (see [`Index::integrity_failure`]).
pub async fn verify_slice(
    store: &PieceStore<'_>,
    entry: &Arc<ObjectEntry>,
    slice: u64,
) -> Result<Option<Bytes>, VerifyError> {
    let Some(expected) = slice_hashes(store, entry, slice).await else {
        return Ok(None);
    };
    let read = read_whole_slice(store, entry, slice, store.read_buffers.take()).await?;
    let bytes = store.read_buffers.into_bytes(read);
    store.stats.slices_verified.inc();
    if hash_chunks(vec![bytes.clone()], expected.piece_len).await != expected.hashes {
        store.index.integrity_failure(entry, slice, store.stats);
        return Err(VerifyError::Mismatch { slice });
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::piece_file::hash_pieces;
    use crate::cache::piece_state::PieceState;
    use sha2::{Digest, Sha256};

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
