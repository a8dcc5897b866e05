//! Making certificates: `cache-node tls request` writes a new private key and a certificate
//! signing request (CSR) for the enterprise CA, as Microsoft Connected Cache does, and
//! `cache-node tls self-signed` writes a key and a self-signed certificate for labs and tests.
//!
//! Keys are ECDSA P-256 (rcgen with ring), written with mode 0600 to a temporary file in the
//! same directory and renamed into place, so a node watching the path never reads half a key.
//! The subject's common name is the first SAN; every SAN is a DNS name or an IP address.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a key, CSR or certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// No `--san` was given.
    #[error("give at least one --san: the DNS name or IP address clients use to reach the node")]
    NoSans,
    /// A SAN that is neither a DNS name nor an IP address.
    #[error("--san {san:?} is not a DNS name or IP address: {reason}")]
    BadSan {
        /// The SAN as given.
        san: String,
        /// rcgen's reason.
        reason: String,
    },
    /// `--days` of 0.
    #[error("--days must be at least 1")]
    NoDays,
    /// rcgen failed.
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write \"{}\": {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The certificate parameters of `sans`: each a DNS name or IP address, the first also the
/// subject's common name.
fn params_for(sans: &[String]) -> Result<rcgen::CertificateParams, IssueError> {
    let first = sans.first().ok_or(IssueError::NoSans)?;
    let mut params = rcgen::CertificateParams::default();
    for san in sans {
        let name = match san.parse::<std::net::IpAddr>() {
            Ok(address) => rcgen::SanType::IpAddress(address),
            Err(_) => {
                let valid_label = |label: &str| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                };
                let wildcard_free = san.strip_prefix("*.").unwrap_or(san);
                if san.len() > 253 || !wildcard_free.split('.').all(valid_label) {
                    return Err(IssueError::BadSan {
                        san: san.clone(),
                        reason: "use letters, digits, '-' and dots, e.g. cache.branch.example"
                            .into(),
                    });
                }
                rcgen::SanType::DnsName(san.clone().try_into().map_err(|error: rcgen::Error| {
                    IssueError::BadSan {
                        san: san.clone(),
                        reason: error.to_string(),
                    }
                })?)
            }
        };
        params.subject_alt_names.push(name);
    }
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, first.as_str());
    params.distinguished_name = subject;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

/// Writes a new private key to `key_path` (mode 0600) and a CSR for `sans` to `csr_path`.
pub fn write_request(sans: &[String], key_path: &Path, csr_path: &Path) -> Result<(), IssueError> {
    let params = params_for(sans)?;
    let key = rcgen::KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(csr_path, csr.pem()?.as_bytes(), 0o644)?;
    Ok(())
}

/// Writes a new private key to `key_path` (mode 0600) and a certificate for `sans`, signed by
/// that key and valid for `days` from now, to `cert_path`.
pub fn write_self_signed(
    sans: &[String],
    days: u32,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), IssueError> {
    if days == 0 {
        return Err(IssueError::NoDays);
    }
    let mut params = params_for(sans)?;
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::Duration::from_secs(
            u64::try_from(crate::tls::pair::unix_seconds(std::time::SystemTime::now()))
                .unwrap_or(0),
        );
    // A minute of slack for clocks a little behind the node's.
    params.not_before = now - std::time::Duration::from_secs(60);
    params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &rand::random::<[u8; 16]>().map(|byte| byte & 0x7f),
    ));
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_atomically(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Writes `bytes` to a new file beside `path` with `mode`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IssueError> {
    let error = |source| IssueError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| error(std::io::Error::other("not a file path")))?;
    let temporary = path.with_file_name(format!(
        ".{}.{:08x}.tmp",
        file_name.to_string_lossy(),
        rand::random::<u32>()
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error(source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_request_has_a_private_key_and_names_every_san() {
        let dir = tempfile::tempdir().unwrap();
        let (key, csr) = (dir.path().join("node.key"), dir.path().join("node.csr"));
        let sans = vec!["cache.branch.example".to_owned(), "10.1.2.3".to_owned()];
        write_request(&sans, &key, &csr).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&csr).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        use rustls_pki_types::pem::PemObject;
        use x509_parser::prelude::FromDer;
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
                .unwrap();
        assert_eq!(
            parsed.certification_request_info.subject.to_string(),
            "CN=cache.branch.example"
        );
    }

    #[test]
    fn a_self_signed_pair_loads_and_bad_sans_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
        write_self_signed(&["cache.example".to_owned()], 30, &cert, &key).unwrap();
        let pair =
            crate::tls::pair::LoadedPair::load(&cert, &key, std::time::SystemTime::now()).unwrap();
        assert_eq!(pair.info.sans, ["cache.example"]);
        assert_eq!(pair.info.subject, "CN=cache.example");
        assert!(pair.info.seconds_left(std::time::SystemTime::now()) <= 30 * 86_400);
        for bad in ["", "a b", "under_score.example", "-"] {
            let bad = vec![bad.to_owned()];
            assert!(write_self_signed(&bad, 30, &cert, &key).is_err());
        }
        assert!(matches!(
            write_self_signed(&[], 30, &cert, &key),
            Err(IssueError::NoSans)
        ));
    }
}
