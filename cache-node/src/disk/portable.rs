//! The portable storage backend: ordinary blocking file calls (`pread`, `write`, `fsync`,
//! `rename`) run on tokio's blocking thread pool. It works on every kernel and inside any
//! seccomp profile, so it is also the fallback when io_uring is unavailable.

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
