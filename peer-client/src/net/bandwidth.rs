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

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use crate::config::{BandwidthLimit, MIN_BYTES_PER_SEC};

/// Bytes per governor cell: the smallest absolute cap [`BandwidthLimit`] accepts.
pub const CELL_BYTES: u64 = MIN_BYTES_PER_SEC;

/// How long a download with a percentage cap runs unthrottled to measure its rate.
pub const PERCENT_PROBE_WINDOW: Duration = Duration::from_secs(2);

/// A rate limiter for bytes.
#[derive(Debug)]
struct ByteLimiter {
    limiter: DefaultDirectRateLimiter,
    burst_cells: u32,
    bytes_per_sec: u64,
}

impl ByteLimiter {
    fn new(bytes_per_sec: u64) -> ByteLimiter {
        let cells_per_sec = (bytes_per_sec / CELL_BYTES).clamp(1, u32::MAX as u64) as u32;
        // A burst of a twentieth of a second keeps the measured rate close to the cap over short
        // downloads, and is still larger than one network read at any useful rate.
        let burst_cells = (cells_per_sec / 20).max(16);
        let quota =
            Quota::per_second(NonZeroU32::new(cells_per_sec).expect("clamped to at least 1"))
                .allow_burst(NonZeroU32::new(burst_cells).expect("at least 16"));
        ByteLimiter {
            limiter: RateLimiter::direct(quota),
            burst_cells,
            bytes_per_sec,
        }
    }

    async fn take(&self, mut cells: u64) {
        while cells > 0 {
            let batch = cells.min(self.burst_cells as u64) as u32;
            let batch = NonZeroU32::new(batch).expect("batch is positive");
            // The batch never exceeds the burst, so the limiter can always grant it.
            let _ = self.limiter.until_n_ready(batch).await;
            cells -= batch.get() as u64;
        }
    }
}

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
        self.shared
            .limiter
            .get()
            .map(|limiter| limiter.bytes_per_sec)
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
            owed_bytes: 0,
        }
    }
}

/// One connection's use of the shared cap: it carries the bytes below one cell between chunks.
#[derive(Debug)]
pub struct BandwidthMeter {
    bandwidth: Bandwidth,
    owed_bytes: u64,
}

impl BandwidthMeter {
    /// Waits until `bytes` more may be received. Returns at once without a cap.
    pub async fn charge(&mut self, bytes: u64) {
        let Some(limiter) = self.bandwidth.shared.limiter.get() else {
            return;
        };
        self.owed_bytes += bytes;
        let cells = self.owed_bytes / CELL_BYTES;
        self.owed_bytes %= CELL_BYTES;
        limiter.take(cells).await;
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
        let limiter = bandwidth.shared.limiter.get().unwrap();
        // 100 MiB/s is 102400 cells per second; the burst is a twentieth of that.
        assert_eq!(limiter.burst_cells, 102_400 / 20);
    }

    #[tokio::test]
    async fn an_unlimited_meter_never_waits() {
        let mut meter = Bandwidth::new(BandwidthLimit::Unlimited).meter();
        let started = std::time::Instant::now();
        meter.charge(1 << 40).await;
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
