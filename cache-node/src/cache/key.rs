//! Content identity: the cache key of a request, and the stable on-disk name derived from it.
//!
//! A key is the origin host, the path and the query with `cacheHostOrigin` removed, so the same
//! content reached in MCC mode, Host-header mode or proxy mode is stored once. An origin in a
//! content set is keyed by the set instead of the host (`set:<name>` + path and query), so the
//! same file reached under several names and addresses is stored once too. No host can be
//! written `set:<name>` (a port is digits), so the two kinds of key never meet.

use sha2::{Digest, Sha256};

/// The identity of one piece of cached content.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey {
    /// `host` + path-and-query, e.g. `dl.example.com/files/a.cab?x=1`.
    text: String,
}

impl CacheKey {
    /// Builds a key from a normalised origin host and the upstream path-and-query (which must
    /// already have `cacheHostOrigin` removed).
    pub fn new(host: &str, path_and_query: &str) -> CacheKey {
        CacheKey {
            text: format!("{host}{path_and_query}"),
        }
    }

    /// Builds the key of an object of a content set (see the module documentation).
    pub fn in_content_set(content_set: &str, path_and_query: &str) -> CacheKey {
        CacheKey {
            text: format!("{CONTENT_SET_PREFIX}{content_set}{path_and_query}"),
        }
    }

    /// The key of a variant of this key's content (see the `vary` module): the primary key,
    /// [`VARIANT_SEPARATOR`] and the variant's description.
    pub fn variant(&self, description: &str) -> CacheKey {
        CacheKey {
            text: format!("{}{VARIANT_SEPARATOR}{description}", self.primary_text()),
        }
    }

    /// The primary key of a variant's key (this key itself when it is no variant).
    pub fn primary(&self) -> CacheKey {
        CacheKey {
            text: self.primary_text().to_owned(),
        }
    }

    /// True for a variant's key.
    pub fn is_variant(&self) -> bool {
        self.text.contains(VARIANT_SEPARATOR)
    }

    fn primary_text(&self) -> &str {
        self.text
            .split_once(VARIANT_SEPARATOR)
            .map_or(&self.text, |(primary, _)| primary)
    }

    /// Rebuilds a key from its text form (as stored in object metadata).
    pub fn from_text(text: String) -> CacheKey {
        CacheKey { text }
    }

    /// The human-readable form, used in logs and stored in metadata.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A fixed-length, file-system-safe identifier: the lower-case hex SHA-256 of the key text.
    pub fn object_id(&self) -> String {
        self.content_id().to_hex()
    }

    /// The object id as the peering protocol's content id (the same SHA-256).
    pub fn content_id(&self) -> outpost_shared::wire::ContentId {
        outpost_shared::wire::ContentId(Sha256::digest(self.text.as_bytes()).into())
    }
}

/// What separates a variant's description from its primary key: it starts with a space, which
/// no request target holds, so no primary key contains it.
pub const VARIANT_SEPARATOR: &str = " vary:";

/// What a content set's keys start with.
pub const CONTENT_SET_PREFIX: &str = "set:";

/// Removes every `cacheHostOrigin` parameter from a raw query string, keeping the other
/// parameters byte for byte and in order. Returns the remaining query (possibly empty) and the
/// decoded origin host, if one was present (the first one wins).
pub fn split_cache_host_origin(query: &str) -> (String, Option<String>) {
    let mut kept: Vec<&str> = Vec::new();
    let mut origin_host: Option<String> = None;
    for parameter in query.split('&') {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        if name.eq_ignore_ascii_case("cacheHostOrigin") {
            if origin_host.is_none() {
                origin_host = Some(percent_decode(value));
            }
        } else if !parameter.is_empty() {
            kept.push(parameter);
        }
    }
    (kept.join("&"), origin_host)
}

/// Decodes `%XX` escapes. `+` is not turned into a space: host names contain neither.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        // Hex digits are read as bytes, never by slicing the string, so a `%` followed by a
        // multi-byte character is kept literally instead of splitting the character.
        let hex = |offset: usize| {
            bytes
                .get(index + offset)
                .and_then(|byte| (*byte as char).to_digit(16))
        };
        if bytes[index] == b'%' {
            if let (Some(high), Some(low)) = (hex(1), hex(2)) {
                decoded.push((high * 16 + low) as u8);
                index += 3;
                continue;
            }
        }
        decoded.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_handles_escapes_at_the_end_and_never_splits_characters() {
        assert_eq!(percent_decode("a%3A"), "a:");
        assert_eq!(percent_decode("%41%42"), "AB");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%aé"), "%aé");
        assert_eq!(percent_decode("%é"), "%é");
    }

    #[test]
    fn cache_host_origin_is_removed_and_the_rest_kept_in_order() {
        let table: &[(&str, &str, Option<&str>)] = &[
            ("cacheHostOrigin=dl.example.com", "", Some("dl.example.com")),
            (
                "a=1&cacheHostOrigin=dl.example.com&b=2",
                "a=1&b=2",
                Some("dl.example.com"),
            ),
            (
                "a=%20x&cachehostorigin=h.example",
                "a=%20x",
                Some("h.example"),
            ),
            (
                "cacheHostOrigin=h%2Eexample&cacheHostOrigin=other",
                "",
                Some("h.example"),
            ),
            ("a=1&&b", "a=1&b", None),
            ("", "", None),
            ("x=cacheHostOrigin", "x=cacheHostOrigin", None),
        ];
        for (query, expected_rest, expected_host) in table {
            let (rest, host) = split_cache_host_origin(query);
            assert_eq!(rest, *expected_rest, "{query}");
            assert_eq!(host.as_deref(), *expected_host, "{query}");
        }
    }

    #[test]
    fn object_ids_are_stable_hex_and_differ_by_query() {
        let a = CacheKey::new("h.example", "/f?x=1");
        let b = CacheKey::new("h.example", "/f?x=2");
        assert_eq!(a.object_id().len(), 64);
        assert_eq!(
            a.object_id(),
            CacheKey::new("h.example", "/f?x=1").object_id()
        );
        assert_ne!(a.object_id(), b.object_id());
    }

    #[test]
    fn content_set_keys_are_shared_by_hosts_and_differ_from_host_keys() {
        let set = CacheKey::in_content_set("windows-update", "/f?x=1");
        assert_eq!(set.as_str(), "set:windows-update/f?x=1");
        assert_eq!(set, CacheKey::in_content_set("windows-update", "/f?x=1"));
        assert_ne!(set, CacheKey::in_content_set("debian", "/f?x=1"));
        assert_ne!(set, CacheKey::new("windows-update", "/f?x=1"));
    }

    #[test]
    fn percent_decoding_tolerates_broken_escapes() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41%42"), "AB");
    }
}
