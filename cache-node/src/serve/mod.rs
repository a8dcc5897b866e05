//! The client-facing request handler: route the request, find or discover the object, apply
//! conditionals and ranges (RFC 9110 §13–14), start fills for missing slices, and stream the body
//! from disk and from in-flight fills.
//!
//! A response's status and headers are committed only once its first bytes are known to be
//! coming, so an origin that is down at the start gets a clean 502 rather than a broken 206. Once
//! committed, a failure ends the body with an error, which hyper turns into a reset connection or
//! a truncated chunked body: never a clean end.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::cache::index::ObjectEntry;
use crate::cache::store::ObjectMeta;
use crate::error::{OriginError, ServeError};
use crate::fill::{
    self, BufferRead, Demand, DiscoverError, FillRefused, Requester, SliceBuffer, SliceSpan,
};
use crate::http::range::{self, ByteRange, ByteRangeSpec, MultipartPlan, RangeOutcome};
use crate::http::sendfile::{self, SpanQueue};
use crate::node::Node;
use crate::stats::ByteSource;
use crate::upstream::router::{self, Route};

/// How many body chunks the producer may run ahead of the client.
const BODY_CHANNEL_DEPTH: usize = 4;

/// How often a request is retried internally when the origin's content changes under it before
/// any byte was sent.
const VERSION_CHANGE_RETRIES: usize = 2;

/// Stored windows at least this long go out with `sendfile` on connections that can; shorter
/// ones are read and copied, which costs less than the extra syscalls for small objects.
const ZERO_COPY_MIN: usize = 32 << 10;

/// A piece of body on its way from the producer task to hyper.
enum Chunk {
    Bytes(Bytes),
    /// A window of a stored slice, sent with `sendfile` (see [`crate::http::sendfile`]).
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        length: usize,
    },
}

type BodyItem = Result<(Chunk, ByteSource), ServeError>;

/// The body of every client response.
pub struct ResponseBody {
    kind: BodyKind,
}

enum BodyKind {
    Empty,
    Full(Option<Bytes>),
    Produced {
        receiver: mpsc::Receiver<BodyItem>,
        node: Arc<Node>,
        /// The connection's zero-copy queue, when the producer may send [`Chunk::File`].
        spans: Option<SpanQueue>,
    },
    Upstream {
        body: Incoming,
        node: Arc<Node>,
    },
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ResponseBody")
    }
}

impl ResponseBody {
    fn empty() -> Self {
        ResponseBody {
            kind: BodyKind::Empty,
        }
    }

    /// A body with fixed content (error pages, admin answers).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            kind: BodyKind::Full(Some(bytes.into())),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            BodyKind::Produced {
                receiver,
                node,
                spans,
            } => match receiver.poll_recv(context) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Ok((chunk, source)))) => {
                    let bytes = match (chunk, spans) {
                        (Chunk::Bytes(bytes), _) => bytes,
                        (
                            Chunk::File {
                                file,
                                offset,
                                length,
                            },
                            Some(spans),
                        ) => {
                            node.stats.zero_copy_bytes.inc_by(length as u64);
                            spans.frame(file, offset, length)
                        }
                        (Chunk::File { .. }, None) => {
                            return Poll::Ready(Some(Err(
                                "a file chunk on a connection without zero-copy".into(),
                            )))
                        }
                    };
                    node.stats.count_egress(source, bytes.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            },
            BodyKind::Upstream { body, node } => match Pin::new(body).poll_frame(context) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        node.stats.origin_bytes.inc_by(data.len() as u64);
                        node.stats
                            .count_egress(ByteSource::Other, data.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Empty => true,
            BodyKind::Full(bytes) => bytes.is_none(),
            BodyKind::Produced { .. } => false,
            BodyKind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            }
            BodyKind::Produced { .. } => SizeHint::default(),
            BodyKind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// A short plain-text answer.
pub fn text_response(status: StatusCode, message: impl Into<String>) -> Response<ResponseBody> {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// True when a slice read from disk for a hit should be checked against its piece hashes
/// (`storage.verify_hits`).
fn sample_hit_check(node: &Node) -> bool {
    node.verify_hits >= 1.0 || (node.verify_hits > 0.0 && rand::random::<f64>() < node.verify_hits)
}

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// Handles one content request (the server's dispatcher has counted it, refused loops and sent
/// the node's own API elsewhere). Never fails: every problem becomes an HTTP answer.
///
/// `spans` is the connection's zero-copy queue when its socket is a
/// [`sendfile::ZeroCopyStream`]; stored bytes then leave with `sendfile` on HTTP/1 requests.
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
    if method != Method::GET && method != Method::HEAD {
        node.stats.refused_requests.inc();
        let mut response = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} is not supported by this cache; use GET or HEAD"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let host_header = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let route = match router::route_request(
        &node.allowlist,
        request.version(),
        request.uri(),
        host_header,
    ) {
        Ok(route) => route,
        Err(error) => {
            node.stats.refused_requests.inc();
            tracing::info!(request_id, uri = %request.uri(), %error, "refused");
            return Ok(text_response(StatusCode::FORBIDDEN, error.to_string()));
        }
    };
    let span = tracing::info_span!(
        "request",
        id = request_id,
        origin = %route.target.host,
        mode = route.mode.as_str(),
        cache = tracing::field::Empty,
    );
    let response = serve_routed(&node, &route, &method, request.headers(), spans, &requester)
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::info!(
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

/// What part of the object a response carries.
enum Selection {
    Full,
    Single(ByteRange),
    Multi(Vec<ByteRange>),
}

/// One piece of a response body.
enum Segment {
    Framing(Bytes),
    Object(ByteRange),
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The slices a discovery should fetch for this request: what the client asked for when that is
/// known without the object's length, else the first slice.
fn discovery_span(method: &Method, specs: Option<&[ByteRangeSpec]>, slice_len: u64) -> SliceSpan {
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

async fn serve_routed(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    headers: &HeaderMap,
    spans: Option<SpanQueue>,
    requester: &Requester,
) -> Response<ResponseBody> {
    // Only GET defines range handling (RFC 9110 §14.2); a Range on HEAD is ignored.
    let range_specs = if *method == Method::GET {
        header_str(headers, header::RANGE).and_then(range::parse_range_header)
    } else {
        None
    };
    let span = discovery_span(method, range_specs.as_deref(), node.slice_len);
    for attempt in 0..=VERSION_CHANGE_RETRIES {
        // The discovery's demand keeps its fill going until `respond` has registered its own.
        let (entry, _discovery_demand) =
            match fill::lookup_or_discover(node, route, span, requester).await {
                Ok(found) => found,
                Err(DiscoverError::NotStorable(_)) => {
                    return pass_through(node, route, method, headers).await
                }
                Err(DiscoverError::Origin(error)) => return origin_failure_response(node, &error),
                Err(DiscoverError::Refused(refused)) => return refused_response(node, refused),
            };
        match fill::revalidate_if_stale(node, route, &entry).await {
            fill::Revalidation::Changed if attempt < VERSION_CHANGE_RETRIES => continue,
            // Served as stored: current, or the origin cannot be asked (stale-if-error).
            _ => {}
        }
        let answer = respond(
            node,
            route,
            method,
            headers,
            range_specs.as_deref(),
            &entry,
            spans.clone(),
            requester,
        )
        .await;
        match answer {
            Err(NotAnswered::Origin(OriginError::VersionChanged))
                if attempt < VERSION_CHANGE_RETRIES =>
            {
                continue
            }
            Err(NotAnswered::Origin(error)) => return origin_failure_response(node, &error),
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
                return pass_through(node, route, method, headers).await;
            }
            Err(NotAnswered::Refused { refused, .. }) => return refused_response(node, refused),
            Ok(response) => return response,
        }
    }
    unreachable!("the last attempt always returns")
}

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
const CLIENT_BUSY_RETRY_AFTER_SECS: u64 = 2;

/// The answer to a request that may not start the fills it needs now.
fn refused_response(node: &Node, refused: FillRefused) -> Response<ResponseBody> {
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
enum NotAnswered {
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

fn origin_failure_response(node: &Node, error: &OriginError) -> Response<ResponseBody> {
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

fn set_header(headers: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Headers every answer about a stored object carries (also 304s).
fn object_headers(headers: &mut HeaderMap, meta: &ObjectMeta) {
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
async fn respond(
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

fn set_cache_status(headers: &mut HeaderMap, status: &'static str) {
    headers.insert("x-cache", HeaderValue::from_static(status));
}

/// Where one slice's bytes come from at the moment it is read.
enum SliceSource {
    Disk,
    Fill(Arc<SliceBuffer>),
    Missing,
}

fn slice_source(entry: &ObjectEntry, index: u64) -> SliceSource {
    let table = entry.table();
    if table.present.contains(index) {
        SliceSource::Disk
    } else if let Some(buffer) = table.inflight.get(&index) {
        SliceSource::Fill(buffer.clone())
    } else {
        SliceSource::Missing
    }
}

/// What streams one response's body: the object, where its bytes go, and the response's
/// [`Demand`] on the slices being filled, which keeps their fills going while it lives.
struct BodyProducer {
    node: Arc<Node>,
    route: Route,
    entry: Arc<ObjectEntry>,
    /// Stored windows may go out as [`Chunk::File`].
    zero_copy: bool,
    sender: mpsc::Sender<BodyItem>,
    /// Who asked, for refills of slices that went missing.
    requester: Requester,
    demand: Demand,
}

enum SendError {
    ClientGone,
    Serve(ServeError),
}

impl BodyProducer {
    /// Streams the segments of a response into the body channel. Returns when done, when the
    /// client went away (the channel closed), or after sending an error. The demand goes with
    /// it, so fills nobody else reads stop at their next slice.
    async fn produce(&mut self, segments: Vec<Segment>) {
        for segment in segments {
            let range = match segment {
                Segment::Framing(bytes) => {
                    if self
                        .sender
                        .send(Ok((Chunk::Bytes(bytes), ByteSource::Other)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Segment::Object(range) => range,
            };
            let slice_len = self.entry.meta.slice_len;
            let last_slice = range.last / slice_len;
            for index in range.first / slice_len..=last_slice {
                let slice_start = index * slice_len;
                let window_start = range.first.max(slice_start) - slice_start;
                let window_end = (range.last + 1)
                    .min(slice_start + self.entry.meta.slice_length(index))
                    - slice_start;
                match self
                    .send_slice(index, last_slice, window_start, window_end)
                    .await
                {
                    Ok(()) => {}
                    Err(SendError::ClientGone) => return,
                    Err(SendError::Serve(error)) => {
                        tracing::warn!(%error, source = ?error.source_kind(), slice = index, "response aborted");
                        let _ = self.sender.send(Err(error)).await;
                        return;
                    }
                }
            }
        }
    }

    /// Sends bytes `window_start..window_end` of slice `index`, from disk, from its fill, or by
    /// starting a fill. A slice the index has as stored that turns out missing or short on disk
    /// is forgotten and filled again, and this response streams it from that fill: a lost slice
    /// is a miss, never a truncated hit. A slice that fails its piece-hash check ends the
    /// response.
    async fn send_slice(
        &mut self,
        index: u64,
        last_slice: u64,
        window_start: u64,
        window_end: u64,
    ) -> Result<(), SendError> {
        // One fill per slice and response: a slice that is missing again after it was filled
        // once (its write failed, or the object went away) ends the response.
        let mut filled = false;
        for _ in 0..3 {
            let refill_to = match slice_source(&self.entry, index) {
                SliceSource::Disk => {
                    let window = SliceWindow {
                        index,
                        start: window_start,
                        end: window_end,
                    };
                    let sent = send_stored(
                        &self.node,
                        &self.entry,
                        window,
                        self.zero_copy,
                        &self.sender,
                    )
                    .await;
                    let error = match sent {
                        Ok(()) => return Ok(()),
                        Err(StoredError::ClientGone) => return Err(SendError::ClientGone),
                        Err(StoredError::Mismatch(slice)) => {
                            return Err(SendError::Serve(ServeError::Integrity { slice }))
                        }
                        Err(StoredError::Disk(error)) => error,
                    };
                    if filled
                        || !self
                            .node
                            .index
                            .slice_lost(&self.entry, index, &error, &self.node.stats)
                    {
                        return Err(SendError::Serve(if self.entry.is_removed() {
                            ServeError::Vanished
                        } else {
                            ServeError::Disk(error)
                        }));
                    }
                    index
                }
                SliceSource::Fill(buffer) => {
                    let mut reader = buffer.reader(window_start, window_end);
                    loop {
                        match reader.next().await {
                            BufferRead::Data(bytes) => {
                                if self
                                    .sender
                                    .send(Ok((Chunk::Bytes(bytes), ByteSource::Fill)))
                                    .await
                                    .is_err()
                                {
                                    return Err(SendError::ClientGone);
                                }
                            }
                            BufferRead::End => return Ok(()),
                            BufferRead::Failed(error) => {
                                return Err(SendError::Serve(ServeError::Origin(error)))
                            }
                        }
                    }
                }
                // An earlier fill of this slice failed or its write was lost: fetch the rest of
                // the response's slices again.
                SliceSource::Missing if !filled && !self.entry.is_removed() => last_slice,
                SliceSource::Missing => break,
            };
            filled = true;
            match fill::ensure_filling(
                &self.node,
                &self.route,
                &self.entry,
                index,
                refill_to,
                &self.requester,
            )
            .await
            {
                Ok(more) => self.demand.merge(more),
                Err(refused) => {
                    tracing::info!(%refused, slice = index, "cannot refill a missing slice");
                    break;
                }
            }
        }
        Err(SendError::Serve(ServeError::Vanished))
    }
}

/// Why a window of a stored slice could not be sent.
enum StoredError {
    ClientGone,
    /// The slice could not be read: missing, short, or an I/O error.
    Disk(crate::error::DiskError),
    /// The slice failed its piece-hash check; the object was dropped.
    Mismatch(u64),
}

/// A window of one slice: slice-relative bytes `start..end`.
#[derive(Debug, Clone, Copy)]
struct SliceWindow {
    index: u64,
    start: u64,
    end: u64,
}

/// Sends a window of a stored slice. A sampled share of slices (`storage.verify_hits`) is read
/// whole and checked against its piece hashes before any of it is sent; the others leave with
/// `sendfile` when the connection allows it, or through a pooled buffer.
async fn send_stored(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    window: SliceWindow,
    zero_copy: bool,
    sender: &mpsc::Sender<BodyItem>,
) -> Result<(), StoredError> {
    let send_bytes = |bytes: Bytes| async move {
        sender
            .send(Ok((Chunk::Bytes(bytes), ByteSource::Disk)))
            .await
            .map_err(|_| StoredError::ClientGone)
    };
    if sample_hit_check(node) {
        match crate::cache::pieces::verify_slice(&node.piece_store(), entry, window.index).await {
            Ok(Some(slice)) => {
                return send_bytes(slice.slice(window.start as usize..window.end as usize)).await
            }
            // The hashes are not known (peering off, or not yet recorded): sent unchecked.
            Ok(None) => {}
            Err(crate::cache::pieces::VerifyError::Disk(error)) => {
                return Err(StoredError::Disk(error))
            }
            Err(crate::cache::pieces::VerifyError::Mismatch { slice }) => {
                return Err(StoredError::Mismatch(slice))
            }
        }
    }
    let path = node
        .layout
        .slice_path(&entry.key, entry.meta.generation, window.index);
    let length = (window.end - window.start) as usize;
    if zero_copy && length >= ZERO_COPY_MIN {
        match node
            .storage
            .open_for_send(path.clone(), window.start, length)
            .await
        {
            Ok(Some(file)) => {
                return send_file_window(file, window.start, length, sender)
                    .await
                    .map_err(|_| StoredError::ClientGone)
            }
            // Not in the page cache (or shorter than the window): read it below without
            // blocking the worker.
            Ok(None) => {}
            Err(error) => return Err(StoredError::Disk(error)),
        }
    }
    let buffer = node.read_buffers.take();
    match node
        .storage
        .read_at(path, window.start, length, buffer)
        .await
    {
        Ok(buffer) => send_bytes(node.read_buffers.into_bytes(buffer)).await,
        Err(error) => Err(StoredError::Disk(error)),
    }
}

/// Sends a window of an opened slice file as file chunks of at most [`sendfile::FRAME_MAX`]
/// bytes.
async fn send_file_window(
    file: std::fs::File,
    window_start: u64,
    length: usize,
    sender: &mpsc::Sender<BodyItem>,
) -> Result<(), SendError> {
    let file = Arc::new(file);
    let mut offset = window_start;
    let end = window_start + length as u64;
    while offset < end {
        let frame = ((end - offset) as usize).min(sendfile::FRAME_MAX);
        let chunk = Chunk::File {
            file: file.clone(),
            offset,
            length: frame,
        };
        sender
            .send(Ok((chunk, ByteSource::Disk)))
            .await
            .map_err(|_| SendError::ClientGone)?;
        offset += frame as u64;
    }
    Ok(())
}

/// Serves a request for content the node may not store (the origin sent no length or a
/// `Content-Encoding`, its `Cache-Control` says `no-store` or `private`, or the request needs
/// slices of a validator-less object that are not stored) by relaying the origin's answer. A
/// GET's `Range` and `If-Range` go along, so a ranged request still gets only its range.
async fn pass_through(
    node: &Arc<Node>,
    route: &Route,
    method: &Method,
    request_headers: &HeaderMap,
) -> Response<ResponseBody> {
    node.stats.pass_through_requests.inc();
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
            set_cache_status(response.headers_mut(), "BYPASS");
            tracing::Span::current().record("cache", "BYPASS");
            response
        }
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
