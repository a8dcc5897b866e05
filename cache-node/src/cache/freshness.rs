//! What an origin's `Cache-Control` and `Expires` allow a shared cache to do (RFC 9111): whether a
//! response may be stored at all, and how long a stored version is served before the node asks
//! the origin again.
//!
//! The node judges the first response of every version (the discovery) and every answer to a
//! revalidation. What it decides here is a policy, not a clock: the index entry
//! keeps when the version was last confirmed, and the fill layer's revalidation compares.
//!
//! Besides the lifetime, the origin's directives say what may happen once a version is stale
//! ([`StaleDirectives`]: `stale-while-revalidate` and `stale-if-error` from RFC 5861,
//! `must-revalidate` and `proxy-revalidate`), and a client's request may ask for a fresher
//! answer or for no origin contact at all ([`ClientDirectives`]). [`check_needed`] puts the
//! three together with the origin's settings into one decision.

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
    /// How long past its lifetime a version is still served when the origin cannot be asked
    /// (`upstream.stale_if_error`), unless the origin's own `stale-if-error` says otherwise.
    pub stale_if_error: Duration,
    /// `[[origin]] serve_stale_on_error`: a failed check serves the stored version (within the
    /// `stale_if_error` window) even under `must-revalidate` or `proxy-revalidate`.
    pub serve_stale_on_error: bool,
    /// `[[origin]] serve_stale_while_revalidating`: every stale hit is answered from disk at once
    /// and checked in the background, as Microsoft Connected Cache does.
    pub serve_stale_while_revalidating: bool,
    /// `[[origin]] ignore_client_no_cache`: a client's `no-cache` or `max-age` does not force a
    /// check with the origin.
    pub ignore_client_no_cache: bool,
}

impl FreshnessPolicy {
    /// The policy of an origin with no `[[origin]]` switches set.
    pub fn new(revalidate_after: Duration, cache_control: CacheControlMode) -> FreshnessPolicy {
        FreshnessPolicy {
            revalidate_after,
            cache_control,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
            serve_stale_on_error: false,
            serve_stale_while_revalidating: false,
            ignore_client_no_cache: false,
        }
    }
}

/// `upstream.stale_if_error` when the config does not set it: a week, so a branch office rides
/// out a long WAN outage on what it has, but never serves a version without end.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(7 * 24 * 3600);

/// The share of (`Date` − `Last-Modified`) that a version with no explicit lifetime is fresh
/// for (RFC 9111 §4.2.2 suggests 10%), in percent.
pub const HEURISTIC_PERCENT: u32 = 10;

/// How long a stored version may be served before the origin is asked whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The origin gave no freshness information: `upstream.revalidate_after` applies.
    Default,
    /// The origin set a lifetime (`s-maxage`, `max-age` or `Expires`); zero means check before
    /// every use (`no-cache`, an `Expires` in the past, or freshness the node cannot read).
    For(Duration),
    /// The origin gave only `Last-Modified`: [`HEURISTIC_PERCENT`] of the time since then
    /// (RFC 9111 §4.2.2), capped at `upstream.revalidate_after`, so the heuristic only ever
    /// shortens the configured default (a file changed an hour ago is checked after six
    /// minutes; one untouched for a year still after `revalidate_after`).
    Heuristic(Duration),
}

impl Freshness {
    /// The lifetime, with `default` standing in for [`Freshness::Default`] and capping
    /// [`Freshness::Heuristic`].
    pub fn lifetime(self, default: Duration) -> Duration {
        match self {
            Freshness::Default => default,
            Freshness::For(lifetime) => lifetime,
            Freshness::Heuristic(lifetime) => lifetime.min(default),
        }
    }

    /// The explicit lifetime in whole seconds, as stored in object metadata (`None` for the
    /// default and for a heuristic, which [`Freshness::heuristic_secs`] stores).
    pub fn to_secs(self) -> Option<u64> {
        match self {
            Freshness::Default | Freshness::Heuristic(_) => None,
            Freshness::For(lifetime) => Some(lifetime.as_secs()),
        }
    }

    /// The heuristic lifetime in whole seconds, as stored in object metadata.
    pub fn heuristic_secs(self) -> Option<u64> {
        match self {
            Freshness::Heuristic(lifetime) => Some(lifetime.as_secs()),
            Freshness::Default | Freshness::For(_) => None,
        }
    }

    /// The inverse of [`Freshness::to_secs`] and [`Freshness::heuristic_secs`] together.
    pub fn from_stored(secs: Option<u64>, heuristic_secs: Option<u64>) -> Freshness {
        match (secs, heuristic_secs) {
            (Some(secs), _) => Freshness::For(Duration::from_secs(secs)),
            (None, Some(secs)) => Freshness::Heuristic(Duration::from_secs(secs)),
            (None, None) => Freshness::Default,
        }
    }

    /// The inverse of [`Freshness::to_secs`] for an explicit lifetime.
    pub fn from_secs(secs: Option<u64>) -> Freshness {
        Freshness::from_stored(secs, None)
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
    /// `Vary: *`: the response depends on more than the request (RFC 9111 §4.1).
    VaryAny,
    /// `Vary` names more request fields than the node keys variants by (four).
    VaryTooWide,
    /// A `Vary` that is not a list of field names.
    VaryUnreadable,
    /// `Vary` names a field the node sets itself on origin requests (`Range`, `Host`, a
    /// conditional, a hop-by-hop field).
    VaryReserved,
    /// The object already has as many variants as the node keeps (eight), or
    /// the request's value for a varying field is too long to key by.
    TooManyVariants,
}

impl std::fmt::Display for NotStorable {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            NotStorable::NoLength => "no length",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::HeadersTooLarge => "header section too large",
            NotStorable::VaryAny => "Vary: *",
            NotStorable::VaryTooWide => "Vary names too many fields",
            NotStorable::VaryUnreadable => "unreadable Vary",
            NotStorable::VaryReserved => "Vary names a field the node sets itself",
            NotStorable::TooManyVariants => "too many variants",
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
        heuristic(headers)
    };
    let age = headers
        .typed_get::<headers::Age>()
        .map_or(Duration::ZERO, |age| Duration::from_secs(age.as_secs()));
    Ok(match freshness {
        Freshness::For(lifetime) => Freshness::For(lifetime.saturating_sub(age)),
        Freshness::Heuristic(lifetime) => Freshness::Heuristic(lifetime.saturating_sub(age)),
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
    Ok(heuristic(headers))
}

/// RFC 9111 §4.2.2: with no explicit lifetime, [`HEURISTIC_PERCENT`] of the time between
/// `Last-Modified` and `Date` (or now, without a `Date`); the configured default without a
/// readable `Last-Modified`. A `Last-Modified` after `Date` gives zero: check on every use.
fn heuristic(headers: &HeaderMap) -> Freshness {
    let Some(last_modified) = headers.typed_get::<headers::LastModified>() else {
        return Freshness::Default;
    };
    let date = headers
        .typed_get::<headers::Date>()
        .map_or_else(SystemTime::now, SystemTime::from);
    let unchanged_for = date
        .duration_since(SystemTime::from(last_modified))
        .unwrap_or(Duration::ZERO);
    Freshness::Heuristic(unchanged_for * HEURISTIC_PERCENT / 100)
}

/// What an origin's directives allow once a stored version is stale (RFC 9111 §4.2.4 and
/// §5.2.2.2, RFC 5861). Stored with the version in its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StaleDirectives {
    /// `stale-while-revalidate=N`: for N after going stale, answer at once and check in the
    /// background.
    pub while_revalidate: Option<Duration>,
    /// `stale-if-error=N`: for N after going stale, a failed check serves the stored version.
    pub if_error: Option<Duration>,
    /// `must-revalidate` or `proxy-revalidate` (this is a shared cache): never serve the version
    /// stale without a successful check.
    pub must_revalidate: bool,
}

impl StaleDirectives {
    /// Reads the directives from an origin response; none count under `cache_control = "ignore"`.
    /// A directive whose value is not a number is ignored.
    pub fn of(headers: &HeaderMap, mode: CacheControlMode) -> StaleDirectives {
        let mut directives = StaleDirectives::default();
        if mode == CacheControlMode::Ignore {
            return directives;
        }
        for (name, value) in cache_control_directives(headers) {
            let seconds = || {
                value
                    .as_deref()
                    .and_then(|value| value.parse::<u64>().ok())
                    .map(Duration::from_secs)
            };
            match name.as_str() {
                "stale-while-revalidate" => directives.while_revalidate = seconds(),
                "stale-if-error" => directives.if_error = seconds(),
                "must-revalidate" | "proxy-revalidate" => directives.must_revalidate = true,
                _ => {}
            }
        }
        directives
    }

    /// The directives as stored in object metadata: the two windows in whole seconds and the
    /// `must-revalidate` flag.
    pub fn to_stored(self) -> (Option<u64>, Option<u64>, bool) {
        (
            self.while_revalidate.map(|window| window.as_secs()),
            self.if_error.map(|window| window.as_secs()),
            self.must_revalidate,
        )
    }

    /// The inverse of [`StaleDirectives::to_stored`].
    pub fn from_stored(
        while_revalidate_secs: Option<u64>,
        if_error_secs: Option<u64>,
        must_revalidate: bool,
    ) -> StaleDirectives {
        StaleDirectives {
            while_revalidate: while_revalidate_secs.map(Duration::from_secs),
            if_error: if_error_secs.map(Duration::from_secs),
            must_revalidate,
        }
    }
}

/// What a client's request asks of the cache (RFC 9111 §5.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientDirectives {
    /// The oldest confirmation the client accepts: `max-age=N`; `no-cache` (and `Pragma:
    /// no-cache` without a `Cache-Control`) is zero, which forces a check with the origin.
    pub max_age: Option<Duration>,
    /// `only-if-cached`: answer from what is stored or `504`, never contact the origin.
    pub only_if_cached: bool,
    /// `min-fresh=N`: the client wants a version that stays fresh for at least N more.
    pub min_fresh: Option<Duration>,
    /// `max-stale[=N]`: the client takes a version stale by at most N (any, without a value)
    /// without a check, unless the origin said `must-revalidate`.
    pub max_stale: Option<Duration>,
}

impl ClientDirectives {
    /// Reads a client request's `Cache-Control` (or `Pragma`). Unreadable values are ignored.
    pub fn of(headers: &HeaderMap) -> ClientDirectives {
        let mut directives = ClientDirectives::default();
        if !headers.contains_key(header::CACHE_CONTROL) {
            let pragma_no_cache = headers.get_all(header::PRAGMA).iter().any(|value| {
                value
                    .as_bytes()
                    .split(|byte| *byte == b',')
                    .any(|directive| directive.trim_ascii().eq_ignore_ascii_case(b"no-cache"))
            });
            if pragma_no_cache {
                directives.max_age = Some(Duration::ZERO);
            }
            return directives;
        }
        for (name, value) in cache_control_directives(headers) {
            match name.as_str() {
                "no-cache" => directives.max_age = Some(Duration::ZERO),
                "max-age" => {
                    if let Some(seconds) = value.and_then(|value| value.parse::<u64>().ok()) {
                        let asked = Duration::from_secs(seconds);
                        directives.max_age =
                            Some(directives.max_age.map_or(asked, |max| max.min(asked)));
                    }
                }
                "only-if-cached" => directives.only_if_cached = true,
                "min-fresh" => {
                    if let Some(seconds) = value.and_then(|value| value.parse::<u64>().ok()) {
                        directives.min_fresh = Some(Duration::from_secs(seconds));
                    }
                }
                "max-stale" => {
                    directives.max_stale = match value {
                        None => Some(Duration::MAX),
                        Some(value) => value.parse::<u64>().ok().map(Duration::from_secs),
                    }
                }
                _ => {}
            }
        }
        directives
    }
}

/// Every `Cache-Control` directive as (lower-case name, unquoted value). Bounded by the header
/// section hyper accepted, and nothing is kept beyond the iteration.
fn cache_control_directives(
    headers: &HeaderMap,
) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|directive| {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name, Some(value.trim().trim_matches('"').to_owned())),
                None => (directive, None),
            };
            let name = name.trim().to_ascii_lowercase();
            (!name.is_empty()).then_some((name, value))
        })
}

/// What a request must do about a stored version before it is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Fresh enough: serve it.
    None,
    /// Stale, but within `stale-while-revalidate` (or the origin's
    /// `serve_stale_while_revalidating`): serve it at once and check in the background.
    Background,
    /// Check with the origin first. When the check fails, the version is served only if
    /// `serve_stale_on_failure`; otherwise the client gets a `504`.
    Foreground {
        /// Within the `stale-if-error` window and not bound by `must-revalidate`.
        serve_stale_on_failure: bool,
    },
}

/// Decides what a request must do about a stored version confirmed `age` ago (`None`: unknown)
/// whose origin gave `freshness` and `directives`, under the origin's `policy` and the client's
/// `client` directives.
pub fn check_needed(
    policy: &FreshnessPolicy,
    freshness: Freshness,
    directives: StaleDirectives,
    age: Option<Duration>,
    client: ClientDirectives,
) -> Check {
    let lifetime = freshness.lifetime(policy.revalidate_after);
    let strict = directives.must_revalidate && !policy.serve_stale_on_error;
    let Some(age) = age else {
        return Check::Foreground {
            serve_stale_on_failure: !strict,
        };
    };
    let client_forces_check = !policy.ignore_client_no_cache
        && (client.max_age.is_some_and(|max_age| age > max_age)
            || client
                .min_fresh
                .is_some_and(|min_fresh| age.saturating_add(min_fresh) >= lifetime));
    let fresh = age < lifetime;
    if fresh && !client_forces_check {
        return Check::None;
    }
    let stale_for = age.saturating_sub(lifetime);
    // RFC 9111 §5.2.1.2: a client may take a stale version, but never one the origin said
    // must be revalidated.
    if !fresh
        && !client_forces_check
        && !directives.must_revalidate
        && client
            .max_stale
            .is_some_and(|max_stale| stale_for <= max_stale)
    {
        return Check::None;
    }
    if !fresh && !client_forces_check && !directives.must_revalidate {
        let within_window = directives
            .while_revalidate
            .is_some_and(|window| stale_for <= window);
        if policy.serve_stale_while_revalidating || within_window {
            return Check::Background;
        }
    }
    let error_window = directives.if_error.unwrap_or(policy.stale_if_error);
    Check::Foreground {
        serve_stale_on_failure: !strict && stale_for <= error_window,
    }
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
    fn only_last_modified_gives_a_tenth_of_its_age_capped_by_the_default() {
        let judged = honor(&[
            ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
            ("last-modified", "Sun, 22 Nov 2026 09:00:00 GMT"),
        ]);
        assert_eq!(judged, Ok(Freshness::Heuristic(SECOND * 360)));
        let heuristic = judged.unwrap();
        assert_eq!(heuristic.lifetime(SECOND * 3600), SECOND * 360);
        assert_eq!(heuristic.lifetime(SECOND * 60), SECOND * 60, "capped");
        // Also under a Cache-Control without a lifetime, and less any upstream Age.
        assert_eq!(
            honor(&[
                ("cache-control", "public"),
                ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
                ("last-modified", "Sun, 22 Nov 2026 09:00:00 GMT"),
                ("age", "60"),
            ]),
            Ok(Freshness::Heuristic(SECOND * 300))
        );
        // Modified after its Date: check on every use. An explicit lifetime wins.
        assert_eq!(
            honor(&[
                ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
                ("last-modified", "Sun, 22 Nov 2026 11:00:00 GMT"),
            ]),
            Ok(Freshness::Heuristic(Duration::ZERO))
        );
        assert_eq!(
            honor(&[
                ("cache-control", "max-age=5"),
                ("last-modified", "Sun, 22 Nov 2020 09:00:00 GMT"),
            ]),
            Ok(Freshness::For(SECOND * 5))
        );
        assert_eq!(
            judge(
                &headers(&[("last-modified", "Sun, 22 Nov 2020 09:00:00 GMT")]),
                CacheControlMode::Ignore
            ),
            Ok(Freshness::Default)
        );
    }

    #[test]
    fn stale_directives_are_read_case_insensitively_and_unreadable_ones_ignored() {
        let directives = StaleDirectives::of(
            &headers(&[
                ("cache-control", "max-age=1, Stale-While-Revalidate=30"),
                ("cache-control", "stale-if-error=\"600\", PROXY-REVALIDATE"),
            ]),
            CacheControlMode::Honor,
        );
        assert_eq!(
            directives,
            StaleDirectives {
                while_revalidate: Some(SECOND * 30),
                if_error: Some(SECOND * 600),
                must_revalidate: true,
            }
        );
        let (swr, sie, must) = directives.to_stored();
        assert_eq!(StaleDirectives::from_stored(swr, sie, must), directives);
        assert_eq!(
            StaleDirectives::of(
                &headers(&[("cache-control", "stale-if-error=soon, must-revalidate")]),
                CacheControlMode::Ignore
            ),
            StaleDirectives::default()
        );
        assert_eq!(
            StaleDirectives::of(
                &headers(&[("cache-control", "stale-if-error=soon")]),
                CacheControlMode::Honor
            ),
            StaleDirectives::default()
        );
    }

    #[test]
    fn client_directives_table() {
        let cases: [(&[(&str, &str)], ClientDirectives); 10] = [
            (
                &[("cache-control", "min-fresh=30")],
                ClientDirectives {
                    min_fresh: Some(SECOND * 30),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("cache-control", "max-stale")],
                ClientDirectives {
                    max_stale: Some(Duration::MAX),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("cache-control", "max-stale=\"120\"")],
                ClientDirectives {
                    max_stale: Some(SECOND * 120),
                    ..ClientDirectives::default()
                },
            ),
            (&[], ClientDirectives::default()),
            (
                &[("cache-control", "no-cache")],
                ClientDirectives {
                    max_age: Some(Duration::ZERO),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("cache-control", "max-age=0")],
                ClientDirectives {
                    max_age: Some(Duration::ZERO),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("cache-control", "max-age=60, max-age=30")],
                ClientDirectives {
                    max_age: Some(SECOND * 30),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("pragma", "no-cache")],
                ClientDirectives {
                    max_age: Some(Duration::ZERO),
                    ..ClientDirectives::default()
                },
            ),
            // Pragma counts only without a Cache-Control (RFC 9111 §5.4).
            (
                &[("pragma", "no-cache"), ("cache-control", "max-age=60")],
                ClientDirectives {
                    max_age: Some(SECOND * 60),
                    ..ClientDirectives::default()
                },
            ),
            (
                &[("cache-control", "ONLY-IF-CACHED")],
                ClientDirectives {
                    max_age: None,
                    only_if_cached: true,
                    ..ClientDirectives::default()
                },
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(ClientDirectives::of(&headers(pairs)), expected, "{pairs:?}");
        }
    }

    #[test]
    fn what_a_stored_version_needs_before_it_is_served() {
        let policy = FreshnessPolicy::new(SECOND * 3600, CacheControlMode::Honor);
        let lifetime = Freshness::For(SECOND * 10);
        let none = StaleDirectives::default();
        let swr = StaleDirectives {
            while_revalidate: Some(SECOND * 5),
            ..none
        };
        let must = StaleDirectives {
            must_revalidate: true,
            ..swr
        };
        let client = ClientDirectives::default();
        let no_cache = ClientDirectives {
            max_age: Some(Duration::ZERO),
            ..client
        };
        let min_fresh = ClientDirectives {
            min_fresh: Some(SECOND * 5),
            ..client
        };
        let max_stale = ClientDirectives {
            max_stale: Some(SECOND * 60),
            ..client
        };
        let any_stale = ClientDirectives {
            max_stale: Some(Duration::MAX),
            ..client
        };
        let serve = Check::Foreground {
            serve_stale_on_failure: true,
        };
        let refuse = Check::Foreground {
            serve_stale_on_failure: false,
        };
        let age = |secs| Some(SECOND * secs);
        let cases = [
            ("fresh", policy, none, age(9), client, Check::None),
            (
                "min-fresh met",
                policy,
                none,
                age(4),
                min_fresh,
                Check::None,
            ),
            ("min-fresh not met", policy, none, age(6), min_fresh, serve),
            ("max-stale", policy, none, age(70), max_stale, Check::None),
            ("beyond max-stale", policy, none, age(71), max_stale, serve),
            (
                "max-stale",
                policy,
                none,
                age(1_000_000),
                any_stale,
                Check::None,
            ),
            (
                "max-stale, must-revalidate",
                policy,
                must,
                age(12),
                any_stale,
                refuse,
            ),
            ("stale", policy, none, age(11), client, serve),
            ("unknown age", policy, none, None, client, serve),
            (
                "within swr",
                policy,
                swr,
                age(14),
                client,
                Check::Background,
            ),
            ("beyond swr", policy, swr, age(16), client, serve),
            ("no-cache", policy, swr, age(1), no_cache, serve),
            ("no-cache, stale", policy, swr, age(12), no_cache, serve),
            ("must-revalidate", policy, must, age(12), client, refuse),
            (
                "must-revalidate, fresh",
                policy,
                must,
                age(1),
                client,
                Check::None,
            ),
            (
                "beyond the error window",
                FreshnessPolicy {
                    stale_if_error: SECOND,
                    ..policy
                },
                none,
                age(12),
                client,
                refuse,
            ),
            (
                "the origin's error window wins",
                FreshnessPolicy {
                    stale_if_error: SECOND,
                    ..policy
                },
                StaleDirectives {
                    if_error: Some(SECOND * 60),
                    ..none
                },
                age(12),
                client,
                serve,
            ),
            (
                "serve_stale_on_error",
                FreshnessPolicy {
                    serve_stale_on_error: true,
                    ..policy
                },
                must,
                age(12),
                client,
                serve,
            ),
            (
                "serve_stale_while_revalidating",
                FreshnessPolicy {
                    serve_stale_while_revalidating: true,
                    ..policy
                },
                none,
                age(100_000),
                client,
                Check::Background,
            ),
            (
                "serve_stale_while_revalidating, must-revalidate",
                FreshnessPolicy {
                    serve_stale_while_revalidating: true,
                    ..policy
                },
                must,
                age(100),
                client,
                refuse,
            ),
            (
                "ignore_client_no_cache",
                FreshnessPolicy {
                    ignore_client_no_cache: true,
                    ..policy
                },
                none,
                age(1),
                no_cache,
                Check::None,
            ),
        ];
        for (name, policy, directives, age, client, expected) in cases {
            assert_eq!(
                check_needed(&policy, lifetime, directives, age, client),
                expected,
                "{name}"
            );
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
        let heuristic = Freshness::Heuristic(SECOND * 360);
        assert_eq!(
            Freshness::from_stored(heuristic.to_secs(), heuristic.heuristic_secs()),
            heuristic
        );
    }
}
