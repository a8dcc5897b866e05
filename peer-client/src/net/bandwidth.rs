//! The download rate cap (`max_download_bandwidth`), shared by every connection of every
//! download of one [`crate::Downloader`] through one governor rate limiter.
//!
//! A cap is absolute (`"10MiB"` per second) or a percentage. A percentage cannot mean "of the
//! link", which a client cannot know, so it means what Delivery Optimization's percentage policies
//! approximate: of the rate this download reaches unthrottled. The first
//! [`PERCENT_PROBE_WINDOW`] of a download runs without a cap and its rate is measured; the cap is
//! then that rate times the percentage, for the rest of the download.
//!
//! governor counts cells of [`CELL_BYTES`]; each connection carries its remainder below one cell
//! to its next chunk, so rounding never makes the cap stricter or looser than asked.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use outpost_shared::rate::{ByteLimiter, ByteMeter};
use tokio::time::Instant;

use crate::config::BandwidthLimit;

/// Bytes per governor cell: the smallest absolute cap [`BandwidthLimit`] accepts.
pub const CELL_BYTES: u64 = outpost_shared::rate::CELL_BYTES;

/// How long a download with a percentage cap runs unthrottled to measure its rate.
pub const PERCENT_PROBE_WINDOW: Duration = Duration::from_secs(2);

/// The cap shared by all connections of a [`crate::Downloader`].
#[derive(Debug, Clone)]
pub struct Bandwidth {
    shared: Arc<BandwidthShared>,
}

#[derive(Debug)]
struct BandwidthShared {
    limit: BandwidthLimit,
    limiter: OnceLock<ByteLimiter>,
}

impl Bandwidth {
    /// A cap as configured. An absolute cap starts at once; a percentage waits for
    /// [`Bandwidth::set_measured_rate`].
    pub fn new(limit: BandwidthLimit) -> Bandwidth {
        let limiter = OnceLock::new();
        if let BandwidthLimit::BytesPerSec(bytes_per_sec) = limit {
            let _ = limiter.set(ByteLimiter::new(bytes_per_sec));
        }
        Bandwidth {
            shared: Arc::new(BandwidthShared { limit, limiter }),
        }
    }

    /// The configured limit.
    pub fn limit(&self) -> BandwidthLimit {
        self.shared.limit
    }

    /// The cap in force, in bytes per second: `None` without a cap, or while a percentage cap
    /// waits for its measurement.
    pub fn cap_bytes_per_sec(&self) -> Option<u64> {
        self.shared.limiter.get().map(ByteLimiter::bytes_per_sec)
    }

    /// True while a percentage cap still waits for its measurement.
    pub fn wants_measurement(&self) -> bool {
        matches!(self.shared.limit, BandwidthLimit::PercentOfMeasured(_))
            && self.shared.limiter.get().is_none()
    }

    /// Sets a percentage cap from the unthrottled rate measured by a download. Later calls (from
    /// other downloads) change nothing: the first measurement stands.
    pub fn set_measured_rate(&self, measured_bytes_per_sec: u64) {
        if let BandwidthLimit::PercentOfMeasured(percent) = self.shared.limit {
            let capped =
                (measured_bytes_per_sec.saturating_mul(percent as u64) / 100).max(CELL_BYTES);
            let _ = self.shared.limiter.set(ByteLimiter::new(capped));
            tracing::info!(
                measured_bytes_per_sec,
                capped,
                "percentage bandwidth cap set"
            );
        }
    }

    /// A per-connection meter that charges the shared limiter.
    pub fn meter(&self) -> BandwidthMeter {
        BandwidthMeter {
            bandwidth: self.clone(),
            owed: ByteMeter::default(),
        }
    }
}

/// One connection's use of the shared cap: it carries the bytes below one cell between chunks.
#[derive(Debug)]
pub struct BandwidthMeter {
    bandwidth: Bandwidth,
    owed: ByteMeter,
}

impl BandwidthMeter {
    /// Waits until `bytes` more may be received. Returns at once without a cap.
    pub async fn charge(&mut self, bytes: u64) {
        let Some(limiter) = self.bandwidth.shared.limiter.get() else {
            return;
        };
        self.owed.charge(limiter, bytes).await;
    }
}

/// Measures the unthrottled rate of a download for a percentage cap.
#[derive(Debug)]
pub struct RateProbe {
    started: Instant,
    start_bytes: u64,
}

impl RateProbe {
    /// Starts measuring at `now`, when `bytes` had been received.
    pub fn new(now: Instant, bytes: u64) -> RateProbe {
        RateProbe {
            started: now,
            start_bytes: bytes,
        }
    }

    /// The measured rate once [`PERCENT_PROBE_WINDOW`] has passed, else `None`.
    pub fn finish(&self, now: Instant, bytes: u64) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < PERCENT_PROBE_WINDOW {
            return None;
        }
        let received = bytes.saturating_sub(self.start_bytes);
        Some((received as f64 / elapsed.as_secs_f64()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(BandwidthLimit::parse("0"), Ok(BandwidthLimit::Unlimited));
        assert_eq!(
            BandwidthLimit::parse("10MiB"),
            Ok(BandwidthLimit::BytesPerSec(10 << 20))
        );
        assert_eq!(
            BandwidthLimit::parse(" 50% "),
            Ok(BandwidthLimit::PercentOfMeasured(50))
        );
        for bad in ["0%", "101%", "x%", "10 Mbit", "100", "-1"] {
            assert!(BandwidthLimit::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_reports_only_after_its_window() {
        let start = Instant::now();
        let probe = RateProbe::new(start, 1000);
        assert_eq!(probe.finish(start + Duration::from_secs(1), 5000), None);
        assert_eq!(
            probe.finish(start + Duration::from_secs(2), 1000 + 2 * 4096),
            Some(4096)
        );
    }

    #[test]
    fn a_percentage_cap_is_set_once_from_the_first_measurement() {
        let bandwidth = Bandwidth::new(BandwidthLimit::PercentOfMeasured(25));
        assert!(bandwidth.wants_measurement());
        bandwidth.set_measured_rate(400 << 20);
        assert!(!bandwidth.wants_measurement());
        bandwidth.set_measured_rate(4 << 20);
        // 25 % of the first measurement (400 MiB/s), not of the second.
        assert_eq!(bandwidth.cap_bytes_per_sec(), Some(100 << 20));
    }

    #[tokio::test]
    async fn an_unlimited_meter_never_waits() {
        let mut meter = Bandwidth::new(BandwidthLimit::Unlimited).meter();
        let started = std::time::Instant::now();
        meter.charge(1 << 40).await;
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
