//! Content on this machine's disk: the partial file a download writes, the integrity checks
//! (whole-file SHA-256, piece hashes) and the daemon's content cache.

pub mod integrity;
pub mod partial;
pub mod store;
