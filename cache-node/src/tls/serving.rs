//! The certificate in service, and its reloads.
//!
//! [`ServingCertificate`] holds the current [`LoadedPair`] behind a lock and resolves every
//! handshake to it (rustls's `ResolvesServerCert`), so a reload swaps the pair for the next
//! handshake while connections already open keep the keys they negotiated. [`ServingCertificate::reload`]
//! rereads both files; a pair that fails its checks is refused with a log line naming the file
//! and the reason, counted, and the old pair stays in service. The server calls it every
//! [`POLL_INTERVAL`] (files whose bytes changed are reloaded, so a rotation needs no signal) and
//! on `SIGHUP`. [`ServingCertificate::check_expiry`] warns [`EXPIRY_WARNINGS`] before the end of
//! validity.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use outpost_shared::sync::lock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;

use crate::tls::pair::{CertificateInfo, LoadedPair, PairContents, PairError};

/// How often the files are compared with the pair in service.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The days before expiry at which the log warns, largest first: each is logged once per
/// certificate.
pub const EXPIRY_WARNINGS: [u64; 2] = [30, 7];

/// The ALPN protocols the listener offers, preferred first.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// The files hold the pair in service.
    Unchanged,
    /// A new pair is in service.
    Replaced,
    /// The files changed but the new pair was refused; the old one stays.
    Refused,
}

/// The pair the TLS listener presents, swapped in place by reloads.
#[derive(Debug)]
pub struct ServingCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<LoadedPair>>,
    /// The contents of the last pair refused, so a broken pair left in place is logged once.
    last_refused: Mutex<Option<PairContents>>,
    /// The smallest [`EXPIRY_WARNINGS`] entry already logged for the certificate in service
    /// (`u64::MAX`: none).
    warned_days: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

/// `/stats`'s view of the TLS listener's certificate.
#[derive(Debug, Clone, Serialize)]
pub struct ServingSummary {
    /// The certificate in service.
    #[serde(flatten)]
    pub certificate: CertificateInfo,
    /// Seconds until it expires (negative once it has).
    pub expires_in_seconds: i64,
    /// `tls.cert`.
    pub cert_file: String,
    /// Pairs put in service by reloads since start-up.
    pub reloads: u64,
    /// New pairs refused since start-up.
    pub reload_failures: u64,
}

impl ServingCertificate {
    /// Puts `pair` (read from `cert_path` and `key_path`) in service.
    pub fn new(cert_path: &Path, key_path: &Path, pair: LoadedPair) -> ServingCertificate {
        ServingCertificate {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(Arc::new(pair)),
            last_refused: Mutex::new(None),
            warned_days: AtomicU64::new(u64::MAX),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }
    }

    /// The pair in service.
    pub fn current(&self) -> Arc<LoadedPair> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The rustls server configuration of the listener: TLS 1.3 and 1.2, ALPN `h2` and
    /// `http/1.1`, no client certificates, and this certificate for every handshake.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Rereads the files and puts a changed, valid pair in service. A broken pair is logged
    /// (once per content) and counted, and the old one stays.
    pub fn reload(&self, now: SystemTime) -> Reloaded {
        let contents = match PairContents::read(&self.cert_path, &self.key_path) {
            Ok(contents) => contents,
            Err(error) => return self.refuse(None, &error),
        };
        if contents == self.current().contents {
            return Reloaded::Unchanged;
        }
        if lock(&self.last_refused).as_ref() == Some(&contents) {
            return Reloaded::Refused;
        }
        match LoadedPair::from_contents(contents.clone(), &self.cert_path, &self.key_path, now) {
            Ok(pair) => {
                tracing::info!(
                    subject = %pair.info.subject,
                    sans = ?pair.info.sans,
                    serial = %pair.info.serial,
                    not_after = %pair.info.not_after,
                    "TLS certificate reloaded; new handshakes use it"
                );
                *lock(&self.last_refused) = None;
                match self.current.write() {
                    Ok(mut guard) => *guard = Arc::new(pair),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(pair),
                }
                self.warned_days.store(u64::MAX, Ordering::Relaxed);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                self.check_expiry(now);
                Reloaded::Replaced
            }
            Err(error) => self.refuse(Some(contents), &error),
        }
    }

    fn refuse(&self, contents: Option<PairContents>, error: &PairError) -> Reloaded {
        let mut last_refused = lock(&self.last_refused);
        // An unreadable file is logged at every poll only once too: remembered as no content.
        let seen = contents.clone().unwrap_or(PairContents {
            cert: Vec::new(),
            key: Vec::new(),
        });
        if last_refused.as_ref() != Some(&seen) {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
            let serving = self.current();
            tracing::error!(
                key = error.file().config_key(),
                %error,
                serving_serial = %serving.info.serial,
                serving_not_after = %serving.info.not_after,
                "TLS certificate reload refused; the previous certificate stays in service"
            );
            *last_refused = Some(seen);
        }
        Reloaded::Refused
    }

    /// Logs a warning when the certificate in service is within one of [`EXPIRY_WARNINGS`]
    /// (once per threshold and certificate), and returns the seconds left.
    pub fn check_expiry(&self, now: SystemTime) -> i64 {
        let pair = self.current();
        let seconds_left = pair.info.seconds_left(now);
        let days_left = u64::try_from(seconds_left.max(0)).unwrap_or(0) / 86_400;
        let due = EXPIRY_WARNINGS
            .iter()
            .copied()
            .filter(|threshold| days_left < *threshold)
            .min();
        if let Some(threshold) = due {
            if self.warned_days.fetch_min(threshold, Ordering::Relaxed) > threshold {
                tracing::warn!(
                    days_left,
                    threshold_days = threshold,
                    subject = %pair.info.subject,
                    serial = %pair.info.serial,
                    not_after = %pair.info.not_after,
                    cert = %self.cert_path.display(),
                    "TLS certificate expires soon; renew it (cache-node tls request) and replace the files: the node reloads them by itself"
                );
            }
        }
        seconds_left
    }

    /// What `/stats` shows.
    pub fn summary(&self, now: SystemTime) -> ServingSummary {
        let pair = self.current();
        ServingSummary {
            expires_in_seconds: pair.info.seconds_left(now),
            certificate: pair.info.clone(),
            cert_file: self.cert_path.display().to_string(),
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
        }
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(cert_path: &Path, key_path: &Path, serial: u64, days: i64) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["cache.example".to_owned()]).unwrap();
        params.serial_number = Some(serial.into());
        params.not_after = rcgen::date_time_ymd(2000, 1, 1)
            + Duration::from_secs(
                u64::try_from(crate::tls::pair::unix_seconds(SystemTime::now()) - 946_684_800)
                    .unwrap()
                    + u64::try_from(days * 86_400).unwrap(),
            );
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(cert_path, cert.pem()).unwrap();
        std::fs::write(key_path, key.serialize_pem()).unwrap();
    }

    #[test]
    fn a_changed_pair_replaces_the_old_one_and_a_broken_one_never_does() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_pair(&cert, &key, 1, 90);
        let now = SystemTime::now();
        let serving =
            ServingCertificate::new(&cert, &key, LoadedPair::load(&cert, &key, now).unwrap());
        assert_eq!(serving.reload(now), Reloaded::Unchanged);
        write_pair(&cert, &key, 2, 90);
        assert_eq!(serving.reload(now), Reloaded::Replaced);
        assert_eq!(serving.current().info.serial, "02");
        // A key that is not the certificate's: refused, counted once, the old pair stays.
        let (other_cert, other_key) = (dir.path().join("c2.pem"), dir.path().join("k2.pem"));
        write_pair(&other_cert, &other_key, 3, 90);
        std::fs::copy(&other_key, &key).unwrap();
        assert_eq!(serving.reload(now), Reloaded::Refused);
        assert_eq!(serving.reload(now), Reloaded::Refused);
        assert_eq!(serving.current().info.serial, "02");
        assert_eq!(serving.summary(now).reload_failures, 1);
        std::fs::copy(&other_cert, &cert).unwrap();
        assert_eq!(serving.reload(now), Reloaded::Replaced);
        assert_eq!(serving.current().info.serial, "03");
        // A missing file: refused, the pair in service stays.
        std::fs::remove_file(&key).unwrap();
        assert_eq!(serving.reload(now), Reloaded::Refused);
        assert_eq!(serving.current().info.serial, "03");
    }

    #[test]
    fn expiry_warnings_are_due_at_thirty_and_seven_days() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_pair(&cert, &key, 1, 20);
        let now = SystemTime::now();
        let serving =
            ServingCertificate::new(&cert, &key, LoadedPair::load(&cert, &key, now).unwrap());
        let left = serving.check_expiry(now);
        assert!((19 * 86_400..=20 * 86_400).contains(&left), "{left}");
        assert_eq!(serving.warned_days.load(Ordering::Relaxed), 30);
        serving.check_expiry(now + Duration::from_secs(14 * 86_400));
        assert_eq!(serving.warned_days.load(Ordering::Relaxed), 7);
    }
}
