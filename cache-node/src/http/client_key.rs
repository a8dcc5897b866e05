//! Who a client counts as, for per-client caps and throttles: its address, or for IPv6 the /64
//! network a single host can pick addresses from.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Who a connection (or a failed admin token) counts against: a client address, IPv4-mapped
/// IPv6 addresses counting as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of one address. Connection caps count per address, not per IPv6 /64: every host
    /// of an IPv6 office LAN shares one /64, and would share one cap.
    pub fn address(address: IpAddr) -> ClientKey {
        ClientKey(address.to_canonical())
    }

    /// The key of an address's network: the address itself for IPv4, its /64 for IPv6, where
    /// one host can pick addresses from a whole /64. For throttles a single host must not evade
    /// by changing addresses.
    pub fn network(address: IpAddr) -> ClientKey {
        match address.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => ClientKey(v4),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, formatter)
    }
}

/// How a client's connection reached the node, put in each request's extensions by the server:
/// routing fetches an origin named over TLS with HTTPS (unless its `[[origin]]` says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientScheme {
    /// Plain HTTP (the client listener, `server.listen`).
    #[default]
    Http,
    /// HTTPS (the TLS listener, `tls.listen`).
    Https,
}

/// The TCP source address of a client connection, put in each request's extensions by the
/// server so the tracker can see who is asking.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);
