//! The piece scheduler: which piece a source fetches next.
//!
//! Pure bookkeeping, no I/O, so every rule is tested directly:
//!
//! - **In order.** A source with a free connection takes the lowest missing piece, so the file
//!   fills front to back and disk writes stay mostly sequential. A download with peers starts
//!   at a random piece and wraps around ([`Scheduler::start_at`]), so a swarm that starts
//!   together does not ask the cache for the same pieces at the same time.
//! - **Peers' pieces to peers.** A cache host or the origin first takes the lowest missing
//!   piece that no usable peer holds, leaving the others to the peers (a light form of
//!   BitTorrent's rarest first); when every missing piece is held by a peer it takes any.
//! - **Feedback** (as aria2's feedback URI selector): the engine offers pieces to sources fastest
//!   first, and near the end a source much slower than the fastest one is refused a piece the
//!   fastest would finish sooner. Faster sources come back for work sooner, so they get more.
//! - **Endgame.** When nothing is missing, an idle source duplicates the in-flight piece that has
//!   run longest, if it is at least as fast as the piece's holder (or the holder is overdue). The
//!   first copy to arrive wins; the engine cancels the other.
//! - **Resume within a piece.** A transfer cut short leaves the bytes it received as the piece's
//!   prefix; the next attempt, from any source, asks only for the rest (`Range` from the cut).
//! - **Repair.** After a whole-file hash mismatch, every piece that did not come entirely from the
//!   origin is marked missing again.

use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::net::http::SourceKind;
use crate::sources::source::{SourceId, SourceTable};

/// How much slower than the fastest source a source may be and still take one of the last
/// pieces.
const SLOW_SOURCE_FACTOR: f64 = 4.0;

/// A piece is overdue when it has run this many times longer than its holder's rate predicts.
const OVERDUE_FACTOR: f64 = 2.0;

/// The least time a piece must have run before another connection of the same source duplicates
/// it.
const SAME_SOURCE_RESCUE_AFTER: Duration = Duration::from_secs(1);

/// The state of one piece.
#[derive(Debug, Clone)]
enum PieceState {
    /// Not held by anyone. `prefix` holds the bytes an interrupted attempt got.
    Missing { prefix: Prefix },
    /// Being fetched by one or two attempts.
    InFlight {
        holders: Vec<Holder>,
        prefix: Prefix,
    },
    /// Fetched, being written.
    Writing { from: Provenance },
    /// On disk.
    Done { from: Provenance },
}

/// Bytes of a piece already received, and whether they all came from the origin.
#[derive(Debug, Clone, Default)]
struct Prefix {
    data: Bytes,
    all_from_origin: bool,
}

/// Identifies one attempt at a piece (a source may hold two attempts at the same piece).
pub type AttemptId = u64;

/// One attempt at a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    attempt: AttemptId,
    source: SourceId,
    started: Instant,
}

/// Where a completed piece's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provenance {
    /// The source that completed it.
    pub kind: SourceKind,
    /// True when every byte came from the origin (a repair need not refetch it).
    pub all_from_origin: bool,
}

/// A piece handed to a source.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The attempt, for [`Scheduler::complete`] and [`Scheduler::release`].
    pub attempt: AttemptId,
    /// The piece.
    pub index: u64,
    /// The bytes still to fetch (the piece minus its prefix).
    pub range: Range<u64>,
    /// Bytes of the piece already received by an earlier attempt.
    pub prefix: Bytes,
    /// True when another attempt holds the same piece (endgame).
    pub duplicate: bool,
}

/// What became of a fetched piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// This attempt won: write the piece. The other attempts at it should be cancelled.
    Won {
        /// The attempts to cancel.
        cancel: Vec<AttemptId>,
    },
    /// Another attempt already delivered it: discard.
    Lost,
}

/// Pieces of one download.
#[derive(Debug, Clone)]
pub struct Scheduler {
    file_len: u64,
    piece_len: u64,
    pieces: Vec<PieceState>,
    /// Per piece, the sources that sent a copy failing its hash check; they are not asked for
    /// it again.
    bad_sources: Vec<Vec<SourceId>>,
    next_attempt: AttemptId,
    /// The piece the in-order search starts from (and wraps around to).
    first_piece: usize,
}

impl Scheduler {
    /// A scheduler for `file_len` bytes in pieces of `piece_len`; `done` marks pieces already on
    /// disk (from a resume), others start missing.
    pub fn new(file_len: u64, piece_len: u64, done: &[bool]) -> Scheduler {
        let piece_count = file_len.div_ceil(piece_len) as usize;
        let pieces: Vec<PieceState> = (0..piece_count)
            .map(|index| {
                if done.get(index).copied().unwrap_or(false) {
                    PieceState::Done {
                        // Provenance is not persisted: a resumed piece counts as not from the
                        // origin, so a repair refetches it, which is the safe side.
                        from: Provenance {
                            kind: SourceKind::CacheHost,
                            all_from_origin: false,
                        },
                    }
                } else {
                    PieceState::Missing {
                        prefix: Prefix::default(),
                    }
                }
            })
            .collect();
        Scheduler {
            file_len,
            piece_len,
            bad_sources: vec![Vec::new(); pieces.len()],
            pieces,
            next_attempt: 0,
            first_piece: 0,
        }
    }

    /// Makes the in-order search start at piece `index` (modulo the piece count) and wrap.
    pub fn start_at(&mut self, index: u64) {
        self.first_piece = if self.pieces.is_empty() {
            0
        } else {
            (index % self.pieces.len() as u64) as usize
        };
    }

    /// The file length.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The piece size.
    pub fn piece_len(&self) -> u64 {
        self.piece_len
    }

    /// How many pieces.
    pub fn piece_count(&self) -> u64 {
        self.pieces.len() as u64
    }

    /// The byte range of piece `index`.
    pub fn piece_range(&self, index: u64) -> Range<u64> {
        let start = index * self.piece_len;
        start..(start + self.piece_len).min(self.file_len)
    }

    /// True when every piece is on disk.
    pub fn is_complete(&self) -> bool {
        self.pieces
            .iter()
            .all(|piece| matches!(piece, PieceState::Done { .. }))
    }

    /// Which pieces are on disk (for the resume state).
    pub fn done_map(&self) -> Vec<bool> {
        self.pieces
            .iter()
            .map(|piece| matches!(piece, PieceState::Done { .. }))
            .collect()
    }

    /// Bytes on disk.
    pub fn done_bytes(&self) -> u64 {
        (0..self.piece_count())
            .filter(|&index| matches!(self.pieces[index as usize], PieceState::Done { .. }))
            .map(|index| self.piece_range(index).end - self.piece_range(index).start)
            .sum()
    }

    /// Pieces nobody holds.
    pub fn missing_count(&self) -> usize {
        self.pieces
            .iter()
            .filter(|piece| matches!(piece, PieceState::Missing { .. }))
            .count()
    }

    /// The next piece for `source`, or `None` when it should stay idle. The caller has checked
    /// that the source is eligible and has a free connection.
    pub fn next_for(
        &mut self,
        source: SourceId,
        sources: &SourceTable,
        now: Instant,
    ) -> Option<Claim> {
        let count = self.pieces.len();
        let order = (self.first_piece..count).chain(0..self.first_piece);
        let askable = |index: usize| {
            matches!(self.pieces[index], PieceState::Missing { .. })
                && !self.bad_sources[index].contains(&source)
                && sources.get(source).holds(index as u64)
        };
        let usable_peers: Vec<SourceId> = if sources.get(source).source.kind() == SourceKind::Peer {
            Vec::new()
        } else {
            sources
                .peers()
                .into_iter()
                .filter(|&peer| !sources.get(peer).retired)
                .collect()
        };
        let held_by_a_peer = |index: usize| {
            usable_peers
                .iter()
                .any(|&peer| sources.get(peer).holds(index as u64))
        };
        let missing = order
            .clone()
            .find(|&index| askable(index) && !held_by_a_peer(index))
            .or_else(|| order.clone().find(|&index| askable(index)));
        match missing {
            Some(index) => {
                if self.leave_for_a_faster_source(source, sources) {
                    return None;
                }
                Some(self.claim(index as u64, source, now, false))
            }
            None => {
                let index = self.endgame_candidate(source, sources, now)?;
                Some(self.claim(index, source, now, true))
            }
        }
    }

    /// Near the end, a much slower source leaves the last pieces to the fastest one.
    fn leave_for_a_faster_source(&self, source: SourceId, sources: &SourceTable) -> bool {
        let Some(my_rate) = sources.get(source).stats.rate_per_connection else {
            return false;
        };
        let fastest = sources
            .slots
            .iter()
            .enumerate()
            .filter(|(id, slot)| *id != source && slot.in_flight > 0)
            .filter_map(|(_, slot)| Some((slot.stats.rate_per_connection?, slot.max_connections)))
            .max_by(|left, right| left.0.total_cmp(&right.0));
        match fastest {
            Some((fastest_rate, fastest_connections)) => {
                my_rate * SLOW_SOURCE_FACTOR < fastest_rate
                    && self.missing_count() <= fastest_connections
            }
            None => false,
        }
    }

    /// The in-flight piece `source` should duplicate, if any: the one running longest among
    /// those with a single holder, when `source` is at least as fast as that holder or the
    /// holder is overdue.
    fn endgame_candidate(
        &self,
        source: SourceId,
        sources: &SourceTable,
        now: Instant,
    ) -> Option<u64> {
        let my_rate = sources.get(source).stats.rate_per_connection;
        self.pieces
            .iter()
            .enumerate()
            .filter_map(|(index, piece)| match piece {
                PieceState::InFlight { holders, .. }
                    if holders.len() == 1
                        && !self.bad_sources[index].contains(&source)
                        && sources.get(source).holds(index as u64) =>
                {
                    Some((index, holders[0]))
                }
                _ => None,
            })
            .filter(|(index, holder)| {
                let holder_rate = sources.get(holder.source).stats.rate_per_connection;
                let piece_bytes = {
                    let range = self.piece_range(*index as u64);
                    (range.end - range.start) as f64
                };
                let overdue = holder_rate.is_some_and(|rate| {
                    now.saturating_duration_since(holder.started).as_secs_f64()
                        > OVERDUE_FACTOR * piece_bytes / rate
                });
                let at_least_as_fast = match (my_rate, holder_rate) {
                    (Some(mine), Some(theirs)) => mine >= theirs,
                    _ => false,
                };
                if holder.source == source {
                    // Another connection to the same source only rescues a connection that is
                    // stuck, not one that is merely a little behind.
                    overdue
                        && now.saturating_duration_since(holder.started) >= SAME_SOURCE_RESCUE_AFTER
                } else {
                    overdue || at_least_as_fast
                }
            })
            .min_by_key(|(_, holder)| holder.started)
            .map(|(index, _)| index as u64)
    }

    /// Hands piece `index` (missing or in flight) to `source` directly: the probe's answer is the
    /// first piece before the scheduler existed.
    pub fn claim_piece(&mut self, index: u64, source: SourceId, now: Instant) -> Claim {
        let duplicate = matches!(self.pieces[index as usize], PieceState::InFlight { .. });
        self.claim(index, source, now, duplicate)
    }

    fn claim(&mut self, index: u64, source: SourceId, now: Instant, duplicate: bool) -> Claim {
        self.next_attempt += 1;
        let holder = Holder {
            attempt: self.next_attempt,
            source,
            started: now,
        };
        let piece = &mut self.pieces[index as usize];
        let prefix = match std::mem::replace(
            piece,
            PieceState::Done {
                from: Provenance {
                    kind: SourceKind::Origin,
                    all_from_origin: true,
                },
            },
        ) {
            PieceState::Missing { prefix } => {
                *piece = PieceState::InFlight {
                    holders: vec![holder],
                    prefix: prefix.clone(),
                };
                prefix
            }
            PieceState::InFlight {
                mut holders,
                prefix,
            } => {
                holders.push(holder);
                *piece = PieceState::InFlight {
                    holders,
                    prefix: prefix.clone(),
                };
                prefix
            }
            other => unreachable!("claimed a piece that is {other:?}"),
        };
        let range = self.piece_range(index);
        Claim {
            attempt: holder.attempt,
            index,
            range: range.start + prefix.data.len() as u64..range.end,
            prefix: prefix.data,
            duplicate,
        }
    }

    /// Records that `attempt` delivered piece `index` completely from a source of `kind`.
    pub fn complete(&mut self, index: u64, attempt: AttemptId, kind: SourceKind) -> Completion {
        let piece = &mut self.pieces[index as usize];
        let PieceState::InFlight { holders, prefix } = piece else {
            return Completion::Lost;
        };
        if !holders.iter().any(|holder| holder.attempt == attempt) {
            return Completion::Lost;
        }
        let all_from_origin =
            kind == SourceKind::Origin && (prefix.data.is_empty() || prefix.all_from_origin);
        let cancel = holders
            .iter()
            .filter(|holder| holder.attempt != attempt)
            .map(|holder| holder.attempt)
            .collect();
        *piece = PieceState::Writing {
            from: Provenance {
                kind,
                all_from_origin,
            },
        };
        Completion::Won { cancel }
    }

    /// Records that `attempt` at piece `index` (from a source of `kind`) failed (or was cancelled) after
    /// receiving `received` (the claim's prefix plus what arrived, all valid). The piece goes
    /// back to missing unless another attempt still holds it; the longest prefix is kept.
    pub fn release(&mut self, index: u64, attempt: AttemptId, kind: SourceKind, received: Bytes) {
        let piece = &mut self.pieces[index as usize];
        let PieceState::InFlight { holders, prefix } = piece else {
            return;
        };
        let Some(position) = holders.iter().position(|holder| holder.attempt == attempt) else {
            return;
        };
        holders.remove(position);
        if received.len() > prefix.data.len() {
            let all_from_origin =
                kind == SourceKind::Origin && (prefix.data.is_empty() || prefix.all_from_origin);
            *prefix = Prefix {
                data: received,
                all_from_origin,
            };
        }
        if holders.is_empty() {
            let prefix = std::mem::take(prefix);
            *piece = PieceState::Missing { prefix };
        }
    }

    /// Forgets the bytes kept for piece `index` (they failed its hash check, so any of them may be
    /// the bad ones).
    pub fn drop_prefix(&mut self, index: u64) {
        match &mut self.pieces[index as usize] {
            PieceState::Missing { prefix } | PieceState::InFlight { prefix, .. } => {
                *prefix = Prefix::default()
            }
            _ => {}
        }
    }

    /// Records that `source` sent a copy of piece `index` that failed its hash check: its prefix
    /// is dropped (any of its bytes may be the bad ones) and `source` is not asked for it again.
    pub fn reject_copy(&mut self, index: u64, source: SourceId) {
        self.drop_prefix(index);
        let bad = &mut self.bad_sources[index as usize];
        if !bad.contains(&source) {
            bad.push(source);
        }
    }

    /// A missing piece that no source in `sources` may be asked for any more, if there is one.
    pub fn piece_refused_by_all(&self, sources: &[SourceId]) -> Option<u64> {
        self.pieces
            .iter()
            .zip(&self.bad_sources)
            .position(|(piece, bad)| {
                matches!(piece, PieceState::Missing { .. })
                    && sources.iter().all(|source| bad.contains(source))
            })
            .map(|index| index as u64)
    }

    /// Records that piece `index` is on disk.
    pub fn written(&mut self, index: u64) {
        let piece = &mut self.pieces[index as usize];
        if let PieceState::Writing { from } = *piece {
            *piece = PieceState::Done { from };
        }
    }

    /// Records that writing piece `index` failed: it is missing again.
    pub fn write_failed(&mut self, index: u64) {
        self.pieces[index as usize] = PieceState::Missing {
            prefix: Prefix::default(),
        };
    }

    /// Marks missing every done piece with a byte that did not come from the origin; returns how
    /// many.
    pub fn reset_pieces_not_from_origin(&mut self) -> usize {
        let mut reset = 0;
        for piece in &mut self.pieces {
            if let PieceState::Done { from } = piece {
                if !from.all_from_origin {
                    *piece = PieceState::Missing {
                        prefix: Prefix::default(),
                    };
                    reset += 1;
                }
            }
        }
        reset
    }

    /// Joins a claim's prefix and the fetched rest into the whole piece.
    pub fn assemble(prefix: Bytes, rest: Bytes) -> Bytes {
        if prefix.is_empty() {
            return rest;
        }
        let mut whole = BytesMut::with_capacity(prefix.len() + rest.len());
        whole.extend_from_slice(&prefix);
        whole.extend_from_slice(&rest);
        whole.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::source::{Source, SourceSlot};

    const MIB: u64 = 1 << 20;

    fn table(rates: &[Option<f64>]) -> SourceTable {
        let url: http::Uri = "http://origin.example/f".parse().unwrap();
        SourceTable {
            slots: rates
                .iter()
                .map(|rate| {
                    let mut slot = SourceSlot::new(Source::Origin { url: url.clone() }, 2);
                    slot.stats.rate_per_connection = *rate;
                    slot
                })
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pieces_go_out_in_order_and_cover_the_file() {
        let mut scheduler = Scheduler::new(2 * MIB + 5, MIB, &[]);
        let sources = table(&[None]);
        let now = Instant::now();
        let claims: Vec<Claim> = (0..3)
            .map(|_| scheduler.next_for(0, &sources, now).unwrap())
            .collect();
        let ranges: Vec<Range<u64>> = claims.iter().map(|claim| claim.range.clone()).collect();
        assert_eq!(ranges, [0..MIB, MIB..2 * MIB, 2 * MIB..2 * MIB + 5]);
        assert!(claims.iter().all(|claim| !claim.duplicate));
        for claim in &claims {
            assert_eq!(
                scheduler.complete(claim.index, claim.attempt, SourceKind::Origin),
                Completion::Won { cancel: vec![] }
            );
            scheduler.written(claim.index);
        }
        assert!(scheduler.is_complete());
        assert_eq!(scheduler.done_bytes(), 2 * MIB + 5);
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_pieces_are_skipped() {
        let mut scheduler = Scheduler::new(3 * MIB, MIB, &[true, false, true]);
        let sources = table(&[None]);
        let claim = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        assert_eq!(claim.index, 1);
        assert_eq!(scheduler.done_bytes(), 2 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_transfer_resumes_from_where_it_stopped_on_another_source() {
        let mut scheduler = Scheduler::new(MIB, MIB, &[]);
        let sources = table(&[None, None]);
        let first = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        scheduler.release(
            first.index,
            first.attempt,
            SourceKind::CacheHost,
            Bytes::from(vec![7; 1000]),
        );
        let second = scheduler.next_for(1, &sources, Instant::now()).unwrap();
        assert_eq!(second.range, 1000..MIB);
        assert_eq!(second.prefix.len(), 1000);
        scheduler.complete(second.index, second.attempt, SourceKind::Origin);
        scheduler.written(second.index);
        // Part of the piece came from the cache, so a repair refetches it.
        assert_eq!(scheduler.reset_pieces_not_from_origin(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_endgame_duplicates_the_oldest_piece_to_a_faster_source_and_the_first_copy_wins() {
        let mut scheduler = Scheduler::new(2 * MIB, MIB, &[]);
        // Source 0 is slow (1 MiB/s per connection), source 1 fast.
        let mut sources = table(&[Some(MIB as f64), Some(10.0 * MIB as f64)]);
        let start = Instant::now();
        let first = scheduler.next_for(0, &sources, start).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        let second = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        sources.get_mut(0).in_flight = 2;
        assert_eq!((first.index, second.index), (0, 1));
        // Nothing is missing: the fast source duplicates the piece that has run longest.
        let duplicate = scheduler.next_for(1, &sources, Instant::now()).unwrap();
        assert!(duplicate.duplicate);
        assert_eq!(duplicate.index, 0);
        // Each piece has at most two holders, and the slow source does not duplicate its own
        // pieces before they are overdue.
        let another = scheduler.next_for(1, &sources, Instant::now()).unwrap();
        assert_eq!(another.index, 1);
        assert!(scheduler.next_for(1, &sources, Instant::now()).is_none());
        assert!(scheduler.next_for(0, &sources, Instant::now()).is_none());
        assert_eq!(
            scheduler.complete(0, duplicate.attempt, SourceKind::Origin),
            Completion::Won {
                cancel: vec![first.attempt]
            }
        );
        assert_eq!(
            scheduler.complete(0, first.attempt, SourceKind::Origin),
            Completion::Lost
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_source_does_not_duplicate_a_faster_one_unless_it_is_overdue() {
        let mut scheduler = Scheduler::new(MIB, MIB, &[]);
        let sources = table(&[Some(MIB as f64), Some(10.0 * MIB as f64)]);
        scheduler.next_for(1, &sources, Instant::now()).unwrap();
        assert!(scheduler.next_for(0, &sources, Instant::now()).is_none());
        // The fast source should need 0.1 s; after 0.3 s the piece is overdue.
        tokio::time::advance(Duration::from_millis(300)).await;
        let rescue = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        assert!(rescue.duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn a_much_slower_source_leaves_the_last_pieces_to_the_fastest() {
        let mut scheduler = Scheduler::new(3 * MIB, MIB, &[]);
        let mut sources = table(&[Some(MIB as f64), Some(100.0 * MIB as f64)]);
        scheduler.next_for(1, &sources, Instant::now()).unwrap();
        sources.get_mut(1).in_flight = 1;
        // Two pieces are missing and the fast source has two connections: the slow one waits.
        assert!(scheduler.next_for(0, &sources, Instant::now()).is_none());
        // With more work than the fast source can hold, the slow one helps.
        let mut bigger = Scheduler::new(10 * MIB, MIB, &[]);
        bigger.next_for(1, &sources, Instant::now()).unwrap();
        assert!(bigger.next_for(0, &sources, Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_sent_a_bad_copy_is_not_asked_for_that_piece_again() {
        let mut scheduler = Scheduler::new(2 * MIB, MIB, &[]);
        let sources = table(&[None, None]);
        let claim = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        scheduler.release(
            claim.index,
            claim.attempt,
            SourceKind::CacheHost,
            Bytes::from_static(b"xy"),
        );
        scheduler.reject_copy(claim.index, 0);
        assert_eq!(
            scheduler
                .next_for(0, &sources, Instant::now())
                .unwrap()
                .index,
            1
        );
        assert!(scheduler.next_for(0, &sources, Instant::now()).is_none());
        assert_eq!(scheduler.piece_refused_by_all(&[0]), Some(0));
        assert_eq!(scheduler.piece_refused_by_all(&[0, 1]), None);
        let retry = scheduler.next_for(1, &sources, Instant::now()).unwrap();
        assert_eq!(
            (retry.index, retry.range),
            (0, 0..MIB),
            "the suspect prefix was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_makes_the_piece_missing_again() {
        let mut scheduler = Scheduler::new(MIB, MIB, &[]);
        let sources = table(&[None]);
        let claim = scheduler.next_for(0, &sources, Instant::now()).unwrap();
        scheduler.complete(claim.index, claim.attempt, SourceKind::CacheHost);
        scheduler.write_failed(claim.index);
        assert_eq!(scheduler.missing_count(), 1);
        assert_eq!(
            Scheduler::assemble(Bytes::from_static(b"ab"), Bytes::from_static(b"cd")),
            "abcd"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_is_only_asked_for_pieces_it_holds() {
        let mut sources = table(&[None, None]);
        sources.get_mut(0).holdings = Some(vec![false, true, false, true]);
        let mut scheduler = Scheduler::new(400, 100, &[]);
        let now = Instant::now();
        let first = scheduler.next_for(0, &sources, now).unwrap();
        assert_eq!(first.index, 1);
        let second = scheduler.next_for(0, &sources, now).unwrap();
        assert_eq!(second.index, 3);
        assert!(scheduler
            .next_for(0, &sources, now)
            .is_none_or(|claim| claim.duplicate));
        assert_eq!(scheduler.next_for(1, &sources, now).unwrap().index, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_leaves_pieces_peers_hold_to_them_and_the_search_wraps() {
        let url: http::Uri = "http://peer.example/content/x".parse().unwrap();
        let mut sources = table(&[None]);
        let mut peer = SourceSlot::new(
            Source::Peer {
                address: "127.0.0.2:7680".parse().unwrap(),
                url,
            },
            2,
        );
        peer.holdings = Some(vec![true, true, false, false]);
        sources.slots.push(peer);
        let mut scheduler = Scheduler::new(400, 100, &[]);
        scheduler.start_at(5);
        let now = Instant::now();
        // The origin (source 0) starts at piece 1 (5 mod 4) but skips what the peer holds.
        assert_eq!(scheduler.next_for(0, &sources, now).unwrap().index, 2);
        assert_eq!(scheduler.next_for(0, &sources, now).unwrap().index, 3);
        // Then it takes pieces the peer holds, from the start point on.
        assert_eq!(scheduler.next_for(0, &sources, now).unwrap().index, 1);
        assert_eq!(scheduler.next_for(1, &sources, now).unwrap().index, 0);
    }
}
