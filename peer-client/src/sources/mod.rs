//! Where pieces come from: cache hosts, the origin and LAN peers (found through the cache
//! node's peering API), with DO's fallback timing and the cache-host ban list.

pub mod ban;
pub mod cache_host;
pub(crate) mod fallback;
pub mod node_api;
pub mod source;
