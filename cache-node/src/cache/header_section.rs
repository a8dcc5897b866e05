//! The stored header section of an object (RFC 9111 §3.1): which fields of an origin response
//! are kept and replayed, how they are written in `meta.json`, and how a `304` (or an unchanged
//! `If-Range` answer) refreshes them (§4.3.4).
//!
//! Every end-to-end field is stored except:
//! - hop-by-hop fields (`Connection` and the fields it names, `Keep-Alive`, `Transfer-Encoding`,
//!   `TE`, `Upgrade`, `Trailer`, `Proxy-*`), which describe one connection (RFC 9110 §7.6.1);
//! - fields the node computes for each answer: `Content-Length`, `Content-Range`, `Age`,
//!   `Accept-Ranges` (the node serves ranges itself) and `X-Cache`;
//! - `Set-Cookie`: one user's cookie must never be handed to the next client of a shared cache
//!   (RFC 9111 §7.3 leaves this to the cache; Varnish and nginx make the same choice);
//! - the fields with their own typed place in the object metadata (`ETag`,
//!   `Last-Modified`, `Content-Type`, `Content-Encoding`), which identify the version and are
//!   never changed by a revalidation.
//!
//! The section is parsed once, into an `http::HeaderMap` the object's index entry holds, when the
//! entry is created, recovered or revalidated; answers copy that map (its values are refcounted),
//! so the hit path parses no stored name or value.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

/// The largest stored header section, in bytes (each field counted as `name: value\r\n`). An
/// origin response beyond it is not stored but relayed (`objects_refused_headers_too_large`). A
/// fixed bound rather than a setting: origins send a few KiB, and 64 KiB already keeps a
/// `meta.json` far below what recovery reads (`MAX_META_FILE_BYTES` in the store).
pub const MAX_STORED_HEADER_BYTES: usize = 64 << 10;

/// One stored field value: text when it is UTF-8 (nearly always), else its raw bytes, so that
/// an `obs-text` value is replayed byte for byte instead of being dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StoredValue {
    /// A UTF-8 value.
    Text(String),
    /// A value that is not UTF-8, as bytes.
    Bytes(Vec<u8>),
}

impl StoredValue {
    fn from_header(value: &HeaderValue) -> StoredValue {
        match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => StoredValue::Text(text.to_owned()),
            Err(_) => StoredValue::Bytes(value.as_bytes().to_vec()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            StoredValue::Text(text) => text.as_bytes(),
            StoredValue::Bytes(bytes) => bytes,
        }
    }
}

/// One stored field, as `meta.json` holds it: `["link", "</a>; rel=preload"]`.
pub type StoredField = (String, StoredValue);

/// The fields with a typed place in the metadata, never in the generic list.
const TYPED_FIELDS: [HeaderName; 4] = [
    header::ETAG,
    header::LAST_MODIFIED,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
];

/// Fields never stored whatever the response says (see the module documentation).
const NEVER_STORED: [HeaderName; 10] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::TRAILER,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::AGE,
    header::ACCEPT_RANGES,
    header::SET_COOKIE,
];

/// True when the field `name` of a response whose `Connection` header is `connection` is a
/// stored, generic field.
fn is_stored(name: &HeaderName, connection: &HeaderMap) -> bool {
    let text = name.as_str();
    if NEVER_STORED.contains(name)
        || TYPED_FIELDS.contains(name)
        || text == "keep-alive"
        || text == "x-cache"
        || text.starts_with("proxy-")
    {
        return false;
    }
    // `Connection` names more hop-by-hop fields of this one response.
    !connection
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case(text))
}

/// The generic fields of an origin response the node stores, in the response's order.
pub fn stored_fields(response: &HeaderMap) -> Vec<StoredField> {
    response
        .iter()
        .filter(|(name, _)| is_stored(name, response))
        .map(|(name, value)| (name.as_str().to_owned(), StoredValue::from_header(value)))
        .collect()
}

/// The size of a header section as the bound counts it: each field as `name: value\r\n`.
pub fn section_bytes<'a>(fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> usize {
    fields
        .into_iter()
        .map(|(name, value)| name.len() + value.len() + 4)
        .sum()
}

/// The size of `fields` plus the typed fields `typed` (values only, with their names).
pub fn stored_section_bytes(
    fields: &[StoredField],
    typed: &[(&HeaderName, Option<&str>)],
) -> usize {
    let generic = fields
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()));
    let typed = typed.iter().filter_map(|(name, value)| {
        value.map(|value| (name.as_str().as_bytes(), value.as_bytes()))
    });
    section_bytes(generic.chain(typed))
}

/// The replayed header map of a version: its typed fields (validators and `Content-Encoding`;
/// `Content-Type` is set per answer, as multipart answers replace it) and its stored fields.
/// `Err` names the first field that is not a valid header, which recovery treats as corrupt
/// metadata.
pub fn replay_map(
    typed: &[(HeaderName, Option<&str>)],
    fields: &[StoredField],
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(typed.len() + fields.len());
    for (name, value) in typed {
        if let Some(value) = value {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("the stored {name} is not a valid header value"))?;
            map.append(name.clone(), value);
        }
    }
    for (name, value) in fields {
        let parsed_name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("stored field name {name:?} is not a header name"))?;
        let value = HeaderValue::from_bytes(value.as_bytes())
            .map_err(|_| format!("the stored {name} is not a valid header value"))?;
        map.append(parsed_name, value);
    }
    Ok(map)
}

/// The generic stored fields of a replay map (the inverse of [`replay_map`], for writing
/// `meta.json` again after a revalidation).
pub fn fields_of_map(map: &HeaderMap) -> Vec<StoredField> {
    map.iter()
        .filter(|(name, _)| !TYPED_FIELDS.contains(name))
        .map(|(name, value)| (name.as_str().to_owned(), StoredValue::from_header(value)))
        .collect()
}

/// The replay map after a `304` or an unchanged `If-Range` answer carrying `update`: every
/// stored field it carries replaces all stored values of that name (RFC 9111 §4.3.4); fields it
/// does not carry are kept, and the typed fields never change. `None` when nothing changes.
pub fn refreshed(map: &HeaderMap, update: &HeaderMap) -> Option<HeaderMap> {
    let mut refreshed = map.clone();
    let mut changed = false;
    for name in update.keys() {
        if !is_stored(name, update) {
            continue;
        }
        let new_values: Vec<&HeaderValue> = update.get_all(name).iter().collect();
        let old_values: Vec<&HeaderValue> = map.get_all(name).iter().collect();
        if new_values == old_values {
            continue;
        }
        changed = true;
        refreshed.remove(name);
        for value in new_values {
            refreshed.append(name.clone(), value.clone());
        }
    }
    changed.then_some(refreshed)
}

/// The size of a replay map as the bound counts it.
pub fn map_bytes(map: &HeaderMap) -> usize {
    section_bytes(
        map.iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn end_to_end_fields_are_stored_and_hop_by_hop_ones_are_not() {
        let headers = response(&[
            ("x-outpost-test", "1"),
            ("link", "</a>; rel=preload"),
            ("link", "</b>; rel=preload"),
            ("cache-control", "max-age=100000"),
            ("connection", "x-secret, close"),
            ("x-secret", "hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("proxy-authenticate", "Basic"),
            ("content-length", "10"),
            ("content-range", "bytes 0-9/10"),
            ("age", "5"),
            ("set-cookie", "session=1"),
            ("etag", "\"v1\""),
            ("content-encoding", "gzip"),
        ]);
        let names: Vec<String> = stored_fields(&headers)
            .into_iter()
            .map(|(name, value)| format!("{name}={}", String::from_utf8_lossy(value.as_bytes())))
            .collect();
        assert_eq!(
            names,
            [
                "x-outpost-test=1",
                "link=</a>; rel=preload",
                "link=</b>; rel=preload",
                "cache-control=max-age=100000"
            ]
        );
    }

    #[test]
    fn a_replay_map_round_trips_through_meta_json_even_with_obs_text() {
        let mut headers = response(&[("x-a", "1")]);
        headers.append("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let fields = stored_fields(&headers);
        let json = serde_json::to_string(&fields).unwrap();
        let back: Vec<StoredField> = serde_json::from_str(&json).unwrap();
        let map = replay_map(&[(header::ETAG, Some("\"e\""))], &back).unwrap();
        assert_eq!(map.get("x-latin1").unwrap().as_bytes(), b"caf\xe9");
        assert_eq!(map.get(header::ETAG).unwrap(), "\"e\"");
        assert_eq!(fields_of_map(&map), fields);
        assert!(replay_map(&[], &[("bad name".into(), StoredValue::Text("x".into()))]).is_err());
    }

    #[test]
    fn a_304_replaces_the_fields_it_carries_and_keeps_the_others() {
        let stored = replay_map(
            &[(header::ETAG, Some("\"e\""))],
            &stored_fields(&response(&[
                ("cache-control", "max-age=1"),
                ("x-kept", "yes"),
            ])),
        )
        .unwrap();
        let update = response(&[
            ("cache-control", "max-age=100000"),
            ("etag", "\"other\""),
            ("connection", "close"),
            ("content-length", "0"),
        ]);
        let refreshed = refreshed(&stored, &update).unwrap();
        assert_eq!(refreshed.get("cache-control").unwrap(), "max-age=100000");
        assert_eq!(refreshed.get("x-kept").unwrap(), "yes");
        assert_eq!(refreshed.get(header::ETAG).unwrap(), "\"e\"");
        assert!(refreshed.get(header::CONTENT_LENGTH).is_none());
        assert!(super::refreshed(&refreshed, &update).is_none());
    }
}
