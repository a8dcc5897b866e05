//! A byte-rate cap for both programs: peer-client's `max_download_bandwidth` and cache-node's
//! prefill cap. governor counts cells of [`CELL_BYTES`]; a caller that charges odd byte counts
//! carries its remainder below one cell to its next charge ([`ByteMeter`]), so rounding never
//! makes the cap stricter or looser than asked.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Bytes per governor cell, and the smallest cap a [`ByteLimiter`] enforces.
pub const CELL_BYTES: u64 = 1024;

/// A rate limiter for bytes, shared by everything it caps.
#[derive(Debug)]
pub struct ByteLimiter {
    limiter: DefaultDirectRateLimiter,
    burst_cells: u32,
    bytes_per_sec: u64,
}

impl ByteLimiter {
    /// A cap of `bytes_per_sec` (at least [`CELL_BYTES`]).
    pub fn new(bytes_per_sec: u64) -> ByteLimiter {
        let cells_per_sec = (bytes_per_sec / CELL_BYTES).clamp(1, u32::MAX as u64) as u32;
        // A burst of a twentieth of a second keeps the measured rate close to the cap over short
        // transfers, and is still larger than one network read at any useful rate.
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

    /// The cap, in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Waits until `cells` more cells may pass.
    pub async fn take(&self, mut cells: u64) {
        while cells > 0 {
            let batch = cells.min(self.burst_cells as u64) as u32;
            let batch = NonZeroU32::new(batch).expect("batch is positive");
            // The batch never exceeds the burst, so the limiter can always grant it.
            let _ = self.limiter.until_n_ready(batch).await;
            cells -= batch.get() as u64;
        }
    }
}

/// One user's charges against a shared [`ByteLimiter`], carrying the bytes below one cell.
#[derive(Debug, Default)]
pub struct ByteMeter {
    owed_bytes: u64,
}

impl ByteMeter {
    /// Waits until `bytes` more may pass `limiter`.
    pub async fn charge(&mut self, limiter: &ByteLimiter, bytes: u64) {
        self.owed_bytes += bytes;
        let cells = self.owed_bytes / CELL_BYTES;
        self.owed_bytes %= CELL_BYTES;
        limiter.take(cells).await;
    }
}
