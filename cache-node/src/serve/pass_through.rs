//! Pass-through: relaying the origin's answer for content the node may not store.

use super::body::{BodyKind, ResponseBody};
use super::header_str;
use super::response::{origin_failure_response, set_cache_status, CacheStatus};
use std::sync::Arc;

use http::{header, HeaderMap, Method, Response};

use crate::node::Node;
use crate::upstream::router::Route;

/// Serves a request for content the node may not store (the origin sent no length or a
/// `Content-Encoding`, its `Cache-Control` says `no-store` or `private`, or the request needs
/// slices of a validator-less object that are not stored) by relaying the origin's answer. A
/// GET's `Range` and `If-Range` go along, so a ranged request still gets only its range.
pub(super) async fn pass_through(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    request_headers: &HeaderMap,
) -> Response<ResponseBody> {
    CacheStatus::Bypass.count(&node.stats);
    let (range, if_range) = if *method == Method::GET {
        (
            header_str(request_headers, header::RANGE).map(str::to_owned),
            header_str(request_headers, header::IF_RANGE).map(str::to_owned),
        )
    } else {
        (None, None)
    };
    let fetched = node
        .client
        .fetch(route.fetch_request(method.clone(), range, if_range))
        .await;
    match fetched {
        Err(error) => origin_failure_response(node, &error),
        Ok(upstream) => {
            let (parts, body) = upstream.into_parts();
            let mut response = Response::new(ResponseBody {
                kind: BodyKind::Upstream {
                    body,
                    node: node.clone(),
                },
            });
            *response.status_mut() = parts.status;
            // The representation's headers go along unchanged: a `Content-Encoding` dropped
            // here would hand the client compressed bytes as if they were the file.
            for name in [
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                header::VARY,
                header::CONTENT_LENGTH,
                header::CONTENT_RANGE,
                header::ETAG,
                header::LAST_MODIFIED,
                header::CACHE_CONTROL,
                header::EXPIRES,
                header::CONTENT_DISPOSITION,
                header::CONTENT_LANGUAGE,
            ] {
                if let Some(value) = parts.headers.get(&name) {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            set_cache_status(response.headers_mut(), CacheStatus::Bypass);
            tracing::Span::current().record("cache", CacheStatus::Bypass.as_str());
            response
        }
    }
}
