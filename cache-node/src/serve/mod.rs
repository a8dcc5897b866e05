//! The client-facing request handler: route the request, find or discover the object, apply
//! conditionals and ranges (RFC 9110 §13–14), start fills for missing slices, and stream the body
//! from disk and from in-flight fills.
//!
//! A response's status and headers are committed only once its first bytes are known to be
//! coming, so an origin that is down at the start gets a clean 502 rather than a broken 206. Once
//! committed, a failure ends the body with an error, which hyper turns into a reset connection or
//! a truncated chunked body: never a clean end.

mod body;
mod pass_through;
mod producer;
mod relay;
mod response;

pub use body::{text_response, time_response, AccessRecord, ResponseBody, RoutedOrigin};
pub(crate) use response::origin_failure_status;
use response::{
    only_if_cached_miss, origin_failure_response, refused_response, respond,
    status_answer_response, ContentRequest, NotAnswered,
};

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::cache::freshness::{Check, ClientDirectives};
use crate::error::OriginError;
use crate::fill::{self, DiscoverError, FillRefused, Requester, SliceSpan};
use crate::http::range::{self, ByteRange, ByteRangeSpec};
use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::upstream::router::{self, Route};

/// How often a request is retried internally when the origin's content changes under it before
/// any byte was sent.
pub(super) const VERSION_CHANGE_RETRIES: usize = 2;

pub(super) static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Handles one content request (the server's dispatcher has counted it, refused loops and sent
/// the node's own API elsewhere). Never fails: every problem becomes an HTTP answer.
///
/// `spans` is the connection's zero-copy queue when its socket is a
/// [`crate::http::sendfile::ZeroCopyStream`]; stored bytes then leave with `sendfile` on HTTP/1 requests.
pub async fn handle(
    node: Arc<Node>,
    request: Request<Incoming>,
    spans: Option<SpanQueue>,
) -> Result<Response<ResponseBody>, Infallible> {
    // HTTP/2 copies body frames into its own buffers, so placeholders must never reach it.
    let spans = spans.filter(|_| request.version() <= http::Version::HTTP_11);
    let requester = Requester::client(
        request
            .extensions()
            .get::<crate::http::client_key::ClientAddr>()
            .map(|addr| addr.0.ip()),
    );
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    let relayed = relay::RELAYED_METHODS.contains(&method);
    if method != Method::GET && method != Method::HEAD && !relayed {
        node.stats.refused_requests.inc();
        return Ok(method_not_allowed(&method));
    }
    let host_header = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let route = match router::route_request(
        &node.allowlist.load(),
        request.version(),
        request.uri(),
        host_header,
        client_scheme(&request),
    ) {
        Ok(route) => route,
        Err(error) => {
            node.stats.refused_requests.inc();
            tracing::info!(request_id, uri = %request.uri(), %error, "refused");
            return Ok(text_response(StatusCode::FORBIDDEN, error.to_string()));
        }
    };
    node.stats.origins.count_request(route.target.origin);
    let span = tracing::info_span!(
        "request",
        id = request_id,
        origin = %route.target.host,
        mode = route.mode.as_str(),
        cache = tracing::field::Empty,
    );
    let response = if relayed {
        relay::relay(&node, &route, request)
            .instrument(span.clone())
            .await
    } else {
        serve_routed(&node, &route, &method, request.headers(), spans, &requester)
            .instrument(span.clone())
            .await
    };
    let mut response = response;
    if node.access_log.is_some() {
        response
            .extensions_mut()
            .insert(RoutedOrigin(route.target.host.clone()));
    }
    // The access log (`log.access`) has a line per request; this one is for debugging.
    span.in_scope(|| {
        tracing::debug!(
            method = %method,
            path = %route.path_and_query,
            status = response.status().as_u16(),
            length = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .unwrap_or("-"),
            "response"
        )
    });
    Ok(response)
}

/// How the request's connection reached the node (the server records it).
fn client_scheme<B>(request: &Request<B>) -> crate::http::client_key::ClientScheme {
    request
        .extensions()
        .get::<crate::http::client_key::ClientScheme>()
        .copied()
        .unwrap_or_default()
}

/// The `405` for a method the node neither answers nor relays (`CONNECT`, `TRACE` and
/// extension methods), with the `Allow` field RFC 9110 §15.5.6 asks for.
pub fn method_not_allowed(method: &Method) -> Response<ResponseBody> {
    let mut response = text_response(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} is not supported by this cache; it answers GET and HEAD and relays \
             POST, PUT, PATCH, DELETE and OPTIONS to allowed origins"
        ),
    );
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static(relay::ALLOWED_METHODS),
    );
    response
}

/// What part of the object a response carries.
pub(super) enum Selection {
    Full,
    Single(ByteRange),
    Multi(Vec<ByteRange>),
}

/// One piece of a response body.
pub(super) enum Segment {
    Framing(Bytes),
    Object(ByteRange),
}

pub(super) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The slices a discovery should fetch for this request: what the client asked for when that is
/// known without the object's length, else the first slice.
pub(super) fn discovery_span(
    method: &Method,
    specs: Option<&[ByteRangeSpec]>,
    slice_len: u64,
) -> SliceSpan {
    let first_slice_only = SliceSpan {
        first: 0,
        last: Some(0),
    };
    if method == Method::HEAD {
        return first_slice_only;
    }
    match specs {
        None => SliceSpan {
            first: 0,
            last: None,
        },
        Some([ByteRangeSpec::FromTo { first, last }]) => SliceSpan {
            first: first / slice_len,
            last: Some(last / slice_len),
        },
        Some([ByteRangeSpec::From { first }]) => SliceSpan {
            first: first / slice_len,
            last: None,
        },
        Some(_) => first_slice_only,
    }
}

/// How often a request selects its variant again after finding another one (the first request
/// for a URL learns its `Vary` only from the answer).
const VARIANT_RESELECTS: usize = 2;

/// Serves a routed GET or HEAD: selects the variant the request asks for when the URL's
/// responses vary (RFC 9111 §4.1), then answers it.
pub(super) async fn serve_routed(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    spans: Option<SpanQueue>,
    requester: &Requester,
) -> Response<ResponseBody> {
    for _ in 0..=VARIANT_RESELECTS {
        let selected = match fill::select_variant(node, route, headers) {
            Ok(Some(varied)) => Cow::Owned(varied),
            Ok(None) => Cow::Borrowed(route),
            Err(reason) => {
                tracing::debug!(%reason, "no stored variant for this request; relayed");
                break;
            }
        };
        let answer =
            serve_selected(node, &selected, method, headers, spans.clone(), requester).await;
        if let Some(response) = answer {
            return response;
        }
    }
    pass_through::pass_through(node, route, method, headers).await
}

/// Answers a request for the variant `route` selects; `None` when the object turned out to
/// vary and this request selects another variant.
async fn serve_selected(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    spans: Option<SpanQueue>,
    requester: &Requester,
) -> Option<Response<ResponseBody>> {
    // Only GET defines range handling (RFC 9110 §14.2); a Range on HEAD is ignored.
    let range_specs = if *method == Method::GET {
        header_str(headers, header::RANGE).and_then(range::parse_range_header)
    } else {
        None
    };
    let span = discovery_span(method, range_specs.as_deref(), node.slice_len);
    let arrived = Instant::now();
    let client = ClientDirectives::of(headers);
    let request = ContentRequest {
        node,
        route,
        method,
        headers,
        range_specs: range_specs.as_deref(),
        spans,
        requester,
        only_if_cached: client.only_if_cached,
    };
    forget_unacceptable_status_answer(node, route, client);
    if client.only_if_cached {
        return Some(only_if_cached(&request).await);
    }
    for attempt in 0..=VERSION_CHANGE_RETRIES {
        // The discovery's demand keeps its fill going until `respond` has registered its own.
        let (entry, _discovery_demand) =
            match fill::lookup_or_discover(node, route, span, requester).await {
                Ok(found) => found,
                Err(DiscoverError::NotStorable(_)) => {
                    return Some(pass_through::pass_through(node, route, method, headers).await)
                }
                Err(DiscoverError::Origin(error)) => {
                    return Some(origin_failure_response(node, &error))
                }
                Err(DiscoverError::Refused(refused)) => {
                    return Some(refused_response(node, refused))
                }
                Err(DiscoverError::Answered { answer, kept }) => {
                    return Some(status_answer_response(node, method, &answer, kept))
                }
            };
        if fill::other_variant(&entry, route) {
            return None;
        }
        let whole_object = range_specs.is_none();
        match fill::revalidate_if_stale(node, route, &entry, client, arrived, whole_object).await {
            fill::Revalidation::Changed if attempt < VERSION_CHANGE_RETRIES => continue,
            fill::Revalidation::Unreachable(error) => {
                // Served as stored: the origin cannot be asked (stale-if-error).
                tracing::debug!(%error, "revalidation impossible; serving the stored version");
            }
            fill::Revalidation::Failed(error) => {
                node.stats.stale_refusals.inc();
                return Some(text_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("the stored version is stale and may not be served without a check with the origin, which failed: {error}"),
                ));
            }
            fill::Revalidation::StaleWhileChecking => {
                tracing::debug!("stale; served while checked in the background");
            }
            // Served as stored: current, or changed again after the last retry.
            _ => {}
        }
        let answer = respond(&request, &entry).await;
        match answer {
            Err(NotAnswered::Origin(OriginError::VersionChanged))
                if attempt < VERSION_CHANGE_RETRIES =>
            {
                continue
            }
            Err(NotAnswered::Origin(error)) => return Some(origin_failure_response(node, &error)),
            // A validator-less object cannot be completed from another request. Asked for
            // whole, it is fetched again whole, in one request; a range of it is relayed.
            Err(NotAnswered::Refused {
                refused: FillRefused::NoValidator,
                whole_object,
            }) => {
                if whole_object && attempt < VERSION_CHANGE_RETRIES {
                    tracing::debug!(
                        key = entry.key.as_str(),
                        "no validator: fetching the object again whole"
                    );
                    node.index.remove(&entry);
                    continue;
                }
                return Some(pass_through::pass_through(node, route, method, headers).await);
            }
            Err(NotAnswered::Refused { refused, .. }) => {
                return Some(refused_response(node, refused))
            }
            Ok(response) => return Some(response),
        }
    }
    unreachable!("the last attempt always returns")
}

/// Forgets the kept answer other than content for the route's key (a fresh `404`...) when the
/// client will not take it (`no-cache`, or a `max-age` it is older than), so the origin is
/// asked again, unless the origin's `ignore_client_no_cache` is set.
fn forget_unacceptable_status_answer(node: &Node, route: &Route, client: ClientDirectives) {
    if route.target.policy.ignore_client_no_cache {
        return;
    }
    let Some(max_age) = client.max_age else {
        return;
    };
    let key = route.cache_key();
    if node
        .status_answers
        .get(&key)
        .is_some_and(|answer| answer.age() > max_age || max_age.is_zero())
    {
        node.status_answers.forget(&key);
    }
}

/// `Cache-Control: only-if-cached` (RFC 9111 §5.2.1.7): the stored version, if it may be served
/// without a check and what was asked for is on disk (a range of a partly stored object
/// counts); otherwise `504`. The origin is never contacted.
async fn only_if_cached(request: &ContentRequest<'_>) -> Response<ResponseBody> {
    let route = request.route;
    if let Some(answer) = request.node.status_answers.get(&route.cache_key()) {
        return status_answer_response(request.node, request.method, &answer, true);
    }
    let servable = fill::lookup(request.node, route).filter(|entry| {
        !matches!(
            entry.check_needed(&route.target.policy, ClientDirectives::default()),
            Check::Foreground {
                serve_stale_on_failure: false
            }
        )
    });
    let Some(entry) = servable else {
        return only_if_cached_miss();
    };
    // `respond` starts no fill for it: bytes not on disk make it a 504 instead.
    match respond(request, &entry).await {
        Ok(response) => response,
        Err(NotAnswered::Origin(error)) => origin_failure_response(request.node, &error),
        Err(NotAnswered::Refused { refused, .. }) => refused_response(request.node, refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_fetches_what_the_client_asked_for_when_it_can() {
        let slice = 100;
        type Case = (Method, Option<Vec<ByteRangeSpec>>, (u64, Option<u64>));
        let cases: Vec<Case> = vec![
            (Method::GET, None, (0, None)),
            (Method::HEAD, None, (0, Some(0))),
            (
                Method::GET,
                Some(vec![ByteRangeSpec::FromTo {
                    first: 250,
                    last: 420,
                }]),
                (2, Some(4)),
            ),
            (
                Method::GET,
                Some(vec![ByteRangeSpec::From { first: 99 }]),
                (0, None),
            ),
            (
                Method::GET,
                Some(vec![ByteRangeSpec::Suffix { suffix_len: 5 }]),
                (0, Some(0)),
            ),
            (
                Method::GET,
                Some(vec![
                    ByteRangeSpec::FromTo { first: 0, last: 1 },
                    ByteRangeSpec::FromTo {
                        first: 500,
                        last: 501,
                    },
                ]),
                (0, Some(0)),
            ),
        ];
        for (method, specs, (first, last)) in cases {
            let span = discovery_span(&method, specs.as_deref(), slice);
            assert_eq!((span.first, span.last), (first, last), "{method} {specs:?}");
        }
    }
}
