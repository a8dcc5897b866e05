//! Which IP addresses the node may fetch from on a client's behalf, so it can't be turned
//! against the office network or the machine it runs on.
//!
//! Special-purpose addresses (private, shared, loopback, link-local, multicast, unspecified,
//! broadcast, and their IPv4-mapped IPv6 forms) are refused unless a configured
//! `[[origin]] cidr` range lists them *explicitly*: the range contains the address and lies
//! inside its special-purpose block. `10.0.0.0/8` or `10.1.2.3` allow that private address;
//! `0.0.0.0/0` allows only public ones. The rule covers IP literals a client names (checked when
//! routing) and what an allowed name resolves to (checked in the connector, between resolving
//! and connecting). An `[[origin]] upstream` URL is the admin's own choice and is not checked
//! (`upstream::origin::ChosenBy`).

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A kind of special-purpose address the node refuses unless a range lists it explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialKind {
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`) and unique-local IPv6 (`fc00::/7`).
    Private,
    /// Carrier-grade NAT space (`100.64/10`, RFC 6598): an ISP's or office's inside network.
    Shared,
    /// `127/8` and `::1`.
    Loopback,
    /// `169.254/16` (including the cloud metadata address `169.254.169.254`) and `fe80::/10`.
    LinkLocal,
    /// `224/4` and `ff00::/8`.
    Multicast,
    /// `0/8` ("this network", including `0.0.0.0`) and `::`.
    Unspecified,
    /// `255.255.255.255`.
    Broadcast,
}

impl SpecialKind {
    /// How the kind reads in a refusal.
    pub fn describe(self) -> &'static str {
        match self {
            SpecialKind::Private => "a private address",
            SpecialKind::Shared => "a shared (carrier-grade NAT) address",
            SpecialKind::Loopback => "a loopback address",
            SpecialKind::LinkLocal => "a link-local address",
            SpecialKind::Multicast => "a multicast address",
            SpecialKind::Unspecified => "an unspecified address",
            SpecialKind::Broadcast => "the broadcast address",
        }
    }
}

/// The special-purpose blocks, most specific first where they nest.
const SPECIAL_BLOCKS: &[(&str, SpecialKind)] = &[
    ("10.0.0.0/8", SpecialKind::Private),
    ("172.16.0.0/12", SpecialKind::Private),
    ("192.168.0.0/16", SpecialKind::Private),
    ("100.64.0.0/10", SpecialKind::Shared),
    ("127.0.0.0/8", SpecialKind::Loopback),
    ("169.254.0.0/16", SpecialKind::LinkLocal),
    ("224.0.0.0/4", SpecialKind::Multicast),
    ("0.0.0.0/8", SpecialKind::Unspecified),
    ("255.255.255.255/32", SpecialKind::Broadcast),
    ("fc00::/7", SpecialKind::Private),
    ("::1/128", SpecialKind::Loopback),
    ("fe80::/10", SpecialKind::LinkLocal),
    ("ff00::/8", SpecialKind::Multicast),
    ("::/128", SpecialKind::Unspecified),
];

/// The special-purpose block an address belongs to, if any. IPv4-mapped IPv6 addresses
/// (`::ffff:10.0.0.1`) are judged as the IPv4 address they carry.
pub fn special_block(address: IpAddr) -> Option<(IpNet, SpecialKind)> {
    let address = address.to_canonical();
    SPECIAL_BLOCKS.iter().find_map(|(block, kind)| {
        let block: IpNet = block.parse().expect("the special blocks are valid CIDR");
        block.contains(&address).then_some((block, *kind))
    })
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{address} is {} ({block}); list it in an [[origin]] cidr range to allow it", kind.describe())]
pub struct AddressRefusal {
    /// The address refused (IPv4-mapped ones as their IPv4 address).
    pub address: IpAddr,
    /// What kind of special-purpose address it is.
    pub kind: SpecialKind,
    /// The special-purpose block it is in.
    pub block: IpNet,
}

/// Parses one `cidr` entry: `203.0.113.0/24`, `2001:db8::/32`, or a single address (`/32` or
/// `/128`). Host bits after the prefix are refused, since they are a typo more often than not.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(address) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(address));
    }
    let range: IpNet = text.parse().map_err(|_| {
        format!(
            "\"{text}\" is not an address range; use e.g. \"203.0.113.0/24\" or \"2001:db8::/32\""
        )
    })?;
    if range.trunc() != range {
        return Err(format!(
            "\"{text}\" has bits set after the prefix; did you mean \"{}\"?",
            range.trunc()
        ));
    }
    Ok(range)
}

/// True when `range` lets the node fetch from `address`: it contains the address and, for a
/// special-purpose address, lies inside that address's special block.
pub fn range_allows(range: &IpNet, address: IpAddr) -> Result<bool, AddressRefusal> {
    let address = address.to_canonical();
    if !range.contains(&address) {
        return Ok(false);
    }
    match special_block(address) {
        None => Ok(true),
        Some((block, _)) if block.contains(range) => Ok(true),
        Some((block, kind)) => Err(AddressRefusal {
            address,
            kind,
            block,
        }),
    }
}

/// The addresses names may resolve to: public ones, and special-purpose ones that one of the
/// configured ranges (all `[[origin]] cidr` entries together) lists explicitly.
/// The ranges can be replaced while the node runs (a config reload), so the resolver that holds
/// the policy sees the new ones.
#[derive(Debug, Default)]
pub struct AddressPolicy {
    ranges: arc_swap::ArcSwap<Vec<IpNet>>,
}

/// A name whose every address was refused; nothing was connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("origin {name:?} resolves to no address the node may fetch from: {refusal}")]
pub struct NameRefused {
    /// The name resolved.
    pub name: String,
    /// Why its first address was refused.
    pub refusal: AddressRefusal,
}

impl AddressPolicy {
    /// The policy of these configured ranges.
    pub fn new(ranges: Vec<IpNet>) -> AddressPolicy {
        AddressPolicy {
            ranges: arc_swap::ArcSwap::from_pointee(ranges),
        }
    }

    /// Takes `other`'s ranges, for the resolvers already holding this policy.
    pub fn replace_with(&self, other: &AddressPolicy) {
        self.ranges.store(other.ranges.load_full());
    }

    /// The addresses of what `name` resolved to that may be connected to, in their order.
    /// Refuses the name when none may.
    pub fn filter_resolved(
        &self,
        name: &str,
        resolved: impl Iterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, NameRefused> {
        let mut first_refusal = None;
        let allowed: Vec<SocketAddr> = resolved
            .filter(|address| match self.check(address.ip()) {
                Ok(()) => true,
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                    false
                }
            })
            .collect();
        match first_refusal {
            Some(refusal) if allowed.is_empty() => Err(NameRefused {
                name: name.to_owned(),
                refusal,
            }),
            _ => Ok(allowed),
        }
    }

    /// Checks one address a name resolved to.
    pub fn check(&self, address: IpAddr) -> Result<(), AddressRefusal> {
        let address = address.to_canonical();
        let Some((block, kind)) = special_block(address) else {
            return Ok(());
        };
        let listed = self
            .ranges
            .load()
            .iter()
            .any(|range| range.contains(&address) && block.contains(range));
        if listed {
            Ok(())
        } else {
            Err(AddressRefusal {
                address,
                kind,
                block,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_classified_including_mapped_forms() {
        let table: &[(&str, Option<SpecialKind>)] = &[
            ("10.1.2.3", Some(SpecialKind::Private)),
            ("172.16.0.1", Some(SpecialKind::Private)),
            ("172.31.255.255", Some(SpecialKind::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(SpecialKind::Private)),
            ("100.64.0.1", Some(SpecialKind::Shared)),
            ("127.0.0.1", Some(SpecialKind::Loopback)),
            ("127.255.0.9", Some(SpecialKind::Loopback)),
            ("169.254.169.254", Some(SpecialKind::LinkLocal)),
            ("224.0.0.1", Some(SpecialKind::Multicast)),
            ("239.255.255.250", Some(SpecialKind::Multicast)),
            ("0.0.0.0", Some(SpecialKind::Unspecified)),
            ("255.255.255.255", Some(SpecialKind::Broadcast)),
            ("203.0.113.7", None),
            ("8.8.8.8", None),
            ("fd00::1", Some(SpecialKind::Private)),
            ("fc00::1", Some(SpecialKind::Private)),
            ("::1", Some(SpecialKind::Loopback)),
            ("fe80::1", Some(SpecialKind::LinkLocal)),
            ("ff02::1", Some(SpecialKind::Multicast)),
            ("::", Some(SpecialKind::Unspecified)),
            ("2001:db8::1", None),
            ("2606:4700::1111", None),
            ("::ffff:127.0.0.1", Some(SpecialKind::Loopback)),
            ("::ffff:10.0.0.1", Some(SpecialKind::Private)),
            ("::ffff:169.254.169.254", Some(SpecialKind::LinkLocal)),
            ("::ffff:203.0.113.7", None),
        ];
        for (address, expected) in table {
            assert_eq!(
                special_block(ip(address)).map(|(_, kind)| kind),
                *expected,
                "{address}"
            );
        }
    }

    #[test]
    fn a_special_address_needs_a_range_inside_its_block() {
        let policy = AddressPolicy::new(
            [
                "0.0.0.0/0",
                "::/0",
                "10.20.0.0/16",
                "127.0.0.0/8",
                "::1/128",
            ]
            .iter()
            .map(|text| parse_cidr(text).unwrap())
            .collect(),
        );
        let table: &[(&str, bool)] = &[
            ("203.0.113.7", true),
            ("2001:db8::1", true),
            ("10.20.1.1", true),
            ("10.21.1.1", false),
            ("192.168.0.1", false),
            ("127.0.0.1", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.21.1.1", false),
            ("169.254.169.254", false),
            ("fe80::1", false),
            ("fd00::1", false),
            ("224.0.0.1", false),
            ("0.0.0.0", false),
            ("::", false),
            ("255.255.255.255", false),
        ];
        for (address, allowed) in table {
            assert_eq!(policy.check(ip(address)).is_ok(), *allowed, "{address}");
        }
        let refusal = AddressPolicy::default()
            .check(ip("169.254.169.254"))
            .unwrap_err();
        assert_eq!(refusal.kind, SpecialKind::LinkLocal);
        assert_eq!(
            refusal.to_string(),
            "169.254.169.254 is a link-local address (169.254.0.0/16); list it in an [[origin]] cidr range to allow it"
        );
    }

    #[test]
    fn resolved_names_keep_their_allowed_addresses_only() {
        let policy = AddressPolicy::new(vec![parse_cidr("10.9.0.0/16").unwrap()]);
        let socket = |text: &str| SocketAddr::new(ip(text), 80);
        let mixed = [
            socket("127.0.0.1"),
            socket("203.0.113.7"),
            socket("10.9.1.1"),
        ];
        assert_eq!(
            policy.filter_resolved("cdn.example", mixed.into_iter()),
            Ok(vec![socket("203.0.113.7"), socket("10.9.1.1")])
        );
        let refused = policy
            .filter_resolved(
                "localhost",
                [socket("127.0.0.1"), socket("::1")].into_iter(),
            )
            .unwrap_err();
        assert_eq!(refused.refusal.kind, SpecialKind::Loopback);
        assert_eq!(refused.refusal.address, ip("127.0.0.1"));
    }

    #[test]
    fn one_range_allows_its_public_addresses_and_explicit_special_ones() {
        let broad = parse_cidr("0.0.0.0/0").unwrap();
        assert_eq!(range_allows(&broad, ip("203.0.113.7")), Ok(true));
        assert!(range_allows(&broad, ip("10.0.0.1")).is_err());
        assert_eq!(range_allows(&broad, ip("2001:db8::1")), Ok(false));
        let loopback = parse_cidr("127.0.0.0/8").unwrap();
        assert_eq!(range_allows(&loopback, ip("127.0.0.2")), Ok(true));
        assert_eq!(range_allows(&loopback, ip("::ffff:127.0.0.2")), Ok(true));
        assert_eq!(range_allows(&loopback, ip("10.0.0.1")), Ok(false));
    }

    #[test]
    fn cidr_entries_parse_or_say_what_is_wrong() {
        let table: &[(&str, Option<&str>)] = &[
            ("203.0.113.0/24", Some("203.0.113.0/24")),
            (" 2001:db8::/32 ", Some("2001:db8::/32")),
            ("203.0.113.7", Some("203.0.113.7/32")),
            ("::1", Some("::1/128")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("203.0.113.0/33", None),
            ("203.0.113/24", None),
            ("example.com", None),
            ("", None),
            ("2001:db8::/129", None),
            ("[::1]/128", None),
        ];
        for (text, expected) in table {
            assert_eq!(
                parse_cidr(text)
                    .ok()
                    .map(|range| range.to_string())
                    .as_deref(),
                *expected,
                "{text:?}"
            );
        }
        let host_bits = parse_cidr("203.0.113.9/24").unwrap_err();
        assert!(host_bits.contains("\"203.0.113.0/24\""), "{host_bits}");
    }
}
