//! Sources: where pieces come from, with their per-source statistics and connection limits.
//!
//! A [`Source`] is a cache host (reached by the MCC URL rewrite), the origin, or a peer (another
//! machine's `peer-client daemon`, found through the cache node's tracker). The scheduler only
//! sees a [`SourceId`], a [`SourceKind`], a connection limit, a measured rate and which pieces
//! the source holds; all three kinds speak HTTP range requests (`crate::net::http`).

use http::Uri;
use tokio::time::Instant;

use crate::config::CacheHost;
use crate::net::http::SourceKind;

/// Index of a source in its [`SourceTable`].
pub type SourceId = usize;

/// One place pieces can be fetched from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A cache host, asked with the MCC form of the URL.
    CacheHost {
        /// The host.
        host: CacheHost,
        /// The rewritten URL.
        url: Uri,
    },
    /// The origin, asked with the URL itself.
    Origin {
        /// The download URL.
        url: Uri,
    },
    /// A peer's daemon, asked for `/content/<content id>`.
    Peer {
        /// Its address.
        address: std::net::SocketAddr,
        /// `http://<address>/content/<content id>`.
        url: Uri,
    },
}

impl Source {
    /// The kind.
    pub fn kind(&self) -> SourceKind {
        match self {
            Source::CacheHost { .. } => SourceKind::CacheHost,
            Source::Origin { .. } => SourceKind::Origin,
            Source::Peer { .. } => SourceKind::Peer,
        }
    }

    /// A short name for progress lines and errors: the cache host, or the origin's host.
    pub fn label(&self) -> String {
        match self {
            Source::CacheHost { host, .. } => format!("cache {host}"),
            Source::Origin { url } => {
                format!(
                    "origin {}",
                    crate::sources::cache_host::origin_authority(url)
                )
            }
            Source::Peer { address, .. } => format!("peer {address}"),
        }
    }

    /// The URL to send range requests to.
    pub fn url(&self) -> &Uri {
        match self {
            Source::CacheHost { url, .. } | Source::Origin { url } | Source::Peer { url, .. } => {
                url
            }
        }
    }

    /// The cache host, for a cache source.
    pub fn cache_host(&self) -> Option<&CacheHost> {
        match self {
            Source::CacheHost { host, .. } => Some(host),
            Source::Origin { .. } | Source::Peer { .. } => None,
        }
    }
}

/// How much weight a new sample has in the rate average.
const RATE_SMOOTHING: f64 = 0.3;

/// Counters and measurements of one source during one download.
#[derive(Debug, Clone, Default)]
pub struct SourceStats {
    /// Payload bytes received from it (including pieces later discarded).
    pub bytes: u64,
    /// Pieces it completed that were kept.
    pub pieces: u64,
    /// Failed requests (bad pieces included).
    pub failures: u64,
    /// Pieces that failed their hash check.
    pub bad_pieces: u64,
    /// Requests sent (DO reports connection counts per kind).
    pub requests: u64,
    /// Smoothed bytes per second of one connection, from completed pieces.
    pub rate_per_connection: Option<f64>,
}

impl SourceStats {
    /// Folds in a completed transfer of `bytes` over `seconds`.
    pub fn record_rate(&mut self, bytes: u64, seconds: f64) {
        let sample = bytes as f64 / seconds.max(1e-3);
        self.rate_per_connection = Some(match self.rate_per_connection {
            Some(previous) => previous + RATE_SMOOTHING * (sample - previous),
            None => sample,
        });
    }
}

/// A source and its scheduling state.
#[derive(Debug, Clone)]
pub struct SourceSlot {
    /// The source.
    pub source: Source,
    /// The most parallel requests.
    pub max_connections: usize,
    /// Requests running now.
    pub in_flight: usize,
    /// Failures since its last success (drives the backoff).
    pub consecutive_failures: u32,
    /// Not before this instant (backoff).
    pub retry_at: Option<Instant>,
    /// Statistics.
    pub stats: SourceStats,
    /// Which pieces it holds (a peer still downloading); `None`: all of them.
    pub holdings: Option<Vec<bool>>,
    /// No longer asked for anything in this download (a peer banned for bad pieces, or one that
    /// kept failing).
    pub retired: bool,
}

impl SourceSlot {
    /// A fresh slot.
    pub fn new(source: Source, max_connections: usize) -> SourceSlot {
        SourceSlot {
            source,
            max_connections,
            in_flight: 0,
            consecutive_failures: 0,
            retry_at: None,
            stats: SourceStats::default(),
            holdings: None,
            retired: false,
        }
    }

    /// True when it may be asked for piece `index`.
    pub fn holds(&self, index: u64) -> bool {
        self.holdings
            .as_ref()
            .is_none_or(|held| held.get(index as usize).copied().unwrap_or(false))
    }

    /// True when its backoff has passed at `now`.
    pub fn backoff_over(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|retry_at| retry_at <= now)
    }

    /// Free connection slots.
    pub fn free_connections(&self) -> usize {
        self.max_connections.saturating_sub(self.in_flight)
    }
}

/// The sources of one download, in preference order (cache hosts in rendezvous order, then the
/// origin).
#[derive(Debug, Clone, Default)]
pub struct SourceTable {
    /// The slots; a [`SourceId`] indexes this.
    pub slots: Vec<SourceSlot>,
}

impl SourceTable {
    /// The slot of `id`.
    pub fn get(&self, id: SourceId) -> &SourceSlot {
        &self.slots[id]
    }

    /// The slot of `id`, mutably.
    pub fn get_mut(&mut self, id: SourceId) -> &mut SourceSlot {
        &mut self.slots[id]
    }

    /// The origin's id, if the download may use the origin at all.
    pub fn origin(&self) -> Option<SourceId> {
        self.slots
            .iter()
            .position(|slot| slot.source.kind() == SourceKind::Origin)
    }

    /// The ids of the peers, in the order the tracker ranked them.
    pub fn peers(&self) -> Vec<SourceId> {
        (0..self.slots.len())
            .filter(|&id| self.slots[id].source.kind() == SourceKind::Peer)
            .collect()
    }

    /// The ids of the cache hosts, in rendezvous order.
    pub fn cache_hosts(&self) -> Vec<SourceId> {
        (0..self.slots.len())
            .filter(|&id| self.slots[id].source.kind() == SourceKind::CacheHost)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_a_smoothed_average_of_pieces() {
        let mut stats = SourceStats::default();
        stats.record_rate(1000, 1.0);
        assert_eq!(stats.rate_per_connection, Some(1000.0));
        stats.record_rate(2000, 1.0);
        assert_eq!(stats.rate_per_connection, Some(1300.0));
    }

    #[test]
    fn sources_name_themselves() {
        let url: Uri = "http://example.org:8000/a".parse().unwrap();
        let host = CacheHost::parse("cache:8080").unwrap();
        let cache = Source::CacheHost {
            url: host.mcc_url(&url).parse().unwrap(),
            host,
        };
        assert_eq!(cache.label(), "cache cache:8080");
        assert_eq!(cache.kind(), SourceKind::CacheHost);
        let origin = Source::Origin { url };
        assert_eq!(origin.label(), "origin example.org:8000");
        let table = SourceTable {
            slots: vec![SourceSlot::new(cache, 8), SourceSlot::new(origin, 4)],
        };
        assert_eq!(table.origin(), Some(1));
        assert_eq!(table.cache_hosts(), [0]);
    }
}
