//! The read-while-write state of a cached entry: the bytes of a slice while its fill brings them
//! ([`SliceBuffer`], read by any number of responses through a [`SliceReader`]), and the
//! range-shaped claims on an entry's slices ([`Claims`]: which runs fills have reserved, which
//! slices responses and prefills still want, through each response's `Demand`, kept in `index`).
//!
//! This is part of an entry's state, kept in its slice table; the fill layer drives it.

use outpost_shared::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::cache::fill_limits::MemoryReservation;
use crate::error::OriginError;

#[derive(Debug)]
enum BufferState {
    Filling,
    Complete,
    Failed(OriginError),
}

#[derive(Debug)]
struct BufferInner {
    chunks: Vec<Bytes>,
    filled: u64,
    state: BufferState,
}

/// The bytes of one slice while it is being filled, shared by the fill and its readers.
#[derive(Debug)]
pub struct SliceBuffer {
    expected_len: u64,
    inner: Mutex<BufferInner>,
    changed: watch::Sender<()>,
    /// Made by a reader for a slice that the fill with this run id reserved but has not
    /// claimed yet; that fill takes it over when it gets there.
    pub(crate) planned_by: Option<u64>,
    /// The fill memory this slice holds, from its first byte until it is on disk (or failed).
    memory: Mutex<Option<MemoryReservation>>,
}

/// What a reader gets from a slice buffer.
#[derive(Debug)]
pub enum BufferRead {
    /// Bytes of the requested window.
    Data(Bytes),
    /// The requested window has been read completely.
    End,
    /// The fill failed; the response must be aborted.
    Failed(OriginError),
}

impl SliceBuffer {
    /// Creates an empty buffer for a slice of `expected_len` bytes.
    pub fn new(expected_len: u64) -> SliceBuffer {
        SliceBuffer {
            expected_len,
            inner: Mutex::new(BufferInner {
                chunks: Vec::new(),
                filled: 0,
                state: BufferState::Filling,
            }),
            changed: watch::channel(()).0,
            planned_by: None,
            memory: Mutex::new(None),
        }
    }

    /// A buffer a reader waits on for a slice reserved by the fill of run `run`.
    pub(crate) fn planned(expected_len: u64, run: u64) -> SliceBuffer {
        SliceBuffer {
            planned_by: Some(run),
            ..SliceBuffer::new(expected_len)
        }
    }

    pub(crate) fn hold_memory(&self, reservation: MemoryReservation) {
        *lock(&self.memory) = Some(reservation);
    }

    pub(crate) fn holds_memory(&self) -> bool {
        lock(&self.memory).is_some()
    }

    /// Returns the slice's fill memory to the budget: its bytes are on disk, or were dropped.
    /// Readers still streaming them keep the bytes alive until they are done.
    pub(crate) fn release_memory(&self) {
        drop(lock(&self.memory).take());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BufferInner> {
        lock(&self.inner)
    }

    /// Appends bytes; returns true when the slice is now complete.
    pub(crate) fn append(&self, chunk: Bytes) -> bool {
        let complete = {
            let mut inner = self.lock();
            inner.filled += chunk.len() as u64;
            inner.chunks.push(chunk);
            let complete = inner.filled >= self.expected_len;
            if complete {
                inner.state = BufferState::Complete;
            }
            complete
        };
        self.changed.send_replace(());
        complete
    }

    pub(crate) fn fail(&self, error: OriginError) {
        {
            let mut inner = self.lock();
            if matches!(inner.state, BufferState::Filling) {
                inner.state = BufferState::Failed(error);
                // Nothing of a failed slice is ever served in full, so its bytes can go now:
                // readers see the failure once they run out of chunks.
                inner.chunks = Vec::new();
            }
        }
        self.release_memory();
        self.changed.send_replace(());
    }

    pub(crate) fn chunks(&self) -> Vec<Bytes> {
        self.lock().chunks.clone()
    }

    /// Waits until the buffer holds at least one byte, is complete, or has failed. Returns the
    /// failure, if any. Used to decide a response's status before committing to it.
    pub async fn wait_started(&self) -> Result<(), OriginError> {
        let mut receiver = self.changed.subscribe();
        loop {
            receiver.borrow_and_update();
            {
                let inner = self.lock();
                match &inner.state {
                    BufferState::Failed(error) => return Err(error.clone()),
                    BufferState::Complete => return Ok(()),
                    BufferState::Filling if inner.filled > 0 || self.expected_len == 0 => {
                        return Ok(())
                    }
                    BufferState::Filling => {}
                }
            }
            if receiver.changed().await.is_err() {
                return Err(OriginError::Body("fill was abandoned".into()));
            }
        }
    }

    /// Starts reading bytes `window_start..window_end` (slice-relative) as they arrive.
    pub fn reader(self: &Arc<Self>, window_start: u64, window_end: u64) -> SliceReader {
        SliceReader {
            receiver: self.changed.subscribe(),
            buffer: self.clone(),
            next_chunk: 0,
            position: 0,
            window_start,
            window_end,
        }
    }
}

/// A cursor over one slice buffer that yields the bytes of a window as they arrive.
#[derive(Debug)]
pub struct SliceReader {
    buffer: Arc<SliceBuffer>,
    receiver: watch::Receiver<()>,
    next_chunk: usize,
    /// Slice-relative offset of the start of `next_chunk`.
    position: u64,
    window_start: u64,
    window_end: u64,
}

impl SliceReader {
    /// The next bytes of the window, waiting for the fill when none are available yet.
    pub async fn next(&mut self) -> BufferRead {
        loop {
            if self.position >= self.window_end {
                return BufferRead::End;
            }
            self.receiver.borrow_and_update();
            {
                let inner = self.buffer.lock();
                if let Some(chunk) = inner.chunks.get(self.next_chunk) {
                    let chunk = chunk.clone();
                    drop(inner);
                    let chunk_start = self.position;
                    let chunk_end = chunk_start + chunk.len() as u64;
                    self.next_chunk += 1;
                    self.position = chunk_end;
                    let from = self.window_start.max(chunk_start);
                    let to = self.window_end.min(chunk_end);
                    if from < to {
                        return BufferRead::Data(
                            chunk.slice((from - chunk_start) as usize..(to - chunk_start) as usize),
                        );
                    }
                    continue;
                }
                match &inner.state {
                    BufferState::Failed(error) => return BufferRead::Failed(error.clone()),
                    BufferState::Complete => {
                        return BufferRead::Failed(OriginError::Protocol(
                            "slice completed short of the requested window".into(),
                        ))
                    }
                    BufferState::Filling => {}
                }
            }
            if self.receiver.changed().await.is_err() {
                return BufferRead::Failed(OriginError::Body("fill was abandoned".into()));
            }
        }
    }
}

/// The range-shaped fill state of one object, kept in its `SliceTable`: what running fills
/// have reserved, and which slices responses and prefills want. Its size follows the number of
/// fills and responses, never the object's length.
#[derive(Debug, Default)]
pub struct Claims {
    /// Slices `next..=last` that the fill of run `id` will claim as it gets there; no other
    /// fill takes them. As `(id, next, last)`.
    pub(crate) reserved: Vec<(u64, u64, u64)>,
    /// Live demands by id: the slices `first..=last` a response reads.
    pub(crate) demands: HashMap<u64, (u64, u64)>,
    /// Slices a prefill asked for: their fills finish them even when nobody reads them. A range
    /// goes once all its slices are stored.
    pub(crate) prefills: Vec<(u64, u64)>,
    next_id: u64,
}

impl Claims {
    pub(crate) fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The reservation (`id`, `next`, `last`) that holds slice `index`, if any.
    pub(crate) fn reservation_of(&self, index: u64) -> Option<(u64, u64, u64)> {
        self.reserved
            .iter()
            .copied()
            .find(|(_, next, last)| (*next..=*last).contains(&index))
    }

    /// True when some response or prefill wants one of slices `first..=last`.
    pub(crate) fn wanted(&self, first: u64, last: u64) -> bool {
        self.demands
            .values()
            .chain(self.prefills.iter())
            .any(|(from, to)| *from <= last && *to >= first)
    }
}
