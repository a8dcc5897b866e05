//! Origins: which hosts the node may fetch for (the allowlist), where it really connects for each
//! (the optional `upstream` override), and the pooled HTTP/HTTPS client that does the fetching.
//!
//! The allowlist is what keeps the node from being an open proxy: a host that matches no
//! `[[origin]]` entry is never contacted. An `[[origin]]` allows host names (a pattern), IP
//! literals (`cidr` ranges, checked with `upstream::address_policy`), or both; it may put its
//! objects in a content set, so one file reached under several names and addresses is stored
//! once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ipnet::IpNet;

use crate::cache::freshness::FreshnessPolicy;
use crate::cache::key::{CacheKey, CONTENT_SET_PREFIX};
use crate::error::OriginError;
use crate::http::client_key::ClientScheme;
use crate::http::hop_by_hop::remove_hop_by_hop;
use crate::stats::OriginIndex;
use crate::upstream::address_policy::{self, AddressPolicy, AddressRefusal, NameRefused};
pub use crate::upstream::host_pattern::HostPattern;
use crate::upstream::outbound_proxy::{OriginResolver, ProxySettings, UpstreamConnector};
use crate::upstream::request_body::{RelayedBody, UpstreamRequestBody};
use crate::upstream::settings::UpstreamConfig;
use prometheus_client::metrics::counter::Counter;

/// The origin a request was routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTarget {
    /// The origin host as the client named it, normalised (lower case, no trailing dot, port
    /// kept only when it is not 80). This is part of the cache key.
    pub host: String,
    /// Scheme and authority the node connects to, e.g. `http://127.0.0.1:8000`, plus an optional
    /// path prefix to put in front of the request path.
    pub upstream_base: String,
    /// How long its stored versions stay fresh, and whether its `Cache-Control` counts.
    pub policy: FreshnessPolicy,
    /// The content set its objects belong to: keyed by set, path and query instead of host.
    pub content_set: Option<String>,
    /// The `Host` to send upstream when it is not [`OriginTarget::host`] (the set's
    /// `host_header`).
    pub host_header: Option<String>,
    /// Who chose where the node connects, which decides whether the addresses are checked.
    pub chosen_by: ChosenBy,
    /// The origin label its traffic is counted under (see [`Allowlist::labels`]).
    pub origin: OriginIndex,
}

/// Who chose the host the node connects to for an origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenBy {
    /// The client named it: what a name resolves to is checked against the
    /// [`AddressPolicy`] before anything is connected.
    Client,
    /// The admin wrote it (`[[origin]] upstream`, `server.default_upstream`): a parent cache or
    /// mirror on the LAN, or a test origin on loopback, reached wherever it resolves.
    Admin,
}

/// The allowlist built from `[[origin]]` tables and `[server] default_upstream`.
#[derive(Debug, Clone)]
pub struct Allowlist {
    entries: Vec<AllowedOrigin>,
    /// Each entry's label, by position in `entries`.
    entry_origins: Vec<OriginIndex>,
    /// The labels the node's figures are kept under (see [`Allowlist::labels`]).
    labels: Vec<String>,
    default_upstream: Option<OriginTarget>,
    /// What names a client names may resolve to (every entry's `cidr` together).
    address_policy: Arc<AddressPolicy>,
}

/// One `[[origin]]` table, parsed.
#[derive(Debug, Clone)]
pub struct AllowedOrigin {
    /// `host`, if set.
    pub pattern: Option<HostPattern>,
    /// `cidr`: the IP literals this origin allows.
    pub ranges: Vec<IpNet>,
    /// `content_set`, if set.
    pub content_set: Option<String>,
    /// The `host_header` of its `[[content_set]]`, if set.
    pub host_header: Option<String>,
    /// `upstream`, without a trailing `/`.
    pub upstream: Option<String>,
    /// The freshness settings for this origin (its own or the global ones).
    pub policy: FreshnessPolicy,
    /// Ports clients may name besides [`DEFAULT_ORIGIN_PORTS`].
    pub ports: Vec<u16>,
    /// `upstream_scheme`: how the node reaches this origin when `upstream` is unset.
    pub scheme: UpstreamScheme,
}

/// `[[origin]] upstream_scheme`, parsed: the scheme of the node's own request to an origin it
/// reaches by the name the client gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamScheme {
    /// The client's: HTTPS for a request that came over TLS, HTTP otherwise.
    #[default]
    Same,
    /// Always HTTP.
    Http,
    /// Always HTTPS.
    Https,
}

impl UpstreamScheme {
    /// Parses `same`, `http` or `https`.
    pub fn parse(text: &str) -> Option<UpstreamScheme> {
        match text {
            "same" => Some(UpstreamScheme::Same),
            "http" => Some(UpstreamScheme::Http),
            "https" => Some(UpstreamScheme::Https),
            _ => None,
        }
    }

    /// The URL scheme for a request that arrived over `client`.
    pub fn for_client(self, client: ClientScheme) -> &'static str {
        match (self, client) {
            (UpstreamScheme::Http, _) | (UpstreamScheme::Same, ClientScheme::Http) => "http",
            (UpstreamScheme::Https, _) | (UpstreamScheme::Same, ClientScheme::Https) => "https",
        }
    }
}

/// Why a host a client named is not an allowed origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// Not a well-formed host (a second port, empty labels, stray characters).
    #[error("{0:?} is not a well-formed host")]
    Malformed(String),
    /// No `[[origin]]` matches the host name.
    #[error("origin {0:?} is not allowed by this cache")]
    NotAllowed(String),
    /// The host is allowed, but not on this port: only 80, 443 and the `[[origin]]`'s `ports`.
    #[error("origin {host:?} is allowed on ports 80 and 443 (and those its [[origin]] lists in `ports`), not on port {port}")]
    PortNotAllowed {
        /// The host name without the port.
        host: String,
        /// The port the client named.
        port: u16,
    },
    /// An IP literal in a special-purpose block (private, loopback, link-local...) that no
    /// configured range lists explicitly.
    #[error("origin {host:?} is refused: {refusal}")]
    AddressRefused {
        /// The literal as the client named it, normalised.
        host: String,
        /// Why.
        refusal: AddressRefusal,
    },
}

/// The label of `server.default_upstream`'s traffic.
pub const DEFAULT_UPSTREAM_LABEL: &str = "default";

impl AllowedOrigin {
    /// The label this entry's traffic is counted under: its content set's name (shared by every
    /// entry of the set), else its host pattern as configured (`*.example.com`), else its
    /// address ranges (`203.0.113.0/24,2001:db8::/32`). Config text only, never request input.
    pub fn label(&self) -> String {
        if let Some(content_set) = &self.content_set {
            return content_set.clone();
        }
        if let Some(pattern) = &self.pattern {
            return pattern.to_string();
        }
        self.ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl OriginTarget {
    /// The target of reverse-proxy mode: every request goes to `url`, under `policy`. `None`
    /// when the URL names no host. [`Allowlist::new`] gives it its label.
    pub fn default_upstream(url: &str, policy: FreshnessPolicy) -> Option<OriginTarget> {
        let uri: Uri = url.parse().ok()?;
        let host = normalise_host(uri.authority()?.as_str())?;
        Some(OriginTarget {
            host,
            upstream_base: url.trim_end_matches('/').to_owned(),
            policy,
            content_set: None,
            host_header: None,
            chosen_by: ChosenBy::Admin,
            origin: OriginIndex(0),
        })
    }
}

impl Allowlist {
    /// The allowlist of parsed `[[origin]]` tables (first match wins) and the reverse-proxy
    /// mode's `server.default_upstream`, each given its label (see [`AllowedOrigin::label`] and
    /// [`DEFAULT_UPSTREAM_LABEL`]); entries whose labels read the same share it.
    pub fn new(entries: Vec<AllowedOrigin>, default_upstream: Option<OriginTarget>) -> Allowlist {
        let ranges = entries
            .iter()
            .flat_map(|allowed| allowed.ranges.iter().copied())
            .collect();
        let mut labels: Vec<String> = Vec::new();
        let mut index_of = |label: String| match labels.iter().position(|known| *known == label) {
            Some(position) => OriginIndex(position),
            None => {
                labels.push(label);
                OriginIndex(labels.len() - 1)
            }
        };
        let entry_origins = entries
            .iter()
            .map(|allowed| index_of(allowed.label()))
            .collect();
        let default_upstream = default_upstream.map(|target| OriginTarget {
            origin: index_of(DEFAULT_UPSTREAM_LABEL.to_owned()),
            ..target
        });
        Allowlist {
            entries,
            entry_origins,
            labels,
            default_upstream,
            address_policy: Arc::new(AddressPolicy::new(ranges)),
        }
    }

    /// Counts this allowlist's origins where `indices` say: `indices[i]` is where its label `i`
    /// (of [`Allowlist::labels`]) counts in the node's stats. For a reloaded allowlist, whose
    /// labels the running stats may already know under other indices.
    pub fn count_under(&mut self, indices: &[OriginIndex]) {
        let map = |origin: &mut OriginIndex| {
            if let Some(mapped) = indices.get(origin.0) {
                *origin = *mapped;
            }
        };
        self.entry_origins.iter_mut().for_each(map);
        if let Some(default) = &mut self.default_upstream {
            map(&mut default.origin);
        }
    }

    /// The labels the node counts traffic and stored objects under, in [`OriginIndex`] order:
    /// one per distinct entry label, then `default` when a default upstream is set. Fixed when
    /// the config is validated, so their number is bounded by the config.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The label a stored object belongs to, from its key: a content set's key names its set;
    /// a host's key names its host, which is the default upstream's, or is looked up as a
    /// request naming it would be. `None` for an object no entry allows any more (the config
    /// changed since it was stored).
    pub fn origin_of_key(&self, key: &CacheKey) -> Option<OriginIndex> {
        let text = key.as_str();
        if let Some(in_set) = text.strip_prefix(CONTENT_SET_PREFIX) {
            let name = in_set.split('/').next()?;
            return self
                .entries
                .iter()
                .zip(&self.entry_origins)
                .find(|(allowed, _)| allowed.content_set.as_deref() == Some(name))
                .map(|(_, origin)| *origin);
        }
        let host = text.split('/').next()?;
        if let Some(default) = self.default_upstream.as_ref().filter(|d| d.host == host) {
            return Some(default.origin);
        }
        let named = NamedHost::parse(host)?;
        self.find(&named).ok().map(|(_, origin)| origin)
    }

    /// What names a client names may resolve to, for the connector.
    pub fn address_policy(&self) -> Arc<AddressPolicy> {
        Arc::clone(&self.address_policy)
    }

    /// Makes `shared` (the policy the running origin client resolves names with) this
    /// allowlist's policy, after giving it this allowlist's ranges: a reloaded allowlist takes
    /// over the running one's policy instead of leaving the client with the old ranges.
    pub fn adopt_address_policy(&mut self, shared: Arc<AddressPolicy>) {
        shared.replace_with(&self.address_policy);
        self.address_policy = shared;
    }

    /// The entry that allows `named`: by host pattern for a name; for an IP literal, by a `cidr`
    /// range (see [`address_policy::range_allows`]) or a `host` that is exactly that literal
    /// (the admin wrote the address). Wildcard patterns never match literals.
    fn find(&self, named: &NamedHost) -> Result<(&AllowedOrigin, OriginIndex), LookupError> {
        let mut entries = self.entries.iter().zip(self.entry_origins.iter().copied());
        let Some(literal) = named.ip_literal() else {
            return entries
                .find(|(allowed, _)| {
                    allowed
                        .pattern
                        .as_ref()
                        .is_some_and(|pattern| pattern.matches(&named.name))
                })
                .ok_or_else(|| LookupError::NotAllowed(named.canonical()));
        };
        let mut refusal = None;
        for (allowed, origin) in entries {
            if matches!(&allowed.pattern, Some(HostPattern::Exact(exact)) if *exact == named.name) {
                return Ok((allowed, origin));
            }
            for range in &allowed.ranges {
                match address_policy::range_allows(range, literal) {
                    Ok(true) => return Ok((allowed, origin)),
                    Ok(false) => {}
                    Err(refused) => {
                        refusal.get_or_insert(refused);
                    }
                }
            }
        }
        Err(match refusal {
            Some(refusal) => LookupError::AddressRefused {
                host: named.canonical(),
                refusal,
            },
            None => LookupError::NotAllowed(named.canonical()),
        })
    }

    /// Looks up a host named by a client (with or without a port). Returns `None` when the host
    /// is not allowed; [`Allowlist::resolve`] says why.
    pub fn lookup(&self, raw_host: &str) -> Option<OriginTarget> {
        self.resolve(raw_host).ok()
    }

    /// Looks up a host named by a client. The host name must match an `[[origin]]` and the port
    /// (80 when none is named) must be 80, 443 or one of that origin's `ports`, whether or not
    /// the origin has an `upstream`: without one the port is where the node would connect, and
    /// with one it would only multiply the cache keys of the same content.
    pub fn resolve(&self, raw_host: &str) -> Result<OriginTarget, LookupError> {
        self.resolve_over(raw_host, ClientScheme::Http)
    }

    /// Like [`Allowlist::resolve`], for a request that arrived over `client`: the scheme of the
    /// upstream URL follows the origin's [`UpstreamScheme`], and over TLS an explicit `:443` is
    /// the default port (so `host:443` and `host` are one object, as `host:80` and `host` are).
    pub fn resolve_over(
        &self,
        raw_host: &str,
        client: ClientScheme,
    ) -> Result<OriginTarget, LookupError> {
        let mut named = NamedHost::parse(raw_host)
            .ok_or_else(|| LookupError::Malformed(raw_host.to_owned()))?;
        if client == ClientScheme::Https && named.port == Some(443) {
            named.port = None;
        }
        let (allowed, origin) = self.find(&named)?;
        let port = named.effective_port();
        if !DEFAULT_ORIGIN_PORTS.contains(&port) && !allowed.ports.contains(&port) {
            return Err(LookupError::PortNotAllowed {
                host: named.name,
                port,
            });
        }
        let host = named.canonical();
        let upstream_base = allowed
            .upstream
            .clone()
            .unwrap_or_else(|| format!("{}://{host}", allowed.scheme.for_client(client)));
        Ok(OriginTarget {
            host,
            upstream_base,
            policy: allowed.policy,
            content_set: allowed.content_set.clone(),
            host_header: allowed.host_header.clone(),
            chosen_by: if allowed.upstream.is_some() {
                ChosenBy::Admin
            } else {
                ChosenBy::Client
            },
            origin,
        })
    }

    /// The reverse-proxy target for requests that name no origin, if configured.
    pub fn default_upstream(&self) -> Option<&OriginTarget> {
        self.default_upstream.as_ref()
    }
}

/// The ports a client may name for any allowed origin without the `[[origin]]` listing them.
pub const DEFAULT_ORIGIN_PORTS: [u16; 2] = [80, 443];

/// The longest host name accepted (RFC 1035's 253 characters, without the trailing dot).
const MAX_HOST_NAME_LEN: usize = 253;

/// A host as a client named it, parsed: a lower-case name (or bracketed IPv6 literal) and the
/// port, if one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedHost {
    /// The lower-case host name without its trailing dot, or `[v6 literal]`.
    pub name: String,
    /// The port the client named, if any (never 0).
    pub port: Option<u16>,
}

impl NamedHost {
    /// Parses `name`, `name.`, `name:port`, `[v6]` or `[v6]:port`. Refuses anything else: a
    /// second port (`host:80:80`), empty labels (`host..`, `.host`, `a..b`), a port that is not a
    /// number from 1 to 65535, and characters that have no place in a host. A refused host must
    /// never become a new cache key or upstream URL.
    pub fn parse(raw_host: &str) -> Option<NamedHost> {
        let lowered = raw_host.trim().to_ascii_lowercase();
        let (name, port) = if lowered.starts_with('[') {
            let end = lowered.find(']')?;
            let literal = &lowered[1..end];
            literal.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match &lowered[end + 1..] {
                "" => None,
                rest => Some(rest.strip_prefix(':')?),
            };
            (lowered[..=end].to_owned(), port)
        } else {
            let (name, port) = match lowered.split_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (lowered.as_str(), None),
            };
            let name = name.strip_suffix('.').unwrap_or(name);
            let labels_ok = !name.is_empty()
                && name.len() <= MAX_HOST_NAME_LEN
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'))
                });
            if !labels_ok {
                return None;
            }
            (name.to_owned(), port)
        };
        let port = match port {
            None => None,
            Some(digits) => {
                if digits.is_empty()
                    || digits.len() > 5
                    || !digits.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                match digits.parse::<u16>() {
                    Ok(0) | Err(_) => return None,
                    Ok(port) => Some(port),
                }
            }
        };
        Some(NamedHost { name, port })
    }

    /// The address, when the host is an IPv4 literal or a bracketed IPv6 one.
    pub fn ip_literal(&self) -> Option<IpAddr> {
        match self.name.strip_prefix('[') {
            Some(bracketed) => bracketed.strip_suffix(']')?.parse().ok(),
            None => self.name.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4),
        }
    }

    /// The port a connection to this host would use: the named one, else 80.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(80)
    }

    /// The canonical form used in cache keys and upstream URLs: the name, and the port unless it
    /// is 80.
    pub fn canonical(&self) -> String {
        match self.port {
            None | Some(80) => self.name.clone(),
            Some(port) => format!("{}:{port}", self.name),
        }
    }
}

/// Lower-cases a host, removes a trailing dot and a default `:80` port, and refuses anything that
/// is not a plausible host name or IP literal with at most one port (so it can be used safely in
/// a cache key and URL). See [`NamedHost::parse`].
pub fn normalise_host(raw_host: &str) -> Option<String> {
    NamedHost::parse(raw_host).map(|host| host.canonical())
}

type HttpsConnector = hyper_rustls::HttpsConnector<UpstreamConnector>;

/// What the node asks an origin for.
#[derive(Debug, Clone)]
pub struct FetchRequest<'a> {
    /// Where to connect and which host to name.
    pub target: &'a OriginTarget,
    /// Path and query to ask for (`cacheHostOrigin` already removed).
    pub path_and_query: &'a str,
    /// `GET` or `HEAD`.
    pub method: Method,
    /// The `Range` header to send, if any.
    pub range: Option<String>,
    /// The `If-Range` header to send, if any (a strong ETag or Last-Modified of the stored copy).
    pub if_range: Option<String>,
    /// The `If-None-Match` header to send, if any (the stored copy's ETag, for a whole-object
    /// revalidation).
    pub if_none_match: Option<String>,
    /// The `If-Modified-Since` header to send, if any (the stored copy's Last-Modified).
    pub if_modified_since: Option<String>,
    /// The request fields of the variant asked for (an `Accept-Encoding` here replaces the
    /// `identity` sent otherwise).
    pub variant: Option<&'a crate::cache::vary::Variant>,
    /// A client's request fields to forward as they are, for a request relayed uncached
    /// (pass-through): its end-to-end fields replace the node's defaults (`User-Agent`,
    /// `Accept-Encoding`), and its `Via` entries come before the node's.
    pub client_headers: Option<&'a HeaderMap>,
}

/// A client's request the node relays to its origin unchanged and never stores: `POST`, `PUT`,
/// `PATCH`, `DELETE`, `OPTIONS`.
pub struct RelayRequest<'a> {
    /// Where to connect and which host to name.
    pub target: &'a OriginTarget,
    /// Path and query to ask for (`cacheHostOrigin` already removed).
    pub path_and_query: &'a str,
    /// The client's method.
    pub method: Method,
    /// The client's end-to-end header fields (hop-by-hop fields and `Host` already removed);
    /// the node adds its own `Via` entry after the client's.
    pub headers: HeaderMap,
    /// The client's body, streamed through.
    pub body: RelayedBody,
    /// Resolves when the body has been sent (or dropped): the first-byte timeout counts from
    /// then, so a long upload is not taken for a silent origin.
    pub body_sent: tokio::sync::oneshot::Receiver<()>,
}

/// Pooled HTTP/1.1 and HTTP/2 clients for origins, with rustls and the webpki root store.
#[derive(Clone)]
pub struct UpstreamClient {
    /// For hosts a client named ([`ChosenBy::Client`]): names are resolved, then checked.
    checked: Client<HttpsConnector, UpstreamRequestBody>,
    /// For hosts the admin configured ([`ChosenBy::Admin`]).
    trusted: Client<HttpsConnector, UpstreamRequestBody>,
    first_byte_timeout: Duration,
    /// `upstream.proxy`, for the `Proxy-Authorization` of plain requests through it.
    proxy: Option<ProxySettings>,
    /// This node's `Via` entry (RFC 9110 §7.6.3), with a random id per process, sent on every
    /// upstream request so a request that loops back to the node is recognised.
    via: HeaderValue,
    /// Counts every request sent (`origin_requests`).
    origin_requests: Counter,
}

impl UpstreamClient {
    /// Builds the client from the `[upstream]` settings, connecting through `proxy` when set and
    /// trusting `extra_roots` (`upstream.ca_file`) besides the public roots for `https://`
    /// origins.
    pub fn new(
        settings: &UpstreamConfig,
        proxy: Option<ProxySettings>,
        address_policy: Arc<AddressPolicy>,
        extra_roots: &[rustls_pki_types::CertificateDer<'static>],
        origin_requests: Counter,
    ) -> UpstreamClient {
        let tls = outpost_shared::tls_roots::client_config(extra_roots);
        let build = |resolver: OriginResolver| {
            let mut direct = HttpConnector::new_with_resolver(resolver);
            direct.enforce_http(false);
            direct.set_nodelay(true);
            direct.set_connect_timeout(Some(settings.connect_timeout));
            let mut to_proxy = HttpConnector::new();
            to_proxy.enforce_http(false);
            to_proxy.set_nodelay(true);
            to_proxy.set_connect_timeout(Some(settings.connect_timeout));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(UpstreamConnector::new(direct, to_proxy, proxy.clone()));
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(settings.pool_idle_timeout)
                .pool_max_idle_per_host(settings.pool_max_idle_per_host)
                .build(https)
        };
        let checked = build(OriginResolver::checked(address_policy));
        let trusted = build(OriginResolver::trusted());
        let via = format!("1.1 outpost-{:016x}", rand::random::<u64>());
        UpstreamClient {
            checked,
            trusted,
            first_byte_timeout: settings.first_byte_timeout,
            proxy,
            via: HeaderValue::from_str(&via).expect("the Via entry is ASCII"),
            origin_requests,
        }
    }

    /// True when `headers` show the request already passed through this node: it came back from
    /// an upstream that points at the node itself (directly or through other proxies).
    pub fn is_own_loop(&self, headers: &http::HeaderMap) -> bool {
        let own = self.via.as_bytes();
        let own_id = &own[own.len() - 16..];
        headers.get_all(header::VIA).iter().any(|value| {
            value
                .as_bytes()
                .windows(own_id.len())
                .any(|window| window == own_id)
        })
    }

    /// Sends one request and waits for the response headers (bounded by the first-byte timeout).
    /// The body is left to the caller, who applies the idle-read timeout while streaming it.
    pub async fn fetch(
        &self,
        request: FetchRequest<'_>,
    ) -> Result<Response<Incoming>, OriginError> {
        self.origin_requests.inc();
        let mut builder =
            self.request_builder(request.target, request.path_and_query, request.method)?;
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("outpost-cache-node/0.1"),
        );
        // The node stores exactly what it is sent; a compressed transfer would change the bytes
        // and the length under the client's byte ranges.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(client) = request.client_headers {
            let mut forwarded = client.clone();
            remove_hop_by_hop(&mut forwarded);
            forwarded.remove(header::HOST);
            for name in forwarded.keys() {
                headers.remove(name);
            }
            for (name, value) in &forwarded {
                headers.append(name, value.clone());
            }
        }
        headers.append(header::VIA, self.via.clone());
        for (name, value) in request.variant.iter().flat_map(|variant| &variant.fields) {
            if let Some(value) = value {
                headers.insert(name.clone(), value.clone());
            }
        }
        if let Some(range) = request
            .range
            .and_then(|value| HeaderValue::from_str(&value).ok())
        {
            headers.insert(header::RANGE, range);
        }
        if let Some(if_range) = request
            .if_range
            .and_then(|value| HeaderValue::from_str(&value).ok())
        {
            headers.insert(header::IF_RANGE, if_range);
        }
        for (name, value) in [
            (header::IF_NONE_MATCH, request.if_none_match),
            (header::IF_MODIFIED_SINCE, request.if_modified_since),
        ] {
            if let Some(value) = value.and_then(|value| HeaderValue::from_str(&value).ok()) {
                headers.insert(name, value);
            }
        }
        let http_request = builder
            .body(UpstreamRequestBody::Empty)
            .map_err(|error| OriginError::Protocol(error.to_string()))?;
        let client = self.client_for(request.target);
        let answer =
            tokio::time::timeout(self.first_byte_timeout, client.request(http_request)).await;
        match answer {
            Err(_) => Err(OriginError::FirstByteTimeout(self.first_byte_timeout)),
            Ok(answer) => Self::checked_answer(answer),
        }
    }

    /// Relays a client's request with its headers and streamed body, and waits for the response
    /// headers: up to the first-byte timeout after the body was sent. The response body is left
    /// to the caller. The node's `Via` entry follows the client's (RFC 9110 §7.6.3).
    pub async fn relay(
        &self,
        request: RelayRequest<'_>,
    ) -> Result<Response<Incoming>, OriginError> {
        self.origin_requests.inc();
        let mut builder =
            self.request_builder(request.target, request.path_and_query, request.method)?;
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        for (name, value) in &request.headers {
            if name != header::HOST {
                headers.append(name, value.clone());
            }
        }
        headers.append(header::VIA, self.via.clone());
        let http_request = builder
            .body(UpstreamRequestBody::Relayed(request.body))
            .map_err(|error| OriginError::Protocol(error.to_string()))?;
        let answer = self.client_for(request.target).request(http_request);
        let first_byte_timeout = self.first_byte_timeout;
        let deadline = async move {
            // Sent or dropped: either way the origin has had the whole body it will get.
            let _ = request.body_sent.await;
            tokio::time::sleep(first_byte_timeout).await;
        };
        tokio::select! {
            answer = answer => Self::checked_answer(answer),
            () = deadline => Err(OriginError::FirstByteTimeout(first_byte_timeout)),
        }
    }

    /// A request to `target` for `path_and_query`, with `Host` and, through an outbound proxy
    /// that wants them, its credentials.
    fn request_builder(
        &self,
        target: &OriginTarget,
        path_and_query: &str,
        method: Method,
    ) -> Result<http::request::Builder, OriginError> {
        let url = format!("{}{}", target.upstream_base, path_and_query);
        let uri: Uri = url
            .parse()
            .map_err(|error| OriginError::Protocol(format!("bad upstream URL {url}: {error}")))?;
        let mut builder = Request::builder().method(method);
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        if let Some(authorization) = self
            .proxy
            .as_ref()
            .and_then(|proxy| proxy.authorization_for(&uri))
        {
            headers.insert(header::PROXY_AUTHORIZATION, authorization.clone());
        }
        let mut builder = builder.uri(uri);
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        let host = target.host_header.as_deref().unwrap_or(&target.host);
        if let Ok(host) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, host);
        }
        Ok(builder)
    }

    /// The pool for `target`: hosts a client named are resolved and checked against the
    /// address policy; the admin's upstreams are trusted.
    fn client_for(&self, target: &OriginTarget) -> &Client<HttpsConnector, UpstreamRequestBody> {
        match target.chosen_by {
            ChosenBy::Client => &self.checked,
            ChosenBy::Admin => &self.trusted,
        }
    }

    /// The origin's answer, or why it is none.
    fn checked_answer(
        answer: Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    ) -> Result<Response<Incoming>, OriginError> {
        match answer {
            Err(error) => Err(match refused_name(&error) {
                Some(refused) => OriginError::AddressRefused(refused.to_string()),
                None => OriginError::Connect(error_chain(&error)),
            }),
            // Only a proxy asks for proxy credentials; passing its 407 on would tell the client
            // to authenticate to the node.
            Ok(response)
                if response.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
            {
                Err(OriginError::Connect(
                    "the outbound proxy wants credentials (407): set or fix them in upstream.proxy"
                        .into(),
                ))
            }
            Ok(response) => Ok(response),
        }
    }
}

pub use outpost_shared::errors::error_chain;

/// The [`NameRefused`] in an error's chain of sources, if the connector refused the name.
fn refused_name<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a NameRefused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<NameRefused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, OriginConfig};

    #[test]
    fn host_patterns_match_exact_names_and_subdomains_only() {
        let table: &[(&str, &str, bool)] = &[
            (
                "dl.delivery.mp.microsoft.com",
                "dl.delivery.mp.microsoft.com",
                true,
            ),
            (
                "dl.delivery.mp.microsoft.com",
                "x.dl.delivery.mp.microsoft.com",
                false,
            ),
            ("*.windowsupdate.com", "download.windowsupdate.com", true),
            ("*.windowsupdate.com", "a.b.windowsupdate.com", true),
            ("*.windowsupdate.com", "windowsupdate.com", false),
            ("*.windowsupdate.com", "evilwindowsupdate.com", false),
            ("*.Example.COM", "a.example.com", true),
        ];
        for (pattern, host, expected) in table {
            let parsed = HostPattern::parse(pattern).unwrap();
            assert_eq!(parsed.matches(host), *expected, "{pattern} vs {host}");
        }
        for bad in ["*", "", "*.", "a.*.com", "exa mple.com", "*.*.com", "a..b"] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn hosts_are_normalised_for_keys_and_urls() {
        let table: &[(&str, Option<&str>)] = &[
            ("Example.COM", Some("example.com")),
            ("example.com.", Some("example.com")),
            ("example.com:80", Some("example.com")),
            ("example.com:8080", Some("example.com:8080")),
            ("127.0.0.1:9", Some("127.0.0.1:9")),
            ("[::1]:8080", Some("[::1]:8080")),
            ("example.com:x", None),
            ("exa/mple.com", None),
            ("", None),
            ("a b", None),
            ("example.com:80:80", None),
            ("example.com..", None),
            ("example..com", None),
            (".example.com", None),
            ("example.com:", None),
            ("example.com:0", None),
            ("example.com:08080", Some("example.com:8080")),
            ("example.com:0080", Some("example.com")),
            ("[::1]", Some("[::1]")),
            ("[::1]:80", Some("[::1]")),
            ("[::1]x", None),
            ("[not-v6]:80", None),
            ("::1", None),
        ];
        for (raw, expected) in table {
            assert_eq!(normalise_host(raw).as_deref(), *expected, "{raw:?}");
        }
    }

    #[test]
    fn allowlist_uses_upstream_override_or_the_host_itself() {
        let config = Config {
            origin: vec![
                OriginConfig {
                    host: "*.example.com".into(),
                    upstream: Some("http://127.0.0.1:9000/".into()),
                    ..Default::default()
                },
                OriginConfig {
                    host: "plain.org".into(),
                    upstream: None,
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        let allowlist = config.validate().unwrap().allowlist;
        let target = allowlist.lookup("A.Example.com").unwrap();
        assert_eq!(target.host, "a.example.com");
        assert_eq!(target.upstream_base, "http://127.0.0.1:9000");
        assert_eq!(
            allowlist.lookup("plain.org:80").unwrap().upstream_base,
            "http://plain.org"
        );
        assert!(allowlist.lookup("example.com").is_none());
        assert!(allowlist.lookup("other.org").is_none());
        assert!(allowlist.default_upstream().is_none());
    }

    /// An `[[origin]]` allowing `host` (a pattern, or empty) and the `cidr` ranges.
    fn origin_config(host: &str, cidr: &[&str]) -> OriginConfig {
        OriginConfig {
            host: host.into(),
            cidr: cidr.iter().map(|range| (*range).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_entry_gets_a_label_from_its_config_and_objects_map_back_to_it() {
        let origin = |host: &str, cidr: &[&str], content_set: Option<&str>| OriginConfig {
            content_set: content_set.map(str::to_owned),
            upstream: Some("http://127.0.0.1:9000".into()),
            ..origin_config(host, cidr)
        };
        let config = Config {
            origin: vec![
                origin("a.cdn.example", &[], Some("cdn")),
                origin("*.Example.com", &[], None),
                origin("", &["203.0.113.0/24", "2001:db8::/32"], None),
                origin("b.cdn.example", &["198.51.100.0/24"], Some("cdn")),
            ],
            server: crate::config::ServerConfig {
                default_upstream: Some("http://mirror.lan:8080".into()),
                ..Default::default()
            },
            ..Config::default()
        };
        let allowlist = config.validate().unwrap().allowlist;
        assert_eq!(
            allowlist.labels(),
            [
                "cdn",
                "*.example.com",
                "203.0.113.0/24,2001:db8::/32",
                "default"
            ]
        );
        let label_of = |host: &str| {
            let origin = allowlist.resolve(host).unwrap().origin;
            allowlist.labels()[origin.0].as_str()
        };
        // Both entries of the set share its label, whichever name or address reached it.
        assert_eq!(label_of("a.cdn.example"), "cdn");
        assert_eq!(label_of("198.51.100.7"), "cdn");
        assert_eq!(label_of("dl.example.com"), "*.example.com");
        assert_eq!(label_of("203.0.113.9"), "203.0.113.0/24,2001:db8::/32");
        assert_eq!(allowlist.default_upstream().unwrap().origin, OriginIndex(3));
        // Stored objects map back to the label their requests counted under.
        let key_label = |key: CacheKey| {
            allowlist
                .origin_of_key(&key)
                .map(|origin| allowlist.labels()[origin.0].as_str())
        };
        let host_key = |host: &str| CacheKey::new(host, "/a");
        for (key, expected) in [
            (CacheKey::in_content_set("cdn", "/f?x=1"), Some("cdn")),
            (host_key("dl.example.com"), Some("*.example.com")),
            (
                host_key("dl.example.com:8080").variant("accept-encoding=gzip"),
                Some("*.example.com"),
            ),
            (
                host_key("203.0.113.9"),
                Some("203.0.113.0/24,2001:db8::/32"),
            ),
            (host_key("mirror.lan:8080"), Some("default")),
            // Objects the config no longer allows belong to no label.
            (host_key("gone.org"), None),
            (CacheKey::in_content_set("old-set", "/a"), None),
        ] {
            assert_eq!(key_label(key.clone()), expected, "{key:?}");
        }
    }

    #[test]
    fn requests_over_tls_reach_their_origin_over_https_unless_it_says_otherwise() {
        let origin = |host: &str, scheme: Option<&str>| OriginConfig {
            host: host.into(),
            upstream_scheme: scheme.map(str::to_owned),
            ..Default::default()
        };
        let config = Config {
            origin: vec![
                origin("same.org", None),
                origin("plain.org", Some("http")),
                origin("secure.org", Some("https")),
                OriginConfig {
                    host: "mirror.lan".into(),
                    upstream: Some("http://10.0.0.1:3142".into()),
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        let allowlist = config.validate().unwrap().allowlist;
        let base = |host: &str, scheme| allowlist.resolve_over(host, scheme).unwrap().upstream_base;
        let (http, https) = (ClientScheme::Http, ClientScheme::Https);
        assert_eq!(base("same.org", https), "https://same.org");
        assert_eq!(base("same.org", http), "http://same.org");
        assert_eq!(base("plain.org", https), "http://plain.org");
        assert_eq!(base("secure.org", http), "https://secure.org");
        assert_eq!(base("mirror.lan", https), "http://10.0.0.1:3142");
        // Over TLS, :443 is the default port: the same object as the bare host.
        let explicit = allowlist.resolve_over("same.org:443", https).unwrap();
        assert_eq!(explicit.host, "same.org");
        assert_eq!(explicit.upstream_base, "https://same.org");
        assert_eq!(
            allowlist.resolve_over("same.org:443", http).unwrap().host,
            "same.org:443"
        );
        let bad = Config {
            origin: vec![origin("x.org", Some("ftp"))],
            ..Config::default()
        };
        let message = bad.validate().unwrap_err().to_string();
        assert!(
            message.starts_with("origin[0].upstream_scheme:"),
            "{message}"
        );
    }

    #[test]
    fn literals_match_ranges_and_exact_hosts_but_never_wildcards() {
        let origin = |host: &str, cidr: &[&str], upstream: Option<&str>| OriginConfig {
            upstream: upstream.map(str::to_owned),
            ..origin_config(host, cidr)
        };
        let config = Config {
            origin: vec![
                origin("*.0.0.1", &[], None),
                origin("", &["0.0.0.0/0", "::/0"], None),
                origin("", &["10.7.0.0/16"], None),
                origin("127.0.0.9", &[], None),
                origin("mirror.lan", &[], Some("http://10.1.1.1:3142")),
            ],
            ..Config::default()
        };
        let allowlist = config.validate().unwrap().allowlist;
        let refused = |host: &str| match allowlist.resolve(host) {
            Err(LookupError::AddressRefused { refusal, .. }) => Some(refusal.kind),
            _ => None,
        };
        use crate::upstream::address_policy::SpecialKind;
        let public = allowlist.resolve("203.0.113.7").unwrap();
        assert_eq!(public.chosen_by, ChosenBy::Client);
        assert_eq!(public.upstream_base, "http://203.0.113.7");
        assert!(allowlist.resolve("[2001:db8::7]").is_ok());
        // Listed explicitly by a range inside the private block, or as an exact host.
        assert!(allowlist.resolve("10.7.3.4").is_ok());
        assert!(allowlist.resolve("127.0.0.9").is_ok());
        // The wildcard "*.0.0.1" would match "127.0.0.1" as a name; literals ignore wildcards.
        assert_eq!(refused("127.0.0.1"), Some(SpecialKind::Loopback));
        assert_eq!(refused("10.8.0.1"), Some(SpecialKind::Private));
        assert_eq!(refused("[::ffff:10.8.0.1]"), Some(SpecialKind::Private));
        assert_eq!(refused("169.254.169.254"), Some(SpecialKind::LinkLocal));
        assert_eq!(refused("[fe80::1]"), Some(SpecialKind::LinkLocal));
        // An upstream is the admin's choice; its address is not the client's.
        let mirror = allowlist.resolve("mirror.lan").unwrap();
        assert_eq!(mirror.chosen_by, ChosenBy::Admin);
        let only_names = Config {
            origin: vec![origin("*.example.com", &[], None)],
            ..Config::default()
        };
        assert_eq!(
            only_names.validate().unwrap().allowlist.resolve("10.0.0.1"),
            Err(LookupError::NotAllowed("10.0.0.1".into()))
        );
    }
}
