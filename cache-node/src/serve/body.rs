//! The body of every client response: a full buffer, or a stream a producer task feeds through
//! a bounded channel (bytes, or stored file windows that leave with `sendfile`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::error::ServeError;
use crate::http::access_log::{AccessEntry, AccessLog};
use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::stats::{ByteSource, LatencyHistograms, OriginIndex, Stats};

/// How many body chunks the producer may run ahead of the client.
pub(super) const BODY_CHANNEL_DEPTH: usize = 4;

/// A piece of body on its way from the producer task to hyper.
pub(super) enum Chunk {
    Bytes(Bytes),
    /// A window of a stored slice, sent with `sendfile` (see [`crate::http::sendfile`]).
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        length: usize,
    },
}

pub(super) type BodyItem = Result<(Chunk, ByteSource), ServeError>;

/// The body of every client response.
pub struct ResponseBody {
    pub(super) kind: BodyKind,
    /// The request's access log entry, written when the body is dropped.
    pub(super) access: Option<Box<AccessRecord>>,
    /// When the request arrived and its cache status, for the duration histogram.
    timing: Option<Timing>,
}

/// What the duration histogram needs about a response.
struct Timing {
    stats: Arc<Stats>,
    started: Instant,
    status: usize,
}

/// The origin a request was routed to, as a response extension for the access log.
#[derive(Debug, Clone)]
pub struct RoutedOrigin(pub String);

/// One request's access log entry while its response is sent: its bytes are counted as they
/// go, and the entry is queued when the body is dropped (at its end, or when the client left).
pub struct AccessRecord {
    log: AccessLog,
    entry: AccessEntry,
    started: Instant,
    ended: Option<Instant>,
    /// The `Content-Length` sent, to tell a complete body whose end hyper did not poll.
    declared: Option<u64>,
}

impl AccessRecord {
    /// Starts the entry of `request`, which arrived at `started`.
    pub fn start<B>(log: &AccessLog, request: &Request<B>, started: Instant) -> AccessRecord {
        let text = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        };
        let version = match request.version() {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        };
        AccessRecord {
            log: log.clone(),
            entry: AccessEntry {
                time: std::time::SystemTime::now(),
                client: request
                    .extensions()
                    .get::<crate::http::client_key::ClientAddr>()
                    .map(|addr| addr.0.ip()),
                method: request.method().as_str().to_owned(),
                origin: "-".to_owned(),
                target: request.uri().to_string(),
                version,
                range: text(header::RANGE),
                status: 0,
                cache: "-".to_owned(),
                bytes: 0,
                first_byte: std::time::Duration::ZERO,
                duration: std::time::Duration::ZERO,
                complete: false,
                referer: text(header::REFERER),
                user_agent: text(header::USER_AGENT),
            },
            started,
            ended: None,
            declared: None,
        }
    }

    /// Completes the entry's head from `response` and hands the entry to its body.
    pub fn attach(mut self, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
        self.entry.first_byte = self.started.elapsed();
        self.entry.status = response.status().as_u16();
        if let Some(cache) = response.headers().get("x-cache") {
            self.entry.cache = String::from_utf8_lossy(cache.as_bytes()).into_owned();
        }
        if let Some(origin) = response.extensions_mut().remove::<RoutedOrigin>() {
            self.entry.origin = origin.0;
        }
        self.declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok());
        if self.entry.method == "HEAD" || self.entry.status == 304 {
            self.declared = Some(0);
        }
        response.body_mut().access = Some(Box::new(self));
        response
    }
}

/// Records the response's time to first byte now (its headers are ready), and its duration when
/// its body is dropped, in `stats`'s latency histograms under its `X-Cache` status.
pub fn time_response(
    stats: &Arc<Stats>,
    started: Instant,
    mut response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let status =
        LatencyHistograms::index_of(response.headers().get("x-cache").map(HeaderValue::as_bytes));
    stats
        .latency
        .first_byte(status, started.elapsed().as_secs_f64());
    response.body_mut().timing = Some(Timing {
        stats: stats.clone(),
        started,
        status,
    });
    response
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(timing) = self.timing.take() {
            timing
                .stats
                .latency
                .duration(timing.status, timing.started.elapsed().as_secs_f64());
        }
        if let Some(mut access) = self.access.take() {
            let end = access.ended.unwrap_or_else(Instant::now);
            access.entry.duration = end.duration_since(access.started);
            access.entry.complete = access.ended.is_some()
                || access.declared == Some(access.entry.bytes)
                || self.is_end_stream();
            let entry = std::mem::replace(&mut access.entry, placeholder_entry());
            access.log.record(entry);
        }
    }
}

/// What is left in a record whose entry was queued.
fn placeholder_entry() -> AccessEntry {
    AccessEntry {
        time: std::time::UNIX_EPOCH,
        client: None,
        method: String::new(),
        origin: String::new(),
        target: String::new(),
        version: "",
        range: None,
        status: 0,
        cache: String::new(),
        bytes: 0,
        first_byte: std::time::Duration::ZERO,
        duration: std::time::Duration::ZERO,
        complete: false,
        referer: None,
        user_agent: None,
    }
}

pub(super) enum BodyKind {
    Empty,
    Full(Option<Bytes>),
    Produced {
        receiver: mpsc::Receiver<BodyItem>,
        node: Arc<Node>,
        /// The connection's zero-copy queue, when the producer may send [`Chunk::File`].
        spans: Option<SpanQueue>,
        /// The label the body's bytes count under (the route's).
        origin: OriginIndex,
    },
    Upstream {
        body: Incoming,
        node: Arc<Node>,
        /// The label the body's bytes count under (the route's).
        origin: OriginIndex,
    },
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ResponseBody")
    }
}

impl ResponseBody {
    pub(super) fn empty() -> Self {
        ResponseBody {
            kind: BodyKind::Empty,
            access: None,
            timing: None,
        }
    }

    /// A body fed as `kind` says.
    pub(super) fn of(kind: BodyKind) -> Self {
        ResponseBody {
            kind,
            access: None,
            timing: None,
        }
    }

    /// A body with fixed content (error pages, admin answers).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            kind: BodyKind::Full(Some(bytes.into())),
            access: None,
            timing: None,
        }
    }
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ResponseBody {
    fn poll_kind(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            BodyKind::Produced {
                receiver,
                node,
                spans,
                origin,
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
                    node.stats.count_egress(*origin, source, bytes.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            },
            BodyKind::Upstream { body, node, origin } => match Pin::new(body).poll_frame(context) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        node.stats.count_origin_bytes(*origin, data.len() as u64);
                        node.stats
                            .count_egress(*origin, ByteSource::Other, data.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.poll_kind(context);
        if let Some(access) = &mut this.access {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        access.entry.bytes += data.len() as u64;
                    }
                }
                Poll::Ready(None) => access.ended = Some(Instant::now()),
                _ => {}
            }
        }
        polled
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
