//! Fills: fetching missing slices from the origin once, storing them, and letting any number of
//! clients stream the bytes while they arrive (read-while-write).
//!
//! - **Discovery.** The first request for an unknown object sends one ranged request upstream
//!   for the slices it needs, and learns the object's length and validators from the answer.
//!   Concurrent requests for the same unknown object wait for that one discovery instead of
//!   sending their own.
//! - **Runs.** A request that needs missing slices of a known object claims every missing slice
//!   in its range, groups them into runs of adjacent slices (merging runs separated by a few
//!   stored slices), and fetches each run with one upstream range request.
//! - **Slice buffers.** Each claimed slice gets a [`SliceBuffer`] in the object's slice table.
//!   The fill appends origin chunks to it as they arrive and wakes its readers; a reader never
//!   waits for a whole slice. A finished slice is written to disk in the background and then
//!   marked stored.
//! - **Failure.** If the origin stops early, lies about the range, or turns out to have changed
//!   the content, every unfinished slice of the fill is failed: its readers end their responses
//!   with an error (never a clean end), and nothing of it is stored.
//!
//! A fill is a spawned task: it continues when the client that started it disconnects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{watch, Semaphore};

use crate::error::OriginError;
use crate::freshness::{self, Freshness, NotStorable};
use crate::index::{ObjectEntry, SliceTable};
use crate::key::CacheKey;
use crate::node::Node;
use crate::range::{parse_content_range, ContentRange};
use crate::router::Route;
use crate::store::{unix_now, ObjectMeta};

/// Headers of an origin response that are stored and replayed to clients, besides the
/// validators and `Content-Type`, which have their own fields.
const REPLAYED_HEADERS: [header::HeaderName; 4] = [
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::CONTENT_DISPOSITION,
    header::CONTENT_LANGUAGE,
];

/// How many bytes of finished slices of one fill may wait for their disk write before the fill
/// stops reading from the origin. This bounds memory when the disk is slower than the network,
/// while letting short bursts of a fast origin run ahead of the disk.
const PENDING_WRITE_BYTES_PER_FILL: u64 = 64 * 1024 * 1024;

#[derive(Debug)]
enum BufferState {
    Filling,
    Complete,
    Failed(OriginError),
}

#[derive(Debug)]
struct BufferInner {
    chunks: Vec<Bytes>,
    filled: u64,
    state: BufferState,
}

/// The bytes of one slice while it is being filled, shared by the fill and its readers.
#[derive(Debug)]
pub struct SliceBuffer {
    expected_len: u64,
    inner: Mutex<BufferInner>,
    changed: watch::Sender<()>,
}

/// What a reader gets from a slice buffer.
#[derive(Debug)]
pub enum BufferRead {
    /// Bytes of the requested window.
    Data(Bytes),
    /// The requested window has been read completely.
    End,
    /// The fill failed; the response must be aborted.
    Failed(OriginError),
}

impl SliceBuffer {
    /// Creates an empty buffer for a slice of `expected_len` bytes.
    pub fn new(expected_len: u64) -> SliceBuffer {
        SliceBuffer {
            expected_len,
            inner: Mutex::new(BufferInner {
                chunks: Vec::new(),
                filled: 0,
                state: BufferState::Filling,
            }),
            changed: watch::channel(()).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BufferInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends bytes; returns true when the slice is now complete.
    fn append(&self, chunk: Bytes) -> bool {
        let complete = {
            let mut inner = self.lock();
            inner.filled += chunk.len() as u64;
            inner.chunks.push(chunk);
            let complete = inner.filled >= self.expected_len;
            if complete {
                inner.state = BufferState::Complete;
            }
            complete
        };
        self.changed.send_replace(());
        complete
    }

    fn fail(&self, error: OriginError) {
        {
            let mut inner = self.lock();
            if matches!(inner.state, BufferState::Filling) {
                inner.state = BufferState::Failed(error);
            }
        }
        self.changed.send_replace(());
    }

    fn chunks(&self) -> Vec<Bytes> {
        self.lock().chunks.clone()
    }

    /// Waits until the buffer holds at least one byte, is complete, or has failed. Returns the
    /// failure, if any. Used to decide a response's status before committing to it.
    pub async fn wait_started(&self) -> Result<(), OriginError> {
        let mut receiver = self.changed.subscribe();
        loop {
            receiver.borrow_and_update();
            {
                let inner = self.lock();
                match &inner.state {
                    BufferState::Failed(error) => return Err(error.clone()),
                    BufferState::Complete => return Ok(()),
                    BufferState::Filling if inner.filled > 0 || self.expected_len == 0 => {
                        return Ok(())
                    }
                    BufferState::Filling => {}
                }
            }
            if receiver.changed().await.is_err() {
                return Err(OriginError::Body("fill was abandoned".into()));
            }
        }
    }

    /// Starts reading bytes `window_start..window_end` (slice-relative) as they arrive.
    pub fn reader(self: &Arc<Self>, window_start: u64, window_end: u64) -> SliceReader {
        SliceReader {
            receiver: self.changed.subscribe(),
            buffer: self.clone(),
            next_chunk: 0,
            position: 0,
            window_start,
            window_end,
        }
    }
}

/// A cursor over one slice buffer that yields the bytes of a window as they arrive.
#[derive(Debug)]
pub struct SliceReader {
    buffer: Arc<SliceBuffer>,
    receiver: watch::Receiver<()>,
    next_chunk: usize,
    /// Slice-relative offset of the start of `next_chunk`.
    position: u64,
    window_start: u64,
    window_end: u64,
}

impl SliceReader {
    /// The next bytes of the window, waiting for the fill when none are available yet.
    pub async fn next(&mut self) -> BufferRead {
        loop {
            if self.position >= self.window_end {
                return BufferRead::End;
            }
            self.receiver.borrow_and_update();
            {
                let inner = self.buffer.lock();
                if let Some(chunk) = inner.chunks.get(self.next_chunk) {
                    let chunk = chunk.clone();
                    drop(inner);
                    let chunk_start = self.position;
                    let chunk_end = chunk_start + chunk.len() as u64;
                    self.next_chunk += 1;
                    self.position = chunk_end;
                    let from = self.window_start.max(chunk_start);
                    let to = self.window_end.min(chunk_end);
                    if from < to {
                        return BufferRead::Data(
                            chunk.slice((from - chunk_start) as usize..(to - chunk_start) as usize),
                        );
                    }
                    continue;
                }
                match &inner.state {
                    BufferState::Failed(error) => return BufferRead::Failed(error.clone()),
                    BufferState::Complete => {
                        return BufferRead::Failed(OriginError::Protocol(
                            "slice completed short of the requested window".into(),
                        ))
                    }
                    BufferState::Filling => {}
                }
            }
            if self.receiver.changed().await.is_err() {
                return BufferRead::Failed(OriginError::Body("fill was abandoned".into()));
            }
        }
    }
}

/// Why an object could not be looked up or discovered.
#[derive(Debug, Clone)]
pub enum DiscoverError {
    /// The origin failed or answered with something other than content.
    Origin(OriginError),
    /// The content cannot be stored (no length, or the origin's `Cache-Control` forbids it);
    /// requests for it are passed through uncached.
    NotStorable(NotStorable),
}

type DiscoveryOutcome = Result<Arc<ObjectEntry>, DiscoverError>;

/// Coalesces discoveries of unknown objects, one per key at a time.
#[derive(Debug, Default)]
pub struct Discoveries {
    pending: Mutex<HashMap<CacheKey, watch::Receiver<Option<DiscoveryOutcome>>>>,
}

/// The slices a discovery should fetch: `first..=last`, or `first..` to the end when `last` is
/// `None`.
#[derive(Debug, Clone, Copy)]
pub struct SliceSpan {
    /// First slice index.
    pub first: u64,
    /// Last slice index, inclusive; `None` means through the end of the object.
    pub last: Option<u64>,
}

/// Returns the current entry for the route's key, discovering the object from the origin if the
/// index does not know it. Concurrent callers for one key share one discovery.
pub async fn lookup_or_discover(
    node: &Arc<Node>,
    route: &Route,
    span: SliceSpan,
) -> DiscoveryOutcome {
    let key = route.cache_key();
    let mut receiver = {
        let mut pending = node
            .discoveries
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = node.index.get(&key) {
            return Ok(entry);
        }
        if let Some(reason) = node.uncacheable.get(&key) {
            return Err(DiscoverError::NotStorable(reason));
        }
        match pending.get(&key) {
            Some(receiver) => receiver.clone(),
            None => {
                let (sender, receiver) = watch::channel(None);
                pending.insert(key.clone(), receiver.clone());
                let node = node.clone();
                let route = route.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let outcome = discover(&node, &route, &key, span).await;
                    // The entry is in the index before the pending marker goes, so a new request
                    // always finds one or the other.
                    let mut pending = node
                        .discoveries
                        .pending
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    pending.remove(&key);
                    sender.send_replace(Some(outcome));
                });
                receiver
            }
        }
    };
    let waited = receiver
        .wait_for(Option::is_some)
        .await
        .map(|outcome| outcome.clone().expect("waited for Some"));
    match waited {
        Ok(outcome) => outcome,
        Err(_) => {
            // The discovery task died without answering (a panic). Drop its marker so the next
            // request starts a fresh discovery instead of waiting on a dead channel.
            let mut pending = node
                .discoveries
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if pending
                .get(&key)
                .is_some_and(|current| current.same_channel(&receiver))
            {
                pending.remove(&key);
            }
            Err(DiscoverError::Origin(OriginError::Body(
                "discovery was abandoned".into(),
            )))
        }
    }
}

/// A validated origin response carrying object bytes.
struct OriginBody {
    length: u64,
    headers: HeaderMap,
    /// Absolute offset of the first body byte.
    body_start: u64,
    /// Absolute offset one past the last body byte.
    body_end: u64,
    body: Option<Incoming>,
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
}

/// Sends a ranged request for absolute bytes `first..=last` (or `first..` when `last` is None)
/// and checks that the answer is what was asked for.
async fn fetch_range(
    node: &Node,
    route: &Route,
    first: u64,
    last: Option<u64>,
    if_range: Option<String>,
) -> Result<OriginBody, DiscoverError> {
    let range = match last {
        Some(last) => format!("bytes={first}-{last}"),
        None => format!("bytes={first}-"),
    };
    let response = node
        .fetch_origin(route, Method::GET, Some(range), if_range)
        .await
        .map_err(DiscoverError::Origin)?;
    let (parts, body) = response.into_parts();
    let protocol = |message: String| DiscoverError::Origin(OriginError::Protocol(message));
    match parts.status {
        StatusCode::PARTIAL_CONTENT => {
            let content_range = header_text(&parts.headers, header::CONTENT_RANGE)
                .and_then(|value| parse_content_range(&value));
            let Some(ContentRange::Bytes {
                first: got_first,
                last: got_last,
                complete_len: Some(length),
            }) = content_range
            else {
                return Err(protocol("206 without a usable Content-Range".into()));
            };
            let wanted_last = last.unwrap_or(u64::MAX).min(length.saturating_sub(1));
            if got_first != first || got_last != wanted_last {
                return Err(protocol(format!(
                    "asked for bytes {first}-{wanted_last}, got {got_first}-{got_last}"
                )));
            }
            if let Some(declared) = content_length(&parts.headers) {
                if declared != got_last - got_first + 1 {
                    return Err(protocol(format!(
                        "Content-Length {declared} contradicts Content-Range {got_first}-{got_last}"
                    )));
                }
            }
            Ok(OriginBody {
                length,
                headers: parts.headers,
                body_start: got_first,
                body_end: got_last + 1,
                body: Some(body),
            })
        }
        StatusCode::OK => {
            let Some(length) = content_length(&parts.headers) else {
                return Err(DiscoverError::NotStorable(NotStorable::NoLength));
            };
            Ok(OriginBody {
                length,
                headers: parts.headers,
                body_start: 0,
                body_end: length,
                body: Some(body),
            })
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            match header_text(&parts.headers, header::CONTENT_RANGE)
                .and_then(|value| parse_content_range(&value))
            {
                Some(ContentRange::Unsatisfied { complete_len }) => Ok(OriginBody {
                    length: complete_len,
                    headers: parts.headers,
                    body_start: 0,
                    body_end: 0,
                    body: None,
                }),
                _ => Err(protocol("416 without Content-Range: bytes */length".into())),
            }
        }
        status => Err(DiscoverError::Origin(OriginError::Status(status.as_u16()))),
    }
}

fn meta_from_response(
    node: &Node,
    key: &CacheKey,
    origin: &OriginBody,
    freshness: Freshness,
) -> ObjectMeta {
    let extra_headers = REPLAYED_HEADERS
        .iter()
        .filter_map(|name| {
            header_text(&origin.headers, name.clone())
                .map(|value| (name.as_str().to_owned(), value))
        })
        .collect();
    ObjectMeta {
        key: key.as_str().to_owned(),
        generation: rand::random(),
        length: origin.length,
        slice_len: node.slice_len,
        etag: header_text(&origin.headers, header::ETAG),
        last_modified: header_text(&origin.headers, header::LAST_MODIFIED),
        content_type: header_text(&origin.headers, header::CONTENT_TYPE),
        extra_headers,
        stored_at_unix: unix_now(),
        fresh_for_secs: freshness.to_secs(),
    }
}

async fn discover(
    node: &Arc<Node>,
    route: &Route,
    key: &CacheKey,
    span: SliceSpan,
) -> DiscoveryOutcome {
    let first_byte = span.first * node.slice_len;
    let last_byte = span
        .last
        .map(|last| last * node.slice_len + node.slice_len - 1);
    let mut origin = match fetch_range(node, route, first_byte, last_byte, None).await {
        // A first byte past the end is answered 416 with the length; that is enough to index
        // the object (the client's own range is then judged against it).
        Ok(origin) => origin,
        Err(DiscoverError::NotStorable(reason)) => return Err(not_storable(node, key, reason)),
        Err(error) => {
            node.stats.origin_errors.inc();
            return Err(error);
        }
    };
    // Nothing is sized from a declared length above storage.max_object_size.
    node.check_object_size(key, origin.length)
        .map_err(DiscoverError::Origin)?;
    let freshness = match freshness::judge(&origin.headers, route.target.policy.cache_control) {
        Ok(freshness) => freshness,
        // The body is dropped unread, which closes that origin connection.
        Err(reason) => return Err(not_storable(node, key, reason)),
    };
    let meta = meta_from_response(node, key, &origin, freshness);
    let meta_json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
    let meta_path = node.layout.meta_path(key, meta.generation);
    if let Err(error) = node
        .storage
        .write_file_atomic(meta_path, vec![Bytes::from(meta_json)], node.fsync)
        .await
    {
        // The content is still served from the fill; without metadata its slices are orphans
        // that the next start-up deletes.
        node.stats.disk_write_errors.inc();
        tracing::warn!(key = key.as_str(), %error, "could not store object metadata");
    }
    let entry = Arc::new(ObjectEntry::new(meta));
    let owned = claim_slices(&entry, origin.body_start, origin.body_end);
    node.index.insert(entry.clone());
    if let Some(body) = origin.body.take() {
        spawn_fill(node.clone(), entry.clone(), body, origin.body_start, owned);
    }
    Ok(entry)
}

/// Remembers content the node may not store, so requests for it go straight to the origin until
/// `upstream.revalidate_after` has passed.
fn not_storable(node: &Node, key: &CacheKey, reason: NotStorable) -> DiscoverError {
    tracing::debug!(
        key = key.as_str(),
        %reason,
        "not storable; passing requests through"
    );
    node.uncacheable.insert(key.clone(), reason);
    DiscoverError::NotStorable(reason)
}

/// Claims every slice overlapping absolute bytes `start..end` that is neither stored nor being
/// filled, creating its buffer. Returns the claimed buffers by slice index.
fn claim_slices(entry: &ObjectEntry, start: u64, end: u64) -> BTreeMap<u64, Arc<SliceBuffer>> {
    let mut owned = BTreeMap::new();
    if start >= end {
        return owned;
    }
    let slice_len = entry.meta.slice_len;
    let mut table = entry.table();
    for index in start / slice_len..=(end - 1) / slice_len {
        let stored = table.present.get(index).unwrap_or(true);
        if stored || table.inflight.contains_key(&index) {
            continue;
        }
        let buffer = Arc::new(SliceBuffer::new(entry.meta.slice_length(index)));
        table.inflight.insert(index, buffer.clone());
        owned.insert(index, buffer);
    }
    owned
}

/// Makes sure every slice in `first..=last` is stored or being filled, starting fills for the
/// missing ones: one upstream request per run of missing slices, where runs separated by at most
/// `merge_gap_slices` stored slices count as one run.
pub fn ensure_filling(
    node: &Arc<Node>,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    first: u64,
    last: u64,
) {
    let missing: Vec<u64> = {
        let table = entry.table();
        (first..=last)
            .filter(|index| {
                !table.present.get(*index).unwrap_or(true) && !table.inflight.contains_key(index)
            })
            .collect()
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for index in missing {
        match runs.last_mut() {
            Some((_, run_last)) if index - *run_last <= node.merge_gap_slices + 1 => {
                *run_last = index
            }
            _ => runs.push((index, index)),
        }
    }
    for (run_first, run_last) in runs {
        let slice_len = entry.meta.slice_len;
        let start = run_first * slice_len;
        let end = (run_last * slice_len + slice_len).min(entry.meta.length);
        let owned = claim_slices(entry, start, end);
        // Trim the request to the slices actually claimed: another request may have claimed
        // the edges since the missing list was taken.
        let (Some(&claimed_first), Some(&claimed_last)) =
            (owned.keys().next(), owned.keys().next_back())
        else {
            continue;
        };
        let node = node.clone();
        let route = route.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            run_fill(node, route, entry, claimed_first, claimed_last, owned).await;
        });
    }
}

/// What checking a stored version against the origin found.
#[derive(Debug)]
pub enum Revalidation {
    /// The version is current (or was checked recently enough): serve it.
    Fresh,
    /// The origin has another version, or no longer has the content; the stored version was
    /// dropped from the index, so a new lookup discovers what the origin has now.
    Changed,
    /// The origin could not be asked; the stored version is served as it is.
    Unreachable(OriginError),
}

/// Checks a stored version with the origin when it was last confirmed more than
/// `upstream.revalidate_after` ago: a one-byte range request with `If-Range` set to the version's
/// validator. Concurrent requests for the same version wait for one check.
pub async fn revalidate_if_stale(
    node: &Node,
    route: &Route,
    entry: &Arc<ObjectEntry>,
) -> Revalidation {
    if !entry.needs_revalidation(route.target.policy.revalidate_after) {
        return Revalidation::Fresh;
    }
    let _checking = entry.revalidation.lock().await;
    if entry.is_removed() {
        return Revalidation::Changed;
    }
    if !entry.needs_revalidation(route.target.policy.revalidate_after) {
        return Revalidation::Fresh;
    }
    if node
        .unreachable_origins
        .contains_key(&route.target.upstream_base)
    {
        // The origin did not answer a moment ago: serve what is stored without waiting for
        // another timeout.
        return Revalidation::Unreachable(OriginError::Connect(format!(
            "{} was unreachable moments ago",
            route.target.upstream_base
        )));
    }
    node.stats.revalidations.inc();
    let validator = if_range_validator(&entry.meta);
    let answer = fetch_range(node, route, 0, Some(0), validator).await;
    // `Some(freshness)` when the origin confirmed this version and still lets it be stored.
    let confirmed = match answer {
        Ok(mut origin) => {
            if let Some(body) = origin.body.take() {
                // A byte (or, from an origin ignoring Range, the whole object): drain it within
                // the idle timeout so the pooled connection can be reused, or drop it.
                let _ = tokio::time::timeout(node.idle_read_timeout, body.collect()).await;
            }
            let same_version = entry.meta.same_version(
                origin.length,
                header_text(&origin.headers, header::ETAG).as_deref(),
                header_text(&origin.headers, header::LAST_MODIFIED).as_deref(),
            );
            match freshness::judge(&origin.headers, route.target.policy.cache_control) {
                Ok(freshness) if same_version => Some(freshness),
                Ok(_) => None,
                // Maybe the same bytes, but the origin now forbids storing them: not a version
                // change, so neither counted nor logged as one.
                Err(reason) => {
                    not_storable(node, &entry.key, reason);
                    node.index.remove(entry);
                    return Revalidation::Changed;
                }
            }
        }
        // Gone (404, 410...) or no longer sliceable: what the origin has now is not this.
        Err(
            DiscoverError::Origin(OriginError::Status(400..=499)) | DiscoverError::NotStorable(_),
        ) => None,
        Err(DiscoverError::Origin(error)) => {
            node.stats.origin_errors.inc();
            tracing::warn!(key = entry.key.as_str(), %error, "cannot revalidate; serving the stored version");
            if matches!(
                error,
                OriginError::Connect(_) | OriginError::FirstByteTimeout(_)
            ) {
                node.unreachable_origins
                    .insert(route.target.upstream_base.clone(), ());
            }
            return Revalidation::Unreachable(error);
        }
    };
    if let Some(freshness) = confirmed {
        entry.mark_validated_for(freshness);
        Revalidation::Fresh
    } else {
        node.stats.version_changes.inc();
        tracing::info!(
            key = entry.key.as_str(),
            "origin content changed; dropping the stored version"
        );
        node.index.remove(entry);
        Revalidation::Changed
    }
}

/// The strongest validator of a stored version, for `If-Range` on later fills: a strong ETag,
/// or else Last-Modified.
fn if_range_validator(meta: &ObjectMeta) -> Option<String> {
    match &meta.etag {
        Some(etag) if !etag.starts_with("W/") => Some(etag.clone()),
        _ => meta.last_modified.clone(),
    }
}

async fn run_fill(
    node: Arc<Node>,
    route: Route,
    entry: Arc<ObjectEntry>,
    first_slice: u64,
    last_slice: u64,
    owned: BTreeMap<u64, Arc<SliceBuffer>>,
) {
    let slice_len = entry.meta.slice_len;
    let first_byte = first_slice * slice_len;
    let last_byte = (last_slice * slice_len + slice_len).min(entry.meta.length) - 1;
    let validator = if_range_validator(&entry.meta);
    let origin = fetch_range(&node, &route, first_byte, Some(last_byte), validator).await;
    let failure = match origin {
        Ok(mut origin) => {
            let same_version = entry.meta.same_version(
                origin.length,
                header_text(&origin.headers, header::ETAG).as_deref(),
                header_text(&origin.headers, header::LAST_MODIFIED).as_deref(),
            );
            match origin.body.take() {
                Some(body) if same_version => {
                    // An origin that ignores Range sends everything: keep all of it.
                    let mut owned = owned;
                    if origin.body_start < first_byte {
                        owned.extend(claim_slices(&entry, origin.body_start, origin.body_end));
                    }
                    stream_into_slices(&node, &entry, body, origin.body_start, owned).await;
                    return;
                }
                _ if !same_version => {
                    node.stats.version_changes.inc();
                    tracing::info!(
                        key = entry.key.as_str(),
                        "origin content changed; dropping the stored version"
                    );
                    node.index.remove(&entry);
                    OriginError::VersionChanged
                }
                _ => OriginError::Protocol("origin sent no body".into()),
            }
        }
        Err(DiscoverError::Origin(error)) => error,
        Err(DiscoverError::NotStorable(reason)) => {
            OriginError::Protocol(format!("origin content is no longer storable ({reason})"))
        }
    };
    node.stats.origin_errors.inc();
    fail_slices(&entry, owned.into_iter(), failure);
}

fn spawn_fill(
    node: Arc<Node>,
    entry: Arc<ObjectEntry>,
    body: Incoming,
    body_start: u64,
    owned: BTreeMap<u64, Arc<SliceBuffer>>,
) {
    tokio::spawn(async move {
        stream_into_slices(&node, &entry, body, body_start, owned).await;
    });
}

/// Removes `buffer`'s claim on slice `index`, if the table still holds that very buffer (a newer
/// fill may have claimed the slice since).
fn release_claim(table: &mut SliceTable, index: u64, buffer: &Arc<SliceBuffer>) {
    if table
        .inflight
        .get(&index)
        .is_some_and(|current| Arc::ptr_eq(current, buffer))
    {
        table.inflight.remove(&index);
    }
}

/// Fails every given slice that is still filling and releases its claim, so a later request
/// fetches it again.
fn fail_slices(
    entry: &ObjectEntry,
    slices: impl Iterator<Item = (u64, Arc<SliceBuffer>)>,
    error: OriginError,
) {
    let mut table = entry.table();
    for (index, buffer) in slices {
        buffer.fail(error.clone());
        release_claim(&mut table, index, &buffer);
    }
}

/// Streams an origin body into the owned slice buffers, storing each finished slice.
async fn stream_into_slices(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    mut body: Incoming,
    body_start: u64,
    mut owned: BTreeMap<u64, Arc<SliceBuffer>>,
) {
    let slice_len = entry.meta.slice_len;
    let Some(&last_owned) = owned.keys().next_back() else {
        return;
    };
    let stop_at = (last_owned * slice_len + slice_len).min(entry.meta.length);
    let write_slots = Arc::new(Semaphore::new(
        (PENDING_WRITE_BYTES_PER_FILL / slice_len).max(2) as usize,
    ));
    let mut offset = body_start;
    let idle_timeout = node.idle_read_timeout;
    let failure = loop {
        if offset >= stop_at {
            break None;
        }
        let frame = match tokio::time::timeout(idle_timeout, body.frame()).await {
            Err(_) => break Some(OriginError::IdleTimeout(idle_timeout)),
            Ok(None) => {
                break Some(OriginError::Body(format!(
                    "body ended at byte {offset} of {stop_at}"
                )))
            }
            Ok(Some(Err(error))) => {
                break Some(OriginError::Body(crate::origin::error_chain(&error)))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        node.stats.origin_bytes.inc_by(data.len() as u64);
        while !data.is_empty() && offset < stop_at {
            let index = offset / slice_len;
            let slice_end = ((index + 1) * slice_len).min(entry.meta.length);
            let take = (slice_end - offset).min(data.len() as u64) as usize;
            let part = data.split_to(take);
            offset += take as u64;
            let Some(buffer) = owned.get(&index) else {
                continue;
            };
            if buffer.append(part) {
                let buffer = owned.remove(&index).expect("buffer is owned");
                let permit = write_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                let node = node.clone();
                let entry = entry.clone();
                tokio::spawn(async move {
                    persist_slice(&node, &entry, index, &buffer).await;
                    drop(permit);
                });
            }
        }
    };
    if let Some(error) = failure {
        node.stats.origin_errors.inc();
        tracing::warn!(key = entry.key.as_str(), %error, "fill failed; unfinished slices are dropped");
        fail_slices(entry, owned.into_iter(), error);
    }
}

/// Writes a finished slice to disk and marks it stored. On a disk error the slice is released
/// (its readers already have the bytes) and will be fetched again by a later request.
async fn persist_slice(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    index: u64,
    buffer: &Arc<SliceBuffer>,
) {
    if entry.is_removed() {
        entry.table().inflight.remove(&index);
        return;
    }
    // Hashes first: a slice marked stored then always has its piece hashes, and a slice the disk
    // refuses still gets them (its bytes passed validation all the same).
    if let Some(peering) = &node.peering {
        crate::pieces::record_slice(node, entry, peering.piece_len, index, buffer.chunks()).await;
    }
    let path = node
        .layout
        .slice_path(&entry.key, entry.meta.generation, index);
    match node
        .storage
        .write_file_atomic(path.clone(), buffer.chunks(), node.fsync)
        .await
    {
        Ok(()) => {
            node.stats.slices_stored.inc();
            if !node.index.mark_slice_stored(entry, index) {
                // The object was evicted or replaced while this slice was written.
                let _ = std::fs::remove_file(&path);
            }
        }
        Err(error) => {
            node.stats.disk_write_errors.inc();
            if error.is_disk_full() {
                tracing::warn!(
                    key = entry.key.as_str(),
                    "disk full: slice served but not stored"
                );
            } else {
                tracing::warn!(key = entry.key.as_str(), %error, "slice could not be stored");
            }
            release_claim(&mut entry.table(), index, buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_get_their_window_as_chunks_arrive() {
        let buffer = Arc::new(SliceBuffer::new(10));
        let mut early = buffer.reader(2, 8);
        let writer = buffer.clone();
        let feeder = tokio::spawn(async move {
            for chunk in [&b"abc"[..], b"def", b"ghij"] {
                writer.append(Bytes::copy_from_slice(chunk));
                tokio::task::yield_now().await;
            }
        });
        let mut collected = Vec::new();
        loop {
            match early.next().await {
                BufferRead::Data(bytes) => collected.extend_from_slice(&bytes),
                BufferRead::End => break,
                BufferRead::Failed(error) => panic!("{error}"),
            }
        }
        feeder.await.unwrap();
        assert_eq!(collected, b"cdefgh");
        // A reader that joins after completion reads from memory too.
        let mut late = buffer.reader(0, 10);
        let mut all = Vec::new();
        while let BufferRead::Data(bytes) = late.next().await {
            all.extend_from_slice(&bytes);
        }
        assert_eq!(all, b"abcdefghij");
    }

    #[tokio::test]
    async fn a_failed_fill_fails_its_readers_instead_of_ending_cleanly() {
        let buffer = Arc::new(SliceBuffer::new(10));
        buffer.append(Bytes::from_static(b"abc"));
        let mut reader = buffer.reader(0, 10);
        assert!(matches!(reader.next().await, BufferRead::Data(_)));
        buffer.fail(OriginError::Body("reset".into()));
        assert!(matches!(reader.next().await, BufferRead::Failed(_)));
        assert!(buffer.wait_started().await.is_err());
    }
}
