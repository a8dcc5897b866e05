//! Discovery: learning an unknown object's length and validators from one ranged origin
//! request, shared by every request that asks for it meanwhile.

use super::*;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::cache::discovery::DiscoveryWaiter;
pub use crate::cache::discovery::{DiscoverError, DiscoveryOutcome};
pub use crate::cache::fill_limits::Requester;
use crate::cache::fill_limits::{ClientSlot, Pace};
use crate::cache::freshness::{self, Freshness, NotStorable, StaleDirectives};
use crate::cache::header_section;
pub use crate::cache::index::Demand;
use crate::cache::index::ObjectEntry;
use crate::cache::key::CacheKey;
use crate::cache::status_answer::{StatusAnswer, MAX_BODY_BYTES};
use crate::cache::store::{unix_now, ObjectMeta, STORE_FORMAT};
use crate::cache::vary::{self, Variant};
use crate::error::OriginError;
use crate::http::range::{parse_content_range, ContentRange};
use crate::node::Node;
use crate::upstream::router::Route;
use outpost_shared::rate::ByteMeter;

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
        match look_up_or_start(node, route, &key, span, &mut client_slot, requester) {
            Lookup::Found(entry) => return Ok((entry, Demand::default())),
            Lookup::NotStorable(reason) => return Err(DiscoverError::NotStorable(reason)),
            Lookup::Answered(answer) => return Err(DiscoverError::Answered { answer, kept: true }),
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

/// The route of the variant a request with `request_headers` selects, when responses for the
/// route's URL are known to vary (see [`crate::cache::vary`]); `Ok(None)` when they are not, or
/// when `route` already selects it. An error when the request's values cannot key a variant:
/// it is relayed uncached.
pub fn select_variant(
    node: &Node,
    route: &Route,
    request_headers: &HeaderMap,
) -> Result<Option<Route>, NotStorable> {
    if !node.vary.in_use() {
        return Ok(None);
    }
    let primary = route.primary_key();
    let Some(names) = node.vary.names(&primary) else {
        return Ok(None);
    };
    let variant =
        Variant::of_request(&names, request_headers).ok_or(NotStorable::TooManyVariants)?;
    // A URL whose variants are all taken is relayed for new ones without a discovery.
    let stored = |key: &CacheKey| node.index.get(key).is_some();
    if !node.vary.has_room(&primary, &variant.key(&primary), stored) {
        return Err(NotStorable::TooManyVariants);
    }
    if route.variant.as_deref() == Some(&variant) {
        return Ok(None);
    }
    Ok(Some(route.with_variant(Some(variant))))
}

/// True when `entry` is a variant other than the one `route` selects: the caller selects again
/// (the discovery that found it has just learned the URL's `Vary`) and looks again.
pub fn other_variant(entry: &ObjectEntry, route: &Route) -> bool {
    !entry.meta.vary.is_empty() && entry.key != route.cache_key()
}

/// The current entry for the route's key, if the index has one; never contacts the origin.
pub fn lookup(node: &Node, route: &Route) -> Option<Arc<ObjectEntry>> {
    node.index.get(&route.cache_key())
}

/// What [`look_up_or_start`] found.
pub(super) enum Lookup {
    Found(Arc<ObjectEntry>),
    NotStorable(NotStorable),
    /// A kept answer other than content (a fresh redirect, `404` or `410`).
    Answered(Arc<StatusAnswer>),
    /// A discovery is running; the demand receiver is there when this caller started it.
    Waiting(DiscoveryWaiter, Option<oneshot::Receiver<Demand>>),
    /// A discovery must start, and the caller has no client slot for it yet.
    NeedsSlot,
}

/// Under the discoveries lock: the indexed entry, the uncacheable verdict, the running
/// discovery, or a new discovery started with `client_slot` (taken from it).
pub(super) fn look_up_or_start(
    node: &Arc<Node>,
    route: &Route,
    key: &CacheKey,
    span: SliceSpan,
    client_slot: &mut Option<Arc<ClientSlot>>,
    requester: &Requester,
) -> Lookup {
    let mut discoveries = node.discoveries.lock();
    if let Some(entry) = node.index.get(key) {
        return Lookup::Found(entry);
    }
    if let Some(reason) = node.uncacheable.get(key) {
        return Lookup::NotStorable(reason);
    }
    if let Some(answer) = node.status_answers.get(key) {
        return Lookup::Answered(answer);
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
    let pace = requester.pace.clone();
    tokio::spawn(async move {
        // The entry is in the index before the permit is finished, so a new request always
        // finds one or the other; if this task dies first, the permit frees the key itself.
        let outcome = discover(&node, &route, &key, span, slot, demand_sender, pace).await;
        permit.finish(outcome);
    });
    Lookup::Waiting(waiter, Some(demand_receiver))
}

/// Refuses a discovered object whose declared length is above `storage.max_object_size`,
/// before anything is sized from it.
pub(super) fn check_object_size(
    node: &Node,
    key: &CacheKey,
    length: u64,
) -> Result<(), OriginError> {
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
pub(super) struct OriginBody {
    pub(super) length: u64,
    pub(super) headers: HeaderMap,
    /// Absolute offset of the first body byte.
    pub(super) body_start: u64,
    /// Absolute offset one past the last body byte.
    pub(super) body_end: u64,
    pub(super) body: Option<Incoming>,
}

pub(super) fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// The response's `Content-Encoding`, every value joined, as stored; `None` without one.
pub(super) fn content_encoding(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(|value| value.to_str().unwrap_or("unreadable"))
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// True when an origin answer describes the stored version `meta`: same length, validators and
/// `Content-Encoding` (bytes of two codings are never put together).
pub(super) fn answers_same_version(meta: &ObjectMeta, origin: &OriginBody) -> bool {
    meta.same_version(
        origin.length,
        header_text(&origin.headers, header::ETAG).as_deref(),
        header_text(&origin.headers, header::LAST_MODIFIED).as_deref(),
    ) && content_encoding(&origin.headers) == meta.content_encoding
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
}

/// A `200` carrying the whole object; without a `Content-Length` the node cannot slice it.
pub(super) fn whole_object_answer(
    headers: HeaderMap,
    body: Incoming,
) -> Result<OriginBody, DiscoverError> {
    let Some(length) = content_length(&headers) else {
        return Err(DiscoverError::NotStorable(NotStorable::NoLength));
    };
    Ok(OriginBody {
        length,
        headers,
        body_start: 0,
        body_end: length,
        body: Some(body),
    })
}

/// What a ranged origin request brought: object bytes, or another answer (unread).
pub(super) enum Fetched {
    Content(OriginBody),
    Other(http::response::Parts, Incoming),
}

/// Sends a ranged request for absolute bytes `first..=last` (or `first..` when `last` is None)
/// and checks that the answer is what was asked for; any status but `200`, `206` and `416` is
/// an [`OriginError::Status`].
pub(super) async fn fetch_range(
    node: &Node,
    route: &Route,
    first: u64,
    last: Option<u64>,
    if_range: Option<String>,
) -> Result<OriginBody, DiscoverError> {
    match fetch_range_or_other(node, route, first, last, if_range).await? {
        Fetched::Content(origin) => Ok(origin),
        Fetched::Other(parts, _) => Err(DiscoverError::Origin(OriginError::Status(
            parts.status.as_u16(),
        ))),
    }
}

/// [`fetch_range`], handing back an answer other than content unread.
pub(super) async fn fetch_range_or_other(
    node: &Node,
    route: &Route,
    first: u64,
    last: Option<u64>,
    if_range: Option<String>,
) -> Result<Fetched, DiscoverError> {
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
        && parts.headers.contains_key(header::CONTENT_ENCODING)
    {
        // Stored as sent: the bytes and their Content-Encoding together.
        node.stats.encoded_responses.inc();
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
            Ok(Fetched::Content(OriginBody {
                length,
                headers: parts.headers,
                body_start: got_first,
                body_end: got_last + 1,
                body: Some(body),
            }))
        }
        StatusCode::OK => whole_object_answer(parts.headers, body).map(Fetched::Content),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            match header_text(&parts.headers, header::CONTENT_RANGE)
                .and_then(|value| parse_content_range(&value))
            {
                Some(ContentRange::Unsatisfied { complete_len }) => {
                    Ok(Fetched::Content(OriginBody {
                        length: complete_len,
                        headers: parts.headers,
                        body_start: 0,
                        body_end: 0,
                        body: None,
                    }))
                }
                _ => Err(protocol("416 without Content-Range: bytes */length".into())),
            }
        }
        _ => Ok(Fetched::Other(parts, body)),
    }
}

/// The metadata of a newly discovered version, with its stored header section; refused when
/// that section is above [`header_section::MAX_STORED_HEADER_BYTES`].
pub(super) fn meta_from_response(
    node: &Node,
    key: &CacheKey,
    origin: &OriginBody,
    freshness: Freshness,
    directives: StaleDirectives,
    vary: &[http::HeaderName],
) -> Result<ObjectMeta, NotStorable> {
    let (stale_while_revalidate_secs, stale_if_error_secs, must_revalidate) =
        directives.to_stored();
    let meta = ObjectMeta {
        format: STORE_FORMAT,
        key: key.as_str().to_owned(),
        generation: rand::random(),
        length: origin.length,
        slice_len: node.slice_len,
        etag: header_text(&origin.headers, header::ETAG),
        last_modified: header_text(&origin.headers, header::LAST_MODIFIED),
        content_type: header_text(&origin.headers, header::CONTENT_TYPE),
        content_encoding: content_encoding(&origin.headers),
        headers: header_section::stored_fields(&origin.headers),
        stored_at_unix: unix_now(),
        confirmed_at_unix: None,
        fresh_for_secs: freshness.to_secs(),
        heuristic_fresh_for_secs: freshness.heuristic_secs(),
        stale_while_revalidate_secs,
        stale_if_error_secs,
        must_revalidate,
        vary: vary.iter().map(|name| name.as_str().to_owned()).collect(),
    };
    let typed = meta.typed_fields();
    let content_type = (header::CONTENT_TYPE, meta.content_type.as_deref());
    let section_bytes = header_section::stored_section_bytes(
        &meta.headers,
        &typed
            .iter()
            .chain([&content_type])
            .map(|(name, value)| (name, *value))
            .collect::<Vec<_>>(),
    );
    if section_bytes > header_section::MAX_STORED_HEADER_BYTES {
        node.stats.objects_refused_headers_too_large.inc();
        tracing::warn!(
            key = key.as_str(),
            section_bytes,
            max = header_section::MAX_STORED_HEADER_BYTES,
            "origin header section too large to store; relayed"
        );
        return Err(NotStorable::HeadersTooLarge);
    }
    Ok(meta)
}

pub(super) async fn discover(
    node: &Arc<Node>,
    route: &Route,
    key: &CacheKey,
    span: SliceSpan,
    client_slot: Arc<ClientSlot>,
    demand_sender: oneshot::Sender<Demand>,
    pace: Option<Pace>,
) -> DiscoveryOutcome {
    let fill_slot = node.fill_limits.start_fill(Some(client_slot)).await;
    let first_byte = span.first * node.slice_len;
    let last_byte = span
        .last
        .map(|last| last * node.slice_len + node.slice_len - 1);
    let mut origin = match fetch_range_or_other(node, route, first_byte, last_byte, None).await {
        // A first byte past the end is answered 416 with the length; that is enough to index
        // the object (the client's own range is then judged against it).
        Ok(Fetched::Content(origin)) => origin,
        Ok(Fetched::Other(parts, body)) => {
            return Err(status_answer(node, route, key, parts, body).await)
        }
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
    let directives = StaleDirectives::of(&origin.headers, route.target.policy.cache_control);
    let vary = match vary::names_of(&origin.headers) {
        Ok(names) => names,
        Err(reason) => return Err(not_storable(node, key, reason)),
    };
    // A varying answer is the variant of what was sent: stored under that variant's key, which
    // may not be the key this discovery ran for (the first request for a URL, before its `Vary`
    // was known). Requests that want another variant look again under their own.
    let variant_key;
    let key = if vary.is_empty() {
        key
    } else {
        let primary = route.primary_key();
        variant_key = Variant::as_sent(&vary, route.variant.as_deref()).key(&primary);
        if !node.vary.learn(&primary, &vary, &variant_key, |stored| {
            node.index.get(stored).is_some()
        }) {
            return Err(not_storable(node, key, NotStorable::TooManyVariants));
        }
        &variant_key
    };
    let meta = match meta_from_response(node, key, &origin, freshness, directives, &vary) {
        Ok(meta) => meta,
        Err(reason) => return Err(not_storable(node, key, reason)),
    };
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
        let mut run = Run::claim(&mut table, &entry.meta, origin.body_start, origin.body_end);
        if let Some(run) = &mut run {
            run.pace = pace.map(|pace| (pace, ByteMeter::default()));
        }
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
        let counted_under = route.target.origin;
        tokio::spawn(async move {
            stream_into_slices(
                &node,
                counted_under,
                &entry,
                body,
                body_start,
                run,
                fill_slot,
            )
            .await;
        });
    }
    Ok(entry)
}

/// Reads an origin's answer other than content (at most [`MAX_BODY_BYTES`] of
/// body, within `upstream.idle_read_timeout`) for every request waiting on this discovery, and
/// keeps it while it is explicitly fresh, when its status may be kept.
async fn status_answer(
    node: &Node,
    route: &Route,
    key: &CacheKey,
    mut parts: http::response::Parts,
    body: Incoming,
) -> DiscoverError {
    let status = parts.status;
    if status.is_server_error() {
        node.stats.origin_errors.inc();
    }
    let declared_too_long =
        content_length(&parts.headers).is_some_and(|length| length > MAX_BODY_BYTES as u64);
    let read = if declared_too_long {
        None
    } else {
        let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
        tokio::time::timeout(node.idle_read_timeout, limited.collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|collected| collected.to_bytes())
    };
    let body = match read {
        Some(body) => body,
        None => {
            // Too long, too slow or broken: the status and headers still go to the client, with
            // a note of the node's instead of the origin's body; never kept.
            parts.headers.remove(header::CACHE_CONTROL);
            parts.headers.remove(header::EXPIRES);
            parts.headers.remove(header::CONTENT_ENCODING);
            parts.headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Bytes::from(format!(
                "origin answered {status}; its body was not relayed (longer than {MAX_BODY_BYTES} \
                 bytes, or not read in time)\n"
            ))
        }
    };
    let answer = Arc::new(StatusAnswer::new(
        status,
        parts.headers,
        body,
        route.target.policy.cache_control,
        node.not_found_max_age,
    ));
    if node.status_answers.keep(key, &answer) {
        node.stats.status_answers_kept.inc();
    }
    let level_warn = status.is_server_error();
    if level_warn {
        tracing::warn!(
            key = key.as_str(),
            status = status.as_u16(),
            "origin failure"
        );
    } else {
        tracing::debug!(
            key = key.as_str(),
            status = status.as_u16(),
            kept_for = ?answer.keep_for,
            "origin answered without content"
        );
    }
    DiscoverError::Answered {
        answer,
        kept: false,
    }
}

/// Remembers content the node may not store, so requests for it go straight to the origin until
/// `upstream.revalidate_after` has passed.
pub(super) fn not_storable(node: &Node, key: &CacheKey, reason: NotStorable) -> DiscoverError {
    tracing::debug!(
        key = key.as_str(),
        %reason,
        "not storable; passing requests through"
    );
    node.uncacheable.insert(key.clone(), reason);
    DiscoverError::NotStorable(reason)
}
