//! Answers about a known object: conditionals, range selection, the status and headers
//! (committed only once the first bytes are known to be coming), and the answers for origin
//! failures and refused fills.

use super::body::{text_response, BodyKind, ResponseBody, BODY_CHANNEL_DEPTH};
use super::producer::BodyProducer;
use super::{header_str, Segment, Selection};
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cache::index::ObjectEntry;
use crate::cache::store::ObjectMeta;
use crate::error::OriginError;
use crate::fill::{self, Demand, FillRefused, Requester};
use crate::http::range::{self, ByteRange, ByteRangeSpec, MultipartPlan, RangeOutcome};
use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::upstream::router::Route;

/// The status that reports an origin failure to a client.
pub(crate) fn origin_failure_status(error: &OriginError) -> StatusCode {
    match error {
        OriginError::Status(code) => StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY),
        OriginError::FirstByteTimeout(_) | OriginError::IdleTimeout(_) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// `Retry-After` of a `503` for a client over `fill.max_per_client`, in seconds.
pub(super) const CLIENT_BUSY_RETRY_AFTER_SECS: u64 = 2;

/// The answer to a request that may not start the fills it needs now.
pub(super) fn refused_response(node: &Node, refused: FillRefused) -> Response<ResponseBody> {
    node.stats.refused_requests.inc();
    node.stats.fill_refusals.inc();
    tracing::info!(%refused, "fill refused");
    let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, refused.to_string());
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(CLIENT_BUSY_RETRY_AFTER_SECS),
    );
    response
}

/// Why `respond` gave no answer; nothing was committed.
pub(super) enum NotAnswered {
    /// The origin failed (or changed the content) before the first byte.
    Origin(OriginError),
    /// The fills the answer needs may not be started.
    Refused {
        refused: FillRefused,
        /// The request asked for the whole object (no range applies).
        whole_object: bool,
    },
}

impl From<OriginError> for NotAnswered {
    fn from(error: OriginError) -> Self {
        NotAnswered::Origin(error)
    }
}

pub(super) fn origin_failure_response(node: &Node, error: &OriginError) -> Response<ResponseBody> {
    node.stats.refused_requests.inc();
    let status = origin_failure_status(error);
    tracing::warn!(
        %error,
        status = status.as_u16(),
        retryable = error.is_retryable(),
        "origin failure"
    );
    text_response(status, error.to_string())
}

pub(super) fn set_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Headers every answer about a stored object carries (also 304s).
pub(super) fn object_headers(headers: &mut HeaderMap, meta: &ObjectMeta) {
    if let Some(etag) = &meta.etag {
        set_header(headers, header::ETAG, etag);
    }
    if let Some(last_modified) = &meta.last_modified {
        set_header(headers, header::LAST_MODIFIED, last_modified);
    }
    for (name, value) in &meta.extra_headers {
        if let Ok(name) = header::HeaderName::from_bytes(name.as_bytes()) {
            set_header(headers, name, value);
        }
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// The answer for a known object. Returns `Err` only before anything was committed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn respond(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    request_headers: &HeaderMap,
    range_specs: Option<&[ByteRangeSpec]>,
    entry: &Arc<ObjectEntry>,
    spans: Option<SpanQueue>,
    requester: &Requester,
) -> Result<Response<ResponseBody>, NotAnswered> {
    let meta = &entry.meta;
    let mut response = Response::new(ResponseBody::empty());
    object_headers(response.headers_mut(), meta);
    // A stored response carries its age (RFC 9111 §4, §5.1): the time since the origin last
    // confirmed it, so caches and clients downstream count the origin's max-age correctly.
    if let Some(age) = entry.age() {
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
    }

    // Conditionals first (RFC 9110 §13.2.2): If-None-Match wins over If-Modified-Since.
    let not_modified = match header_str(request_headers, header::IF_NONE_MATCH) {
        Some(if_none_match) => range::if_none_match_matches(if_none_match, meta.etag.as_deref()),
        None => header_str(request_headers, header::IF_MODIFIED_SINCE)
            .is_some_and(|since| range::not_modified_since(since, meta.last_modified.as_deref())),
    };
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        set_cache_status(response.headers_mut(), "HIT");
        return Ok(response);
    }

    let range_applies = range_specs.is_some()
        && header_str(request_headers, header::IF_RANGE).is_none_or(|if_range| {
            range::if_range_matches(
                if_range,
                meta.etag.as_deref(),
                meta.last_modified.as_deref(),
            )
        });
    let selection = match range_specs {
        Some(specs) if range_applies => {
            match range::resolve_ranges(specs, meta.length, node.max_ranges) {
                RangeOutcome::Satisfiable(ranges) if ranges.len() == 1 => {
                    Selection::Single(ranges[0])
                }
                RangeOutcome::Satisfiable(ranges) => Selection::Multi(ranges),
                outcome @ (RangeOutcome::Unsatisfiable | RangeOutcome::TooManyRanges) => {
                    node.stats.refused_requests.inc();
                    tracing::info!(?outcome, length = meta.length, "range not satisfiable");
                    *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                    set_header(
                        response.headers_mut(),
                        header::CONTENT_RANGE,
                        &range::format_unsatisfied_content_range(meta.length),
                    );
                    *response.body_mut() = ResponseBody::full("range not satisfiable\n");
                    return Ok(response);
                }
            }
        }
        _ => Selection::Full,
    };

    let whole_object = matches!(selection, Selection::Full);
    let headers = response.headers_mut();
    let (status, segments, body_length): (StatusCode, Vec<Segment>, u64) = match selection {
        Selection::Full => {
            if let Some(content_type) = &meta.content_type {
                set_header(headers, header::CONTENT_TYPE, content_type);
            }
            let segments = if meta.length == 0 {
                Vec::new()
            } else {
                vec![Segment::Object(ByteRange {
                    first: 0,
                    last: meta.length - 1,
                })]
            };
            (StatusCode::OK, segments, meta.length)
        }
        Selection::Single(range) => {
            if let Some(content_type) = &meta.content_type {
                set_header(headers, header::CONTENT_TYPE, content_type);
            }
            set_header(
                headers,
                header::CONTENT_RANGE,
                &range::format_content_range(range, meta.length),
            );
            (
                StatusCode::PARTIAL_CONTENT,
                vec![Segment::Object(range)],
                range.len(),
            )
        }
        Selection::Multi(ranges) => {
            let boundary = format!("outpost-{:016x}", rand::random::<u64>());
            let plan = MultipartPlan::new(
                &ranges,
                meta.length,
                meta.content_type.as_deref(),
                &boundary,
            );
            set_header(headers, header::CONTENT_TYPE, &plan.content_type());
            let mut segments = Vec::with_capacity(ranges.len() * 2 + 1);
            for (part_header, range) in plan.part_headers.iter().zip(&ranges) {
                segments.push(Segment::Framing(part_header.clone()));
                segments.push(Segment::Object(*range));
            }
            segments.push(Segment::Framing(plan.trailer.clone()));
            (StatusCode::PARTIAL_CONTENT, segments, plan.body_len)
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_length));
    *response.status_mut() = status;

    let slice_len = meta.slice_len;
    let needed: Vec<(u64, u64)> = segments
        .iter()
        .filter_map(|segment| match segment {
            Segment::Object(range) => Some((range.first / slice_len, range.last / slice_len)),
            Segment::Framing(_) => None,
        })
        .collect();
    let cache_status = {
        let table = entry.table();
        let (stored, total) = needed
            .iter()
            .fold((0, 0), |(stored, total), (first, last)| {
                let present = table.present.count_in(*first, *last);
                (stored + present, total + (last - first + 1))
            });
        if stored == total {
            "HIT"
        } else if stored == 0 {
            "MISS"
        } else {
            "PARTIAL"
        }
    };
    set_cache_status(response.headers_mut(), cache_status);
    tracing::Span::current().record("cache", cache_status);
    if *method == Method::HEAD {
        return Ok(response);
    }
    let mut demand = Demand::default();
    for (first, last) in &needed {
        match fill::ensure_filling(node, route, entry, *first, *last, requester).await {
            Ok(more) => demand.merge(more),
            Err(refused) => {
                return Err(NotAnswered::Refused {
                    refused,
                    whole_object,
                })
            }
        }
    }
    match cache_status {
        "HIT" => node.stats.hit_requests.inc(),
        "MISS" => node.stats.miss_requests.inc(),
        _ => node.stats.partial_requests.inc(),
    };
    // Commit to this answer only once the first needed slice is known to be coming.
    if let Some((first_slice, _)) = needed.first() {
        let first_buffer = entry.table().inflight.get(first_slice).cloned();
        if let Some(buffer) = first_buffer {
            buffer.wait_started().await?;
        }
    }
    let (sender, receiver) = mpsc::channel(BODY_CHANNEL_DEPTH);
    let mut producer = BodyProducer {
        node: node.clone(),
        route: route.clone(),
        entry: entry.clone(),
        zero_copy: spans.is_some(),
        sender,
        requester: requester.clone(),
        demand,
    };
    tokio::spawn(
        async move {
            producer.produce(segments).await;
        }
        .in_current_span(),
    );
    *response.body_mut() = ResponseBody {
        kind: BodyKind::Produced {
            receiver,
            node: node.clone(),
            spans,
        },
    };
    Ok(response)
}

pub(super) fn set_cache_status(headers: &mut HeaderMap, status: &'static str) {
    headers.insert("x-cache", HeaderValue::from_static(status));
}
