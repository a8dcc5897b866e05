//! Upload limits of the daemon: the rate cap (`max_upload_bandwidth`, a governor limiter shared
//! by every upload), the number of uploads at once (`max_concurrent_uploads`, and
//! `max_uploads_per_address` of them for one peer address, so one machine cannot hold every
//! slot) and the monthly cap (`monthly_upload_cap`), whose count is kept in `uploads.json` in
//! the cache directory so a restart does not reset it.
//!
//! An upload reserves its bytes against the monthly cap before it starts, so concurrent uploads
//! cannot overshoot it; bytes an upload did not send after all (the peer hung up) are given back.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use outpost_shared::sync::lock;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::BandwidthLimit;
use crate::net::bandwidth::{Bandwidth, BandwidthMeter};

/// The persisted monthly count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct MonthlyCount {
    /// `YYYY-MM` (UTC).
    month: String,
    /// Bytes uploaded (or reserved) in that month.
    bytes: u64,
}

/// Why an upload may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_concurrent_uploads` are running.
    Busy,
    /// `max_uploads_per_address` are running for this peer address.
    AddressBusy,
    /// The monthly cap is reached.
    MonthlyCapReached,
}

/// The daemon's upload limits.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    bandwidth: Bandwidth,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_address: usize,
    monthly_cap: Option<u64>,
    count: Arc<Mutex<MonthlyCount>>,
    path: PathBuf,
}

/// A running upload: its slot, its meter and its reservation.
#[derive(Debug)]
pub struct Upload {
    _permit: OwnedSemaphorePermit,
    _address_slot: AddressSlot,
    /// Charges the shared rate cap.
    pub meter: BandwidthMeter,
    reserved: u64,
    limits: UploadLimits,
}

impl Upload {
    /// The upload ends having sent `sent` bytes; the rest of the reservation is given back.
    pub fn finish(mut self, sent: u64) {
        let unused = self.reserved.saturating_sub(sent);
        self.reserved = 0;
        self.limits.release(unused);
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.reserved > 0 {
            // Dropped without `finish` (the task was cancelled): keep the count, the bytes may
            // have left.
            self.limits.persist();
        }
    }
}

/// One upload counted against its peer address; the count goes down when it is dropped.
#[derive(Debug)]
struct AddressSlot {
    address: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// The current month in UTC as `YYYY-MM`.
pub fn current_month(now: SystemTime) -> String {
    let days = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}")
}

impl UploadLimits {
    /// Limits as configured; the monthly count is read from `cache_dir/uploads.json`. One
    /// peer address may hold at most `max_per_address` of the `max_concurrent` slots.
    pub fn new(
        cache_dir: &std::path::Path,
        rate: BandwidthLimit,
        max_concurrent: usize,
        max_per_address: usize,
        monthly_cap: Option<u64>,
    ) -> UploadLimits {
        let path = cache_dir.join("uploads.json");
        let count = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        UploadLimits {
            bandwidth: Bandwidth::new(rate),
            slots: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            per_address: Arc::new(Mutex::new(HashMap::new())),
            max_per_address,
            monthly_cap,
            count: Arc::new(Mutex::new(count)),
            path,
        }
    }

    /// Uploads running now.
    pub fn active(&self) -> u64 {
        (self.max_concurrent - self.slots.available_permits()) as u64
    }

    /// Bytes counted this month.
    pub fn uploaded_this_month(&self) -> u64 {
        let mut count = lock(&self.count);
        roll_month(&mut count);
        count.bytes
    }

    /// Starts an upload of `bytes` to `peer`, or says why not.
    pub fn start(&self, bytes: u64, peer: IpAddr) -> Result<Upload, Refusal> {
        let address_slot = {
            let mut counts = lock(&self.per_address);
            let count = counts.entry(peer).or_insert(0);
            if *count >= self.max_per_address {
                return Err(Refusal::AddressBusy);
            }
            *count += 1;
            AddressSlot {
                address: peer,
                counts: Arc::clone(&self.per_address),
            }
        };
        let permit = Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| Refusal::Busy)?;
        {
            let mut count = lock(&self.count);
            roll_month(&mut count);
            if let Some(cap) = self.monthly_cap {
                if count.bytes.saturating_add(bytes) > cap {
                    return Err(Refusal::MonthlyCapReached);
                }
            }
            count.bytes += bytes;
        }
        self.persist();
        Ok(Upload {
            _permit: permit,
            _address_slot: address_slot,
            meter: self.bandwidth.meter(),
            reserved: bytes,
            limits: self.clone(),
        })
    }

    fn release(&self, bytes: u64) {
        if bytes > 0 {
            let mut count = lock(&self.count);
            count.bytes = count.bytes.saturating_sub(bytes);
        }
        self.persist();
    }

    /// Writes the monthly count (atomically: a temporary file renamed over the old one).
    fn persist(&self) {
        let count = lock(&self.count).clone();
        let temporary = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(&count)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&temporary, bytes))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(error) = written {
            tracing::warn!(%error, path = %self.path.display(), "cannot save the upload count");
        }
    }
}

fn roll_month(count: &mut MonthlyCount) {
    let month = current_month(SystemTime::now());
    if count.month != month {
        *count = MonthlyCount { month, bytes: 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const OTHER_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const THIRD_PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    #[test]
    fn months_are_utc_calendar_months() {
        let at = |secs: u64| current_month(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01");
        assert_eq!(at(951_782_400), "2000-02");
        assert_eq!(at(1_709_251_199), "2024-02");
        assert_eq!(at(1_709_251_200), "2024-03");
        assert_eq!(at(1_735_689_599), "2024-12");
    }

    #[test]
    fn the_monthly_cap_holds_across_a_restart_and_unused_bytes_come_back() {
        let directory = tempfile::tempdir().unwrap();
        let limits = UploadLimits::new(
            directory.path(),
            BandwidthLimit::Unlimited,
            4,
            4,
            Some(1000),
        );
        let upload = limits.start(600, PEER).unwrap();
        upload.finish(600);
        let cut = limits.start(300, PEER).unwrap();
        cut.finish(100);
        assert_eq!(limits.uploaded_this_month(), 700);
        assert_eq!(
            limits.start(400, PEER).unwrap_err(),
            Refusal::MonthlyCapReached
        );

        let restarted = UploadLimits::new(
            directory.path(),
            BandwidthLimit::Unlimited,
            4,
            4,
            Some(1000),
        );
        assert_eq!(restarted.uploaded_this_month(), 700);
        assert_eq!(
            restarted.start(400, PEER).unwrap_err(),
            Refusal::MonthlyCapReached
        );
        restarted.start(300, PEER).unwrap().finish(300);
        assert_eq!(
            restarted.start(1, PEER).unwrap_err(),
            Refusal::MonthlyCapReached
        );
    }

    #[test]
    fn uploads_beyond_the_concurrency_limit_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let limits = UploadLimits::new(directory.path(), BandwidthLimit::Unlimited, 2, 2, None);
        let first = limits.start(1, PEER).unwrap();
        let _second = limits.start(1, OTHER_PEER).unwrap();
        assert_eq!(limits.start(1, PEER).unwrap_err(), Refusal::Busy);
        assert_eq!(limits.start(1, THIRD_PEER).unwrap_err(), Refusal::Busy);
        first.finish(1);
        assert!(limits.start(1, THIRD_PEER).is_ok());
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_the_slots() {
        let directory = tempfile::tempdir().unwrap();
        let limits = UploadLimits::new(directory.path(), BandwidthLimit::Unlimited, 8, 2, None);
        let first = limits.start(1, PEER).unwrap();
        let second = limits.start(1, PEER).unwrap();
        assert_eq!(limits.start(1, PEER).unwrap_err(), Refusal::AddressBusy);
        // Other machines still get slots, and the address gets one back when an upload ends,
        // whether it finished or was dropped (a connection cut).
        let other = limits.start(1, OTHER_PEER).unwrap();
        assert_eq!(limits.active(), 3);
        first.finish(1);
        let third = limits.start(1, PEER).unwrap();
        drop(second);
        let fourth = limits.start(1, PEER).unwrap();
        assert_eq!(limits.start(1, PEER).unwrap_err(), Refusal::AddressBusy);
        drop((other, third, fourth));
        assert_eq!(limits.active(), 0);
        assert!(lock(&limits.per_address).is_empty());
    }
}
