//! What both Outpost programs share, and nothing else: the peering protocol's wire types, config
//! loading with environment overrides, and the small parsers both config structs use.
//!
//! # Layout
//!
//! - [`wire`]: the JSON documents of the node's peering API (`/_outpost/v1/`): content ids,
//!   manifests, announcements and peer lists. The node serves them and peer-client reads them,
//!   so each type is written once and cannot drift between the two ends.
//! - [`config_loading`]: reads a TOML file and `PREFIX__SECTION__KEY` environment overrides into
//!   a program's serde config struct.
//! - [`units`]: the size parser (`"10GiB"`) both programs' configs use.
//! - [`errors`]: formatting an error with its chain of sources on one line.
//! - [`sync`]: the one policy for poisoned locks.
//! - [`rate`]: the byte-rate cap (governor) both programs' bandwidth settings use.
//! - [`tls_roots`]: the CA file both programs' configs name, and the client trust built from it.
//!
//! **Invariant:** this crate depends on no HTTP server, no async runtime and no io_uring; the
//! peer-client links it.

pub mod config_loading;
pub mod errors;
pub mod rate;
pub mod sync;
pub mod tls_roots;
pub mod units;
pub mod wire;
