//! The discovery lock: one discovery of an unknown object per key at a time, however many
//! requests ask for it at once.
//!
//! The first request takes a [`DiscoveryPermit`] and does the work; the others get a
//! [`DiscoveryWaiter`] and share its outcome. Like pingora-cache's `lock.rs`, the permit cleans
//! up after itself: dropped without [`DiscoveryPermit::finish`] (its task panicked or was
//! cancelled), it removes its marker so the next request starts afresh, and its waiters are told
//! the discovery was abandoned. No caller writes recovery code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use outpost_shared::sync::lock;
use tokio::sync::watch;

use crate::cache::fill_limits::FillRefused;
use crate::cache::freshness::NotStorable;
use crate::cache::index::ObjectEntry;
use crate::cache::key::CacheKey;
use crate::cache::status_answer::StatusAnswer;
use crate::error::OriginError;

/// Why an object could not be looked up or discovered.
#[derive(Debug, Clone)]
pub enum DiscoverError {
    /// The origin failed or answered with something other than content.
    Origin(OriginError),
    /// The content cannot be stored (no length, a `Content-Encoding`, or the origin's
    /// `Cache-Control` forbids it); requests for it are passed through uncached.
    NotStorable(NotStorable),
    /// The request may not start a fill now (its client has too many running).
    Refused(FillRefused),
    /// The origin answered with something other than content (a redirect, `404`, `410`, a
    /// `5xx`...), relayed to every request as the origin sent it.
    Answered {
        /// The origin's answer.
        answer: Arc<StatusAnswer>,
        /// True when it was served from the kept answers rather than just received.
        kept: bool,
    },
}

/// What a discovery ends with: the indexed entry, or why there is none.
pub type DiscoveryOutcome = Result<Arc<ObjectEntry>, DiscoverError>;

type Pending = HashMap<CacheKey, watch::Receiver<Option<DiscoveryOutcome>>>;

/// Coalesces discoveries of unknown objects, one per key at a time.
#[derive(Debug, Default)]
pub struct Discoveries {
    pending: Mutex<Pending>,
}

/// The discoveries table, locked: what a caller sees and starts under one lock, so that a
/// request finds either the indexed entry or the running discovery, never neither.
pub struct LockedDiscoveries<'a> {
    discoveries: &'a Arc<Discoveries>,
    pending: MutexGuard<'a, Pending>,
}

impl Discoveries {
    /// Locks the table.
    pub fn lock(self: &Arc<Self>) -> LockedDiscoveries<'_> {
        LockedDiscoveries {
            discoveries: self,
            pending: lock(&self.pending),
        }
    }

    /// Removes `key`'s marker if it is still the one `receiver` belongs to.
    fn remove(&self, key: &CacheKey, receiver: &watch::Receiver<Option<DiscoveryOutcome>>) {
        let mut pending = lock(&self.pending);
        if pending
            .get(key)
            .is_some_and(|current| current.same_channel(receiver))
        {
            pending.remove(key);
        }
    }
}

impl LockedDiscoveries<'_> {
    /// The running discovery of `key`, if there is one.
    pub fn waiter(&self, key: &CacheKey) -> Option<DiscoveryWaiter> {
        self.pending.get(key).cloned().map(DiscoveryWaiter)
    }

    /// Starts the discovery of `key`: the permit to do it, and a waiter for its outcome.
    pub fn start(&mut self, key: &CacheKey) -> (DiscoveryPermit, DiscoveryWaiter) {
        let (sender, receiver) = watch::channel(None);
        self.pending.insert(key.clone(), receiver.clone());
        let permit = DiscoveryPermit {
            discoveries: self.discoveries.clone(),
            key: key.clone(),
            sender: Some(sender),
            receiver: receiver.clone(),
        };
        (permit, DiscoveryWaiter(receiver))
    }
}

/// The right, and the duty, to discover one key. See the module docs.
#[derive(Debug)]
pub struct DiscoveryPermit {
    discoveries: Arc<Discoveries>,
    key: CacheKey,
    sender: Option<watch::Sender<Option<DiscoveryOutcome>>>,
    receiver: watch::Receiver<Option<DiscoveryOutcome>>,
}

impl DiscoveryPermit {
    /// Publishes the outcome to every waiter. A found entry must be in the index already: the
    /// marker goes first, so a new request finds one or the other.
    pub fn finish(mut self, outcome: DiscoveryOutcome) {
        self.discoveries.remove(&self.key, &self.receiver);
        if let Some(sender) = self.sender.take() {
            sender.send_replace(Some(outcome));
        }
    }
}

impl Drop for DiscoveryPermit {
    fn drop(&mut self) {
        if self.sender.is_some() {
            // Abandoned: the marker goes, and dropping the sender wakes the waiters.
            self.discoveries.remove(&self.key, &self.receiver);
        }
    }
}

/// A wait for a running discovery's outcome.
#[derive(Debug)]
pub struct DiscoveryWaiter(watch::Receiver<Option<DiscoveryOutcome>>);

impl DiscoveryWaiter {
    /// The discovery's outcome; an abandoned discovery is an origin failure of this request.
    pub async fn outcome(mut self) -> DiscoveryOutcome {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for Some"),
            Err(_) => Err(DiscoverError::Origin(OriginError::Body(
                "discovery was abandoned".into(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey::new("origin.example", "/a")
    }

    #[tokio::test]
    async fn an_abandoned_permit_frees_the_key_and_tells_its_waiters() {
        let discoveries = Arc::new(Discoveries::default());
        let (permit, waiter) = discoveries.lock().start(&key());
        let other = discoveries.lock().waiter(&key()).expect("running");
        drop(permit);
        assert!(discoveries.lock().waiter(&key()).is_none());
        for waiter in [waiter, other] {
            assert!(matches!(
                waiter.outcome().await,
                Err(DiscoverError::Origin(OriginError::Body(_)))
            ));
        }
    }

    #[tokio::test]
    async fn a_finished_permit_answers_every_waiter_and_frees_the_key() {
        let discoveries = Arc::new(Discoveries::default());
        let (permit, waiter) = discoveries.lock().start(&key());
        permit.finish(Err(DiscoverError::NotStorable(NotStorable::NoLength)));
        assert!(discoveries.lock().waiter(&key()).is_none());
        assert!(matches!(
            waiter.outcome().await,
            Err(DiscoverError::NotStorable(NotStorable::NoLength))
        ));
    }
}
