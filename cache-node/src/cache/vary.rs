//! Variants (RFC 9111 §4.1): a response with `Vary` is one representation among several, chosen
//! by the request header fields `Vary` names. Each is stored as an object of its own, under the
//! primary key (host or content set, path and query) followed by the values the node sent the
//! origin for those fields; [`VaryIndex`] remembers, per primary key, which fields the origin
//! varies on, so the next request is keyed by its own values before anything is looked up.
//!
//! `Accept-Encoding` is normalised to the one coding the node asks the origin for (`br`, then
//! `gzip`, else `identity`): clients that list the same best coding share one variant, and what
//! the origin sends for that request is a coding each of them accepts. Other fields are keyed
//! and forwarded as the client sent them (at most [`MAX_VALUE_BYTES`] each). At most
//! [`MAX_VARY_NAMES`] fields and [`MAX_VARIANTS`] variants per primary key are stored; beyond
//! that, and for `Vary: *`, requests are relayed uncached.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, HeaderMap, HeaderName, HeaderValue};
use outpost_shared::sync::lock;

use crate::cache::freshness::NotStorable;
use crate::cache::key::CacheKey;
use crate::cache::store::ObjectMeta;
use crate::http::hop_by_hop::is_hop_by_hop;

/// The most request fields one `Vary` may name for the response to be stored.
pub const MAX_VARY_NAMES: usize = 4;
/// The most variants stored per primary key.
pub const MAX_VARIANTS: usize = 8;
/// The longest request field value a variant is keyed by.
pub const MAX_VALUE_BYTES: usize = 256;
/// The most primary keys whose `Vary` fields are remembered.
pub const MAX_PRIMARY_KEYS: u64 = 65_536;

/// Fields that identify a user: a response varying on them is one user's, never a shared
/// cache's to store.
const PER_USER_FIELDS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// Fields the node sets itself on its origin requests (ranges, conditionals, routing): a
/// response varying on them cannot be keyed by the client's.
const RESERVED_FIELDS: [&str; 8] = [
    "host",
    "range",
    "if-range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "via",
];

/// The request fields a stored response varies on: lower-case, sorted, without duplicates.
pub type VaryNames = Arc<[HeaderName]>;

/// Reads a response's `Vary`: no names for a response that does not vary, an error for `*`
/// (never stored) or for more than [`MAX_VARY_NAMES`] fields.
pub fn names_of(response: &HeaderMap) -> Result<VaryNames, NotStorable> {
    let mut names = BTreeSet::new();
    for value in response.get_all(header::VARY) {
        let text = value.to_str().map_err(|_| NotStorable::VaryUnreadable)?;
        for name in text
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            if name == "*" {
                return Err(NotStorable::VaryAny);
            }
            let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|_| NotStorable::VaryUnreadable)?;
            if PER_USER_FIELDS.contains(&name.as_str()) {
                return Err(NotStorable::Private);
            }
            if RESERVED_FIELDS.contains(&name.as_str()) || is_hop_by_hop(&name) {
                return Err(NotStorable::VaryReserved);
            }
            names.insert(name.as_str().to_owned());
        }
    }
    if names.len() > MAX_VARY_NAMES {
        return Err(NotStorable::VaryTooWide);
    }
    Ok(names
        .into_iter()
        .map(|name| HeaderName::from_bytes(name.as_bytes()).expect("parsed above"))
        .collect())
}

/// The coding the node asks the origin for on behalf of a client's `Accept-Encoding`: `br` when
/// the client accepts it, else `gzip` (`x-gzip` and `*` count), else `identity`.
pub fn normalised_accept_encoding(request: &HeaderMap) -> &'static str {
    let mut best = "identity";
    for value in request.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|parameter| {
                let parameter = parameter.trim().to_ascii_lowercase();
                parameter
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            match coding.as_str() {
                "br" => best = "br",
                "gzip" | "x-gzip" | "*" if best != "br" => best = "gzip",
                _ => {}
            }
        }
    }
    best
}

/// One variant: the value sent to the origin for each field the response varies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// Each varying field with the value sent (`None`: the field was not sent).
    pub fields: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl Variant {
    /// The variant a client request selects among responses varying on `names`; `None` when
    /// one of its values is longer than [`MAX_VALUE_BYTES`] (relayed uncached).
    pub fn of_request(names: &[HeaderName], request: &HeaderMap) -> Option<Variant> {
        let mut fields = Vec::with_capacity(names.len());
        for name in names {
            let value = if *name == header::ACCEPT_ENCODING {
                Some(HeaderValue::from_static(normalised_accept_encoding(
                    request,
                )))
            } else {
                let values: Vec<&[u8]> = request
                    .get_all(name)
                    .iter()
                    .map(HeaderValue::as_bytes)
                    .collect();
                if values.is_empty() {
                    None
                } else {
                    let joined = values.join(&b", "[..]);
                    if joined.len() > MAX_VALUE_BYTES {
                        return None;
                    }
                    Some(HeaderValue::from_bytes(&joined).ok()?)
                }
            };
            fields.push((name.clone(), value));
        }
        Some(Variant { fields })
    }

    /// The variant a request sent with `sent` (the fields of the route's variant, if it had
    /// one) is, among responses varying on `names`: the value sent for each name, and for
    /// `Accept-Encoding` without one, the `identity` the upstream client always asks for.
    pub fn as_sent(names: &[HeaderName], sent: Option<&Variant>) -> Variant {
        let fields = names
            .iter()
            .map(|name| {
                let value = sent.and_then(|variant| variant.value_of(name)).or_else(|| {
                    (*name == header::ACCEPT_ENCODING).then(|| HeaderValue::from_static("identity"))
                });
                (name.clone(), value)
            })
            .collect();
        Variant { fields }
    }

    fn value_of(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.fields
            .iter()
            .find(|(field, _)| field == name)
            .and_then(|(_, value)| value.clone())
    }

    /// The text that follows the primary key in the variant's key: each field as
    /// `name="value"` (quoted and escaped, so no two variants read alike), or `name` alone
    /// when it was not sent.
    pub fn description(&self) -> String {
        self.fields
            .iter()
            .map(|(name, value)| match value {
                Some(value) => format!("{name}={:?}", String::from_utf8_lossy(value.as_bytes())),
                None => name.as_str().to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The key of this variant of `primary`.
    pub fn key(&self, primary: &CacheKey) -> CacheKey {
        primary.variant(&self.description())
    }
}

/// What the node knows of one primary key's variants.
#[derive(Debug)]
struct Spec {
    names: VaryNames,
    /// The variant keys stored under it (at most [`MAX_VARIANTS`]).
    variants: Mutex<BTreeSet<CacheKey>>,
}

/// Per primary key, the fields its responses vary on and its variants' keys.
pub struct VaryIndex {
    specs: moka::sync::Cache<CacheKey, Arc<Spec>>,
    /// Set once any response varied: until then no request pays for a lookup here.
    any: AtomicBool,
}

impl Default for VaryIndex {
    fn default() -> Self {
        VaryIndex {
            specs: moka::sync::Cache::builder()
                .max_capacity(MAX_PRIMARY_KEYS)
                .build(),
            any: AtomicBool::new(false),
        }
    }
}

impl std::fmt::Debug for VaryIndex {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VaryIndex")
            .field("primary_keys", &self.specs.entry_count())
            .finish()
    }
}

impl VaryIndex {
    /// False until some response varied: until then no request needs to look here.
    pub fn in_use(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    /// The fields responses for `primary` vary on, if any stored one did.
    pub fn names(&self, primary: &CacheKey) -> Option<VaryNames> {
        if !self.in_use() {
            return None;
        }
        self.specs.get(primary).map(|spec| spec.names.clone())
    }

    /// Records that the response stored under `variant_key` varies on `names`. False when
    /// `primary` already has [`MAX_VARIANTS`] other variants that are `still_stored`: this one
    /// is not stored.
    pub fn learn(
        &self,
        primary: &CacheKey,
        names: &VaryNames,
        variant_key: &CacheKey,
        still_stored: impl Fn(&CacheKey) -> bool,
    ) -> bool {
        self.any.store(true, Ordering::Relaxed);
        let spec = self.specs.get(primary).filter(|spec| spec.names == *names);
        let spec = spec.unwrap_or_else(|| {
            // New, or the origin changed the fields it varies on: variants keyed by the old
            // fields are no longer reachable and age out of the index.
            let spec = Arc::new(Spec {
                names: names.clone(),
                variants: Mutex::default(),
            });
            self.specs.insert(primary.clone(), spec.clone());
            spec
        });
        let mut variants = lock(&spec.variants);
        if variants.contains(variant_key) {
            return true;
        }
        if variants.len() >= MAX_VARIANTS {
            // Evicted or dropped variants make room.
            variants.retain(|key| still_stored(key));
        }
        if variants.len() >= MAX_VARIANTS {
            return false;
        }
        variants.insert(variant_key.clone());
        true
    }

    /// Learns the `Vary` of a version recovered from disk.
    pub fn learn_stored(&self, meta: &ObjectMeta) {
        if meta.vary.is_empty() {
            return;
        }
        let names: Option<VaryNames> = meta
            .vary
            .iter()
            .map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        let key = CacheKey::from_text(meta.key.clone());
        if let Some(names) = names {
            self.learn(&key.primary(), &names, &key, |_| true);
        }
    }

    /// True when `variant_key` is stored under `primary` or there is room for it (counting only
    /// variants that are `still_stored`), so a request for it is worth a discovery.
    pub fn has_room(
        &self,
        primary: &CacheKey,
        variant_key: &CacheKey,
        still_stored: impl Fn(&CacheKey) -> bool,
    ) -> bool {
        let Some(spec) = self.specs.get(primary) else {
            return true;
        };
        let mut variants = lock(&spec.variants);
        if variants.len() < MAX_VARIANTS || variants.contains(variant_key) {
            return true;
        }
        variants.retain(|key| still_stored(key));
        variants.len() < MAX_VARIANTS
    }

    /// The variant keys stored under `primary` (for invalidation).
    pub fn variant_keys(&self, primary: &CacheKey) -> Vec<CacheKey> {
        self.specs
            .get(primary)
            .map(|spec| lock(&spec.variants).iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn vary_names_are_normalised_and_bounded() {
        let names = names_of(&map(&[
            ("vary", "Accept-Encoding, accept-language"),
            ("vary", "ACCEPT-ENCODING"),
        ]))
        .unwrap();
        let names: Vec<&str> = names.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept-encoding", "accept-language"]);
        assert!(names_of(&map(&[])).unwrap().is_empty());
        assert_eq!(
            names_of(&map(&[("vary", "accept-encoding, *")])).unwrap_err(),
            NotStorable::VaryAny
        );
        assert_eq!(
            names_of(&map(&[("vary", "a, b, c, d, e")])).unwrap_err(),
            NotStorable::VaryTooWide
        );
        assert_eq!(
            names_of(&map(&[("vary", "bad name")])).unwrap_err(),
            NotStorable::VaryUnreadable
        );
        assert_eq!(
            names_of(&map(&[("vary", "Cookie")])).unwrap_err(),
            NotStorable::Private
        );
        for reserved in ["Range", "if-none-match", "Host", "TE"] {
            let headers =
                HeaderMap::from_iter([(header::VARY, HeaderValue::from_str(reserved).unwrap())]);
            assert_eq!(names_of(&headers).unwrap_err(), NotStorable::VaryReserved);
        }
    }

    #[test]
    fn accept_encoding_is_normalised_to_the_best_coding_the_client_takes() {
        for (sent, expected) in [
            ("gzip, deflate, br", "br"),
            ("gzip, deflate", "gzip"),
            ("x-gzip", "gzip"),
            ("br;q=0, gzip;q=0.5", "gzip"),
            ("BR ; Q=0.0, GZIP;q=0", "identity"),
            ("*", "gzip"),
            ("deflate, zstd", "identity"),
            ("", "identity"),
        ] {
            assert_eq!(
                normalised_accept_encoding(&map(&[("accept-encoding", sent)])),
                expected,
                "{sent}"
            );
        }
        assert_eq!(normalised_accept_encoding(&HeaderMap::new()), "identity");
    }

    #[test]
    fn variants_read_unambiguously_and_long_values_are_refused() {
        let names = names_of(&map(&[("vary", "accept-encoding, accept-language")])).unwrap();
        let french = Variant::of_request(
            &names,
            &map(&[
                ("accept-encoding", "gzip"),
                ("accept-language", "fr, en;q=0.5"),
            ]),
        )
        .unwrap();
        assert_eq!(
            french.description(),
            r#"accept-encoding="gzip" accept-language="fr, en;q=0.5""#
        );
        // A value that imitates another field cannot read as that field.
        let sly = Variant::of_request(
            &names,
            &map(&[("accept-language", r#"x" accept-language="fr"#)]),
        )
        .unwrap();
        assert_ne!(sly.description(), french.description());
        let absent = Variant::of_request(&names, &HeaderMap::new()).unwrap();
        assert_eq!(
            absent.description(),
            r#"accept-encoding="identity" accept-language"#
        );
        let long = "x".repeat(MAX_VALUE_BYTES + 1);
        let mut headers = HeaderMap::new();
        headers.insert("accept-language", HeaderValue::from_str(&long).unwrap());
        assert_eq!(Variant::of_request(&names, &headers), None);
        // What was sent without a variant is the identity coding and nothing else.
        assert_eq!(Variant::as_sent(&names, None), absent);
        assert_eq!(Variant::as_sent(&names, Some(&french)), french);
    }

    #[test]
    fn the_index_bounds_variants_per_primary_key() {
        let index = VaryIndex::default();
        let primary = CacheKey::new("example.test", "/app.js");
        assert!(index.names(&primary).is_none());
        let names = names_of(&map(&[("vary", "user-agent")])).unwrap();
        let stored = |_: &CacheKey| true;
        for n in 0..MAX_VARIANTS {
            let key = primary.variant(&format!("ua {n}"));
            assert!(index.learn(&primary, &names, &key, stored));
        }
        let one_more = primary.variant("ua more");
        assert!(!index.learn(&primary, &names, &one_more, stored));
        // A known variant is still accepted, and one no longer stored frees a place.
        assert!(index.learn(&primary, &names, &primary.variant("ua 0"), stored));
        let evicted = primary.variant("ua 0");
        assert!(!index.has_room(&primary, &one_more, stored));
        assert!(index.has_room(&primary, &evicted, stored));
        assert!(index.has_room(&primary, &one_more, |key| *key != evicted));
        assert!(index.learn(&primary, &names, &one_more, |key| *key != evicted));
        assert_eq!(index.names(&primary).unwrap(), names);
        assert_eq!(index.variant_keys(&primary).len(), MAX_VARIANTS);
    }
}
