//! Bounds on fills (`[fill]`), so that no client, and no crowd of clients, can make the node pull
//! more from origins or hold more memory than the node chose:
//!
//! - **Memory.** Every byte a fill holds in slice buffers, from a slice's first byte until it is
//!   on disk, is reserved from one budget of `fill.max_memory` bytes shared by all fills. A whole
//!   slice is reserved before its first byte is taken from the origin, so a started slice can
//!   always finish; a fill that cannot get budget for its next slice stops reading the origin
//!   (TCP pushes back) until another slice reaches the disk.
//! - **Concurrency.** At most `fill.max_concurrent` fills talk to origins at once; the others
//!   wait in line, first come, first served.
//! - **Per client.** One client address has at most `fill.max_per_client` requests with cold
//!   fills running. A request that would start one more waits up to `fill.client_wait` for one of
//!   them to end, then gets `503` with `Retry-After`.
//!
//! How far a fill goes once its clients have left is decided in the `fill` module; the object size
//! under which it goes to the end anyway is `fill.finish_objects_up_to`.

use outpost_shared::sync::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use outpost_shared::units::parse_size;

use crate::stats::FillGauges;

/// `[fill]`: bounds on origin fills.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FillConfig {
    /// The most bytes all fills together may hold in memory (slices being filled and slices
    /// waiting for their disk write), for example `"256MiB"`. At least two slices.
    pub max_memory: String,
    /// The most fills talking to origins at once; more wait in line.
    pub max_concurrent: usize,
    /// The most requests with cold fills one client address may have running at once.
    pub max_per_client: usize,
    /// How long a client's request waits for one of its earlier cold fills to end before it is
    /// answered `503` with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub client_wait: Duration,
    /// Objects up to this size, for example `"4MiB"`, are fetched to the end of what was asked
    /// even when every client left; larger ones stop at the end of the current slice.
    pub finish_objects_up_to: String,
}

impl Default for FillConfig {
    fn default() -> Self {
        FillConfig {
            max_memory: "256MiB".to_owned(),
            max_concurrent: 64,
            max_per_client: 8,
            client_wait: Duration::from_secs(10),
            finish_objects_up_to: "4MiB".to_owned(),
        }
    }
}

/// `[fill]` after validation.
#[derive(Debug, Clone)]
pub struct FillSettings {
    /// The raw section.
    pub raw: FillConfig,
    /// `fill.max_memory` in bytes.
    pub max_memory_bytes: u64,
    /// `fill.finish_objects_up_to` in bytes.
    pub finish_objects_up_to_bytes: u64,
}

impl FillConfig {
    /// Checks every value of the section; errors name the key. `slice_len` is
    /// `storage.slice_size` in bytes: the budget must hold at least two slices.
    /// Checks the values; an error names the key and says what is wrong, for the config layer
    /// to report (this module stays below `config`).
    pub fn validate(&self, slice_len: u64) -> Result<FillSettings, (&'static str, String)> {
        let max_memory_bytes =
            parse_size(&self.max_memory).map_err(|message| ("fill.max_memory", message))?;
        if max_memory_bytes < 2 * slice_len || max_memory_bytes > usize::MAX as u64 >> 4 {
            return Err((
                "fill.max_memory",
                format!(
                    "\"{}\" must hold at least two slices ({} bytes); use e.g. \"256MiB\"",
                    self.max_memory,
                    2 * slice_len
                ),
            ));
        }
        let finish_objects_up_to_bytes = parse_size(&self.finish_objects_up_to)
            .map_err(|message| ("fill.finish_objects_up_to", message))?;
        for (key, value, example) in [
            ("fill.max_concurrent", self.max_concurrent, 64),
            ("fill.max_per_client", self.max_per_client, 8),
        ] {
            if value == 0 || value > Semaphore::MAX_PERMITS {
                return Err((
                    key,
                    format!("{value} is not a usable count; use e.g. {example}"),
                ));
            }
        }
        Ok(FillSettings {
            raw: self.clone(),
            max_memory_bytes,
            finish_objects_up_to_bytes,
        })
    }
}

/// Why a request could not start the fills it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FillRefused {
    /// The client address already has `fill.max_per_client` requests with cold fills running,
    /// and none ended within `fill.client_wait`.
    #[error("this client already has {0} cold fills running; try again shortly")]
    ClientBusy(usize),
    /// The object has no validator (no strong ETag, no Last-Modified), so a second request
    /// could bring another version: missing slices are never added to what is stored.
    #[error("the origin gives no validator for this object, so its missing slices cannot be added to the stored ones")]
    NoValidator,
}

/// The running limits of one node.
#[derive(Debug)]
pub struct FillLimits {
    memory: Arc<Semaphore>,
    concurrent: Arc<Semaphore>,
    max_per_client: usize,
    client_wait: Duration,
    clients: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    /// `fill.finish_objects_up_to` in bytes.
    pub finish_objects_up_to: u64,
    gauges: FillGauges,
    peak_in_flight: AtomicU64,
}

impl FillLimits {
    /// Builds the limits; `gauges` are the node's, kept current from here.
    pub fn new(settings: &FillSettings, gauges: FillGauges) -> Arc<FillLimits> {
        Arc::new(FillLimits {
            memory: Arc::new(Semaphore::new(settings.max_memory_bytes as usize)),
            concurrent: Arc::new(Semaphore::new(settings.raw.max_concurrent)),
            max_per_client: settings.raw.max_per_client,
            client_wait: settings.raw.client_wait,
            clients: Mutex::new(HashMap::new()),
            finish_objects_up_to: settings.finish_objects_up_to_bytes,
            gauges,
            peak_in_flight: AtomicU64::new(0),
        })
    }

    /// The most fills that were ever talking to origins at the same moment.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak_in_flight.load(Ordering::Relaxed)
    }

    /// Waits for a turn to talk to an origin (first come, first served). The turn ends when the
    /// returned slot is dropped.
    pub async fn start_fill(self: &Arc<Self>, client: Option<Arc<ClientSlot>>) -> FillSlot {
        self.gauges.waiting.inc();
        let permit = self
            .concurrent
            .clone()
            .acquire_owned()
            .await
            .expect("the fill semaphore is never closed");
        self.gauges.waiting.dec();
        let in_flight = self.gauges.in_flight.inc() + 1;
        self.peak_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        FillSlot {
            _permit: permit,
            _client: client,
            limits: self.clone(),
        }
    }

    /// Reserves `bytes` of fill memory, waiting until other slices have released enough.
    pub async fn reserve_memory(self: &Arc<Self>, bytes: u64) -> MemoryReservation {
        // A slice is at most 64 MiB and the budget at least two slices (see `validate`), so
        // the request always fits in a u32 and can always be granted eventually.
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        let permit = self
            .memory
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("the memory semaphore is never closed");
        self.gauges.memory_bytes.inc_by(u64::from(permits));
        MemoryReservation {
            permit,
            limits: self.clone(),
        }
    }

    /// Takes one of `client`'s cold-fill slots, waiting up to `fill.client_wait` for one to free
    /// up. Requests without a known address (internal ones) are not limited.
    pub async fn client_slot(
        self: &Arc<Self>,
        client: Option<IpAddr>,
    ) -> Result<Arc<ClientSlot>, FillRefused> {
        let Some(address) = client else {
            return Ok(Arc::new(ClientSlot {
                permit: None,
                address: None,
                limits: self.clone(),
            }));
        };
        let semaphore = self
            .lock_clients()
            .entry(address)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_client)))
            .clone();
        let acquired =
            tokio::time::timeout(self.client_wait, semaphore.clone().acquire_owned()).await;
        drop(semaphore);
        match acquired {
            Ok(Ok(permit)) => Ok(Arc::new(ClientSlot {
                permit: Some(permit),
                address: Some(address),
                limits: self.clone(),
            })),
            _ => {
                self.forget_idle_client(address);
                Err(FillRefused::ClientBusy(self.max_per_client))
            }
        }
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Semaphore>>> {
        lock(&self.clients)
    }

    /// Drops the semaphore of an address nobody holds or waits for, so the map stays as small
    /// as the set of clients with fills running.
    fn forget_idle_client(&self, address: IpAddr) {
        let mut clients = self.lock_clients();
        if clients.get(&address).is_some_and(|semaphore| {
            Arc::strong_count(semaphore) == 1
                && semaphore.available_permits() == self.max_per_client
        }) {
            clients.remove(&address);
        }
    }
}

/// A fill's turn to talk to an origin; see [`FillLimits::start_fill`].
#[derive(Debug)]
pub struct FillSlot {
    _permit: OwnedSemaphorePermit,
    _client: Option<Arc<ClientSlot>>,
    limits: Arc<FillLimits>,
}

impl Drop for FillSlot {
    fn drop(&mut self) {
        self.limits.gauges.in_flight.dec();
    }
}

/// One of a client address's cold-fill slots, shared by the fills one request starts.
#[derive(Debug)]
pub struct ClientSlot {
    permit: Option<OwnedSemaphorePermit>,
    address: Option<IpAddr>,
    limits: Arc<FillLimits>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Some(address) = self.address {
            self.limits.forget_idle_client(address);
        }
    }
}

/// Bytes of fill memory held by one slice buffer; released when dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    permit: OwnedSemaphorePermit,
    limits: Arc<FillLimits>,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.limits
            .gauges
            .memory_bytes
            .dec_by(self.permit.num_permits() as u64);
    }
}

/// Who asks for a fill: the client address the per-client cap counts, and whether the fill must
/// finish without readers (a prefill, such as a manifest request). The client slot it takes is
/// shared by every fill the same request starts while any of them runs.
#[derive(Debug, Clone, Default)]
pub struct Requester {
    /// The client's address; `None` for the node's own requests, which are not capped.
    pub client: Option<IpAddr>,
    /// Fill to the end of what was asked even when nobody reads it.
    pub prefill: bool,
    /// A bandwidth cap on the fills it starts (a prefill job's).
    pub pace: Option<Pace>,
    slot: Arc<Mutex<Weak<ClientSlot>>>,
}

/// `[prefill]`: prefill jobs, as written.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefillConfig {
    /// Objects filled at once, across all prefill jobs.
    pub concurrency: usize,
    /// The origin bandwidth all prefill fills share together: `"100Mbit"`, `"50MiB"` (per
    /// second), or `"0"` for no cap.
    pub max_bandwidth: String,
    /// Scheduled prefills (`[[prefill.schedule]]`): a URL-list file prefilled in a daily window.
    pub schedule: Vec<crate::schedule::ScheduleConfig>,
}

impl Default for PrefillConfig {
    fn default() -> Self {
        PrefillConfig {
            concurrency: 2,
            max_bandwidth: "100Mbit".to_owned(),
            schedule: Vec::new(),
        }
    }
}

/// `[prefill]`, validated.
#[derive(Debug, Clone)]
pub struct PrefillSettings {
    /// Objects filled at once, across all jobs (at least 1).
    pub concurrency: usize,
    /// The shared cap in bytes per second; `None` for no cap.
    pub bytes_per_sec: Option<u64>,
    /// The scheduled prefills, in the order of their tables.
    pub schedule: Vec<crate::schedule::Schedule>,
}

impl PrefillConfig {
    /// Checks the values; an error names the key.
    pub fn validate(&self) -> Result<PrefillSettings, (String, String)> {
        if !(1..=64).contains(&self.concurrency) {
            return Err((
                "prefill.concurrency".to_owned(),
                format!("{} is outside 1..=64", self.concurrency),
            ));
        }
        let bytes_per_sec = outpost_shared::units::parse_bandwidth(&self.max_bandwidth)
            .map_err(|message| ("prefill.max_bandwidth".to_owned(), message))?;
        let schedule = self
            .schedule
            .iter()
            .enumerate()
            .map(|(index, table)| table.validate(index))
            .collect::<Result<_, _>>()?;
        Ok(PrefillSettings {
            concurrency: self.concurrency,
            bytes_per_sec,
            schedule,
        })
    }
}

/// A cap on the origin bytes of the fills a request starts, and the counter of those bytes:
/// prefill jobs (`[prefill] max_bandwidth`, `prefill_bytes`).
#[derive(Debug, Clone)]
pub struct Pace {
    /// The cap; `None` counts without capping.
    pub limiter: Option<Arc<outpost_shared::rate::ByteLimiter>>,
    /// Counts every origin byte the fills read.
    pub bytes: prometheus_client::metrics::counter::Counter,
}

impl Requester {
    /// A client request from `client`.
    pub fn client(client: Option<IpAddr>) -> Requester {
        Requester {
            client,
            ..Requester::default()
        }
    }

    /// A prefill from `client`: its fills go to the end of what it asked.
    pub fn prefill(client: Option<IpAddr>) -> Requester {
        Requester {
            client,
            prefill: true,
            ..Requester::default()
        }
    }

    /// A prefill job's: its fills go to the end and read the origin at `pace`.
    pub fn paced_prefill(pace: Pace) -> Requester {
        Requester {
            prefill: true,
            pace: Some(pace),
            ..Requester::default()
        }
    }

    /// This request's client slot: the one its running fills share, or a new one.
    pub async fn slot(&self, limits: &Arc<FillLimits>) -> Result<Arc<ClientSlot>, FillRefused> {
        let current = lock(&self.slot).upgrade();
        if let Some(slot) = current {
            return Ok(slot);
        }
        let slot = limits.client_slot(self.client).await?;
        *lock(&self.slot) = Arc::downgrade(&slot);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_memory: &str, max_concurrent: usize, max_per_client: usize) -> Arc<FillLimits> {
        let config = FillConfig {
            max_memory: max_memory.to_owned(),
            max_concurrent,
            max_per_client,
            client_wait: Duration::from_millis(50),
            ..FillConfig::default()
        };
        FillLimits::new(&config.validate(64 << 10).unwrap(), FillGauges::default())
    }

    #[tokio::test]
    async fn memory_is_granted_up_to_the_budget_and_then_waits_for_a_release() {
        let limits = limits("256KiB", 4, 4);
        let first = limits.reserve_memory(128 << 10).await;
        let _second = limits.reserve_memory(128 << 10).await;
        assert_eq!(limits.gauges.memory_bytes.get(), 256 << 10);
        let waiting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.reserve_memory(64 << 10).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the budget is spent");
        drop(first);
        let _third = waiting.await.unwrap();
        assert_eq!(limits.gauges.memory_bytes.get(), (128 + 64) << 10);
    }

    #[tokio::test]
    async fn fills_take_turns_and_the_gauges_follow() {
        let limits = limits("1MiB", 2, 8);
        let one = limits.start_fill(None).await;
        let _two = limits.start_fill(None).await;
        let third = tokio::spawn({
            let limits = limits.clone();
            async move { limits.start_fill(None).await }
        });
        while limits.gauges.waiting.get() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(limits.gauges.in_flight.get(), 2);
        drop(one);
        let _three = third.await.unwrap();
        assert_eq!(limits.gauges.waiting.get(), 0);
        assert_eq!(limits.gauges.in_flight.get(), 2);
        assert_eq!(limits.peak_in_flight(), 2);
    }

    #[tokio::test]
    async fn a_client_over_its_cap_is_refused_after_the_wait_and_others_are_not() {
        let limits = limits("1MiB", 8, 2);
        let alice: IpAddr = "10.0.0.1".parse().unwrap();
        let bob: IpAddr = "10.0.0.2".parse().unwrap();
        let one = limits.client_slot(Some(alice)).await.unwrap();
        let _two = limits.client_slot(Some(alice)).await.unwrap();
        assert_eq!(
            limits.client_slot(Some(alice)).await.unwrap_err(),
            FillRefused::ClientBusy(2)
        );
        let _bob = limits.client_slot(Some(bob)).await.unwrap();
        drop(one);
        let _three = limits.client_slot(Some(alice)).await.unwrap();
        // One request's fills share its slot.
        let requester = Requester::client(Some(bob));
        let first = requester.slot(&limits).await.unwrap();
        let again = requester.slot(&limits).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
    }

    #[test]
    fn the_section_validates_with_messages_naming_the_key() {
        let slice = 1 << 20;
        assert!(FillConfig::default().validate(slice).is_ok());
        let cases: Vec<(FillConfig, &str)> = vec![
            (
                FillConfig {
                    max_memory: "1MiB".into(),
                    ..FillConfig::default()
                },
                "fill.max_memory",
            ),
            (
                FillConfig {
                    max_memory: "lots".into(),
                    ..FillConfig::default()
                },
                "fill.max_memory",
            ),
            (
                FillConfig {
                    max_concurrent: 0,
                    ..FillConfig::default()
                },
                "fill.max_concurrent",
            ),
            (
                FillConfig {
                    max_per_client: 0,
                    ..FillConfig::default()
                },
                "fill.max_per_client",
            ),
            (
                FillConfig {
                    finish_objects_up_to: "4 MB".into(),
                    ..FillConfig::default()
                },
                "fill.finish_objects_up_to",
            ),
        ];
        for (config, key) in cases {
            let (named, message) = config.validate(slice).unwrap_err();
            assert_eq!(named, key, "{message}");
            assert!(!message.is_empty());
        }
    }
}
