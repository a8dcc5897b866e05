//! When the origin may be used, and how long a failing source waits before its next try: the
//! timing rules of Delivery Optimization's cache fallback, kept apart from I/O so that they are
//! tested on tokio's paused clock.
//!
//! - With no cache host (or in modes 99 and 100) the origin is the only source: always open.
//! - `delay_cache_fallback_secs = -1`: never, while cache hosts are configured.
//! - A 4xx from every cache host for this origin is a definitive "not served here": open at once.
//! - Otherwise the origin opens `delay` after the download's first cache failure (a failed
//!   request, or finding every cache host banned). A healthy cache never opens it.
//! - A failing source retries after [`Backoff::delay`]: 1 s, doubling per consecutive failure,
//!   at most 30 s (the configured values).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::FallbackDelay;

/// Exponential retry delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before the next try after `consecutive_failures` failures in a row (0: none).
    pub fn delay(&self, consecutive_failures: u32) -> Duration {
        if consecutive_failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (consecutive_failures - 1).min(31);
        self.initial
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// Whether the origin may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginGate {
    /// Yes.
    Open,
    /// Not yet; from this instant on.
    OpensAt(Instant),
    /// Not unless a cache failure happens (or never, with `-1`).
    Closed,
}

/// The fallback state of one download.
#[derive(Debug, Clone)]
pub struct FallbackPolicy {
    delay: FallbackDelay,
    has_cache_hosts: bool,
    first_cache_failure: Option<Instant>,
}

impl FallbackPolicy {
    /// A policy for a download that has `has_cache_hosts` (false in modes 99 and 100).
    pub fn new(delay: FallbackDelay, has_cache_hosts: bool) -> FallbackPolicy {
        FallbackPolicy {
            delay,
            has_cache_hosts,
            first_cache_failure: None,
        }
    }

    /// Records a cache failure at `now` (only the first one starts the delay).
    pub fn record_cache_failure(&mut self, now: Instant) {
        self.first_cache_failure.get_or_insert(now);
    }

    /// True when the origin may never be used (`-1` with cache hosts).
    pub fn origin_forbidden(&self) -> bool {
        self.has_cache_hosts && self.delay == FallbackDelay::Never
    }

    /// The gate at `now`. `every_host_refused_origin` is true when every cache host is banned
    /// for this origin by a 4xx.
    pub fn gate(&self, now: Instant, every_host_refused_origin: bool) -> OriginGate {
        if !self.has_cache_hosts {
            return OriginGate::Open;
        }
        let FallbackDelay::After(delay) = self.delay else {
            return OriginGate::Closed;
        };
        if every_host_refused_origin {
            return OriginGate::Open;
        }
        match self.first_cache_failure {
            Some(failed_at) if failed_at + delay <= now => OriginGate::Open,
            Some(failed_at) => OriginGate::OpensAt(failed_at + delay),
            None => OriginGate::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        };
        let delays: Vec<u64> = (0..8)
            .map(|failures| backoff.delay(failures).as_secs())
            .collect();
        assert_eq!(delays, [0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn without_cache_hosts_the_origin_is_open() {
        let policy = FallbackPolicy::new(FallbackDelay::Never, false);
        assert_eq!(policy.gate(Instant::now(), false), OriginGate::Open);
        assert!(!policy.origin_forbidden());
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_cache_keeps_the_origin_closed() {
        let policy = FallbackPolicy::new(FallbackDelay::After(Duration::ZERO), true);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(policy.gate(Instant::now(), false), OriginGate::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_origin_opens_the_configured_delay_after_the_first_cache_failure() {
        let mut policy = FallbackPolicy::new(FallbackDelay::After(Duration::from_secs(60)), true);
        let failed_at = Instant::now();
        policy.record_cache_failure(failed_at);
        tokio::time::advance(Duration::from_secs(10)).await;
        // A later failure does not restart the delay.
        policy.record_cache_failure(Instant::now());
        assert_eq!(
            policy.gate(Instant::now(), false),
            OriginGate::OpensAt(failed_at + Duration::from_secs(60))
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(policy.gate(Instant::now(), false), OriginGate::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_delay_opens_at_the_first_failure() {
        let mut policy = FallbackPolicy::new(FallbackDelay::After(Duration::ZERO), true);
        policy.record_cache_failure(Instant::now());
        assert_eq!(policy.gate(Instant::now(), false), OriginGate::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_every_host_opens_at_once_unless_fallback_is_never() {
        let policy = FallbackPolicy::new(FallbackDelay::After(Duration::from_secs(600)), true);
        assert_eq!(policy.gate(Instant::now(), true), OriginGate::Open);
        let mut never = FallbackPolicy::new(FallbackDelay::Never, true);
        never.record_cache_failure(Instant::now());
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert_eq!(never.gate(Instant::now(), true), OriginGate::Closed);
        assert!(never.origin_forbidden());
    }
}
