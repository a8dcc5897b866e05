//! Answers that are not content: a redirect, `404 Not Found`, `410 Gone`, a `403` or a `5xx`
//! that an origin sends instead of the `200`/`206` a discovery asked for.
//!
//! A discovery reads such an answer whole, up to [`MAX_BODY_BYTES`], and hands the same
//! [`StatusAnswer`] to every request that waited on it, so each client sees the origin's status,
//! header section (a redirect's `Location`, a `Retry-After`...) and body, never a page of the
//! node's own. `301`, `308`, `404` and `410` (RFC 9110 §15.4.2, §15.4.9, §15.5.5, §15.5.11) are
//! then kept in [`StatusAnswers`] for as long as the origin explicitly says they are fresh
//! (`s-maxage`, `max-age` or `Expires`; a `404` at most `upstream.not_found_max_age`), and
//! served from memory meanwhile. Nothing else is kept: they are small, cheap to ask again, and
//! forgotten on restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, StatusCode};

use crate::cache::freshness::{self, CacheControlMode, Freshness};
use crate::cache::key::CacheKey;
use crate::http::hop_by_hop::remove_hop_by_hop;

/// The largest body of a non-content answer the node reads and relays; a longer one is
/// replaced by a short note of the node's (its status and headers still go to the client).
pub const MAX_BODY_BYTES: usize = 64 << 10;

/// The statuses kept while explicitly fresh.
pub const KEPT_STATUSES: [StatusCode; 4] = [
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::PERMANENT_REDIRECT,
    StatusCode::NOT_FOUND,
    StatusCode::GONE,
];

/// The memory all kept answers may take together (bodies and header sections).
pub const MEMORY_BUDGET_BYTES: u64 = 32 << 20;

/// An origin's answer other than content, as relayed to clients.
#[derive(Debug)]
pub struct StatusAnswer {
    /// The origin's status.
    pub status: StatusCode,
    /// The origin's end-to-end header fields; the framing fields (`Content-Length`,
    /// `Transfer-Encoding`) and `Age` are computed for each answer.
    pub headers: HeaderMap,
    /// The body, whole (at most [`MAX_BODY_BYTES`]).
    pub body: Bytes,
    /// When the origin's answer arrived.
    pub received: Instant,
    /// How long it may be served from memory; `None` when it is not kept.
    pub keep_for: Option<Duration>,
}

impl StatusAnswer {
    /// The answer `status` with the origin's `headers` and `body`; `keep_for` is judged from the
    /// origin's freshness information under `mode`, with a `404` capped at
    /// `not_found_max_age`.
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        mode: CacheControlMode,
        not_found_max_age: Duration,
    ) -> StatusAnswer {
        remove_hop_by_hop(&mut headers);
        for computed in [header::CONTENT_LENGTH, header::AGE] {
            headers.remove(computed);
        }
        let keep_for = kept_lifetime(status, &headers, mode, not_found_max_age);
        StatusAnswer {
            status,
            headers,
            body,
            received: Instant::now(),
            keep_for,
        }
    }

    /// The time since the origin's answer arrived.
    pub fn age(&self) -> Duration {
        self.received.elapsed()
    }

    /// What the answer weighs against [`MEMORY_BUDGET_BYTES`].
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        u32::try_from(self.body.len() + headers + 256).unwrap_or(u32::MAX)
    }
}

/// How long an answer `status` with `headers` may be kept: only the [`KEPT_STATUSES`], only
/// with an explicit, non-zero lifetime the shared-cache rules allow (`no-store`, `private` and
/// `no-cache` keep nothing; neither does `cache_control = "ignore"`, which has no lifetime to
/// go by), and a `404` for at most `not_found_max_age`.
pub fn kept_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    mode: CacheControlMode,
    not_found_max_age: Duration,
) -> Option<Duration> {
    if !KEPT_STATUSES.contains(&status) {
        return None;
    }
    let Ok(Freshness::For(lifetime)) = freshness::judge(headers, mode) else {
        return None;
    };
    let lifetime = if status == StatusCode::NOT_FOUND {
        lifetime.min(not_found_max_age)
    } else {
        lifetime
    };
    (!lifetime.is_zero()).then_some(lifetime)
}

/// Expires each kept answer after its own lifetime.
struct ByLifetime;

impl moka::Expiry<CacheKey, Arc<StatusAnswer>> for ByLifetime {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        answer: &Arc<StatusAnswer>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(answer.keep_for.unwrap_or(Duration::ZERO))
    }
}

/// The kept answers, by cache key: bounded by [`MEMORY_BUDGET_BYTES`], each gone after its
/// lifetime.
pub struct StatusAnswers {
    answers: moka::sync::Cache<CacheKey, Arc<StatusAnswer>>,
}

impl Default for StatusAnswers {
    fn default() -> Self {
        StatusAnswers {
            answers: moka::sync::Cache::builder()
                .max_capacity(MEMORY_BUDGET_BYTES)
                .weigher(|_key, answer: &Arc<StatusAnswer>| answer.weight())
                .expire_after(ByLifetime)
                .build(),
        }
    }
}

impl std::fmt::Debug for StatusAnswers {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StatusAnswers")
            .field("kept", &self.answers.entry_count())
            .finish()
    }
}

impl StatusAnswers {
    /// The kept answer for `key`, if it is still fresh.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<StatusAnswer>> {
        self.answers
            .get(key)
            .filter(|answer| answer.keep_for.is_some_and(|keep| answer.age() < keep))
    }

    /// Keeps `answer` for `key` when it may be kept; true when it was.
    pub fn keep(&self, key: &CacheKey, answer: &Arc<StatusAnswer>) -> bool {
        if answer.keep_for.is_none() {
            return false;
        }
        self.answers.insert(key.clone(), answer.clone());
        true
    }

    /// Forgets the answer for `key` (the client asked for a check, or an unsafe method
    /// changed the resource).
    pub fn forget(&self, key: &CacheKey) {
        self.answers.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    const CAP: Duration = Duration::from_secs(300);

    fn kept(status: u16, pairs: &[(&'static str, &'static str)]) -> Option<u64> {
        kept_lifetime(
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            CacheControlMode::Honor,
            CAP,
        )
        .map(|lifetime| lifetime.as_secs())
    }

    #[test]
    fn only_explicitly_fresh_redirects_and_missing_resources_are_kept() {
        let year = [("cache-control", "max-age=31536000")];
        assert_eq!(kept(301, &year), Some(31_536_000));
        assert_eq!(kept(308, &year), Some(31_536_000));
        assert_eq!(kept(410, &year), Some(31_536_000));
        // A 404 is capped: the file may appear any minute.
        assert_eq!(kept(404, &year), Some(300));
        assert_eq!(kept(404, &[("cache-control", "s-maxage=60")]), Some(60));
        // Other statuses never, however fresh.
        for status in [200, 206, 302, 307, 403, 500, 503] {
            assert_eq!(kept(status, &year), None, "{status}");
        }
        // No explicit lifetime (a heuristic is not enough), or one that forbids keeping.
        assert_eq!(kept(301, &[]), None);
        assert_eq!(
            kept(
                301,
                &[
                    ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
                    ("date", "Mon, 01 Jan 2026 00:00:00 GMT")
                ]
            ),
            None
        );
        for forbidding in ["no-store", "private, max-age=60", "no-cache", "max-age=0"] {
            assert_eq!(kept(404, &[("cache-control", forbidding)]), None);
        }
        let ignored = kept_lifetime(
            StatusCode::NOT_FOUND,
            &headers(&year),
            CacheControlMode::Ignore,
            CAP,
        );
        assert_eq!(ignored, None);
    }

    #[test]
    fn framing_and_hop_by_hop_fields_are_not_relayed_as_sent() {
        let answer = StatusAnswer::new(
            StatusCode::MOVED_PERMANENTLY,
            headers(&[
                ("location", "http://example.test/new"),
                ("content-length", "5"),
                ("age", "10"),
                ("connection", "close"),
                ("x-origin", "1"),
            ]),
            Bytes::from_static(b"moved"),
            CacheControlMode::Honor,
            CAP,
        );
        let mut names: Vec<&str> = answer.headers.keys().map(|name| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["location", "x-origin"]);
        assert_eq!(answer.keep_for, None);
    }

    #[test]
    fn kept_answers_are_served_until_their_lifetime_ends() {
        let answers = StatusAnswers::default();
        let key = CacheKey::new("example.test", "/gone");
        let short = Arc::new(StatusAnswer::new(
            StatusCode::GONE,
            headers(&[("cache-control", "max-age=1")]),
            Bytes::new(),
            CacheControlMode::Honor,
            CAP,
        ));
        assert!(answers.keep(&key, &short));
        assert!(answers.get(&key).is_some());
        std::thread::sleep(Duration::from_millis(1100));
        assert!(answers.get(&key).is_none());
        let not_kept = Arc::new(StatusAnswer::new(
            StatusCode::FORBIDDEN,
            headers(&[("cache-control", "max-age=60")]),
            Bytes::new(),
            CacheControlMode::Honor,
            CAP,
        ));
        assert!(!answers.keep(&key, &not_kept));
        assert!(answers.get(&key).is_none());
    }
}
