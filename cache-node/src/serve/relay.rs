//! Relaying the methods a cache does not answer itself: `POST`, `PUT`, `PATCH`, `DELETE` and
//! `OPTIONS` go to the request's (allowed) origin with their end-to-end headers and their body
//! streamed through, and the origin's answer comes back the same way. Nothing is stored.
//!
//! An unsafe method that succeeds (`2xx` or `3xx`) may have changed the resource, so the stored
//! object for its URL, and for the same-origin URLs its `Location` and `Content-Location` name,
//! is dropped (RFC 9111 §4.4): the next `GET` asks the origin again.

use std::sync::Arc;

use http::{header, Method, Request, Response};
use hyper::body::Incoming;

use super::body::{BodyKind, ResponseBody};
use super::response::{origin_failure_response, set_cache_status, CacheStatus};
use crate::cache::key::CacheKey;
use crate::http::hop_by_hop::remove_hop_by_hop;
use crate::node::Node;
use crate::upstream::origin::RelayRequest;
use crate::upstream::request_body::RelayedBody;
use crate::upstream::router::Route;

/// The methods relayed to the origin; every other method but GET and HEAD is refused.
pub(super) const RELAYED_METHODS: [Method; 5] = [
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// The `Allow` field of the node's `405`.
pub(super) const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// True for a method whose success may change the resource (RFC 9110 §9.2.1).
fn is_unsafe(method: &Method) -> bool {
    !matches!(*method, Method::OPTIONS | Method::GET | Method::HEAD)
}

/// Relays `request` (one of [`RELAYED_METHODS`], already routed) to its origin and streams the
/// answer back, never storing it. The client's body may wait for the connection's idle timeout
/// between chunks before the relay fails.
pub(super) async fn relay(
    node: &Arc<Node>,
    route: &Route,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    node.stats.relayed_requests.inc();
    let (parts, body) = request.into_parts();
    let mut headers = parts.headers;
    remove_hop_by_hop(&mut headers);
    // The node answered any `100-continue` itself when it started reading the body.
    headers.remove(header::EXPECT);
    headers.remove(header::HOST);
    let (body, body_sent) = RelayedBody::new(
        body,
        node.connection_limits.idle_timeout,
        node.stats.relayed_request_bytes.clone(),
    );
    let relayed = node
        .client
        .relay(RelayRequest {
            target: &route.target,
            path_and_query: &route.path_and_query,
            method: parts.method.clone(),
            headers,
            body,
            body_sent,
        })
        .await;
    let upstream = match relayed {
        Ok(upstream) => upstream,
        Err(error) => return origin_failure_response(node, &error),
    };
    let (upstream_parts, upstream_body) = upstream.into_parts();
    let succeeded = upstream_parts.status.is_success() || upstream_parts.status.is_redirection();
    if is_unsafe(&parts.method) && succeeded {
        invalidate(node, route, &upstream_parts.headers);
    }
    let mut response = Response::new(ResponseBody::of(BodyKind::Upstream {
        body: upstream_body,
        node: node.clone(),
        origin: route.target.origin,
    }));
    *response.status_mut() = upstream_parts.status;
    let mut response_headers = upstream_parts.headers;
    remove_hop_by_hop(&mut response_headers);
    *response.headers_mut() = response_headers;
    set_cache_status(response.headers_mut(), CacheStatus::Bypass);
    tracing::Span::current().record("cache", CacheStatus::Bypass.as_str());
    response
}

/// Drops what is stored for the request's URL and for the same-origin URLs the answer's
/// `Location` and `Content-Location` name.
fn invalidate(node: &Node, route: &Route, answer_headers: &http::HeaderMap) {
    let named = [header::LOCATION, header::CONTENT_LOCATION]
        .into_iter()
        .filter_map(|name| answer_headers.get(name))
        .filter_map(|value| value.to_str().ok())
        .filter_map(|reference| route.same_origin_key(reference));
    let urls: Vec<CacheKey> = std::iter::once(route.primary_key()).chain(named).collect();
    // Every stored variant of those URLs goes too.
    let keys: Vec<CacheKey> = urls
        .iter()
        .flat_map(|url| node.vary.variant_keys(url))
        .chain(urls.iter().cloned())
        .collect();
    for key in keys {
        // A "not storable" verdict is about the old representation too.
        node.uncacheable.invalidate(&key);
        node.status_answers.forget(&key);
        if node.index.invalidate(&key) {
            node.stats.invalidations.inc();
            tracing::info!(
                key = key.as_str(),
                "invalidated by a successful unsafe method"
            );
        }
    }
}
