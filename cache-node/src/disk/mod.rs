//! The disk boundary: a small [`Storage`] trait that the cache logic uses for every byte it reads
//! or writes, and the backends behind it.
//!
//! The trait is shaped for completion-based I/O (io_uring): every call takes owned buffers and
//! paths and returns a boxed `Send` future, so a backend may move the work to another thread or
//! ring and hand the buffers back when the kernel is done. Nothing above this module touches a
//! file handle.
//!
//! Backends:
//! - [`portable::PortableStorage`]: positional `pread`/`write` on a blocking thread pool; works
//!   everywhere.

pub mod portable;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::DiskError;

/// The future every storage call returns.
pub type DiskFuture<T> = Pin<Box<dyn Future<Output = Result<T, DiskError>> + Send + 'static>>;

/// Positional reads into owned buffers and atomic writes of whole files.
pub trait Storage: Send + Sync + 'static {
    /// The name reported in `/stats` as `disk_backend`.
    fn backend_name(&self) -> &'static str;

    /// Reads exactly `buffer.len()` bytes at `offset` of the file at `path` into `buffer` and
    /// returns it. A file shorter than that is [`DiskError::ShortRead`].
    fn read_at(&self, path: PathBuf, offset: u64, buffer: Vec<u8>) -> DiskFuture<Vec<u8>>;

    /// Writes `chunks` as the whole content of `path`, atomically: the bytes go to a temporary
    /// file in the same directory, which is flushed to stable storage when `sync` is set and then
    /// renamed over `path`. A crash at any moment leaves either no file or the complete one.
    /// Missing parent directories are created.
    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()>;

    /// Reads a whole (small) file.
    fn read_file(&self, path: PathBuf) -> DiskFuture<Vec<u8>>;

    /// Removes a directory and everything in it. A missing directory is not an error.
    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()>;
}

/// A shared handle to whichever backend the node runs on.
pub type SharedStorage = Arc<dyn Storage>;

/// Chooses the storage backend. Only the portable backend exists so far.
pub fn open_backend() -> SharedStorage {
    Arc::new(portable::PortableStorage::new())
}
