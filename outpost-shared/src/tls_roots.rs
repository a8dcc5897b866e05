//! The trust both programs give HTTPS peers: the public (webpki) roots plus the CA certificates
//! of an admin's PEM file (cache-node's `upstream.ca_file`, peer-client's `cache.ca_file`), read
//! and checked once at config validation.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Reads the CA certificates of the PEM file `ca_file` (none when it is empty). The error says
/// why, for the caller to prefix with its config key.
pub fn read_ca_file(ca_file: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    if ca_file.trim().is_empty() {
        return Ok(Vec::new());
    }
    let bytes =
        std::fs::read(ca_file).map_err(|error| format!("cannot read \"{ca_file}\": {error}"))?;
    let roots = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("\"{ca_file}\" is not PEM: {error}"))?;
    let mut store = rustls::RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 || ignored > 0 {
        return Err(format!(
            "\"{ca_file}\" holds {added} usable CA certificates and {ignored} unusable ones; give a PEM file of CA certificates"
        ));
    }
    Ok(roots)
}

/// A rustls client configuration (ring, TLS 1.3 and 1.2) trusting the public roots and
/// `extra_roots`. A certificate that chains to neither fails the handshake.
pub fn client_config(extra_roots: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        // `read_ca_file` parsed every certificate already.
        let _ = roots.add(root.clone());
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_ca_certificates_are_refused_and_empty_means_none() {
        assert!(read_ca_file("").unwrap().is_empty());
        assert!(read_ca_file("/nonexistent/ca.pem")
            .unwrap_err()
            .starts_with("cannot read"));
        let dir = std::env::temp_dir().join(format!("outpost-roots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        let message = read_ca_file(empty.to_str().unwrap()).unwrap_err();
        assert!(message.contains("0 usable CA certificates"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = client_config(&[]);
    }
}
