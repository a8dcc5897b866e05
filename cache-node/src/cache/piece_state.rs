//! The piece hashes of one cached object version while they are known only in memory: recorded
//! as fills hash their slices, taken for writing once complete, and marked on disk after. Part of
//! the entry's state, kept in its index entry.

use outpost_shared::sync::lock;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use crate::cache::piece_file::{piece_count, PieceHash};
use crate::cache::store::ObjectMeta;

/// Hashes of a run of pieces, with their piece length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HashesOf {
    pub(crate) piece_len: u64,
    pub(crate) hashes: Vec<PieceHash>,
}

/// The piece hashes of one object version while they are being collected.
#[derive(Debug, Default)]
pub(crate) struct PieceInner {
    /// The piece length of `hashes` (0 until the first record).
    pub(crate) piece_len: u64,
    /// How many pieces of `piece_len` the object has.
    pub(crate) piece_count: u64,
    /// The hashes known so far, by piece index, while collecting; empty once persisted.
    pub(crate) hashes: BTreeMap<u64, PieceHash>,
    /// The piece length of a complete `pieces.sha256` on disk, if there is one.
    pub(crate) on_disk: Option<u64>,
    /// True while a task writes `pieces.sha256`, so only one does.
    pub(crate) writing: bool,
}

/// The piece hashes of one `ObjectEntry`, with a signal for waiters.
#[derive(Debug)]
pub struct PieceState {
    inner: Mutex<PieceInner>,
    changed: watch::Sender<()>,
    /// True while the stored slices have not been compared with the `pieces.sha256` found at
    /// start-up (see [`PieceState::require_check`]).
    pub(crate) unchecked: AtomicBool,
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
    pub(crate) fn lock(&self) -> MutexGuard<'_, PieceInner> {
        lock(&self.inner)
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
    pub(crate) fn known(&self, piece_len: u64) -> BTreeMap<u64, PieceHash> {
        let inner = self.lock();
        if inner.piece_len == piece_len {
            inner.hashes.clone()
        } else {
            BTreeMap::new()
        }
    }

    /// The in-memory hashes of pieces `pieces` when all of them are known, with their piece
    /// length.
    pub(crate) fn known_range(
        &self,
        pieces: impl Fn(u64) -> std::ops::Range<u64>,
    ) -> Option<HashesOf> {
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
    pub(crate) fn take_for_write(&self, piece_len: u64) -> Option<Vec<PieceHash>> {
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
    pub(crate) fn write_failed(&self) {
        self.lock().writing = false;
    }
}
