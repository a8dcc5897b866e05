//! Fills: fetching missing slices from the origin once, storing them, and letting any number of
//! clients stream the bytes while they arrive (read-while-write).
//!
//! - **Discovery.** The first request for an unknown object sends one ranged request upstream
//!   for the slices it needs, and learns the object's length and validators from the answer.
//!   Concurrent requests for the same unknown object wait for that one discovery instead of
//!   sending their own.
//! - **Runs.** A request that needs missing slices of a known object groups them into runs of
//!   adjacent slices (merging runs separated by a few stored slices), and fetches each run with
//!   one upstream range request. A run is reserved in the object's slice table as one range;
//!   its fill claims slices only a window ahead of the bytes it reads ([`CLAIM_WINDOW_SLICES`]),
//!   so nothing is sized from the length an origin declares. A reader that reaches a reserved
//!   slice before its fill does waits on a planned buffer the fill takes over.
//! - **Slice buffers.** Each claimed slice gets a [`SliceBuffer`] in the object's slice table.
//!   The fill appends origin chunks to it as they arrive and wakes its readers; a reader never
//!   waits for a whole slice. A finished slice is written to disk in the background and then
//!   marked stored.
//! - **Failure.** If the origin stops early, lies about the range, or turns out to have changed
//!   the content, every unfinished slice of the fill is failed: its readers end their responses
//!   with an error (never a clean end), and nothing of it is stored.
//! - **Demand.** A response registers a [`Demand`] on the slices it will read (one range). A fill is a
//!   spawned task and outlives the client that started it, but only so far: entering each new
//!   slice it checks that some response (or a prefill) still wants one of its remaining slices,
//!   and otherwise stops, dropping the origin response and releasing the rest of its claims, so a
//!   client that asks for a whole object and leaves costs the slice it was reading, not the
//!   object. Objects up to `fill.finish_objects_up_to` are finished anyway.
//! - **Limits.** Every fill waits for a turn and reserves memory for each slice before taking
//!   its bytes; requests that start fills take a slot of their client address
//!   (see [`crate::cache::fill_limits`]).
//! - **Versions.** Slices of one object fetched by different requests are only put together when
//!   the object has a validator the origin checks (`If-Range` with a strong ETag or
//!   Last-Modified). A validator-less object keeps what its first fill brought, and missing slices
//!   are refused ([`FillRefused::NoValidator`]) rather than spliced in from another request.
//! - **Encodings.** An answer with a `Content-Encoding` is never stored: its bytes are not the
//!   resource's. The request is relayed instead, header and all.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{oneshot, Semaphore};

use crate::cache::discovery::DiscoveryWaiter;
pub use crate::cache::discovery::{DiscoverError, DiscoveryOutcome};
use crate::cache::fill_limits::{ClientSlot, FillSlot};
pub use crate::cache::fill_limits::{FillRefused, Requester};
use crate::cache::freshness::{self, Freshness, NotStorable};
pub use crate::cache::index::Demand;
use crate::cache::index::{ObjectEntry, SliceTable};
use crate::cache::key::CacheKey;
pub use crate::cache::slice_buffer::{BufferRead, Claims, SliceBuffer, SliceReader};
use crate::cache::store::{unix_now, ObjectMeta};
use crate::error::OriginError;
use crate::http::range::{parse_content_range, ContentRange};
use crate::node::Node;
use crate::upstream::router::Route;

/// Headers of an origin response that are stored and replayed to clients, besides the
/// validators and `Content-Type`, which have their own fields.
const REPLAYED_HEADERS: [header::HeaderName; 4] = [
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::CONTENT_DISPOSITION,
    header::CONTENT_LANGUAGE,
];

/// How many bytes of finished slices of one fill may wait for their disk write before the fill
/// stops reading from the origin, so one fill against a slow disk cannot take the whole memory
/// budget (`fill.max_memory`) from the others while letting short bursts run ahead of the disk.
const PENDING_WRITE_BYTES_PER_FILL: u64 = 64 * 1024 * 1024;

/// The most body bytes a revalidation reads (to let the pooled connection be reused). It asks for
/// one byte; an origin that ignores the range and sends the object has its connection dropped.
const REVALIDATION_BODY_MAX: u64 = 64 << 10;

/// How many slices a fill claims (gives a [`SliceBuffer`]) ahead of the byte it is reading.
/// The rest of its run is only reserved, as one range, so what a fill holds follows what is
/// in flight, never the length an origin declares.
const CLAIM_WINDOW_SLICES: u64 = 64;

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
/// index does not know it. Concurrent callers for one key share one discovery. The caller that
/// started the discovery also gets the [`Demand`] on the slices it claimed, so the fill keeps
/// going for it until it registers its own.
pub async fn lookup_or_discover(
    node: &Arc<Node>,
    route: &Route,
    span: SliceSpan,
    requester: &Requester,
) -> Result<(Arc<ObjectEntry>, Demand), DiscoverError> {
    let key = route.cache_key();
    let mut client_slot: Option<Arc<ClientSlot>> = None;
    let (waiter, own_demand) = loop {
        match look_up_or_start(node, route, &key, span, &mut client_slot) {
            Lookup::Found(entry) => return Ok((entry, Demand::default())),
            Lookup::NotStorable(reason) => return Err(DiscoverError::NotStorable(reason)),
            Lookup::Waiting(waiter, own_demand) => break (waiter, own_demand),
            // A discovery is a cold fill of this client's: take its slot first (maybe waiting),
            // outside the lock, then look again.
            Lookup::NeedsSlot => {
                let slot = requester
                    .slot(&node.fill_limits)
                    .await
                    .map_err(DiscoverError::Refused)?;
                client_slot = Some(slot);
            }
        }
    };
    let outcome = waiter.outcome().await;
    // The demand was sent before the outcome was published.
    let demand = own_demand
        .and_then(|mut receiver| receiver.try_recv().ok())
        .unwrap_or_default();
    outcome.map(|entry| (entry, demand))
}

/// What [`look_up_or_start`] found.
enum Lookup {
    Found(Arc<ObjectEntry>),
    NotStorable(NotStorable),
    /// A discovery is running; the demand receiver is there when this caller started it.
    Waiting(DiscoveryWaiter, Option<oneshot::Receiver<Demand>>),
    /// A discovery must start, and the caller has no client slot for it yet.
    NeedsSlot,
}

/// Under the discoveries lock: the indexed entry, the uncacheable verdict, the running
/// discovery, or a new discovery started with `client_slot` (taken from it).
fn look_up_or_start(
    node: &Arc<Node>,
    route: &Route,
    key: &CacheKey,
    span: SliceSpan,
    client_slot: &mut Option<Arc<ClientSlot>>,
) -> Lookup {
    let mut discoveries = node.discoveries.lock();
    if let Some(entry) = node.index.get(key) {
        return Lookup::Found(entry);
    }
    if let Some(reason) = node.uncacheable.get(key) {
        return Lookup::NotStorable(reason);
    }
    if let Some(waiter) = discoveries.waiter(key) {
        return Lookup::Waiting(waiter, None);
    }
    let Some(slot) = client_slot.take() else {
        return Lookup::NeedsSlot;
    };
    let (permit, waiter) = discoveries.start(key);
    let (demand_sender, demand_receiver) = oneshot::channel();
    let node = node.clone();
    let route = route.clone();
    let key = key.clone();
    tokio::spawn(async move {
        // The entry is in the index before the permit is finished, so a new request always
        // finds one or the other; if this task dies first, the permit frees the key itself.
        let outcome = discover(&node, &route, &key, span, slot, demand_sender).await;
        permit.finish(outcome);
    });
    Lookup::Waiting(waiter, Some(demand_receiver))
}

/// Refuses a discovered object whose declared length is above `storage.max_object_size`,
/// before anything is sized from it.
fn check_object_size(node: &Node, key: &CacheKey, length: u64) -> Result<(), OriginError> {
    if length <= node.max_object_size {
        return Ok(());
    }
    node.stats.objects_refused_too_large.inc();
    tracing::warn!(
        key = key.as_str(),
        length,
        max_object_size = node.max_object_size,
        "origin declares an object longer than storage.max_object_size; refused"
    );
    Err(OriginError::TooLarge {
        length,
        max: node.max_object_size,
    })
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

/// True when the body carries a `Content-Encoding` other than `identity`.
fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("unreadable").split(','))
        .any(|coding| {
            let coding = coding.trim();
            !coding.is_empty() && !coding.eq_ignore_ascii_case("identity")
        })
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
        .client
        .fetch(route.fetch_request(Method::GET, Some(range), if_range))
        .await
        .map_err(DiscoverError::Origin)?;
    let (parts, body) = response.into_parts();
    let protocol = |message: String| DiscoverError::Origin(OriginError::Protocol(message));
    if matches!(parts.status, StatusCode::OK | StatusCode::PARTIAL_CONTENT)
        && is_encoded(&parts.headers)
    {
        // The body is dropped unread, which closes that origin connection.
        node.stats.encoded_responses.inc();
        return Err(DiscoverError::NotStorable(NotStorable::Encoded));
    }
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
    client_slot: Arc<ClientSlot>,
    demand_sender: oneshot::Sender<Demand>,
) -> DiscoveryOutcome {
    let fill_slot = node.fill_limits.start_fill(Some(client_slot)).await;
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
    check_object_size(node, key, origin.length).map_err(DiscoverError::Origin)?;
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
    let (run, demand) = {
        let mut table = entry.table();
        let run = Run::claim(&mut table, &entry.meta, origin.body_start, origin.body_end);
        let mut demand = Demand::default();
        if let Some(run) = &run {
            demand.register(&entry, &mut table, run.first, run.last, false);
        }
        (run, demand)
    };
    // The requester that started this discovery keeps the fill going until it registers its
    // own demand; if it left meanwhile, the demand is dropped here.
    let _ = demand_sender.send(demand);
    node.index.insert(entry.clone());
    if let (Some(body), Some(run)) = (origin.body.take(), run) {
        let node = node.clone();
        let entry = entry.clone();
        let body_start = origin.body_start;
        tokio::spawn(async move {
            stream_into_slices(&node, &entry, body, body_start, run, fill_slot).await;
        });
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

/// The slices one fill fetches: `first..=last`. It claims (gives a buffer to) the slices it is
/// about to fill, at most [`CLAIM_WINDOW_SLICES`] ahead, and reserves the rest in the table.
#[derive(Debug)]
struct Run {
    id: u64,
    first: u64,
    last: u64,
    /// The claimed slices not finished yet.
    owned: BTreeMap<u64, Arc<SliceBuffer>>,
}

impl Run {
    /// Reserves the slices overlapping absolute bytes `start..end` for a new fill and claims the
    /// first window of them. `None` for an empty range.
    fn claim(table: &mut SliceTable, meta: &ObjectMeta, start: u64, end: u64) -> Option<Run> {
        if start >= end {
            return None;
        }
        let first = start / meta.slice_len;
        let last = (end - 1) / meta.slice_len;
        let id = table.claims.new_id();
        table.claims.reserved.push((id, first, last));
        let mut run = Run {
            id,
            first,
            last,
            owned: BTreeMap::new(),
        };
        run.claim_ahead(table, meta, first);
        Some(run)
    }

    /// Also reserves slices `first..=last`, which come before the run (an origin that ignored
    /// the range sends them too), unless another fill has reserved some of them.
    fn reserve_before(&mut self, table: &mut SliceTable, meta: &ObjectMeta, first: u64, last: u64) {
        let taken = table
            .claims
            .reserved
            .iter()
            .any(|(_, next, to)| *next <= last && *to >= first);
        if first > last || taken {
            return;
        }
        table.claims.reserved.push((self.id, first, last));
        self.claim_ahead(table, meta, first);
    }

    /// Claims the reserved slices up to [`CLAIM_WINDOW_SLICES`] from slice `index` on. A slice
    /// stored or claimed by someone else meanwhile is skipped; one a reader made a planned
    /// buffer for is taken over.
    fn claim_ahead(&mut self, table: &mut SliceTable, meta: &ObjectMeta, index: u64) {
        let upto = index.saturating_add(CLAIM_WINDOW_SLICES - 1);
        let mut position = 0;
        while position < table.claims.reserved.len() {
            let (id, mut next, last) = table.claims.reserved[position];
            if id != self.id {
                position += 1;
                continue;
            }
            while next <= last.min(upto) {
                if !is_stored(table, next) {
                    match table.inflight.get(&next) {
                        Some(buffer) if buffer.planned_by == Some(self.id) => {
                            self.owned.insert(next, buffer.clone());
                        }
                        Some(_) => {}
                        None => {
                            let buffer = Arc::new(SliceBuffer::new(meta.slice_length(next)));
                            table.inflight.insert(next, buffer.clone());
                            self.owned.insert(next, buffer);
                        }
                    }
                }
                next += 1;
            }
            if next > last {
                table.claims.reserved.swap_remove(position);
            } else {
                table.claims.reserved[position].1 = next;
                position += 1;
            }
        }
    }

    /// Ends the run: fails its unfinished slices (and the buffers readers made for its reserved
    /// ones), releases their claims, and drops its reservations.
    fn end(&mut self, table: &mut SliceTable, error: OriginError) {
        for (index, buffer) in std::mem::take(&mut self.owned) {
            buffer.fail(error.clone());
            release_claim(table, index, &buffer);
        }
        let id = self.id;
        table.inflight.retain(|_, buffer| {
            if buffer.planned_by == Some(id) {
                buffer.fail(error.clone());
                false
            } else {
                true
            }
        });
        table.claims.reserved.retain(|(run, _, _)| *run != id);
    }
}

/// If slice `index` is reserved by a fill that has not claimed it yet, gives it a planned buffer
/// that readers wait on and that fill takes over when it gets there.
fn plan_reserved(table: &mut SliceTable, meta: &ObjectMeta, index: u64) {
    if is_stored(table, index) || table.inflight.contains_key(&index) {
        return;
    }
    if let Some((run, _, _)) = table.claims.reservation_of(index) {
        let buffer = SliceBuffer::planned(meta.slice_length(index), run);
        table.inflight.insert(index, Arc::new(buffer));
    }
}

/// True when slice `index` is on disk (an index past the end counts as stored: nothing to fill).
fn is_stored(table: &SliceTable, index: u64) -> bool {
    table.present.get(index).unwrap_or(true)
}

/// True when slices of this version fetched by separate requests are known to be of one version:
/// the origin checks a strong ETag or a Last-Modified sent as `If-Range`. Objects of one slice
/// never need splicing.
pub fn splices_safely(meta: &ObjectMeta) -> bool {
    if_range_validator(meta).is_some() || meta.slice_count() <= 1
}

/// Makes sure every slice in `first..=last` is stored or being filled, starting fills for the
/// missing ones: one upstream request per run of missing slices, where runs separated by at most
/// `merge_gap_slices` stored slices count as one run. Returns the caller's [`Demand`] on the
/// slices being filled; hold it while reading them.
///
/// Starting fills takes a slot of the requester's client (waiting up to `fill.client_wait`).
/// Missing slices of a validator-less object are refused: they could come from another version.
pub async fn ensure_filling(
    node: &Arc<Node>,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    first: u64,
    last: u64,
    requester: &Requester,
) -> Result<Demand, FillRefused> {
    let gap = node.merge_gap_slices;
    let mut demand = Demand::default();
    {
        let mut table = entry.table();
        if missing_runs(&table, first, last, gap).is_empty() {
            plan_reserved(&mut table, &entry.meta, first);
            demand.register(entry, &mut table, first, last, requester.prefill);
            return Ok(demand);
        }
    }
    if !splices_safely(&entry.meta) {
        return Err(FillRefused::NoValidator);
    }
    let client_slot = requester.slot(&node.fill_limits).await?;
    let mut fills = Vec::new();
    {
        let mut table = entry.table();
        let slice_len = entry.meta.slice_len;
        for (run_first, run_last) in missing_runs(&table, first, last, gap) {
            let start = run_first * slice_len;
            let end = (run_last * slice_len + slice_len).min(entry.meta.length);
            fills.extend(Run::claim(&mut table, &entry.meta, start, end));
        }
        plan_reserved(&mut table, &entry.meta, first);
        demand.register(entry, &mut table, first, last, requester.prefill);
    }
    for run in fills {
        let node = node.clone();
        let route = route.clone();
        let entry = entry.clone();
        let client_slot = client_slot.clone();
        tokio::spawn(async move {
            let fill_slot = node.fill_limits.start_fill(Some(client_slot)).await;
            run_fill(node, route, entry, run, fill_slot).await;
        });
    }
    Ok(demand)
}

/// The runs of slices in `first..=last` that are neither stored, claimed nor reserved: runs
/// separated by at most `gap` slices that are stored or claimed count as one; a reserved slice
/// always separates runs (it belongs to another fill). Its size follows the runs found, and it
/// steps over reserved ranges at once.
fn missing_runs(table: &SliceTable, first: u64, last: u64, gap: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut separated = true;
    let mut index = first;
    while index <= last {
        if let Some((_, _, reserved_last)) = table.claims.reservation_of(index) {
            separated = true;
            index = match reserved_last.checked_add(1) {
                Some(next) => next,
                None => break,
            };
            continue;
        }
        if !is_stored(table, index) && !table.inflight.contains_key(&index) {
            match runs.last_mut() {
                Some((_, run_last)) if !separated && index - *run_last <= gap + 1 => {
                    *run_last = index
                }
                _ => runs.push((index, index)),
            }
            separated = false;
        }
        index += 1;
    }
    runs
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
                // The byte asked for is drained (within the idle timeout) so the pooled
                // connection can be reused. From an origin that ignores Range the answer is the
                // whole object: only its headers are needed, and dropping the body unread
                // closes the connection instead of holding the object in memory.
                if origin.body_end - origin.body_start <= REVALIDATION_BODY_MAX {
                    let limited =
                        http_body_util::Limited::new(body, REVALIDATION_BODY_MAX as usize);
                    let _ = tokio::time::timeout(node.idle_read_timeout, limited.collect()).await;
                }
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
        // Never produced by a plain range request; served as stored.
        Err(DiscoverError::Refused(refused)) => {
            return Revalidation::Unreachable(OriginError::Protocol(refused.to_string()))
        }
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
    mut run: Run,
    fill_slot: FillSlot,
) {
    // The turn may have taken a while: the clients that asked may have left meanwhile.
    let (first_slice, last_slice) = (run.first, run.last);
    if !keeps_going(&node, &entry, &mut run, first_slice) {
        return;
    }
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
                    // An origin that ignores Range sends everything: keep what comes before the
                    // run too (it has to be read anyway), up to the end of the run.
                    if origin.body_start < first_byte {
                        run.reserve_before(
                            &mut entry.table(),
                            &entry.meta,
                            origin.body_start / slice_len,
                            first_slice - 1,
                        );
                    }
                    stream_into_slices(&node, &entry, body, origin.body_start, run, fill_slot)
                        .await;
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
            // What the origin sends now may not be stored (an encoding, no-store...): the stored
            // version goes, and requests are relayed from now on.
            tracing::info!(
                key = entry.key.as_str(),
                %reason,
                "origin content is no longer storable; dropping the stored version"
            );
            not_storable(&node, &entry.key, reason);
            node.index.remove(&entry);
            OriginError::VersionChanged
        }
        Err(DiscoverError::Refused(refused)) => OriginError::Protocol(refused.to_string()),
    };
    node.stats.origin_errors.inc();
    run.end(&mut entry.table(), failure);
}

/// Decides, as a fill enters slice `index`, whether it goes on: yes for small objects, and while
/// some response or a prefill wants one of the slices of its run from `index` on. Otherwise the
/// run ends (its claims and reservations are released; a later request fills them) and the fill
/// stops. The decision and the release happen under the table lock that demands register under,
/// so a new reader either keeps the fill going or finds the slices missing and fills them itself.
fn keeps_going(node: &Node, entry: &ObjectEntry, run: &mut Run, index: u64) -> bool {
    if entry.meta.length <= node.fill_limits.finish_objects_up_to {
        return true;
    }
    let mut table = entry.table();
    if table.claims.wanted(index, run.last) {
        return true;
    }
    run.end(&mut table, OriginError::Stopped);
    drop(table);
    node.stats.fills_stopped.inc();
    tracing::debug!(
        key = entry.key.as_str(),
        slice = index,
        "no client wants the rest of this fill; stopping"
    );
    false
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

/// Streams an origin body into the owned slice buffers, storing each finished slice. Entering
/// each slice after the first, it checks that someone still wants the rest ([`keeps_going`]);
/// before taking a slice's first byte it reserves the slice's memory, waiting (and so leaving
/// the origin's bytes in the socket) while the budget is spent.
async fn stream_into_slices(
    node: &Arc<Node>,
    entry: &Arc<ObjectEntry>,
    mut body: Incoming,
    body_start: u64,
    mut run: Run,
    fill_slot: FillSlot,
) {
    let slice_len = entry.meta.slice_len;
    let stop_at = (run.last * slice_len + slice_len).min(entry.meta.length);
    let write_slots = Arc::new(Semaphore::new(
        (PENDING_WRITE_BYTES_PER_FILL / slice_len).max(2) as usize,
    ));
    let first_slice = body_start / slice_len;
    let mut offset = body_start;
    let idle_timeout = node.idle_read_timeout;
    let failure = 'stream: loop {
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
                break Some(OriginError::Body(crate::upstream::origin::error_chain(
                    &error,
                )))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        node.stats.origin_bytes.inc_by(data.len() as u64);
        while !data.is_empty() && offset < stop_at {
            let index = offset / slice_len;
            if offset == index * slice_len {
                if index != first_slice && !keeps_going(node, entry, &mut run, index) {
                    break 'stream None;
                }
                run.claim_ahead(&mut entry.table(), &entry.meta, index);
            }
            let slice_end = ((index + 1) * slice_len).min(entry.meta.length);
            let take = (slice_end - offset).min(data.len() as u64) as usize;
            let part = data.split_to(take);
            offset += take as u64;
            let Some(buffer) = run.owned.get(&index) else {
                continue;
            };
            if !buffer.holds_memory() {
                let reservation = node
                    .fill_limits
                    .reserve_memory(entry.meta.slice_length(index))
                    .await;
                buffer.hold_memory(reservation);
            }
            if buffer.append(part) {
                let buffer = run.owned.remove(&index).expect("buffer is owned");
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
    // The turn ends here, and dropping the body closes an origin connection that still had
    // bytes to send (the rest of an object nobody wants, or an origin that sends too much).
    drop(body);
    drop(fill_slot);
    if let Some(error) = failure {
        node.stats.origin_errors.inc();
        tracing::warn!(key = entry.key.as_str(), %error, "fill failed; unfinished slices are dropped");
        run.end(&mut entry.table(), error);
    } else {
        // Whatever is left (slices of a run that stopped early) is released for a later fill.
        run.end(&mut entry.table(), OriginError::Stopped);
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
    persist_into_store(node, entry, index, buffer).await;
    buffer.release_memory();
}

async fn persist_into_store(
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
        crate::cache::pieces::record_slice(
            &node.piece_store(),
            entry,
            peering.piece_len,
            index,
            buffer.chunks(),
        )
        .await;
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
