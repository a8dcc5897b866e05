//! The node's peering API on the client listener: trusted piece manifests and the peer tracker,
//! for peer-client (see `docs/protocol.md`, "Peering API").
//!
//! - `GET /_outpost/v1/manifest?url=<original URL>`: the piece manifest of the content that URL
//!   names (discovering and filling it as a GET would, and waiting up to `peering.manifest_wait`
//!   for the rest of a partly stored object).
//! - `POST /_outpost/v1/announce`: a peer says which pieces of a content id it holds.
//! - `GET /_outpost/v1/peers?content_id=<id>&mode=<1|2|3>`: peers holding a content id, scoped
//!   by download mode and ranked.
//!
//! Requests reach this module only when [`crate::upstream::router::is_api_request`] says so: the path is
//! under [`crate::upstream::router::API_PREFIX`] and the request names no origin. That rule, and reverse-proxy
//! mode refusing the prefix, keep API paths and content paths apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Serialize;

use crate::cache::freshness::ClientDirectives;
use crate::cache::pieces::{self, CollectError};
use crate::fill::{self, DiscoverError, SliceSpan};
use crate::node::Node;
use crate::serve::ResponseBody;
use crate::upstream::router;
use outpost_shared::wire::{self, Announced, Manifest, PeerList};

use crate::http::client_key::ClientAddr;
use crate::peering::tracker::{self, Announcement, ContentId, Scope};
use crate::peering::Peering;

/// The largest announcement body accepted. [`tracker::MAX_PIECE_RANGES`] ranges and a group id
/// fit in a few KiB.
const MAX_ANNOUNCE_BODY: usize = 16 << 10;

/// How often a manifest request that waits for a fill checks again even without news, so a fill
/// that failed is started again.
const MANIFEST_RECHECK: Duration = Duration::from_millis(250);

/// The longest `Retry-After` a `202` manifest answer suggests, in seconds. It suggests as long
/// as the request was held (at least 1 s, at most this): a client that asks to wait briefly
/// may ask again soon.
const MANIFEST_RETRY_AFTER_SECS: u64 = 5;

/// Handles one request that [`router::is_api_request`] recognised.
pub async fn handle(node: Arc<Node>, request: Request<Incoming>) -> Response<ResponseBody> {
    let Some(peering) = node.peering.as_ref() else {
        return json_error(
            StatusCode::NOT_FOUND,
            "peering is disabled on this node (peering.enabled = false)",
        );
    };
    let client = request.extensions().get::<ClientAddr>().map(|addr| addr.0);
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let allowed = match path.as_str() {
        "/_outpost/v1/manifest" | "/_outpost/v1/peers" => "GET",
        "/_outpost/v1/announce" => "POST",
        _ => {
            return json_error(
                StatusCode::NOT_FOUND,
                "unknown API path; see docs/protocol.md (/_outpost/v1/manifest, /_outpost/v1/announce, /_outpost/v1/peers)",
            )
        }
    };
    if request.method().as_str() != allowed {
        let mut response = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} takes {allowed}"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        return response;
    }
    let response = match (path.as_str(), client) {
        ("/_outpost/v1/manifest", _) => manifest(&node, peering, &query, client).await,
        ("/_outpost/v1/peers", Some(client)) => peers(&node, peering, &query, client),
        (_, Some(client)) => announce(&node, peering, request, client).await,
        (_, None) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the connection's source address is unknown",
        ),
    };
    tracing::info!(
        path,
        client = client.map(|addr| addr.to_string()).unwrap_or_default(),
        status = response.status().as_u16(),
        "api"
    );
    response
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec_pretty(value).expect("API answers serialise");
    body.push(b'\n');
    let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    json_response(status, &serde_json::json!({ "error": message }))
}

fn with_retry_after(mut response: Response<ResponseBody>, secs: u64) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    response
}

fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

async fn manifest(
    node: &Arc<Node>,
    peering: &Peering,
    query: &str,
    client: Option<SocketAddr>,
) -> Response<ResponseBody> {
    let Some(url) = query_value(query, "url") else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "missing url parameter; use ?url=<percent-encoded http://origin/path?query>",
        );
    };
    let uri: Uri = match url.parse() {
        Ok(uri) if matches!(Uri::scheme_str(&uri), Some("http" | "https")) => uri,
        _ => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("url {url:?} is not an absolute http:// or https:// URL"),
            )
        }
    };
    // The URL names its origin as a proxy request does, and is routed (and refused) the same way;
    // an `https://` URL is fetched as a request over TLS would be.
    let scheme = if uri.scheme_str() == Some("https") {
        crate::http::client_key::ClientScheme::Https
    } else {
        crate::http::client_key::ClientScheme::Http
    };
    let route = match router::route_over(&node.allowlist.load(), &uri, None, scheme) {
        Ok(route) => route,
        Err(error) => return json_error(StatusCode::FORBIDDEN, &error.to_string()),
    };
    // A client may ask for a shorter wait (`wait=<seconds>`), so that the 202 reaches it before
    // its own timeout and it can retry; never longer than `peering.manifest_wait`.
    let wait = query_value(query, "wait")
        .and_then(|secs| secs.parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs >= 0.0)
        .map_or(peering.manifest_wait, |secs| {
            Duration::from_secs_f64(secs.min(peering.manifest_wait.as_secs_f64()))
        });
    let deadline = tokio::time::Instant::now() + wait;
    let whole_object = SliceSpan {
        first: 0,
        last: None,
    };
    // A manifest needs every piece: its fills are prefills, which finish without readers. They
    // run under the same memory, concurrency and per-client bounds as a GET's.
    let requester = fill::Requester::prefill(client.map(|addr| addr.ip()));
    let base_route = route;
    let mut route = base_route.clone();
    loop {
        // Peers ask for what a client without preferences gets: the identity variant of a
        // varying URL.
        match fill::select_variant(node, &base_route, &http::HeaderMap::new()) {
            Ok(Some(varied)) => route = varied,
            Ok(None) => {}
            Err(reason) => {
                return json_error(
                    StatusCode::NOT_FOUND,
                    &format!("the node may not store this content ({reason}); it has no manifest"),
                )
            }
        }
        let (entry, _discovery_demand) =
            match fill::lookup_or_discover(node, &route, whole_object, &requester).await {
                Ok(found) => found,
                Err(DiscoverError::NotStorable(reason)) => {
                    return json_error(
                        StatusCode::NOT_FOUND,
                        &format!(
                            "the node may not store this content ({reason}); it has no manifest"
                        ),
                    )
                }
                Err(DiscoverError::Origin(error)) => {
                    let status = crate::serve::origin_failure_status(&error);
                    return json_error(status, &error.to_string());
                }
                Err(DiscoverError::Refused(refused)) => return refused_manifest(node, refused),
                Err(DiscoverError::Answered { answer, .. }) => {
                    return json_error(
                        answer.status,
                        &format!("the origin answered {} instead of content", answer.status),
                    )
                }
            };
        if fill::other_variant(&entry, &route) && tokio::time::Instant::now() < deadline {
            continue;
        }
        // A manifest describes the version the origin has now, as a GET would serve it. A
        // changed version was dropped: the next lookup discovers the new one, which is confirmed
        // by that discovery, so this repeats at most once.
        if let fill::Revalidation::Changed = fill::revalidate_if_stale(
            node,
            &route,
            &entry,
            ClientDirectives::default(),
            std::time::Instant::now(),
            false,
        )
        .await
        {
            continue;
        }
        let mut changed = entry.pieces.subscribe();
        let slice_count = entry.meta.slice_count();
        if slice_count > 0 && !entry.is_removed() {
            match fill::ensure_filling(node, &route, &entry, 0, slice_count - 1, &requester).await {
                Ok(_prefill) => {}
                // Part of a validator-less object is stored; the rest cannot be added from
                // another request. Fetch it again whole.
                Err(fill::FillRefused::NoValidator) => {
                    node.index.remove(&entry);
                    if tokio::time::Instant::now() < deadline {
                        continue;
                    }
                }
                Err(refused) => return refused_manifest(node, refused),
            }
        }
        match pieces::collect(&node.piece_store(), &entry, peering.piece_len).await {
            Ok(hashes) => {
                node.stats.manifests_served.inc();
                let meta = &entry.meta;
                return json_response(
                    StatusCode::OK,
                    &Manifest {
                        content_id: entry.key.content_id(),
                        key: entry.key.as_str().to_owned(),
                        size: meta.length,
                        etag: meta.etag.clone(),
                        last_modified: meta.last_modified.clone(),
                        piece_size: crate::cache::piece_file::piece_len(
                            peering.piece_len,
                            meta.slice_len,
                        ),
                        pieces: hashes,
                    },
                );
            }
            Err(CollectError::Disk(error)) if !entry.is_removed() => {
                tracing::warn!(key = entry.key.as_str(), %error, "manifest: cannot read a stored slice");
                return json_error(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string());
            }
            Err(_) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            let answer = serde_json::json!({
                "status": "filling",
                "content_id": entry.key.object_id(),
                "size": entry.meta.length,
            });
            return with_retry_after(
                json_response(StatusCode::ACCEPTED, &answer),
                wait.as_secs().clamp(1, MANIFEST_RETRY_AFTER_SECS),
            );
        }
        if entry.is_removed() {
            // The origin's version changed under us: look the new one up.
            continue;
        }
        let pause = MANIFEST_RECHECK.min(deadline - now);
        let _ = tokio::time::timeout(pause, changed.changed()).await;
    }
}

/// The answer to a manifest request that may not start its fills now.
fn refused_manifest(node: &Node, refused: fill::FillRefused) -> Response<ResponseBody> {
    node.stats.refused_requests.inc();
    node.stats.fill_refusals.inc();
    with_retry_after(
        json_error(StatusCode::SERVICE_UNAVAILABLE, &refused.to_string()),
        MANIFEST_RETRY_AFTER_SECS,
    )
}

async fn announce(
    node: &Node,
    peering: &Peering,
    request: Request<Incoming>,
    client: SocketAddr,
) -> Response<ResponseBody> {
    // A body sent a byte at a time would hold the connection busy, out of the edge's timeouts:
    // it gets as long as headers do.
    let body_timeout = node.connection_limits.header_read_timeout;
    let collected = tokio::time::timeout(
        body_timeout,
        Limited::new(request.into_body(), MAX_ANNOUNCE_BODY).collect(),
    )
    .await;
    let body = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(error)) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("announcement body unreadable or over {MAX_ANNOUNCE_BODY} bytes: {error}"),
            )
        }
        Err(_) => {
            return json_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the announcement body did not arrive within {} (server.header_read_timeout)",
                    humantime::format_duration(body_timeout)
                ),
            )
        }
    };
    // A content id that is not 64 lower-case hex digits fails here, with serde's message.
    let parsed: wire::Announcement = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("announcement is not valid JSON: {error}"),
            )
        }
    };
    let content_id = parsed.content_id;
    if parsed.port == 0 {
        return json_error(StatusCode::BAD_REQUEST, "port must be 1-65535");
    }
    if parsed
        .group_id
        .as_ref()
        .is_some_and(|group_id| group_id.is_empty() || group_id.len() > tracker::MAX_GROUP_ID_LEN)
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!("group_id must be 1-{} bytes", tracker::MAX_GROUP_ID_LEN),
        );
    }
    let Some(pieces) = tracker::normalise_ranges(parsed.pieces) else {
        return json_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "pieces must be [first, last] ranges with first <= last, at most {} after merging",
                tracker::MAX_PIECE_RANGES
            ),
        );
    };
    // The address is the connection's source, never one the peer claims: see crate::peering::tracker.
    let address = SocketAddr::new(client.ip().to_canonical(), parsed.port);
    let announcement = Announcement {
        content_id,
        address,
        group_id: parsed.group_id,
        pieces,
        complete: parsed.complete,
        active_uploads: parsed.active_uploads,
    };
    let ttl = peering.tracker.limits().announce_ttl;
    match peering.tracker.announce(announcement) {
        Ok(announced) => {
            node.stats.peer_announcements.inc();
            node.stats
                .edge
                .tracker_evictions
                .inc_by(announced.evicted as u64);
            json_response(
                StatusCode::OK,
                &Announced {
                    address,
                    ttl_secs: ttl.as_secs(),
                },
            )
        }
        Err(error) => with_retry_after(
            json_error(StatusCode::SERVICE_UNAVAILABLE, &error.to_string()),
            ttl.as_secs(),
        ),
    }
}

fn peers(
    node: &Node,
    peering: &Peering,
    query: &str,
    client: SocketAddr,
) -> Response<ResponseBody> {
    let Some(content_id) =
        query_value(query, "content_id").and_then(|text| ContentId::parse(&text))
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "content_id must be given as 64 hex digits",
        );
    };
    let mode = query_value(query, "mode").and_then(|text| text.parse::<u8>().ok());
    let scope = match mode {
        Some(1) => Scope::Lan,
        Some(2) => match query_value(query, "group_id") {
            Some(group_id) if !group_id.is_empty() => Scope::Group(group_id),
            _ => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "mode 2 (Group) needs a group_id parameter",
                )
            }
        },
        Some(3) => Scope::Any,
        _ => return json_error(
            StatusCode::BAD_REQUEST,
            "mode must be 1 (LAN), 2 (Group) or 3 (Internet); other download modes use no peers",
        ),
    };
    let limit = query_value(query, "limit")
        .and_then(|text| text.parse::<usize>().ok())
        .unwrap_or(peering.max_peers_returned)
        .min(peering.max_peers_returned);
    let found = peering
        .tracker
        .peers(&content_id, client.ip(), &scope, limit);
    node.stats.peer_queries.inc();
    json_response(
        StatusCode::OK,
        &PeerList {
            content_id,
            mode: mode.unwrap_or_default(),
            peers: found,
        },
    )
}
