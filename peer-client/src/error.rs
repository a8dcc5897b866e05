//! Typed errors that say where a failure came from and what to do about it. The engine picks
//! its fallback (ban the host, back off, give up) from [`FetchError::class`], never from message
//! text; a caller of [`crate::Downloader`] gets a [`DownloadError`] with [`ErrorSource`] and
//! [`DownloadError::retry_later_may_help`].

use std::time::Duration;

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorSource {
    /// A cache host.
    CacheHost,
    /// The origin server.
    Origin,
    /// A LAN peer (issue 5).
    Peer,
    /// The local disk.
    Disk,
    /// The request itself (a bad URL, configuration, a wrong expected hash).
    Local,
}

/// One request to one source failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The TCP (or TLS) connection could not be opened in time, or was refused.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// No response headers arrived within the first-byte timeout.
    #[error("no response within {0:?}")]
    FirstByteTimeout(Duration),
    /// An HTTP error status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The stall watchdog aborted the transfer.
    #[error("stalled: under {floor_bytes_per_sec} B/s for {window:?}")]
    Stalled {
        /// The configured floor.
        floor_bytes_per_sec: u64,
        /// The configured window.
        window: Duration,
    },
    /// The connection failed or ended before the asked range was complete.
    #[error("transfer cut short: {0}")]
    Cut(String),
    /// The response does not answer the request (wrong Content-Range, length, framing).
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The source serves another version of the content than the one being downloaded.
    #[error("content changed: {0}")]
    ContentChanged(String),
    /// A piece did not match its hash from the piece manifest.
    #[error("piece {0} does not match its hash")]
    PieceHash(u64),
}

/// What a [`FetchError`] means for the source that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Unreachable (connect failure or timeout): a cache host is banned for every origin.
    Unreachable,
    /// A 4xx: a cache host is banned for this origin; from the origin, the download fails.
    Refused,
    /// The content differs from what is being downloaded.
    VersionMismatch,
    /// Anything else: back off and retry, elsewhere if possible.
    Transient,
}

impl FetchError {
    /// The class the engine acts on.
    pub fn class(&self) -> FailureClass {
        match self {
            FetchError::Connect(_) | FetchError::FirstByteTimeout(_) => FailureClass::Unreachable,
            // 408 (timeout) and 429 (too many requests) are invitations to retry, not refusals.
            FetchError::Status(status)
                if (400..500).contains(status) && !matches!(status, 408 | 429) =>
            {
                FailureClass::Refused
            }
            FetchError::ContentChanged(_) => FailureClass::VersionMismatch,
            _ => FailureClass::Transient,
        }
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL or request cannot be used.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The origin answered with a 4xx: the content is not there (or not for us).
    #[error("the origin refused {url}: HTTP {status}")]
    OriginRefused {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
    },
    /// The origin serves another version than the one the download started with (or than the
    /// partial file on disk holds, which is then discarded).
    #[error("{url} changed during the download ({detail}); run again to start over")]
    ContentChanged {
        /// The URL.
        url: String,
        /// Old and new validators or lengths.
        detail: String,
    },
    /// Every source kept failing.
    #[error(
        "gave up after {failures} consecutive failed requests; last from {source_label}: {last}"
    )]
    GaveUp {
        /// How many.
        failures: u32,
        /// The source of the last failure.
        source_label: String,
        /// The last failure.
        last: FetchError,
        /// Where it came from.
        origin_of_failure: ErrorSource,
    },
    /// The whole-file SHA-256 did not match, even after refetching from the origin.
    #[error("SHA-256 mismatch: expected {expected}, got {actual}{detail}")]
    IntegrityMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
        /// What was tried.
        detail: String,
    },
    /// The partial file or its state could not be written or read.
    #[error("disk: {context}: {source}")]
    Disk {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The cancellation token fired; the partial file and its state are kept for a resume.
    #[error("cancelled; run again to resume")]
    Cancelled,
}

impl DownloadError {
    /// Where the failure came from.
    pub fn error_source(&self) -> ErrorSource {
        match self {
            DownloadError::InvalidRequest(_) | DownloadError::Cancelled => ErrorSource::Local,
            DownloadError::OriginRefused { .. } | DownloadError::ContentChanged { .. } => {
                ErrorSource::Origin
            }
            DownloadError::GaveUp {
                origin_of_failure, ..
            } => *origin_of_failure,
            // The content that was served does not match: the sources are at fault, and the
            // origin was the last one asked.
            DownloadError::IntegrityMismatch { .. } => ErrorSource::Origin,
            DownloadError::Disk { .. } => ErrorSource::Disk,
        }
    }

    /// True when running the same download again later may succeed.
    pub fn retry_later_may_help(&self) -> bool {
        matches!(
            self,
            DownloadError::GaveUp { .. }
                | DownloadError::ContentChanged { .. }
                | DownloadError::Cancelled
        )
    }

    pub(crate) fn disk(context: impl Into<String>, source: std::io::Error) -> DownloadError {
        DownloadError::Disk {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_kind_not_by_text() {
        let cases = [
            (
                FetchError::Connect("refused".into()),
                FailureClass::Unreachable,
            ),
            (
                FetchError::FirstByteTimeout(Duration::from_secs(15)),
                FailureClass::Unreachable,
            ),
            (FetchError::Status(403), FailureClass::Refused),
            (FetchError::Status(404), FailureClass::Refused),
            (FetchError::Status(429), FailureClass::Transient),
            (FetchError::Status(408), FailureClass::Transient),
            (FetchError::Status(502), FailureClass::Transient),
            (FetchError::Cut("reset".into()), FailureClass::Transient),
            (
                FetchError::ContentChanged("etag".into()),
                FailureClass::VersionMismatch,
            ),
            (FetchError::PieceHash(3), FailureClass::Transient),
        ];
        for (error, class) in cases {
            assert_eq!(error.class(), class, "{error}");
        }
    }
}
