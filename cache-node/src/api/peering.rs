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
use serde::{Deserialize, Serialize};

use crate::cache::pieces::{self, CollectError};
use crate::config::{invalid, parse_block_size, ConfigError};
use crate::fill::{self, DiscoverError, SliceSpan};
use crate::node::Node;
use crate::serve::ResponseBody;
use crate::upstream::router;
use outpost_shared::wire::{self, Announced, Manifest, PeerList};

use crate::peering::tracker::{self, Announcement, ContentId, Scope, Tracker};

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

/// `peering.max_contents_per_address` may be at most this fraction (1/N) of
/// `peering.max_contents`: no fewer addresses than this can fill the tracker by themselves.
const MIN_ADDRESSES_TO_FILL_TRACKER: usize = 4;

/// The TCP source address of a client connection, put in each request's extensions by the
/// server so the tracker can see who is asking.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// `[peering]`: piece manifests and the peer tracker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeeringConfig {
    /// Serve manifests and the tracker, and hash pieces during fills. Off: every
    /// `/_outpost/` path answers 404 and fills skip hashing.
    pub enabled: bool,
    /// The piece size of manifests, for example `"1MiB"`: a power of two between 64KiB and
    /// 64MiB. Objects stored with smaller slices use pieces of one slice.
    pub piece_size: String,
    /// How long an announcement lives unless renewed.
    #[serde(with = "humantime_serde")]
    pub announce_ttl: Duration,
    /// LAN mode (1): IPv4 prefix length that counts as the same subnet.
    pub lan_prefix_v4: u8,
    /// LAN mode (1): IPv6 prefix length that counts as the same subnet.
    pub lan_prefix_v6: u8,
    /// The most content ids the tracker holds.
    pub max_contents: usize,
    /// The most peers the tracker holds per content id.
    pub max_peers_per_content: usize,
    /// The most content ids one source address may announce: a small share of `max_contents`
    /// (at most a quarter). An address over it loses its least recently renewed announcement.
    pub max_contents_per_address: usize,
    /// The most peers one query returns.
    pub max_peers_returned: usize,
    /// How long a manifest request waits for the fill of a partly stored object before answering
    /// 202 with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub manifest_wait: Duration,
}

impl Default for PeeringConfig {
    fn default() -> Self {
        PeeringConfig {
            enabled: true,
            piece_size: "1MiB".to_owned(),
            announce_ttl: Duration::from_secs(300),
            lan_prefix_v4: 24,
            lan_prefix_v6: 64,
            max_contents: 4096,
            max_peers_per_content: 64,
            max_contents_per_address: 256,
            max_peers_returned: 32,
            manifest_wait: Duration::from_secs(30),
        }
    }
}

/// `[peering]` after validation.
#[derive(Debug, Clone)]
pub struct PeeringSettings {
    /// The raw section.
    pub raw: PeeringConfig,
    /// `peering.piece_size` in bytes.
    pub piece_len: u64,
}

impl PeeringConfig {
    /// Checks every value of the section; errors name the key.
    pub fn validate(&self) -> Result<PeeringSettings, ConfigError> {
        let piece_len = parse_block_size("peering.piece_size", &self.piece_size)?;
        if self.announce_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "peering.announce_ttl",
                "must be at least one second, e.g. \"5m\"",
            ));
        }
        if self.lan_prefix_v4 > 32 {
            return Err(invalid(
                "peering.lan_prefix_v4",
                format!("{} is longer than 32 bits; use e.g. 24", self.lan_prefix_v4),
            ));
        }
        if self.lan_prefix_v6 > 128 {
            return Err(invalid(
                "peering.lan_prefix_v6",
                format!(
                    "{} is longer than 128 bits; use e.g. 64",
                    self.lan_prefix_v6
                ),
            ));
        }
        for (key, value, example) in [
            ("peering.max_contents", self.max_contents, 4096),
            (
                "peering.max_peers_per_content",
                self.max_peers_per_content,
                64,
            ),
            (
                "peering.max_contents_per_address",
                self.max_contents_per_address,
                1024,
            ),
            ("peering.max_peers_returned", self.max_peers_returned, 32),
        ] {
            if value == 0 {
                return Err(invalid(key, format!("must be at least 1, e.g. {example}")));
            }
        }
        let largest_share = (self.max_contents / MIN_ADDRESSES_TO_FILL_TRACKER).max(1);
        if self.max_contents_per_address > largest_share {
            return Err(invalid(
                "peering.max_contents_per_address",
                format!(
                    "{} is more than 1/{MIN_ADDRESSES_TO_FILL_TRACKER} of peering.max_contents ({}): a few addresses could fill the tracker; use at most {largest_share}, e.g. {}",
                    self.max_contents_per_address,
                    self.max_contents,
                    (self.max_contents / 16).max(1)
                ),
            ));
        }
        Ok(PeeringSettings {
            raw: self.clone(),
            piece_len,
        })
    }
}

/// The running peering state of a node.
#[derive(Debug)]
pub struct Peering {
    /// The tracker.
    pub tracker: Arc<Tracker>,
    /// `peering.piece_size` in bytes (pieces are never longer than a slice).
    pub piece_len: u64,
    /// `peering.manifest_wait`.
    pub manifest_wait: Duration,
    /// `peering.max_peers_returned`.
    pub max_peers_returned: usize,
}

impl Peering {
    /// Builds the peering state, or `None` when `peering.enabled` is off. Starts a task on the
    /// current runtime that sweeps expired announcements every TTL; it ends with the tracker.
    pub fn start(settings: &PeeringSettings) -> Option<Peering> {
        let raw = &settings.raw;
        if !raw.enabled {
            return None;
        }
        let tracker = Arc::new(Tracker::new(raw.clone()));
        let weak = Arc::downgrade(&tracker);
        let period = raw.announce_ttl;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                match weak.upgrade() {
                    Some(tracker) => tracker.sweep(),
                    None => return,
                }
            }
        });
        Some(Peering {
            tracker,
            piece_len: settings.piece_len,
            manifest_wait: raw.manifest_wait,
            max_peers_returned: raw.max_peers_returned,
        })
    }
}

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
    // The URL names its origin as a proxy request does, and is routed (and refused) the same way.
    let route = match router::route(&node.allowlist, &uri, None) {
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
    loop {
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
            };
        // A manifest describes the version the origin has now, as a GET would serve it. A
        // changed version was dropped: the next lookup discovers the new one, which is confirmed
        // by that discovery, so this repeats at most once.
        if let fill::Revalidation::Changed = fill::revalidate_if_stale(node, &route, &entry).await {
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
        match pieces::collect(node, &entry, peering.piece_len).await {
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
                        piece_size: pieces::piece_len(peering.piece_len, meta.slice_len),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peering_values_name_their_key() {
        type Mutation = Box<dyn Fn(&mut PeeringConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|c| c.piece_size = "1 MB".into()),
                "peering.piece_size: \"1 MB\" is not a size",
            ),
            (
                Box::new(|c| c.piece_size = "3MiB".into()),
                "peering.piece_size:",
            ),
            (
                Box::new(|c| c.announce_ttl = Duration::ZERO),
                "peering.announce_ttl:",
            ),
            (Box::new(|c| c.lan_prefix_v4 = 33), "peering.lan_prefix_v4:"),
            (
                Box::new(|c| c.lan_prefix_v6 = 129),
                "peering.lan_prefix_v6:",
            ),
            (Box::new(|c| c.max_contents = 0), "peering.max_contents:"),
            (
                Box::new(|c| c.max_peers_per_content = 0),
                "peering.max_peers_per_content:",
            ),
            (
                Box::new(|c| c.max_contents_per_address = 1025),
                "peering.max_contents_per_address: 1025 is more than 1/4",
            ),
        ];
        for (mutate, expected_prefix) in cases {
            let mut config = PeeringConfig::default();
            mutate(&mut config);
            let message = config.validate().unwrap_err().to_string();
            assert!(
                message.starts_with(expected_prefix),
                "{message:?} should start with {expected_prefix:?}"
            );
        }
        let valid = PeeringConfig::default().validate().unwrap();
        assert_eq!(valid.piece_len, 1 << 20);
    }
}
