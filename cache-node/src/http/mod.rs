//! HTTP details with no cache in them: Range, Content-Range and conditional-request parsing, and
//! `sendfile` for zero-copy bodies, and
//! the per-client key of caps and throttles, and the hop-by-hop fields an intermediary removes.

pub mod access_log;
pub mod client_key;
pub mod connection_limits;
pub mod hop_by_hop;
pub mod range;
pub mod sendfile;
