//! Readiness, for `GET /ready` on the admin listener: ready once the store has been recovered
//! and every client-facing worker is accepting on its listeners, and no longer ready from the
//! first moment of shutdown. Load balancers (the HAProxy front of a cluster, Kubernetes) send
//! clients only to a ready node; `/health` stays the liveness check.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

/// Whether the node should be sent new clients.
#[derive(Debug)]
pub struct Readiness {
    /// Workers that must be accepting before the node is ready.
    workers_expected: usize,
    /// Workers that are accepting.
    workers_up: AtomicUsize,
    /// Cancelled when shutdown starts.
    stopping: CancellationToken,
}

/// Why the node is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// The store is still being recovered (answered before the node exists).
    Recovering,
    /// Some workers are not yet accepting.
    Starting {
        /// Workers accepting.
        up: usize,
        /// Workers expected.
        expected: usize,
    },
    /// Shutdown has started.
    ShuttingDown,
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Recovering => f.write_str("starting: recovering the store"),
            NotReady::Starting { up, expected } => {
                write!(f, "starting: {up} of {expected} workers accepting")
            }
            NotReady::ShuttingDown => f.write_str("shutting down"),
        }
    }
}

impl Readiness {
    /// Readiness of a node with `workers_expected` client workers, not ready until each has
    /// called [`Readiness::worker_accepting`], and not ready once `stopping` is cancelled.
    pub fn new(workers_expected: usize, stopping: CancellationToken) -> Readiness {
        Readiness {
            workers_expected,
            workers_up: AtomicUsize::new(0),
            stopping,
        }
    }

    /// One worker has registered its listeners and accepts.
    pub fn worker_accepting(&self) {
        self.workers_up.fetch_add(1, Ordering::AcqRel);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), NotReady> {
        if self.stopping.is_cancelled() {
            return Err(NotReady::ShuttingDown);
        }
        let up = self.workers_up.load(Ordering::Acquire);
        if up < self.workers_expected {
            return Err(NotReady::Starting {
                up,
                expected: self.workers_expected,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_between_every_worker_up_and_shutdown() {
        let stopping = CancellationToken::new();
        let readiness = Readiness::new(2, stopping.clone());
        assert_eq!(
            readiness.check(),
            Err(NotReady::Starting { up: 0, expected: 2 })
        );
        readiness.worker_accepting();
        assert!(readiness.check().is_err());
        readiness.worker_accepting();
        assert_eq!(readiness.check(), Ok(()));
        stopping.cancel();
        assert_eq!(readiness.check(), Err(NotReady::ShuttingDown));
        assert_eq!(NotReady::ShuttingDown.to_string(), "shutting down");
    }
}
