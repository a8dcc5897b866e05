//! Outpost peer-client: a download client in the spirit of Windows Delivery Optimization. It
//! prefers the branch office's cache node, falls back to the origin by DO's rules, downloads
//! pieces over several connections at once, resumes after an interruption, caps its bandwidth
//! and verifies what it wrote.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use peer_client::{Config, DownloadRequest, Downloader};
//!
//! let mut config = Config::default();
//! config.cache_hosts = vec!["cache.branch.example".into()];
//! let downloader = Downloader::new(config.validate()?);
//! let status = downloader
//!     .download(DownloadRequest::new("http://example.org/file.iso", "file.iso"))
//!     .await?;
//! println!("{} bytes, {}% from the cache", status.file_size, status.percent_peer_caching);
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! Folders are layers, bottom to top; a module imports only from its own layer or the layers
//! below it, and no modules refer to each other in a circle (`tests/layering.rs` checks both).
//!
//! - Foundation:
//!   - [`error`]: typed errors with their source and retry class.
//!   - [`config`]: the one config struct and its validation; `config/values.rs` holds the parsed
//!     setting types ([`config::CacheHost`], [`config::BandwidthLimit`]).
//! - [`content`]: this machine's disk.
//!   - [`content::partial`]: the partial file with positional writes and the resume state.
//!   - [`content::integrity`]: the whole-file SHA-256 and the piece-hash interface.
//!   - [`content::store`]: the daemon's content cache (pieces of running downloads included).
//! - [`net`]: the wire.
//!   - [`net::bandwidth`]: the shared download rate cap (governor).
//!   - [`net::http`]: one checked range request, with the stall watchdog.
//!   - `net::send_guard`: drops peers that stop reading or read too slowly.
//!   - `net::url_policy`: the daemon fetches public URLs only, unless configured otherwise.
//! - [`sources`]: where pieces come from.
//!   - [`sources::cache_host`]: where cache hosts come from (flags, config, DHCP option 235), the
//!     MCC URL rewrite and rendezvous hashing.
//!   - [`sources::node_api`]: the client of the cache node's peering API (piece manifests, peer
//!     lists, announcements).
//!   - [`sources::source`]: cache hosts, the origin and peers as sources with stats and limits.
//!   - `sources::fallback`: DO's timing rules (when the origin may be used, backoff).
//!   - [`sources::ban`]: the cache-host bans.
//! - [`download`]: [`Downloader`] and the engine loop that runs one download.
//!   - `download::scheduler`: which piece each source fetches next (in order, feedback by
//!     speed, endgame).
//!   - [`download::progress`]: events and the final status with DO's field names.
//!   - `dispatch`, `outcomes`, `failures`, `peering`, `resume`, `finishing`: the engine's
//!     `impl` blocks, one concern each.
//! - [`daemon`]: `peer-client daemon`; `Daemon::run` wires its parts together.
//!   - [`daemon::uploads`]: upload rate, concurrency (overall and per address) and monthly caps.
//!   - [`daemon::peer_server`]: the peer port, serving pieces to other machines; it sees only the
//!     content store and upload accounting.
//!   - [`daemon::service`]: runs this machine's downloads into the content cache and announces
//!     them.
//!   - `daemon::file_refs`: files handed back through the control API, by reference.
//!   - [`daemon::control`]: the local control API on a Unix socket (status, hand-over of
//!     downloads by the daemon's user and root) and the CLI's client of it.
//!
//! The binary (`main.rs`) sits on top and only parses arguments and calls into these.

pub mod config;
pub mod content;
pub mod daemon;
pub mod download;
pub mod error;
pub mod net;
pub mod sources;

pub use config::{Config, ValidConfig};
pub use download::progress::{Event, Status};
pub use download::{DownloadRequest, Downloader};
pub use error::DownloadError;
