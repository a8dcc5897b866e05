//! The portable storage backend: ordinary blocking file calls (`pread`, `write`, `fsync`,
//! `rename`) run on tokio's blocking thread pool. It works on every kernel and inside any
//! seccomp profile, so it is also the fallback when io_uring is unavailable.
//!
//! Reads try the page cache first, in place: `preadv2` with `RWF_NOWAIT` either copies bytes that
//! are already in memory or fails with `EAGAIN` without touching the disk, and only then does the
//! read go to the blocking pool. A hot small hit therefore costs two syscalls on the worker
//! instead of a round trip through another thread. Kernels without `RWF_NOWAIT` always take the
//! pool.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{DiskFuture, Storage};
use crate::error::DiskError;

/// Blocking file I/O on tokio's blocking pool.
#[derive(Debug, Default)]
pub struct PortableStorage;

impl PortableStorage {
    /// Creates the backend. It holds no state: every call opens what it needs.
    pub fn new() -> Self {
        PortableStorage
    }
}

/// Runs a blocking closure on the blocking pool and flattens a cancelled task into a disk error.
fn blocking<T, F>(work: F) -> DiskFuture<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DiskError> + Send + 'static,
{
    Box::pin(async move {
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| DiskError::Cancelled)?
    })
}

impl Storage for PortableStorage {
    fn backend_name(&self) -> &'static str {
        "portable"
    }

    fn read_at(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
        mut buffer: Vec<u8>,
    ) -> DiskFuture<Vec<u8>> {
        if let Some(read) = read_cached(&path, offset, length, &mut buffer) {
            return Box::pin(std::future::ready(read.map(|()| buffer)));
        }
        blocking(move || {
            buffer.clear();
            buffer.resize(length, 0);
            let file = File::open(&path).map_err(|error| DiskError::io("open", &path, error))?;
            file.read_exact_at(&mut buffer, offset).map_err(|error| {
                if error.kind() == std::io::ErrorKind::UnexpectedEof {
                    DiskError::ShortRead { path: path.clone() }
                } else {
                    DiskError::io("read", &path, error)
                }
            })?;
            Ok(buffer)
        })
    }

    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()> {
        blocking(move || write_atomic_blocking(&path, &chunks, sync))
    }

    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()> {
        blocking(move || match fs::remove_dir_all(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(DiskError::io("remove", &path, error))
            }
            _ => Ok(()),
        })
    }
}

/// Reads `length` bytes at `offset` into `buffer` if they are all in the page cache. `None`
/// means some are not (or the kernel cannot tell without blocking): read them on the pool.
fn read_cached(
    path: &Path,
    offset: u64,
    length: usize,
    buffer: &mut Vec<u8>,
) -> Option<Result<(), DiskError>> {
    use rustix::io::{Errno, ReadWriteFlags};
    buffer.clear();
    buffer.resize(length, 0);
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) => return Some(Err(DiskError::io("open", path, error))),
    };
    let mut done = 0;
    while done < length {
        let read = rustix::io::preadv2(
            &file,
            &mut [std::io::IoSliceMut::new(&mut buffer[done..])],
            offset + done as u64,
            ReadWriteFlags::NOWAIT,
        );
        match read {
            Ok(0) => {
                return Some(Err(DiskError::ShortRead {
                    path: path.to_path_buf(),
                }))
            }
            Ok(count) => done += count,
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::INVAL | Errno::NOSYS | Errno::INTR) => {
                return None
            }
            Err(error) => return Some(Err(DiskError::io("read", path, error.into()))),
        }
    }
    Some(Ok(()))
}

/// The temporary name a file is written under before it is renamed into place. Files with this
/// prefix are leftovers of an interrupted write and are deleted at start-up.
pub const TEMP_PREFIX: &str = ".tmp-";

/// The temporary path a file is written under before the rename.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let directory = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    directory.join(format!(
        "{TEMP_PREFIX}{file_name}-{:016x}",
        rand::random::<u64>()
    ))
}

fn write_atomic_blocking(path: &Path, chunks: &[Bytes], sync: bool) -> Result<(), DiskError> {
    let directory = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(directory).map_err(|error| DiskError::io("mkdir", directory, error))?;
    let temp_path = temp_path_for(path);
    let result = (|| {
        let mut file =
            File::create(&temp_path).map_err(|error| DiskError::io("create", &temp_path, error))?;
        for chunk in chunks {
            file.write_all(chunk)
                .map_err(|error| DiskError::io("write", &temp_path, error))?;
        }
        if sync {
            file.sync_data()
                .map_err(|error| DiskError::io("fsync", &temp_path, error))?;
        }
        fs::rename(&temp_path, path).map_err(|error| DiskError::io("rename", path, error))
    })();
    if result.is_err() {
        // A failed write (for example a full disk) must not leave a partial temporary file
        // taking space; it is never read, but the space matters precisely when the disk is full.
        let _ = fs::remove_file(&temp_path);
    }
    result
}
