//! Which URLs the daemon fetches for others. A download handed to the daemon runs with the
//! daemon's network position, so unless `daemon.allow_private_urls` is set, the daemon refuses
//! URLs whose host is, or resolves to, a loopback, link-local, private-range, shared, multicast or
//! otherwise non-public address: a local process must not reach an internal service through it.
//! Cache hosts and peers are configured or come from the tracker and are not checked here.
//!
//! A name is resolved once and every address it gives must be public. A DNS answer that changes
//! between this check and the connection (rebinding) is not covered; the origin is only reached
//! when the cache node cannot serve, and the node applies its own allowlist.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    /// Not an absolute http(s) URL with a host.
    #[error("\"{0}\" is not an absolute http:// or https:// URL")]
    NotHttp(String),
    /// The host is, or resolves to, a non-public address.
    #[error(
        "{host} is {address}, a {kind} address: the daemon does not fetch it for others (daemon.allow_private_urls)"
    )]
    NotPublic {
        /// The URL's host.
        host: String,
        /// The address it is or resolves to.
        address: IpAddr,
        /// Loopback, private, link-local...
        kind: &'static str,
    },
    /// The name did not resolve.
    #[error("{host} does not resolve: {detail}")]
    Unresolved {
        /// The URL's host.
        host: String,
        /// The resolver's error.
        detail: String,
    },
}

/// What kind of non-public address `address` is, or `None` when it is public.
pub fn non_public_kind(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => non_public_v4(v4),
            None => non_public_v6(v6),
        },
    }
}

fn non_public_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = address.octets();
    let kind = if address.is_loopback() {
        "loopback"
    } else if address.is_private() {
        "private-range"
    } else if address.is_link_local() {
        "link-local"
    } else if a == 0 {
        "unspecified"
    } else if a == 100 && (64..128).contains(&b) {
        // 100.64.0.0/10, carrier-grade NAT.
        "shared (CGNAT)"
    } else if a >= 224 || (a == 192 && b == 0 && c == 0) || (a == 198 && (b & 0xfe) == 18) {
        // Multicast, reserved and broadcast; protocol assignments; benchmarking.
        "reserved"
    } else {
        return None;
    };
    Some(kind)
}

fn non_public_v6(address: Ipv6Addr) -> Option<&'static str> {
    let [first, second, ..] = address.segments();
    let kind = if address.is_loopback() {
        "loopback"
    } else if address.is_unspecified() {
        "unspecified"
    } else if (first & 0xfe00) == 0xfc00 {
        "private-range (unique local)"
    } else if (first & 0xffc0) == 0xfe80 || (first & 0xffc0) == 0xfec0 {
        "link-local"
    } else if address.is_multicast() {
        "reserved"
    } else if (first == 0x64 && second == 0xff9b) || first == 0x2002 {
        // NAT64 and 6to4 embed IPv4 addresses that may be private: refused rather than decoded.
        "IPv4-embedding"
    } else {
        return None;
    };
    Some(kind)
}

/// Checks that `url` names a public host; a name is resolved and every address must be public.
pub async fn check_public(url: &str) -> Result<(), UrlRefusal> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| UrlRefusal::NotHttp(url.to_owned()))?;
    let scheme_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err(UrlRefusal::NotHttp(url.to_owned())),
    };
    let host = uri
        .host()
        .ok_or_else(|| UrlRefusal::NotHttp(url.to_owned()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(address) => vec![address],
        Err(_) => tokio::net::lookup_host((bare, uri.port_u16().unwrap_or(scheme_port)))
            .await
            .map_err(|error| UrlRefusal::Unresolved {
                host: host.to_owned(),
                detail: error.to_string(),
            })?
            .map(|socket| socket.ip())
            .collect(),
    };
    for address in addresses {
        if let Some(kind) = non_public_kind(address) {
            return Err(UrlRefusal::NotPublic {
                host: host.to_owned(),
                address,
                kind,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_not_public_and_internet_ones_are() {
        let internal = [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
        ];
        for text in internal {
            let address: IpAddr = text.parse().unwrap();
            assert!(non_public_kind(address).is_some(), "{text} passed");
        }
        for text in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(non_public_kind(address), None, "{text} refused");
        }
    }

    #[tokio::test]
    async fn urls_naming_internal_hosts_are_refused_before_any_request() {
        for url in [
            "http://127.0.0.1:9090/stats",
            "http://[::1]/",
            "http://localhost:8080/secret",
            "https://169.254.169.254/latest/meta-data/",
            "http://10.0.0.5/file.iso",
        ] {
            let refusal = check_public(url).await.unwrap_err();
            assert!(
                matches!(refusal, UrlRefusal::NotPublic { .. }),
                "{url}: {refusal}"
            );
            assert!(refusal.to_string().contains("daemon.allow_private_urls"));
        }
        assert!(matches!(
            check_public("ftp://example.org/x").await,
            Err(UrlRefusal::NotHttp(_))
        ));
        assert_eq!(check_public("http://93.184.216.34/x.bin").await, Ok(()));
    }
}
