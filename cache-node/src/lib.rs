//! Outpost cache-node: an HTTP caching appliance that serves byte ranges of CDN content from its
//! own disks, speaks Microsoft Connected Cache's URL contract, and fetches each byte from the
//! origin once, however many clients ask for it at the same time.
//!
//! # Layout
//!
//! Folders are layers, listed here bottom to top. A module refers only to its own layer or the
//! layers below it, and no modules refer to each other in a circle (`tests/layering.rs` checks
//! both; `docs/architecture.md` is the full map).
//!
//! - Foundation: [`error`] (typed errors that say where a failure came from), `stats`
//!   (the counters behind `/stats` and `/metrics`), [`history`] (their last 24 hours) and
//!   [`schedule`] (daily time windows, for scheduled prefills).
//! - `http`: Range and conditional parsing, `sendfile`, the per-client key, connection limits,
//!   the access log.
//!   [`disk`]: the [`disk::Storage`] trait and its io_uring and portable backends. [`tls`]: the
//!   certificate the HTTPS listener presents (checked, reloaded, described) and the tools that
//!   make keys, CSRs and self-signed certificates.
//! - [`cache`]: what an object is and where its bytes live: keys, freshness, the on-disk layout
//!   and its recovery, the index, the read-while-write slice buffers, piece hashes, the
//!   discovery lock and the fill budget.
//! - `upstream`: which origins are allowed and which one a request is for, and the HTTP client
//!   that reaches them (directly or through an outbound proxy).
//! - [`peering`]: the `[peering]` settings and the tracker of which peers hold which pieces.
//! - [`node`]: [`node::Node`], the struct of handles every layer above reads.
//! - `fill`: fetching missing slices once (discovery, runs, streaming, revalidation).
//! - `serve`: the content handler (responses, body production, pass-through).
//! - [`api`]: the peering API on the client listener and the admin listener.
//! - [`config`]: the one config struct, validated (and parsed, once) into `ValidConfig`.
//! - [`server`]: start-up, listeners and workers, the dispatcher, connection caps and timeouts.
//! - [`cli`]: the subcommands that talk to a running node (`cache-node prefill`).

pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod disk;
pub mod error;
pub(crate) mod fill;
pub mod history;
pub(crate) mod http;
pub mod node;
pub mod peering;
pub mod schedule;
pub(crate) mod serve;
pub mod server;
pub(crate) mod stats;
pub mod tls;
pub(crate) mod upstream;
