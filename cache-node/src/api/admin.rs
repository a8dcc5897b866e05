//! The admin listener: the dashboard page (`/`, from `api::dashboard`), `/health`, `/stats`
//! (JSON), `/metrics` (Prometheus text), `GET /objects` to inspect one object and
//! `DELETE /objects` to purge it, `/stats/history`, `/summary`, `/ready` (from
//! `api::readiness`), `POST /reload` (`api::reload`), and prefill jobs (`/prefill`).
//! Reads are open to whoever can reach the listener;
//! anything that changes state needs `Authorization: Bearer <admin.token>`.
//!
//! The token is guarded three ways:
//! - With no usable token (empty, or the shipped `change-me` that every copy of the image
//!   knows), the endpoints that change state are disabled: they answer 403 saying how to set one.
//!   The node still starts, so it runs on the shipped defaults.
//! - Tokens are compared in constant time.
//! - Each client address (an IPv6 /64) may fail [`AUTH_FAILURE_BURST`] times in a row; then it
//!   gets 429 without its token being looked at, and one more try every
//!   [`crate::api::auth_throttle::AUTH_FAILURE_REFILL`], so guessing runs at one try a second instead of thousands.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;

use crate::api::auth_throttle::{AuthThrottle, AUTH_FAILURE_BURST};
use crate::api::dashboard;
use crate::api::prefill::{parse_urls, PrefillJobs, MAX_BODY_BYTES};
use crate::api::readiness::{NotReady, Readiness};
use crate::api::reload::Reload;
use crate::cache::key::CacheKey;
use crate::history::Sample;
use crate::http::client_key::ClientKey;
use crate::node::Node;
use crate::serve::{text_response, ResponseBody};
use crate::upstream::origin::normalise_host;

/// What the admin listener keeps besides the node: the token throttle, the prefill jobs, and
/// the node's readiness (for `/ready`).
#[derive(Debug)]
pub struct AdminContext {
    /// Failed admin-token attempts per client address.
    pub throttle: AuthThrottle,
    /// Prefill jobs.
    pub prefill: Arc<PrefillJobs>,
    /// Whether every worker accepts and shutdown has not started.
    pub readiness: Arc<Readiness>,
    /// Re-reads the config for `POST /reload`; `None` for a node started without one (tests).
    pub reload: Option<Arc<dyn Reload>>,
}

/// The 503 a load balancer's health check reads while the node is not ready: `Retry-After`
/// and the reason as text.
pub fn not_ready_response(not_ready: &NotReady) -> Response<ResponseBody> {
    let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, not_ready.to_string());
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Handles one admin request.
pub async fn handle(
    node: Arc<Node>,
    context: Arc<AdminContext>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let throttle = &context.throttle;
    let prefill = &context.prefill;
    let path = request.uri().path().to_owned();
    if path == "/ready" && matches!(*request.method(), Method::GET | Method::HEAD) {
        // While the store is recovered, `server::answer_while_starting` answers instead.
        return Ok(match context.readiness.check() {
            Ok(()) => text_response(StatusCode::OK, "ready"),
            Err(not_ready) => not_ready_response(&not_ready),
        });
    }
    if path == "/reload" && request.method() == Method::POST {
        if let Err(refusal) = authorise(&node, throttle, &request) {
            return Ok(refusal.response());
        }
        return Ok(reload(context.reload.clone()).await);
    }
    if path == "/prefill" || path.starts_with("/prefill/") {
        return Ok(prefill_request(&node, throttle, prefill, &path, request).await);
    }
    let path = path.as_str();
    let response = match (request.method(), path) {
        (&Method::GET | &Method::HEAD, "/" | "/dashboard") => dashboard::page_response(),
        (&Method::GET | &Method::HEAD, "/health") => text_response(StatusCode::OK, "ok"),
        (&Method::GET | &Method::HEAD, "/stats") => {
            let document = StatsDocument {
                snapshot: node.stats_snapshot(),
                tls: node
                    .tls
                    .as_ref()
                    .map(|tls| tls.summary(std::time::SystemTime::now())),
                fills: node.index.fills_in_progress(FILLS_LISTED),
            };
            let mut body = serde_json::to_vec_pretty(&document).expect("stats serialise");
            body.push(b'\n');
            typed(body, "application/json")
        }
        (&Method::GET | &Method::HEAD, "/stats/history") => {
            let since = query_value(request.uri().query().unwrap_or(""), "since")
                .and_then(|since| since.parse().ok())
                .unwrap_or(0);
            json(&node.history.view(since))
        }
        (&Method::GET | &Method::HEAD, "/summary") => {
            let now = Sample::of(&node.stats_snapshot(), crate::cache::store::unix_now());
            json(&node.history.summary(&now))
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            node.refresh_gauges();
            // Prometheus asks for OpenMetrics; everyone else gets the classic text format.
            let openmetrics = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|accept| accept.contains("application/openmetrics-text"));
            if openmetrics {
                typed(
                    node.stats.prometheus_text().into_bytes(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                typed(
                    node.stats.prometheus_classic_text().into_bytes(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
        }
        (&Method::GET | &Method::HEAD, "/objects") => {
            match object_key(request.uri().query().unwrap_or("")) {
                Some(key) => inspect(&node, &key),
                None => bad_object_query(),
            }
        }
        (&Method::DELETE, "/objects") => match authorise(&node, throttle, &request) {
            Ok(()) => purge(&node, request.uri().query().unwrap_or("")),
            Err(refusal) => refusal.response(),
        },
        (
            _,
            "/" | "/dashboard" | "/health" | "/ready" | "/reload" | "/stats" | "/stats/history" | "/summary" | "/metrics"
            | "/objects",
        ) => {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "unknown admin path; try / (the dashboard), /health, /ready, /stats, /stats/history, /summary, /metrics or /objects?origin=<host>&path=<path>",
        ),
    };
    Ok(response)
}

/// `/prefill` and `/prefill/<id>`: submit (`POST`, token), list or show (`GET`), cancel
/// (`DELETE`, token).
async fn prefill_request(
    node: &Arc<Node>,
    throttle: &AuthThrottle,
    prefill: &Arc<PrefillJobs>,
    path: &str,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let id = path.strip_prefix("/prefill/").map(str::parse::<u64>);
    match (request.method().clone(), id) {
        (Method::GET | Method::HEAD, None) => json(&serde_json::json!({ "jobs": prefill.list() })),
        (Method::GET | Method::HEAD, Some(Ok(id))) => match prefill.get(id) {
            Some(job) => json(&job),
            None => text_response(StatusCode::NOT_FOUND, format!("no prefill job {id}")),
        },
        (Method::POST, None) => {
            if let Err(refusal) = authorise(node, throttle, &request) {
                return refusal.response();
            }
            let json_body = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.starts_with("application/json"));
            let limited = http_body_util::Limited::new(request.into_body(), MAX_BODY_BYTES);
            let body = match tokio::time::timeout(
                Duration::from_secs(30),
                http_body_util::BodyExt::collect(limited),
            )
            .await
            {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ => {
                    return text_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "the body must be at most {MAX_BODY_BYTES} bytes, sent within 30 s"
                        ),
                    )
                }
            };
            let urls = match parse_urls(&body, json_body) {
                Ok(urls) => urls,
                Err(reason) => return text_response(StatusCode::BAD_REQUEST, reason),
            };
            match prefill.submit(node, crate::api::prefill::JobOrigin::Api, urls) {
                Ok(job) => {
                    let mut response = json(&job);
                    *response.status_mut() = StatusCode::ACCEPTED;
                    if let Ok(location) = HeaderValue::from_str(&format!("/prefill/{}", job.id)) {
                        response.headers_mut().insert(header::LOCATION, location);
                    }
                    response
                }
                Err((status, reason)) => text_response(status, reason),
            }
        }
        (Method::DELETE, Some(Ok(id))) => {
            if let Err(refusal) = authorise(node, throttle, &request) {
                return refusal.response();
            }
            if prefill.cancel(id) {
                json(&prefill.get(id))
            } else {
                text_response(StatusCode::NOT_FOUND, format!("no prefill job {id}"))
            }
        }
        (_, Some(Err(_))) => {
            text_response(StatusCode::NOT_FOUND, "a prefill job is /prefill/<number>")
        }
        _ => text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET or POST /prefill, GET or DELETE /prefill/<id>",
        ),
    }
}

/// `POST /reload`: the report (200), or 422 with the reason when the new config is refused and
/// the running one stays.
async fn reload(reload: Option<Arc<dyn Reload>>) -> Response<ResponseBody> {
    let Some(reload) = reload else {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node was started without a config to reload",
        );
    };
    match tokio::task::spawn_blocking(move || reload.reload("POST /reload")).await {
        Ok(Ok(report)) => json(&report),
        Ok(Err(reason)) => {
            let mut response = json(&serde_json::json!({
                "error": reason,
                "running": "the running configuration is unchanged",
            }));
            *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            response
        }
        Err(_) => text_response(StatusCode::INTERNAL_SERVER_ERROR, "the reload failed"),
    }
}

/// A JSON answer.
fn json(value: &impl Serialize) -> Response<ResponseBody> {
    let mut body = serde_json::to_vec(value).expect("admin documents serialise");
    body.push(b'\n');
    typed(body, "application/json")
}

/// The first value of parameter `name` in `query`, percent-decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// The `/stats` document: the counters, and the TLS listener's certificate when TLS is on.
#[derive(Debug, Serialize)]
struct StatsDocument {
    #[serde(flatten)]
    snapshot: crate::stats::StatsSnapshot,
    /// Subject, SANs, serial, validity and reload counts of the certificate in service.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<crate::tls::serving::ServingSummary>,
    /// The objects being filled now (at most [`FILLS_LISTED`]), most still to come first.
    fills: Vec<crate::cache::index::FillProgress>,
}

/// How many fills in flight `/stats` lists.
const FILLS_LISTED: usize = 32;

fn typed(body: Vec<u8>, content_type: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The token the shipped config file carries. Everyone has a copy, so it protects nothing.
pub const SHIPPED_TOKEN: &str = "change-me";

/// True when `token` can protect the endpoints that change state: not empty, not the shipped one.
pub fn token_is_usable(token: &str) -> bool {
    let token = token.trim();
    !token.is_empty() && token != SHIPPED_TOKEN
}

/// Why the endpoints that change state are disabled, for the start-up log and the 403 answer.
pub const TOKEN_UNSET_MESSAGE: &str = "admin endpoints that change state (DELETE /objects) are disabled: admin.token is empty or the shipped \"change-me\"; set CACHE_NODE__ADMIN__TOKEN (or [admin] token) to a long random secret, e.g. $(openssl rand -hex 24), and restart the node";

/// Why a request to an endpoint that changes state was not let through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum AuthRefusal {
    /// No usable `admin.token` is configured (403).
    #[error("{TOKEN_UNSET_MESSAGE}")]
    Disabled,
    /// The address failed too often; it may try again after this long (429).
    #[error("too many wrong tokens from {client}; try again in {} s", retry_after.as_secs().max(1))]
    Throttled {
        client: ClientKey,
        retry_after: Duration,
    },
    /// The token is missing or wrong (401).
    #[error("missing or wrong bearer token")]
    Unauthorized,
}

impl AuthRefusal {
    fn response(&self) -> Response<ResponseBody> {
        let status = match self {
            AuthRefusal::Disabled => StatusCode::FORBIDDEN,
            AuthRefusal::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
            AuthRefusal::Unauthorized => StatusCode::UNAUTHORIZED,
        };
        let mut response = text_response(status, self.to_string());
        let headers = response.headers_mut();
        match self {
            AuthRefusal::Throttled { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            AuthRefusal::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AuthRefusal::Disabled => {}
        }
        response
    }
}

/// Lets a request to an endpoint that changes state through, or says why not.
fn authorise(
    node: &Node,
    throttle: &AuthThrottle,
    request: &Request<Incoming>,
) -> Result<(), AuthRefusal> {
    let token = node.admin_token.load();
    if !token_is_usable(&token) {
        return Err(AuthRefusal::Disabled);
    }
    let client = request
        .extensions()
        .get::<crate::http::client_key::ClientAddr>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |addr| addr.0.ip());
    let client = ClientKey::network(client);
    let edge = &node.stats.edge;
    if let Some(retry_after) = throttle.throttled_for(client) {
        edge.admin_auth_throttled.inc();
        return Err(AuthRefusal::Throttled {
            client,
            retry_after,
        });
    }
    if presents_token(request, &token) {
        return Ok(());
    }
    edge.admin_auth_failures.inc();
    let failures = throttle.record_failure(client);
    if failures == AUTH_FAILURE_BURST {
        tracing::warn!(%client, failures, "admin: wrong tokens from one address; throttling it");
    }
    Err(AuthRefusal::Unauthorized)
}

/// Compares the bearer token in constant time, so its length-prefix cannot be probed by timing.
fn presents_token(request: &Request<Incoming>, expected: &str) -> bool {
    let Some(presented) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
    else {
        return false;
    };
    let expected = expected.as_bytes();
    let presented = presented.trim().as_bytes();
    presented.len() == expected.len()
        && presented
            .iter()
            .zip(expected)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// The cache key `?origin=<host>&path=<path and query>` names; `None` without both.
fn object_key(query: &str) -> Option<CacheKey> {
    let mut origin = None;
    let mut path = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "origin" => origin = normalise_host(&value),
            "path" => path = Some(value.into_owned()),
            _ => {}
        }
    }
    Some(CacheKey::new(&origin?, &path?))
}

fn bad_object_query() -> Response<ResponseBody> {
    text_response(
        StatusCode::BAD_REQUEST,
        "use /objects?origin=<host>&path=<url-encoded path and query>",
    )
}

/// What `GET /objects` says about one stored object.
#[derive(Debug, Serialize)]
struct ObjectReport<'a> {
    key: &'a str,
    content_id: String,
    drive: String,
    length: u64,
    stored_bytes: u64,
    complete: bool,
    slices: u64,
    slices_stored: u64,
    slices_filling: u64,
    etag: Option<&'a str>,
    last_modified: Option<&'a str>,
    content_type: Option<&'a str>,
    stored_at_unix: u64,
    /// Seconds since the origin last confirmed this version (the `Age` clients get).
    age_secs: Option<u64>,
    /// The lifetime the origin gave it; `null` means the configured `revalidate_after`.
    fresh_for_secs: Option<u64>,
}

/// `GET /objects?origin=<host>&path=<path and query>`: whether one object is cached, how much
/// of it, on which drive, and how fresh. `404` when it is not.
fn inspect(node: &Node, key: &CacheKey) -> Response<ResponseBody> {
    let Some(entry) = node.index.get(key) else {
        return text_response(
            StatusCode::NOT_FOUND,
            format!("not cached: {}", key.as_str()),
        );
    };
    let (slices_stored, slices_filling) = {
        let table = entry.table();
        (table.present.len(), table.inflight.len() as u64)
    };
    let meta = &entry.meta;
    let drive = node
        .layout
        .drives()
        .nth(node.layout.drive_of(key))
        .map(|drive| drive.root.display().to_string())
        .unwrap_or_default();
    let report = ObjectReport {
        key: key.as_str(),
        content_id: key.object_id(),
        drive,
        length: meta.length,
        stored_bytes: entry.stored_bytes(),
        complete: entry.is_complete(),
        slices: meta.slice_count(),
        slices_stored,
        slices_filling,
        etag: meta.etag.as_deref(),
        last_modified: meta.last_modified.as_deref(),
        content_type: meta.content_type.as_deref(),
        stored_at_unix: meta.stored_at_unix,
        age_secs: entry.age().map(|age| age.as_secs()),
        fresh_for_secs: entry.freshness().to_secs(),
    };
    let mut body = serde_json::to_vec_pretty(&report).expect("the report serialises");
    body.push(b'\n');
    typed(body, "application/json")
}

/// `DELETE /objects?origin=<host>&path=<path and query>` removes one object and its files.
fn purge(node: &Node, query: &str) -> Response<ResponseBody> {
    let Some(key) = object_key(query) else {
        return bad_object_query();
    };
    match node.index.get(&key) {
        Some(entry) => {
            node.index.remove(&entry);
            text_response(StatusCode::OK, format!("purged {}", key.as_str()))
        }
        None => text_response(
            StatusCode::NOT_FOUND,
            format!("not cached: {}", key.as_str()),
        ),
    }
}

/// The `/stats` document and the gauges behind `/metrics` are this module's: they are defined
/// here, on the node whose figures they read.
impl Node {
    /// Refreshes the gauges and returns the `/stats` document.
    pub fn stats_snapshot(&self) -> crate::stats::StatsSnapshot {
        let drives = self.refresh_gauges();
        let mut snapshot = self.stats.snapshot(self.storage.backend_name());
        snapshot.drives = drives;
        snapshot
    }

    /// Copies index figures into the gauges, and returns each drive's.
    pub fn refresh_gauges(&self) -> Vec<crate::stats::DriveUsage> {
        self.stats
            .set_effective_max_bytes(self.index.effective_max_bytes());
        let drives = self.index.drive_usage();
        self.stats.set_cache_gauges(
            self.index.used_bytes(),
            self.index.max_bytes(),
            self.index.object_count(),
            &drives,
        );
        let allowlist = self.allowlist.load();
        let stored_per_origin = self.index.tally_by(self.stats.origins.len(), |key| {
            allowlist.origin_of_key(key).map(|origin| origin.0)
        });
        self.stats.origins.set_stored(&stored_per_origin);
        if let Some(tls) = &self.tls {
            let summary = tls.summary(std::time::SystemTime::now());
            self.stats
                .tls_certificate_expiry
                .get_or_create(&vec![("cert".to_owned(), summary.cert_file)])
                .set(summary.expires_in_seconds);
        }
        drives
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_shipped_tokens_are_not_usable() {
        for unusable in ["", "   ", "change-me", " change-me "] {
            assert!(!token_is_usable(unusable), "{unusable:?}");
        }
        assert!(token_is_usable("5f0c3a9e1b7d"));
    }
}
