//! What an origin's `Cache-Control` and `Expires` allow a shared cache to do (RFC 9111): whether a
//! response may be stored at all, and how long a stored version is served before the node asks
//! the origin again.
//!
//! The node judges the first response of every version (the discovery) and every answer to a
//! revalidation. What it decides here is a policy, not a clock: the index entry
//! keeps when the version was last confirmed, and the fill layer's revalidation compares.

use std::time::{Duration, SystemTime};

use headers::{CacheControl, HeaderMapExt};
use http::header::{self, HeaderMap, HeaderValue};

/// `upstream.cache_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheControlMode {
    /// Follow the origin's `Cache-Control` and `Expires`.
    Honor,
    /// Store everything and check every version after `upstream.revalidate_after`, whatever the
    /// origin says (what lancache's nginx does with `proxy_ignore_headers`).
    Ignore,
}

impl CacheControlMode {
    /// `"honor"` or `"ignore"`.
    pub fn parse(text: &str) -> Option<CacheControlMode> {
        match text {
            "honor" => Some(CacheControlMode::Honor),
            "ignore" => Some(CacheControlMode::Ignore),
            _ => None,
        }
    }
}

/// What decides freshness for one origin: `upstream.revalidate_after` and
/// `upstream.cache_control`, or the origin's own `[[origin]]` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreshnessPolicy {
    /// The lifetime of versions whose origin gives none.
    pub revalidate_after: Duration,
    /// Whether the origin's `Cache-Control` and `Expires` count.
    pub cache_control: CacheControlMode,
}

/// How long a stored version may be served before the origin is asked whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The origin gave no freshness information: `upstream.revalidate_after` applies.
    Default,
    /// The origin set a lifetime (`s-maxage`, `max-age` or `Expires`); zero means check before
    /// every use (`no-cache`, an `Expires` in the past, or freshness the node cannot read).
    For(Duration),
}

impl Freshness {
    /// The lifetime, with `default` standing in for [`Freshness::Default`].
    pub fn lifetime(self, default: Duration) -> Duration {
        match self {
            Freshness::Default => default,
            Freshness::For(lifetime) => lifetime,
        }
    }

    /// The lifetime in whole seconds, as stored in object metadata (`None` for the default).
    pub fn to_secs(self) -> Option<u64> {
        match self {
            Freshness::Default => None,
            Freshness::For(lifetime) => Some(lifetime.as_secs()),
        }
    }

    /// The inverse of [`Freshness::to_secs`].
    pub fn from_secs(secs: Option<u64>) -> Freshness {
        secs.map_or(Freshness::Default, |secs| {
            Freshness::For(Duration::from_secs(secs))
        })
    }
}

/// Why a response may not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// The origin sent a 200 without `Content-Length`: the node cannot slice it.
    NoLength,
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: private`: meant for one user, never for a shared cache.
    Private,
    /// The header section is above
    /// [`MAX_STORED_HEADER_BYTES`](crate::cache::header_section::MAX_STORED_HEADER_BYTES).
    HeadersTooLarge,
}

impl std::fmt::Display for NotStorable {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            NotStorable::NoLength => "no length",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::HeadersTooLarge => "header section too large",
        })
    }
}

/// Judges an origin response's headers: may it be stored, and for how long is it fresh.
/// A lifetime counts from when the origin generated the response, so the `Age` an upstream cache
/// reports is already spent.
pub fn judge(headers: &HeaderMap, mode: CacheControlMode) -> Result<Freshness, NotStorable> {
    if mode == CacheControlMode::Ignore {
        return Ok(Freshness::Default);
    }
    let freshness = if headers.contains_key(header::CACHE_CONTROL) {
        judge_cache_control(headers)?
    } else if headers.contains_key(header::EXPIRES) {
        Freshness::For(expires_lifetime(headers))
    } else {
        Freshness::Default
    };
    let age = headers
        .typed_get::<headers::Age>()
        .map_or(Duration::ZERO, |age| Duration::from_secs(age.as_secs()));
    Ok(match freshness {
        Freshness::For(lifetime) => Freshness::For(lifetime.saturating_sub(age)),
        Freshness::Default => Freshness::Default,
    })
}

fn judge_cache_control(headers: &HeaderMap) -> Result<Freshness, NotStorable> {
    // Directive names are case-insensitive; the parser compares them in lower case.
    let mut lowered = HeaderMap::new();
    for value in headers.get_all(header::CACHE_CONTROL) {
        if let Ok(value) = HeaderValue::from_bytes(value.as_bytes().to_ascii_lowercase().as_ref()) {
            lowered.append(header::CACHE_CONTROL, value);
        }
    }
    let Some(directives) = lowered.typed_get::<CacheControl>() else {
        // Unreadable (a `max-age` that is not a number...): still refuse what it forbids, and
        // treat the rest as stale, as RFC 9111 §4.2.1 encourages.
        let raw = lowered
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let has = |name: &str| raw.split(',').any(|directive| directive.trim() == name);
        if has("no-store") {
            return Err(NotStorable::NoStore);
        }
        if has("private") {
            return Err(NotStorable::Private);
        }
        return Ok(Freshness::For(Duration::ZERO));
    };
    if directives.no_store() {
        return Err(NotStorable::NoStore);
    }
    if directives.private() {
        return Err(NotStorable::Private);
    }
    if directives.no_cache() {
        return Ok(Freshness::For(Duration::ZERO));
    }
    if let Some(lifetime) = directives.s_max_age().or_else(|| directives.max_age()) {
        return Ok(Freshness::For(lifetime));
    }
    if headers.contains_key(header::EXPIRES) {
        return Ok(Freshness::For(expires_lifetime(headers)));
    }
    Ok(Freshness::Default)
}

/// `Expires` minus `Date` (or now, without a `Date`); zero for a date in the past or one that
/// does not parse, which RFC 9111 §5.3 says means already expired.
fn expires_lifetime(headers: &HeaderMap) -> Duration {
    let Some(expires) = headers.typed_get::<headers::Expires>() else {
        return Duration::ZERO;
    };
    let date = headers
        .typed_get::<headers::Date>()
        .map_or_else(SystemTime::now, SystemTime::from);
    SystemTime::from(expires)
        .duration_since(date)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn honor(pairs: &[(&str, &str)]) -> Result<Freshness, NotStorable> {
        judge(&headers(pairs), CacheControlMode::Honor)
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn no_freshness_information_means_the_configured_default() {
        assert_eq!(honor(&[]), Ok(Freshness::Default));
        assert_eq!(
            honor(&[("cache-control", "public")]),
            Ok(Freshness::Default)
        );
        assert_eq!(Freshness::Default.lifetime(SECOND * 7), SECOND * 7);
    }

    #[test]
    fn no_store_and_private_are_never_stored_whatever_else_is_said() {
        assert_eq!(
            honor(&[("cache-control", "no-store")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            honor(&[("cache-control", "max-age=600, NO-STORE")]),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            honor(&[("cache-control", "public"), ("cache-control", "private")]),
            Err(NotStorable::Private)
        );
        // Unreadable freshness does not hide a no-store.
        assert_eq!(
            honor(&[("cache-control", "max-age=soon, no-store")]),
            Err(NotStorable::NoStore)
        );
    }

    #[test]
    fn s_maxage_wins_over_max_age_and_max_age_over_expires() {
        assert_eq!(
            honor(&[("cache-control", "max-age=60, s-maxage=600")]),
            Ok(Freshness::For(SECOND * 600))
        );
        assert_eq!(
            honor(&[
                ("cache-control", "public, max-age=120"),
                ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
                ("expires", "Mon, 23 Nov 2026 10:00:00 GMT"),
            ]),
            Ok(Freshness::For(SECOND * 120))
        );
    }

    #[test]
    fn an_upstream_caches_age_is_already_spent() {
        assert_eq!(
            honor(&[("cache-control", "max-age=600"), ("age", "200")]),
            Ok(Freshness::For(SECOND * 400))
        );
        assert_eq!(
            honor(&[("cache-control", "max-age=600"), ("age", "9000")]),
            Ok(Freshness::For(Duration::ZERO))
        );
        // No lifetime from the origin: the node's own default is not shortened.
        assert_eq!(honor(&[("age", "9000")]), Ok(Freshness::Default));
    }

    #[test]
    fn no_cache_and_unreadable_freshness_check_on_every_use() {
        assert_eq!(
            honor(&[("cache-control", "no-cache, max-age=600")]),
            Ok(Freshness::For(Duration::ZERO))
        );
        assert_eq!(
            honor(&[("cache-control", "max-age=\"soon\"")]),
            Ok(Freshness::For(Duration::ZERO))
        );
    }

    #[test]
    fn expires_counts_from_the_origins_date() {
        assert_eq!(
            honor(&[
                ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
                ("expires", "Sun, 22 Nov 2026 10:30:00 GMT"),
            ]),
            Ok(Freshness::For(SECOND * 1800))
        );
        // In the past, or not a date: already stale.
        assert_eq!(
            honor(&[
                ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
                ("expires", "Sun, 22 Nov 2026 09:00:00 GMT"),
            ]),
            Ok(Freshness::For(Duration::ZERO))
        );
        assert_eq!(
            honor(&[("expires", "0")]),
            Ok(Freshness::For(Duration::ZERO))
        );
    }

    #[test]
    fn ignore_mode_stores_everything_with_the_default_lifetime() {
        let marked = headers(&[("cache-control", "private, no-store, max-age=5")]);
        assert_eq!(
            judge(&marked, CacheControlMode::Ignore),
            Ok(Freshness::Default)
        );
    }

    proptest::proptest! {
        /// Origin headers are untrusted: judging never panics, and `no-store` is never stored
        /// whatever surrounds it.
        #[test]
        fn any_origin_headers_are_judged_and_no_store_always_wins(
            cache_control in "[ -~]{0,60}",
            expires in "[ -~]{0,40}",
            age in "[ -~]{0,12}",
            position in 0usize..4,
        ) {
            let mut pairs = vec![
                ("cache-control", cache_control.as_str()),
                ("expires", expires.as_str()),
                ("age", age.as_str()),
            ];
            let _ = honor(&pairs);
            pairs.insert(position.min(pairs.len()), ("cache-control", "no-store"));
            proptest::prop_assert_eq!(honor(&pairs), Err(NotStorable::NoStore));
        }
    }

    #[test]
    fn stored_seconds_round_trip() {
        for freshness in [
            Freshness::Default,
            Freshness::For(Duration::ZERO),
            Freshness::For(SECOND * 86_400),
        ] {
            assert_eq!(Freshness::from_secs(freshness.to_secs()), freshness);
        }
    }
}
