//! Revalidation: asking the origin whether a stored version past its lifetime is still current.

use super::*;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;

pub use crate::cache::discovery::DiscoverError;
use crate::cache::freshness::{self, Check, ClientDirectives, NotStorable, StaleDirectives};
use crate::cache::header_section;
use crate::cache::index::ObjectEntry;
use crate::cache::store::ObjectMeta;
use crate::error::OriginError;
use crate::node::Node;
use crate::upstream::router::Route;

/// The most body bytes a revalidation reads (to let the pooled connection be reused). It asks for
/// one byte; an origin that ignores the range and sends the object has its connection dropped.
pub(super) const REVALIDATION_BODY_MAX: u64 = 64 << 10;

/// What checking a stored version against the origin found.
#[derive(Debug)]
pub enum Revalidation {
    /// The version is current (or was checked recently enough): serve it.
    Fresh,
    /// The version is stale but may be served while it is checked in the background
    /// (`stale-while-revalidate`, or the origin's `serve_stale_while_revalidating`).
    StaleWhileChecking,
    /// The origin has another version, or no longer has the content; the stored version was
    /// dropped from the index, so a new lookup discovers what the origin has now.
    Changed,
    /// The origin could not be asked; the stored version is served as it is (within
    /// `stale-if-error`).
    Unreachable(OriginError),
    /// The origin could not be asked and the version may not be served without a check
    /// (`must-revalidate`, or stale beyond the `stale-if-error` window): the client gets a `504`.
    Failed(OriginError),
}

/// Checks a stored version with the origin when its freshness, the origin's directives and the
/// client's request directives call for it (see [`crate::cache::freshness::check_needed`]).
/// A check for an answer about the whole object (`whole_object`) is a conditional `GET`
/// (`If-None-Match` or `If-Modified-Since`, RFC 9111 §4.3.1) when the version has a validator;
/// otherwise it is a one-byte range request with `If-Range` set to the version's validator. An
/// answer confirming the version refreshes the stored header fields it carries (§4.3.4), in
/// memory and in `meta.json`. Concurrent requests for the same version wait for one check; a
/// request that `arrived` before a check finished is satisfied by it. Within
/// `stale-while-revalidate`, the check runs in the background, one at a time per version, and
/// the stored version is served at once.
pub async fn revalidate_if_stale(
    node: &Arc<Node>,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    client: ClientDirectives,
    arrived: Instant,
    whole_object: bool,
) -> Revalidation {
    let policy = &route.target.policy;
    match entry.check_needed(policy, client) {
        Check::None => return Revalidation::Fresh,
        Check::Background => {
            check_in_background(node, route, entry);
            return Revalidation::StaleWhileChecking;
        }
        Check::Foreground { .. } => {}
    }
    let _checking = entry.revalidation.lock().await;
    if entry.is_removed() {
        return Revalidation::Changed;
    }
    if entry.validated_since(arrived) {
        return Revalidation::Fresh;
    }
    let serve_stale_on_failure = match entry.check_needed(policy, client) {
        Check::None => return Revalidation::Fresh,
        // Became stale while this request waited: it checks now, as it already waits.
        Check::Background => true,
        Check::Foreground {
            serve_stale_on_failure,
        } => serve_stale_on_failure,
    };
    match check_with_origin(node, route, entry, whole_object).await {
        Revalidation::Unreachable(error) if !serve_stale_on_failure => {
            tracing::info!(key = entry.key.as_str(), %error, "cannot revalidate; the stored version may not be served stale");
            Revalidation::Failed(error)
        }
        outcome => outcome,
    }
}

/// Starts the background check of a stale version unless one is running.
fn check_in_background(node: &Arc<Node>, route: &Route, entry: &Arc<ObjectEntry>) {
    let Some(claim) = entry.claim_background_check() else {
        return;
    };
    node.stats.background_revalidations.inc();
    let node = node.clone();
    let route = route.clone();
    tokio::spawn(async move {
        let entry = claim.entry();
        let _checking = entry.revalidation.lock().await;
        // A foreground check may have confirmed or replaced the version meanwhile.
        if entry.is_removed()
            || entry.check_needed(&route.target.policy, ClientDirectives::default()) == Check::None
        {
            return;
        }
        let outcome = check_with_origin(&node, &route, entry, false).await;
        tracing::debug!(
            key = entry.key.as_str(),
            ?outcome,
            "background revalidation"
        );
    });
}

/// Asks the origin whether `entry` is still its current version, under the entry's
/// revalidation lock: confirms it, drops it when it changed, or reports the origin unreachable.
async fn check_with_origin(
    node: &Node,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    whole_object: bool,
) -> Revalidation {
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
    let has_validator = entry.meta.etag.is_some() || entry.meta.last_modified.is_some();
    let answer = if whole_object && has_validator {
        fetch_conditional(node, route, &entry.meta).await
    } else {
        fetch_range(node, route, 0, Some(0), if_range_validator(&entry.meta)).await
    };
    // The header fields of the answer that confirmed this version.
    let confirmed = match answer {
        Ok(mut origin) => {
            if let Some(body) = origin.body.take() {
                // The byte asked for is drained (within the idle timeout) so the pooled
                // connection can be reused. From an origin that ignores Range (or a
                // conditional) the answer is the whole object: only its headers are needed,
                // and dropping the body unread closes the connection instead of holding the
                // object in memory.
                if origin.body_end - origin.body_start <= REVALIDATION_BODY_MAX {
                    let limited =
                        http_body_util::Limited::new(body, REVALIDATION_BODY_MAX as usize);
                    let _ = tokio::time::timeout(node.idle_read_timeout, limited.collect()).await;
                }
            }
            if !answers_same_version(&entry.meta, &origin) {
                return version_changed(node, entry);
            }
            origin.headers
        }
        // Moved (301, 302...), gone (404, 410...) or no longer sliceable: what the origin has
        // now is not this; the request goes on with what the origin answers now.
        Err(
            DiscoverError::Origin(OriginError::Status(300..=499)) | DiscoverError::NotStorable(_),
        ) => return version_changed(node, entry),
        // Never produced by a plain range request; served as stored.
        Err(DiscoverError::Answered { answer, .. }) => {
            return Revalidation::Unreachable(OriginError::Status(answer.status.as_u16()))
        }
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
    confirm(node, route, entry, &confirmed).await
}

/// Records the origin's confirmation of `entry`, whose answer carried `answer` (a `304`'s or an
/// unchanged range answer's header fields): the stored fields it carries are refreshed, and
/// the freshness is judged on the refreshed section.
async fn confirm(
    node: &Node,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    answer: &HeaderMap,
) -> Revalidation {
    let current = entry.replay_headers();
    let refreshed = header_section::refreshed(&current, answer);
    let section = refreshed.as_ref().unwrap_or(&current);
    // Freshness counts from the answer: its Age and Date, with the refreshed directives.
    let mut judged = section.clone();
    for name in [header::AGE, header::DATE] {
        judged.remove(&name);
        for value in answer.get_all(&name) {
            judged.append(name.clone(), value.clone());
        }
    }
    let freshness = match freshness::judge(&judged, route.target.policy.cache_control) {
        Ok(freshness) => freshness,
        // Maybe the same bytes, but the origin now forbids storing them: not a version
        // change, so neither counted nor logged as one.
        Err(reason) => {
            not_storable(node, &entry.key, reason);
            node.index.remove(entry);
            return Revalidation::Changed;
        }
    };
    let directives = StaleDirectives::of(&judged, route.target.policy.cache_control);
    if let Some(refreshed) = refreshed {
        if header_section::map_bytes(&refreshed) > header_section::MAX_STORED_HEADER_BYTES {
            node.stats.objects_refused_headers_too_large.inc();
            not_storable(node, &entry.key, NotStorable::HeadersTooLarge);
            node.index.remove(entry);
            return Revalidation::Changed;
        }
        entry.set_replay_headers(refreshed);
        entry.mark_validated_with(freshness, directives);
        write_meta(node, entry).await;
    } else {
        entry.mark_validated_with(freshness, directives);
    }
    Revalidation::Fresh
}

/// Rewrites the `meta.json` of `entry` after its stored header section changed. A failure
/// keeps the section in memory; after a restart the old one is served until the next check.
async fn write_meta(node: &Node, entry: &ObjectEntry) {
    let meta = entry.meta_for_disk();
    let json = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
    let path = node.layout.meta_path(&entry.key, meta.generation);
    if let Err(error) = node
        .storage
        .write_file_atomic(path, vec![Bytes::from(json)], node.fsync)
        .await
    {
        node.stats.disk_write_errors.inc();
        tracing::warn!(key = entry.key.as_str(), %error, "could not store refreshed metadata");
    }
}

/// Drops a stored version the origin no longer has as it is.
fn version_changed(node: &Node, entry: &Arc<ObjectEntry>) -> Revalidation {
    node.stats.version_changes.inc();
    tracing::info!(
        key = entry.key.as_str(),
        "origin content changed; dropping the stored version"
    );
    node.index.remove(entry);
    Revalidation::Changed
}

/// A conditional `GET` of the whole object. A `304` comes back as an [`OriginBody`] without a
/// body describing the stored version, so the caller reads both answers alike.
async fn fetch_conditional(
    node: &Node,
    route: &Route,
    meta: &ObjectMeta,
) -> Result<OriginBody, DiscoverError> {
    let response = node
        .client
        .fetch(route.conditional_request(meta.etag.clone(), meta.last_modified.clone()))
        .await
        .map_err(DiscoverError::Origin)?;
    let (parts, body) = response.into_parts();
    match parts.status {
        StatusCode::NOT_MODIFIED => Ok(OriginBody {
            // A 304 describes the stored version: its length and coding are the stored ones.
            length: meta.length,
            headers: not_modified_headers(parts.headers, meta),
            body_start: 0,
            body_end: 0,
            body: None,
        }),
        StatusCode::OK => whole_object_answer(parts.headers, body),
        status => Err(DiscoverError::Origin(OriginError::Status(status.as_u16()))),
    }
}

/// The fields of a `304` as a version check reads them: the validators and coding it may omit
/// are the stored version's (RFC 9110 §15.4.5 lets a 304 leave them out).
fn not_modified_headers(mut headers: HeaderMap, meta: &ObjectMeta) -> HeaderMap {
    for (name, value) in meta.typed_fields() {
        if let Some(value) = value.and_then(|value| http::HeaderValue::from_str(value).ok()) {
            if !headers.contains_key(&name) {
                headers.insert(name, value);
            }
        }
    }
    headers
}

/// The strongest validator of a stored version, for `If-Range` on later fills: a strong ETag,
/// or else Last-Modified.
pub(super) fn if_range_validator(meta: &ObjectMeta) -> Option<String> {
    match &meta.etag {
        Some(etag) if !etag.starts_with("W/") => Some(etag.clone()),
        _ => meta.last_modified.clone(),
    }
}
