//! Revalidation: asking the origin whether a stored version past its lifetime is still current.

use super::*;
use std::sync::Arc;
use std::time::Instant;

use http::header;
use http_body_util::BodyExt;

pub use crate::cache::discovery::DiscoverError;
use crate::cache::freshness::{self, Check, ClientDirectives, StaleDirectives};
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
/// client's request directives call for it (see [`crate::cache::freshness::check_needed`]): a
/// one-byte range request with `If-Range` set to the version's validator. Concurrent requests
/// for the same version wait for one check; a request that `arrived` before a check finished is
/// satisfied by it. Within `stale-while-revalidate`, the check runs in the background, one at a
/// time per version, and the stored version is served at once.
pub async fn revalidate_if_stale(
    node: &Arc<Node>,
    route: &Route,
    entry: &Arc<ObjectEntry>,
    client: ClientDirectives,
    arrived: Instant,
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
    match check_with_origin(node, route, entry).await {
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
        let outcome = check_with_origin(&node, &route, entry).await;
        tracing::debug!(
            key = entry.key.as_str(),
            ?outcome,
            "background revalidation"
        );
    });
}

/// Asks the origin whether `entry` is still its current version, under the entry's
/// revalidation lock: confirms it, drops it when it changed, or reports the origin unreachable.
async fn check_with_origin(node: &Node, route: &Route, entry: &Arc<ObjectEntry>) -> Revalidation {
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
    // `Some((freshness, directives))` when the origin confirmed this version and still lets it
    // be stored.
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
                Ok(freshness) if same_version => Some((
                    freshness,
                    StaleDirectives::of(&origin.headers, route.target.policy.cache_control),
                )),
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
    if let Some((freshness, directives)) = confirmed {
        entry.mark_validated_with(freshness, directives);
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
pub(super) fn if_range_validator(meta: &ObjectMeta) -> Option<String> {
    match &meta.etag {
        Some(etag) if !etag.starts_with("W/") => Some(etag.clone()),
        _ => meta.last_modified.clone(),
    }
}
