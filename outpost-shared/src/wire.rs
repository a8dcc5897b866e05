//! The peering protocol's JSON documents, as the node serves them under `/_outpost/v1/` and
//! peer-client reads them. Unknown fields are ignored when reading, so either end can add
//! fields without breaking the other.

use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// A content id: the SHA-256 of the node's cache key, 64 lower-case hex digits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// Parses exactly 64 lower-case hex digits; nothing else is a content id, so no path, dot or
    /// separator can ever get through (peer-client names files after content ids).
    pub fn parse(text: &str) -> Option<ContentId> {
        if text.len() != 64
            || !text
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
        {
            return None;
        }
        let mut id = [0_u8; 32];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(ContentId(id))
    }

    /// The lower-case hex form.
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Display for ContentId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        ContentId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("\"{text}\" is not a content id")))
    }
}

/// An inclusive range of piece indexes, `[first, last]` on the wire.
pub type PieceRange = [u64; 2];

/// Why a manifest is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// `piece_size` is zero.
    #[error("the manifest's piece_size is 0")]
    ZeroPieceSize,
    /// The piece list does not cover `size` in pieces of `piece_size`.
    #[error("{hashes} piece hashes for {size} bytes in pieces of {piece_size}")]
    WrongPieceCount {
        /// Hashes listed.
        hashes: usize,
        /// The declared length.
        size: u64,
        /// The declared piece length.
        piece_size: u64,
    },
}

/// The piece manifest of one version of one object (`GET /_outpost/v1/manifest/<content id>`):
/// the SHA-256 of each piece, hashed by the node from the origin's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The content id.
    pub content_id: ContentId,
    /// The cache key text (origin host, path and query), for people reading the document.
    #[serde(default)]
    pub key: String,
    /// The complete length in bytes.
    pub size: u64,
    /// The origin's `ETag` of this version, if it sent one.
    pub etag: Option<String>,
    /// The origin's `Last-Modified` of this version, if it sent one.
    pub last_modified: Option<String>,
    /// The piece length in bytes; the last piece may be shorter.
    pub piece_size: u64,
    /// The SHA-256 of each piece, in order; lower-case hex on the wire.
    #[serde(with = "hex_digests")]
    pub pieces: Vec<Sha256Digest>,
}

impl Manifest {
    /// Checks that the piece list covers `size` in pieces of `piece_size`.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.piece_size == 0 {
            return Err(ManifestError::ZeroPieceSize);
        }
        if self.pieces.len() as u64 != self.size.div_ceil(self.piece_size) {
            return Err(ManifestError::WrongPieceCount {
                hashes: self.pieces.len(),
                size: self.size,
                piece_size: self.piece_size,
            });
        }
        Ok(())
    }

    /// The number of pieces.
    pub fn piece_count(&self) -> u64 {
        self.pieces.len() as u64
    }
}

mod hex_digests {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Sha256Digest;

    pub fn serialize<S: Serializer>(
        digests: &[Sha256Digest],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(digests.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Sha256Digest>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                let mut digest = [0_u8; 32];
                hex::decode_to_slice(text, &mut digest).map_err(|_| {
                    serde::de::Error::custom(format!("\"{text}\" is not a SHA-256 in hex"))
                })?;
                Ok(digest)
            })
            .collect()
    }
}

/// The body of `POST /_outpost/v1/announce`: what a peer holds of one content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The content.
    pub content_id: ContentId,
    /// The port the peer serves pieces on; the node pairs it with the connection's source
    /// address, never an address the peer claims.
    pub port: u16,
    /// The peer's group id, for download mode 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The pieces it holds, as inclusive ranges.
    #[serde(default)]
    pub pieces: Vec<PieceRange>,
    /// True when it holds every piece.
    #[serde(default)]
    pub complete: bool,
    /// Uploads it is serving right now: its load.
    #[serde(default)]
    pub active_uploads: u32,
}

/// The node's answer to an accepted announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    /// The address other peers will be given: the connection's source address and the port.
    pub address: SocketAddr,
    /// Seconds the announcement lives unless renewed.
    pub ttl_secs: u64,
}

/// One peer in the answer to a peer query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Where to connect: the announcing connection's source address and the claimed peer port.
    pub address: SocketAddr,
    /// True when it holds every piece.
    #[serde(default)]
    pub complete: bool,
    /// The pieces it holds, as inclusive ranges.
    #[serde(default)]
    pub pieces: Vec<PieceRange>,
    /// Uploads it reported serving.
    #[serde(default)]
    pub active_uploads: u32,
    /// Seconds until the announcement expires unless renewed.
    #[serde(default)]
    pub expires_in_secs: u64,
}

/// The answer to `GET /_outpost/v1/peers?content_id=...&mode=...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerList {
    /// The content asked about.
    pub content_id: ContentId,
    /// The download mode the query was scoped by.
    pub mode: u8,
    /// The peers, best first.
    pub peers: Vec<PeerInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> ContentId {
        ContentId([byte; 32])
    }

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        serde_json::from_slice(&serde_json::to_vec(value).unwrap()).unwrap()
    }

    #[test]
    fn content_ids_are_exactly_64_lower_case_hex_digits() {
        let text = "ab".repeat(32);
        assert_eq!(ContentId::parse(&text), Some(id(0xab)));
        assert_eq!(id(0xab).to_string(), text);
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{}/..", "ab".repeat(31)),
            String::new(),
        ] {
            assert_eq!(ContentId::parse(&bad), None, "{bad:?}");
        }
        assert!(serde_json::from_str::<ContentId>("\"../etc/passwd\"").is_err());
    }

    #[test]
    fn every_document_round_trips() {
        let manifest = Manifest {
            content_id: id(1),
            key: "dl.example.com/a.cab".into(),
            size: 2_500_000,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            piece_size: 1 << 20,
            pieces: vec![[1; 32], [2; 32], [3; 32]],
        };
        assert_eq!(round_trip(&manifest), manifest);
        assert_eq!(manifest.check(), Ok(()));
        let announcement = Announcement {
            content_id: id(2),
            port: 7680,
            group_id: Some("office".into()),
            pieces: vec![[0, 3], [7, 7]],
            complete: false,
            active_uploads: 2,
        };
        assert_eq!(round_trip(&announcement), announcement);
        let announced = Announced {
            address: "10.0.0.5:7680".parse().unwrap(),
            ttl_secs: 600,
        };
        assert_eq!(round_trip(&announced), announced);
        let list = PeerList {
            content_id: id(3),
            mode: 1,
            peers: vec![PeerInfo {
                address: "10.0.0.6:7680".parse().unwrap(),
                complete: true,
                pieces: vec![],
                active_uploads: 0,
                expires_in_secs: 30,
            }],
        };
        assert_eq!(round_trip(&list), list);
    }

    #[test]
    fn piece_ranges_beyond_u32_survive_the_wire() {
        // The two ends once disagreed (u64 sent, u32 read); one type now serves both.
        let json = format!(
            r#"{{"content_id":"{}","port":7680,"pieces":[[0,{}]]}}"#,
            "cd".repeat(32),
            u64::from(u32::MAX) + 1
        );
        let announcement: Announcement = serde_json::from_str(&json).unwrap();
        assert_eq!(announcement.pieces, vec![[0, u64::from(u32::MAX) + 1]]);
        assert!(!announcement.complete);
    }

    #[test]
    fn a_manifest_whose_pieces_do_not_cover_its_size_is_refused() {
        let mut manifest = Manifest {
            content_id: id(4),
            key: String::new(),
            size: 3 << 20,
            etag: None,
            last_modified: None,
            piece_size: 1 << 20,
            pieces: vec![[0; 32]; 2],
        };
        assert!(matches!(
            manifest.check(),
            Err(ManifestError::WrongPieceCount { hashes: 2, .. })
        ));
        manifest.piece_size = 0;
        assert_eq!(manifest.check(), Err(ManifestError::ZeroPieceSize));
        let bad_hex = r#"{"content_id":"CONTENT","size":1,"etag":null,"last_modified":null,"piece_size":1,"pieces":["zz"]}"#
            .replace("CONTENT", &"ef".repeat(32));
        assert!(serde_json::from_str::<Manifest>(&bad_hex).is_err());
    }
}
