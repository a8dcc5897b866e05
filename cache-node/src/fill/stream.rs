//! Streaming: a running fill reads the origin body into slice buffers, claims slices a window
//! ahead, stops when no response wants the rest, and writes each finished slice to disk.

use super::*;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Semaphore;

pub use crate::cache::discovery::DiscoverError;
use crate::cache::fill_limits::FillSlot;
use crate::cache::index::{ObjectEntry, SliceTable};
pub use crate::cache::slice_buffer::SliceBuffer;
use crate::error::OriginError;
use crate::node::Node;
use crate::stats::OriginIndex;
use crate::upstream::router::Route;

/// How many bytes of finished slices of one fill may wait for their disk write before the fill
/// stops reading from the origin, so one fill against a slow disk cannot take the whole memory
/// budget (`fill.max_memory`) from the others while letting short bursts run ahead of the disk.
pub(super) const PENDING_WRITE_BYTES_PER_FILL: u64 = 64 * 1024 * 1024;

pub(super) async fn run_fill(
    node: Arc<Node>,
    route: Route,
    entry: Arc<ObjectEntry>,
    mut run: Run,
    fill_slot: FillSlot,
) {
    // The turn may have taken a while: the clients that asked may have left meanwhile.
    let (first_slice, last_slice) = (run.first, run.last);
    if !keeps_going(&node, &entry, &mut run, first_slice) {
        return;
    }
    let slice_len = entry.meta.slice_len;
    let first_byte = first_slice * slice_len;
    let last_byte = (last_slice * slice_len + slice_len).min(entry.meta.length) - 1;
    let validator = if_range_validator(&entry.meta);
    let origin = fetch_range(&node, &route, first_byte, Some(last_byte), validator).await;
    let failure = match origin {
        Ok(mut origin) => {
            let same_version = answers_same_version(&entry.meta, &origin);
            match origin.body.take() {
                Some(body) if same_version => {
                    // An origin that ignores Range sends everything: keep what comes before the
                    // run too (it has to be read anyway), up to the end of the run.
                    if origin.body_start < first_byte {
                        run.reserve_before(
                            &mut entry.table(),
                            &entry.meta,
                            origin.body_start / slice_len,
                            first_slice - 1,
                        );
                    }
                    stream_into_slices(
                        &node,
                        route.target.origin,
                        &entry,
                        body,
                        origin.body_start,
                        run,
                        fill_slot,
                    )
                    .await;
                    return;
                }
                _ if !same_version => {
                    node.stats.version_changes.inc();
                    tracing::info!(
                        key = entry.key.as_str(),
                        "origin content changed; dropping the stored version"
                    );
                    node.index.remove(&entry);
                    OriginError::VersionChanged
                }
                _ => OriginError::Protocol("origin sent no body".into()),
            }
        }
        Err(DiscoverError::Origin(error)) => error,
        Err(DiscoverError::NotStorable(reason)) => {
            // What the origin sends now may not be stored (an encoding, no-store...): the stored
            // version goes, and requests are relayed from now on.
            tracing::info!(
                key = entry.key.as_str(),
                %reason,
                "origin content is no longer storable; dropping the stored version"
            );
            not_storable(&node, &entry.key, reason);
            node.index.remove(&entry);
            OriginError::VersionChanged
        }
        Err(DiscoverError::Refused(refused)) => OriginError::Protocol(refused.to_string()),
        // Never produced by `fetch_range`, which turns other answers into statuses.
        Err(DiscoverError::Answered { answer, .. }) => OriginError::Status(answer.status.as_u16()),
    };
    node.stats.origin_errors.inc();
    run.end(&mut entry.table(), failure);
}

/// Decides, as a fill enters slice `index`, whether it goes on: yes for small objects, and while
/// some response or a prefill wants one of the slices of its run from `index` on. Otherwise the
/// run ends (its claims and reservations are released; a later request fills them) and the fill
/// stops. The decision and the release happen under the table lock that demands register under,
/// so a new reader either keeps the fill going or finds the slices missing and fills them itself.
pub(super) fn keeps_going(node: &Node, entry: &ObjectEntry, run: &mut Run, index: u64) -> bool {
    if entry.meta.length <= node.fill_limits.finish_objects_up_to {
        return true;
    }
    let mut table = entry.table();
    if table.claims.wanted(index, run.last) {
        return true;
    }
    run.end(&mut table, OriginError::Stopped);
    drop(table);
    node.stats.fills_stopped.inc();
    tracing::debug!(
        key = entry.key.as_str(),
        slice = index,
        "no client wants the rest of this fill; stopping"
    );
    false
}

/// Removes `buffer`'s claim on slice `index`, if the table still holds that very buffer (a newer
/// fill may have claimed the slice since).
pub(super) fn release_claim(table: &mut SliceTable, index: u64, buffer: &Arc<SliceBuffer>) {
    if table
        .inflight
        .get(&index)
        .is_some_and(|current| Arc::ptr_eq(current, buffer))
    {
        table.inflight.remove(&index);
    }
}

/// Streams an origin body into the owned slice buffers, storing each finished slice. Entering
/// each slice after the first, it checks that someone still wants the rest ([`keeps_going`]);
/// before taking a slice's first byte it reserves the slice's memory, waiting (and so leaving
/// the origin's bytes in the socket) while the budget is spent. The bytes read count under
/// `origin`, the label of the route that started the fill.
pub(super) async fn stream_into_slices(
    node: &Arc<Node>,
    origin: OriginIndex,
    entry: &Arc<ObjectEntry>,
    mut body: Incoming,
    body_start: u64,
    mut run: Run,
    fill_slot: FillSlot,
) {
    let slice_len = entry.meta.slice_len;
    let stop_at = (run.last * slice_len + slice_len).min(entry.meta.length);
    let write_slots = Arc::new(Semaphore::new(
        (PENDING_WRITE_BYTES_PER_FILL / slice_len).max(2) as usize,
    ));
    let first_slice = body_start / slice_len;
    let mut offset = body_start;
    let idle_timeout = node.idle_read_timeout;
    let failure = 'stream: loop {
        if offset >= stop_at {
            break None;
        }
        let frame = match tokio::time::timeout(idle_timeout, body.frame()).await {
            Err(_) => break Some(OriginError::IdleTimeout(idle_timeout)),
            Ok(None) => {
                break Some(OriginError::Body(format!(
                    "body ended at byte {offset} of {stop_at}"
                )))
            }
            Ok(Some(Err(error))) => {
                break Some(OriginError::Body(crate::upstream::origin::error_chain(
                    &error,
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        node.stats.count_origin_bytes(origin, data.len() as u64);
        if let Some((pace, meter)) = &mut run.pace {
            pace.bytes.inc_by(data.len() as u64);
            if let Some(limiter) = &pace.limiter {
                meter.charge(limiter, data.len() as u64).await;
            }
        }
        while !data.is_empty() && offset < stop_at {
            let index = offset / slice_len;
            if offset == index * slice_len {
                if index != first_slice && !keeps_going(node, entry, &mut run, index) {
                    break 'stream None;
                }
                run.claim_ahead(&mut entry.table(), &entry.meta, index);
            }
            let slice_end = ((index + 1) * slice_len).min(entry.meta.length);
            let take = (slice_end - offset).min(data.len() as u64) as usize;
            let part = data.split_to(take);
            offset += take as u64;
            let Some(buffer) = run.owned.get(&index) else {
                continue;
            };
            if !buffer.holds_memory() {
                let reservation = node
                    .fill_limits
                    .reserve_memory(entry.meta.slice_length(index))
                    .await;
                buffer.hold_memory(reservation);
            }
            if buffer.append(part) {
                let buffer = run.owned.remove(&index).expect("buffer is owned");
                let permit = write_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let node = node.clone();
                let entry = entry.clone();
                tokio::spawn(async move {
                    persist_slice(&node, &entry, index, &buffer).await;
                    drop(permit);
                });
            }
        }
    };
    // The turn ends here, and dropping the body closes an origin connection that still had
    // bytes to send (the rest of an object nobody wants, or an origin that sends too much).
    drop(body);
    drop(fill_slot);
    if let Some(error) = failure {
        node.stats.origin_errors.inc();
        tracing::warn!(key = entry.key.as_str(), %error, "fill failed; unfinished slices are dropped");
        run.end(&mut entry.table(), error);
    } else {
        // Whatever is left (slices of a run that stopped early) is released for a later fill.
        run.end(&mut entry.table(), OriginError::Stopped);
    }
}

/// Writes a finished slice to disk and marks it stored. On a disk error the slice is released
/// (its readers already have the bytes) and will be fetched again by a later request.
pub(super) async fn persist_slice(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    index: u64,
    buffer: &Arc<SliceBuffer>,
) {
    persist_into_store(node, entry, index, buffer).await;
    buffer.release_memory();
}

pub(super) async fn persist_into_store(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    index: u64,
    buffer: &Arc<SliceBuffer>,
) {
    if entry.is_removed() {
        entry.table().inflight.remove(&index);
        return;
    }
    // Hashes first: a slice marked stored then always has its piece hashes, and a slice the disk
    // refuses still gets them (its bytes passed validation all the same).
    if let Some(peering) = &node.peering {
        crate::cache::pieces::record_slice(
            &node.piece_store(),
            entry,
            peering.piece_len,
            index,
            buffer.chunks(),
        )
        .await;
    }
    let path = node
        .layout
        .slice_path(&entry.key, entry.meta.generation, index);
    match node
        .storage
        .write_file_atomic(path.clone(), buffer.chunks(), node.fsync)
        .await
    {
        Ok(()) => {
            node.stats.slices_stored.inc();
            if !node.index.mark_slice_stored(entry, index) {
                // The object was evicted or replaced while this slice was written.
                let _ = std::fs::remove_file(&path);
            }
        }
        Err(error) => {
            node.stats.disk_write_errors.inc();
            if error.is_disk_full() {
                tracing::warn!(
                    key = entry.key.as_str(),
                    "disk full: slice served but not stored"
                );
            } else {
                tracing::warn!(key = entry.key.as_str(), %error, "slice could not be stored");
            }
            release_claim(&mut entry.table(), index, buffer);
        }
    }
}
