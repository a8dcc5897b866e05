//! Peering state for peer-clients: the `[peering]` settings, and the tracker of which peers hold
//! which pieces (see [`tracker`]). The HTTP API that peers call lives above, in `api::peering`;
//! piece hashes and manifests are the cache's (`cache::pieces`).

pub mod tracker;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::store::parse_block_size;
use tracker::Tracker;

/// `peering.max_contents_per_address` may be at most this fraction (1/N) of
/// `peering.max_contents`: no fewer addresses than this can fill the tracker by themselves.
const MIN_ADDRESSES_TO_FILL_TRACKER: usize = 4;

/// A bad `[peering]` value: the key and what is wrong with it.
fn invalid(key: &'static str, message: impl Into<String>) -> (&'static str, String) {
    (key, message.into())
}

/// `[peering]`: piece manifests and the peer tracker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeeringConfig {
    /// Serve manifests and the tracker, and hash pieces during fills. Off: every
    /// `/_outpost/` path answers 404 and fills skip hashing.
    pub enabled: bool,
    /// The piece size of manifests, for example `"1MiB"`: a power of two between 64KiB and
    /// 64MiB. Objects stored with smaller slices use pieces of one slice.
    pub piece_size: String,
    /// How long an announcement lives unless renewed.
    #[serde(with = "humantime_serde")]
    pub announce_ttl: Duration,
    /// LAN mode (1): IPv4 prefix length that counts as the same subnet.
    pub lan_prefix_v4: u8,
    /// LAN mode (1): IPv6 prefix length that counts as the same subnet.
    pub lan_prefix_v6: u8,
    /// The most content ids the tracker holds.
    pub max_contents: usize,
    /// The most peers the tracker holds per content id.
    pub max_peers_per_content: usize,
    /// The most content ids one source address may announce: a small share of `max_contents`
    /// (at most a quarter). An address over it loses its least recently renewed announcement.
    pub max_contents_per_address: usize,
    /// The most peers one query returns.
    pub max_peers_returned: usize,
    /// How long a manifest request waits for the fill of a partly stored object before answering
    /// 202 with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub manifest_wait: Duration,
}

impl Default for PeeringConfig {
    fn default() -> Self {
        PeeringConfig {
            enabled: true,
            piece_size: "1MiB".to_owned(),
            announce_ttl: Duration::from_secs(300),
            lan_prefix_v4: 24,
            lan_prefix_v6: 64,
            max_contents: 4096,
            max_peers_per_content: 64,
            max_contents_per_address: 256,
            max_peers_returned: 32,
            manifest_wait: Duration::from_secs(30),
        }
    }
}

/// `[peering]` after validation.
#[derive(Debug, Clone)]
pub struct PeeringSettings {
    /// The raw section.
    pub raw: PeeringConfig,
    /// `peering.piece_size` in bytes.
    pub piece_len: u64,
}

impl PeeringConfig {
    /// Checks every value of the section; errors name the key.
    pub fn validate(&self) -> Result<PeeringSettings, (&'static str, String)> {
        let piece_len = parse_block_size(&self.piece_size)
            .map_err(|message| ("peering.piece_size", message))?;
        if self.announce_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "peering.announce_ttl",
                "must be at least one second, e.g. \"5m\"",
            ));
        }
        if self.lan_prefix_v4 > 32 {
            return Err(invalid(
                "peering.lan_prefix_v4",
                format!("{} is longer than 32 bits; use e.g. 24", self.lan_prefix_v4),
            ));
        }
        if self.lan_prefix_v6 > 128 {
            return Err(invalid(
                "peering.lan_prefix_v6",
                format!(
                    "{} is longer than 128 bits; use e.g. 64",
                    self.lan_prefix_v6
                ),
            ));
        }
        for (key, value, example) in [
            ("peering.max_contents", self.max_contents, 4096),
            (
                "peering.max_peers_per_content",
                self.max_peers_per_content,
                64,
            ),
            (
                "peering.max_contents_per_address",
                self.max_contents_per_address,
                1024,
            ),
            ("peering.max_peers_returned", self.max_peers_returned, 32),
        ] {
            if value == 0 {
                return Err(invalid(key, format!("must be at least 1, e.g. {example}")));
            }
        }
        let largest_share = (self.max_contents / MIN_ADDRESSES_TO_FILL_TRACKER).max(1);
        if self.max_contents_per_address > largest_share {
            return Err(invalid("peering.max_contents_per_address", format!(
                    "{} is more than 1/{MIN_ADDRESSES_TO_FILL_TRACKER} of peering.max_contents ({}): a few addresses could fill the tracker; use at most {largest_share}, e.g. {}",
                    self.max_contents_per_address,
                    self.max_contents,
                    (self.max_contents / 16).max(1)
                ),
            ));
        }
        Ok(PeeringSettings {
            raw: self.clone(),
            piece_len,
        })
    }
}

/// The running peering state of a node.
#[derive(Debug)]
pub struct Peering {
    /// The tracker.
    pub tracker: Arc<Tracker>,
    /// `peering.piece_size` in bytes (pieces are never longer than a slice).
    pub piece_len: u64,
    /// `peering.manifest_wait`.
    pub manifest_wait: Duration,
    /// `peering.max_peers_returned`.
    pub max_peers_returned: usize,
}

impl Peering {
    /// Builds the peering state, or `None` when `peering.enabled` is off. Starts a task on the
    /// current runtime that sweeps expired announcements every TTL; it ends with the tracker.
    pub fn start(settings: &PeeringSettings) -> Option<Peering> {
        let raw = &settings.raw;
        if !raw.enabled {
            return None;
        }
        let tracker = Arc::new(Tracker::new(raw.clone()));
        let weak = Arc::downgrade(&tracker);
        let period = raw.announce_ttl;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                match weak.upgrade() {
                    Some(tracker) => tracker.sweep(),
                    None => return,
                }
            }
        });
        Some(Peering {
            tracker,
            piece_len: settings.piece_len,
            manifest_wait: raw.manifest_wait,
            max_peers_returned: raw.max_peers_returned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peering_values_name_their_key() {
        type Mutation = Box<dyn Fn(&mut PeeringConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.piece_size = "1 MB".into()),
                "peering.piece_size: \"1 MB\" is not a size",
            ),
            (
                Box::new(|c| c.piece_size = "3MiB".into()),
                "peering.piece_size:",
            ),
            (
                Box::new(|c| c.announce_ttl = Duration::ZERO),
                "peering.announce_ttl:",
            ),
            (Box::new(|c| c.lan_prefix_v4 = 33), "peering.lan_prefix_v4:"),
            (
                Box::new(|c| c.lan_prefix_v6 = 129),
                "peering.lan_prefix_v6:",
            ),
            (Box::new(|c| c.max_contents = 0), "peering.max_contents:"),
            (
                Box::new(|c| c.max_peers_per_content = 0),
                "peering.max_peers_per_content:",
            ),
            (
                Box::new(|c| c.max_contents_per_address = 1025),
                "peering.max_contents_per_address: 1025 is more than 1/4",
            ),
        ];
        for (mutate, expected_prefix) in cases {
            let mut config = PeeringConfig::default();
            mutate(&mut config);
            let (key, message) = config.validate().unwrap_err();
            let message = format!("{key}: {message}");
            assert!(
                message.starts_with(expected_prefix),
                "{message:?} should start with {expected_prefix:?}"
            );
        }
        let valid = PeeringConfig::default().validate().unwrap();
        assert_eq!(valid.piece_len, 1 << 20);
    }
}
