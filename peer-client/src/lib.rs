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
//! - [`source`]: cache hosts and the origin as [`source::Source`]s with stats and limits (peers
//!   slot in here with issue 5).
//! - [`scheduler`]: which piece each source fetches next (in order, feedback by speed, endgame).
//! - [`http`]: one checked range request, with the stall watchdog.
//! - [`bandwidth`]: the shared rate cap (governor).
//! - [`partial`]: the partial file with positional writes and the resume state.
//! - [`integrity`]: the whole-file SHA-256 and the piece-hash interface.
//! - [`progress`]: events and the final status with DO's field names.
//!
//! Around them: [`config`] (the one config struct) and [`error`] (typed errors).

pub mod ban;
pub mod bandwidth;
pub mod cache_host;
pub mod config;
pub mod download;
pub mod error;
pub mod fallback;
pub mod http;
pub mod integrity;
pub mod partial;
pub mod progress;
pub mod scheduler;
pub mod source;

pub use config::{Config, ValidConfig};
pub use download::{DownloadRequest, Downloader};
pub use error::DownloadError;
pub use progress::{Event, Status};
