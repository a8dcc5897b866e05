//! Routing: decides which allowed origin a client request is for, and what to ask that origin.
//!
//! Four ways in, tried in this order:
//! 1. **Proxy mode**: an absolute-form request line (`GET http://host/path`), as apt or curl send
//!    through `http_proxy`.
//! 2. **MCC mode**: `/<path>?cacheHostOrigin=<host>`, as Delivery Optimization clients send.
//! 3. **Host-header mode**: the `Host:` header names an allowed origin (DNS interception).
//! 4. **Reverse-proxy mode**: `[server] default_upstream`, for requests that name no allowed origin.
//!
//! Anything else is refused: the node is never an open proxy.
//!
//! The node's own API (piece manifests and the peer tracker, `api::peering`) lives under
//! [`API_PREFIX`] and is recognised only in requests that name no origin in any of the first three
//! ways; the prefix is refused in reverse-proxy mode, so an API path and a content path can
//! never be the same request.

use http::{header, HeaderMap, Uri};

use std::sync::Arc;

use crate::cache::key::{split_cache_host_origin, CacheKey};
use crate::cache::vary::Variant;
use crate::http::client_key::ClientScheme;
use crate::upstream::origin::{
    normalise_host, Allowlist, FetchRequest, LookupError, NamedHost, OriginTarget,
};

/// The path prefix reserved for the node's own API. It never reaches an origin in reverse-proxy
/// mode; under an origin named by proxy, MCC or Host-header mode it is ordinary content.
pub const API_PREFIX: &str = "/_outpost/";

/// How the request named its origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    /// Absolute-form request line.
    Proxy,
    /// `cacheHostOrigin` query parameter.
    Mcc,
    /// `Host:` header.
    HostHeader,
    /// `[server] default_upstream`.
    Reverse,
}

impl RouteMode {
    /// A short lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteMode::Proxy => "proxy",
            RouteMode::Mcc => "mcc",
            RouteMode::HostHeader => "host",
            RouteMode::Reverse => "reverse",
        }
    }
}

/// A routed request.
#[derive(Debug, Clone)]
pub struct Route {
    /// The origin and where to connect for it.
    pub target: OriginTarget,
    /// What to ask upstream: the path and query with `cacheHostOrigin` removed.
    pub path_and_query: String,
    /// How the origin was named.
    pub mode: RouteMode,
    /// The variant of a varying response this request selects (see [`crate::cache::vary`]):
    /// part of the cache key, and its fields are sent to the origin.
    pub variant: Option<Arc<Variant>>,
}

impl Route {
    /// A request upstream for this route's content.
    pub fn fetch_request(
        &self,
        method: http::Method,
        range: Option<String>,
        if_range: Option<String>,
    ) -> FetchRequest<'_> {
        FetchRequest {
            target: &self.target,
            path_and_query: &self.path_and_query,
            method,
            range,
            if_range,
            if_none_match: None,
            if_modified_since: None,
            variant: self.variant.as_deref(),
            client_headers: None,
        }
    }

    /// A conditional `GET` of the whole object: `If-None-Match` with `etag`, else
    /// `If-Modified-Since` with `last_modified` (RFC 9111 §4.3.1), for a revalidation that
    /// expects a `304`.
    pub fn conditional_request(
        &self,
        etag: Option<String>,
        last_modified: Option<String>,
    ) -> FetchRequest<'_> {
        let if_modified_since = if etag.is_none() { last_modified } else { None };
        FetchRequest {
            if_none_match: etag,
            if_modified_since,
            ..self.fetch_request(http::Method::GET, None, None)
        }
    }

    /// The content identity of this request: its primary key, or its variant's key.
    pub fn cache_key(&self) -> CacheKey {
        let primary = self.primary_key();
        match &self.variant {
            Some(variant) => variant.key(&primary),
            None => primary,
        }
    }

    /// The content identity of this request's URL, whatever variant it selects.
    pub fn primary_key(&self) -> CacheKey {
        match &self.target.content_set {
            Some(content_set) => CacheKey::in_content_set(content_set, &self.path_and_query),
            None => CacheKey::new(&self.target.host, &self.path_and_query),
        }
    }

    /// This route, selecting `variant`.
    pub fn with_variant(&self, variant: Option<Variant>) -> Route {
        Route {
            variant: variant.map(Arc::new),
            ..self.clone()
        }
    }

    /// The cache key of the URL a response's `Location` or `Content-Location` names, when it is
    /// this route's origin (RFC 9111 §4.4 invalidates only same-origin URLs): a reference
    /// relative to the request's path, or an absolute `http` or `https` URL with the origin's
    /// host. `None` for another host, another scheme, or what is no URL at all.
    pub fn same_origin_key(&self, reference: &str) -> Option<CacheKey> {
        let reference = reference.trim();
        if reference.is_empty() {
            return None;
        }
        let path_and_query = if reference.starts_with("//") {
            // A network-path reference names a host; a scheme-relative one is rare enough in a
            // `Location` that it is not worth resolving.
            return None;
        } else if reference.starts_with('/') {
            reference.to_owned()
        } else if let Some((scheme, _)) = reference.split_once("://") {
            // The key has no scheme (both reach the same stored object), so an `https`
            // reference to the same host counts: invalidating one object too many is safe.
            if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                return None;
            }
            let uri: Uri = reference.parse().ok()?;
            let authority = uri.authority()?;
            if normalise_host(authority.as_str()).as_deref() != Some(self.target.host.as_str()) {
                return None;
            }
            uri.path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string)
        } else {
            // A path relative to the request's directory (RFC 3986 §5.2.3). Dot segments and
            // anything with a space or a colon before its first slash are not resolved.
            let first_segment = reference.split('/').next().unwrap_or("");
            if reference.starts_with('.')
                || first_segment.contains(':')
                || reference.contains(char::is_whitespace)
            {
                return None;
            }
            let request_path = self.path_and_query.split(['?', '#']).next().unwrap_or("/");
            let directory = &request_path[..=request_path.rfind('/').unwrap_or(0)];
            format!("{directory}{reference}")
        };
        let path_and_query = path_and_query.split('#').next().unwrap_or("/");
        let path_and_query = match path_and_query.split_once('?') {
            Some((path, query)) => match split_cache_host_origin(query).0 {
                query if query.is_empty() => path.to_owned(),
                query => format!("{path}?{query}"),
            },
            None => path_and_query.to_owned(),
        };
        Some(CacheKey::new(&self.target.host, &path_and_query))
    }
}

/// Why a request could not be routed. Each maps to a 4xx answer with a short explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The named origin is not in the allowlist (403).
    #[error("origin {0:?} is not allowed by this cache")]
    NotAllowed(String),
    /// The request named no origin and no default upstream is configured (403).
    #[error("request names no origin (use ?cacheHostOrigin=<host>, a Host header of an allowed origin, or a proxy request)")]
    NoOrigin,
    /// The path is under [`API_PREFIX`], which reverse-proxy mode never forwards (404).
    #[error("paths under {API_PREFIX} are reserved for the cache node's API")]
    Reserved,
    /// The named origin is allowed, but not on the port the request named (403).
    #[error("origin {host:?} is allowed on ports 80 and 443 (and those its [[origin]] lists in `ports`), not on port {port}")]
    PortNotAllowed {
        /// The host name without the port.
        host: String,
        /// The port the request named.
        port: u16,
    },
    /// The named origin is an IP literal in a special-purpose block that no configured range
    /// lists explicitly (403).
    #[error("origin {host:?} is refused: {refusal}")]
    AddressRefused {
        /// The literal, normalised.
        host: String,
        /// Why.
        refusal: crate::upstream::address_policy::AddressRefusal,
    },
}

impl From<LookupError> for RouteError {
    fn from(error: LookupError) -> RouteError {
        match error {
            // A malformed host is refused before routing with 400 (see [`check_request`]); a
            // caller that routes without that check still never builds a key or URL from it.
            LookupError::Malformed(host) | LookupError::NotAllowed(host) => {
                RouteError::NotAllowed(host)
            }
            LookupError::PortNotAllowed { host, port } => RouteError::PortNotAllowed { host, port },
            LookupError::AddressRefused { host, refusal } => {
                RouteError::AddressRefused { host, refusal }
            }
        }
    }
}

/// Why a request is malformed before any routing (400). None of these may reach an origin or
/// become a cache key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The request-target is neither origin-form (`/path`) nor absolute-form
    /// (`http://host/path`): asterisk-form (`*`), authority-form (`host:port`) or another scheme.
    #[error("request-target {0:?} is neither a path (/...) nor an absolute http:// URL")]
    RequestTarget(String),
    /// More than one `Host` header (RFC 9112 §3.2: a server must answer 400).
    #[error("more than one Host header")]
    DuplicateHost,
    /// A `Host` header, `:authority`, absolute-form authority or `cacheHostOrigin` that is not a
    /// well-formed host (a second port, empty labels, stray characters).
    #[error("{0:?} is not a well-formed host")]
    MalformedHost(String),
}

/// Checks the parts of a request routing relies on, before routing: the request-target's form,
/// a single `Host` header, and well-formed hosts wherever the request names one.
pub fn check_request(
    version: http::Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), BadRequest> {
    let bad_target = || BadRequest::RequestTarget(uri.to_string());
    if version >= http::Version::HTTP_2 {
        // hyper builds an HTTP/2 request's URI from its pseudo-headers; `:path` must be a path.
        if !uri.path().starts_with('/') {
            return Err(bad_target());
        }
    } else {
        match (uri.scheme_str(), uri.authority()) {
            // Origin-form.
            (None, None) if uri.path().starts_with('/') => {}
            // Absolute-form.
            (Some(scheme), Some(_))
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {}
            _ => return Err(bad_target()),
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(BadRequest::DuplicateHost);
    }
    let well_formed = |host: &str| {
        NamedHost::parse(host)
            .map(|_| ())
            .ok_or_else(|| BadRequest::MalformedHost(host.to_owned()))
    };
    if let Some(value) = host_header {
        let text = value.to_str().map_err(|_| {
            BadRequest::MalformedHost(String::from_utf8_lossy(value.as_bytes()).into_owned())
        })?;
        // An empty Host is allowed when the request-target names no host (RFC 9112 §3.2).
        if !text.trim().is_empty() {
            well_formed(text)?;
        }
    }
    if let Some(authority) = uri.authority() {
        well_formed(authority.as_str())?;
    }
    if let Some(named) = split_cache_host_origin(uri.query().unwrap_or("")).1 {
        well_formed(&named)?;
    }
    Ok(())
}

/// The origin-form URI and host of a request of any HTTP version: on HTTP/2 the `:authority`
/// pseudo-header plays the `Host` header's part (RFC 9113 §8.3.1); it is not a proxy request
/// (HTTP/2 proxies use CONNECT).
fn origin_form<'a>(
    version: http::Version,
    uri: &'a Uri,
    host_header: Option<&'a str>,
) -> (std::borrow::Cow<'a, Uri>, Option<&'a str>) {
    if version >= http::Version::HTTP_2 {
        if let Some(authority) = uri.authority() {
            let mut parts = uri.clone().into_parts();
            parts.scheme = None;
            parts.authority = None;
            if let Ok(origin_form) = Uri::from_parts(parts) {
                return (
                    std::borrow::Cow::Owned(origin_form),
                    Some(authority.as_str()),
                );
            }
        }
    }
    (std::borrow::Cow::Borrowed(uri), host_header)
}

/// True when a request is for the node's own API: its path is under [`API_PREFIX`] and it names no
/// origin (origin-form request line, no `cacheHostOrigin`, no `Host` of an allowed origin).
pub fn is_api_request(
    allowlist: &Allowlist,
    version: http::Version,
    uri: &Uri,
    host_header: Option<&str>,
) -> bool {
    let (uri, host) = origin_form(version, uri, host_header);
    uri.path().starts_with(API_PREFIX)
        && uri.authority().is_none()
        && split_cache_host_origin(uri.query().unwrap_or(""))
            .1
            .is_none()
        && host.is_none_or(|host| allowlist.lookup(host).is_none())
}

/// Routes a request of any HTTP version (see [`origin_form`] for HTTP/2) that arrived over
/// `scheme` (which picks the scheme of the origin's URL, see [`Allowlist::resolve_over`]).
pub fn route_request(
    allowlist: &Allowlist,
    version: http::Version,
    uri: &Uri,
    host_header: Option<&str>,
    scheme: ClientScheme,
) -> Result<Route, RouteError> {
    let (uri, host) = origin_form(version, uri, host_header);
    route_over(allowlist, &uri, host, scheme)
}

/// Routes an HTTP/1 request given its URI, `Host` header and the scheme it arrived over.
pub fn route_over(
    allowlist: &Allowlist,
    uri: &Uri,
    host_header: Option<&str>,
    scheme: ClientScheme,
) -> Result<Route, RouteError> {
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    let (remaining_query, cache_host_origin) = split_cache_host_origin(uri.query().unwrap_or(""));
    let path_and_query = if remaining_query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{remaining_query}")
    };
    let lookup = |named: &str, mode: RouteMode| {
        allowlist
            .resolve_over(named, scheme)
            .map(|target| Route {
                target,
                path_and_query: path_and_query.clone(),
                mode,
                variant: None,
            })
            .map_err(RouteError::from)
    };
    if let Some(authority) = uri.authority() {
        return lookup(authority.as_str(), RouteMode::Proxy);
    }
    if let Some(origin_host) = cache_host_origin {
        return lookup(&origin_host, RouteMode::Mcc);
    }
    // A Host that is not an allowed origin is usually the node's own name: the request may still
    // be for the default upstream.
    let host_refusal = match host_header {
        Some(host) => match lookup(host, RouteMode::HostHeader) {
            Ok(found) => return Ok(found),
            Err(refusal) => Some(refusal),
        },
        None => None,
    };
    match allowlist.default_upstream() {
        Some(_) if path.starts_with(API_PREFIX) => Err(RouteError::Reserved),
        Some(target) => Ok(Route {
            target: target.clone(),
            path_and_query,
            mode: RouteMode::Reverse,
            variant: None,
        }),
        None => Err(host_refusal.unwrap_or(RouteError::NoOrigin)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        allowlist: &Allowlist,
        uri: &Uri,
        host_header: Option<&str>,
    ) -> Result<Route, RouteError> {
        route_over(allowlist, uri, host_header, ClientScheme::Http)
    }
    use crate::config::{Config, OriginConfig};

    fn allowlist(default_upstream: Option<&str>) -> Allowlist {
        let mut config = Config {
            origin: vec![
                OriginConfig {
                    host: "*.delivery.mp.microsoft.com".into(),
                    upstream: Some("http://127.0.0.1:7000".into()),
                    ..Default::default()
                },
                OriginConfig {
                    host: "deb.debian.org".into(),
                    upstream: None,
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        config.server.default_upstream = default_upstream.map(str::to_owned);
        config.validate().unwrap().allowlist
    }

    fn routed(
        list: &Allowlist,
        uri: &str,
        host: Option<&str>,
    ) -> Result<(RouteMode, String, String, String), RouteError> {
        route(list, &uri.parse().unwrap(), host).map(|route| {
            (
                route.mode,
                route.target.host.clone(),
                route.target.upstream_base.clone(),
                route.path_and_query.clone(),
            )
        })
    }

    #[test]
    fn only_same_origin_locations_name_a_cache_key() {
        let list = allowlist(None);
        let route = route(
            &list,
            &"/pool/main/a/b.deb?cacheHostOrigin=deb.debian.org"
                .parse()
                .unwrap(),
            None,
        )
        .unwrap();
        let table: &[(&str, Option<&str>)] = &[
            ("/pool/x.deb", Some("deb.debian.org/pool/x.deb")),
            ("http://deb.debian.org/y?v=1", Some("deb.debian.org/y?v=1")),
            ("http://DEB.debian.org:80/y#frag", Some("deb.debian.org/y")),
            ("c.deb", Some("deb.debian.org/pool/main/a/c.deb")),
            (
                "/z?cacheHostOrigin=deb.debian.org&k=2",
                Some("deb.debian.org/z?k=2"),
            ),
            ("http://other.org/pool/x.deb", None),
            (
                "https://deb.debian.org/pool/x.deb",
                Some("deb.debian.org/pool/x.deb"),
            ),
            ("http://deb.debian.org:8080/pool/x.deb", None),
            ("ftp://deb.debian.org/pool/x.deb", None),
            ("mailto:x@deb.debian.org", None),
            ("//other.org/pool/x.deb", None),
            ("../up.deb", None),
            ("", None),
            ("not a url", None),
        ];
        for (reference, expected) in table {
            assert_eq!(
                route
                    .same_origin_key(reference)
                    .as_ref()
                    .map(CacheKey::as_str),
                *expected,
                "{reference:?}"
            );
        }
    }

    #[test]
    fn http2_authority_is_the_host_not_a_proxy_target() {
        let list = allowlist(None);
        let uri: Uri = "http://cache.local:8080/a/b?cacheHostOrigin=dl.delivery.mp.microsoft.com"
            .parse()
            .unwrap();
        let mcc =
            route_request(&list, http::Version::HTTP_2, &uri, None, ClientScheme::Http).unwrap();
        assert_eq!(mcc.mode, RouteMode::Mcc);
        assert_eq!(mcc.target.host, "dl.delivery.mp.microsoft.com");
        assert_eq!(mcc.path_and_query, "/a/b");
        let uri: Uri = "http://deb.debian.org/debian/x".parse().unwrap();
        let by_host =
            route_request(&list, http::Version::HTTP_2, &uri, None, ClientScheme::Http).unwrap();
        assert_eq!(by_host.mode, RouteMode::HostHeader);
        assert_eq!(by_host.path_and_query, "/debian/x");
        // The same absolute URI over HTTP/1.1 is a proxy request.
        let proxied = route_request(
            &list,
            http::Version::HTTP_11,
            &uri,
            None,
            ClientScheme::Http,
        )
        .unwrap();
        assert_eq!(proxied.mode, RouteMode::Proxy);
    }

    #[test]
    fn each_mode_routes_to_the_right_origin() {
        let list = allowlist(None);
        assert_eq!(
            routed(
                &list,
                "/filestreamingservice/files/g/x.png?cacheHostOrigin=dl.delivery.mp.microsoft.com",
                Some("cache.local")
            ),
            Ok((
                RouteMode::Mcc,
                "dl.delivery.mp.microsoft.com".into(),
                "http://127.0.0.1:7000".into(),
                "/filestreamingservice/files/g/x.png".into()
            ))
        );
        assert_eq!(
            routed(
                &list,
                "/a?p=1&cacheHostOrigin=dl.delivery.mp.microsoft.com&q=2",
                None
            )
            .unwrap()
            .3,
            "/a?p=1&q=2"
        );
        assert_eq!(
            routed(&list, "/debian/dists/x", Some("deb.debian.org")),
            Ok((
                RouteMode::HostHeader,
                "deb.debian.org".into(),
                "http://deb.debian.org".into(),
                "/debian/dists/x".into()
            ))
        );
        assert_eq!(
            routed(
                &list,
                "http://deb.debian.org/debian/x?y",
                Some("deb.debian.org")
            ),
            Ok((
                RouteMode::Proxy,
                "deb.debian.org".into(),
                "http://deb.debian.org".into(),
                "/debian/x?y".into()
            ))
        );
    }

    #[test]
    fn unknown_origins_are_refused_in_every_mode() {
        let list = allowlist(None);
        assert_eq!(
            routed(&list, "/x?cacheHostOrigin=evil.example", None),
            Err(RouteError::NotAllowed("evil.example".into()))
        );
        assert_eq!(
            routed(&list, "http://evil.example/x", None),
            Err(RouteError::NotAllowed("evil.example".into()))
        );
        assert_eq!(
            routed(&list, "/x", Some("evil.example")),
            Err(RouteError::NotAllowed("evil.example".into()))
        );
        assert_eq!(routed(&list, "/x", None), Err(RouteError::NoOrigin));
        // An MCC request naming a disallowed origin is refused even when a default upstream
        // exists: the client asked for that origin explicitly.
        let with_default = allowlist(Some("http://mirror.example:8080"));
        assert_eq!(
            routed(&with_default, "/x?cacheHostOrigin=evil.example", None),
            Err(RouteError::NotAllowed("evil.example".into()))
        );
    }

    #[test]
    fn api_paths_are_api_only_when_no_origin_is_named() {
        let list = allowlist(Some("http://mirror.example:8080"));
        let is_api = |uri: &str, host: Option<&str>| {
            is_api_request(&list, http::Version::HTTP_11, &uri.parse().unwrap(), host)
        };
        assert!(is_api(
            "/_outpost/v1/peers?content_id=ab",
            Some("cache.local")
        ));
        assert!(is_api("/_outpost/v1/manifest", None));
        // Content under the prefix stays content whenever an origin is named.
        assert!(!is_api("/_outpost/v1/peers", Some("deb.debian.org")));
        assert!(!is_api("/_outpost/v1/peers", Some("DEB.debian.org:80")));
        assert!(!is_api(
            "/_outpost/v1/peers?cacheHostOrigin=dl.delivery.mp.microsoft.com",
            Some("cache.local")
        ));
        assert!(!is_api(
            "/_outpost/v1/peers?cacheHostOrigin=evil.example",
            Some("cache.local")
        ));
        assert!(!is_api("http://deb.debian.org/_outpost/v1/peers", None));
        assert!(!is_api("/_outpostx/v1/peers", None));
        assert!(!is_api("/x/_outpost/v1/peers", None));
        // HTTP/2: the :authority is the host.
        let h2 =
            |uri: &str| is_api_request(&list, http::Version::HTTP_2, &uri.parse().unwrap(), None);
        assert!(h2("http://cache.local/_outpost/v1/peers"));
        assert!(!h2("http://deb.debian.org/_outpost/v1/peers"));
        // Reverse-proxy mode never forwards the prefix.
        assert_eq!(
            routed(&list, "/_outpost/v1/peers", Some("cache.local")),
            Err(RouteError::Reserved)
        );
        assert_eq!(
            routed(&list, "/_outpost/v1/peers", Some("deb.debian.org"))
                .unwrap()
                .0,
            RouteMode::HostHeader
        );
    }

    #[test]
    fn requests_naming_no_allowed_origin_use_the_default_upstream() {
        let list = allowlist(Some("http://mirror.example:8080/"));
        assert_eq!(
            routed(&list, "/pool/a.deb", Some("cache.local")),
            Ok((
                RouteMode::Reverse,
                "mirror.example:8080".into(),
                "http://mirror.example:8080".into(),
                "/pool/a.deb".into()
            ))
        );
    }

    #[test]
    fn only_origin_form_and_absolute_form_targets_pass() {
        let check = |version: http::Version, target: &str| {
            check_request(version, &target.parse().unwrap(), &HeaderMap::new())
        };
        for good in [
            "/",
            "/a/b?c=d",
            "http://deb.debian.org/x",
            "HTTP://deb.debian.org",
            "https://deb.debian.org/x",
        ] {
            assert_eq!(check(http::Version::HTTP_11, good), Ok(()), "{good}");
        }
        for bad in ["*", "deb.debian.org:80", "ftp://deb.debian.org/x"] {
            assert!(
                matches!(
                    check(http::Version::HTTP_11, bad),
                    Err(BadRequest::RequestTarget(_))
                ),
                "{bad} should be refused"
            );
        }
        assert_eq!(check(http::Version::HTTP_2, "http://cache.local/x"), Ok(()));
        assert!(check(http::Version::HTTP_2, "*").is_err());
    }

    #[test]
    fn duplicate_and_malformed_hosts_are_bad_requests() {
        let with_hosts = |hosts: &[&str]| {
            let mut headers = HeaderMap::new();
            for host in hosts {
                headers.append(header::HOST, host.parse().unwrap());
            }
            headers
        };
        let uri: Uri = "/x".parse().unwrap();
        let check = |headers: &HeaderMap| check_request(http::Version::HTTP_11, &uri, headers);
        assert_eq!(check(&with_hosts(&["deb.debian.org"])), Ok(()));
        assert_eq!(check(&with_hosts(&["deb.debian.org."])), Ok(()));
        assert_eq!(check(&with_hosts(&[""])), Ok(()));
        assert_eq!(
            check(&with_hosts(&["deb.debian.org", "evil.example"])),
            Err(BadRequest::DuplicateHost)
        );
        assert_eq!(
            check(&with_hosts(&["deb.debian.org", "deb.debian.org"])),
            Err(BadRequest::DuplicateHost)
        );
        for bad in [
            "deb.debian.org:80:80",
            "deb.debian.org..",
            ".deb.debian.org",
            "deb..debian.org",
            "deb.debian.org:",
            "deb.debian.org:0",
            "deb.debian.org:65536",
            "deb.debian.org:+80",
            "deb.debian.org/x",
            "[::1",
        ] {
            assert_eq!(
                check(&with_hosts(&[bad])),
                Err(BadRequest::MalformedHost(bad.into())),
                "{bad}"
            );
        }
        let mcc: Uri = "/x?cacheHostOrigin=deb.debian.org:80:80".parse().unwrap();
        assert!(matches!(
            check_request(http::Version::HTTP_11, &mcc, &HeaderMap::new()),
            Err(BadRequest::MalformedHost(_))
        ));
    }

    #[test]
    fn other_ports_of_an_allowed_host_are_refused_unless_listed() {
        let mut config = Config {
            origin: vec![
                OriginConfig {
                    host: "localhost".into(),
                    ..Default::default()
                },
                OriginConfig {
                    host: "mirror.lan".into(),
                    ports: vec![8080],
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        let list = config.clone().validate().unwrap().allowlist;
        assert_eq!(
            routed(&list, "/stats", Some("localhost:9090")),
            Err(RouteError::PortNotAllowed {
                host: "localhost".into(),
                port: 9090
            })
        );
        assert_eq!(
            routed(&list, "/x?cacheHostOrigin=localhost:19099", None),
            Err(RouteError::PortNotAllowed {
                host: "localhost".into(),
                port: 19099
            })
        );
        assert_eq!(
            routed(&list, "http://localhost:25/x", None),
            Err(RouteError::PortNotAllowed {
                host: "localhost".into(),
                port: 25
            })
        );
        for allowed in [
            "localhost",
            "localhost:80",
            "localhost:443",
            "localhost:080",
        ] {
            assert!(routed(&list, "/x", Some(allowed)).is_ok(), "{allowed}");
        }
        assert_eq!(
            routed(&list, "/x", Some("mirror.lan:8080")).unwrap().2,
            "http://mirror.lan:8080"
        );
        assert!(routed(&list, "/x", Some("mirror.lan:8081")).is_err());
        // A malformed host never routes, even without the check before routing.
        assert_eq!(
            routed(&list, "/x", Some("localhost:80:80")),
            Err(RouteError::NotAllowed("localhost:80:80".into()))
        );
        // The default upstream's port is the admin's choice, not a client's.
        config.server.default_upstream = Some("http://127.0.0.1:9999".into());
        let list = config.validate().unwrap().allowlist;
        assert_eq!(
            routed(&list, "/x", Some("cache.local:8080")).unwrap().2,
            "http://127.0.0.1:9999"
        );
    }
}
