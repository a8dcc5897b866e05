//! The io_uring storage backend: every read, write, fsync and rename is submitted to an io_uring
//! through tokio-uring, on one dedicated ring thread that runs many operations concurrently.
//!
//! Callers hand a job (with its owned buffers) to a ring over a channel and await a oneshot
//! answer, so the trait's futures stay `Send`. On a serving worker that runs its own tokio-uring
//! runtime (thread-per-core, started by the server module), [`attach_worker_ring`] makes that worker's
//! ring take the jobs its own requests submit, so the hit path never crosses threads; every other
//! thread uses the shared ring thread. Reads go
//! into the caller's buffer without zero-filling it first: the kernel writes the bytes straight
//! into the spare capacity.
//!
//! [`UringStorage::start`] probes the ring with a real write, fsync, rename and read before the
//! node uses it. Setting `OUTPOST_SIMULATE_IO_URING_FAILURE=1` makes the probe fail, which is how
//! tests (and operators) check the fallback to the portable backend.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_uring::buf::BoundedBuf;
use tokio_uring::fs::File;

use super::portable::temp_path_for;
use super::{DiskFuture, Storage};
use crate::error::DiskError;

/// The environment variable that makes the io_uring probe fail on purpose.
pub const SIMULATE_FAILURE_ENV: &str = "OUTPOST_SIMULATE_IO_URING_FAILURE";

/// Submission queue depth of the ring.
const RING_ENTRIES: u32 = 256;

type Reply<T> = oneshot::Sender<Result<T, DiskError>>;

thread_local! {
    /// The job queue of the ring owned by this thread, when it is a serving worker.
    static WORKER_RING: std::cell::RefCell<Option<mpsc::UnboundedSender<Job>>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes the calling thread's tokio-uring runtime run the storage jobs submitted on this thread.
/// Must be called inside `tokio_uring::Runtime::block_on`; the jobs go back to the shared ring
/// thread once this runtime is gone.
pub fn attach_worker_ring() {
    let (sender, receiver) = mpsc::unbounded_channel();
    WORKER_RING.with(|ring| *ring.borrow_mut() = Some(sender));
    tokio_uring::spawn(run_jobs(receiver));
}

/// Runs every job as its own task on the current ring until the senders are gone.
async fn run_jobs(mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        tokio_uring::spawn(run_job(job));
    }
}

enum Job {
    Read {
        path: PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
        reply: Reply<Vec<u8>>,
    },
    Write {
        path: PathBuf,
        chunks: Vec<Bytes>,
        sync: bool,
        reply: Reply<()>,
    },
    RemoveDir {
        path: PathBuf,
        reply: Reply<()>,
    },
}

/// Storage on io_uring.
#[derive(Debug)]
pub struct UringStorage {
    jobs: mpsc::UnboundedSender<Job>,
}

impl UringStorage {
    /// Starts the ring thread and probes it in `probe_dir`. Returns why io_uring cannot be used
    /// when the ring cannot be created or the probe fails.
    pub fn start(probe_dir: &Path) -> Result<UringStorage, String> {
        if std::env::var(SIMULATE_FAILURE_ENV).as_deref() == Ok("1") {
            return Err(format!("simulated by {SIMULATE_FAILURE_ENV}=1"));
        }
        let (jobs, receiver) = mpsc::unbounded_channel::<Job>();
        let (ready_sender, ready_receiver) = std::sync::mpsc::channel::<Result<(), String>>();
        let probe_dir = probe_dir.to_path_buf();
        std::thread::Builder::new()
            .name("outpost-uring".into())
            .spawn(move || ring_thread(receiver, ready_sender, probe_dir))
            .map_err(|error| format!("cannot start the ring thread: {error}"))?;
        // A plain blocking receive: this runs once at start-up, possibly inside the caller's
        // runtime, where nesting another runtime would not be allowed.
        ready_receiver
            .recv()
            .map_err(|_| "the ring thread exited during set-up".to_owned())??;
        Ok(UringStorage { jobs })
    }

    fn submit<T: Send + 'static>(&self, make_job: impl FnOnce(Reply<T>) -> Job) -> DiskFuture<T> {
        let (reply, answer) = oneshot::channel();
        let job = make_job(reply);
        let job = WORKER_RING.with(|ring| match ring.borrow().as_ref() {
            Some(local) => local.send(job).err().map(|returned| returned.0),
            None => Some(job),
        });
        let sent = job.map_or(Ok(()), |job| self.jobs.send(job).map_err(drop));
        Box::pin(async move {
            if sent.is_err() {
                return Err(DiskError::Cancelled);
            }
            answer.await.map_err(|_| DiskError::Cancelled)?
        })
    }
}

impl Storage for UringStorage {
    fn backend_name(&self) -> &'static str {
        "io_uring"
    }

    fn read_at(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> DiskFuture<Vec<u8>> {
        self.submit(|reply| Job::Read {
            path,
            offset,
            length,
            buffer,
            reply,
        })
    }

    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()> {
        self.submit(|reply| Job::Write {
            path,
            chunks,
            sync,
            reply,
        })
    }

    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()> {
        self.submit(|reply| Job::RemoveDir { path, reply })
    }
}

/// The ring thread: creates the tokio-uring runtime, probes it, reports the outcome, then runs
/// every job as its own task until the storage is dropped.
fn ring_thread(
    jobs: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    probe_dir: PathBuf,
) {
    let runtime = match tokio_uring::Runtime::new(tokio_uring::builder().entries(RING_ENTRIES)) {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = ready.send(Err(format!("io_uring_setup failed: {error}")));
            return;
        }
    };
    runtime.block_on(async move {
        let probed = probe(&probe_dir).await;
        let failed = probed.is_err();
        let _ = ready.send(probed);
        if !failed {
            run_jobs(jobs).await;
        }
    });
}

/// Writes, syncs, renames and reads back a small file through the ring, then deletes it. A ring
/// that can be created but whose operations are refused (some seccomp profiles) fails here.
async fn probe(probe_dir: &Path) -> Result<(), String> {
    let directory = probe_dir.join(format!(".probe-{:016x}", rand::random::<u64>()));
    let path = directory.join("probe");
    let payload = Bytes::from_static(b"outpost io_uring probe");
    let result = async {
        write_atomic(&path, vec![payload.clone()], true)
            .await
            .map_err(|error| error.to_string())?;
        let read = read_at(&path, 0, payload.len(), Vec::new())
            .await
            .map_err(|error| error.to_string())?;
        if read != payload {
            return Err("probe read back different bytes".to_owned());
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&directory);
    result
}

async fn run_job(job: Job) {
    match job {
        Job::Read {
            path,
            offset,
            length,
            buffer,
            reply,
        } => {
            let _ = reply.send(read_at(&path, offset, length, buffer).await);
        }
        Job::Write {
            path,
            chunks,
            sync,
            reply,
        } => {
            let _ = reply.send(write_atomic(&path, chunks, sync).await);
        }
        Job::RemoveDir { path, reply } => {
            // There is no recursive removal in io_uring; it is rare (eviction), so a blocking
            // thread does it.
            let result =
                tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&path) {
                    Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                        Err(DiskError::io("remove", &path, error))
                    }
                    _ => Ok(()),
                })
                .await
                .unwrap_or(Err(DiskError::Cancelled));
            let _ = reply.send(result);
        }
    }
}

async fn read_at(
    path: &Path,
    offset: u64,
    length: usize,
    mut buffer: Vec<u8>,
) -> Result<Vec<u8>, DiskError> {
    buffer.clear();
    buffer.reserve_exact(length);
    let file = File::open(path)
        .await
        .map_err(|error| DiskError::io("open", path, error))?;
    let (result, slice) = file.read_exact_at(buffer.slice(..length), offset).await;
    let _ = file.close().await;
    let buffer = slice.into_inner();
    match result {
        Ok(()) => Ok(buffer),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(DiskError::ShortRead {
                path: path.to_path_buf(),
            })
        }
        Err(error) => Err(DiskError::io("read", path, error)),
    }
}

async fn write_atomic(path: &Path, chunks: Vec<Bytes>, sync: bool) -> Result<(), DiskError> {
    let directory = path.parent().unwrap_or_else(|| Path::new("."));
    tokio_uring::fs::create_dir_all(directory)
        .await
        .map_err(|error| DiskError::io("mkdir", directory, error))?;
    let temp_path = temp_path_for(path);
    let result = async {
        let file = File::create(&temp_path)
            .await
            .map_err(|error| DiskError::io("create", &temp_path, error))?;
        let mut position = 0u64;
        for chunk in chunks {
            let chunk_len = chunk.len() as u64;
            let (written, _) = file.write_all_at(chunk, position).await;
            written.map_err(|error| DiskError::io("write", &temp_path, error))?;
            position += chunk_len;
        }
        if sync {
            file.sync_data()
                .await
                .map_err(|error| DiskError::io("fsync", &temp_path, error))?;
        }
        file.close()
            .await
            .map_err(|error| DiskError::io("close", &temp_path, error))?;
        tokio_uring::fs::rename(&temp_path, path)
            .await
            .map_err(|error| DiskError::io("rename", path, error))
    }
    .await;
    if result.is_err() {
        let _ = tokio_uring::fs::remove_file(&temp_path).await;
    }
    result
}
