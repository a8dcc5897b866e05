//! TLS for clients: the certificate the client-facing HTTPS listener presents, and the tools that
//! make one.
//!
//! - [`pair`]: reading a PEM certificate chain and private key from disk and checking them
//!   (parseable, the key matches the certificate, the certificate valid now), with what the
//!   admin should see of the certificate ([`pair::CertificateInfo`]: subject, SANs, serial,
//!   validity).
//! - [`serving`]: [`serving::ServingCertificate`], the pair in service, behind a lock that a
//!   rustls `ResolvesServerCert` reads at every handshake; it reloads when the files change (or
//!   on `SIGHUP`), keeps the old pair when the new one is broken, and warns before expiry.
//! - [`issue`]: `cache-node tls request` (a new key and a CSR for the enterprise CA) and
//!   `cache-node tls self-signed`, with rcgen.
//!
//! The listener itself (accepting, handshakes under the connection limits) is the server's
//! (`server`); this layer knows no socket.

pub mod issue;
pub mod pair;
pub mod serving;
