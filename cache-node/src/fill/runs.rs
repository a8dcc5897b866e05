//! Runs: grouping a response's missing slices into runs of adjacent slices, reserving them in
//! the entry's slice table, and starting one fill per run.

use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;

pub use crate::cache::fill_limits::{FillRefused, Pace, Requester};
pub use crate::cache::index::Demand;
use crate::cache::index::{ObjectEntry, SliceTable};
pub use crate::cache::slice_buffer::SliceBuffer;
use crate::cache::store::ObjectMeta;
use crate::error::OriginError;
use crate::node::Node;
use crate::upstream::router::Route;
use outpost_shared::rate::ByteMeter;

/// How many slices a fill claims (gives a [`SliceBuffer`]) ahead of the byte it is reading.
/// The rest of its run is only reserved, as one range, so what a fill holds follows what is
/// in flight, never the length an origin declares.
pub(super) const CLAIM_WINDOW_SLICES: u64 = 64;

/// The slices one fill fetches: `first..=last`. It claims (gives a buffer to) the slices it is
/// about to fill, at most [`CLAIM_WINDOW_SLICES`] ahead, and reserves the rest in the table.
#[derive(Debug)]
pub(super) struct Run {
    pub(super) id: u64,
    pub(super) first: u64,
    pub(super) last: u64,
    /// The claimed slices not finished yet.
    pub(super) owned: BTreeMap<u64, Arc<SliceBuffer>>,
    /// The bandwidth cap of the request that started it (a prefill job), with this run's
    /// carry below one cell.
    pub(super) pace: Option<(Pace, ByteMeter)>,
}

impl Run {
    /// Reserves the slices overlapping absolute bytes `start..end` for a new fill and claims the
    /// first window of them. `None` for an empty range.
    pub(super) fn claim(
        table: &mut SliceTable,
        meta: &ObjectMeta,
        start: u64,
        end: u64,
    ) -> Option<Run> {
        if start >= end {
            return None;
        }
        let first = start / meta.slice_len;
        let last = (end - 1) / meta.slice_len;
        let id = table.claims.new_id();
        table.claims.reserved.push((id, first, last));
        let mut run = Run {
            id,
            first,
            last,
            owned: BTreeMap::new(),
            pace: None,
        };
        run.claim_ahead(table, meta, first);
        Some(run)
    }

    /// Also reserves slices `first..=last`, which come before the run (an origin that ignored
    /// the range sends them too), unless another fill has reserved some of them.
    pub(super) fn reserve_before(
        &mut self,
        table: &mut SliceTable,
        meta: &ObjectMeta,
        first: u64,
        last: u64,
    ) {
        let taken = table
            .claims
            .reserved
            .iter()
            .any(|(_, next, to)| *next <= last && *to >= first);
        if first > last || taken {
            return;
        }
        table.claims.reserved.push((self.id, first, last));
        self.claim_ahead(table, meta, first);
    }

    /// Claims the reserved slices up to [`CLAIM_WINDOW_SLICES`] from slice `index` on. A slice
    /// stored or claimed by someone else meanwhile is skipped; one a reader made a planned
    /// buffer for is taken over.
    pub(super) fn claim_ahead(&mut self, table: &mut SliceTable, meta: &ObjectMeta, index: u64) {
        let upto = index.saturating_add(CLAIM_WINDOW_SLICES - 1);
        let mut position = 0;
        while position < table.claims.reserved.len() {
            let (id, mut next, last) = table.claims.reserved[position];
            if id != self.id {
                position += 1;
                continue;
            }
            while next <= last.min(upto) {
                if !is_stored(table, next) {
                    match table.inflight.get(&next) {
                        Some(buffer) if buffer.planned_by == Some(self.id) => {
                            self.owned.insert(next, buffer.clone());
                        }
                        Some(_) => {}
                        None => {
                            let buffer = Arc::new(SliceBuffer::new(meta.slice_length(next)));
                            table.inflight.insert(next, buffer.clone());
                            self.owned.insert(next, buffer);
                        }
                    }
                }
                next += 1;
            }
            if next > last {
                table.claims.reserved.swap_remove(position);
            } else {
                table.claims.reserved[position].1 = next;
                position += 1;
            }
        }
    }

    /// Ends the run: fails its unfinished slices (and the buffers readers made for its reserved
    /// ones), releases their claims, and drops its reservations.
    pub(super) fn end(&mut self, table: &mut SliceTable, error: OriginError) {
        for (index, buffer) in std::mem::take(&mut self.owned) {
            buffer.fail(error.clone());
            release_claim(table, index, &buffer);
        }
        let id = self.id;
        table.inflight.retain(|_, buffer| {
            if buffer.planned_by == Some(id) {
                buffer.fail(error.clone());
                false
            } else {
                true
            }
        });
        table.claims.reserved.retain(|(run, _, _)| *run != id);
    }
}

/// If slice `index` is reserved by a fill that has not claimed it yet, gives it a planned buffer
/// that readers wait on and that fill takes over when it gets there.
pub(super) fn plan_reserved(table: &mut SliceTable, meta: &ObjectMeta, index: u64) {
    if is_stored(table, index) || table.inflight.contains_key(&index) {
        return;
    }
    if let Some((run, _, _)) = table.claims.reservation_of(index) {
        let buffer = SliceBuffer::planned(meta.slice_length(index), run);
        table.inflight.insert(index, Arc::new(buffer));
    }
}

/// True when slice `index` is on disk (an index past the end counts as stored: nothing to fill).
pub(super) fn is_stored(table: &SliceTable, index: u64) -> bool {
    table.present.get(index).unwrap_or(true)
}

/// True when slices of this version fetched by separate requests are known to be of one version:
/// the origin checks a strong ETag or a Last-Modified sent as `If-Range`. Objects of one slice
/// never need splicing.
pub fn splices_safely(meta: &ObjectMeta) -> bool {
    if_range_validator(meta).is_some() || meta.slice_count() <= 1
}

/// Makes sure every slice in `first..=last` is stored or being filled, starting fills for the
/// missing ones: one upstream request per run of missing slices, where runs separated by at most
/// `merge_gap_slices` stored slices count as one run. Returns the caller's [`Demand`] on the
/// slices being filled; hold it while reading them.
///
/// Starting fills takes a slot of the requester's client (waiting up to `fill.client_wait`).
/// Missing slices of a validator-less object are refused: they could come from another version.
pub async fn ensure_filling(
    node: &Arc<Node>,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    first: u64,
    last: u64,
    requester: &Requester,
) -> Result<Demand, FillRefused> {
    let gap = node.merge_gap_slices;
    let mut demand = Demand::default();
    {
        let mut table = entry.table();
        if missing_runs(&table, first, last, gap).is_empty() {
            plan_reserved(&mut table, &entry.meta, first);
            demand.register(entry, &mut table, first, last, requester.prefill);
            return Ok(demand);
        }
    }
    if !splices_safely(&entry.meta) {
        return Err(FillRefused::NoValidator);
    }
    let client_slot = requester.slot(&node.fill_limits).await?;
    let mut fills = Vec::new();
    {
        let mut table = entry.table();
        let slice_len = entry.meta.slice_len;
        for (run_first, run_last) in missing_runs(&table, first, last, gap) {
            let start = run_first * slice_len;
            let end = (run_last * slice_len + slice_len).min(entry.meta.length);
            fills.extend(Run::claim(&mut table, &entry.meta, start, end));
        }
        plan_reserved(&mut table, &entry.meta, first);
        demand.register(entry, &mut table, first, last, requester.prefill);
    }
    for mut run in fills {
        run.pace = requester
            .pace
            .clone()
            .map(|pace| (pace, ByteMeter::default()));
        let node = node.clone();
        let route = route.clone();
        let entry = entry.clone();
        let client_slot = client_slot.clone();
        tokio::spawn(async move {
            let fill_slot = node.fill_limits.start_fill(Some(client_slot)).await;
            run_fill(node, route, entry, run, fill_slot).await;
        });
    }
    Ok(demand)
}

/// The runs of slices in `first..=last` that are neither stored, claimed nor reserved: runs
/// separated by at most `gap` slices that are stored or claimed count as one; a reserved slice
/// always separates runs (it belongs to another fill). Its size follows the runs found, and it
/// steps over reserved ranges at once.
pub(super) fn missing_runs(table: &SliceTable, first: u64, last: u64, gap: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut separated = true;
    let mut index = first;
    while index <= last {
        if let Some((_, _, reserved_last)) = table.claims.reservation_of(index) {
            separated = true;
            index = match reserved_last.checked_add(1) {
                Some(next) => next,
                None => break,
            };
            continue;
        }
        if !is_stored(table, index) && !table.inflight.contains_key(&index) {
            match runs.last_mut() {
                Some((_, run_last)) if !separated && index - *run_last <= gap + 1 => {
                    *run_last = index
                }
                _ => runs.push((index, index)),
            }
            separated = false;
        }
        index += 1;
    }
    runs
}
