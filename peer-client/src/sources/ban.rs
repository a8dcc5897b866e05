//! Cache-host bans, as Delivery Optimization keeps them: a timeout or connect failure bans a host
//! for every origin; a 4xx bans it for the one origin it refused ("this cache doesn't serve that
//! origin"). Bans outlive a download: one [`BanList`] belongs to a [`crate::Downloader`], so the
//! next download (and, with issue 5, the daemon) skips the host at once.
//!
//! Time is tokio's [`Instant`], so the tests run on the paused clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use outpost_shared::sync::lock;
use tokio::time::Instant;

use crate::config::CacheHost;

/// Why a host is banned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanReason {
    /// A timeout or connect failure: the host is avoided for every origin.
    Unreachable,
    /// A 4xx: the host is avoided for this origin only.
    RefusedOrigin,
}

/// A ban in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    /// Why.
    pub reason: BanReason,
    /// Until when.
    pub until: Instant,
}

/// The bans of one downloader.
#[derive(Debug, Default)]
pub struct BanList {
    /// Host bans for every origin, by host.
    unreachable: Mutex<HashMap<CacheHost, Instant>>,
    /// Host bans for one origin, by (host, origin authority).
    refused: Mutex<HashMap<(CacheHost, String), Instant>>,
}

impl BanList {
    /// An empty list.
    pub fn new() -> BanList {
        BanList::default()
    }

    /// Bans `host` for every origin until `now + duration`.
    pub fn ban_unreachable(&self, host: &CacheHost, now: Instant, duration: Duration) {
        let until = now + duration;
        let mut bans = lock(&self.unreachable);
        let entry = bans.entry(host.clone()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Bans `host` for `origin` until `now + duration`.
    pub fn ban_for_origin(&self, host: &CacheHost, origin: &str, now: Instant, duration: Duration) {
        let until = now + duration;
        let mut bans = lock(&self.refused);
        let entry = bans
            .entry((host.clone(), origin.to_owned()))
            .or_insert(until);
        *entry = (*entry).max(until);
    }

    /// The ban in force on `host` for `origin` at `now`, if any (an unreachable ban first).
    pub fn ban_on(&self, host: &CacheHost, origin: &str, now: Instant) -> Option<Ban> {
        {
            let mut bans = lock(&self.unreachable);
            if let Some(&until) = bans.get(host) {
                if until > now {
                    return Some(Ban {
                        reason: BanReason::Unreachable,
                        until,
                    });
                }
                bans.remove(host);
            }
        }
        let key = (host.clone(), origin.to_owned());
        let mut bans = lock(&self.refused);
        match bans.get(&key) {
            Some(&until) if until > now => Some(Ban {
                reason: BanReason::RefusedOrigin,
                until,
            }),
            Some(_) => {
                bans.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Lifts every ban on `host` (an admin fixed it, or a test resets).
    pub fn clear(&self, host: &CacheHost) {
        lock(&self.unreachable).remove(host);
        lock(&self.refused).retain(|(banned_host, _), _| banned_host != host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIFTEEN_MINUTES: Duration = Duration::from_secs(15 * 60);

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_host_is_banned_for_every_origin_for_fifteen_minutes() {
        let bans = BanList::new();
        let host = CacheHost::parse("cache:8080").unwrap();
        let start = Instant::now();
        bans.ban_unreachable(&host, start, FIFTEEN_MINUTES);
        for origin in ["a.example", "b.example"] {
            assert_eq!(
                bans.ban_on(&host, origin, Instant::now()).unwrap().reason,
                BanReason::Unreachable
            );
        }
        tokio::time::advance(FIFTEEN_MINUTES - Duration::from_secs(1)).await;
        assert!(bans.ban_on(&host, "a.example", Instant::now()).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(bans.ban_on(&host, "a.example", Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_bans_the_host_for_that_origin_only() {
        let bans = BanList::new();
        let host = CacheHost::parse("cache").unwrap();
        let other_host = CacheHost::parse("other").unwrap();
        bans.ban_for_origin(&host, "a.example", Instant::now(), FIFTEEN_MINUTES);
        assert_eq!(
            bans.ban_on(&host, "a.example", Instant::now())
                .unwrap()
                .reason,
            BanReason::RefusedOrigin
        );
        assert!(bans.ban_on(&host, "b.example", Instant::now()).is_none());
        assert!(bans
            .ban_on(&other_host, "a.example", Instant::now())
            .is_none());
        tokio::time::advance(FIFTEEN_MINUTES).await;
        assert!(bans.ban_on(&host, "a.example", Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_shorter_ban_does_not_shorten_an_earlier_one() {
        let bans = BanList::new();
        let host = CacheHost::parse("cache").unwrap();
        let start = Instant::now();
        bans.ban_unreachable(&host, start, FIFTEEN_MINUTES);
        bans.ban_unreachable(&host, start, Duration::from_secs(1));
        assert_eq!(
            bans.ban_on(&host, "x", start).unwrap().until,
            start + FIFTEEN_MINUTES
        );
        bans.clear(&host);
        assert!(bans.ban_on(&host, "x", start).is_none());
    }
}
