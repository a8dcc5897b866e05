//! The HTTP transport: one range request to one source, checked and streamed into a buffer,
//! under the first-byte timeout, the stall watchdog and the shared bandwidth cap.
//!
//! Two pooled hyper-util clients (rustls with the webpki roots for HTTPS origins): one for cache
//! hosts with their short connect timeout (3 s), one for the origin. Every response is checked
//! against the request before a byte is kept: the `Content-Range` must be the range asked for, the
//! total length and the validators must be those of the version being downloaded, and a body may
//! be neither longer nor shorter than announced. A failure returns the valid bytes received so
//! far, so the piece resumes from there.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::ValidConfig;
use crate::content::partial::Validator;
use crate::error::FetchError;
use crate::net::bandwidth::BandwidthMeter;

/// What kind of server a request goes to, for the connection pool and timeouts here, and for
/// accounting (DO's `BytesFromCacheServer`, `BytesFromHttp`,
/// `BytesFromPeers`) and for policy (the origin is the fallback and the repair source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum SourceKind {
    /// A cache node.
    CacheHost,
    /// The URL's own server (DO's "HTTP" or CDN source).
    Origin,
    /// A peer's daemon.
    Peer,
}

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("outpost-peer-client/", env!("CARGO_PKG_VERSION"));

/// The stall watchdog's settings.
#[derive(Debug, Clone, Copy)]
pub struct StallSettings {
    /// Bytes per second under which a transfer is stalled.
    pub floor_bytes_per_sec: u64,
    /// The measuring window.
    pub window: Duration,
}

/// Aborts a transfer whose rate stays under a floor for a whole window (DO: 4000 B/s for 20 s).
///
/// Time spent waiting for the bandwidth cap is not held against the source: the window is
/// extended by it.
#[derive(Debug, Clone)]
pub struct StallWatchdog {
    settings: StallSettings,
    window_start: Instant,
    bytes_in_window: u64,
}

impl StallWatchdog {
    /// A watchdog whose first window starts at `now`.
    pub fn new(settings: StallSettings, now: Instant) -> StallWatchdog {
        StallWatchdog {
            settings,
            window_start: now,
            bytes_in_window: 0,
        }
    }

    /// When the current window ends.
    pub fn deadline(&self) -> Instant {
        self.window_start + self.settings.window
    }

    /// Counts received bytes.
    pub fn record(&mut self, bytes: u64) {
        self.bytes_in_window += bytes;
    }

    /// Extends the window by time the transfer was held back locally.
    pub fn exclude(&mut self, held_back: Duration) {
        self.window_start += held_back;
    }

    /// At or after the deadline: fails when the window's rate was under the floor, else starts
    /// the next window. Before the deadline: nothing to judge yet.
    pub fn check(&mut self, now: Instant) -> Result<(), FetchError> {
        if now < self.deadline() {
            return Ok(());
        }
        let floor_bytes =
            self.settings.floor_bytes_per_sec as f64 * self.settings.window.as_secs_f64();
        if (self.bytes_in_window as f64) < floor_bytes {
            return Err(FetchError::Stalled {
                floor_bytes_per_sec: self.settings.floor_bytes_per_sec,
                window: self.settings.window,
            });
        }
        self.window_start = now;
        self.bytes_in_window = 0;
        Ok(())
    }
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct RangeRequest<'a> {
    /// The URL (MCC form for a cache host).
    pub url: &'a Uri,
    /// The source kind, which picks the client (and so the connect timeout).
    pub kind: SourceKind,
    /// The bytes wanted. With an unknown length (the first request), the end may lie beyond the
    /// file; the answer is then shorter.
    pub range: Range<u64>,
    /// The file length, once known.
    pub file_len: Option<u64>,
    /// The validators of the version being downloaded, once known (sent as `If-Range`).
    pub validator: Option<&'a Validator>,
}

/// A successful range response.
#[derive(Debug, Clone)]
pub struct RangeResponse {
    /// The file length the response announced.
    pub file_len: u64,
    /// Its validators.
    pub validator: Validator,
    /// The bytes (of `range`, clipped to the file).
    pub data: Bytes,
}

/// A failed range request, with the valid bytes that arrived before it failed.
#[derive(Debug, Clone)]
pub struct RangeFailure {
    /// Why.
    pub error: FetchError,
    /// The first bytes of the range, received and checked.
    pub received: Bytes,
}

impl From<FetchError> for RangeFailure {
    fn from(error: FetchError) -> RangeFailure {
        RangeFailure {
            error,
            received: Bytes::new(),
        }
    }
}

/// The HTTP clients of a downloader.
#[derive(Clone)]
pub struct HttpClients {
    cache: Client<HttpsConnector, Empty<Bytes>>,
    origin: Client<HttpsConnector, Empty<Bytes>>,
    peer: Client<HttpsConnector, Empty<Bytes>>,
    first_byte_timeout: Duration,
    stall: StallSettings,
}

impl std::fmt::Debug for HttpClients {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HttpClients")
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

/// The TLS client settings for HTTPS sources: the public (webpki) roots, plus `extra_roots`
/// (`cache.ca_file`: an enterprise CA that signed a cache node's certificate). A certificate
/// that chains to none of them fails the connection, which counts as the host being
/// unreachable (DO's fallback rules); there is never a retry in plain HTTP.
pub fn tls_client_config(
    extra_roots: &[rustls_pki_types::CertificateDer<'static>],
) -> rustls::ClientConfig {
    outpost_shared::tls_roots::client_config(extra_roots)
}

fn build_client(
    connect_timeout: Duration,
    max_idle_per_host: usize,
    tls: rustls::ClientConfig,
) -> Client<HttpsConnector, Empty<Bytes>> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(max_idle_per_host)
        .build(https)
}

impl HttpClients {
    /// Builds both clients from the configuration.
    pub fn new(config: &ValidConfig) -> HttpClients {
        let raw = &config.raw;
        HttpClients {
            cache: build_client(
                raw.cache.connect_timeout,
                raw.cache.connections_per_host,
                tls_client_config(&config.cache_roots),
            ),
            origin: build_client(
                raw.origin.connect_timeout,
                raw.origin.connections,
                tls_client_config(&[]),
            ),
            peer: build_client(
                raw.peering.connect_timeout,
                raw.peering.connections_per_peer,
                tls_client_config(&[]),
            ),
            first_byte_timeout: raw.transfer.first_byte_timeout,
            stall: StallSettings {
                floor_bytes_per_sec: raw.transfer.stall_floor_bytes_per_sec,
                window: raw.transfer.stall_window,
            },
        }
    }

    /// Fetches `request.range`, adding each received chunk to `received_counter` and charging it
    /// to `meter`.
    pub async fn fetch_range(
        &self,
        request: RangeRequest<'_>,
        meter: &mut BandwidthMeter,
        received_counter: &AtomicU64,
    ) -> Result<RangeResponse, RangeFailure> {
        let client = match request.kind {
            SourceKind::CacheHost => &self.cache,
            SourceKind::Origin => &self.origin,
            SourceKind::Peer => &self.peer,
        };
        let mut builder = Request::get(request.url.clone())
            .header(header::USER_AGENT, USER_AGENT)
            // The bytes must be the file's bytes: a compressed transfer would change them.
            .header(header::ACCEPT_ENCODING, "identity")
            .header(
                header::RANGE,
                format!("bytes={}-{}", request.range.start, request.range.end - 1),
            );
        if let Some(if_range) = request.validator.and_then(Validator::if_range) {
            if let Ok(value) = HeaderValue::from_str(if_range) {
                builder = builder.header(header::IF_RANGE, value);
            }
        }
        let http_request = builder.body(Empty::new()).map_err(|error| {
            FetchError::BadResponse(format!("cannot build the request: {error}"))
        })?;
        let response =
            match tokio::time::timeout(self.first_byte_timeout, client.request(http_request)).await
            {
                Err(_) => return Err(FetchError::FirstByteTimeout(self.first_byte_timeout).into()),
                Ok(Err(error)) if error.is_connect() => {
                    return Err(FetchError::Connect(error_chain(&error)).into())
                }
                Ok(Err(error)) => return Err(FetchError::Cut(error_chain(&error)).into()),
                Ok(Ok(response)) => response,
            };
        let (parts, mut body) = response.into_parts();
        let expected = check_response_head(&request, parts.status, &parts.headers)?;

        let mut data = BytesMut::with_capacity(expected.body_len as usize);
        let mut watchdog = StallWatchdog::new(self.stall, Instant::now());
        loop {
            let frame = match tokio::time::timeout_at(watchdog.deadline(), body.frame()).await {
                Err(_) => {
                    watchdog
                        .check(Instant::now())
                        .map_err(|error| failure(error, &mut data))?;
                    continue;
                }
                Ok(None) => break,
                Ok(Some(Err(error))) => {
                    return Err(failure(FetchError::Cut(error_chain(&error)), &mut data))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(chunk) = frame.into_data() else {
                continue;
            };
            if data.len() as u64 + chunk.len() as u64 > expected.body_len {
                return Err(FetchError::BadResponse(format!(
                    "the body is longer than the {} bytes announced",
                    expected.body_len
                ))
                .into());
            }
            data.extend_from_slice(&chunk);
            received_counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            watchdog.record(chunk.len() as u64);
            let before_cap = Instant::now();
            meter.charge(chunk.len() as u64).await;
            watchdog.exclude(before_cap.elapsed());
            watchdog
                .check(Instant::now())
                .map_err(|error| failure(error, &mut data))?;
        }
        if (data.len() as u64) < expected.body_len {
            return Err(failure(
                FetchError::Cut(format!(
                    "the body ended after {} of {} bytes",
                    data.len(),
                    expected.body_len
                )),
                &mut data,
            ));
        }
        Ok(RangeResponse {
            file_len: expected.file_len,
            validator: expected.validator,
            data: data.freeze(),
        })
    }
}

fn failure(error: FetchError, data: &mut BytesMut) -> RangeFailure {
    RangeFailure {
        error,
        received: std::mem::take(data).freeze(),
    }
}

use outpost_shared::errors::error_chain;

/// What a checked response head promises.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExpectedBody {
    file_len: u64,
    body_len: u64,
    validator: Validator,
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(|text| text.trim().to_owned())
}

/// Checks a response head against the request: status, `Content-Range`, lengths, validators.
fn check_response_head(
    request: &RangeRequest<'_>,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<ExpectedBody, FetchError> {
    let validator = Validator {
        etag: header_text(headers, header::ETAG),
        last_modified: header_text(headers, header::LAST_MODIFIED),
    };
    let content_length =
        header_text(headers, header::CONTENT_LENGTH).and_then(|text| text.parse::<u64>().ok());
    if let Some(pinned) = request.validator {
        if let Some(difference) = pinned.difference(&validator) {
            return Err(FetchError::ContentChanged(difference));
        }
    }
    match status {
        StatusCode::PARTIAL_CONTENT => {
            let content_range = header_text(headers, header::CONTENT_RANGE)
                .ok_or_else(|| FetchError::BadResponse("206 without Content-Range".into()))?;
            let (first, last, total) = parse_content_range(&content_range).ok_or_else(|| {
                FetchError::BadResponse(format!("unusable Content-Range \"{content_range}\""))
            })?;
            let total = match (total, request.file_len) {
                (Some(total), Some(known)) if total != known => {
                    return Err(FetchError::ContentChanged(format!(
                        "length {known} became {total}"
                    )))
                }
                (Some(total), _) => total,
                (None, Some(known)) => known,
                (None, None) => {
                    return Err(FetchError::BadResponse(format!(
                        "Content-Range \"{content_range}\" does not say the length"
                    )))
                }
            };
            let expected_last = request.range.end.min(total).saturating_sub(1);
            if first != request.range.start || last != expected_last {
                return Err(FetchError::BadResponse(format!(
                    "asked for bytes {}-{}, got \"{content_range}\"",
                    request.range.start, expected_last
                )));
            }
            let body_len = last - first + 1;
            if content_length.is_some_and(|length| length != body_len) {
                return Err(FetchError::BadResponse(format!(
                    "Content-Length {content_length:?} disagrees with \"{content_range}\""
                )));
            }
            Ok(ExpectedBody {
                file_len: total,
                body_len,
                validator,
            })
        }
        StatusCode::OK => {
            // A whole-file answer is usable when the range asked for starts at 0 and covers the
            // whole file (a file smaller than the first piece); anything else means the server
            // ignored the Range, which this client does not support yet.
            let length = content_length
                .ok_or_else(|| FetchError::BadResponse("200 without Content-Length".into()))?;
            if let Some(known) = request.file_len {
                if known != length {
                    return Err(FetchError::ContentChanged(format!(
                        "length {known} became {length}"
                    )));
                }
            }
            if request.range.start != 0 || length > request.range.end {
                return Err(FetchError::BadResponse(
                    "the server ignored the Range header (200 instead of 206)".into(),
                ));
            }
            Ok(ExpectedBody {
                file_len: length,
                body_len: length,
                validator,
            })
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // Only an empty file answers the first range with 416 legitimately.
            let content_range = header_text(headers, header::CONTENT_RANGE).unwrap_or_default();
            if request.range.start == 0 && content_range.replace(' ', "") == "bytes*/0" {
                return Ok(ExpectedBody {
                    file_len: 0,
                    body_len: 0,
                    validator,
                });
            }
            Err(FetchError::Status(416))
        }
        other => Err(FetchError::Status(other.as_u16())),
    }
}

/// Parses `bytes first-last/total` (total may be `*`).
fn parse_content_range(text: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = text.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        digits => Some(digits.parse::<u64>().ok()?),
    };
    if last < first || total.is_some_and(|total| last >= total) {
        return None;
    }
    Some((first, last, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        for bad in [
            "bytes 9-1/10",
            "bytes 0-10/10",
            "bytes */10",
            "items 0-1/2",
            "bytes 0-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// A source's Content-Range is untrusted: parsing never panics, and what it accepts is
        /// consistent.
        #[test]
        fn any_content_range_parses_consistently_or_not_at_all(
            value in proptest::prelude::any::<String>(),
            near_miss in "bytes [0-9]{0,21}-[0-9]{0,21}/([0-9]{0,21}|\\*)",
        ) {
            for value in [value, near_miss] {
                if let Some((first, last, total)) = parse_content_range(&value) {
                    proptest::prop_assert!(first <= last, "{value:?}");
                    proptest::prop_assert!(total.is_none_or(|total| last < total), "{value:?}");
                }
            }
        }
    }

    fn head(status: u16, pairs: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        (StatusCode::from_u16(status).unwrap(), headers)
    }

    #[test]
    fn response_heads_are_checked_against_the_request() {
        let url: Uri = "http://example.org/f".parse().unwrap();
        let pinned = Validator {
            etag: Some("\"v1\"".into()),
            last_modified: None,
        };
        let first = RangeRequest {
            url: &url,
            kind: SourceKind::Origin,
            range: 0..1000,
            file_len: None,
            validator: None,
        };
        let later = RangeRequest {
            range: 1000..2000,
            file_len: Some(2500),
            validator: Some(&pinned),
            ..first.clone()
        };
        type Case<'a> = (
            &'a RangeRequest<'a>,
            (StatusCode, HeaderMap),
            Result<(u64, u64), &'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                &first,
                head(206, &[("content-range", "bytes 0-999/2500")]),
                Ok((2500, 1000)),
            ),
            (
                &first,
                head(206, &[("content-range", "bytes 0-99/100")]),
                Ok((100, 100)),
            ),
            (
                &first,
                head(200, &[("content-length", "100")]),
                Ok((100, 100)),
            ),
            (
                &first,
                head(200, &[("content-length", "5000")]),
                Err("ignored the Range"),
            ),
            (
                &first,
                head(416, &[("content-range", "bytes */0")]),
                Ok((0, 0)),
            ),
            (
                &first,
                head(206, &[("content-range", "bytes 0-999/*")]),
                Err("does not say the length"),
            ),
            (
                &later,
                head(
                    206,
                    &[
                        ("content-range", "bytes 1000-1999/2500"),
                        ("etag", "\"v1\""),
                    ],
                ),
                Ok((2500, 1000)),
            ),
            (
                &later,
                head(206, &[("content-range", "bytes 1000-1999/*")]),
                Ok((2500, 1000)),
            ),
            (
                &later,
                head(206, &[("content-range", "bytes 1000-1999/3000")]),
                Err("length 2500 became 3000"),
            ),
            (
                &later,
                head(
                    206,
                    &[
                        ("content-range", "bytes 1000-1999/2500"),
                        ("etag", "\"v2\""),
                    ],
                ),
                Err("ETag"),
            ),
            (
                &later,
                head(206, &[("content-range", "bytes 0-999/2500")]),
                Err("asked for bytes 1000-1999"),
            ),
            (
                &later,
                head(
                    206,
                    &[
                        ("content-range", "bytes 1000-1999/2500"),
                        ("content-length", "5"),
                    ],
                ),
                Err("disagrees"),
            ),
            (
                &later,
                head(200, &[("content-length", "2500")]),
                Err("ignored the Range"),
            ),
            (&later, head(404, &[]), Err("HTTP 404")),
            (&later, head(503, &[]), Err("HTTP 503")),
        ];
        for (request, (status, headers), expected) in cases {
            let result = check_response_head(request, status, &headers);
            match (result, expected) {
                (Ok(body), Ok((file_len, body_len))) => {
                    assert_eq!(
                        (body.file_len, body.body_len),
                        (file_len, body_len),
                        "{status} {headers:?}"
                    )
                }
                (Err(error), Err(text)) => {
                    assert!(error.to_string().contains(text), "{error} lacks {text}")
                }
                (result, expected) => panic!("{status} {headers:?}: {result:?} vs {expected:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fails_a_window_under_the_floor_and_forgives_time_held_by_the_cap() {
        let settings = StallSettings {
            floor_bytes_per_sec: 4000,
            window: Duration::from_secs(20),
        };
        let mut watchdog = StallWatchdog::new(settings, Instant::now());
        // A healthy window: 100 kB in 20 s.
        watchdog.record(100_000);
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(watchdog.check(Instant::now()).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(watchdog.check(Instant::now()).is_ok());
        // The next window gets 79 999 bytes (just under 4000 B/s) but 5 s were spent held back
        // by the bandwidth cap, so it is judged 5 s later.
        watchdog.record(79_999);
        watchdog.exclude(Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(watchdog.check(Instant::now()).is_ok());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            watchdog.check(Instant::now()),
            Err(FetchError::Stalled { .. })
        ));
    }
}
