//! The cache node's peering API, from the client side: the trusted piece manifest of a URL, the
//! tracker's peer list, and announcements (see "Peering API" in `docs/protocol.md`).
//!
//! Every request can leave from a chosen local address. The tracker scopes LAN peers and records
//! announcements by the source address it sees, so a daemon listening on one address of a
//! multi-homed machine (or on 127.0.x.y in tests) speaks to the node from that address.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::CacheHost;
use crate::config::DownloadMode;
use crate::content::integrity::{PieceHashes, Sha256Digest};
use crate::content::partial::Validator;

/// Largest JSON answer read from the node (a manifest of a 64 GiB file in 1 MiB pieces is
/// about 4.3 MB).
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// How much earlier than the client's own deadline the node is asked to answer a manifest
/// request, so its `202` arrives in time.
const MANIFEST_ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// The pause before asking again after a `202` without a usable `Retry-After`.
const DEFAULT_MANIFEST_RETRY: Duration = Duration::from_secs(5);

/// Why a peering API call failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The node could not be reached or the answer was cut.
    #[error("cache node unreachable: {0}")]
    Unreachable(String),
    /// The node answered with another status.
    #[error("cache node answered {0}")]
    Status(StatusCode),
    /// The node has no manifest yet (`202`: its fill is still running).
    #[error("the cache node is still filling the content")]
    NotReady,
    /// The answer did not parse or made no sense.
    #[error("bad answer from the cache node: {0}")]
    BadAnswer(String),
    /// The call took longer than allowed.
    #[error("the cache node did not answer within {0:?}")]
    Timeout(Duration),
}

pub use outpost_shared::wire::{Announced, Announcement, ContentId, Manifest, PeerList};

/// One peer in the node's answer to a peer query.
pub type PeerEntry = outpost_shared::wire::PeerInfo;

/// What peer-client reads off a manifest beyond the wire fields.
pub trait ManifestExt {
    /// Checks that the piece list covers `size` in pieces of `piece_size`.
    fn check_consistent(&self) -> Result<(), TrackerError>;
    /// The validators of this version, for `If-Range` and response checks.
    fn validator(&self) -> Validator;
}

impl ManifestExt for Manifest {
    fn check_consistent(&self) -> Result<(), TrackerError> {
        self.check()
            .map_err(|error| TrackerError::BadAnswer(error.to_string()))
    }

    fn validator(&self) -> Validator {
        Validator {
            etag: self.etag.clone(),
            last_modified: self.last_modified.clone(),
        }
    }
}

impl PieceHashes for Manifest {
    fn piece_len(&self) -> u64 {
        self.piece_size
    }

    fn piece_hash(&self, index: u64) -> Option<Sha256Digest> {
        self.pieces.get(index as usize).copied()
    }
}

/// Which pieces a peer in a query's answer holds.
pub trait PeerHoldings {
    /// Which of `piece_count` pieces it holds.
    fn holdings(&self, piece_count: u64) -> Vec<bool>;
}

impl PeerHoldings for PeerEntry {
    fn holdings(&self, piece_count: u64) -> Vec<bool> {
        let mut held = vec![self.complete; piece_count as usize];
        for [first, last] in &self.pieces {
            for index in *first..=(*last).min(piece_count.saturating_sub(1)) {
                held[index as usize] = true;
            }
        }
        held
    }
}

/// A client of one cache node's peering API.
#[derive(Clone, Debug)]
pub struct NodeApi {
    base: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl NodeApi {
    /// A client for `host`, sending from `local_address` when given; an `https://` host is
    /// trusted through the public roots only (see [`NodeApi::with_tls`]).
    pub fn new(host: &CacheHost, local_address: Option<IpAddr>, connect_timeout: Duration) -> Self {
        Self::with_tls(
            host,
            local_address,
            connect_timeout,
            crate::net::http::tls_client_config(&[]),
        )
    }

    /// A client for `host`, sending from `local_address` when given, over HTTPS with `tls`
    /// when the host was written `https://`.
    pub fn with_tls(
        host: &CacheHost,
        local_address: Option<IpAddr>,
        connect_timeout: Duration,
        tls: rustls::ClientConfig,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_local_address(local_address);
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        NodeApi {
            base: format!("{}/_outpost/v1", host.base_url()),
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), TrackerError> {
        let (status, _, body) = self.call_with_headers(method, path_and_query, body).await?;
        Ok((status, body))
    }

    /// Like [`NodeApi::call`], with the answer's headers.
    async fn call_with_headers(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), TrackerError> {
        let uri: Uri = format!("{}{path_and_query}", self.base)
            .parse()
            .map_err(|error| TrackerError::BadAnswer(format!("bad request URI: {error}")))?;
        let mut builder = Request::builder().method(method).uri(uri);
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| TrackerError::BadAnswer(error.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|error| TrackerError::Unreachable(error.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| TrackerError::Unreachable(error.to_string()))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    /// The manifest of `url`, waiting at most `timeout`.
    ///
    /// Each request tells the node how long it may hold the answer (`wait`, a little less than
    /// the time left), so a `202` (the content is still filling) arrives in time to retry after
    /// its `Retry-After`, as long as `timeout` leaves room for it.
    pub async fn manifest(&self, url: &str, timeout: Duration) -> Result<Manifest, TrackerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait = remaining.saturating_sub(MANIFEST_ANSWER_MARGIN);
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("url", url)
                .append_pair("wait", &format!("{:.3}", wait.as_secs_f64()))
                .finish();
            let answer = tokio::time::timeout(
                remaining,
                self.call_with_headers(Method::GET, &format!("/manifest?{query}"), None),
            )
            .await
            .map_err(|_| TrackerError::Timeout(timeout))??;
            let (status, headers, body) = answer;
            match status {
                StatusCode::OK => {
                    let manifest: Manifest = serde_json::from_slice(&body)
                        .map_err(|error| TrackerError::BadAnswer(error.to_string()))?;
                    manifest.check_consistent()?;
                    return Ok(manifest);
                }
                StatusCode::ACCEPTED => {
                    let retry_after = headers
                        .get(header::RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.trim().parse::<u64>().ok())
                        .map_or(DEFAULT_MANIFEST_RETRY, Duration::from_secs);
                    let retry_at = tokio::time::Instant::now() + retry_after;
                    if retry_at + MANIFEST_ANSWER_MARGIN >= deadline {
                        return Err(TrackerError::NotReady);
                    }
                    tokio::time::sleep_until(retry_at).await;
                }
                other => return Err(TrackerError::Status(other)),
            }
        }
    }

    /// Peers holding `content_id`, scoped by `mode`.
    pub async fn peers(
        &self,
        content_id: ContentId,
        mode: DownloadMode,
        group_id: &str,
        limit: usize,
    ) -> Result<Vec<PeerEntry>, TrackerError> {
        let query = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query
                .append_pair("content_id", &content_id.to_string())
                .append_pair("mode", &mode.number().to_string())
                .append_pair("limit", &limit.to_string());
            if mode == DownloadMode::Group {
                query.append_pair("group_id", group_id);
            }
            query.finish()
        };
        let (status, body) = self
            .call(Method::GET, &format!("/peers?{query}"), None)
            .await?;
        if status != StatusCode::OK {
            return Err(TrackerError::Status(status));
        }
        let answer: PeerList = serde_json::from_slice(&body)
            .map_err(|error| TrackerError::BadAnswer(error.to_string()))?;
        Ok(answer.peers)
    }

    /// Sends an announcement.
    pub async fn announce(&self, announcement: &Announcement) -> Result<Announced, TrackerError> {
        let body = serde_json::to_vec(announcement).expect("announcements serialize");
        let (status, body) = self.call(Method::POST, "/announce", Some(body)).await?;
        if status != StatusCode::OK {
            return Err(TrackerError::Status(status));
        }
        serde_json::from_slice(&body).map_err(|error| TrackerError::BadAnswer(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ids_are_exactly_64_lower_case_hex_digits() {
        let good = "ab".repeat(32);
        assert_eq!(ContentId::parse(&good).unwrap().to_string(), good);
        for bad in [
            "",
            "../../etc/passwd",
            &"AB".repeat(32),
            &"ab".repeat(31),
            &format!("{}/", "ab".repeat(32)),
            &format!("{}%2e", &"ab".repeat(32)[..61]),
            &"zz".repeat(32),
        ] {
            assert!(ContentId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn held_pieces_become_ranges_and_back() {
        use crate::content::store::piece_ranges;

        let held = [true, true, false, true, false, false, true, true];
        assert_eq!(piece_ranges(&held, 64), [[0, 1], [3, 3], [6, 7]]);
        assert_eq!(piece_ranges(&held, 2), [[0, 1], [3, 3]]);
        let entry = PeerEntry {
            address: "127.0.0.1:1".parse().unwrap(),
            complete: false,
            pieces: vec![[0, 1], [3, 3], [6, 9]],
            active_uploads: 0,
            expires_in_secs: 60,
        };
        assert_eq!(entry.holdings(8), held);
        let complete = PeerEntry {
            complete: true,
            pieces: Vec::new(),
            ..entry
        };
        assert_eq!(complete.holdings(3), [true; 3]);
    }

    #[test]
    fn manifests_parse_and_must_cover_the_content() {
        let hash = "00".repeat(32);
        let text = format!(
            r#"{{"content_id":"{}","key":"k","size":2500,"etag":"\"e\"","last_modified":null,
            "piece_size":1000,"pieces":["{hash}","{hash}","{hash}"]}}"#,
            "ab".repeat(32)
        );
        let manifest: Manifest = serde_json::from_str(&text).unwrap();
        manifest.check_consistent().unwrap();
        assert_eq!(manifest.piece_len(), 1000);
        assert_eq!(manifest.validator().etag.as_deref(), Some("\"e\""));
        let short = Manifest {
            pieces: vec![[0; 32]; 2],
            ..manifest
        };
        assert!(short.check_consistent().is_err());
    }
}
