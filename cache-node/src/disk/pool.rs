//! A pool of read buffers for the hit path, so serving a stored slice does not allocate (and, for
//! slice-sized buffers, map and unmap fresh pages) per read.
//!
//! A buffer leaves the pool for one read, travels to hyper inside a `Bytes` (through
//! `Bytes::from_owner`), and comes back when the last `Bytes` pointing at it is dropped.

use outpost_shared::sync::lock;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers kept for reuse; more than this are freed when returned.
const MAX_POOLED_BUFFERS: usize = 64;

/// A shared pool of byte buffers.
#[derive(Debug, Clone, Default)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl BufferPool {
    /// Creates an empty pool.
    pub fn new() -> BufferPool {
        BufferPool::default()
    }

    /// Takes a buffer (empty, with whatever capacity it had) or a new one.
    pub fn take(&self) -> Vec<u8> {
        self.lock().pop().unwrap_or_default()
    }

    /// Wraps a filled buffer in `Bytes`; the buffer returns to this pool when the `Bytes` and all
    /// its clones are dropped.
    pub fn into_bytes(&self, buffer: Vec<u8>) -> Bytes {
        Bytes::from_owner(PooledBuffer {
            buffer,
            pool: self.clone(),
        })
    }

    /// How many buffers wait in the pool (for tests and stats).
    pub fn free_buffers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        lock(&self.free)
    }
}

struct PooledBuffer {
    buffer: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let mut free = self.pool.lock();
        if free.len() < MAX_POOLED_BUFFERS {
            free.push(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_last_bytes_is_dropped() {
        let pool = BufferPool::new();
        let mut buffer = pool.take();
        buffer.extend_from_slice(b"slice bytes");
        let capacity = buffer.capacity();
        let bytes = pool.into_bytes(buffer);
        let part = bytes.slice(0..5);
        drop(bytes);
        assert_eq!(pool.free_buffers(), 0, "a slice still holds the buffer");
        assert_eq!(&part[..], b"slice");
        drop(part);
        assert_eq!(pool.free_buffers(), 1);
        let reused = pool.take();
        assert!(reused.is_empty());
        assert_eq!(reused.capacity(), capacity);
    }
}
