//! A scriptable HTTP/1.1 origin server for loopback tests of the cache. [`MockOrigin`] binds
//! `127.0.0.1:0`, serves in-memory objects with single-range and `If-Range` support, records every
//! request, and counts how many times each byte of each object has been sent so that tests can
//! assert properties such as "every byte was fetched from the origin exactly once". Per-object
//! [`Behaviour`] makes the origin misbehave in the ways a real upstream does: ignoring ranges, slow
//! headers, throttled bodies, connections that die mid-body, lying lengths, chunked framing and error
//! statuses. Bodies are streamed as cheap slices of the stored [`Bytes`], so objects of hundreds of
//! MiB are served without copying them per request.

use outpost_shared::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Sleep;

/// The `Last-Modified` value of every object. It is fixed so that tests can predict it and so that
/// date-based `If-Range` validation behaves deterministically.
pub const MOCK_LAST_MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";

/// The `Content-Type` of every object.
pub const MOCK_CONTENT_TYPE: &str = "application/octet-stream";

/// Chunk size used when a body is throttled with [`Behaviour::chunk_delay`] and no explicit
/// [`Behaviour::chunk_size`] is given. It is small so that throttling is fine-grained.
pub const DEFAULT_THROTTLED_CHUNK_SIZE: usize = 64 * 1024;

/// Chunk size used when a body is not throttled. It is large because every chunk costs a lock of
/// the shared state and a trip through hyper's write queue, and big chunks keep loopback throughput
/// high enough for the 1 GiB benchmarks.
pub const DEFAULT_UNTHROTTLED_CHUNK_SIZE: usize = 512 * 1024;

/// Returns the strong ETag the mock origin assigns to `content`: the first 16 hexadecimal digits of
/// its SHA-256 digest, in double quotes. Tests use it to build `If-Range` headers for content they
/// hold, including content the origin no longer serves.
pub fn etag_for_content(content: &[u8]) -> String {
    let digest_hex = crate::sha256_hex(content);
    format!("\"{}\"", &digest_hex[..16])
}

/// Per-object misbehaviour. The default is a well-behaved origin.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Ignore `Range` headers and always send 200 with the full body.
    pub ignore_range: bool,
    /// Sleep this long before sending response headers.
    pub header_delay: Option<Duration>,
    /// Throttle the body: send chunks of `chunk_size` (default 64 KiB) and sleep this long between
    /// chunks.
    pub chunk_delay: Option<Duration>,
    /// Size of the body chunks. Defaults to [`DEFAULT_THROTTLED_CHUNK_SIZE`] when `chunk_delay` is
    /// set and to [`DEFAULT_UNTHROTTLED_CHUNK_SIZE`] otherwise. Zero is treated as one.
    pub chunk_size: Option<usize>,
    /// After sending this many body bytes of a response, abort the connection (drop it mid-body,
    /// without a clean end). Applies to every response for this object while set. A limit at or
    /// beyond the length of a response body has no effect on that response.
    pub drop_after_bytes: Option<u64>,
    /// Declare a `Content-Length` (or `Content-Range` total) that differs from the real body: the
    /// server declares `lie_total_len` as the complete length but sends the real bytes. On a 200
    /// that declares more than exists, the real bytes are sent and the connection is then aborted;
    /// one that declares less sends only the declared number of bytes. On a 206 the range is resolved
    /// against the real length and only the total in `Content-Range` lies.
    pub lie_total_len: Option<u64>,
    /// Send the body with chunked transfer-encoding instead of `Content-Length` (for 200 responses).
    pub chunked: bool,
    /// Respond with this status and a short body instead of serving the object (e.g. 404, 500).
    pub status_override: Option<u16>,
    /// Send these bytes of the object (offsets in the object) inverted, with every header,
    /// the ETag included, unchanged: an origin or disk that silently corrupts content.
    pub corrupt_range: Option<Range<u64>>,
    /// Extra response headers on every answer for this object (`Cache-Control`, `Expires`...).
    pub headers: Vec<(&'static str, String)>,
    /// Send neither `ETag` nor `Last-Modified`: an origin without validators, whose `If-Range`
    /// can never match (such a request gets the whole object).
    pub omit_validators: bool,
    /// Answer a range request with the range that starts this many bytes later (or clipped to
    /// the end), declared as such in `Content-Range`: a 206 for other bytes than asked.
    pub shift_range: Option<u64>,
    /// Declare a 206's `Content-Length` this many bytes off the length its `Content-Range`
    /// gives; the body has the declared length (the range's bytes, cut short or followed by an
    /// abort when there are not enough).
    pub content_length_delta: Option<i64>,
    /// Representations in other codings (`("gzip", bytes)`): a GET or HEAD whose
    /// `Accept-Encoding` lists one of these codings (the first listed in this vector wins, `q=0`
    /// aside) gets its bytes, with `Content-Encoding` and an ETag of their own. When set, every
    /// answer carries `Vary: Accept-Encoding`.
    pub encodings: Vec<(&'static str, Bytes)>,
}

/// One request as the origin received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path of the request target, without the query string.
    pub path: String,
    /// The query string, without the leading `?`.
    pub query: Option<String>,
    /// The `Host` header, or the authority of an absolute-form request target when there is none.
    pub host: Option<String>,
    pub range: Option<String>,
    pub if_range: Option<String>,
    /// Every header in arrival order, with lowercase names and values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The request body as received (empty for GET and HEAD, whose bodies are not read).
    pub body: Bytes,
}

impl RecordedRequest {
    /// Returns the first value of the header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header_name, _)| header_name.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// True when the request is a validation: it carries `If-Range`, `If-None-Match` or
    /// `If-Modified-Since`.
    pub fn is_conditional(&self) -> bool {
        self.if_range.is_some()
            || self.header("if-none-match").is_some()
            || self.header("if-modified-since").is_some()
    }
}

/// A running mock origin. Dropping it shuts the server down, as [`MockOrigin::shutdown`] does.
pub struct MockOrigin {
    local_address: SocketAddr,
    shared: Arc<OriginShared>,
    accept_loop: JoinHandle<()>,
}

impl MockOrigin {
    /// Starts the server on 127.0.0.1:0 in a tokio task on the current runtime.
    ///
    /// # Panics
    ///
    /// Panics when called outside a tokio runtime or when the loopback listener cannot be bound,
    /// because a test cannot proceed without its origin.
    pub async fn start() -> MockOrigin {
        Self::start_on("127.0.0.1").await
    }

    /// Like [`MockOrigin::start`], on another loopback address (`127.0.0.10`, say), for tests
    /// where `127.0.0.1` must not be an origin.
    pub async fn start_on(ip: &str) -> MockOrigin {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("mock origin: binding a loopback port failed");
        let local_address = listener
            .local_addr()
            .expect("mock origin: reading the bound address failed");
        let shared = Arc::new(OriginShared::default());
        let accept_loop = tokio::spawn(run_accept_loop(listener, Arc::clone(&shared)));
        MockOrigin {
            local_address,
            shared,
            accept_loop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.local_address
    }

    /// Returns `http://127.0.0.1:PORT` (or the address given to `start_on`), without a trailing
    /// slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_address)
    }

    /// Adds or replaces the object served at `path` with default (well-behaved) [`Behaviour`].
    ///
    /// `path` is the path only, e.g. `/files/a.bin`; the query string of requests is ignored for
    /// lookup but recorded. The ETag is derived from the content (see [`etag_for_content`]),
    /// `Last-Modified` is [`MOCK_LAST_MODIFIED`] and `Content-Type` is [`MOCK_CONTENT_TYPE`].
    /// Replacing an object starts its byte fetch counts afresh at zero.
    pub fn put(&self, path: &str, body: Bytes) {
        self.put_with(path, body, Behaviour::default());
    }

    /// Same as [`MockOrigin::put`], with the given behaviour.
    pub fn put_with(&self, path: &str, body: Bytes, behaviour: Behaviour) {
        // The digest is computed before taking the lock because hashing a large object takes a
        // while and requests for other objects should not stall behind it.
        let etag = etag_for_content(&body);
        let mut state = self.shared.lock_state();
        let object_id = state.next_object_id;
        state.next_object_id += 1;
        let fetch_counts = ByteFetchCounter::new(body.len() as u64);
        state.objects.insert(
            path.to_owned(),
            StoredObject {
                object_id,
                content: body,
                etag,
                behaviour,
                fetch_counts,
            },
        );
    }

    /// Changes the behaviour of the object at `path` without replacing its content, so that its
    /// ETag and fetch counts are kept. Returns false when there is no such object.
    pub fn set_behaviour(&self, path: &str, behaviour: Behaviour) -> bool {
        match self.shared.lock_state().objects.get_mut(path) {
            Some(object) => {
                object.behaviour = behaviour;
                true
            }
            None => false,
        }
    }

    /// Removes the object at `path`; later requests for it get 404.
    pub fn remove(&self, path: &str) {
        self.shared.lock_state().objects.remove(path);
    }

    /// Returns the current ETag of the object at `path`, quotes included.
    pub fn etag(&self, path: &str) -> Option<String> {
        self.shared
            .lock_state()
            .objects
            .get(path)
            .map(|object| object.etag.clone())
    }

    /// Every request seen, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock_state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock_state().requests.len()
    }

    /// Total body bytes the origin has sent (for all requests, error bodies included).
    pub fn bytes_sent(&self) -> u64 {
        self.shared.lock_state().body_bytes_sent
    }

    /// For the object at `path`: how many times each byte has been sent in a response body so far.
    /// The length of the vector is the length of the object, and it is empty for an unknown path.
    ///
    /// This expands the counts to one `u32` per byte, which is 4 GiB for a 1 GiB object; prefer
    /// [`MockOrigin::fetch_count_segments`] or the minimum and maximum helpers for large objects.
    pub fn byte_fetch_counts(&self, path: &str) -> Vec<u32> {
        self.shared
            .lock_state()
            .objects
            .get(path)
            .map(|object| object.fetch_counts.expand_to_per_byte_counts())
            .unwrap_or_default()
    }

    /// The fetch counts of the object at `path` as maximal runs of bytes sharing a count, in order
    /// of offset, covering the whole object. Empty for an unknown path or an empty object.
    pub fn fetch_count_segments(&self, path: &str) -> Vec<(Range<u64>, u32)> {
        self.shared
            .lock_state()
            .objects
            .get(path)
            .map(|object| object.fetch_counts.segments())
            .unwrap_or_default()
    }

    /// The maximum of [`MockOrigin::byte_fetch_counts`] (0 for never fetched, unknown or empty).
    pub fn max_fetches_of_any_byte(&self, path: &str) -> u32 {
        self.shared
            .lock_state()
            .objects
            .get(path)
            .map(|object| object.fetch_counts.maximum_count())
            .unwrap_or(0)
    }

    /// The minimum of [`MockOrigin::byte_fetch_counts`] (0 for unknown or empty objects). A value of
    /// at least 1 means every byte of the object has been sent at least once.
    pub fn min_fetches_of_any_byte(&self, path: &str) -> u32 {
        self.shared
            .lock_state()
            .objects
            .get(path)
            .map(|object| object.fetch_counts.minimum_count())
            .unwrap_or(0)
    }

    /// Forgets the recorded requests, the total of body bytes sent and the byte fetch counts of
    /// every object. Objects and their behaviours are kept.
    pub fn reset_counters(&self) {
        let mut state = self.shared.lock_state();
        state.requests.clear();
        state.body_bytes_sent = 0;
        for object in state.objects.values_mut() {
            object.fetch_counts.reset();
        }
    }

    /// Stops accepting and closes (aborts) all connections; used to simulate an origin that went
    /// away. Responses in flight end abruptly and no request is answered afterwards, although a
    /// connection attempt may still be accepted by the kernel and then closed without an answer.
    pub fn shutdown(&self) {
        // The flag is set under the same lock the accept loop holds while registering a new
        // connection, so every connection is either registered before this point, and aborted
        // below, or sees the flag and is dropped unanswered.
        let mut connections = self.shared.lock_connections();
        connections.shut_down = true;
        self.accept_loop.abort();
        for connection_task in connections.tasks.drain(..) {
            connection_task.abort();
        }
    }
}

impl Drop for MockOrigin {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for MockOrigin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MockOrigin")
            .field("local_address", &self.local_address)
            .finish_non_exhaustive()
    }
}

/// State shared by the handle, the accept loop, the connection tasks and the response bodies.
#[derive(Default)]
struct OriginShared {
    state: Mutex<OriginState>,
    connections: Mutex<ConnectionRegistry>,
}

impl OriginShared {
    /// Locks the state, ignoring poisoning: a panicking test thread must not turn every later
    /// assertion of other tests sharing the origin into a confusing poison error.
    fn lock_state(&self) -> MutexGuard<'_, OriginState> {
        lock(&self.state)
    }

    fn lock_connections(&self) -> MutexGuard<'_, ConnectionRegistry> {
        lock(&self.connections)
    }

    /// Accounts for `length` body bytes handed to hyper, which then owns their transmission. When
    /// they are bytes of an object still at `path` in the same version, its fetch counts go up.
    fn record_body_bytes_sent(&self, object: Option<&ObjectIdentity>, offset: u64, length: u64) {
        let mut state = self.lock_state();
        state.body_bytes_sent += length;
        if let Some(identity) = object {
            if let Some(stored) = state.objects.get_mut(&identity.path) {
                // A response that started before the object was replaced must not count against
                // the new content, which may have a different length.
                if stored.object_id == identity.object_id {
                    stored
                        .fetch_counts
                        .record_sent_range(offset, offset + length);
                }
            }
        }
    }
}

#[derive(Default)]
struct OriginState {
    objects: HashMap<String, StoredObject>,
    requests: Vec<RecordedRequest>,
    body_bytes_sent: u64,
    next_object_id: u64,
}

struct StoredObject {
    /// Distinguishes successive versions stored at the same path.
    object_id: u64,
    content: Bytes,
    etag: String,
    behaviour: Behaviour,
    fetch_counts: ByteFetchCounter,
}

#[derive(Default)]
struct ConnectionRegistry {
    shut_down: bool,
    tasks: Vec<AbortHandle>,
}

/// Which stored object a response body is made of, for counting its bytes.
#[derive(Clone, Debug)]
struct ObjectIdentity {
    path: String,
    object_id: u64,
}

/// Counts how many times each byte of an object has been sent, as a piecewise-constant function:
/// each key is the first offset of a run of bytes sharing the count stored as its value, and the run
/// extends to the next key or to the end of the object. Adjacent runs never share a count. This keeps
/// counting a 1 GiB object streamed in 512 KiB chunks cheap, where a counter per byte would take
/// 4 GiB and a billion increments.
#[derive(Clone, Debug)]
struct ByteFetchCounter {
    object_length: u64,
    run_counts_by_start: BTreeMap<u64, u32>,
}

impl ByteFetchCounter {
    fn new(object_length: u64) -> Self {
        let mut counter = ByteFetchCounter {
            object_length,
            run_counts_by_start: BTreeMap::new(),
        };
        counter.reset();
        counter
    }

    fn reset(&mut self) {
        self.run_counts_by_start.clear();
        if self.object_length > 0 {
            self.run_counts_by_start.insert(0, 0);
        }
    }

    /// Returns the count of the run containing `offset`, which must be inside the object.
    fn count_at(&self, offset: u64) -> u32 {
        self.run_counts_by_start
            .range(..=offset)
            .next_back()
            .map(|(_, count)| *count)
            .unwrap_or(0)
    }

    /// Makes `offset` the start of a run, so that a range update can begin or end there.
    fn split_run_at(&mut self, offset: u64) {
        if offset == 0 || offset >= self.object_length {
            return;
        }
        if !self.run_counts_by_start.contains_key(&offset) {
            let count = self.count_at(offset);
            self.run_counts_by_start.insert(offset, count);
        }
    }

    /// Removes the run boundary at `offset` when the runs on both sides have the same count.
    fn merge_runs_at(&mut self, offset: u64) {
        if offset == 0 || offset >= self.object_length {
            return;
        }
        if let Some(&count_from_offset) = self.run_counts_by_start.get(&offset) {
            if self.count_at(offset - 1) == count_from_offset {
                self.run_counts_by_start.remove(&offset);
            }
        }
    }

    /// Adds one to the count of every byte in `start..end` (clamped to the object).
    fn record_sent_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.object_length);
        if start >= end {
            return;
        }
        self.split_run_at(start);
        self.split_run_at(end);
        for (_, count) in self.run_counts_by_start.range_mut(start..end) {
            *count = count.saturating_add(1);
        }
        // Boundaries strictly inside the range separated different counts before and still do,
        // so only the two ends can have become redundant.
        self.merge_runs_at(start);
        self.merge_runs_at(end);
    }

    fn segments(&self) -> Vec<(Range<u64>, u32)> {
        let mut runs: Vec<(Range<u64>, u32)> = Vec::with_capacity(self.run_counts_by_start.len());
        let mut starts = self.run_counts_by_start.iter().peekable();
        while let Some((&start, &count)) = starts.next() {
            let end = starts
                .peek()
                .map(|(&next_start, _)| next_start)
                .unwrap_or(self.object_length);
            runs.push((start..end, count));
        }
        runs
    }

    fn expand_to_per_byte_counts(&self) -> Vec<u32> {
        let length = usize::try_from(self.object_length)
            .expect("mock origin: object too large to expand per byte on this platform");
        let mut counts = Vec::with_capacity(length);
        for (run, count) in self.segments() {
            counts.resize(run.end as usize, count);
        }
        counts
    }

    fn maximum_count(&self) -> u32 {
        self.run_counts_by_start
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    fn minimum_count(&self) -> u32 {
        self.run_counts_by_start
            .values()
            .copied()
            .min()
            .unwrap_or(0)
    }
}

async fn run_accept_loop(listener: TcpListener, shared: Arc<OriginShared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer_address)) => stream,
            // Accept errors on loopback are transient (for example running out of file
            // descriptors for a moment); giving up would turn them into confusing test failures
            // far from their cause, so the loop yields and tries again.
            Err(_) => {
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Small responses and headers must not wait for Nagle's algorithm, which would add
        // latency that header-delay tests could mistake for the configured delay.
        let _ = stream.set_nodelay(true);

        let mut connections = shared.lock_connections();
        if connections.shut_down {
            return;
        }
        connections.tasks.retain(|task| !task.is_finished());
        let connection_task = tokio::spawn(serve_connection(stream, Arc::clone(&shared)));
        connections.tasks.push(connection_task.abort_handle());
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<OriginShared>) {
    let flush_signal = Arc::new(FlushSignal::default());
    let connection_io = TokioIo::new(FlushSignallingStream {
        inner: stream,
        flush_signal: Arc::clone(&flush_signal),
    });
    let service =
        service_fn(move |request| respond(Arc::clone(&shared), Arc::clone(&flush_signal), request));
    // Errors are expected here: deliberate aborts, clients that hang up, and the lying lengths all
    // end connections uncleanly, and the client side of the test is where they are asserted.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(connection_io, service)
        .await;
}

/// Counts completed flushes of one connection and wakes response bodies waiting for one.
///
/// hyper only flushes the underlying stream after its own write buffer has been written out
/// completely, so a flush that completes after a body chunk was handed to hyper proves that the
/// chunk has reached the socket. Bodies that abort the connection on purpose wait for such a flush
/// first; otherwise the abort would discard whatever hyper still buffered and the client would get
/// fewer bytes than the test configured and the fetch counts claim.
#[derive(Default)]
struct FlushSignal {
    state: Mutex<FlushSignalState>,
}

#[derive(Default)]
struct FlushSignalState {
    completed_flushes: u64,
    waiting_bodies: Vec<Waker>,
}

impl FlushSignal {
    fn lock(&self) -> MutexGuard<'_, FlushSignalState> {
        lock(&self.state)
    }

    fn completed_flushes(&self) -> u64 {
        self.lock().completed_flushes
    }

    fn record_completed_flush(&self) {
        let waiting_bodies = {
            let mut state = self.lock();
            state.completed_flushes += 1;
            std::mem::take(&mut state.waiting_bodies)
        };
        for waker in waiting_bodies {
            waker.wake();
        }
    }

    /// Returns ready once a flush has completed after `baseline` was read, registering the waker
    /// otherwise. Checking and registering under one lock closes the race with a concurrent flush.
    fn poll_flushed_since(&self, baseline: u64, context: &mut Context<'_>) -> Poll<()> {
        let mut state = self.lock();
        if state.completed_flushes > baseline {
            return Poll::Ready(());
        }
        if !state
            .waiting_bodies
            .iter()
            .any(|waker| waker.will_wake(context.waker()))
        {
            state.waiting_bodies.push(context.waker().clone());
        }
        Poll::Pending
    }
}

/// The TCP stream of one connection, reporting completed flushes to its [`FlushSignal`].
struct FlushSignallingStream {
    inner: TcpStream,
    flush_signal: Arc<FlushSignal>,
}

impl AsyncRead for FlushSignallingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl AsyncWrite for FlushSignallingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(context, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        // Forwarded so that hyper keeps queueing body chunks and writing them with writev instead
        // of copying them into one flat buffer, which matters for throughput.
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flush_result = Pin::new(&mut self.inner).poll_flush(context);
        if let Poll::Ready(Ok(())) = flush_result {
            self.flush_signal.record_completed_flush();
        }
        flush_result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

/// Everything about a stored object that answering one request needs, copied out of the lock.
struct ObjectSnapshot {
    identity: ObjectIdentity,
    content: Bytes,
    etag: String,
    behaviour: Behaviour,
}

impl ObjectSnapshot {
    /// The representation `request` negotiates among the object's [`Behaviour::encodings`].
    fn in_coding_for(mut self, request: &Request<Incoming>) -> ObjectSnapshot {
        if self.behaviour.encodings.is_empty() {
            return self;
        }
        self.behaviour
            .headers
            .push(("vary", "Accept-Encoding".to_owned()));
        let accepted: Vec<String> = request
            .headers()
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter(|item| !item.replace(' ', "").contains(";q=0"))
            .map(|item| {
                item.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .collect();
        let chosen = self
            .behaviour
            .encodings
            .iter()
            .find(|(coding, _)| accepted.iter().any(|token| token == coding))
            .cloned();
        if let Some((coding, bytes)) = chosen {
            self.etag = etag_for_content(&bytes);
            self.content = bytes;
            self.behaviour
                .headers
                .push(("content-encoding", coding.to_owned()));
        }
        self
    }
}

async fn respond(
    shared: Arc<OriginShared>,
    flush_signal: Arc<FlushSignal>,
    request: Request<Incoming>,
) -> Result<Response<MockResponseBody>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(respond_to_other_method(shared, flush_signal, request).await);
    }
    let recorded_request = record_request(&request);
    let snapshot = {
        let mut state = shared.lock_state();
        state.requests.push(recorded_request.clone());
        state
            .objects
            .get(&recorded_request.path)
            .map(|object| ObjectSnapshot {
                identity: ObjectIdentity {
                    path: recorded_request.path.clone(),
                    object_id: object.object_id,
                },
                content: object.content.clone(),
                etag: object.etag.clone(),
                behaviour: object.behaviour.clone(),
            })
    };

    let snapshot = snapshot.map(|snapshot| snapshot.in_coding_for(&request));
    let Some(snapshot) = snapshot else {
        let body_sender = BodySender::new(shared, flush_signal, None, 0);
        return Ok(short_text_response(
            StatusCode::NOT_FOUND,
            "mock origin: no object at this path\n",
            body_sender,
        ));
    };

    if let Some(header_delay) = snapshot.behaviour.header_delay {
        tokio::time::sleep(header_delay).await;
    }

    if let Some(status_code) = snapshot.behaviour.status_override {
        let status = StatusCode::from_u16(status_code)
            .expect("mock origin: status_override must be a valid HTTP status code");
        let body_sender = BodySender::new(shared, flush_signal, None, 0);
        let text = format!("mock origin: status override {status_code}\n");
        let mut response = short_text_response(status, &text, body_sender);
        add_behaviour_headers(&mut response, &snapshot.behaviour);
        return Ok(response);
    }

    let is_head = request.method() == Method::HEAD;
    if !is_head && request.method() != Method::GET {
        let body_sender = BodySender::new(shared, flush_signal, None, 0);
        let mut response = short_text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "mock origin: only GET and HEAD are supported\n",
            body_sender,
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }

    if is_not_modified(&snapshot, &recorded_request) {
        // A conditional request whose validator matches: 304 with the validators and the
        // object's extra headers (so a test changing them sees a revalidation refresh them).
        let mut response = Response::new(MockResponseBody::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let headers = response.headers_mut();
        insert_validators(headers, &snapshot.etag);
        for (name, value) in &snapshot.behaviour.headers {
            headers.append(
                *name,
                HeaderValue::from_str(value).expect("mock origin: header values are valid text"),
            );
        }
        return Ok(response);
    }
    let plan = plan_object_response(
        &snapshot,
        recorded_request.range.as_deref(),
        recorded_request.if_range.as_deref(),
    );
    Ok(build_object_response(
        plan,
        snapshot,
        is_head,
        BodySender::new(shared, flush_signal, None, 0),
    ))
}

/// Answers `POST`, `PUT`, `PATCH`, `DELETE`, `OPTIONS` and anything else that is not GET or
/// HEAD, after reading the whole body (recorded with the request). An object's
/// `status_override` wins; otherwise `PUT` replaces the object with the body (as
/// [`MockOrigin::put`] does, keeping its behaviour) and answers `201` or `204`, `DELETE` removes
/// it (`204`, or `404` when there is none), `OPTIONS` answers `204` with `Allow`, and `POST` and
/// `PATCH` answer `200` with a text naming the method, the length and the content type received.
/// The object's `headers` are added to every answer but `OPTIONS`'s.
async fn respond_to_other_method(
    shared: Arc<OriginShared>,
    flush_signal: Arc<FlushSignal>,
    request: Request<Incoming>,
) -> Response<MockResponseBody> {
    use http_body_util::BodyExt;
    let mut recorded_request = record_request(&request);
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    recorded_request.body = body.clone();
    let path = recorded_request.path.clone();
    let method = recorded_request.method.clone();
    let (existing_behaviour, status) = {
        let mut state = shared.lock_state();
        state.requests.push(recorded_request.clone());
        let existing_behaviour = state
            .objects
            .get(&path)
            .map(|object| object.behaviour.clone());
        let overridden = existing_behaviour
            .as_ref()
            .and_then(|behaviour| behaviour.status_override);
        let status = match (overridden, method.as_str()) {
            (Some(code), _) => code,
            (None, "PUT") => {
                let etag = etag_for_content(&body);
                let object_id = state.next_object_id;
                state.next_object_id += 1;
                let fetch_counts = ByteFetchCounter::new(body.len() as u64);
                let replaced = state.objects.insert(
                    path.clone(),
                    StoredObject {
                        object_id,
                        content: body.clone(),
                        etag,
                        behaviour: existing_behaviour.clone().unwrap_or_default(),
                        fetch_counts,
                    },
                );
                if replaced.is_some() {
                    204
                } else {
                    201
                }
            }
            (None, "DELETE") => {
                if state.objects.remove(&path).is_some() {
                    204
                } else {
                    404
                }
            }
            (None, "OPTIONS") => 204,
            (None, _) => 200,
        };
        (existing_behaviour, status)
    };
    let status =
        StatusCode::from_u16(status).expect("mock origin: status_override must be a valid status");
    let body_sender = BodySender::new(shared, flush_signal, None, 0);
    let text = if status == StatusCode::NO_CONTENT {
        String::new()
    } else {
        let content_type = recorded_request.header("content-type").unwrap_or("-");
        format!(
            "mock origin: {method} of {} bytes ({content_type})\n",
            body.len()
        )
    };
    let mut response = short_text_response(status, &text, body_sender);
    if status == StatusCode::NO_CONTENT {
        response.headers_mut().remove(header::CONTENT_LENGTH);
        response.headers_mut().remove(header::CONTENT_TYPE);
    }
    if method == "OPTIONS" {
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
    } else if let Some(behaviour) = &existing_behaviour {
        add_behaviour_headers(&mut response, behaviour);
    }
    response
}

/// Adds an object's extra [`Behaviour::headers`] to an answer that is not its content.
fn add_behaviour_headers(response: &mut Response<MockResponseBody>, behaviour: &Behaviour) {
    for (name, value) in &behaviour.headers {
        response.headers_mut().append(
            *name,
            HeaderValue::from_str(value).expect("mock origin: header values are valid text"),
        );
    }
}

fn record_request(request: &Request<Incoming>) -> RecordedRequest {
    let header_text = |name: header::HeaderName| {
        request
            .headers()
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    RecordedRequest {
        method: request.method().as_str().to_owned(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(str::to_owned),
        host: header_text(header::HOST).or_else(|| {
            request
                .uri()
                .authority()
                .map(|authority| authority.as_str().to_owned())
        }),
        range: header_text(header::RANGE),
        if_range: header_text(header::IF_RANGE),
        headers,
        body: Bytes::new(),
    }
}

/// Sets the object's `ETag` and the fixed `Last-Modified`.
fn insert_validators(headers: &mut http::HeaderMap, etag: &str) {
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(etag).expect("mock origin: ETag is valid header text"),
    );
    headers.insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static(MOCK_LAST_MODIFIED),
    );
}

/// True when a conditional GET or HEAD names the object's current validator (RFC 9110 §13.1:
/// `If-None-Match` with its ETag, or, without one, `If-Modified-Since` with its fixed date). An
/// object served without validators never matches.
fn is_not_modified(snapshot: &ObjectSnapshot, request: &RecordedRequest) -> bool {
    if snapshot.behaviour.omit_validators {
        return false;
    }
    match request.header("if-none-match") {
        Some(if_none_match) => if_none_match
            .split(',')
            .any(|tag| tag.trim() == snapshot.etag || tag.trim() == "*"),
        None => request.header("if-modified-since") == Some(MOCK_LAST_MODIFIED),
    }
}

/// What to answer for an object, decided from the request headers and the object's behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ObjectResponsePlan {
    /// 200 with the whole object.
    Full,
    /// 206 with the bytes `first..=last` of the object.
    Partial { first: u64, last: u64 },
    /// 416: the single range requested lies outside the object.
    Unsatisfiable,
}

/// A syntactically valid single range, before it is resolved against the object's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SingleByteRange {
    FromTo { first: u64, last: u64 },
    From { first: u64 },
    Suffix { length: u64 },
}

/// Parses a `Range` header holding exactly one byte range. Multiple ranges and anything malformed
/// give `None`, which the origin answers with the full object: RFC 9110 lets a server ignore a
/// `Range` header, and keeping multi-range support out of the mock keeps it simple.
fn parse_single_byte_range(range_header: &str) -> Option<SingleByteRange> {
    let (unit, range_set) = range_header.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || range_set.contains(',') {
        return None;
    }
    let (first_text, last_text) = range_set.trim().split_once('-')?;
    let parse_number = |text: &str| -> Option<u64> {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    };
    match (first_text.trim().is_empty(), last_text.trim().is_empty()) {
        (true, true) => None,
        (true, false) => Some(SingleByteRange::Suffix {
            length: parse_number(last_text)?,
        }),
        (false, true) => Some(SingleByteRange::From {
            first: parse_number(first_text)?,
        }),
        (false, false) => {
            let first = parse_number(first_text)?;
            let last = parse_number(last_text)?;
            // A range whose last byte precedes its first is invalid rather than unsatisfiable.
            (last >= first).then_some(SingleByteRange::FromTo { first, last })
        }
    }
}

fn plan_object_response(
    snapshot: &ObjectSnapshot,
    range_header: Option<&str>,
    if_range_header: Option<&str>,
) -> ObjectResponsePlan {
    if snapshot.behaviour.ignore_range {
        return ObjectResponsePlan::Full;
    }
    let Some(range) = range_header.and_then(parse_single_byte_range) else {
        return ObjectResponsePlan::Full;
    };
    if let Some(validator) = if_range_header {
        // A cache detects a changed object by sending its old validator: only an exact match of
        // the strong ETag (or of the fixed date) keeps the range, anything else gets the whole
        // current object. Weak ETags never match because If-Range requires strong comparison.
        let validator = validator.trim();
        if snapshot.behaviour.omit_validators
            || (validator != snapshot.etag && validator != MOCK_LAST_MODIFIED)
        {
            return ObjectResponsePlan::Full;
        }
    }
    let object_length = snapshot.content.len() as u64;
    let range = match (range, snapshot.behaviour.shift_range) {
        (SingleByteRange::FromTo { first, last }, Some(shift)) => SingleByteRange::FromTo {
            first: (first + shift).min(object_length.saturating_sub(1)),
            last: last + shift,
        },
        (SingleByteRange::From { first }, Some(shift)) => SingleByteRange::From {
            first: (first + shift).min(object_length.saturating_sub(1)),
        },
        (range, _) => range,
    };
    if object_length == 0 {
        return ObjectResponsePlan::Unsatisfiable;
    }
    match range {
        SingleByteRange::FromTo { first, last } if first < object_length => {
            ObjectResponsePlan::Partial {
                first,
                last: last.min(object_length - 1),
            }
        }
        SingleByteRange::From { first } if first < object_length => ObjectResponsePlan::Partial {
            first,
            last: object_length - 1,
        },
        SingleByteRange::Suffix { length } if length > 0 => ObjectResponsePlan::Partial {
            first: object_length.saturating_sub(length),
            last: object_length - 1,
        },
        _ => ObjectResponsePlan::Unsatisfiable,
    }
}

fn build_object_response(
    plan: ObjectResponsePlan,
    snapshot: ObjectSnapshot,
    is_head: bool,
    body_sender: BodySender,
) -> Response<MockResponseBody> {
    let behaviour = &snapshot.behaviour;
    let real_length = snapshot.content.len() as u64;
    let declared_total_length = behaviour.lie_total_len.unwrap_or(real_length);

    let mut response = Response::new(MockResponseBody::empty());
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if !behaviour.omit_validators {
        insert_validators(headers, &snapshot.etag);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(MOCK_CONTENT_TYPE),
    );
    for (name, value) in &behaviour.headers {
        headers.append(
            *name,
            HeaderValue::from_str(value).expect("mock origin: header values are valid text"),
        );
    }

    // `None` as the declared body length means chunked framing.
    let (status, body_content, offset_in_object, declared_body_length) = match plan {
        ObjectResponsePlan::Full => {
            let declared_body_length = (!behaviour.chunked).then_some(declared_total_length);
            (
                StatusCode::OK,
                snapshot.content.clone(),
                0,
                declared_body_length,
            )
        }
        ObjectResponsePlan::Partial { first, last } => {
            headers.insert(
                header::CONTENT_RANGE,
                header_value_from_string(format!("bytes {first}-{last}/{declared_total_length}")),
            );
            let range_content = snapshot.content.slice(first as usize..=last as usize);
            let range_length = last - first + 1;
            let declared_length = match behaviour.content_length_delta {
                Some(delta) => range_length.saturating_add_signed(delta),
                None => range_length,
            };
            (
                StatusCode::PARTIAL_CONTENT,
                range_content,
                first,
                Some(declared_length),
            )
        }
        ObjectResponsePlan::Unsatisfiable => {
            headers.insert(
                header::CONTENT_RANGE,
                header_value_from_string(format!("bytes */{declared_total_length}")),
            );
            (StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new(), 0, Some(0))
        }
    };
    *response.status_mut() = status;

    match declared_body_length {
        Some(length) => {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        None => {
            response.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
    }

    if !is_head {
        let body_sender = BodySender {
            object: Some(snapshot.identity),
            offset_in_object,
            ..body_sender
        };
        *response.body_mut() = MockResponseBody::new(
            corrupt_body(
                body_content,
                offset_in_object,
                behaviour.corrupt_range.as_ref(),
            ),
            declared_body_length,
            behaviour,
            body_sender,
        );
    }
    response
}

/// Inverts the bytes of `body` (which starts at `offset_in_object`) that fall in `corrupt_range`.
/// Copies only when there is something to corrupt, so well-behaved bodies stay zero-copy.
fn corrupt_body(body: Bytes, offset_in_object: u64, corrupt_range: Option<&Range<u64>>) -> Bytes {
    let Some(corrupt_range) = corrupt_range else {
        return body;
    };
    let body_end = offset_in_object + body.len() as u64;
    let start = corrupt_range.start.max(offset_in_object);
    let end = corrupt_range.end.min(body_end);
    if start >= end {
        return body;
    }
    let mut corrupted = body.to_vec();
    for byte in
        &mut corrupted[(start - offset_in_object) as usize..(end - offset_in_object) as usize]
    {
        *byte = !*byte;
    }
    Bytes::from(corrupted)
}

fn header_value_from_string(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("mock origin: generated header values are ASCII")
}

fn short_text_response(
    status: StatusCode,
    text: &str,
    body_sender: BodySender,
) -> Response<MockResponseBody> {
    let content = Bytes::copy_from_slice(text.as_bytes());
    let content_length = content.len() as u64;
    let body = MockResponseBody::new(
        content,
        Some(content_length),
        &Behaviour::default(),
        body_sender,
    );
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(content_length));
    response
}

/// Where the bytes of a response body are accounted and which connection carries them.
struct BodySender {
    shared: Arc<OriginShared>,
    flush_signal: Arc<FlushSignal>,
    object: Option<ObjectIdentity>,
    /// Offset in the object of the first byte of the body.
    offset_in_object: u64,
}

impl BodySender {
    fn new(
        shared: Arc<OriginShared>,
        flush_signal: Arc<FlushSignal>,
        object: Option<ObjectIdentity>,
        offset_in_object: u64,
    ) -> Self {
        BodySender {
            shared,
            flush_signal,
            object,
            offset_in_object,
        }
    }
}

/// How a body ends once its bytes are out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnding {
    /// End of stream: hyper completes the message normally.
    Clean,
    /// Wait until everything sent so far has reached the socket, then fail the body, which makes
    /// hyper close the connection without completing the message.
    AbortAfterFlush { flushes_before_abort: Option<u64> },
}

/// A response body streamed as slices of one [`Bytes`], optionally throttled and optionally ending
/// in a deliberate connection abort.
///
/// Its size hint is deliberately left unknown so that hyper frames the message from the
/// `Content-Length` header the origin sets, which may be a lie, or with chunked encoding when there
/// is no such header.
struct MockResponseBody {
    content: Bytes,
    sent_length: usize,
    chunk_size: usize,
    chunk_delay: Option<Duration>,
    delay_before_next_chunk: Option<Pin<Box<Sleep>>>,
    ending: BodyEnding,
    sender: Option<BodySender>,
}

impl MockResponseBody {
    fn empty() -> Self {
        MockResponseBody {
            content: Bytes::new(),
            sent_length: 0,
            chunk_size: DEFAULT_UNTHROTTLED_CHUNK_SIZE,
            chunk_delay: None,
            delay_before_next_chunk: None,
            ending: BodyEnding::Clean,
            sender: None,
        }
    }

    /// Prepares to send `content` in a message that declares `declared_body_length` bytes (`None`
    /// for chunked framing), applying the throttling, drop and length-lie settings of `behaviour`.
    fn new(
        content: Bytes,
        declared_body_length: Option<u64>,
        behaviour: &Behaviour,
        sender: BodySender,
    ) -> Self {
        let available_length = content.len() as u64;
        let mut length_to_send = available_length;
        let mut abort_at_end = false;
        if let Some(declared_length) = declared_body_length {
            // Sending more than declared would corrupt the next message on a kept-alive
            // connection, and sending less leaves the message incomplete, which only an abort
            // can convey to the client.
            length_to_send = length_to_send.min(declared_length);
            abort_at_end = declared_length > available_length;
        }
        if let Some(drop_limit) = behaviour.drop_after_bytes {
            if drop_limit < length_to_send {
                length_to_send = drop_limit;
                abort_at_end = true;
            }
        }

        let chunk_size = behaviour
            .chunk_size
            .unwrap_or(if behaviour.chunk_delay.is_some() {
                DEFAULT_THROTTLED_CHUNK_SIZE
            } else {
                DEFAULT_UNTHROTTLED_CHUNK_SIZE
            })
            .max(1);
        MockResponseBody {
            content: content.slice(..length_to_send as usize),
            sent_length: 0,
            chunk_size,
            chunk_delay: behaviour.chunk_delay,
            delay_before_next_chunk: None,
            ending: if abort_at_end {
                BodyEnding::AbortAfterFlush {
                    flushes_before_abort: None,
                }
            } else {
                BodyEnding::Clean
            },
            sender: Some(sender),
        }
    }
}

impl Body for MockResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.sent_length < this.content.len() {
            if let Some(delay) = this.delay_before_next_chunk.as_mut() {
                if delay.as_mut().poll(context).is_pending() {
                    return Poll::Pending;
                }
                this.delay_before_next_chunk = None;
            }
            let chunk_end = (this.sent_length + this.chunk_size).min(this.content.len());
            let chunk = this.content.slice(this.sent_length..chunk_end);
            if let Some(sender) = &this.sender {
                // Bytes are counted when hyper takes them, which is before they can reach the
                // client, so a test that has received a byte always sees it counted.
                sender.shared.record_body_bytes_sent(
                    sender.object.as_ref(),
                    sender.offset_in_object + this.sent_length as u64,
                    chunk.len() as u64,
                );
            }
            this.sent_length = chunk_end;
            if let Some(chunk_delay) = this.chunk_delay {
                if this.sent_length < this.content.len() {
                    this.delay_before_next_chunk = Some(Box::pin(tokio::time::sleep(chunk_delay)));
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }

        match &mut this.ending {
            BodyEnding::Clean => Poll::Ready(None),
            BodyEnding::AbortAfterFlush {
                flushes_before_abort,
            } => {
                let Some(sender) = &this.sender else {
                    return Poll::Ready(None);
                };
                // hyper has buffered every chunk yielded so far by the time it polls again, so any
                // flush completing after this point has put all of them on the socket.
                let baseline = *flushes_before_abort
                    .get_or_insert_with(|| sender.flush_signal.completed_flushes());
                match sender.flush_signal.poll_flushed_since(baseline, context) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "mock origin: deliberately aborting the connection mid-body",
                    )))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent_length >= self.content.len() && self.ending == BodyEnding::Clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_parse_and_everything_else_is_ignored() {
        assert_eq!(
            parse_single_byte_range("bytes=0-99"),
            Some(SingleByteRange::FromTo { first: 0, last: 99 })
        );
        assert_eq!(
            parse_single_byte_range("bytes=100-"),
            Some(SingleByteRange::From { first: 100 })
        );
        assert_eq!(
            parse_single_byte_range("bytes=-5"),
            Some(SingleByteRange::Suffix { length: 5 })
        );
        assert_eq!(parse_single_byte_range("bytes=0-1,5-6"), None);
        assert_eq!(parse_single_byte_range("bytes=5-1"), None);
        assert_eq!(parse_single_byte_range("bytes=-"), None);
        assert_eq!(parse_single_byte_range("items=0-1"), None);
        assert_eq!(parse_single_byte_range("bytes=a-1"), None);
        assert_eq!(parse_single_byte_range("bytes=+1-2"), None);
    }

    #[test]
    fn fetch_counter_tracks_overlapping_ranges_and_merges_equal_runs() {
        let mut counter = ByteFetchCounter::new(10);
        assert_eq!(counter.segments(), vec![(0..10, 0)]);
        counter.record_sent_range(2, 5);
        counter.record_sent_range(4, 8);
        assert_eq!(
            counter.expand_to_per_byte_counts(),
            vec![0, 0, 1, 1, 2, 1, 1, 1, 0, 0]
        );
        counter.record_sent_range(0, 2);
        counter.record_sent_range(8, 100);
        counter.record_sent_range(4, 5);
        // Every byte is now at 1 except byte 4, which was sent three times.
        assert_eq!(counter.segments(), vec![(0..4, 1), (4..5, 3), (5..10, 1)]);
        assert_eq!(counter.maximum_count(), 3);
        assert_eq!(counter.minimum_count(), 1);
        counter.reset();
        assert_eq!(counter.segments(), vec![(0..10, 0)]);
    }

    #[test]
    fn fetch_counter_stays_compact_for_sequential_chunks() {
        let mut counter = ByteFetchCounter::new(1 << 30);
        let chunk = 512 * 1024;
        for start in (0..(1_u64 << 30)).step_by(chunk) {
            counter.record_sent_range(start, start + chunk as u64);
        }
        assert_eq!(counter.segments(), vec![(0..(1 << 30), 1)]);
    }

    #[test]
    fn corruption_inverts_only_the_overlap_with_the_body() {
        let body = Bytes::from_static(&[0, 1, 2, 3]);
        assert_eq!(corrupt_body(body.clone(), 100, Some(&(0..50))), body);
        assert_eq!(corrupt_body(body.clone(), 100, None), body);
        assert_eq!(
            corrupt_body(body, 100, Some(&(102..200))).as_ref(),
            [0, 1, !2, !3]
        );
    }

    #[test]
    fn empty_object_has_no_counts() {
        let mut counter = ByteFetchCounter::new(0);
        counter.record_sent_range(0, 10);
        assert!(counter.segments().is_empty());
        assert!(counter.expand_to_per_byte_counts().is_empty());
        assert_eq!(counter.maximum_count(), 0);
    }
}
