//! Reaching origins through an outbound HTTP proxy (`upstream.proxy`), as branch offices behind a
//! corporate proxy must.
//!
//! [`UpstreamConnector`] is the TCP layer under the TLS connector of the origin client (`upstream::origin`):
//!
//! - no proxy, or a host listed in `upstream.no_proxy`: a direct TCP connection;
//! - an `https://` origin: a TCP connection to the proxy and a `CONNECT host:port` tunnel
//!   (hyper-util's [`Tunnel`]), over which TLS then runs end to end with the origin;
//! - an `http://` origin: a TCP connection to the proxy, marked as proxied, so hyper sends each
//!   request in absolute form (`GET http://host/path`), the way HTTP proxies expect plain
//!   requests; many proxies refuse `CONNECT` to port 80.
//!
//! Direct connections resolve names with a [`OriginResolver`]: what a name resolves to is checked
//! against the [`AddressPolicy`] before anything is connected, and only the addresses it allows
//! are tried, so an allowed name that resolves to loopback or the office network reaches nothing.
//! Through the proxy the proxy resolves, and the node cannot see where it connects: the
//! addresses IP literals name are still checked when routing, but names are the proxy's affair.
//!
//! Credentials in the proxy URL (`http://user:password@proxy:3128`) go out as
//! `Proxy-Authorization: Basic` on the `CONNECT` and, for plain requests, on every request
//! ([`ProxySettings::authorization_for`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use headers::HeaderMapExt;
use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::address_policy::AddressPolicy;
use crate::upstream::host_pattern::HostPattern;

/// A parsed `upstream.proxy` with its `upstream.no_proxy` exceptions.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `http://host:port` of the proxy, without credentials.
    uri: Uri,
    /// `Proxy-Authorization` for the credentials in the URL, if any.
    authorization: Option<HeaderValue>,
    /// Hosts reached directly.
    no_proxy: Vec<HostPattern>,
}

impl ProxySettings {
    /// Parses `upstream.proxy` (empty: no proxy) and `upstream.no_proxy` (a comma list of host
    /// names and `*.suffix` patterns). An error names the key (`proxy` or `no_proxy`) and what
    /// is wrong.
    pub fn parse(
        proxy: &str,
        no_proxy: &str,
    ) -> Result<Option<ProxySettings>, (&'static str, String)> {
        let no_proxy = no_proxy
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(HostPattern::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| ("no_proxy", message))?;
        Self::parse_url(proxy.trim(), no_proxy).map_err(|message| ("proxy", message))
    }

    fn parse_url(proxy: &str, no_proxy: Vec<HostPattern>) -> Result<Option<ProxySettings>, String> {
        if proxy.is_empty() {
            return Ok(None);
        }
        let uri: Uri = proxy
            .parse()
            .map_err(|error| format!("\"{proxy}\" is not a URL: {error}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "\"{proxy}\" must start with http:// (the node speaks plain HTTP to the proxy; \
                 https origins still get end-to-end TLS through CONNECT)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("\"{proxy}\" names no proxy host"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!("\"{proxy}\" has a path; use just http://host:port"));
        }
        let (credentials, host_port) = match authority.as_str().rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority.as_str()),
        };
        let authorization = credentials
            .map(|credentials| {
                let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
                let decode = |text: &str| {
                    percent_decode(text).ok_or_else(|| {
                        format!("the proxy credentials in \"{proxy}\" are not UTF-8")
                    })
                };
                let basic = headers::Authorization::basic(&decode(user)?, &decode(password)?);
                let mut map = http::HeaderMap::new();
                map.typed_insert(headers::ProxyAuthorization(basic.0));
                let mut value = map
                    .remove(http::header::PROXY_AUTHORIZATION)
                    .expect("typed_insert set the header");
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(host_port)
            .path_and_query("/")
            .build()
            .map_err(|error| format!("\"{proxy}\": {error}"))?;
        Ok(Some(ProxySettings {
            uri,
            authorization,
            no_proxy,
        }))
    }

    /// The proxy's `http://host:port/`, without credentials (safe to log).
    pub fn address(&self) -> &Uri {
        &self.uri
    }

    /// True when connections to `host` go through the proxy.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.no_proxy.iter().any(|pattern| pattern.matches(&host))
    }

    /// The `Proxy-Authorization` a request to `uri` carries: plain `http://` requests through the
    /// proxy need it on every request; `https://` ones only on their `CONNECT`.
    pub fn authorization_for(&self, uri: &Uri) -> Option<&HeaderValue> {
        let proxied = uri.scheme_str() == Some("http")
            && uri.host().is_some_and(|host| self.applies_to(host));
        self.authorization.as_ref().filter(|_| proxied)
    }
}

/// Decodes `%XX` escapes; `None` when the result is not UTF-8 or an escape is malformed.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// The resolver of direct connections: the system's (`getaddrinfo`), then, for hosts a client
/// named, the [`AddressPolicy`], so the connector only ever sees addresses that passed it. A
/// name with no allowed address fails with
/// [`NameRefused`](crate::upstream::address_policy::NameRefused) before any connection is
/// attempted. IP literals are never resolved: the router checked them.
#[derive(Debug, Clone)]
pub struct OriginResolver {
    system: GaiResolver,
    /// `None` for hosts the admin configured.
    policy: Option<Arc<AddressPolicy>>,
}

impl OriginResolver {
    /// Resolves with the system resolver and keeps the addresses `policy` allows.
    pub fn checked(policy: Arc<AddressPolicy>) -> OriginResolver {
        OriginResolver {
            system: GaiResolver::new(),
            policy: Some(policy),
        }
    }

    /// Resolves with the system resolver, for upstreams the admin configured.
    pub fn trusted() -> OriginResolver {
        OriginResolver {
            system: GaiResolver::new(),
            policy: None,
        }
    }
}

impl tower_service::Service<Name> for OriginResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.system.poll_ready(context).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let resolving = self.system.call(name.clone());
        Box::pin(async move {
            let resolved = resolving.await?;
            let allowed = match policy {
                Some(policy) => policy.filter_resolved(name.as_str(), resolved)?,
                None => resolved.collect(),
            };
            Ok(allowed.into_iter())
        })
    }
}

/// The TCP connector under the TLS layer: direct (through the [`OriginResolver`]), or through
/// the proxy.
#[derive(Debug, Clone)]
pub struct UpstreamConnector {
    direct: HttpConnector<OriginResolver>,
    to_proxy: HttpConnector,
    proxy: Option<ProxySettings>,
}

impl UpstreamConnector {
    /// Connects directly with `direct`, or to `proxy` (when set and it applies) with `to_proxy`;
    /// both carry the same timeouts and nodelay.
    pub fn new(
        direct: HttpConnector<OriginResolver>,
        to_proxy: HttpConnector,
        proxy: Option<ProxySettings>,
    ) -> UpstreamConnector {
        UpstreamConnector {
            direct,
            to_proxy,
            proxy,
        }
    }
}

/// A TCP connection to an origin, or to the proxy on an origin's behalf.
#[derive(Debug)]
pub struct UpstreamStream {
    inner: TokioIo<TcpStream>,
    /// Set for a plain connection to the proxy: hyper then sends requests in absolute form.
    proxied: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let mut direct = self.direct.clone();
        let tcp = self.to_proxy.clone();
        let proxy = self.proxy.clone().filter(|proxy| {
            destination
                .host()
                .is_some_and(|host| proxy.applies_to(host))
        });
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let inner = direct.call(destination).await?;
                return Ok(UpstreamStream {
                    inner,
                    proxied: false,
                });
            };
            if destination.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(proxy.uri.clone(), tcp);
                if let Some(authorization) = proxy.authorization.clone() {
                    tunnel = tunnel.with_auth(authorization);
                }
                let inner = tunnel.call(destination).await.map_err(|error| {
                    format!("proxy {} refused or failed the tunnel: {error}", proxy.uri)
                })?;
                return Ok(UpstreamStream {
                    inner,
                    proxied: false,
                });
            }
            let mut tcp = tcp;
            let inner = tcp
                .call(proxy.uri.clone())
                .await
                .map_err(|error| format!("cannot connect to proxy {}: {error}", proxy.uri))?;
            Ok(UpstreamStream {
                inner,
                proxied: true,
            })
        })
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        self.inner.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(context, buffer)
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(context, buffer)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_with_and_without_credentials() {
        assert!(ProxySettings::parse("", "").unwrap().is_none());
        let plain = ProxySettings::parse("http://proxy.corp:3128", "")
            .unwrap()
            .unwrap();
        assert_eq!(plain.uri, "http://proxy.corp:3128/");
        assert!(plain.authorization.is_none());
        let with_user = ProxySettings::parse("http://svc%40corp:p%3Ass@proxy.corp:3128/", "")
            .unwrap()
            .unwrap();
        assert_eq!(with_user.uri, "http://proxy.corp:3128/");
        // "svc@corp:p:ss" in base64.
        assert_eq!(
            with_user.authorization.unwrap(),
            "Basic c3ZjQGNvcnA6cDpzcw=="
        );
    }

    proptest::proptest! {
        /// A proxy setting from a config file or the environment never panics the parser.
        #[test]
        fn any_proxy_setting_parses_or_is_refused(
            proxy in proptest::prelude::any::<String>(),
            near_miss in "http://([a-z%0-9:]{0,8}@)?[a-z0-9.\\-]{0,12}(:[0-9]{0,6})?/?",
            no_proxy in "[a-z0-9.*, ]{0,20}",
        ) {
            let _ = ProxySettings::parse(&proxy, &no_proxy);
            let _ = ProxySettings::parse(&near_miss, &no_proxy);
        }
    }

    #[test]
    fn bad_proxy_urls_say_what_is_wrong() {
        for (value, expected) in [
            ("proxy.corp:3128", "http://"),
            ("https://proxy.corp:3128", "http://"),
            ("socks5://proxy.corp:1080", "http://"),
            ("http://proxy.corp:3128/path", "has a path"),
        ] {
            let (key, message) = ProxySettings::parse(value, "").unwrap_err();
            assert_eq!(key, "proxy");
            assert!(message.contains(expected), "{value}: {message}");
        }
        let (key, _) = ProxySettings::parse("http://proxy:3128", "ok.example, *").unwrap_err();
        assert_eq!(key, "no_proxy");
    }

    #[test]
    fn no_proxy_hosts_go_direct_and_only_plain_requests_carry_credentials() {
        let proxy = ProxySettings::parse(
            "http://u:p@proxy.corp:3128",
            "mirror.lan, *.internal.example, 127.0.0.1",
        )
        .unwrap()
        .unwrap();
        assert!(proxy.applies_to("dl.delivery.mp.microsoft.com"));
        assert!(!proxy.applies_to("Mirror.LAN"));
        assert!(!proxy.applies_to("mirror.lan"));
        assert!(!proxy.applies_to("a.internal.example"));
        assert!(!proxy.applies_to("127.0.0.1"));
        let plain: Uri = "http://dl.delivery.mp.microsoft.com/f".parse().unwrap();
        let tls: Uri = "https://dl.delivery.mp.microsoft.com/f".parse().unwrap();
        let direct: Uri = "http://mirror.lan/f".parse().unwrap();
        assert!(proxy.authorization_for(&plain).is_some());
        assert!(proxy.authorization_for(&tls).is_none());
        assert!(proxy.authorization_for(&direct).is_none());
    }
}
