//! Origins: which hosts the node may fetch for (the allowlist), where it really connects for each
//! (the optional `upstream` override), and the pooled HTTP/HTTPS client that does the fetching.
//!
//! The allowlist is what keeps the node from being an open proxy: a host that matches no
//! `[[origin]]` entry is never contacted.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::cache::freshness::FreshnessPolicy;
use crate::error::OriginError;
pub use crate::upstream::host_pattern::HostPattern;
use crate::upstream::outbound_proxy::{ProxySettings, UpstreamConnector};
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
}

/// The allowlist built from `[[origin]]` tables and `[server] default_upstream`.
#[derive(Debug, Clone)]
pub struct Allowlist {
    entries: Vec<AllowedOrigin>,
    default_upstream: Option<OriginTarget>,
}

/// One `[[origin]]` table, parsed.
#[derive(Debug, Clone)]
pub struct AllowedOrigin {
    /// `host`.
    pub pattern: HostPattern,
    /// `upstream`, without a trailing `/`.
    pub upstream: Option<String>,
    /// The freshness settings for this origin (its own or the global ones).
    pub policy: FreshnessPolicy,
    /// Ports clients may name besides [`DEFAULT_ORIGIN_PORTS`].
    pub ports: Vec<u16>,
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
}

impl OriginTarget {
    /// The target of reverse-proxy mode: every request goes to `url`, under `policy`. `None`
    /// when the URL names no host.
    pub fn default_upstream(url: &str, policy: FreshnessPolicy) -> Option<OriginTarget> {
        let uri: Uri = url.parse().ok()?;
        let host = normalise_host(uri.authority()?.as_str())?;
        Some(OriginTarget {
            host,
            upstream_base: url.trim_end_matches('/').to_owned(),
            policy,
        })
    }
}

impl Allowlist {
    /// The allowlist of parsed `[[origin]]` tables (first match wins) and the reverse-proxy
    /// mode's `server.default_upstream`.
    pub fn new(entries: Vec<AllowedOrigin>, default_upstream: Option<OriginTarget>) -> Allowlist {
        Allowlist {
            entries,
            default_upstream,
        }
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
        let named = NamedHost::parse(raw_host)
            .ok_or_else(|| LookupError::Malformed(raw_host.to_owned()))?;
        let allowed = self
            .entries
            .iter()
            .find(|allowed| allowed.pattern.matches(&named.name))
            .ok_or_else(|| LookupError::NotAllowed(named.canonical()))?;
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
            .unwrap_or_else(|| format!("http://{host}"));
        Ok(OriginTarget {
            host,
            upstream_base,
            policy: allowed.policy,
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
}

/// A pooled HTTP/1.1 and HTTP/2 client for origins, with rustls and the webpki root store.
#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpsConnector, Empty<Bytes>>,
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
    /// Builds the client from the `[upstream]` settings, connecting through `proxy` when set.
    pub fn new(
        settings: &UpstreamConfig,
        proxy: Option<ProxySettings>,
        origin_requests: Counter,
    ) -> UpstreamClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .expect("the ring provider supports the default TLS versions")
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(UpstreamConnector::new(http, proxy.clone()));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .build(https);
        let via = format!("1.1 outpost-{:016x}", rand::random::<u64>());
        UpstreamClient {
            client,
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
        let url = format!("{}{}", request.target.upstream_base, request.path_and_query);
        let uri: Uri = url
            .parse()
            .map_err(|error| OriginError::Protocol(format!("bad upstream URL {url}: {error}")))?;
        let mut builder = Request::builder().method(request.method);
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
        if let Ok(host) = HeaderValue::from_str(&request.target.host) {
            headers.insert(header::HOST, host);
        }
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("outpost-cache-node/0.1"),
        );
        headers.insert(header::VIA, self.via.clone());
        // The node stores exactly what it is sent; a compressed transfer would change the bytes
        // and the length under the client's byte ranges.
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
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
            .body(Empty::new())
            .map_err(|error| OriginError::Protocol(error.to_string()))?;
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(http_request)).await
        {
            Err(_) => Err(OriginError::FirstByteTimeout(self.first_byte_timeout)),
            Ok(Err(error)) => Err(OriginError::Connect(error_chain(&error))),
            // Only a proxy asks for proxy credentials; passing its 407 on would tell the client
            // to authenticate to the node.
            Ok(Ok(response))
                if response.status() == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
            {
                Err(OriginError::Connect(
                    "the outbound proxy wants credentials (407): set or fix them in upstream.proxy"
                        .into(),
                ))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }
}

pub use outpost_shared::errors::error_chain;

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
}
