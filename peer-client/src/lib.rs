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
//! A download flows through these modules:
//!
//! - [`download`]: [`Downloader`] and the engine loop that runs one download.
//! - [`cache_host`]: where cache hosts come from (flags, config, DHCP option 235), the MCC URL
//!   rewrite and rendezvous hashing.
//! - [`fallback`] and [`ban`]: DO's timing rules (when the origin may be used, backoff) and the
//!   cache-host bans.
//! - [`source`]: cache hosts, the origin and peers as [`source::Source`]s with stats and limits.
//! - [`tracker`]: the cache node's peering API (piece manifests, peer lists, announcements).
//! - [`scheduler`]: which piece each source fetches next (in order, feedback by speed, endgame).
//! - [`http`]: one checked range request, with the stall watchdog.
//! - [`bandwidth`]: the shared rate cap (governor).
//! - [`partial`]: the partial file with positional writes and the resume state.
//! - [`integrity`]: the whole-file SHA-256 and the piece-hash interface.
//! - [`progress`]: events and the final status with DO's field names.
//!
//! `peer-client daemon` adds:
//!
//! - [`daemon`]: runs this machine's downloads into the content cache and announces them.
//! - [`control`]: the local control API on a Unix socket (status, hand-over of downloads by the
//!   daemon's user and root) and the CLI's client of it, which verifies what it writes.
//! - [`url_policy`]: the daemon fetches public URLs only, unless configured otherwise.
//! - [`store`]: the content cache (pieces of running downloads included) and its policy.
//! - [`peer_server`]: the peer port, serving pieces to other machines; [`send_guard`] drops
//!   peers that stop reading or read too slowly.
//! - [`uploads`]: upload rate, concurrency (overall and per address) and monthly caps.
//!
//! Around them: [`config`] (the one config struct) and [`error`] (typed errors).

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
