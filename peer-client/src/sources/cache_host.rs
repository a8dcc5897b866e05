//! Cache hosts: where the list comes from, how a download URL is rewritten for one, and which
//! host serves which content item.
//!
//! - **Sources**, first non-empty wins: `--cache-host` (the CLI puts it into the config), config
//!   `cache_hosts` or `PEER_CLIENT__CACHE_HOSTS`, then the DHCP option 235 file named by
//!   `cache_host_source_file` (a comma list, as DO's `DOCacheHostSource` reads it).
//! - **Rewrite**: the MCC form `http://<cache>/<path>?<query>&cacheHostOrigin=<host>`, the
//!   contract cache-node (and Microsoft Connected Cache) serves; `https://<cache>/...` for a
//!   host written `https://` (trusted through the system roots and `cache.ca_file`).
//! - **Choice**: rendezvous (highest random weight) hashing of the content item over the hosts,
//!   so each item is cached on one node and adding or removing a node moves only its share.
//!   The rest of the order is the failover order.

use std::path::Path;

use http::Uri;
use sha2::{Digest, Sha256};

use crate::config::CacheHost;

impl CacheHost {
    /// The MCC-form URL of `origin_url` on this cache host.
    pub fn mcc_url(&self, origin_url: &Uri) -> String {
        let origin_host = origin_authority(origin_url);
        let path = origin_url.path();
        // Escaped like any query value, except that the port's colon stays as it is: a colon is
        // legal in a query, and DO clients send `host:port` unescaped.
        let encoded_origin = form_urlencoded::byte_serialize(origin_host.as_bytes())
            .collect::<String>()
            .replace("%3A", ":");
        match origin_url.query() {
            Some(query) if !query.is_empty() => format!(
                "{}{path}?{query}&cacheHostOrigin={encoded_origin}",
                self.base_url()
            ),
            _ => format!("{}{path}?cacheHostOrigin={encoded_origin}", self.base_url()),
        }
    }
}

/// The origin host as `cacheHostOrigin` names it: the host, with the port when it is not the
/// scheme's default. It is also the key of per-origin bans.
pub fn origin_authority(origin_url: &Uri) -> String {
    let host = origin_url.host().unwrap_or_default().to_ascii_lowercase();
    let default_port = if origin_url.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    match origin_url.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host,
    }
}

/// Why the DHCP option 235 file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheHostSourceError {
    /// The file could not be read.
    #[error("cache_host_source_file {path}: {source}")]
    Read {
        /// The configured path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An entry is not a host.
    #[error("cache_host_source_file {path}: {message}")]
    Parse {
        /// The configured path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Reads DHCP option 235 as the admin's hook stored it: a comma list of hosts (whitespace and
/// line breaks are ignored). A missing file means no cache host, not an error: DHCP may simply not
/// have offered the option.
pub fn read_dhcp_option_235(path: &Path) -> Result<Vec<CacheHost>, CacheHostSourceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CacheHostSourceError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    let flattened = text.replace(['\n', '\r'], ",");
    crate::config::split_comma_list(&flattened)
        .iter()
        .map(|item| {
            CacheHost::parse(item).map_err(|message| CacheHostSourceError::Parse {
                path: path.display().to_string(),
                message,
            })
        })
        .collect()
}

/// The cache hosts a download uses: the configured list, or else the DHCP option 235 file.
pub fn resolve_cache_hosts(
    configured: &[CacheHost],
    dhcp_file: Option<&Path>,
) -> Result<Vec<CacheHost>, CacheHostSourceError> {
    if !configured.is_empty() {
        return Ok(configured.to_vec());
    }
    match dhcp_file {
        Some(path) => read_dhcp_option_235(path),
        None => Ok(Vec::new()),
    }
}

/// The identity of a content item for rendezvous hashing: origin host, path and query, so the
/// same item asked for under the same URL always lands on the same node.
pub fn content_key(origin_url: &Uri) -> String {
    let path_and_query = origin_url
        .path_and_query()
        .map(|value| value.as_str())
        .unwrap_or("/");
    format!("{}{path_and_query}", origin_authority(origin_url))
}

/// Orders `hosts` for `content_key` by rendezvous hashing: the first host is the one that serves
/// the item, the rest is the failover order. Duplicates are removed.
pub fn rendezvous_order(hosts: &[CacheHost], content_key: &str) -> Vec<CacheHost> {
    let mut scored: Vec<(u64, CacheHost)> = hosts
        .iter()
        .map(|host| (rendezvous_weight(host, content_key), host.clone()))
        .collect();
    scored.sort_by(|left, right| right.0.cmp(&left.0).then_with(|| left.1.cmp(&right.1)));
    scored.dedup_by(|left, right| left.1 == right.1);
    scored.into_iter().map(|(_, host)| host).collect()
}

/// A host's weight for an item: SHA-256 over both, so every client on every platform and version
/// agrees on the order (a std hasher would not).
fn rendezvous_weight(host: &CacheHost, content_key: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(host.authority().as_bytes());
    hasher.update([0]);
    hasher.update(content_key.as_bytes());
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a digest has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<CacheHost> {
        names
            .iter()
            .map(|name| CacheHost::parse(name).unwrap())
            .collect()
    }

    #[test]
    fn hosts_parse_in_every_accepted_form() {
        for (text, authority) in [
            ("cache.local", "cache.local"),
            ("Cache.Local:8080", "cache.local:8080"),
            ("http://cache.local/", "cache.local"),
            ("http://10.0.0.5:80", "10.0.0.5"),
            ("[::1]:8080", "[::1]:8080"),
            ("https://cache.local", "cache.local"),
            ("https://cache.local:443/", "cache.local"),
            ("https://cache.local:8443", "cache.local:8443"),
        ] {
            assert_eq!(
                CacheHost::parse(text).unwrap().authority(),
                authority,
                "{text}"
            );
        }
        for bad in [
            "",
            "ftp://cache.local",
            "https://cache.local/path",
            "cache.local/path",
            "a b",
            "user@host",
            ":80",
        ] {
            assert!(CacheHost::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn urls_are_rewritten_to_the_mcc_form() {
        let cache = CacheHost::parse("10.1.1.1:8080").unwrap();
        let cases = [
            (
                "http://dl.delivery.mp.microsoft.com/filestreamingservice/files/g/x.png",
                "http://10.1.1.1:8080/filestreamingservice/files/g/x.png?cacheHostOrigin=dl.delivery.mp.microsoft.com",
            ),
            (
                "http://example.org:8000/a/b?p=1&q=2",
                "http://10.1.1.1:8080/a/b?p=1&q=2&cacheHostOrigin=example.org:8000",
            ),
            (
                "https://example.org/a",
                "http://10.1.1.1:8080/a?cacheHostOrigin=example.org",
            ),
            (
                "http://example.org:80/a?",
                "http://10.1.1.1:8080/a?cacheHostOrigin=example.org",
            ),
        ];
        for (origin, expected) in cases {
            let uri: Uri = origin.parse().unwrap();
            assert_eq!(cache.mcc_url(&uri), expected, "{origin}");
        }
        let secure = CacheHost::parse("https://cache.lan:443/").unwrap();
        assert!(secure.is_https());
        assert_eq!(secure.authority(), "cache.lan");
        let uri: Uri = "https://example.org/a".parse().unwrap();
        assert_eq!(
            secure.mcc_url(&uri),
            "https://cache.lan/a?cacheHostOrigin=example.org"
        );
    }

    #[test]
    fn rendezvous_order_is_stable_and_a_permutation() {
        let all = hosts(&["a:1", "b:2", "c:3"]);
        let order = rendezvous_order(&all, "example.org/file");
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, all);
        // The order does not depend on the order the hosts were listed in.
        let reversed: Vec<CacheHost> = all.iter().rev().cloned().collect();
        assert_eq!(rendezvous_order(&reversed, "example.org/file"), order);
        assert_eq!(rendezvous_order(&hosts(&["a:1", "a:1"]), "k").len(), 1);
    }

    #[test]
    fn rendezvous_spreads_items_and_removing_a_host_moves_only_its_items() {
        let all = hosts(&["a:1", "b:2", "c:3"]);
        let without_b = hosts(&["a:1", "c:3"]);
        let mut per_host = std::collections::HashMap::new();
        for item in 0..3000 {
            let key = format!("example.org/file{item}");
            let first = rendezvous_order(&all, &key)[0].clone();
            *per_host.entry(first.clone()).or_insert(0) += 1;
            let first_without_b = rendezvous_order(&without_b, &key)[0].clone();
            if first.authority() != "b:2" {
                assert_eq!(
                    first_without_b, first,
                    "{key} moved although its host stayed"
                );
            }
        }
        for count in per_host.values() {
            assert!((850..=1150).contains(count), "{per_host:?}");
        }
    }

    #[test]
    fn the_dhcp_file_is_a_comma_list_and_may_be_missing() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("option235");
        assert!(read_dhcp_option_235(&path).unwrap().is_empty());
        std::fs::write(&path, "cache1.branch:8080, cache2.branch\n").unwrap();
        assert_eq!(
            read_dhcp_option_235(&path).unwrap(),
            hosts(&["cache1.branch:8080", "cache2.branch"])
        );
        // The configured list wins over DHCP.
        let configured = hosts(&["policy.host"]);
        assert_eq!(
            resolve_cache_hosts(&configured, Some(&path)).unwrap(),
            configured
        );
        std::fs::write(&path, "good, bad/host").unwrap();
        assert!(read_dhcp_option_235(&path).is_err());
    }
}
