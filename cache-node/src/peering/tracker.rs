//! The peer tracker: which peers hold which pieces of which content, so a downloading
//! peer-client can find LAN peers, peers of its group, or any peer, through the node.
//!
//! - **Announcements.** A peer says, per content id: the pieces it holds (downloads still in
//!   progress included), its peer port, its group id, whether it is complete and how many uploads
//!   it is serving. The node records the peer under the **source address of the TCP connection**
//!   it announced on, never an address the peer claims: a claimed address would let anyone point
//!   downloaders at a third party (a reflection attack), and in LAN mode the node's view of the
//!   source address is the only thing that makes "same subnet" mean anything.
//! - **Expiry.** An announcement lives `peering.announce_ttl` unless renewed. Expired peers are
//!   dropped when their content is touched, by a periodic sweep, and before a bound refuses a new
//!   announcement.
//! - **Scope.** A query names a download mode: LAN (the requester's TCP source address and the
//!   peer's share a prefix of `lan_prefix_v4`/`lan_prefix_v6` bits), Group (same group id) or any.
//! - **Ranking.** Complete peers first, then the least loaded (fewest active uploads), then those
//!   holding more pieces; ties are shuffled so equal peers share the load.
//! - **Bounds.** At most `max_contents` content ids, `max_peers_per_content` peers per content,
//!   `max_contents_per_address` announcements per source address, and [`MAX_PIECE_RANGES`] piece
//!   ranges per announcement, so a misbehaving client cannot exhaust the node's memory. A peer is
//!   one source address per content: a second port on the same address replaces the first.
//! - **Fair shares.** A bound must not let a few addresses lock everyone else out, so the two
//!   that an address can fill by itself evict rather than refuse. An address at
//!   `max_contents_per_address` (a small share of `max_contents`) loses its own least recently
//!   renewed announcement to its new one. When `max_contents` is reached, the address holding
//!   the most announcements loses its least recently renewed one, again and again until a
//!   content id is free: an address announcing little keeps its announcements while any address
//!   holds more, however often the others renew. Only `max_peers_per_content` still refuses
//!   (503): a content that many peers hold is served by them and by the node.
//!
//! Time is tokio's clock, so tests drive expiry with a paused clock.

use outpost_shared::sync::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rand::seq::SliceRandom;

use tokio::time::Instant;

use crate::peering::PeeringConfig;

/// The most piece ranges one announcement may list. A peer whose holdings are more fragmented
/// reports a subset: under-reporting only costs it uploads, and over-reporting is caught by the
/// downloader's hash check.
pub const MAX_PIECE_RANGES: usize = 64;

/// The longest group id accepted, in bytes (Delivery Optimization's are GUIDs).
pub const MAX_GROUP_ID_LEN: usize = 128;

/// How often the full sweep of expired peers may run when a bound is hit.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

pub use outpost_shared::wire::{ContentId, PeerInfo, PieceRange};

/// What a peer announces for one content id.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// The content.
    pub content_id: ContentId,
    /// The TCP source address the node saw, with the peer port the peer claimed.
    pub address: SocketAddr,
    /// The peer's group id, if it has one.
    pub group_id: Option<String>,
    /// The pieces it holds (normalised by [`normalise_ranges`]).
    pub pieces: Vec<PieceRange>,
    /// True when it holds every piece.
    pub complete: bool,
    /// Uploads it is serving right now: its load.
    pub active_uploads: u32,
}

/// Why an announcement was refused. The peer may try again after the TTL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// `max_peers_per_content` peers hold this content already.
    #[error("the tracker holds the most peers it may for this content ({0})")]
    ContentFull(usize),
}

/// What an accepted announcement cost others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Announced {
    /// Announcements evicted to make room for it (the announcer's own oldest at its share, or
    /// those of the addresses holding the most when the tracker is full).
    pub evicted: usize,
}

/// Which peers a query may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Download mode 1: the same subnet as the requester's TCP source address.
    Lan,
    /// Download mode 2: the same group id.
    Group(String),
    /// Download mode 3: any peer.
    Any,
}

#[derive(Debug, Clone)]
struct PeerRecord {
    /// When it was last announced or renewed, in the tracker's renewal order.
    renewal: RenewalStamp,
    port: u16,
    group_id: Option<String>,
    pieces: Vec<PieceRange>,
    complete: bool,
    active_uploads: u32,
    expires_at: Instant,
}

impl PeerRecord {
    fn piece_total(&self) -> u64 {
        self.pieces
            .iter()
            .map(|[first, last]| (last - first).saturating_add(1))
            .fold(0, u64::saturating_add)
    }
}

/// A position in the order of renewals: a larger stamp was renewed later.
type RenewalStamp = u64;

#[derive(Debug, Default)]
struct TrackerInner {
    contents: HashMap<ContentId, HashMap<IpAddr, PeerRecord>>,
    /// Each source address's announcements, least recently renewed first.
    per_address: HashMap<IpAddr, BTreeMap<RenewalStamp, ContentId>>,
    /// Source addresses by how many announcements they hold, to find the one holding the most.
    by_count: BTreeSet<(usize, IpAddr)>,
    peers: usize,
    next_renewal: RenewalStamp,
    last_sweep: Option<Instant>,
}

impl TrackerInner {
    fn address_count(&self, ip: IpAddr) -> usize {
        self.per_address.get(&ip).map_or(0, BTreeMap::len)
    }

    /// Moves `ip` in [`TrackerInner::by_count`] from `before` announcements to its count now.
    fn recount(&mut self, ip: IpAddr, before: usize) {
        self.by_count.remove(&(before, ip));
        let now = self.address_count(ip);
        if now > 0 {
            self.by_count.insert((now, ip));
        } else {
            self.per_address.remove(&ip);
        }
    }

    /// Records `record` for `ip`, replacing (renewing) the one it had for `content_id`.
    fn put(&mut self, content_id: ContentId, ip: IpAddr, mut record: PeerRecord) {
        record.renewal = self.next_renewal;
        self.next_renewal += 1;
        let before = self.address_count(ip);
        let stamps = self.per_address.entry(ip).or_default();
        stamps.insert(record.renewal, content_id);
        let replaced = self
            .contents
            .entry(content_id)
            .or_default()
            .insert(ip, record);
        match replaced {
            Some(old) => {
                stamps.remove(&old.renewal);
            }
            None => self.peers += 1,
        }
        self.recount(ip, before);
    }

    fn remove_peer(&mut self, content_id: &ContentId, ip: IpAddr) -> bool {
        let Some(peers) = self.contents.get_mut(content_id) else {
            return false;
        };
        let Some(record) = peers.remove(&ip) else {
            return false;
        };
        if peers.is_empty() {
            self.contents.remove(content_id);
        }
        self.peers -= 1;
        let before = self.address_count(ip);
        if let Some(stamps) = self.per_address.get_mut(&ip) {
            stamps.remove(&record.renewal);
        }
        self.recount(ip, before);
        true
    }

    /// Removes the least recently renewed announcement of `ip`; returns its content id.
    fn evict_oldest_of(&mut self, ip: IpAddr) -> Option<ContentId> {
        let content_id = *self.per_address.get(&ip)?.first_key_value()?.1;
        self.remove_peer(&content_id, ip).then_some(content_id)
    }

    /// Removes the least recently renewed announcement of the address holding the most (ties:
    /// the highest address).
    fn evict_from_largest_holder(&mut self) -> Option<ContentId> {
        let (_, ip) = *self.by_count.last()?;
        self.evict_oldest_of(ip)
    }

    fn expire_content(&mut self, content_id: &ContentId, now: Instant) {
        let expired: Vec<IpAddr> = match self.contents.get(content_id) {
            Some(peers) => peers
                .iter()
                .filter(|(_, record)| record.expires_at <= now)
                .map(|(ip, _)| *ip)
                .collect(),
            None => return,
        };
        for ip in expired {
            self.remove_peer(content_id, ip);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        let ids: Vec<ContentId> = self.contents.keys().copied().collect();
        for id in ids {
            self.expire_content(&id, now);
        }
    }

    /// Sweeps unless a sweep ran within [`MIN_SWEEP_INTERVAL`], so a client hammering a full
    /// tracker cannot make every announcement walk everything.
    fn sweep_if_due(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_none_or(|last| now.duration_since(last) >= MIN_SWEEP_INTERVAL)
        {
            self.sweep(now);
        }
    }
}

/// The tracker: shared by every worker through the node.
#[derive(Debug)]
pub struct Tracker {
    limits: PeeringConfig,
    inner: Mutex<TrackerInner>,
}

/// Sorts, merges and bounds piece ranges. Returns `None` when a range is inverted or there are more
/// than [`MAX_PIECE_RANGES`] after merging.
pub fn normalise_ranges(mut ranges: Vec<PieceRange>) -> Option<Vec<PieceRange>> {
    if ranges.iter().any(|[first, last]| first > last) {
        return None;
    }
    ranges.sort_unstable();
    let mut merged: Vec<PieceRange> = Vec::with_capacity(ranges.len());
    for [first, last] in ranges {
        match merged.last_mut() {
            Some([_, merged_last]) if first <= merged_last.saturating_add(1) => {
                *merged_last = (*merged_last).max(last);
            }
            _ => merged.push([first, last]),
        }
    }
    (merged.len() <= MAX_PIECE_RANGES).then_some(merged)
}

/// True when `a` and `b` share their first `prefix_v4` (IPv4) or `prefix_v6` (IPv6) bits. Addresses
/// of different families never do; IPv4-mapped IPv6 addresses count as IPv4.
pub fn same_subnet(a: IpAddr, b: IpAddr, prefix_v4: u8, prefix_v6: u8) -> bool {
    fn masked(bits: u128, width: u32, prefix: u8) -> u128 {
        let prefix = u32::from(prefix).min(width);
        if prefix == 0 {
            0
        } else {
            bits >> (width - prefix)
        }
    }
    match (a.to_canonical(), b.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            masked(u32::from(a).into(), 32, prefix_v4) == masked(u32::from(b).into(), 32, prefix_v4)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            masked(u128::from(a), 128, prefix_v6) == masked(u128::from(b), 128, prefix_v6)
        }
        _ => false,
    }
}

impl Tracker {
    /// An empty tracker.
    pub fn new(limits: PeeringConfig) -> Tracker {
        Tracker {
            limits,
            inner: Mutex::new(TrackerInner::default()),
        }
    }

    /// The `[peering]` section it runs with: the TTL, the LAN prefixes and the bounds.
    pub fn limits(&self) -> &PeeringConfig {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, TrackerInner> {
        lock(&self.inner)
    }

    /// Records or renews an announcement. An announcement holding no piece and not complete
    /// withdraws the peer instead. A new announcement evicts others at the fair-share bounds
    /// (see the module's "Fair shares"), and is refused only when its content has
    /// `max_peers_per_content` peers.
    pub fn announce(&self, announcement: Announcement) -> Result<Announced, AnnounceError> {
        let now = Instant::now();
        let ip = announcement.address.ip().to_canonical();
        let content_id = announcement.content_id;
        let mut inner = self.lock();
        inner.expire_content(&content_id, now);
        if announcement.pieces.is_empty() && !announcement.complete {
            inner.remove_peer(&content_id, ip);
            return Ok(Announced::default());
        }
        let record = PeerRecord {
            renewal: 0,
            port: announcement.address.port(),
            group_id: announcement.group_id,
            pieces: announcement.pieces,
            complete: announcement.complete,
            active_uploads: announcement.active_uploads,
            expires_at: now + self.limits.announce_ttl,
        };
        let renewal = inner
            .contents
            .get(&content_id)
            .is_some_and(|peers| peers.contains_key(&ip));
        let mut announced = Announced::default();
        if !renewal {
            announced.evicted = self.make_room(&mut inner, &content_id, ip, now)?;
        }
        inner.put(content_id, ip, record);
        Ok(announced)
    }

    /// Makes room for a new peer record of `ip` for `content_id`, sweeping expired peers first
    /// when a bound is reached; returns how many live announcements it evicted.
    fn make_room(
        &self,
        inner: &mut TrackerInner,
        content_id: &ContentId,
        ip: IpAddr,
        now: Instant,
    ) -> Result<usize, AnnounceError> {
        let limits = &self.limits;
        let content_peers =
            |inner: &TrackerInner| inner.contents.get(content_id).map_or(0, HashMap::len);
        let contents_full = |inner: &TrackerInner| {
            content_peers(inner) == 0 && inner.contents.len() >= limits.max_contents
        };
        if content_peers(inner) >= limits.max_peers_per_content || contents_full(inner) {
            inner.sweep_if_due(now);
        }
        if content_peers(inner) >= limits.max_peers_per_content {
            return Err(AnnounceError::ContentFull(limits.max_peers_per_content));
        }
        let mut evicted = 0;
        // Over its share, an address makes room out of its own announcements.
        while inner.address_count(ip) >= limits.max_contents_per_address {
            if inner.evict_oldest_of(ip).is_none() {
                break;
            }
            evicted += 1;
        }
        // A full tracker takes from whoever holds the most, until a content id is free. Each
        // eviction removes a record some announcement added, so this costs, over time, no more
        // than the announcements did.
        while contents_full(inner) {
            if inner.evict_from_largest_holder().is_none() {
                break;
            }
            evicted += 1;
        }
        if evicted > 0 {
            tracing::debug!(%ip, evicted, "tracker: evicted announcements to make room");
        }
        Ok(evicted)
    }

    /// The peers of `content_id` that `requester` may see in `scope`, best first, at most `limit`.
    /// The requester itself is never in the answer.
    pub fn peers(
        &self,
        content_id: &ContentId,
        requester: IpAddr,
        scope: &Scope,
        limit: usize,
    ) -> Vec<PeerInfo> {
        let now = Instant::now();
        let requester = requester.to_canonical();
        let mut inner = self.lock();
        inner.expire_content(content_id, now);
        let Some(peers) = inner.contents.get(content_id) else {
            return Vec::new();
        };
        let mut visible: Vec<(&IpAddr, &PeerRecord)> = peers
            .iter()
            .filter(|(ip, record)| {
                **ip != requester
                    && match scope {
                        Scope::Lan => same_subnet(
                            **ip,
                            requester,
                            self.limits.lan_prefix_v4,
                            self.limits.lan_prefix_v6,
                        ),
                        Scope::Group(group_id) => record.group_id.as_ref() == Some(group_id),
                        Scope::Any => true,
                    }
            })
            .collect();
        // Shuffle first: the sort is stable, so equal peers stay in random order.
        visible.shuffle(&mut rand::rng());
        visible.sort_by_key(|(_, record)| {
            (
                !record.complete,
                record.active_uploads,
                std::cmp::Reverse(record.piece_total()),
            )
        });
        visible
            .into_iter()
            .take(limit)
            .map(|(ip, record)| PeerInfo {
                address: SocketAddr::new(*ip, record.port),
                complete: record.complete,
                pieces: record.pieces.clone(),
                active_uploads: record.active_uploads,
                expires_in_secs: record.expires_at.saturating_duration_since(now).as_secs(),
            })
            .collect()
    }

    /// Drops every expired announcement.
    pub fn sweep(&self) {
        self.lock().sweep(Instant::now());
    }

    /// How many content ids and peer records are tracked.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.contents.len(), inner.peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PeeringConfig {
        PeeringConfig {
            announce_ttl: Duration::from_secs(60),
            max_contents: 4,
            max_peers_per_content: 3,
            max_contents_per_address: 2,
            ..PeeringConfig::default()
        }
    }

    fn content(n: u8) -> ContentId {
        ContentId([n; 32])
    }

    fn announce(address: &str, content_id: ContentId) -> Announcement {
        Announcement {
            content_id,
            address: address.parse().unwrap(),
            group_id: None,
            pieces: vec![[0, 9]],
            complete: false,
            active_uploads: 0,
        }
    }

    fn addresses(peers: &[PeerInfo]) -> Vec<String> {
        peers.iter().map(|peer| peer.address.to_string()).collect()
    }

    #[test]
    fn content_ids_are_64_lower_case_hex_digits() {
        let id = ContentId::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(id.to_hex(), "ab".repeat(32));
        assert!(ContentId::parse(&"Ab".repeat(32)).is_none());
        assert!(ContentId::parse("ab").is_none());
        assert!(ContentId::parse(&"zz".repeat(32)).is_none());
        assert!(ContentId::parse(&"ab".repeat(33)).is_none());
    }

    #[test]
    fn piece_ranges_are_sorted_merged_and_bounded() {
        assert_eq!(
            normalise_ranges(vec![[5, 7], [0, 2], [3, 3], [6, 9], [20, 20], [4, 4]]),
            Some(vec![[0, 9], [20, 20]])
        );
        assert_eq!(
            normalise_ranges(vec![[5, 7], [0, 3]]),
            Some(vec![[0, 3], [5, 7]])
        );
        assert_eq!(normalise_ranges(vec![[3, 1]]), None);
        // Indexes past u32 survive (the two ends once disagreed on the width).
        assert_eq!(
            normalise_ranges(vec![[u64::MAX, u64::MAX], [0, u64::MAX]]),
            Some(vec![[0, u64::MAX]])
        );
        let fragmented: Vec<PieceRange> = (0..=MAX_PIECE_RANGES as u64)
            .map(|n| [n * 2, n * 2])
            .collect();
        assert_eq!(normalise_ranges(fragmented), None);
    }

    #[test]
    fn subnets_compare_the_configured_prefix() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let table = [
            ("127.0.0.2", "127.0.0.3", 24, true),
            ("127.0.0.2", "127.0.1.2", 24, false),
            ("127.0.0.2", "127.0.1.2", 16, true),
            ("10.1.2.3", "192.168.0.1", 0, true),
            ("10.1.2.3", "10.1.2.3", 32, true),
            ("10.1.2.3", "10.1.2.4", 32, false),
            ("::ffff:127.0.0.2", "127.0.0.9", 24, true),
            ("fd00:1:2:3::1", "fd00:1:2:3:ffff::9", 24, true),
            ("fd00:1:2:3::1", "fd00:1:2:4::1", 24, false),
            ("127.0.0.1", "::1", 0, false),
        ];
        for (a, b, prefix_v4, expected) in table {
            assert_eq!(
                same_subnet(ip(a), ip(b), prefix_v4, 64),
                expected,
                "{a} {b} /{prefix_v4}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn announcements_expire_unless_renewed() {
        let tracker = Tracker::new(limits());
        let requester: IpAddr = "127.0.0.9".parse().unwrap();
        tracker
            .announce(announce("127.0.0.2:7680", content(1)))
            .unwrap();
        tracker
            .announce(announce("127.0.0.3:7680", content(1)))
            .unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        tracker
            .announce(announce("127.0.0.3:7680", content(1)))
            .unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        let seen = tracker.peers(&content(1), requester, &Scope::Any, 10);
        assert_eq!(
            addresses(&seen),
            ["127.0.0.3:7680"],
            "only the renewed peer is left"
        );
        assert_eq!(seen[0].expires_in_secs, 30);
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(tracker
            .peers(&content(1), requester, &Scope::Any, 10)
            .is_empty());
        assert_eq!(tracker.counts(), (0, 0), "expired contents leave no trace");
    }

    #[tokio::test(start_paused = true)]
    async fn scopes_show_only_the_subnet_or_the_group() {
        let tracker = Tracker::new(limits());
        let mut same_lan = announce("127.0.0.2:7680", content(1));
        same_lan.group_id = Some("blue".into());
        let mut other_lan = announce("127.0.1.2:7681", content(1));
        other_lan.group_id = Some("red".into());
        let no_group = announce("127.0.0.3:7682", content(1));
        for peer in [same_lan, other_lan, no_group] {
            tracker.announce(peer).unwrap();
        }
        let requester: IpAddr = "127.0.0.9".parse().unwrap();
        let mut lan = addresses(&tracker.peers(&content(1), requester, &Scope::Lan, 10));
        lan.sort();
        assert_eq!(lan, ["127.0.0.2:7680", "127.0.0.3:7682"]);
        let red = tracker.peers(&content(1), requester, &Scope::Group("red".into()), 10);
        assert_eq!(addresses(&red), ["127.0.1.2:7681"]);
        assert_eq!(
            tracker.peers(&content(1), requester, &Scope::Any, 10).len(),
            3
        );
        // A peer never gets itself back.
        let own = tracker.peers(&content(1), "127.0.0.2".parse().unwrap(), &Scope::Any, 10);
        assert!(!addresses(&own).contains(&"127.0.0.2:7680".to_owned()));
        assert!(tracker
            .peers(&content(2), requester, &Scope::Any, 10)
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_rank_complete_then_least_loaded_then_most_pieces() {
        let mut limits = limits();
        limits.max_peers_per_content = 10;
        let tracker = Tracker::new(limits);
        let peer = |address: &str, complete: bool, active_uploads: u32, last: u64| Announcement {
            complete,
            active_uploads,
            pieces: vec![[0, last]],
            ..announce(address, content(1))
        };
        for announcement in [
            peer("127.0.0.2:1", false, 0, 99),
            peer("127.0.0.3:1", true, 5, 99),
            peer("127.0.0.4:1", true, 1, 99),
            peer("127.0.0.5:1", false, 0, 10),
            peer("127.0.0.6:1", false, 3, 99),
        ] {
            tracker.announce(announcement).unwrap();
        }
        let ranked = tracker.peers(&content(1), "127.0.0.9".parse().unwrap(), &Scope::Any, 10);
        assert_eq!(
            addresses(&ranked),
            [
                "127.0.0.4:1",
                "127.0.0.3:1",
                "127.0.0.2:1",
                "127.0.0.5:1",
                "127.0.0.6:1"
            ]
        );
        let top_two = tracker.peers(&content(1), "127.0.0.9".parse().unwrap(), &Scope::Any, 2);
        assert_eq!(addresses(&top_two), ["127.0.0.4:1", "127.0.0.3:1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_content_refuses_new_peers_until_one_leaves_and_renewals_always_pass() {
        let tracker = Tracker::new(limits());
        for host in 2..=4 {
            tracker
                .announce(announce(&format!("127.0.0.{host}:7680"), content(1)))
                .unwrap();
        }
        assert_eq!(
            tracker.announce(announce("127.0.0.5:7680", content(1))),
            Err(AnnounceError::ContentFull(3))
        );
        // A renewal (even from another port on the same address) takes no new room.
        tracker
            .announce(announce("127.0.0.2:9999", content(1)))
            .unwrap();
        assert_eq!(tracker.counts(), (1, 3));
        // Withdrawing frees room at once; expiry frees the rest.
        let mut withdraw = announce("127.0.0.4:7680", content(1));
        withdraw.pieces.clear();
        tracker.announce(withdraw).unwrap();
        tracker
            .announce(announce("127.0.0.5:7680", content(1)))
            .unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        tracker
            .announce(announce("127.0.0.6:7680", content(2)))
            .unwrap();
        tracker.sweep();
        assert_eq!(
            tracker.counts(),
            (1, 1),
            "the sweep dropped every expired peer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_over_its_share_loses_its_least_recently_renewed_announcement() {
        let tracker = Tracker::new(limits());
        let requester: IpAddr = "127.0.0.9".parse().unwrap();
        tracker
            .announce(announce("127.0.0.2:1", content(1)))
            .unwrap();
        tracker
            .announce(announce("127.0.0.2:1", content(2)))
            .unwrap();
        // Renewing content 1 makes content 2 the least recently renewed.
        tracker
            .announce(announce("127.0.0.2:1", content(1)))
            .unwrap();
        assert_eq!(
            tracker.announce(announce("127.0.0.2:1", content(3))),
            Ok(Announced { evicted: 1 })
        );
        let holds = |id: u8| {
            !tracker
                .peers(&content(id), requester, &Scope::Any, 10)
                .is_empty()
        };
        assert!(holds(1) && !holds(2) && holds(3));
        assert_eq!(tracker.counts(), (2, 2));
    }

    /// The attack of issue 10: a few addresses announce as fast as they can and renew forever.
    #[tokio::test(start_paused = true)]
    async fn a_few_addresses_announcing_without_end_never_lock_out_a_real_peer() {
        let limits = PeeringConfig::default();
        let tracker = Tracker::new(limits.clone());
        let requester: IpAddr = "10.9.9.9".parse().unwrap();
        let real_peer = "10.0.0.50:7680";
        let attacker = |index: u32| format!("10.66.0.{}:7680", index % 4 + 1);
        let fake = |index: u32| {
            let mut id = [0xee; 32];
            id[..4].copy_from_slice(&index.to_be_bytes());
            ContentId(id)
        };
        // 4 addresses × 1,024 announcements filled the tracker before; now each address keeps
        // its share and the rest are its own evictions.
        let mut evicted = 0;
        for index in 0..4 * 1024 {
            evicted += tracker
                .announce(announce(&attacker(index), fake(index)))
                .unwrap()
                .evicted;
        }
        let share = limits.max_contents_per_address;
        assert_eq!(tracker.counts(), (4 * share, 4 * share));
        assert_eq!(evicted, 4 * 1024 - 4 * share);
        tracker.announce(announce(real_peer, content(1))).unwrap();
        // The attackers go on announcing new content and renewing what they hold.
        for index in 4 * 1024..8 * 1024 {
            tracker
                .announce(announce(&attacker(index), fake(index)))
                .unwrap();
            tracker
                .announce(announce(&attacker(index), fake(index - 4)))
                .unwrap();
        }
        let found = tracker.peers(&content(1), requester, &Scope::Any, 10);
        assert_eq!(addresses(&found), [real_peer]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_tracker_takes_room_from_the_largest_holders_not_the_newcomer() {
        let limits = PeeringConfig {
            max_contents: 64,
            max_contents_per_address: 16,
            ..PeeringConfig::default()
        };
        let tracker = Tracker::new(limits);
        let requester: IpAddr = "10.9.9.9".parse().unwrap();
        let fake = |address: u8, index: u8| {
            ContentId([
                address, index, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0, 0, 0, 0, 0, 0, 0xee,
            ])
        };
        // Sixteen attacker addresses fill all 64 content ids, four each, and renew them.
        for round in 0..2 {
            for address in 1..=16u8 {
                for index in 0..4 {
                    let outcome = tracker
                        .announce(announce(
                            &format!("10.66.0.{address}:1"),
                            fake(address, index),
                        ))
                        .unwrap();
                    assert_eq!(outcome.evicted, 0, "round {round}");
                }
            }
        }
        assert_eq!(tracker.counts(), (64, 64));
        // Two real peers get in, each evicting an attacker's least recently renewed entry.
        for (host, id) in [(50, 1), (51, 2)] {
            assert_eq!(
                tracker.announce(announce(&format!("10.0.0.{host}:7680"), content(id))),
                Ok(Announced { evicted: 1 })
            );
        }
        assert_eq!(tracker.counts(), (64, 64));
        // New attacker content keeps coming: it is taken from the attackers, who hold more.
        for index in 4..40 {
            tracker
                .announce(announce("10.66.0.1:1", fake(1, index)))
                .unwrap();
        }
        for (host, id) in [(50, 1), (51, 2)] {
            let found = tracker.peers(&content(id), requester, &Scope::Any, 10);
            assert_eq!(addresses(&found), [format!("10.0.0.{host}:7680")]);
        }
        assert_eq!(tracker.counts(), (64, 64));
    }
}
