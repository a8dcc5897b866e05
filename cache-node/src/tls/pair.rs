//! A certificate and its private key, read from PEM files and checked before they serve: the
//! chain parses, the key parses and matches the first certificate, and that certificate is valid
//! now. A pair that fails any check never reaches a handshake, at start-up (the config refuses
//! it, naming `tls.cert` or `tls.key`) or at a reload (the old pair stays).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

/// Which file a problem is in: the config key that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairFile {
    /// `tls.cert`.
    Cert,
    /// `tls.key`.
    Key,
}

impl PairFile {
    /// The config key that names the file.
    pub fn config_key(self) -> &'static str {
        match self {
            PairFile::Cert => "tls.cert",
            PairFile::Key => "tls.key",
        }
    }
}

/// Why a certificate and key cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// A file cannot be read (missing, no permission).
    #[error("cannot read \"{}\": {source}", path.display())]
    Read {
        /// Which file.
        file: PairFile,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM `CERTIFICATE`, or one that does not parse.
    #[error("\"{}\" holds no usable PEM certificate: {reason}", path.display())]
    BadCertificate {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key file holds no PEM private key, or one of an unsupported kind.
    #[error("\"{}\" holds no usable PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC): {reason}", path.display())]
    BadKey {
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the certificate's.
    #[error("the key in \"{}\" does not match the certificate in \"{}\" (its public key differs); install the key the CSR was made with", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate's validity ended.
    #[error("the certificate in \"{}\" expired at {not_after}; renew it (cache-node tls request)", path.display())]
    Expired {
        /// Its path.
        path: PathBuf,
        /// When it expired, RFC 3339.
        not_after: String,
    },
    /// The certificate's validity has not begun.
    #[error("the certificate in \"{}\" is not valid before {not_before}; check the clock or the certificate", path.display())]
    NotYetValid {
        /// Its path.
        path: PathBuf,
        /// When it becomes valid, RFC 3339.
        not_before: String,
    },
}

impl PairError {
    /// The file the problem is in.
    pub fn file(&self) -> PairFile {
        match self {
            PairError::Read { file, .. } => *file,
            PairError::BadKey { .. } | PairError::KeyMismatch { .. } => PairFile::Key,
            PairError::BadCertificate { .. }
            | PairError::Expired { .. }
            | PairError::NotYetValid { .. } => PairFile::Cert,
        }
    }
}

/// What an admin sees of a certificate (`/stats`, the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateInfo {
    /// The subject's distinguished name, e.g. `CN=cache.branch.example`.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The subject alternative names: DNS names and IP addresses.
    pub sans: Vec<String>,
    /// The serial number in upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
}

impl CertificateInfo {
    /// Seconds from `now` until the end of validity (negative once expired).
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        self.not_after_unix - unix_seconds(now)
    }
}

/// A checked certificate chain and key, ready for rustls.
#[derive(Debug, Clone)]
pub struct LoadedPair {
    /// The chain and signing key rustls presents.
    pub certified: Arc<CertifiedKey>,
    /// The leaf certificate, described.
    pub info: CertificateInfo,
    /// The bytes of both files as read, to tell a change from a rewrite of the same content.
    pub contents: PairContents,
}

/// The raw contents of the two files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairContents {
    /// The certificate file.
    pub cert: Vec<u8>,
    /// The key file.
    pub key: Vec<u8>,
}

impl PairContents {
    /// Reads both files.
    pub fn read(cert_path: &Path, key_path: &Path) -> Result<PairContents, PairError> {
        let read = |file: PairFile, path: &Path| {
            std::fs::read(path).map_err(|source| PairError::Read {
                file,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(PairContents {
            cert: read(PairFile::Cert, cert_path)?,
            key: read(PairFile::Key, key_path)?,
        })
    }
}

impl LoadedPair {
    /// Reads and checks the pair at `cert_path` and `key_path`, valid at `now`.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        now: SystemTime,
    ) -> Result<LoadedPair, PairError> {
        let contents = PairContents::read(cert_path, key_path)?;
        Self::from_contents(contents, cert_path, key_path, now)
    }

    /// Checks a pair already read (paths only name the files in errors).
    pub fn from_contents(
        contents: PairContents,
        cert_path: &Path,
        key_path: &Path,
        now: SystemTime,
    ) -> Result<LoadedPair, PairError> {
        let bad_cert = |reason: String| PairError::BadCertificate {
            path: cert_path.to_path_buf(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(&contents.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| bad_cert(error.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad_cert("no -----BEGIN CERTIFICATE----- block".to_owned()))?;
        let info = describe(leaf).map_err(bad_cert)?;
        let not_before_unix = leaf_not_before(leaf).unwrap_or(i64::MIN);
        let key =
            PrivateKeyDer::from_pem_slice(&contents.key).map_err(|error| PairError::BadKey {
                path: key_path.to_path_buf(),
                reason: error.to_string(),
            })?;
        let signing_key =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(|error| {
                PairError::BadKey {
                    path: key_path.to_path_buf(),
                    reason: error.to_string(),
                }
            })?;
        let certified = CertifiedKey::new(chain, signing_key);
        if certified.keys_match().is_err() {
            return Err(PairError::KeyMismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        let now_unix = unix_seconds(now);
        if info.not_after_unix < now_unix {
            return Err(PairError::Expired {
                path: cert_path.to_path_buf(),
                not_after: info.not_after.clone(),
            });
        }
        if not_before_unix > now_unix {
            return Err(PairError::NotYetValid {
                path: cert_path.to_path_buf(),
                not_before: info.not_before.clone(),
            });
        }
        Ok(LoadedPair {
            certified: Arc::new(certified),
            info,
            contents,
        })
    }
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 for a Unix time (clamped to the epoch: certificates from before 1970 are not a
/// case worth a calendar).
fn rfc3339(unix: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(time).to_string()
}

fn leaf_not_before(leaf: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(parsed.validity().not_before.timestamp())
}

/// Describes a DER certificate for the admin.
pub fn describe(der: &CertificateDer<'_>) -> Result<CertificateInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der.as_ref()).map_err(|error| error.to_string())?;
    let mut sans = Vec::new();
    if let Ok(Some(extension)) = parsed.subject_alternative_name() {
        for name in &extension.value.general_names {
            match name {
                GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                GeneralName::IPAddress(octets) => {
                    let address = match octets.len() {
                        4 => <[u8; 4]>::try_from(*octets)
                            .ok()
                            .map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*octets)
                            .ok()
                            .map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(address) = address {
                        sans.push(address.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let serial = parsed.raw_serial();
    let significant = serial
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(serial.len().saturating_sub(1));
    let validity = parsed.validity();
    let not_after_unix = validity.not_after.timestamp();
    Ok(CertificateInfo {
        subject: parsed.subject().to_string(),
        issuer: parsed.issuer().to_string(),
        sans,
        serial: hex::encode_upper(&serial[significant..]),
        not_before: rfc3339(validity.not_before.timestamp()),
        not_after: rfc3339(not_after_unix),
        not_after_unix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, sans: &[&str], serial: u64) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(serial.into());
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join(format!("{serial}.crt"));
        let key_path = dir.join(format!("{serial}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn a_good_pair_loads_and_is_described() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), &["cache.example", "10.0.0.5"], 0xBEEF);
        let pair = LoadedPair::load(&cert, &key, SystemTime::now()).unwrap();
        assert_eq!(pair.info.sans, ["cache.example", "10.0.0.5"]);
        assert_eq!(pair.info.serial, "BEEF");
        assert!(pair.info.seconds_left(SystemTime::now()) > 0);
    }

    #[test]
    fn broken_pairs_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = write_pair(dir.path(), &["a.example"], 1);
        let (_, key_b) = write_pair(dir.path(), &["b.example"], 2);
        let now = SystemTime::now();
        let mismatch = LoadedPair::load(&cert_a, &key_b, now).unwrap_err();
        assert_eq!(mismatch.file(), PairFile::Key);
        assert!(matches!(mismatch, PairError::KeyMismatch { .. }));
        let missing = LoadedPair::load(&dir.path().join("none.crt"), &key_a, now).unwrap_err();
        assert_eq!(missing.file(), PairFile::Cert);
        let key_as_cert = LoadedPair::load(&key_a, &key_a, now).unwrap_err();
        assert!(matches!(key_as_cert, PairError::BadCertificate { .. }));
        let cert_as_key = LoadedPair::load(&cert_a, &cert_a, now).unwrap_err();
        assert!(matches!(cert_as_key, PairError::BadKey { .. }));
        let later = now + Duration::from_secs(5000 * 365 * 86_400);
        assert!(matches!(
            LoadedPair::load(&cert_a, &key_a, later).unwrap_err(),
            PairError::Expired { .. }
        ));
    }
}
