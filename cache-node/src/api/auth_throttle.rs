//! Failed admin-token attempts per client address, for throttling them: a leaky bucket per
//! address (an IPv6 /64) that fills by one per failure and drains by one per
//! [`AUTH_FAILURE_REFILL`]. The admin listener asks it before looking at a token; the server
//! creates one for the admin listener (`server::run_node`). Bounded: at most a few thousand addresses are remembered.

use outpost_shared::sync::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::http::client_key::ClientKey;

/// Wrong tokens one address may send in a row before it is throttled.
pub const AUTH_FAILURE_BURST: u32 = 10;

/// A throttled address earns one more try per this long.
pub const AUTH_FAILURE_REFILL: Duration = Duration::from_secs(1);

/// The most addresses whose failures are remembered; past it the ones with the fewest are
/// forgotten first, so a flood from many addresses cannot grow the map.
const AUTH_TRACKED_ADDRESSES: usize = 4096;

/// Failed token attempts per client address: a leaky bucket per address that fills by one per
/// failure and drains by one per [`AUTH_FAILURE_REFILL`]; a full bucket means 429.
#[derive(Debug, Default)]
pub struct AuthThrottle {
    buckets: Mutex<HashMap<ClientKey, FailureBucket>>,
}

#[derive(Debug, Clone, Copy)]
struct FailureBucket {
    /// Failures not yet drained, as of `updated`.
    level: f64,
    updated: tokio::time::Instant,
}

impl FailureBucket {
    fn level_at(&self, now: tokio::time::Instant) -> f64 {
        let drained =
            now.duration_since(self.updated).as_secs_f64() / AUTH_FAILURE_REFILL.as_secs_f64();
        (self.level - drained).max(0.0)
    }
}

impl AuthThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, FailureBucket>> {
        lock(&self.buckets)
    }

    /// How long `client` must wait before its token is looked at again, or `None` when it may
    /// try now.
    pub fn throttled_for(&self, client: ClientKey) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        let level = self.lock().get(&client)?.level_at(now);
        let burst = f64::from(AUTH_FAILURE_BURST);
        (level > burst - 1.0).then(|| AUTH_FAILURE_REFILL.mul_f64(level - (burst - 1.0)))
    }

    /// Counts a failure of `client`; returns how many failures it has not yet drained.
    pub fn record_failure(&self, client: ClientKey) -> u32 {
        let now = tokio::time::Instant::now();
        let mut buckets = self.lock();
        if buckets.len() >= AUTH_TRACKED_ADDRESSES && !buckets.contains_key(&client) {
            buckets.retain(|_, bucket| bucket.level_at(now) > 0.0);
            if buckets.len() >= AUTH_TRACKED_ADDRESSES {
                let least = buckets
                    .iter()
                    .min_by(|a, b| a.1.level_at(now).total_cmp(&b.1.level_at(now)))
                    .map(|(key, _)| *key);
                if let Some(least) = least {
                    buckets.remove(&least);
                }
            }
        }
        let bucket = buckets.entry(client).or_insert(FailureBucket {
            level: 0.0,
            updated: now,
        });
        bucket.level = bucket.level_at(now) + 1.0;
        bucket.updated = now;
        bucket.level.ceil() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_address_is_throttled_after_its_burst_then_drains_at_the_refill_rate() {
        let throttle = AuthThrottle::default();
        let attacker = ClientKey::network("10.0.0.9".parse().unwrap());
        let admin = ClientKey::network("10.0.0.1".parse().unwrap());
        for attempt in 1..=AUTH_FAILURE_BURST {
            assert_eq!(throttle.throttled_for(attacker), None, "attempt {attempt}");
            assert_eq!(throttle.record_failure(attacker), attempt);
        }
        assert_eq!(throttle.throttled_for(attacker), Some(AUTH_FAILURE_REFILL));
        // Another address is not affected.
        assert_eq!(throttle.throttled_for(admin), None);
        tokio::time::advance(AUTH_FAILURE_REFILL / 2).await;
        assert_eq!(
            throttle.throttled_for(attacker),
            Some(AUTH_FAILURE_REFILL / 2)
        );
        tokio::time::advance(AUTH_FAILURE_REFILL / 2).await;
        // One more try per refill period, and a failure throttles again at once.
        assert_eq!(throttle.throttled_for(attacker), None);
        throttle.record_failure(attacker);
        assert_eq!(throttle.throttled_for(attacker), Some(AUTH_FAILURE_REFILL));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_from_many_addresses_stays_bounded_and_keeps_the_worst_throttled() {
        let throttle = AuthThrottle::default();
        let worst = ClientKey::network("10.1.0.1".parse().unwrap());
        for _ in 0..AUTH_FAILURE_BURST {
            throttle.record_failure(worst);
        }
        for index in 0..(AUTH_TRACKED_ADDRESSES as u32 + 100) {
            let address = std::net::Ipv4Addr::from(0x0b00_0000 + index);
            throttle.record_failure(ClientKey::network(address.into()));
        }
        assert!(throttle.lock().len() <= AUTH_TRACKED_ADDRESSES);
        assert!(throttle.throttled_for(worst).is_some());
    }
}
