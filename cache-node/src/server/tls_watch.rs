//! Keeping the TLS listener's certificate current: every [`POLL_INTERVAL`] and on `SIGHUP` the
//! files are reread ([`ServingCertificate::reload`]: a changed, valid pair replaces the one in
//! service; a broken one is refused and logged), the expiry gauge is set and the expiry warnings
//! are checked.

use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::stats::Stats;
use crate::tls::serving::{ServingCertificate, POLL_INTERVAL};

/// Watches `certificate` until `stop`.
pub(super) async fn watch_certificate(
    certificate: Arc<ServingCertificate>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; the certificate files are still polled");
            None
        }
    };
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = SystemTime::now();
        let seconds_left = certificate.check_expiry(now);
        let cert_file = certificate.summary(now).cert_file;
        stats
            .tls_certificate_expiry
            .get_or_create(&vec![("cert".to_owned(), cert_file)])
            .set(seconds_left);
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ticks.tick() => {}
            _ = signalled => tracing::info!("SIGHUP: rereading the TLS certificate files"),
            () = stop.cancelled() => return,
        }
        // File reads are small but blocking; keep them off the admin runtime's thread.
        let reloading = certificate.clone();
        let _ = tokio::task::spawn_blocking(move || reloading.reload(SystemTime::now())).await;
    }
}
