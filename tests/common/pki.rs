//! A private CA made in the test (an enterprise CA stand-in) and the certificates it signs,
//! for the HTTPS scenarios of both programs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A private CA and the files of the leaves it signs, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Outpost Test Enterprise CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A leaf for 127.0.0.1 and localhost with `serial`, valid from `from_days` to `to_days`
    /// around now, written (atomically) to `cert` and `key`.
    pub fn issue(&self, serial: u64, from_days: i64, to_days: i64, cert: &Path, key: &Path) {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cache.test");
        params.serial_number = Some(serial.into());
        let now = time_now();
        let at = |days: i64| {
            rcgen::date_time_ymd(1970, 1, 1)
                + Duration::from_secs(u64::try_from(now + days * 86_400).unwrap())
        };
        params.not_before = at(from_days);
        params.not_after = at(to_days);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &self.ca).unwrap();
        replace_file(cert, leaf.pem().as_bytes());
        replace_file(key, leaf_key.serialize_pem().as_bytes());
    }

    /// A client configuration that trusts this CA (and the public roots).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(outpost_shared::tls_roots::client_config(&[self
            .ca
            .der()
            .clone()]))
    }
}

pub fn time_now() -> i64 {
    cache_node::tls::pair::unix_seconds(std::time::SystemTime::now())
}

/// Writes `bytes` beside `path` and renames it over `path`, as a careful admin (or certbot) does.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}
