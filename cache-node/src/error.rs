//! Typed errors for the node, each recording where a failure came from (the origin, the disk)
//! and whether trying again makes sense.
//!
//! Handlers map these to HTTP answers and log lines; nothing matches on message strings.

use std::io;
use std::path::PathBuf;

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The upstream origin (or parent cache) misbehaved or could not be reached.
    Origin,
    /// The local disk failed.
    Disk,
}

/// A failure while fetching from an origin.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// No connection could be opened (refused, DNS, TLS handshake, connect timeout).
    #[error("cannot connect to origin: {0}")]
    Connect(String),
    /// The origin's name resolves only to addresses the node may not fetch from (loopback, the
    /// office network...); nothing was connected. Answered with 403, like a refused literal.
    #[error("{0}")]
    AddressRefused(String),
    /// The origin accepted the request but sent no response headers in time.
    #[error("origin sent no response within {0:?}")]
    FirstByteTimeout(std::time::Duration),
    /// The origin stopped sending body bytes for longer than the idle timeout.
    #[error("origin body stalled for {0:?}")]
    IdleTimeout(std::time::Duration),
    /// The connection failed while the body was streaming, before the promised length arrived.
    #[error("origin body ended early: {0}")]
    Body(String),
    /// The origin answered with a response the node cannot use to fill (for example a 206 for
    /// other bytes than asked, or a length that contradicts the headers).
    #[error("origin response is not usable: {0}")]
    Protocol(String),
    /// The origin's content changed (a new ETag, Last-Modified or length) since the node stored
    /// part of it. The old version has been dropped; a new request fetches the new one.
    #[error("origin content changed while being cached")]
    VersionChanged,
    /// The origin answered with a status that is not cacheable content (404, 500, ...).
    #[error("origin answered {0}")]
    Status(u16),
    /// The fill stopped early because no client wanted the rest of its bytes; they are fetched
    /// again when someone asks for them.
    #[error("fill stopped: no client wanted the rest")]
    Stopped,
    /// The origin declared an object longer than `storage.max_object_size`; nothing of it is
    /// stored.
    #[error("origin declares {length} bytes, more than storage.max_object_size ({max} bytes)")]
    TooLarge {
        /// The length the origin declared.
        length: u64,
        /// `storage.max_object_size`.
        max: u64,
    },
}

impl OriginError {
    /// True when the same request may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            OriginError::Status(400..=499) | OriginError::AddressRefused(_)
        )
    }
}

/// A failure of the local disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// An I/O call failed.
    #[error("disk {operation} {path}: {source}")]
    Io {
        /// What the node was doing: `read`, `write`, `rename`, ...
        operation: &'static str,
        /// The file involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A stored file is shorter than its metadata says; it is treated as missing.
    #[error("stored slice {path} is shorter than expected")]
    ShortRead {
        /// The file involved.
        path: PathBuf,
    },
    /// A background disk task could not complete (the runtime is shutting down).
    #[error("disk task was cancelled")]
    Cancelled,
    /// The store was written by a newer cache-node, in a format this one cannot read. Nothing is
    /// deleted: the node refuses to start.
    #[error("{path} is in store format {found}, newer than this cache-node knows (format {known}); nothing was deleted: run a cache-node that knows format {found}, or point the drive at an empty directory")]
    NewerFormat {
        /// The `format` file or `meta.json` that says so.
        path: PathBuf,
        /// The format it names.
        found: u32,
        /// The newest format this node reads (`STORE_FORMAT` of the cache store).
        known: u32,
    },
    /// A drive's `format` file does not hold a format number; the node refuses to start
    /// rather than guess.
    #[error(
        "{path} does not hold a store format number; nothing was deleted: fix or remove the file"
    )]
    UnreadableFormat {
        /// The `format` file.
        path: PathBuf,
    },
}

impl DiskError {
    /// Builds an [`DiskError::Io`] for `operation` on `path`.
    pub fn io(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DiskError::Io {
            operation,
            path: path.into(),
            source,
        }
    }

    /// True when the disk has no space left (the node keeps serving, but stops storing).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, DiskError::Io { source, .. } if source.raw_os_error() == Some(28))
    }

    /// True when the file read is gone, shorter than it should be, or unreadable where it lies
    /// (`EIO`): writing it again helps. Errors of the moment (no file descriptor left, an
    /// interrupted call, a runtime stopping) are not: they say nothing about the file.
    pub fn is_missing_or_damaged(&self) -> bool {
        match self {
            DiskError::ShortRead { .. } => true,
            DiskError::Io { source, .. } => {
                source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(5)
            }
            DiskError::Cancelled
            | DiskError::NewerFormat { .. }
            | DiskError::UnreadableFormat { .. } => false,
        }
    }
}

/// Why a response to a client could not be produced or had to be cut short.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The origin failed; see the inner error.
    #[error(transparent)]
    Origin(#[from] OriginError),
    /// The disk failed; see the inner error.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A stored slice vanished (evicted or replaced by a new version) while a response needed it.
    #[error("cached content was evicted or replaced while being served")]
    Vanished,
    /// A stored slice did not match its piece hashes; the stored object was dropped.
    #[error("stored slice {slice} failed its integrity check; the stored object was dropped")]
    Integrity {
        /// The slice that failed.
        slice: u64,
    },
}

impl ServeError {
    /// Where the failure came from, when it was outside the node.
    pub fn source_kind(&self) -> Option<ErrorSource> {
        match self {
            ServeError::Origin(_) => Some(ErrorSource::Origin),
            ServeError::Disk(_) | ServeError::Integrity { .. } => Some(ErrorSource::Disk),
            ServeError::Vanished => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_short_or_damaged_files_count_as_lost() {
        let io = |error: io::Error| DiskError::io("read", "/s", error);
        assert!(DiskError::ShortRead { path: "/s".into() }.is_missing_or_damaged());
        assert!(io(io::ErrorKind::NotFound.into()).is_missing_or_damaged());
        assert!(io(io::Error::from_raw_os_error(5)).is_missing_or_damaged());
        assert!(
            !io(io::Error::from_raw_os_error(24)).is_missing_or_damaged(),
            "EMFILE"
        );
        assert!(!io(io::ErrorKind::Interrupted.into()).is_missing_or_damaged());
        assert!(!DiskError::Cancelled.is_missing_or_damaged());
        assert!(io(io::Error::from_raw_os_error(28)).is_disk_full());
    }
}
