//! Pass-through: relaying the origin's answer for content the node may not store.

use super::body::{BodyKind, ResponseBody};
use super::response::{origin_failure_response, set_cache_status, CacheStatus};
use std::sync::Arc;

use http::{HeaderMap, Method, Response};

use crate::http::hop_by_hop::remove_hop_by_hop;
use crate::node::Node;
use crate::upstream::origin::FetchRequest;
use crate::upstream::router::Route;

/// Serves a request for content the node may not store (the origin sent no length or a
/// `Content-Encoding`, its `Cache-Control` says `no-store` or `private`, or the request needs
/// slices of a validator-less object that are not stored) by relaying the origin's answer. The
/// client's end-to-end fields go along, so a ranged request still gets only its range and a
/// negotiated one its own representation.
pub(super) async fn pass_through(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    request_headers: &HeaderMap,
) -> Response<ResponseBody> {
    CacheStatus::Bypass.count(&node.stats);
    // The client's own fields go along (its `Range`, `If-Range`, `Accept-Encoding`,
    // credentials...): what comes back is for this client only and is never stored.
    let fetched = node
        .client
        .fetch(FetchRequest {
            client_headers: Some(request_headers),
            ..route.fetch_request(method.clone(), None, None)
        })
        .await;
    match fetched {
        Err(error) => origin_failure_response(node, &error),
        Ok(upstream) => {
            let (parts, body) = upstream.into_parts();
            let mut response = Response::new(ResponseBody::of(BodyKind::Upstream {
                body,
                node: node.clone(),
                origin: route.target.origin,
            }));
            *response.status_mut() = parts.status;
            // Every end-to-end field goes along unchanged (RFC 9110 §7.6.1): a
            // `Content-Encoding` dropped here would hand the client compressed bytes as if they
            // were the file, a `Location` dropped would break a redirect.
            let mut headers = parts.headers;
            remove_hop_by_hop(&mut headers);
            *response.headers_mut() = headers;
            set_cache_status(response.headers_mut(), CacheStatus::Bypass);
            tracing::Span::current().record("cache", CacheStatus::Bypass.as_str());
            response
        }
    }
}
