//! The client's configuration: one serde struct, loaded from a TOML file with
//! `PEER_CLIENT__<KEY>` (top-level keys) and `PEER_CLIENT__<SECTION>__<KEY>` environment overrides,
//! then validated once so that a bad value stops the client with a message naming the key, the
//! value and a correct example. The conventions are cache-node's: sizes with binary units
//! (`"1MiB"`), durations as strings (`"3s"`), unknown keys refused.
//!
//! The top-level keys mirror Delivery Optimization's policies (`DOCacheHost`,
//! `DODelayCacheServerFallback*`, `DODownloadMode`, `DOMaxDownloadBandwidth`); the sections hold
//! the transport details DO does not expose.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

mod values;

pub use values::{BandwidthLimit, CacheHost, MIN_BYTES_PER_SEC};

pub(crate) use outpost_shared::config_loading::invalid;
pub use outpost_shared::config_loading::ConfigError;

/// The whole configuration of peer-client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Cache hosts (`host`, `host:port` or `http://host:port`), as a TOML list or one comma
    /// separated string, like DO's `DOCacheHost`. `--cache-host` on the command line wins.
    #[serde(deserialize_with = "list_or_comma_string")]
    pub cache_hosts: Vec<String>,
    /// A file holding the value of DHCP option 235 (a comma list of cache hosts), written by the
    /// DHCP client hook the admin sets up. Used when no cache host is configured otherwise.
    pub cache_host_source_file: Option<PathBuf>,
    /// Delivery Optimization download mode: 0 (HTTP + cache), 1 (LAN peers: same subnet as the
    /// cache node sees it), 2 (peers of the same `group_id`), 3 (any peer the node knows), 99
    /// (simple: origin only) or 100 (bypass: origin only). Peering needs a cache node (it serves
    /// the piece manifest and the tracker).
    pub download_mode: u8,
    /// The group peers share in download mode 2, like DO's `DOGroupId` (1 to 128 bytes).
    pub group_id: String,
    /// Seconds the origin waits, from the start of a download that peers (modes 1-3), before
    /// it is used, so that peers and the cache get a head start, like DO's
    /// `DODelayForegroundDownloadFromHttp`. `0`: no head start. It does not apply to downloads
    /// without a piece manifest.
    pub delay_http_fallback_secs: u64,
    /// Seconds to keep trying cache hosts after the first cache failure before the origin is
    /// used. `0` falls back at once; `-1` never uses the origin while cache hosts are configured.
    pub delay_cache_fallback_secs: i64,
    /// Cap on the download rate, shared by every connection: `"0"` (no cap), an absolute rate
    /// per second with a binary unit (`"10MiB"`), or a percentage (`"50%"`) of the rate measured
    /// unthrottled during the first seconds of the download.
    pub max_download_bandwidth: String,
    /// Size of one piece, the unit of scheduling, resume and verification: a multiple of 1MiB.
    pub piece_size: String,
    /// How cache hosts are contacted.
    pub cache: CacheConfig,
    /// How the origin (the URL's own host) is contacted.
    pub origin: OriginConfig,
    /// Timeouts, retries and the stall watchdog, for every source.
    pub transfer: TransferConfig,
    /// The partial file and its resume state.
    pub storage: StorageConfig,
    /// Peers as a source: manifests, the tracker and peer connections.
    pub peering: PeeringConfig,
    /// `peer-client daemon`: the content cache served to peers, upload limits, control API.
    pub daemon: DaemonConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[cache]`: cache hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Time allowed to connect to a cache host (DO uses 3 s).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a cache host is avoided after a timeout or connect failure (for every origin), or
    /// after a 4xx (for that origin only). DO uses 15 minutes.
    #[serde(with = "humantime_serde")]
    pub ban_duration: Duration,
    /// The most parallel connections to one cache host.
    pub connections_per_host: usize,
    /// A PEM file of CA certificates trusted for `https://` cache hosts besides the system's
    /// public roots: the enterprise CA that signed the cache node's certificate. Empty trusts
    /// the public roots only. `--ca-file` on the command line wins.
    pub ca_file: String,
}

/// `[origin]`: the origin server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// Time allowed to open a TCP (and TLS) connection to the origin.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The most parallel connections to the origin.
    pub connections: usize,
}

/// `[transfer]`: behaviour common to every source.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// Time allowed between sending a request and receiving the response headers. Exceeding it
    /// counts as a timeout (a cache host is banned).
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// The stall watchdog's rate floor in bytes per second (DO: 4000).
    pub stall_floor_bytes_per_sec: u64,
    /// The window over which the rate is measured against the floor (DO: 20 s).
    #[serde(with = "humantime_serde")]
    pub stall_window: Duration,
    /// First retry delay of a failing source; it doubles per consecutive failure.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// The download fails after this many consecutive failed requests without a completed piece
    /// in between, so that it never waits forever.
    pub max_consecutive_failures: u32,
}

/// `[storage]`: the partial file and the resume state beside the output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Flush the partial file before each checkpoint and before the final rename, so that a power
    /// cut never leaves a piece recorded as done that is not on disk, nor a short file under the
    /// final name. A kill -9 is survived either way.
    pub fsync: bool,
    /// How often the resume state (the bitmap of completed pieces) is written.
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
}

/// `[peering]`: peers as a source (download modes 1, 2 and 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeeringConfig {
    /// How long to wait for the cache node's piece manifest before the download starts without
    /// peers (simple mode for this download).
    #[serde(with = "humantime_serde")]
    pub manifest_timeout: Duration,
    /// How often the peer list is asked for again during a download.
    #[serde(with = "humantime_serde")]
    pub peer_refresh_interval: Duration,
    /// The most peers one download uses.
    pub max_peers: usize,
    /// The most parallel connections to one peer.
    pub connections_per_peer: usize,
    /// Time allowed to connect to a peer.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// `[daemon]`: `peer-client daemon`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where peers connect (DO uses TCP 7680). Its IP, when not unspecified, is also the source
    /// address of the daemon's requests to the cache node, so the tracker sees the address
    /// peers must use.
    pub listen: String,
    /// The control API's Unix socket (`peer-client status`, `perf-snap`, and `get` handing its
    /// work over). Any local user may read the status; only the daemon's own user and root may
    /// hand downloads over (checked with the socket's peer credentials).
    pub control_socket: PathBuf,
    /// The content cache directory (the systemd unit's `StateDirectory`).
    pub cache_dir: PathBuf,
    /// The most the content cache holds: a size (`"20GiB"`) or a percentage of the disk it is on
    /// (`"20%"`, DO's `DOMaxCacheSize` default).
    pub max_cache_size: String,
    /// Content not used for this long is deleted (DO's `DOMaxCacheAge`, 3 days).
    #[serde(with = "humantime_serde")]
    pub max_cache_age: Duration,
    /// Smaller files are not cached and skip peering (DO's `DOMinFileSizeToCache`).
    pub min_file_size_to_cache: String,
    /// Cap on the upload rate to peers, shared by every upload: `"0"` (none) or a rate per
    /// second (`"10MiB"`).
    pub max_upload_bandwidth: String,
    /// The most uploads served at once; more are answered `503`.
    pub max_concurrent_uploads: usize,
    /// Bytes uploaded to peers per calendar month (UTC) before uploads stop until the next
    /// month, kept across restarts (DO's `DOMonthlyUploadDataCap`). `"0"`: no cap.
    pub monthly_upload_cap: String,
    /// Let downloads handed to the daemon name URLs on loopback, link-local, private-range or
    /// other non-public addresses. Off: the daemon refuses them, so a local process cannot make
    /// it fetch an internal service. Cache hosts are not affected.
    pub allow_private_urls: bool,
    /// An upload whose writes make no progress for this long is dropped with its connection.
    #[serde(with = "humantime_serde")]
    pub upload_send_timeout: Duration,
    /// An upload slower than this many bytes per second over a whole `upload_min_rate_window`,
    /// while the daemon has bytes waiting to be sent, is dropped (DO's 4000 B/s for 20 s). Time
    /// held back by `max_upload_bandwidth` does not count. `0`: no minimum.
    pub upload_min_bytes_per_sec: u64,
    /// The window over which `upload_min_bytes_per_sec` is measured.
    #[serde(with = "humantime_serde")]
    pub upload_min_rate_window: Duration,
    /// The most uploads served at once to one peer address (at most `max_concurrent_uploads`
    /// apply); more are answered `503`, so one machine cannot take every upload slot.
    pub max_uploads_per_address: usize,
    /// A peer connection must send a whole request head within this time of being opened (or
    /// of its previous answer); otherwise it is closed.
    #[serde(with = "humantime_serde")]
    pub peer_header_timeout: Duration,
}

/// `[log]`: logging (the binary only; the library logs through `tracing`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, for example `warn` or `peer_client=debug`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_hosts: Vec::new(),
            cache_host_source_file: None,
            download_mode: 0,
            group_id: String::new(),
            delay_http_fallback_secs: 0,
            delay_cache_fallback_secs: 0,
            max_download_bandwidth: "0".to_owned(),
            piece_size: "1MiB".to_owned(),
            cache: CacheConfig::default(),
            origin: OriginConfig::default(),
            transfer: TransferConfig::default(),
            storage: StorageConfig::default(),
            peering: PeeringConfig::default(),
            daemon: DaemonConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            connect_timeout: Duration::from_secs(3),
            ban_duration: Duration::from_secs(15 * 60),
            connections_per_host: 8,
            ca_file: String::new(),
        }
    }
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            connect_timeout: Duration::from_secs(10),
            connections: 4,
        }
    }
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            first_byte_timeout: Duration::from_secs(15),
            stall_floor_bytes_per_sec: 4000,
            stall_window: Duration::from_secs(20),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(30),
            max_consecutive_failures: 12,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            fsync: true,
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

impl Default for PeeringConfig {
    fn default() -> Self {
        PeeringConfig {
            manifest_timeout: Duration::from_secs(10),
            peer_refresh_interval: Duration::from_secs(10),
            max_peers: 16,
            connections_per_peer: 2,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: "0.0.0.0:7680".to_owned(),
            control_socket: PathBuf::from("/run/peer-client/control.sock"),
            cache_dir: PathBuf::from("/var/lib/peer-client"),
            max_cache_size: "20%".to_owned(),
            max_cache_age: Duration::from_secs(3 * 24 * 3600),
            min_file_size_to_cache: "10MiB".to_owned(),
            max_upload_bandwidth: "0".to_owned(),
            max_concurrent_uploads: 16,
            monthly_upload_cap: "0".to_owned(),
            allow_private_urls: false,
            upload_send_timeout: Duration::from_secs(10),
            upload_min_bytes_per_sec: 4000,
            upload_min_rate_window: Duration::from_secs(20),
            max_uploads_per_address: 4,
            peer_header_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "warn".to_owned(),
        }
    }
}

/// A Delivery Optimization download mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DownloadMode {
    /// 0: HTTP only, the cache is still used.
    HttpOnly,
    /// 1: LAN peers (the same subnet, as the cache node sees addresses).
    Lan,
    /// 2: Group peers (the same `group_id`).
    Group,
    /// 3: Internet peers (any peer the cache node knows).
    Internet,
    /// 99: simple mode, no peering services and no cache: origin only.
    Simple,
    /// 100: bypass: origin only.
    Bypass,
}

impl DownloadMode {
    /// Parses DO's number for a mode.
    pub fn from_number(number: u8) -> Option<DownloadMode> {
        Some(match number {
            0 => DownloadMode::HttpOnly,
            1 => DownloadMode::Lan,
            2 => DownloadMode::Group,
            3 => DownloadMode::Internet,
            99 => DownloadMode::Simple,
            100 => DownloadMode::Bypass,
            _ => return None,
        })
    }

    /// DO's number for the mode, as reported in the status.
    pub fn number(self) -> u8 {
        match self {
            DownloadMode::HttpOnly => 0,
            DownloadMode::Lan => 1,
            DownloadMode::Group => 2,
            DownloadMode::Internet => 3,
            DownloadMode::Simple => 99,
            DownloadMode::Bypass => 100,
        }
    }

    /// Whether peers are used in this mode (1, 2 and 3).
    pub fn uses_peers(self) -> bool {
        matches!(
            self,
            DownloadMode::Lan | DownloadMode::Group | DownloadMode::Internet
        )
    }

    /// Whether cache hosts are used in this mode (not in simple and bypass modes).
    pub fn uses_cache_hosts(self) -> bool {
        !matches!(self, DownloadMode::Simple | DownloadMode::Bypass)
    }
}

/// When the origin may be used while cache hosts are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackDelay {
    /// `delay_cache_fallback_secs = -1`: never.
    Never,
    /// This long after the first cache failure of a download (zero: at once).
    After(Duration),
}

/// The configuration after validation, with sizes, modes and hosts parsed.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The raw configuration, kept for the parts that need no parsing.
    pub raw: Config,
    /// `cache_hosts`, parsed (empty when none are configured; the DHCP file is read per download).
    pub cache_hosts: Vec<CacheHost>,
    /// `download_mode`, parsed.
    pub download_mode: DownloadMode,
    /// `delay_cache_fallback_secs`, parsed.
    pub fallback_delay: FallbackDelay,
    /// `max_download_bandwidth`, parsed.
    pub bandwidth: BandwidthLimit,
    /// `piece_size` in bytes.
    pub piece_len: u64,
    /// `[daemon]` sizes and addresses, parsed.
    pub daemon: ValidDaemon,
    /// The CA certificates of `cache.ca_file`.
    pub cache_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

/// How big the content cache may grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheSizeLimit {
    /// At most this many bytes.
    Bytes(u64),
    /// At most this percentage of the disk the cache is on.
    PercentOfDisk(f64),
}

/// The parsed `[daemon]` values.
#[derive(Debug, Clone)]
pub struct ValidDaemon {
    /// `listen`.
    pub listen: std::net::SocketAddr,
    /// `max_cache_size`.
    pub max_cache_size: CacheSizeLimit,
    /// `min_file_size_to_cache` in bytes.
    pub min_file_size_to_cache: u64,
    /// `max_upload_bandwidth`.
    pub max_upload_bandwidth: BandwidthLimit,
    /// `monthly_upload_cap` in bytes, `None` for no cap.
    pub monthly_upload_cap: Option<u64>,
}

impl Config {
    /// Loads a configuration file (if given) and applies `PEER_CLIENT__...` overrides from the
    /// process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], but takes the environment from `env` when given (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        Ok(outpost_shared::config_loading::load(
            "PEER_CLIENT",
            path,
            env,
        )?)
    }

    /// Checks every value and parses sizes, modes and hosts.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        let cache_hosts = self
            .cache_hosts
            .iter()
            .map(|text| CacheHost::parse(text).map_err(|message| invalid("cache_hosts", message)))
            .collect::<Result<Vec<_>, _>>()?;
        let cache_roots = outpost_shared::tls_roots::read_ca_file(&self.cache.ca_file)
            .map_err(|message| invalid("cache.ca_file", message))?;
        let download_mode = DownloadMode::from_number(self.download_mode).ok_or_else(|| {
            invalid(
                "download_mode",
                format!(
                    "{} is not a Delivery Optimization mode; use 0, 1, 2, 3, 99 or 100",
                    self.download_mode
                ),
            )
        })?;
        let fallback_delay = match self.delay_cache_fallback_secs {
            -1 => FallbackDelay::Never,
            seconds if seconds >= 0 => FallbackDelay::After(Duration::from_secs(seconds as u64)),
            other => {
                return Err(invalid(
                    "delay_cache_fallback_secs",
                    format!(
                        "{other} is not allowed; use -1 (never), 0 (at once) or seconds, e.g. 60"
                    ),
                ))
            }
        };
        let bandwidth = BandwidthLimit::parse(&self.max_download_bandwidth)
            .map_err(|message| invalid("max_download_bandwidth", message))?;
        let piece_len =
            parse_size(&self.piece_size).map_err(|message| invalid("piece_size", message))?;
        if piece_len == 0 || piece_len % (1 << 20) != 0 || piece_len > 64 << 20 {
            return Err(invalid(
                "piece_size",
                format!(
                    "\"{}\" must be a multiple of 1MiB, at most 64MiB, e.g. \"1MiB\"",
                    self.piece_size
                ),
            ));
        }
        for (key, value) in [
            (
                "cache.connections_per_host",
                self.cache.connections_per_host,
            ),
            ("origin.connections", self.origin.connections),
        ] {
            if value == 0 || value > 64 {
                return Err(invalid(
                    key,
                    format!("{value} must be between 1 and 64, e.g. 4"),
                ));
            }
        }
        for (key, value) in [
            ("cache.connect_timeout", self.cache.connect_timeout),
            ("origin.connect_timeout", self.origin.connect_timeout),
            (
                "transfer.first_byte_timeout",
                self.transfer.first_byte_timeout,
            ),
            ("transfer.stall_window", self.transfer.stall_window),
            (
                "transfer.retry_initial_backoff",
                self.transfer.retry_initial_backoff,
            ),
            (
                "storage.checkpoint_interval",
                self.storage.checkpoint_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero, e.g. \"3s\""));
            }
        }
        if self.transfer.retry_max_backoff < self.transfer.retry_initial_backoff {
            return Err(invalid(
                "transfer.retry_max_backoff",
                "must be at least transfer.retry_initial_backoff, e.g. \"30s\"",
            ));
        }
        if download_mode == DownloadMode::Group
            && (self.group_id.is_empty() || self.group_id.len() > 128)
        {
            return Err(invalid(
                "group_id",
                "download_mode 2 (Group) needs a group_id of 1 to 128 bytes, e.g. \"branch-17\"",
            ));
        }
        for (key, value) in [
            ("peering.max_peers", self.peering.max_peers),
            (
                "peering.connections_per_peer",
                self.peering.connections_per_peer,
            ),
            (
                "daemon.max_concurrent_uploads",
                self.daemon.max_concurrent_uploads,
            ),
        ] {
            if value == 0 || value > 256 {
                return Err(invalid(
                    key,
                    format!("{value} must be between 1 and 256, e.g. 8"),
                ));
            }
        }
        for (key, value) in [
            ("peering.manifest_timeout", self.peering.manifest_timeout),
            (
                "peering.peer_refresh_interval",
                self.peering.peer_refresh_interval,
            ),
            ("peering.connect_timeout", self.peering.connect_timeout),
            ("daemon.max_cache_age", self.daemon.max_cache_age),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero, e.g. \"10s\""));
            }
        }
        let daemon = self.daemon.validate()?;
        if self.transfer.max_consecutive_failures == 0 {
            return Err(invalid(
                "transfer.max_consecutive_failures",
                "must be at least 1, e.g. 12",
            ));
        }
        Ok(ValidConfig {
            raw: self,
            cache_hosts,
            cache_roots,
            download_mode,
            fallback_delay,
            bandwidth,
            piece_len,
            daemon,
        })
    }
}

impl DaemonConfig {
    fn validate(&self) -> Result<ValidDaemon, ConfigError> {
        let address = |key: &str, text: &str| {
            text.parse::<std::net::SocketAddr>().map_err(|_| {
                invalid(
                    key,
                    format!("\"{text}\" is not an address and port; use e.g. \"0.0.0.0:7680\""),
                )
            })
        };
        let listen = address("daemon.listen", &self.listen)?;
        if self.control_socket.as_os_str().is_empty() || self.control_socket.as_os_str().len() > 100
        {
            return Err(invalid(
                "daemon.control_socket",
                format!(
                    "\"{}\" must be a path of 1 to 100 bytes (a Unix socket's limit), e.g. \"/run/peer-client/control.sock\"",
                    self.control_socket.display()
                ),
            ));
        }
        for (key, value) in [
            ("daemon.upload_send_timeout", self.upload_send_timeout),
            ("daemon.upload_min_rate_window", self.upload_min_rate_window),
            ("daemon.peer_header_timeout", self.peer_header_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero, e.g. \"10s\""));
            }
        }
        if self.max_uploads_per_address == 0 || self.max_uploads_per_address > 256 {
            return Err(invalid(
                "daemon.max_uploads_per_address",
                format!(
                    "{} must be between 1 and 256, e.g. 4",
                    self.max_uploads_per_address
                ),
            ));
        }
        let max_cache_size = match self.max_cache_size.trim().strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<f64>() {
                Ok(value) if value > 0.0 && value <= 100.0 => CacheSizeLimit::PercentOfDisk(value),
                _ => {
                    return Err(invalid(
                        "daemon.max_cache_size",
                        format!(
                            "\"{}\" must be a percentage above 0 and at most 100, or a size, e.g. \"20%\" or \"20GiB\"",
                            self.max_cache_size
                        ),
                    ))
                }
            },
            None => CacheSizeLimit::Bytes(
                parse_size(&self.max_cache_size)
                    .map_err(|message| invalid("daemon.max_cache_size", message))?,
            ),
        };
        let min_file_size_to_cache = parse_size(&self.min_file_size_to_cache)
            .map_err(|message| invalid("daemon.min_file_size_to_cache", message))?;
        let max_upload_bandwidth = match BandwidthLimit::parse(&self.max_upload_bandwidth) {
            Ok(BandwidthLimit::PercentOfMeasured(_)) => {
                return Err(invalid(
                    "daemon.max_upload_bandwidth",
                    "must be \"0\" or a rate such as \"10MiB\" (per second), not a percentage",
                ))
            }
            Ok(limit) => limit,
            Err(message) => return Err(invalid("daemon.max_upload_bandwidth", message)),
        };
        let monthly_upload_cap = match parse_size(&self.monthly_upload_cap)
            .map_err(|message| invalid("daemon.monthly_upload_cap", message))?
        {
            0 => None,
            bytes => Some(bytes),
        };
        Ok(ValidDaemon {
            listen,
            max_cache_size,
            min_file_size_to_cache,
            max_upload_bandwidth,
            monthly_upload_cap,
        })
    }
}

/// Accepts a list of strings or one comma-separated string (as an environment variable gives).
fn list_or_comma_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Text(String),
    }
    Ok(match ListOrString::deserialize(deserializer)? {
        ListOrString::List(items) => items,
        ListOrString::Text(text) => split_comma_list(&text),
    })
}

/// Splits a comma list (`DOCacheHost`, DHCP option 235) into trimmed, non-empty items.
pub fn split_comma_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

pub use outpost_shared::units::parse_size;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_validate_and_follow_delivery_optimization() {
        let valid = Config::default().validate().unwrap();
        assert_eq!(valid.piece_len, 1 << 20);
        assert_eq!(valid.download_mode, DownloadMode::HttpOnly);
        assert_eq!(valid.fallback_delay, FallbackDelay::After(Duration::ZERO));
        assert_eq!(valid.raw.cache.connect_timeout, Duration::from_secs(3));
        assert_eq!(valid.raw.cache.ban_duration, Duration::from_secs(900));
        assert_eq!(
            valid.raw.transfer.retry_initial_backoff,
            Duration::from_secs(1)
        );
        assert_eq!(
            valid.raw.transfer.retry_max_backoff,
            Duration::from_secs(30)
        );
        assert_eq!(valid.bandwidth, BandwidthLimit::Unlimited);
    }

    #[test]
    fn the_shipped_file_is_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/peer-client.toml");
        let loaded = Config::load_with_env(Some(&shipped), Some(HashMap::new()))
            .unwrap()
            .validate()
            .unwrap();
        let defaults = Config::default().validate().unwrap();
        assert_eq!(format!("{:?}", loaded.raw), format!("{:?}", defaults.raw));
    }

    #[test]
    fn environment_overrides_top_level_and_section_keys() {
        let env = HashMap::from([
            (
                "PEER_CLIENT__CACHE_HOSTS".to_owned(),
                "a.example, b.example:8080".to_owned(),
            ),
            (
                "PEER_CLIENT__DELAY_CACHE_FALLBACK_SECS".to_owned(),
                "-1".to_owned(),
            ),
            (
                "PEER_CLIENT__CACHE__CONNECT_TIMEOUT".to_owned(),
                "1s".to_owned(),
            ),
            (
                "PEER_CLIENT__MAX_DOWNLOAD_BANDWIDTH".to_owned(),
                "50%".to_owned(),
            ),
        ]);
        let valid = Config::load_with_env(None, Some(env))
            .unwrap()
            .validate()
            .unwrap();
        let hosts: Vec<&str> = valid.cache_hosts.iter().map(CacheHost::authority).collect();
        assert_eq!(hosts, ["a.example", "b.example:8080"]);
        assert_eq!(valid.fallback_delay, FallbackDelay::Never);
        assert_eq!(valid.raw.cache.connect_timeout, Duration::from_secs(1));
        assert_eq!(valid.bandwidth, BandwidthLimit::PercentOfMeasured(50));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let env = HashMap::from([("PEER_CLIENT__CACHE_HOST".to_owned(), "x".to_owned())]);
        assert!(Config::load_with_env(None, Some(env)).is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        type Change = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Change)> = vec![
            ("download_mode", Box::new(|config| config.download_mode = 4)),
            (
                "delay_cache_fallback_secs",
                Box::new(|config| config.delay_cache_fallback_secs = -2),
            ),
            (
                "piece_size",
                Box::new(|config| config.piece_size = "1500KiB".into()),
            ),
            (
                "piece_size",
                Box::new(|config| config.piece_size = "1 MB".into()),
            ),
            (
                "max_download_bandwidth",
                Box::new(|config| config.max_download_bandwidth = "10Mbps".into()),
            ),
            (
                "max_download_bandwidth",
                Box::new(|config| config.max_download_bandwidth = "150%".into()),
            ),
            (
                "cache_hosts",
                Box::new(|config| config.cache_hosts = vec!["ftp://x".into()]),
            ),
            (
                "cache.ca_file",
                Box::new(|config| config.cache.ca_file = "/nonexistent/ca.pem".into()),
            ),
            (
                "origin.connections",
                Box::new(|config| config.origin.connections = 0),
            ),
            (
                "transfer.retry_max_backoff",
                Box::new(|config| config.transfer.retry_max_backoff = Duration::from_millis(10)),
            ),
        ];
        for (key, change) in cases {
            let mut config = Config::default();
            change(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.starts_with(&format!("{key}: ")), "{key}: got {error}");
        }
    }

    #[test]
    fn sizes_take_binary_units_only() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("1GB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn every_mode_parses_and_only_simple_and_bypass_skip_the_cache() {
        for number in [0, 1, 2, 3, 99, 100] {
            let mode = DownloadMode::from_number(number).unwrap();
            assert_eq!(mode.number(), number);
            assert_eq!(mode.uses_cache_hosts(), number < 99);
        }
        assert_eq!(DownloadMode::from_number(5), None);
    }
}
