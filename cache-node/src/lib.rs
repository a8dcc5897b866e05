//! Outpost cache-node: an HTTP caching appliance that serves byte ranges of CDN content from its
//! own disks, speaks Microsoft Connected Cache's URL contract, and fetches each byte from the
//! origin once, however many clients ask for it at the same time.
//!
//! # Layout
//!
//! A request flows through these modules in this order:
//!
//! - [`server`]: listeners, hyper connections, graceful shutdown.
//! - [`connections`]: the edge: connection caps (global and per client), header and idle
//!   timeouts, the open-file limit.
//! - [`serve`]: the client request handler (conditionals, ranges, body streaming).
//! - [`router`]: which origin a request is for (MCC, Host-header, proxy, reverse-proxy modes).
//! - [`origin`]: the allowlist and the pooled HTTP/HTTPS client for origins.
//! - [`outbound_proxy`]: reaching origins through a corporate HTTP proxy (`upstream.proxy`).
//! - [`key`]: content identity (cache keys).
//! - [`index`]: the in-memory object index (moka), bounded by bytes on disk.
//! - [`fill`]: fetching missing slices once and streaming them to every waiting client.
//! - [`fill_limits`]: the memory, concurrency and per-client bounds every fill runs under.
//! - [`freshness`]: what the origin's `Cache-Control` and `Expires` allow: storing, and for how long
//!   a stored version is served before it is checked again.
//! - [`store`]: the on-disk layout and crash recovery.
//! - [`disk`]: the [`disk::Storage`] trait and its backends.
//! - [`range`]: Range, Content-Range and conditional-request parsing.
//!
//! Peering, for peer-clients: [`peering`] (the `/_outpost/v1/` API on the client listener),
//! [`pieces`] (piece hashes computed during fills, and manifests) and [`tracker`] (which peers
//! hold which pieces).
//!
//! Around them: [`config`] (the one config struct), [`node`] (shared state), [`stats`]
//! (counters), [`admin`] (the admin listener), [`auth_throttle`] (its per-address throttle of wrong tokens) and [`error`] (typed errors).

pub mod api;
pub mod cache;
pub mod config;
pub mod disk;
pub mod error;
pub mod fill;
pub mod http;
pub mod node;
pub mod peering;
pub mod serve;
pub mod server;
pub mod stats;
pub mod upstream;
