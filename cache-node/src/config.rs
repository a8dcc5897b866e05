//! The node's configuration: one serde struct, loaded from a TOML file with
//! `CACHE_NODE__<SECTION>__<KEY>` environment overrides, then validated once at start-up so that a
//! bad value stops the node with a message naming the key, the value and a correct example.
//!
//! Sizes are strings such as `"10GiB"` or `"1MiB"`; durations are strings such as `"5s"` or
//! `"2m"`. Every field has a default so a partial file works; the annotated defaults ship in
//! `conf/cache-node.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::freshness::FreshnessPolicy;
use crate::upstream::address_policy;
use crate::upstream::origin::{
    AllowedOrigin, Allowlist, HostPattern, OriginTarget, UpstreamScheme,
};

pub use crate::upstream::settings::{ContentSetConfig, OriginConfig, UpstreamConfig};

/// The most worker threads `server.workers` accepts.
const MAX_WORKERS: usize = 1024;

pub(crate) use outpost_shared::config_loading::invalid;
pub use outpost_shared::config_loading::ConfigError;

/// The whole configuration of a cache node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The client-facing listener and request handling.
    pub server: ServerConfig,
    /// The admin listener (health, stats, metrics).
    pub admin: AdminConfig,
    /// Where and how content is stored on disk.
    pub storage: StorageConfig,
    /// How the node talks to origins.
    pub upstream: UpstreamConfig,
    /// Logging.
    pub log: LogConfig,
    /// The origin allowlist: one `[[origin]]` table per allowed origin host.
    pub origin: Vec<OriginConfig>,
    /// Settings of content sets (`[[content_set]]`), for sets that need any.
    pub content_set: Vec<ContentSetConfig>,
    /// Piece manifests and the peer tracker for peer-clients.
    pub peering: crate::peering::PeeringConfig,
    /// Bounds on origin fills: memory, concurrency, per-client caps.
    pub fill: crate::cache::fill_limits::FillConfig,
    /// Prefill jobs (`POST /prefill`): how many objects at once, and their bandwidth cap.
    pub prefill: crate::cache::fill_limits::PrefillConfig,
    /// The client-facing HTTPS listener and its certificate; off while `tls.listen` is empty.
    pub tls: TlsConfig,
}

/// `[tls]`: the client-facing HTTPS listener, beside the plain one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the HTTPS listener, e.g. `"0.0.0.0:443"`. Empty (the default) turns TLS off.
    /// It runs on the same worker threads as `server.listen`, with the same connection caps and
    /// timeouts (the TLS handshake counts against `server.header_read_timeout`).
    pub listen: String,
    /// PEM file with the certificate, then any intermediate CA certificates. Reloaded when it
    /// changes (checked every 2 s) or on `SIGHUP`.
    pub cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 RSA or SEC1 EC), readable
    /// only by the node. Reloaded with `cert`.
    pub key: PathBuf,
}

/// `[tls]`, validated: the address parsed and the pair read and checked.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `tls.listen`.
    pub listen: SocketAddr,
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// The pair the files held at validation.
    pub pair: crate::tls::pair::LoadedPair,
}

impl TlsConfig {
    /// `None` when TLS is off; else the listener's address and a pair that can serve now.
    fn validate(&self, server_listen: SocketAddr) -> Result<Option<TlsSettings>, ConfigError> {
        let listen_text = self.listen.trim();
        if listen_text.is_empty() {
            if !self.cert.as_os_str().is_empty() || !self.key.as_os_str().is_empty() {
                return Err(invalid(
                    "tls.listen",
                    "is empty, so TLS is off, but tls.cert or tls.key is set; set it, e.g. \"0.0.0.0:443\", or remove [tls]",
                ));
            }
            return Ok(None);
        }
        let listen = parse_listen("tls.listen", listen_text)?;
        if listen == server_listen && listen.port() != 0 {
            return Err(invalid(
                "tls.listen",
                format!("\"{listen}\" is server.listen's address too; use another port, e.g. 443"),
            ));
        }
        for (key, path) in [("tls.cert", &self.cert), ("tls.key", &self.key)] {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "is empty; name a PEM file, e.g. made with `cache-node tls request` and signed by your CA",
                ));
            }
        }
        let pair =
            crate::tls::pair::LoadedPair::load(&self.cert, &self.key, std::time::SystemTime::now())
                .map_err(|error| invalid(error.file().config_key(), error.to_string()))?;
        Ok(Some(TlsSettings {
            listen,
            cert: self.cert.clone(),
            key: self.key.clone(),
            pair,
        }))
    }
}

/// `[server]`: the client-facing listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address clients connect to. Windows Delivery Optimization clients expect port 80.
    pub listen: String,
    /// Base URL used for requests that name no allowed origin (reverse-proxy mode), for example
    /// `http://mirror.example.org`. Unset means such requests are refused with 403.
    pub default_upstream: Option<String>,
    /// The most ranges one request may ask for after coalescing; more are refused with 416.
    pub max_ranges: usize,
    /// How long in-flight requests may take to finish after SIGTERM before the node exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Worker threads serving clients, each with its own runtime and `SO_REUSEPORT` listener.
    /// 0 means one per CPU core.
    pub workers: usize,
    /// How long a client has to send a request's complete headers, from the connection's opening
    /// or the first byte of a later request. Slower connections are closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request before it is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The most client connections open at once (each listener counts its own); at the cap the
    /// oldest idle ones are closed for new ones, or new ones are refused when none is idle. 0
    /// means half of the open-file limit the node runs with.
    pub max_connections: usize,
    /// The most client connections one client address may hold open; over it the
    /// address's oldest idle connection is closed, or the new one refused when none is idle.
    pub max_connections_per_client: usize,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener. Keep it on loopback or a management network.
    pub listen: String,
    /// Bearer token required by every admin request that changes state.
    pub token: String,
    /// How often the counters are sampled for `/stats/history`, `/summary` and the dashboard;
    /// the last 24 hours are kept. At least `1s`.
    #[serde(with = "humantime_serde")]
    pub history_interval: Duration,
}

/// `[storage]`: the on-disk cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Directory holding the cache. Created if missing.
    pub path: PathBuf,
    /// Upper bound on bytes stored, for example `"10GiB"`. Least useful content is evicted beyond it.
    pub max_size: String,
    /// Size of one stored slice, for example `"1MiB"`. A power of two between 64KiB and 64MiB.
    pub slice_size: String,
    /// Flush every slice to stable storage before it is published. Turn off only on disks whose
    /// loss you can tolerate: a kill -9 is survived either way, a power cut only with fsync.
    pub fsync: bool,
    /// Disk I/O backend: `auto` (io_uring when the start-up probe succeeds, else portable),
    /// `io_uring` (refuse to start without it) or `portable` (blocking calls on a thread pool).
    pub io_backend: String,
    /// More cache drives beside `path`, each with its own size (`[[storage.extra_drives]]`), up
    /// to [`MAX_EXTRA_DRIVES`]. Each object lives on one drive, chosen by hashing its key with
    /// the drives' sizes as weights.
    pub extra_drives: Vec<DriveConfig>,
    /// The longest object the node stores, for example `"1TiB"`. An origin answer declaring a
    /// longer object (its `Content-Range` total or `Content-Length`) is refused with 502 before
    /// anything is sized from it, and stored objects declaring more are deleted at start-up.
    /// At most [`MAX_OBJECT_SIZE_LIMIT`] bytes (1 EiB).
    pub max_object_size: String,
    /// The share of the slices read from disk for hits that are read whole and checked against
    /// their piece hashes before any byte of them is sent, from `0.0` (never) to `1.0` (every
    /// one). Checked slices leave through a buffer instead of `sendfile`. A mismatch drops the
    /// stored object (counted in `integrity_failures`) and cuts that response.
    pub verify_hits: f64,
}

/// The largest `storage.max_object_size`: 1 EiB keeps every offset and slice computation far
/// from overflowing a `u64`.
pub const MAX_OBJECT_SIZE_LIMIT: u64 = 1 << 60;

/// `[[storage.extra_drives]]`: one more cache drive.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DriveConfig {
    /// Directory on the drive. Created if missing.
    pub path: PathBuf,
    /// Upper bound on bytes stored on this drive, for example `"500GiB"`.
    pub max_size: String,
}

/// The most extra drives: nine drives in all, as Microsoft Connected Cache allows.
pub const MAX_EXTRA_DRIVES: usize = 8;

impl DriveConfig {
    /// Checks the drive's path and size; `prefix` names it in errors (`storage` for the first).
    fn validate(
        &self,
        prefix: &str,
        slice_len: u64,
        slice_size: &str,
    ) -> Result<crate::cache::store::DriveSpec, ConfigError> {
        let size_key = format!("{prefix}.max_size");
        let max_bytes =
            parse_size(&self.max_size).map_err(|message| invalid(&size_key, message))?;
        if max_bytes < slice_len {
            return Err(invalid(
                &size_key,
                format!(
                    "\"{}\" is smaller than one slice ({slice_size}); use e.g. \"10GiB\"",
                    self.max_size
                ),
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(invalid(
                &format!("{prefix}.path"),
                "is empty; use e.g. \"/var/cache/outpost\"",
            ));
        }
        Ok(crate::cache::store::DriveSpec {
            root: self.path.clone(),
            max_bytes,
        })
    }
}

/// `[log]`: logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, for example `info` or `cache_node=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
    /// `text` for humans, `json` for log shippers.
    pub format: String,
    /// How often to log a traffic summary (requests, hit, miss, egress and origin bytes and the
    /// byte hit ratio over the interval), as MCC does every 15 s. Quiet intervals log nothing.
    /// `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
    /// The access log: `off`, `json` (one object per line) or `combined` (Apache/nginx combined,
    /// then the cache's fields as `name=value`).
    pub access: String,
    /// The access log file; empty means `access.log` in `storage.path`. Rotated files get `.1`,
    /// `.2`...
    pub access_path: String,
    /// The size at which the access log is rotated, e.g. `"100MiB"`.
    pub access_max_size: String,
    /// How many rotated access logs are kept.
    pub access_keep: usize,
    /// Query parameters whose values the access log writes as `REDACTED` (compared without
    /// case): signatures and tokens in CDN URLs.
    pub access_redact: Vec<String>,
    /// How many finished requests may wait for a slow disk before access lines are dropped (and
    /// counted in `access_log_dropped`) rather than slowing a request.
    pub access_buffer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".to_owned(),
            default_upstream: None,
            max_ranges: 32,
            shutdown_grace: Duration::from_secs(10),
            workers: 0,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 0,
            max_connections_per_client: 256,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".to_owned(),
            token: String::new(),
            history_interval: Duration::from_secs(15),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("cache-data"),
            max_size: "10GiB".to_owned(),
            slice_size: "1MiB".to_owned(),
            fsync: true,
            io_backend: "auto".to_owned(),
            extra_drives: Vec::new(),
            max_object_size: "1TiB".to_owned(),
            verify_hits: 0.01,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: "text".to_owned(),
            summary_interval: Duration::from_secs(15),
            access: "off".to_owned(),
            access_path: String::new(),
            access_max_size: "100MiB".to_owned(),
            access_keep: 5,
            access_redact: [
                "sig",
                "signature",
                "token",
                "access_token",
                "key",
                "password",
                "se",
                "skoid",
                "sktid",
            ]
            .map(str::to_owned)
            .to_vec(),
            access_buffer: crate::http::access_log::QUEUE_ENTRIES,
        }
    }
}

/// The configuration after validation, with sizes and addresses parsed.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The raw configuration, kept for the parts that need no parsing.
    pub raw: Config,
    /// `[[origin]]`, `server.default_upstream` and the freshness settings, parsed.
    pub allowlist: Allowlist,
    /// `server.listen`, parsed.
    pub server_listen: SocketAddr,
    /// `admin.listen`, parsed.
    pub admin_listen: SocketAddr,
    /// `storage.max_size` in bytes.
    pub max_size_bytes: u64,
    /// Every cache drive: `storage.path` with `storage.max_size` first, then
    /// `storage.extra_drives`, sizes parsed.
    pub drives: Vec<crate::cache::store::DriveSpec>,
    /// `storage.slice_size` in bytes.
    pub slice_len: u64,
    /// `storage.io_backend`, parsed.
    pub io_backend: crate::disk::BackendChoice,
    /// `server.workers`, with 0 resolved to the number of cores.
    pub workers: usize,
    /// `upstream.proxy` and `upstream.no_proxy`, parsed; `None` connects directly.
    pub proxy: Option<crate::upstream::outbound_proxy::ProxySettings>,
    /// `[peering]`, parsed.
    pub peering: crate::peering::PeeringSettings,
    /// `[fill]`, parsed.
    pub fill: crate::cache::fill_limits::FillSettings,
    /// `[prefill]`, parsed.
    pub prefill: crate::cache::fill_limits::PrefillSettings,
    /// `storage.max_object_size` in bytes.
    pub max_object_size_bytes: u64,
    /// `storage.verify_hits`, checked to be within 0.0..=1.0.
    pub verify_hits: f64,
    /// `log.access*`, parsed; `None` when the access log is off.
    pub access_log: Option<crate::http::access_log::AccessLogSettings>,
    /// `[tls]`, checked; `None` when TLS is off.
    pub tls: Option<TlsSettings>,
    /// The CA certificates of `upstream.ca_file`.
    pub upstream_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl Config {
    /// Loads a configuration file (if given) and applies `CACHE_NODE__SECTION__KEY` overrides from
    /// the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], but takes the environment from `env` when given (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        Ok(outpost_shared::config_loading::load(
            "CACHE_NODE",
            path,
            env,
        )?)
    }

    /// Checks every value and parses sizes and addresses.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        let server_listen = parse_listen("server.listen", &self.server.listen)?;
        let admin_listen = parse_listen("admin.listen", &self.admin.listen)?;
        // An empty (or the shipped) admin.token does not stop the node: the admin endpoints that
        // change state are disabled instead, and say how to enable them (crate::api::admin).
        let slice_len = parse_block_size("storage.slice_size", &self.storage.slice_size)?;
        let first_drive = DriveConfig {
            path: self.storage.path.clone(),
            max_size: self.storage.max_size.clone(),
        };
        if self.storage.extra_drives.len() > MAX_EXTRA_DRIVES {
            return Err(invalid(
                "storage.extra_drives",
                format!(
                    "lists {} drives; at most {MAX_EXTRA_DRIVES} beside storage.path",
                    self.storage.extra_drives.len()
                ),
            ));
        }
        let mut drives: Vec<crate::cache::store::DriveSpec> = Vec::new();
        for (index, drive) in std::iter::once(&first_drive)
            .chain(&self.storage.extra_drives)
            .enumerate()
        {
            let prefix = match index {
                0 => "storage".to_owned(),
                extra => format!("storage.extra_drives[{}]", extra - 1),
            };
            let spec = drive.validate(&prefix, slice_len, &self.storage.slice_size)?;
            if let Some(same) = drives.iter().find(|other| other.root == spec.root) {
                return Err(invalid(
                    &format!("{prefix}.path"),
                    format!("\"{}\" is already a cache drive", same.root.display()),
                ));
            }
            drives.push(spec);
        }
        let max_size_bytes = drives[0].max_bytes;
        let io_backend = match self.storage.io_backend.as_str() {
            "auto" => crate::disk::BackendChoice::Auto,
            "io_uring" => crate::disk::BackendChoice::IoUring,
            "portable" => crate::disk::BackendChoice::Portable,
            other => {
                return Err(invalid(
                    "storage.io_backend",
                    format!(
                        "\"{other}\" is not a backend; use \"auto\", \"io_uring\" or \"portable\""
                    ),
                ))
            }
        };
        let global_policy = FreshnessPolicy {
            stale_if_error: check_stale_if_error(
                "upstream.stale_if_error",
                self.upstream.stale_if_error,
            )?,
            ..FreshnessPolicy::new(
                self.upstream.revalidate_after,
                parse_cache_control("upstream.cache_control", &self.upstream.cache_control)?,
            )
        };
        let proxy = crate::upstream::outbound_proxy::ProxySettings::parse(
            &self.upstream.proxy,
            &self.upstream.no_proxy,
        )
        .map_err(|(key, message)| invalid(&format!("upstream.{key}"), message))?;
        if self.server.max_ranges == 0 {
            return Err(invalid("server.max_ranges", "must be at least 1, e.g. 32"));
        }
        if self.server.max_connections_per_client == 0 {
            return Err(invalid(
                "server.max_connections_per_client",
                "must be at least 1, e.g. 256",
            ));
        }
        let workers = match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |cores| cores.get()),
            workers if workers > MAX_WORKERS => {
                return Err(invalid(
                    "server.workers",
                    format!("{workers} is more than {MAX_WORKERS}; use 0 for one per core"),
                ))
            }
            workers => workers,
        };
        for (name, value) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.first_byte_timeout",
                self.upstream.first_byte_timeout,
            ),
            (
                "upstream.idle_read_timeout",
                self.upstream.idle_read_timeout,
            ),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout", self.server.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(name, "must be longer than zero, e.g. \"30s\""));
            }
        }
        if self.admin.history_interval < Duration::from_secs(1) {
            return Err(invalid(
                "admin.history_interval",
                "must be at least \"1s\"; \"15s\" keeps 5,760 samples for the last 24 hours",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid(
                "log.format",
                format!(
                    "\"{}\" is not a format; use \"text\" or \"json\"",
                    self.log.format
                ),
            ));
        }
        let access_log = self.access_log_settings()?;
        let default_upstream = match &self.server.default_upstream {
            Some(url) => {
                check_upstream_url("server.default_upstream", url)?;
                let target =
                    OriginTarget::default_upstream(url, global_policy).ok_or_else(|| {
                        invalid(
                            "server.default_upstream",
                            format!("\"{url}\" names no host; use e.g. \"http://mirror.lan\""),
                        )
                    })?;
                Some(target)
            }
            None => None,
        };
        let host_headers = validate_content_sets(&self.content_set, &self.origin)?;
        let mut allowed = Vec::with_capacity(self.origin.len());
        for (index, origin) in self.origin.iter().enumerate() {
            if origin.host.trim().is_empty() && origin.cidr.is_empty() {
                return Err(invalid(
                    &format!("origin[{index}].host"),
                    "an [[origin]] needs a host pattern, cidr ranges or both, e.g. host = \"*.dl.delivery.mp.microsoft.com\" or cidr = [\"203.0.113.0/24\"]",
                ));
            }
            let pattern = if origin.host.trim().is_empty() {
                None
            } else {
                Some(
                    HostPattern::parse(&origin.host)
                        .map_err(|message| invalid(&format!("origin[{index}].host"), message))?,
                )
            };
            let ranges = origin
                .cidr
                .iter()
                .map(|text| address_policy::parse_cidr(text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|message| invalid(&format!("origin[{index}].cidr"), message))?;
            if let Some(name) = &origin.content_set {
                check_content_set_name(&format!("origin[{index}].content_set"), name)?;
            }
            if let Some(url) = &origin.upstream {
                check_upstream_url(&format!("origin[{index}].upstream"), url)?;
            }
            let cache_control = match &origin.cache_control {
                Some(mode) => parse_cache_control(&format!("origin[{index}].cache_control"), mode)?,
                None => global_policy.cache_control,
            };
            if origin.ports.contains(&0) {
                return Err(invalid(
                    &format!("origin[{index}].ports"),
                    "0 is not a port; list ports from 1 to 65535, e.g. [8080]",
                ));
            }
            allowed.push(AllowedOrigin {
                pattern,
                ranges,
                host_header: origin
                    .content_set
                    .as_ref()
                    .and_then(|name| host_headers.get(name).cloned()),
                content_set: origin.content_set.clone(),
                upstream: origin
                    .upstream
                    .as_ref()
                    .map(|url| url.trim_end_matches('/').to_owned()),
                policy: FreshnessPolicy {
                    revalidate_after: origin
                        .revalidate_after
                        .unwrap_or(global_policy.revalidate_after),
                    cache_control,
                    stale_if_error: match origin.stale_if_error {
                        Some(window) => check_stale_if_error(
                            &format!("origin[{index}].stale_if_error"),
                            window,
                        )?,
                        None => global_policy.stale_if_error,
                    },
                    serve_stale_on_error: origin.serve_stale_on_error,
                    serve_stale_while_revalidating: origin.serve_stale_while_revalidating,
                    ignore_client_no_cache: origin.ignore_client_no_cache,
                },
                ports: origin.ports.clone(),
                scheme: match &origin.upstream_scheme {
                    None => UpstreamScheme::Same,
                    Some(text) => UpstreamScheme::parse(text).ok_or_else(|| {
                        invalid(
                            &format!("origin[{index}].upstream_scheme"),
                            format!("\"{text}\" is not a scheme choice; use \"same\", \"http\" or \"https\""),
                        )
                    })?,
                },
            });
        }
        let allowlist = Allowlist::new(allowed, default_upstream);
        let peering = self
            .peering
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        let fill = self
            .fill
            .validate(slice_len)
            .map_err(|(key, message)| invalid(key, message))?;
        let prefill = self
            .prefill
            .validate()
            .map_err(|(key, message)| invalid(&key, message))?;
        let max_object_size_bytes = parse_size(&self.storage.max_object_size)
            .map_err(|message| invalid("storage.max_object_size", message))?;
        if max_object_size_bytes > MAX_OBJECT_SIZE_LIMIT {
            return Err(invalid(
                "storage.max_object_size",
                format!(
                    "\"{}\" is more than 1048576TiB (1 EiB); use e.g. \"1TiB\"",
                    self.storage.max_object_size
                ),
            ));
        }
        let verify_hits = self.storage.verify_hits;
        if !(0.0..=1.0).contains(&verify_hits) {
            return Err(invalid(
                "storage.verify_hits",
                format!("{verify_hits} is not a share between 0.0 and 1.0; use e.g. 0.01"),
            ));
        }
        let tls = self.tls.validate(server_listen)?;
        let upstream_roots = outpost_shared::tls_roots::read_ca_file(&self.upstream.ca_file)
            .map_err(|message| invalid("upstream.ca_file", message))?;
        Ok(ValidConfig {
            tls,
            upstream_roots,
            allowlist,
            peering,
            raw: self,
            server_listen,
            admin_listen,
            max_size_bytes,
            drives,
            slice_len,
            io_backend,
            workers,
            proxy,
            fill,
            prefill,
            max_object_size_bytes,
            verify_hits,
            access_log,
        })
    }

    /// `log.access*`, checked: `None` when the access log is off.
    fn access_log_settings(
        &self,
    ) -> Result<Option<crate::http::access_log::AccessLogSettings>, ConfigError> {
        use crate::http::access_log::{AccessFormat, AccessLogSettings};
        let Some(format) = AccessFormat::parse(&self.log.access)
            .map_err(|message| invalid("log.access", message))?
        else {
            return Ok(None);
        };
        let max_bytes = parse_size(&self.log.access_max_size)
            .map_err(|message| invalid("log.access_max_size", message))?;
        if max_bytes < 4096 {
            return Err(invalid(
                "log.access_max_size",
                "must be at least \"4KiB\", e.g. \"100MiB\"",
            ));
        }
        if self.log.access_buffer == 0 {
            return Err(invalid(
                "log.access_buffer",
                "must be at least 1 line, e.g. 65536",
            ));
        }
        let path = if self.log.access_path.is_empty() {
            self.storage.path.join("access.log")
        } else {
            PathBuf::from(&self.log.access_path)
        };
        Ok(Some(AccessLogSettings {
            format,
            path,
            max_bytes,
            keep: self.log.access_keep,
            redact: self.log.access_redact.clone(),
            queue: self.log.access_buffer,
        }))
    }
}

/// The longest content set name.
const MAX_CONTENT_SET_NAME_LEN: usize = 63;

fn check_content_set_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let well_formed = !name.is_empty()
        && name.len() <= MAX_CONTENT_SET_NAME_LEN
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || matches!(byte, b'-' | b'_' | b'.')
        });
    if well_formed {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "\"{name}\" is not a content set name; use up to {MAX_CONTENT_SET_NAME_LEN} lower-case letters, digits, '-', '_' or '.', e.g. \"windows-update\""
            ),
        ))
    }
}

/// Checks the `[[content_set]]` tables and returns each set's `host_header`, by name. A table
/// must name a set some `[[origin]]` uses (a typo would silently do nothing), once.
fn validate_content_sets(
    content_sets: &[ContentSetConfig],
    origins: &[OriginConfig],
) -> Result<std::collections::HashMap<String, String>, ConfigError> {
    let mut host_headers = std::collections::HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (index, content_set) in content_sets.iter().enumerate() {
        let key = |field: &str| format!("content_set[{index}].{field}");
        check_content_set_name(&key("name"), &content_set.name)?;
        if !seen.insert(content_set.name.as_str()) {
            return Err(invalid(
                &key("name"),
                format!(
                    "\"{}\" has another [[content_set]] table above; merge them",
                    content_set.name
                ),
            ));
        }
        let used = origins
            .iter()
            .any(|origin| origin.content_set.as_deref() == Some(content_set.name.as_str()));
        if !used {
            return Err(invalid(
                &key("name"),
                format!(
                    "no [[origin]] has content_set = \"{}\"; name the set in the origins it groups",
                    content_set.name
                ),
            ));
        }
        if let Some(host_header) = &content_set.host_header {
            let host = crate::upstream::origin::normalise_host(host_header).ok_or_else(|| {
                invalid(
                    &key("host_header"),
                    format!("\"{host_header}\" is not a host; use e.g. \"dl.delivery.mp.microsoft.com\""),
                )
            })?;
            host_headers.insert(content_set.name.clone(), host);
        }
    }
    Ok(host_headers)
}

fn parse_cache_control(
    key: &str,
    value: &str,
) -> Result<crate::cache::freshness::CacheControlMode, ConfigError> {
    crate::cache::freshness::CacheControlMode::parse(value).ok_or_else(|| {
        invalid(
            key,
            format!("\"{value}\" is not a mode; use \"honor\" or \"ignore\""),
        )
    })
}

/// The longest `stale_if_error` window accepted: a year.
const MAX_STALE_IF_ERROR: Duration = Duration::from_secs(365 * 24 * 3600);

fn check_stale_if_error(key: &str, window: Duration) -> Result<Duration, ConfigError> {
    if window > MAX_STALE_IF_ERROR {
        return Err(invalid(
            key,
            format!(
                "{} days is longer than a year; use e.g. \"7d\", or \"0s\" to never serve stale content when the origin fails",
                window.as_secs().div_ceil(86_400)
            ),
        ));
    }
    Ok(window)
}

fn parse_listen(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("\"{value}\" is not an address; use e.g. \"0.0.0.0:80\" or \"[::]:80\""),
        )
    })
}

fn check_upstream_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = value.parse().map_err(|_| {
        invalid(
            key,
            format!("\"{value}\" is not a URL; use e.g. \"http://127.0.0.1:8000\""),
        )
    })?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(()),
        _ => Err(invalid(
            key,
            format!("\"{value}\" must be an absolute http:// or https:// URL, e.g. \"http://127.0.0.1:8000\""),
        )),
    }
}

/// Parses a slice or piece size (see [`crate::cache::store::parse_block_size`]).
pub(crate) fn parse_block_size(key: &str, text: &str) -> Result<u64, ConfigError> {
    crate::cache::store::parse_block_size(text).map_err(|message| invalid(key, message))
}

pub use outpost_shared::units::parse_size;

/// The settings a reload applies to the running node (`SIGHUP`, `POST /reload`): the allowlist
/// with its content sets and per-origin policies (and the global freshness defaults they
/// inherit), the default upstream, the log level and the admin token. A key named here covers
/// everything under it (`origin` is every `[[origin]]` table), and `prefill.schedule` the
/// scheduled prefills.
///
/// Every other key keeps its running value until a restart: listen addresses and TLS
/// listeners, storage paths and drives, the I/O backend, workers, slice size, limits and
/// timeouts, peering, the other prefill settings and the access log.
pub const LIVE_KEYS: &[&str] = &[
    "origin",
    "content_set",
    "server.default_upstream",
    "upstream.revalidate_after",
    "upstream.cache_control",
    "upstream.stale_if_error",
    "log.level",
    "admin.token",
    "prefill.schedule",
];

/// Whether a reload applies `key` (a dotted path from [`Config::changed_keys`]).
pub fn is_live_key(key: &str) -> bool {
    LIVE_KEYS.iter().any(|live| {
        key == *live
            || key
                .strip_prefix(live)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    })
}

impl Config {
    /// The dotted keys whose values differ between `self` and `other` (a table array such as
    /// `origin` counts as one key), sorted. Values are not returned: `admin.token` is a secret.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
            match (a, b) {
                (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    for key in keys {
                        let path = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        let missing = serde_json::Value::Null;
                        walk(
                            &path,
                            a.get(key).unwrap_or(&missing),
                            b.get(key).unwrap_or(&missing),
                            out,
                        );
                    }
                }
                (a, b) if a != b => out.push(prefix.to_owned()),
                _ => {}
            }
        }
        let as_value = |config: &Config| serde_json::to_value(config).unwrap_or_default();
        let mut changed = Vec::new();
        walk("", &as_value(self), &as_value(other), &mut changed);
        changed
    }

    /// Takes the [`LIVE_KEYS`] settings from `other`, keeping every other setting: the running
    /// config after a reload.
    pub fn take_live_settings(&mut self, other: &Config) {
        self.origin = other.origin.clone();
        self.content_set = other.content_set.clone();
        self.server.default_upstream = other.server.default_upstream.clone();
        self.upstream.revalidate_after = other.upstream.revalidate_after;
        self.upstream.cache_control = other.upstream.cache_control.clone();
        self.upstream.stale_if_error = other.upstream.stale_if_error;
        self.log.level = other.log.level.clone();
        self.admin.token = other.admin.token.clone();
        self.prefill.schedule = other.prefill.schedule.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_applies_live_keys_and_names_the_others() {
        let running = Config::default();
        let mut edited = Config::default();
        edited.origin.push(OriginConfig {
            host: "new.example".into(),
            ..OriginConfig::default()
        });
        edited.log.level = "debug".into();
        edited.admin.token = "rotated".into();
        edited.server.listen = "0.0.0.0:8081".into();
        edited.storage.path = "/elsewhere".into();
        let changed = running.changed_keys(&edited);
        assert_eq!(
            changed,
            [
                "admin.token",
                "log.level",
                "origin",
                "server.listen",
                "storage.path"
            ]
        );
        let (live, restart): (Vec<_>, Vec<_>) = changed.iter().partition(|key| is_live_key(key));
        assert_eq!(live, ["admin.token", "log.level", "origin"]);
        assert_eq!(restart, ["server.listen", "storage.path"]);
        assert!(!is_live_key("origins"));
        assert!(is_live_key("origin[0].host"));
        let mut after = running.clone();
        after.take_live_settings(&edited);
        assert_eq!(
            after.changed_keys(&edited),
            ["server.listen", "storage.path"]
        );
        assert!(running.changed_keys(&running.clone()).is_empty());
    }
    use std::collections::HashMap;

    fn valid_base() -> Config {
        let mut config = Config::default();
        config.admin.token = "secret".to_owned();
        config
    }

    #[test]
    fn sizes_parse_binary_units_and_refuse_decimal_ones() {
        let table: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("4096", Some(4096)),
            ("1KiB", Some(1024)),
            ("1MiB", Some(1 << 20)),
            ("10GiB", Some(10 << 30)),
            ("2 TiB", Some(2 << 40)),
            (" 512MiB ", Some(512 << 20)),
            ("10 GB", None),
            ("10GB", None),
            ("GiB", None),
            ("", None),
            ("-1MiB", None),
            ("1.5GiB", None),
            ("99999999999TiB", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_size(text).ok(), *expected, "parse_size({text:?})");
        }
        assert_eq!(
            parse_size("10 GB").unwrap_err(),
            "\"10 GB\" is not a size; use e.g. \"10GiB\""
        );
    }

    #[test]
    fn defaults_validate_with_or_without_a_token() {
        let valid = valid_base().validate().unwrap();
        assert_eq!(valid.slice_len, 1 << 20);
        assert_eq!(valid.max_size_bytes, 10 << 30);
        // Without a token the node runs with its state-changing admin endpoints disabled.
        let without_token = Config::default().validate().unwrap();
        assert!(!crate::api::admin::token_is_usable(
            &without_token.raw.admin.token
        ));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.storage.max_size = "10 GB".into()),
                "storage.max_size: \"10 GB\" is not a size",
            ),
            (
                Box::new(|c| c.storage.slice_size = "3MiB".into()),
                "storage.slice_size:",
            ),
            (
                Box::new(|c| c.storage.slice_size = "1KiB".into()),
                "storage.slice_size:",
            ),
            (
                Box::new(|c| c.server.listen = "localhost".into()),
                "server.listen:",
            ),
            (
                Box::new(|c| c.upstream.stale_if_error = Duration::from_secs(400 * 86_400)),
                "upstream.stale_if_error: 400 days is longer than a year",
            ),
            (
                Box::new(|c| {
                    c.origin = vec![OriginConfig {
                        host: "mirror.lan".into(),
                        stale_if_error: Some(Duration::from_secs(400 * 86_400)),
                        ..Default::default()
                    }]
                }),
                "origin[0].stale_if_error:",
            ),
            (
                Box::new(|c| c.admin.listen = "1.2.3.4".into()),
                "admin.listen:",
            ),
            (Box::new(|c| c.log.format = "xml".into()), "log.format:"),
            (
                Box::new(|c| c.upstream.cache_control = "obey".into()),
                "upstream.cache_control:",
            ),
            (
                Box::new(|c| c.upstream.proxy = "proxy.corp:3128".into()),
                "upstream.proxy:",
            ),
            (
                Box::new(|c| {
                    c.origin.push(OriginConfig {
                        host: "mirror.example".into(),
                        cache_control: Some("sometimes".into()),
                        ..Default::default()
                    })
                }),
                "origin[0].cache_control:",
            ),
            (
                Box::new(|c| {
                    c.upstream.proxy = "http://proxy.corp:3128".into();
                    c.upstream.no_proxy = "*".into();
                }),
                "upstream.no_proxy:",
            ),
            (
                Box::new(|c| c.storage.io_backend = "aio".into()),
                "storage.io_backend:",
            ),
            (
                Box::new(|c| {
                    c.storage.extra_drives.push(DriveConfig {
                        path: "/mnt/cache2".into(),
                        max_size: "lots".into(),
                    })
                }),
                "storage.extra_drives[0].max_size: \"lots\" is not a size",
            ),
            (
                Box::new(|c| {
                    c.storage.extra_drives.push(DriveConfig {
                        path: c.storage.path.clone(),
                        max_size: "1GiB".into(),
                    })
                }),
                "storage.extra_drives[0].path:",
            ),
            (
                Box::new(|c| {
                    c.storage.extra_drives = (0..=MAX_EXTRA_DRIVES)
                        .map(|index| DriveConfig {
                            path: format!("/mnt/cache{index}").into(),
                            max_size: "1GiB".into(),
                        })
                        .collect()
                }),
                "storage.extra_drives:",
            ),
            (
                Box::new(|c| c.server.default_upstream = Some("ftp://x".into())),
                "server.default_upstream:",
            ),
            (
                Box::new(|c| {
                    c.origin.push(OriginConfig {
                        host: "*".into(),
                        upstream: None,
                        ..Default::default()
                    })
                }),
                "origin[0].host:",
            ),
            (
                Box::new(|c| {
                    c.origin.push(OriginConfig {
                        host: "a.example".into(),
                        upstream: Some("not a url".into()),
                        ..Default::default()
                    })
                }),
                "origin[0].upstream:",
            ),
            (
                Box::new(|c| c.upstream.idle_read_timeout = Duration::ZERO),
                "upstream.idle_read_timeout:",
            ),
            (
                Box::new(|c| c.server.header_read_timeout = Duration::ZERO),
                "server.header_read_timeout:",
            ),
            (
                Box::new(|c| c.server.idle_timeout = Duration::ZERO),
                "server.idle_timeout:",
            ),
            (
                Box::new(|c| c.server.max_connections_per_client = 0),
                "server.max_connections_per_client:",
            ),
            (
                Box::new(|c| {
                    c.origin.push(OriginConfig {
                        host: "mirror.lan".into(),
                        ports: vec![8080, 0],
                        ..Default::default()
                    })
                }),
                "origin[0].ports:",
            ),
        ];
        assert_each_refused(cases);
    }

    type Mutation = Box<dyn Fn(&mut Config)>;

    /// Applies each mutation to a valid config and checks the error starts with its prefix.
    fn assert_each_refused(cases: Vec<(Mutation, &str)>) {
        for (mutate, expected_prefix) in cases {
            let mut config = valid_base();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(
                message.starts_with(expected_prefix),
                "{message:?} should start with {expected_prefix:?}"
            );
        }
    }

    #[test]
    fn file_and_environment_combine_with_environment_winning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            r#"
[server]
listen = "127.0.0.1:1"
[admin]
token = "from-file"
[storage]
max_size = "1GiB"
[[storage.extra_drives]]
path = "/mnt/cache2"
max_size = "2GiB"
[upstream]
connect_timeout = "2s"
[[origin]]
host = "*.example.com"
upstream = "http://127.0.0.1:9"
"#,
        )
        .unwrap();
        let env = HashMap::from([
            (
                "CACHE_NODE__SERVER__LISTEN".to_owned(),
                "127.0.0.1:2".to_owned(),
            ),
            ("CACHE_NODE__STORAGE__FSYNC".to_owned(), "false".to_owned()),
        ]);
        let config = Config::load_with_env(Some(&path), Some(env)).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:2");
        assert_eq!(config.admin.token, "from-file");
        assert!(!config.storage.fsync);
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.origin.len(), 1);
        let valid = config.validate().unwrap();
        assert_eq!(valid.max_size_bytes, 1 << 30);
        assert_eq!(valid.drives.len(), 2);
        assert_eq!(valid.drives[1].root, PathBuf::from("/mnt/cache2"));
        assert_eq!(valid.drives[1].max_bytes, 2 << 30);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "[storage]\nmax_sise = \"1GiB\"\n").unwrap();
        let message = Config::load_with_env(Some(&path), Some(HashMap::new()))
            .unwrap_err()
            .to_string();
        assert!(message.contains("max_sise"), "{message}");
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/cache-node.toml");
        let config = Config::load_with_env(Some(&path), Some(HashMap::new())).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn the_object_size_limit_and_the_hit_check_rate_are_validated() {
        let valid = valid_base().validate().unwrap();
        assert_eq!(valid.max_object_size_bytes, 1 << 40);
        assert!((valid.verify_hits - 0.01).abs() < 1e-12);
        let mut largest = valid_base();
        largest.storage.max_object_size = "1048576TiB".into();
        assert_eq!(largest.validate().unwrap().max_object_size_bytes, 1 << 60);
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.storage.max_object_size = "1 TB".into()),
                "storage.max_object_size: \"1 TB\" is not a size",
            ),
            (
                Box::new(|c| c.storage.max_object_size = "1048577TiB".into()),
                "storage.max_object_size: \"1048577TiB\" is more than",
            ),
            (
                Box::new(|c| c.storage.verify_hits = 1.5),
                "storage.verify_hits:",
            ),
            (
                Box::new(|c| c.storage.verify_hits = -0.1),
                "storage.verify_hits:",
            ),
            (
                Box::new(|c| c.storage.verify_hits = f64::NAN),
                "storage.verify_hits:",
            ),
        ];
        assert_each_refused(cases);
    }

    #[test]
    fn address_ranges_and_content_sets_are_validated() {
        fn origin(host: &str, cidr: &[&str], content_set: Option<&str>) -> OriginConfig {
            OriginConfig {
                host: host.into(),
                cidr: cidr.iter().map(|text| (*text).to_owned()).collect(),
                content_set: content_set.map(str::to_owned),
                ..Default::default()
            }
        }
        let mut good = valid_base();
        good.origin = vec![
            origin("", &["203.0.113.0/24", "2001:db8::/32"], Some("cdn")),
            origin("*.cdn.example", &[], Some("cdn")),
        ];
        good.content_set = vec![ContentSetConfig {
            name: "cdn".into(),
            host_header: Some("Dl.CDN.example".into()),
        }];
        let allowlist = good.validate().unwrap().allowlist;
        let by_address = allowlist.resolve("203.0.113.9").unwrap();
        assert_eq!(by_address.content_set.as_deref(), Some("cdn"));
        assert_eq!(by_address.host_header.as_deref(), Some("dl.cdn.example"));
        assert_eq!(by_address.upstream_base, "http://203.0.113.9");
        assert!(allowlist.resolve("[2001:db8::1]").is_ok());
        assert!(allowlist.resolve("198.51.100.1").is_err());
        let cdn_set = |c: &mut Config| {
            c.origin = vec![origin("a.example", &[], Some("cdn"))];
        };
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.origin = vec![origin("", &[], None)]),
                "origin[0].host: an [[origin]] needs a host pattern, cidr ranges or both",
            ),
            (
                Box::new(|c| c.origin = vec![origin("", &["203.0.113.0/33"], None)]),
                "origin[0].cidr: \"203.0.113.0/33\" is not an address range",
            ),
            (
                Box::new(|c| c.origin = vec![origin("", &["203.0.113.9/24"], None)]),
                "origin[0].cidr: \"203.0.113.9/24\" has bits set after the prefix",
            ),
            (
                Box::new(|c| c.origin = vec![origin("a.example", &[], Some("Windows Update"))]),
                "origin[0].content_set: \"Windows Update\" is not a content set name",
            ),
            (
                Box::new(move |c| {
                    cdn_set(c);
                    c.content_set = vec![ContentSetConfig {
                        name: "cnd".into(),
                        host_header: None,
                    }];
                }),
                "content_set[0].name: no [[origin]] has content_set = \"cnd\"",
            ),
            (
                Box::new(move |c| {
                    cdn_set(c);
                    c.content_set = vec![ContentSetConfig::default()];
                }),
                "content_set[0].name: \"\" is not a content set name",
            ),
            (
                Box::new(move |c| {
                    cdn_set(c);
                    let table = ContentSetConfig {
                        name: "cdn".into(),
                        host_header: None,
                    };
                    c.content_set = vec![table.clone(), table];
                }),
                "content_set[1].name: \"cdn\" has another [[content_set]] table above",
            ),
            (
                Box::new(move |c| {
                    cdn_set(c);
                    c.content_set = vec![ContentSetConfig {
                        name: "cdn".into(),
                        host_header: Some("a b".into()),
                    }];
                }),
                "content_set[0].host_header: \"a b\" is not a host",
            ),
        ];
        assert_each_refused(cases);
    }
}
