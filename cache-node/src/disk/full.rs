//! A [`Storage`] decorator that reports every write failing for lack of space (`ENOSPC`), so the
//! index can shrink to what the filesystem really holds (the index's `disk_full`, above this
//! layer). It sees every write the node makes (slices, metadata,
//! piece hashes) without the cache logic above the trait having to look for the error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::{DiskFuture, SharedStorage, Storage};

/// What to call with the path of a write that failed because the disk is full.
pub type OnFull = Arc<dyn Fn(&Path, RefusedWrite) + Send + Sync>;

/// What is known about a write the disk refused for lack of space, to judge what the disk holds.
#[derive(Debug, Clone, Copy)]
pub struct RefusedWrite {
    /// When it was submitted: space freed since then may already have made room.
    pub submitted: Instant,
    /// Bytes of the other writes still in flight when it failed: those submitted earlier may
    /// yet land, so the disk may hold that much more than is counted.
    pub other_pending_bytes: u64,
}

/// Forwards everything to `inner` and calls `on_full` after a write fails with `ENOSPC`.
pub struct ReportsFullDisk {
    inner: SharedStorage,
    on_full: OnFull,
    /// Bytes of the writes submitted and not finished.
    pending_bytes: Arc<AtomicU64>,
}

impl std::fmt::Debug for ReportsFullDisk {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ReportsFullDisk")
            .field("backend", &self.inner.backend_name())
            .finish()
    }
}

impl ReportsFullDisk {
    /// Wraps `inner`.
    pub fn new(inner: SharedStorage, on_full: OnFull) -> ReportsFullDisk {
        ReportsFullDisk {
            inner,
            on_full,
            pending_bytes: Arc::default(),
        }
    }
}

impl Storage for ReportsFullDisk {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn read_at(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> DiskFuture<Vec<u8>> {
        self.inner.read_at(path, offset, length, buffer)
    }

    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()> {
        let submitted = Instant::now();
        let length: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let pending_bytes = self.pending_bytes.clone();
        pending_bytes.fetch_add(length, Ordering::Relaxed);
        let write = self.inner.write_file_atomic(path.clone(), chunks, sync);
        let on_full = self.on_full.clone();
        Box::pin(async move {
            let written = write.await;
            let other_pending_bytes = pending_bytes.fetch_sub(length, Ordering::Relaxed) - length;
            if let Err(error) = &written {
                if error.is_disk_full() {
                    let refused = RefusedWrite {
                        submitted,
                        other_pending_bytes,
                    };
                    on_full(&path, refused);
                }
            }
            written
        })
    }

    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()> {
        self.inner.remove_dir_all(path)
    }

    fn open_for_send(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
    ) -> DiskFuture<Option<std::fs::File>> {
        self.inner.open_for_send(path, offset, length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DiskError;
    use outpost_shared::sync::lock;
    use std::sync::Mutex;

    /// Refuses every write with `ENOSPC`, or with `EIO` for paths ending in `eio`.
    struct Refusing;

    impl Storage for Refusing {
        fn backend_name(&self) -> &'static str {
            "refusing"
        }
        fn read_at(&self, _: PathBuf, _: u64, _: usize, buffer: Vec<u8>) -> DiskFuture<Vec<u8>> {
            Box::pin(std::future::ready(Ok(buffer)))
        }
        fn write_file_atomic(&self, path: PathBuf, _: Vec<Bytes>, _: bool) -> DiskFuture<()> {
            let code = if path.ends_with("eio") { 5 } else { 28 };
            let error = DiskError::io("write", path, std::io::Error::from_raw_os_error(code));
            Box::pin(std::future::ready(Err(error)))
        }
        fn remove_dir_all(&self, _: PathBuf) -> DiskFuture<()> {
            Box::pin(std::future::ready(Ok(())))
        }
    }

    #[tokio::test]
    async fn only_writes_refused_for_lack_of_space_are_reported() {
        let reported = Arc::new(Mutex::new(Vec::new()));
        let sink = reported.clone();
        let storage = ReportsFullDisk::new(
            Arc::new(Refusing),
            Arc::new(move |path: &Path, _: RefusedWrite| lock(&sink).push(path.to_path_buf())),
        );
        assert_eq!(storage.backend_name(), "refusing");
        let full = storage
            .write_file_atomic("/d/full".into(), Vec::new(), false)
            .await;
        assert!(full.unwrap_err().is_disk_full(), "the error is passed on");
        assert!(storage
            .write_file_atomic("/d/eio".into(), Vec::new(), false)
            .await
            .is_err());
        assert_eq!(*lock(&reported), vec![PathBuf::from("/d/full")]);
        // A write refused while another is in flight says how many bytes may still land.
        let pending = Arc::new(Mutex::new(Vec::new()));
        let sink = pending.clone();
        let storage = ReportsFullDisk::new(
            Arc::new(Refusing),
            Arc::new(move |_: &Path, refused: RefusedWrite| {
                lock(&sink).push(refused.other_pending_bytes)
            }),
        );
        let earlier =
            storage.write_file_atomic("/d/a".into(), vec![Bytes::from(vec![0; 10])], false);
        let later = storage.write_file_atomic("/d/b".into(), vec![Bytes::from(vec![0; 3])], false);
        assert!(later.await.is_err() && earlier.await.is_err());
        assert_eq!(*lock(&pending), vec![10, 0]);
    }
}
