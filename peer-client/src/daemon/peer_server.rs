//! The peer port: other machines' downloads fetch pieces here (`docs/protocol.md`, "Peer
//! protocol"). One route, `GET /content/<content id>` with one `Range`; the bytes come from the
//! [`ContentStore`], including downloads still running, and only when every piece the range
//! touches is on disk. Uploads go through the [`UploadLimits`].
//!
//! A peer cannot hold a connection, or an upload slot, for as long as it likes: the request head
//! must arrive within `daemon.peer_header_timeout` (also the idle keep-alive limit), every
//! connection's writes go through a `SendGuard` (send timeout and minimum rate), and one
//! address holds at most `daemon.max_uploads_per_address` uploads.
//!
//! **Invariant:** no path is ever built from the request. The path must be `/content/` followed
//! by exactly 64 lower-case hex digits; anything else is answered `404` before the store is
//! asked, and the store only opens files under its root named by a [`ContentId`].

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::content::store::ContentStore;
use crate::daemon::uploads::{Refusal, UploadLimits};
use crate::net::send_guard::{SendGuard, SendLimits};
use crate::sources::node_api::ContentId;

/// Bytes read and sent per chunk.
const CHUNK_BYTES: usize = 64 * 1024;

/// A response body fed by a task through a channel.
pub struct ChannelBody {
    receiver: Option<mpsc::Receiver<std::io::Result<Bytes>>>,
    fixed: Option<Bytes>,
}

impl ChannelBody {
    /// A body of `bytes` at once.
    pub fn full(bytes: impl Into<Bytes>) -> ChannelBody {
        ChannelBody {
            receiver: None,
            fixed: Some(bytes.into()),
        }
    }

    /// A body streamed from `receiver`.
    pub fn streamed(receiver: mpsc::Receiver<std::io::Result<Bytes>>) -> ChannelBody {
        ChannelBody {
            receiver: Some(receiver),
            fixed: None,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(bytes) = self.fixed.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        match &mut self.receiver {
            Some(receiver) => receiver
                .poll_recv(context)
                .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.fixed.is_none() && self.receiver.is_none()
    }

    /// A fixed body has a known length (sent as `Content-Length`, not chunked).
    fn size_hint(&self) -> hyper::body::SizeHint {
        match (&self.fixed, &self.receiver) {
            (Some(bytes), None) => hyper::body::SizeHint::with_exact(bytes.len() as u64),
            (None, None) => hyper::body::SizeHint::with_exact(0),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

/// A plain-text answer.
pub fn text_response(status: StatusCode, text: &str) -> Response<ChannelBody> {
    let mut response = Response::new(ChannelBody::full(format!("{text}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// How the peer port treats its connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// The request head must arrive within this time (also the idle keep-alive limit).
    pub header_timeout: std::time::Duration,
    /// Send timeout and minimum rate.
    pub send: SendLimits,
    /// Counts the connections dropped for reading too slowly.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl ConnectionLimits {
    /// The limits of `daemon.*` in `config`, counting drops in `dropped`.
    pub fn from_config(
        config: &crate::config::DaemonConfig,
        dropped: Arc<std::sync::atomic::AtomicU64>,
    ) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: config.peer_header_timeout,
            send: SendLimits {
                send_timeout: config.upload_send_timeout,
                floor_bytes_per_sec: config.upload_min_bytes_per_sec,
                window: config.upload_min_rate_window,
            },
            dropped,
        }
    }
}

/// Serves one HTTP/1.1 connection with `handler`, closing it when the request head takes longer
/// than `header_timeout`.
pub async fn serve_connection<I, H, F>(io: I, header_timeout: std::time::Duration, handler: H)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Response<ChannelBody>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let answer = handler(request);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

/// Serves HTTP/1.1 on `listener` with `handler` until `shutdown` resolves, each connection
/// under `limits`.
pub async fn serve_http<H, F>(
    listener: TcpListener,
    limits: ConnectionLimits,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, std::net::SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ChannelBody>> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stream = SendGuard::new(stream, limits.send, Arc::clone(&limits.dropped));
        tokio::spawn(serve_connection(
            stream,
            limits.header_timeout,
            move |request| handler(request, remote),
        ));
    }
}

/// Parses `bytes=a-b` or `bytes=a-` against a length; `Err(status)` says how to refuse.
pub fn parse_range(value: Option<&str>, len: u64) -> Result<std::ops::Range<u64>, StatusCode> {
    let spec = value
        .and_then(|value| value.trim().strip_prefix("bytes="))
        .ok_or(StatusCode::BAD_REQUEST)?;
    if spec.contains(',') {
        return Err(StatusCode::BAD_REQUEST);
    }
    let (first, last) = spec.split_once('-').ok_or(StatusCode::BAD_REQUEST)?;
    let first: u64 = first.trim().parse().map_err(|_| StatusCode::BAD_REQUEST)?;
    let end = match last.trim() {
        "" => len,
        last => last
            .parse::<u64>()
            .map_err(|_| StatusCode::BAD_REQUEST)?
            .saturating_add(1)
            .min(len),
    };
    if first >= end {
        return Err(StatusCode::RANGE_NOT_SATISFIABLE);
    }
    Ok(first..end)
}

/// What the peer port serves from and accounts to: the content store, the upload limits and
/// the upload counters. It sees nothing else of the daemon.
#[derive(Debug, Clone)]
pub struct PeerPort {
    /// The content cache pieces are read from.
    pub store: ContentStore,
    /// Upload rate, concurrency (overall and per address) and the monthly cap.
    pub uploads: UploadLimits,
    /// Counters the daemon's `perf-snap` reads.
    pub counters: UploadCounters,
}

/// The peer port's counters, shared with the daemon's statistics.
#[derive(Debug, Clone, Default)]
pub struct UploadCounters {
    /// Uploads served whole.
    pub uploads: Arc<AtomicU64>,
    /// Bytes sent to peers.
    pub bytes_uploaded: Arc<AtomicU64>,
    /// Content files opened to serve a peer.
    pub files_opened: Arc<AtomicU64>,
    /// Peer requests answered `503` (every slot, or this address's share, taken; monthly cap).
    pub uploads_refused: Arc<AtomicU64>,
}

/// Answers one peer request from `peer`.
pub async fn handle(
    port: Arc<PeerPort>,
    request: Request<Incoming>,
    peer: std::net::IpAddr,
) -> Response<ChannelBody> {
    if request.method() != Method::GET {
        let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let Some(id) = request
        .uri()
        .path()
        .strip_prefix("/content/")
        .and_then(ContentId::parse)
    else {
        return text_response(StatusCode::NOT_FOUND, "no such content");
    };
    let Some(entry) = port.store.get(id) else {
        return text_response(StatusCode::NOT_FOUND, "no such content");
    };
    let range = match parse_range(
        request
            .headers()
            .get(header::RANGE)
            .and_then(|value| value.to_str().ok()),
        entry.manifest.size,
    ) {
        Ok(range) => range,
        Err(status) => {
            let mut response = text_response(status, "one range, e.g. Range: bytes=0-1048575");
            if status == StatusCode::RANGE_NOT_SATISFIABLE {
                if let Ok(value) =
                    HeaderValue::from_str(&format!("bytes */{}", entry.manifest.size))
                {
                    response.headers_mut().insert(header::CONTENT_RANGE, value);
                }
            }
            return response;
        }
    };
    if !entry.holds_range(&range) {
        return text_response(StatusCode::NOT_FOUND, "those pieces are not here (yet)");
    }
    let length = range.end - range.start;
    let upload = match port.uploads.start(length, peer) {
        Ok(upload) => upload,
        Err(refusal) => {
            port.counters
                .uploads_refused
                .fetch_add(1, Ordering::Relaxed);
            let text = match refusal {
                Refusal::Busy => "too many uploads",
                Refusal::AddressBusy => "too many uploads to this address",
                Refusal::MonthlyCapReached => "monthly upload cap reached",
            };
            let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, text);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return response;
        }
    };
    port.store.touch(id);
    port.counters.files_opened.fetch_add(1, Ordering::Relaxed);
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(send_range(
        port.store.clone(),
        Arc::clone(&port),
        id,
        range.clone(),
        upload,
        sender,
    ));
    let mut response = Response::new(ChannelBody::streamed(receiver));
    *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    let headers = response.headers_mut();
    let mut set = |name: header::HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    set(header::CONTENT_LENGTH, &length.to_string());
    set(
        header::CONTENT_RANGE,
        &format!(
            "bytes {}-{}/{}",
            range.start,
            range.end - 1,
            entry.manifest.size
        ),
    );
    set(header::CONTENT_TYPE, "application/octet-stream");
    if let Some(etag) = &entry.manifest.etag {
        set(header::ETAG, etag);
    }
    if let Some(last_modified) = &entry.manifest.last_modified {
        set(header::LAST_MODIFIED, last_modified);
    }
    response
}

/// Reads `range` of `id` in chunks, charging the upload cap, into the response channel.
async fn send_range(
    store: ContentStore,
    port: Arc<PeerPort>,
    id: ContentId,
    range: std::ops::Range<u64>,
    mut upload: crate::daemon::uploads::Upload,
    sender: mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut sent = 0_u64;
    let file = match tokio::task::spawn_blocking(move || store.open_for_reading(id)).await {
        Ok(Ok(file)) => Arc::new(file),
        Ok(Err(error)) => {
            let _ = sender.send(Err(error)).await;
            upload.finish(0);
            return;
        }
        Err(_) => {
            upload.finish(0);
            return;
        }
    };
    let mut offset = range.start;
    while offset < range.end {
        let len = (range.end - offset).min(CHUNK_BYTES as u64) as usize;
        upload.meter.charge(len as u64).await;
        let reader = Arc::clone(&file);
        let chunk = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0_u8; len];
            reader.read_exact_at(&mut buffer, offset).map(|()| buffer)
        })
        .await
        .unwrap_or_else(|error| Err(std::io::Error::other(error)));
        let chunk = match chunk {
            Ok(chunk) => Bytes::from(chunk),
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                break;
            }
        };
        if sender.send(Ok(chunk)).await.is_err() {
            break;
        }
        offset += len as u64;
        sent += len as u64;
        port.counters
            .bytes_uploaded
            .fetch_add(len as u64, Ordering::Relaxed);
    }
    if sent == range.end - range.start {
        port.counters.uploads.fetch_add(1, Ordering::Relaxed);
    }
    upload.finish(sent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_rfc_9110_single_ranges() {
        type Case<'a> = (Option<&'a str>, Result<std::ops::Range<u64>, StatusCode>);
        let cases: &[Case] = &[
            (Some("bytes=0-99"), Ok(0..100)),
            (Some("bytes=100-"), Ok(100..1000)),
            (Some("bytes=900-5000"), Ok(900..1000)),
            (Some("bytes=1000-"), Err(StatusCode::RANGE_NOT_SATISFIABLE)),
            (Some("bytes=5-4"), Err(StatusCode::RANGE_NOT_SATISFIABLE)),
            (Some("bytes=0-1,5-6"), Err(StatusCode::BAD_REQUEST)),
            (Some("bytes=-100"), Err(StatusCode::BAD_REQUEST)),
            (Some("items=0-1"), Err(StatusCode::BAD_REQUEST)),
            (None, Err(StatusCode::BAD_REQUEST)),
        ];
        for (value, expected) in cases {
            assert_eq!(&parse_range(*value, 1000), expected, "{value:?}");
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends, the answer is a refusal or a non-empty range inside the file.
        #[test]
        fn any_range_header_is_refused_or_inside_the_file(
            value in proptest::prelude::any::<String>(),
            near_miss in "bytes= ?[0-9]{0,21} ?-[0-9]{0,21}",
            len in 0u64..u64::MAX,
        ) {
            for value in [value, near_miss] {
                if let Ok(range) = parse_range(Some(&value), len) {
                    proptest::prop_assert!(range.start < range.end, "{value:?}");
                    proptest::prop_assert!(range.end <= len, "{value:?}");
                }
            }
        }
    }
}
