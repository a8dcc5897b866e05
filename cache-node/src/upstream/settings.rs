//! The `[upstream]` and `[[origin]]` sections of the config file, as written. `config` validates
//! them into the allowlist (`upstream::origin::Allowlist`) and proxy settings the rest of
//! the node uses.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[upstream]`: how the node fetches from origins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Time allowed to open a TCP (and TLS) connection to an origin.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed between sending a request and receiving the response headers.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed while reading a response body before the fill is abandoned.
    #[serde(with = "humantime_serde")]
    pub idle_read_timeout: Duration,
    /// How long an idle pooled connection to an origin is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// The most idle pooled connections kept per origin.
    pub pool_max_idle_per_host: usize,
    /// When the gap between two missing runs of slices is at most this many cached slices, the
    /// node fetches both runs with one upstream request and discards the overlap, instead of
    /// opening a second request.
    pub merge_gap_slices: u64,
    /// How long a stored version is served without asking the origin whether it changed. Older
    /// versions are checked with a one-byte conditional request before they are served; an
    /// unreachable origin leaves the stored version served. `0s` checks on every request.
    #[serde(with = "humantime_serde")]
    pub revalidate_after: Duration,
    /// What the origin's `Cache-Control` and `Expires` decide: `honor` (a response marked
    /// `no-store` or `private` is passed through and never stored; `no-cache`, `s-maxage`,
    /// `max-age` and `Expires` set how long a stored version is served before it is checked, and
    /// `revalidate_after` applies only when the origin says nothing) or `ignore` (store everything
    /// and check every version after `revalidate_after`, as lancache's nginx does).
    pub cache_control: String,
    /// How long past its lifetime a stored version is still served when the check with the
    /// origin fails (unreachable, timeout, 5xx), for content whose origin sends no
    /// `stale-if-error` of its own. Beyond it, and for `must-revalidate` content, a failed check
    /// is answered `504`. At most `365d`.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// The longest an origin's explicitly fresh `404 Not Found` is served from memory before the
    /// origin is asked again (`301`, `308` and `410` are kept for their whole lifetime). `0s`
    /// keeps no `404`.
    #[serde(with = "humantime_serde")]
    pub not_found_max_age: Duration,
    /// An outbound HTTP proxy every origin connection goes through, `http://host:port` with
    /// optional `user:password@`; empty connects directly. `https://` origins are tunnelled with
    /// `CONNECT` (TLS stays end to end); `http://` ones are sent to the proxy in absolute form.
    pub proxy: String,
    /// Hosts reached directly despite `proxy`: a comma list of names and `*.suffix` patterns,
    /// matched against the host the node connects to (an origin's `upstream` when set).
    pub no_proxy: String,
    /// A PEM file of CA certificates trusted for `https://` origins besides the public roots
    /// (webpki's), for internal mirrors and parent caches signed by an enterprise CA. Empty
    /// trusts the public roots only.
    pub ca_file: String,
}

/// `[[origin]]`: one allowed origin.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct OriginConfig {
    /// An exact host name (`dl.delivery.mp.microsoft.com`) or a wildcard (`*.windowsupdate.com`,
    /// which matches any subdomain but not the bare suffix). May be empty when `cidr` is set.
    pub host: String,
    /// IP ranges whose literals clients may name as this origin (`?cacheHostOrigin=203.0.113.9`),
    /// e.g. `["203.0.113.0/24", "2001:db8::/32"]`, or single addresses. Private, loopback,
    /// link-local, multicast and other special-purpose addresses are allowed only by a range that
    /// lies inside their block (`"10.1.0.0/16"`, `"::1/128"`), never by a broad one such as
    /// `"0.0.0.0/0"`; the same goes for what allowed names resolve to.
    pub cidr: Vec<String>,
    /// The content set this origin's objects belong to: objects are keyed by set, path and query
    /// instead of host, so one file reached under every host and address of the set is stored
    /// and filled once. Unset: keyed by the host the client named.
    pub content_set: Option<String>,
    /// Base URL the node really connects to for this origin, for example `http://127.0.0.1:8000`
    /// or a parent cache, used as written whatever the client's scheme. Unset means
    /// `<scheme>://<requested host>`, the scheme chosen by `upstream_scheme`.
    pub upstream: Option<String>,
    /// The scheme the node fetches this origin with when `upstream` is unset: `same` (the
    /// default: HTTPS for requests that came over the TLS listener, HTTP for the others),
    /// `http` (always plain, e.g. for a CDN whose HTTPS costs more than it protects inside the
    /// WAN) or `https` (always TLS, also for plain-HTTP clients). The cache key never includes
    /// the scheme.
    pub upstream_scheme: Option<String>,
    /// This origin's `upstream.revalidate_after`; unset uses the global one.
    #[serde(with = "humantime_serde")]
    pub revalidate_after: Option<Duration>,
    /// This origin's `upstream.cache_control` (`honor` or `ignore`); unset uses the global one.
    pub cache_control: Option<String>,
    /// Ports clients may name for this origin besides 80 and 443, for example `[8080]` for a
    /// mirror on `mirror.lan:8080`. Any other port is refused with 403, so an allowed host name
    /// never reaches another service on the same machine.
    pub ports: Vec<u16>,
    /// This origin's `upstream.stale_if_error`; unset uses the global one.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Serve a stored version when the check with the origin fails (within `stale_if_error`)
    /// even if the origin sent `must-revalidate` or `proxy-revalidate`, for offices that prefer
    /// availability to the origin's word.
    pub serve_stale_on_error: bool,
    /// Answer every stale hit from disk at once and check with the origin in the background, as
    /// Microsoft Connected Cache does, whatever `stale-while-revalidate` the origin sends
    /// (never for `must-revalidate` content).
    pub serve_stale_while_revalidating: bool,
    /// Ignore the clients' `Cache-Control: no-cache`, `max-age` and `Pragma: no-cache`, which
    /// otherwise force a check with the origin before a stored version is served.
    pub ignore_client_no_cache: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(30),
            idle_read_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 32,
            merge_gap_slices: 0,
            revalidate_after: Duration::from_secs(3600),
            cache_control: "honor".to_owned(),
            stale_if_error: crate::cache::freshness::DEFAULT_STALE_IF_ERROR,
            not_found_max_age: Duration::from_secs(300),
            proxy: String::new(),
            no_proxy: String::new(),
            ca_file: String::new(),
        }
    }
}

/// `[[content_set]]`: settings of a content set that `[[origin]]` tables name.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ContentSetConfig {
    /// The set's name, as `[[origin]] content_set` writes it.
    pub name: String,
    /// The `Host` sent to origins of this set, for CDNs that serve the set's content only under
    /// its canonical name (`"dl.delivery.mp.microsoft.com"`) even when reached by address. Unset:
    /// the host or address the client named.
    pub host_header: Option<String>,
}
