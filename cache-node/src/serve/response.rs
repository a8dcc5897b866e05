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

use crate::cache::index::{ObjectEntry, SliceTable};
use crate::cache::status_answer::StatusAnswer;
use crate::cache::store::ObjectMeta;
use crate::error::OriginError;
use crate::fill::{self, Demand, FillRefused, Requester};
use crate::http::range::{self, ByteRange, ByteRangeSpec, MultipartPlan, RangeOutcome};
use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::stats::Stats;
use crate::upstream::router::Route;

/// The status that reports an origin failure to a client.
pub(crate) fn origin_failure_status(error: &OriginError) -> StatusCode {
    match error {
        OriginError::Status(code) => StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY),
        OriginError::FirstByteTimeout(_) | OriginError::IdleTimeout(_) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        // Found when resolving, before any connection: the same refusal as a disallowed
        // literal, so a Delivery Optimization client bans this cache for the origin at once.
        OriginError::AddressRefused(_) => StatusCode::FORBIDDEN,
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

/// The answer relaying an origin's answer other than content: its status, header section and
/// body, with `X-Cache: HIT` and an `Age` when it came from the kept answers (`kept`) and
/// `MISS` when the origin was just asked. Conditionals and `Range` do not apply to it (RFC 9110
/// §13.2.1, §14.2: they are for a `2xx`).
pub(super) fn status_answer_response(
    node: &Node,
    method: &Method,
    answer: &StatusAnswer,
    kept: bool,
) -> Response<ResponseBody> {
    let body = if *method == Method::HEAD {
        ResponseBody::empty()
    } else {
        ResponseBody::full(answer.body.clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.reserve(answer.headers.len() + 3);
    for (name, value) in &answer.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(answer.body.len()));
    let cache_status = if kept {
        node.stats.status_answer_hits.inc();
        headers.insert(header::AGE, HeaderValue::from(answer.age().as_secs()));
        CacheStatus::Hit
    } else {
        CacheStatus::Miss
    };
    cache_status.count(&node.stats);
    set_cache_status(headers, cache_status);
    tracing::Span::current().record("cache", cache_status.as_str());
    response
}

pub(super) fn set_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Headers every answer about a stored object carries (also 304s): the stored header section,
/// copied from the entry's parsed map (no stored name or value is parsed per answer).
pub(super) fn object_headers(headers: &mut HeaderMap, entry: &ObjectEntry) {
    let replay = entry.replay_headers();
    headers.reserve(replay.len() + 4);
    for (name, value) in replay.iter() {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// What a content request asks for, as every step of answering it reads it: built once per
/// request by [`super::serve_routed`] and passed down instead of eight arguments.
pub(super) struct ContentRequest<'a> {
    pub(super) node: &'a Arc<Node>,
    pub(super) route: &'a Route,
    pub(super) method: &'a Method,
    pub(super) headers: &'a HeaderMap,
    /// The parsed `Range` of a GET; `None` when there is none (or it is ignored).
    pub(super) range_specs: Option<&'a [ByteRangeSpec]>,
    /// The connection's zero-copy queue, when its stored bytes may leave with `sendfile`.
    pub(super) spans: Option<SpanQueue>,
    pub(super) requester: &'a Requester,
    /// `Cache-Control: only-if-cached`: bytes not on disk are not fetched; the answer is then a
    /// `504`.
    pub(super) only_if_cached: bool,
}

/// The `504` of `only-if-cached` when what was asked for is not stored (RFC 9111 §5.2.1.7).
pub(super) fn only_if_cached_miss() -> Response<ResponseBody> {
    text_response(
        StatusCode::GATEWAY_TIMEOUT,
        "only-if-cached: the node has no stored version it may serve without the origin",
    )
}

/// Where a response's bytes come from, as the `X-Cache` header, the request's log span and the
/// request counters report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CacheStatus {
    /// Every byte from disk (also a `304` for a stored object).
    Hit,
    /// Every byte from fills started for it or running already.
    Miss,
    /// Some bytes from disk, some from fills.
    Partial,
    /// Relayed from the origin without storing.
    Bypass,
}

impl CacheStatus {
    /// The header and log value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Partial => "PARTIAL",
            CacheStatus::Bypass => "BYPASS",
        }
    }

    /// The status of a response reading slices `needed` (inclusive runs) of an entry whose
    /// slice table is `table`.
    fn of_slices(table: &SliceTable, needed: &[(u64, u64)]) -> CacheStatus {
        let (stored, total) = needed
            .iter()
            .fold((0, 0), |(stored, total), (first, last)| {
                let present = table.present.count_in(*first, *last);
                (stored + present, total + (last - first + 1))
            });
        if stored == total {
            CacheStatus::Hit
        } else if stored == 0 {
            CacheStatus::Miss
        } else {
            CacheStatus::Partial
        }
    }

    /// Counts a request answered with this status.
    pub(super) fn count(self, stats: &Stats) {
        match self {
            CacheStatus::Hit => stats.hit_requests.inc(),
            CacheStatus::Miss => stats.miss_requests.inc(),
            CacheStatus::Partial => stats.partial_requests.inc(),
            CacheStatus::Bypass => stats.pass_through_requests.inc(),
        };
    }
}

/// The status, framing and length of a body, and the object bytes it carries.
struct BodyPlan {
    status: StatusCode,
    segments: Vec<Segment>,
    length: u64,
}

/// The answer for a known object. Returns `Err` only before anything was committed.
pub(super) async fn respond(
    request: &ContentRequest<'_>,
    entry: &Arc<ObjectEntry>,
) -> Result<Response<ResponseBody>, NotAnswered> {
    let meta = &entry.meta;
    let mut response = Response::new(ResponseBody::empty());
    object_headers(response.headers_mut(), entry);
    // A stored response carries its age (RFC 9111 §4, §5.1): the time since the origin last
    // confirmed it, so caches and clients downstream count the origin's max-age correctly.
    if let Some(age) = entry.age() {
        response
            .headers_mut()
            .insert(header::AGE, HeaderValue::from(age.as_secs()));
    }
    if not_modified(request.headers, meta) {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        set_cache_status(response.headers_mut(), CacheStatus::Hit);
        return Ok(response);
    }
    let Some(selection) = select(request, meta) else {
        request.node.stats.refused_requests.inc();
        *response.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
        set_header(
            response.headers_mut(),
            header::CONTENT_RANGE,
            &range::format_unsatisfied_content_range(meta.length),
        );
        *response.body_mut() = ResponseBody::full("range not satisfiable\n");
        return Ok(response);
    };
    let whole_object = matches!(selection, Selection::Full);
    let plan = plan_body(selection, meta, response.headers_mut());
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(plan.length));
    *response.status_mut() = plan.status;

    let slice_len = meta.slice_len;
    let needed: Vec<(u64, u64)> = plan
        .segments
        .iter()
        .filter_map(|segment| match segment {
            Segment::Object(range) => Some((range.first / slice_len, range.last / slice_len)),
            Segment::Framing(_) => None,
        })
        .collect();
    let cache_status = CacheStatus::of_slices(&entry.table(), &needed);
    set_cache_status(response.headers_mut(), cache_status);
    tracing::Span::current().record("cache", cache_status.as_str());
    if *request.method == Method::HEAD {
        return Ok(response);
    }
    if request.only_if_cached && cache_status != CacheStatus::Hit {
        // Some bytes asked for are not on disk, and the origin may not be asked for them.
        return Ok(only_if_cached_miss());
    }
    let mut demand = Demand::default();
    for (first, last) in &needed {
        match fill::ensure_filling(
            request.node,
            request.route,
            entry,
            *first,
            *last,
            request.requester,
        )
        .await
        {
            Ok(more) => demand.merge(more),
            Err(refused) => {
                return Err(NotAnswered::Refused {
                    refused,
                    whole_object,
                })
            }
        }
    }
    cache_status.count(&request.node.stats);
    // Commit to this answer only once the first needed slice is known to be coming.
    if let Some((first_slice, _)) = needed.first() {
        let first_buffer = entry.table().inflight.get(first_slice).cloned();
        if let Some(buffer) = first_buffer {
            buffer.wait_started().await?;
        }
    }
    *response.body_mut() = start_body(request, entry, plan.segments, demand);
    Ok(response)
}

/// True when the request's conditionals say the client's copy is current (RFC 9110 §13.2.2:
/// If-None-Match wins over If-Modified-Since).
fn not_modified(request_headers: &HeaderMap, meta: &ObjectMeta) -> bool {
    match header_str(request_headers, header::IF_NONE_MATCH) {
        Some(if_none_match) => range::if_none_match_matches(if_none_match, meta.etag.as_deref()),
        None => header_str(request_headers, header::IF_MODIFIED_SINCE)
            .is_some_and(|since| range::not_modified_since(since, meta.last_modified.as_deref())),
    }
}

/// Which part of the object the response carries: the whole object, unless a Range applies
/// (and its If-Range matches). `None` when the Range cannot be satisfied or has too many ranges
/// (answered `416`).
fn select(request: &ContentRequest<'_>, meta: &ObjectMeta) -> Option<Selection> {
    let range_applies = request.range_specs.is_some()
        && header_str(request.headers, header::IF_RANGE).is_none_or(|if_range| {
            range::if_range_matches(
                if_range,
                meta.etag.as_deref(),
                meta.last_modified.as_deref(),
            )
        });
    let Some(specs) = request.range_specs.filter(|_| range_applies) else {
        return Some(Selection::Full);
    };
    match range::resolve_ranges(specs, meta.length, request.node.max_ranges) {
        RangeOutcome::Satisfiable(ranges) if ranges.len() == 1 => {
            Some(Selection::Single(ranges[0]))
        }
        RangeOutcome::Satisfiable(ranges) => Some(Selection::Multi(ranges)),
        outcome @ (RangeOutcome::Unsatisfiable | RangeOutcome::TooManyRanges) => {
            tracing::info!(?outcome, length = meta.length, "range not satisfiable");
            None
        }
    }
}

/// The status, content headers and body segments for `selection`.
fn plan_body(selection: Selection, meta: &ObjectMeta, headers: &mut HeaderMap) -> BodyPlan {
    match selection {
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
            BodyPlan {
                status: StatusCode::OK,
                segments,
                length: meta.length,
            }
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
            BodyPlan {
                status: StatusCode::PARTIAL_CONTENT,
                segments: vec![Segment::Object(range)],
                length: range.len(),
            }
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
            BodyPlan {
                status: StatusCode::PARTIAL_CONTENT,
                segments,
                length: plan.body_len,
            }
        }
    }
}

/// Spawns the producer task that walks `segments` into the body's channel, holding `demand` on
/// the slices it will read.
fn start_body(
    request: &ContentRequest<'_>,
    entry: &Arc<ObjectEntry>,
    segments: Vec<Segment>,
    demand: Demand,
) -> ResponseBody {
    let (sender, receiver) = mpsc::channel(BODY_CHANNEL_DEPTH);
    let mut producer = BodyProducer {
        node: request.node.clone(),
        route: request.route.clone(),
        entry: entry.clone(),
        zero_copy: request.spans.is_some(),
        sender,
        requester: request.requester.clone(),
        demand,
    };
    tokio::spawn(
        async move {
            producer.produce(segments).await;
        }
        .in_current_span(),
    );
    ResponseBody::of(BodyKind::Produced {
        receiver,
        node: request.node.clone(),
        spans: request.spans.clone(),
        origin: request.route.target.origin,
    })
}

/// Sets `X-Cache`.
pub(super) fn set_cache_status(headers: &mut HeaderMap, status: CacheStatus) {
    headers.insert("x-cache", HeaderValue::from_static(status.as_str()));
}
