//! Hop-by-hop fields (RFC 9110 §7.6.1): the header fields that describe one connection rather
//! than the message, which an intermediary removes before forwarding a message in either
//! direction.

use http::{header, HeaderMap, HeaderName};

/// The fields that are always hop-by-hop, whether or not `Connection` names them. `Proxy-*`
/// fields are matched by prefix in [`is_hop_by_hop`].
const ALWAYS_HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
];

/// True for a field that never crosses an intermediary: `Connection`, `Keep-Alive`, `TE`,
/// `Transfer-Encoding`, `Upgrade`, `Trailer` and every `Proxy-*` field (`Proxy-Authorization`
/// names the credentials for the node as a proxy, never the origin's).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    ALWAYS_HOP_BY_HOP.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// Removes the hop-by-hop fields of `headers`: those [`is_hop_by_hop`] lists and those the
/// message's `Connection` field names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named_by_connection {
        headers.remove(name);
    }
    let hop_by_hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name))
        .cloned()
        .collect();
    for name in hop_by_hop {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Private-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-private-hop", "1"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            ("via", "1.1 client-proxy"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        remove_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "via", "x-custom"]);
    }
}
