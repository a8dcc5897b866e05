//! Integrity: the whole-file SHA-256 (`--sha256`) and the per-piece hash interface.
//!
//! [`PieceHashes`] is what the engine asks of trusted piece metadata: the piece length the hashes
//! were computed over and the expected digest of each piece. When a download has one, every piece
//! is checked before it is written, and a bad piece is refetched from another source. Cache-node
//! will serve piece manifests and peers will need them (issue 5); [`PieceManifest`] is the plain
//! in-memory form any of those can be loaded into.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Sha256Digest = [u8; 32];

/// Parses 64 hexadecimal digits (either case) into a digest.
pub fn parse_sha256_hex(text: &str) -> Result<Sha256Digest, String> {
    let mut digest = [0_u8; 32];
    hex::decode_to_slice(text.trim(), &mut digest)
        .map_err(|_| format!("\"{text}\" is not a SHA-256 digest (64 hexadecimal digits)"))?;
    Ok(digest)
}

/// Trusted per-piece hashes of one content item.
pub trait PieceHashes: Send + Sync + std::fmt::Debug {
    /// The length of every piece but the last, which the download then uses as its piece size.
    fn piece_len(&self) -> u64;
    /// The expected digest of piece `index`, or `None` when the metadata does not cover it.
    fn piece_hash(&self, index: u64) -> Option<Sha256Digest>;
}

/// Piece hashes held in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceManifest {
    piece_len: u64,
    hashes: Vec<Sha256Digest>,
}

impl PieceManifest {
    /// A manifest of `hashes` for pieces of `piece_len` bytes.
    pub fn new(piece_len: u64, hashes: Vec<Sha256Digest>) -> PieceManifest {
        PieceManifest { piece_len, hashes }
    }

    /// Hashes `content` piece by piece (what a publisher or cache node does).
    pub fn of_content(content: &[u8], piece_len: u64) -> PieceManifest {
        let hashes = content
            .chunks(piece_len as usize)
            .map(|piece| Sha256::digest(piece).into())
            .collect();
        PieceManifest { piece_len, hashes }
    }
}

impl PieceHashes for PieceManifest {
    fn piece_len(&self) -> u64 {
        self.piece_len
    }

    fn piece_hash(&self, index: u64) -> Option<Sha256Digest> {
        self.hashes.get(index as usize).copied()
    }
}

/// True when `data` is piece `index` according to `hashes`, or when they do not cover it.
pub fn piece_matches(hashes: &dyn PieceHashes, index: u64, data: &[u8]) -> bool {
    match hashes.piece_hash(index) {
        Some(expected) => Sha256::digest(data).as_slice() == expected,
        None => true,
    }
}

/// The SHA-256 of a file (blocking; run it on the blocking pool).
pub fn hash_file(path: &Path) -> std::io::Result<Sha256Digest> {
    let no_pieces = PieceManifest::new(1 << 20, Vec::new());
    Ok(check_file(path, &no_pieces)?.sha256)
}

/// Checks again the pieces marked in `done` of a file of `file_len` bytes in pieces of
/// `piece_len`; returns the marks with every piece that does not match `hashes` cleared
/// (blocking; run it on the blocking pool).
pub fn recheck_pieces(
    path: &Path,
    file_len: u64,
    piece_len: u64,
    done: &[bool],
    hashes: &dyn PieceHashes,
) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut buffer = Vec::new();
    let mut checked = done.to_vec();
    for (index, mark) in checked.iter_mut().enumerate().filter(|(_, mark)| **mark) {
        let start = index as u64 * piece_len;
        let len = piece_len.min(file_len.saturating_sub(start)) as usize;
        buffer.resize(len, 0);
        file.read_exact_at(&mut buffer, start)?;
        *mark = piece_matches(hashes, index as u64, &buffer);
    }
    Ok(checked)
}

/// What [`check_file`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCheck {
    /// The SHA-256 of the whole file.
    pub sha256: Sha256Digest,
    /// Its length.
    pub len: u64,
    /// The first piece that does not match its hash, if any.
    pub first_bad_piece: Option<u64>,
}

/// Hashes a file in one pass: the whole-file SHA-256 and each piece against `hashes` (blocking;
/// run it on the blocking pool).
pub fn check_file(path: &Path, hashes: &dyn PieceHashes) -> std::io::Result<FileCheck> {
    let mut file = std::fs::File::open(path)?;
    let mut checker = StreamCheck::new(hashes);
    let mut buffer = vec![0_u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        checker.update(&buffer[..read]);
    }
    Ok(checker.finish())
}

/// Checks bytes as they stream past, in order: the whole-file SHA-256 and each piece's hash.
#[derive(Debug)]
pub struct StreamCheck<'a> {
    hashes: &'a dyn PieceHashes,
    whole: Sha256,
    piece: Sha256,
    piece_filled: u64,
    index: u64,
    len: u64,
    first_bad_piece: Option<u64>,
}

impl<'a> StreamCheck<'a> {
    /// A check against `hashes`, from the first byte of the file.
    pub fn new(hashes: &'a dyn PieceHashes) -> StreamCheck<'a> {
        StreamCheck {
            hashes,
            whole: Sha256::new(),
            piece: Sha256::new(),
            piece_filled: 0,
            index: 0,
            len: 0,
            first_bad_piece: None,
        }
    }

    /// The next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.whole.update(data);
        self.len += data.len() as u64;
        let piece_len = self.hashes.piece_len().max(1);
        while !data.is_empty() {
            let take = ((piece_len - self.piece_filled) as usize).min(data.len());
            self.piece.update(&data[..take]);
            self.piece_filled += take as u64;
            data = &data[take..];
            if self.piece_filled == piece_len {
                self.end_piece();
            }
        }
    }

    fn end_piece(&mut self) {
        let digest: Sha256Digest = std::mem::take(&mut self.piece).finalize().into();
        if self
            .hashes
            .piece_hash(self.index)
            .is_some_and(|expected| expected != digest)
            && self.first_bad_piece.is_none()
        {
            self.first_bad_piece = Some(self.index);
        }
        self.index += 1;
        self.piece_filled = 0;
    }

    /// Bytes checked so far.
    pub fn bytes_seen(&self) -> u64 {
        self.len
    }

    /// The first bad piece so far (a whole piece must have been seen to be judged).
    pub fn first_bad_piece(&self) -> Option<u64> {
        self.first_bad_piece
    }

    /// The end of the file: judges the last, shorter piece too.
    pub fn finish(mut self) -> FileCheck {
        if self.piece_filled > 0 {
            self.end_piece();
        }
        FileCheck {
            sha256: self.whole.finalize().into(),
            len: self.len,
            first_bad_piece: self.first_bad_piece,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_from_hex() {
        let text = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(hex::encode(parse_sha256_hex(text).unwrap()), text);
        assert!(parse_sha256_hex(&text.to_uppercase()).is_ok());
        assert!(parse_sha256_hex(&text[1..]).is_err());
        assert!(parse_sha256_hex("zz").is_err());
    }

    #[test]
    fn a_manifest_checks_each_piece_and_ignores_pieces_it_does_not_cover() {
        let content: Vec<u8> = (0..2500_u32).map(|value| value as u8).collect();
        let manifest = PieceManifest::of_content(&content, 1000);
        assert_eq!(manifest.piece_len(), 1000);
        assert!(piece_matches(&manifest, 0, &content[..1000]));
        assert!(piece_matches(&manifest, 2, &content[2000..]));
        assert!(!piece_matches(&manifest, 1, &content[..1000]));
        assert!(piece_matches(&manifest, 3, b"not covered"));
    }

    #[test]
    fn a_streamed_check_finds_the_first_bad_piece_whatever_the_chunking() {
        let content: Vec<u8> = (0..2500_u32).map(|value| (value * 7) as u8).collect();
        let manifest = PieceManifest::of_content(&content, 1000);
        let whole: Sha256Digest = Sha256::digest(&content).into();
        let mut altered = content.clone();
        altered[2100] ^= 1;
        for chunk in [1, 999, 1000, 1001, 4096] {
            let run = |data: &[u8]| {
                let mut check = StreamCheck::new(&manifest);
                data.chunks(chunk).for_each(|part| check.update(part));
                check.finish()
            };
            let good = run(&content);
            assert_eq!(
                (good.sha256, good.len, good.first_bad_piece),
                (whole, 2500, None)
            );
            assert_eq!(run(&altered).first_bad_piece, Some(2), "chunks of {chunk}");
        }
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("f");
        std::fs::write(&path, &altered[..1500]).unwrap();
        let short = check_file(&path, &manifest).unwrap();
        assert_eq!((short.len, short.first_bad_piece), (1500, Some(1)));
    }

    #[test]
    fn a_recheck_clears_only_the_recorded_pieces_that_no_longer_match() {
        let content: Vec<u8> = (0..2500_u32).map(|value| (value * 3) as u8).collect();
        let manifest = PieceManifest::of_content(&content, 1000);
        let mut on_disk = content.clone();
        on_disk[1500] ^= 0xff;
        on_disk[2400] ^= 0xff;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("partial");
        std::fs::write(&path, &on_disk).unwrap();
        // Piece 2 is altered but not recorded: it stays missing; piece 1 is recorded and altered.
        let checked = recheck_pieces(&path, 2500, 1000, &[true, true, false], &manifest).unwrap();
        assert_eq!(checked, [true, false, false]);
    }

    #[test]
    fn files_hash_like_their_content() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            hex::encode(hash_file(&path).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
