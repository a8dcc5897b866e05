//! What a download tells its caller: [`Event`]s while it runs (over a tokio channel) and a final
//! [`Status`] with Delivery Optimization's field names, which `peer-client get --json` prints.

use std::time::Duration;

use serde::Serialize;

use crate::net::http::SourceKind;

/// Bytes received from one source so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceProgress {
    /// The source's label (`cache 10.0.0.5`, `origin example.org`).
    pub label: String,
    /// Its kind.
    pub kind: SourceKind,
    /// Payload bytes received from it.
    pub bytes: u64,
    /// Requests running now.
    pub connections: usize,
}

/// A snapshot of a running download.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// The file length, once known.
    pub file_len: Option<u64>,
    /// Bytes of the file on disk (verified pieces, including those of a resume).
    pub done_bytes: u64,
    /// Bytes received in this run, from every source.
    pub received_bytes: u64,
    /// Per source.
    pub sources: Vec<SourceProgress>,
}

impl Progress {
    /// Bytes received so far from every source of `kind`.
    pub fn bytes_from(&self, kind: SourceKind) -> u64 {
        self.sources
            .iter()
            .filter(|source| source.kind == kind)
            .map(|source| source.bytes)
            .sum()
    }
}

/// Something that happened during a download.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Event {
    /// The length is known; `resumed_bytes` were already on disk from an earlier run.
    Started {
        /// The file length.
        file_len: u64,
        /// Bytes recovered from the partial file.
        resumed_bytes: u64,
    },
    /// Sent every progress interval while the download runs.
    Progress(Progress),
    /// A request to a source failed.
    SourceFailed {
        /// The source.
        label: String,
        /// Why.
        error: String,
        /// Set when the failure banned a cache host (for every origin, or this one).
        banned_for: Option<Duration>,
    },
    /// The origin is now used because the cache hosts failed (or refused this origin).
    FallbackToOrigin,
    /// All pieces are on disk; the whole-file hash is being checked.
    Verifying,
    /// The whole-file hash did not match: this many pieces are refetched from the origin.
    Repairing {
        /// How many pieces.
        pieces: usize,
    },
    /// The download has a piece manifest and asked the tracker: this many peers are known.
    PeersFound {
        /// How many.
        peers: usize,
    },
    /// A peer sent too many pieces failing their hash: it is not asked again in this download.
    PeerBanned {
        /// The peer.
        label: String,
    },
    /// Piece `index` is on disk (in the partial file), so it can be served to peers.
    PieceWritten {
        /// The piece.
        index: u64,
    },
}

/// The final state of a download, with Delivery Optimization's field names
/// (`Get-DeliveryOptimizationStatus`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Status {
    /// The file length.
    pub file_size: u64,
    /// Bytes received in this run from every source (duplicates and repairs included).
    pub total_bytes_downloaded: u64,
    /// Bytes received from cache hosts.
    pub bytes_from_cache_server: u64,
    /// Bytes received from LAN peers.
    pub bytes_from_peers: u64,
    /// Bytes received from the origin.
    pub bytes_from_http: u64,
    /// Share of the bytes received that did not come from the origin (peers and cache hosts),
    /// in percent, as DO's efficiency reports count it.
    pub percent_peer_caching: f64,
    /// Wall time of this run, as a .NET-style `hh:mm:ss.fff` string like DO prints it.
    pub download_duration: String,
    /// `Complete` on success.
    pub status: String,
    /// The cache host that served most of the bytes, or an empty string.
    pub cache_host: String,
    /// The download mode number.
    pub download_mode: u8,
    /// Requests sent to cache hosts.
    pub cache_server_connection_count: u64,
    /// Requests sent to the origin.
    pub cdn_connection_count: u64,
    /// Bytes that were already on disk from an interrupted run.
    pub bytes_resumed: u64,
    /// Wall time of this run in seconds (the same as `DownloadDuration`, for scripts).
    pub download_duration_secs: f64,
    /// Peers the tracker offered (DO's `NumPeers`).
    pub num_peers: usize,
    /// Requests sent to peers.
    pub peer_connection_count: u64,
    /// Peers banned for sending bad pieces.
    pub banned_peers: usize,
    /// Bytes received from each peer that sent any, by `peer <address>`.
    pub bytes_by_peer: std::collections::BTreeMap<String, u64>,
}

/// Formats a duration as `hh:mm:ss.fff`.
pub fn format_duration(duration: Duration) -> String {
    let total_millis = duration.as_millis();
    let hours = total_millis / 3_600_000;
    let minutes = total_millis / 60_000 % 60;
    let seconds = total_millis / 1000 % 60;
    let millis = total_millis % 1000;
    format!("{hours:02}:{minutes:02}:{seconds:02}.{millis:03}")
}

/// The percentage of `not_from_origin` in `total` (0 for an empty download).
pub fn percent_of(not_from_origin: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    (not_from_origin as f64 * 10_000.0 / total as f64).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_delivery_optimization() {
        assert_eq!(
            format_duration(Duration::from_millis(5_430)),
            "00:00:05.430"
        );
        assert_eq!(format_duration(Duration::from_secs(3_723)), "01:02:03.000");
    }

    #[test]
    fn percentages_round_to_two_decimals() {
        assert_eq!(percent_of(1, 3), 33.33);
        assert_eq!(percent_of(0, 0), 0.0);
        assert_eq!(percent_of(5, 5), 100.0);
    }

    #[test]
    fn the_status_uses_delivery_optimization_names() {
        let status = Status {
            file_size: 10,
            total_bytes_downloaded: 10,
            bytes_from_cache_server: 10,
            bytes_from_peers: 0,
            bytes_from_http: 0,
            percent_peer_caching: 100.0,
            download_duration: "00:00:01.000".into(),
            status: "Complete".into(),
            cache_host: "cache:8080".into(),
            download_mode: 0,
            cache_server_connection_count: 1,
            cdn_connection_count: 0,
            bytes_resumed: 0,
            download_duration_secs: 1.0,
            num_peers: 2,
            peer_connection_count: 0,
            banned_peers: 0,
            bytes_by_peer: Default::default(),
        };
        let json = serde_json::to_value(&status).unwrap();
        for key in [
            "FileSize",
            "TotalBytesDownloaded",
            "BytesFromCacheServer",
            "BytesFromPeers",
            "BytesFromHttp",
            "PercentPeerCaching",
            "DownloadDuration",
            "Status",
            "CacheHost",
            "DownloadMode",
            "NumPeers",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }
}
