//! Body production: the task that walks a response's slices in order, reading stored ones from
//! disk (zero-copy where it can, checked against piece hashes when sampled) and streaming the
//! others from their fills, and starting a fill for a slice that turns out missing.

use super::body::{BodyItem, Chunk};
use super::Segment;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::cache::index::ObjectEntry;
use crate::error::ServeError;
use crate::fill::{self, BufferRead, Demand, Requester, SliceBuffer};
use crate::http::sendfile::{self};
use crate::node::Node;
use crate::stats::ByteSource;
use crate::upstream::router::Route;

/// Stored windows at least this long go out with `sendfile` on connections that can; shorter
/// ones are read and copied, which costs less than the extra syscalls for small objects.
pub(super) const ZERO_COPY_MIN: usize = 32 << 10;

/// True when a slice read from disk for a hit should be checked against its piece hashes
/// (`storage.verify_hits`).
pub(super) fn sample_hit_check(node: &Node) -> bool {
    node.verify_hits >= 1.0 || (node.verify_hits > 0.0 && rand::random::<f64>() < node.verify_hits)
}

/// Where one slice's bytes come from at the moment it is read.
pub(super) enum SliceSource {
    Disk,
    Fill(Arc<SliceBuffer>),
    Missing,
}

pub(super) fn slice_source(entry: &ObjectEntry, index: u64) -> SliceSource {
    let table = entry.table();
    if table.present.contains(index) {
        SliceSource::Disk
    } else if let Some(buffer) = table.inflight.get(&index) {
        SliceSource::Fill(buffer.clone())
    } else {
        SliceSource::Missing
    }
}

/// What streams one response's body: the object, where its bytes go, and the response's
/// [`Demand`] on the slices being filled, which keeps their fills going while it lives.
pub(super) struct BodyProducer {
    pub(super) node: Arc<Node>,
    pub(super) route: Route,
    pub(super) entry: Arc<ObjectEntry>,
    /// Stored windows may go out as [`Chunk::File`].
    pub(super) zero_copy: bool,
    pub(super) sender: mpsc::Sender<BodyItem>,
    /// Who asked, for refills of slices that went missing.
    pub(super) requester: Requester,
    pub(super) demand: Demand,
}

pub(super) enum SendError {
    ClientGone,
    Serve(ServeError),
}

impl BodyProducer {
    /// Streams the segments of a response into the body channel. Returns when done, when the
    /// client went away (the channel closed), or after sending an error. The demand goes with
    /// it, so fills nobody else reads stop at their next slice.
    pub(super) async fn produce(&mut self, segments: Vec<Segment>) {
        for segment in segments {
            let range = match segment {
                Segment::Framing(bytes) => {
                    if self
                        .sender
                        .send(Ok((Chunk::Bytes(bytes), ByteSource::Other)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Segment::Object(range) => range,
            };
            let slice_len = self.entry.meta.slice_len;
            let last_slice = range.last / slice_len;
            for index in range.first / slice_len..=last_slice {
                let slice_start = index * slice_len;
                let window_start = range.first.max(slice_start) - slice_start;
                let window_end = (range.last + 1)
                    .min(slice_start + self.entry.meta.slice_length(index))
                    - slice_start;
                match self
                    .send_slice(index, last_slice, window_start, window_end)
                    .await
                {
                    Ok(()) => {}
                    Err(SendError::ClientGone) => return,
                    Err(SendError::Serve(error)) => {
                        tracing::warn!(%error, source = ?error.source_kind(), slice = index, "response aborted");
                        let _ = self.sender.send(Err(error)).await;
                        return;
                    }
                }
            }
        }
    }

    /// Sends bytes `window_start..window_end` of slice `index`, from disk, from its fill, or by
    /// starting a fill. A slice the index has as stored that turns out missing or short on disk
    /// is forgotten and filled again, and this response streams it from that fill: a lost slice
    /// is a miss, never a truncated hit. A slice that fails its piece-hash check ends the
    /// response.
    async fn send_slice(
        &mut self,
        index: u64,
        last_slice: u64,
        window_start: u64,
        window_end: u64,
    ) -> Result<(), SendError> {
        // One fill per slice and response: a slice that is missing again after it was filled
        // once (its write failed, or the object went away) ends the response.
        let mut filled = false;
        for _ in 0..3 {
            let refill_to = match slice_source(&self.entry, index) {
                SliceSource::Disk => {
                    let window = SliceWindow {
                        index,
                        start: window_start,
                        end: window_end,
                    };
                    let sent = send_stored(
                        &self.node,
                        &self.entry,
                        window,
                        self.zero_copy,
                        &self.sender,
                    )
                    .await;
                    let error = match sent {
                        Ok(()) => return Ok(()),
                        Err(StoredError::ClientGone) => return Err(SendError::ClientGone),
                        Err(StoredError::Mismatch(slice)) => {
                            return Err(SendError::Serve(ServeError::Integrity { slice }))
                        }
                        Err(StoredError::Disk(error)) => error,
                    };
                    if filled
                        || !self
                            .node
                            .index
                            .slice_lost(&self.entry, index, &error, &self.node.stats)
                    {
                        return Err(SendError::Serve(if self.entry.is_removed() {
                            ServeError::Vanished
                        } else {
                            ServeError::Disk(error)
                        }));
                    }
                    index
                }
                SliceSource::Fill(buffer) => {
                    let mut reader = buffer.reader(window_start, window_end);
                    loop {
                        match reader.next().await {
                            BufferRead::Data(bytes) => {
                                if self
                                    .sender
                                    .send(Ok((Chunk::Bytes(bytes), ByteSource::Fill)))
                                    .await
                                    .is_err()
                                {
                                    return Err(SendError::ClientGone);
                                }
                            }
                            BufferRead::End => return Ok(()),
                            BufferRead::Failed(error) => {
                                return Err(SendError::Serve(ServeError::Origin(error)))
                            }
                        }
                    }
                }
                // An earlier fill of this slice failed or its write was lost: fetch the rest of
                // the response's slices again.
                SliceSource::Missing if !filled && !self.entry.is_removed() => last_slice,
                SliceSource::Missing => break,
            };
            filled = true;
            match fill::ensure_filling(
                &self.node,
                &self.route,
                &self.entry,
                index,
                refill_to,
                &self.requester,
            )
            .await
            {
                Ok(more) => self.demand.merge(more),
                Err(refused) => {
                    tracing::info!(%refused, slice = index, "cannot refill a missing slice");
                    break;
                }
            }
        }
        Err(SendError::Serve(ServeError::Vanished))
    }
}

/// Why a window of a stored slice could not be sent.
pub(super) enum StoredError {
    ClientGone,
    /// The slice could not be read: missing, short, or an I/O error.
    Disk(crate::error::DiskError),
    /// The slice failed its piece-hash check; the object was dropped.
    Mismatch(u64),
}

/// A window of one slice: slice-relative bytes `start..end`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SliceWindow {
    pub(super) index: u64,
    pub(super) start: u64,
    pub(super) end: u64,
}

/// Sends a window of a stored slice. A sampled share of slices (`storage.verify_hits`) is read
/// whole and checked against its piece hashes before any of it is sent; the others leave with
/// `sendfile` when the connection allows it, or through a pooled buffer.
pub(super) async fn send_stored(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    window: SliceWindow,
    zero_copy: bool,
    sender: &mpsc::Sender<BodyItem>,
) -> Result<(), StoredError> {
    let send_bytes = |bytes: Bytes| async move {
        sender
            .send(Ok((Chunk::Bytes(bytes), ByteSource::Disk)))
            .await
            .map_err(|_| StoredError::ClientGone)
    };
    if sample_hit_check(node) {
        match crate::cache::pieces::verify_slice(&node.piece_store(), entry, window.index).await {
            Ok(Some(slice)) => {
                return send_bytes(slice.slice(window.start as usize..window.end as usize)).await
            }
            // The hashes are not known (peering off, or not yet recorded): sent unchecked.
            Ok(None) => {}
            Err(crate::cache::pieces::VerifyError::Disk(error)) => {
                return Err(StoredError::Disk(error))
            }
            Err(crate::cache::pieces::VerifyError::Mismatch { slice }) => {
                return Err(StoredError::Mismatch(slice))
            }
        }
    }
    let path = node
        .layout
        .slice_path(&entry.key, entry.meta.generation, window.index);
    let length = (window.end - window.start) as usize;
    if zero_copy && length >= ZERO_COPY_MIN {
        match node
            .storage
            .open_for_send(path.clone(), window.start, length)
            .await
        {
            Ok(Some(file)) => {
                return send_file_window(file, window.start, length, sender)
                    .await
                    .map_err(|_| StoredError::ClientGone)
            }
            // Not in the page cache (or shorter than the window): read it below without
            // blocking the worker.
            Ok(None) => {}
            Err(error) => return Err(StoredError::Disk(error)),
        }
    }
    let buffer = node.read_buffers.take();
    match node
        .storage
        .read_at(path, window.start, length, buffer)
        .await
    {
        Ok(buffer) => send_bytes(node.read_buffers.into_bytes(buffer)).await,
        Err(error) => Err(StoredError::Disk(error)),
    }
}

/// Sends a window of an opened slice file as file chunks of at most [`sendfile::FRAME_MAX`]
/// bytes.
pub(super) async fn send_file_window(
    file: std::fs::File,
    window_start: u64,
    length: usize,
    sender: &mpsc::Sender<BodyItem>,
) -> Result<(), SendError> {
    let file = Arc::new(file);
    let mut offset = window_start;
    let end = window_start + length as u64;
    while offset < end {
        let frame = ((end - offset) as usize).min(sendfile::FRAME_MAX);
        let chunk = Chunk::File {
            file: file.clone(),
            offset,
            length: frame,
        };
        sender
            .send(Ok((chunk, ByteSource::Disk)))
            .await
            .map_err(|_| SendError::ClientGone)?;
        offset += frame as u64;
    }
    Ok(())
}
