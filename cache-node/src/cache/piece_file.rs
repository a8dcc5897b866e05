//! The `pieces.sha256` file format and piece geometry: the SHA-256 of every piece of an object
//! version, as the store keeps them beside its slices. Parsed here and only here.

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type PieceHash = [u8; 32];

/// The header of `pieces.sha256`: the piece length as a little-endian u64, then one 32-byte
/// digest per piece in order.
pub const FILE_HEADER_LEN: usize = 8;

/// The piece length used for objects stored with slices of `slice_len` bytes.
pub fn piece_len(configured_piece_len: u64, slice_len: u64) -> u64 {
    configured_piece_len.min(slice_len)
}

/// How many pieces an object of `length` bytes has.
pub fn piece_count(length: u64, piece_len: u64) -> u64 {
    length.div_ceil(piece_len)
}

/// Hashes consecutive pieces of `piece_len` bytes of the bytes in `chunks` (the last may be
/// short). Runs on the blocking pool: hashing a MiB takes about a millisecond, which a worker
/// serving hits should not spend.
pub async fn hash_chunks(chunks: Vec<Bytes>, piece_len: u64) -> Vec<PieceHash> {
    let hashing = tokio::task::spawn_blocking(move || hash_pieces(&chunks, piece_len));
    match hashing.await {
        Ok(hashes) => hashes,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The synchronous core of [`hash_chunks`].
pub fn hash_pieces(chunks: &[Bytes], piece_len: u64) -> Vec<PieceHash> {
    let mut hashes = Vec::new();
    let mut hasher = Sha256::new();
    let mut in_piece = 0u64;
    for chunk in chunks {
        let mut rest: &[u8] = chunk;
        while !rest.is_empty() {
            let take = ((piece_len - in_piece) as usize).min(rest.len());
            hasher.update(&rest[..take]);
            rest = &rest[take..];
            in_piece += take as u64;
            if in_piece == piece_len {
                hashes.push(hasher.finalize_reset().into());
                in_piece = 0;
            }
        }
    }
    if in_piece > 0 {
        hashes.push(hasher.finalize().into());
    }
    hashes
}

/// Encodes the `pieces.sha256` file.
pub fn encode_file(piece_len: u64, hashes: &[PieceHash]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FILE_HEADER_LEN + hashes.len() * 32);
    bytes.extend_from_slice(&piece_len.to_le_bytes());
    for hash in hashes {
        bytes.extend_from_slice(hash);
    }
    bytes
}

/// The length of the `pieces.sha256` file of an object of `length` bytes.
pub fn file_len(length: u64, piece_len: u64) -> usize {
    FILE_HEADER_LEN + piece_count(length, piece_len) as usize * 32
}

/// Decodes a `pieces.sha256` file, which must be for `piece_len` and hold exactly the pieces of
/// an object of `length` bytes.
pub fn decode_file(bytes: &[u8], length: u64, piece_len: u64) -> Option<Vec<PieceHash>> {
    if bytes.len() != file_len(length, piece_len) {
        return None;
    }
    let (header, digests) = bytes.split_at(FILE_HEADER_LEN);
    if u64::from_le_bytes(header.try_into().ok()?) != piece_len {
        return None;
    }
    Some(
        digests
            .chunks_exact(32)
            .map(|digest| digest.try_into().expect("chunks of 32"))
            .collect(),
    )
}

/// The piece length the header of a `pieces.sha256` of `file_length` bytes declares, when it is
/// plausible for an object of `length` bytes in slices of `slice_len`: a power of two dividing
/// the slice length, and a file of exactly the right length.
pub fn plausible_header(
    header: [u8; FILE_HEADER_LEN],
    file_length: u64,
    length: u64,
    slice_len: u64,
) -> Option<u64> {
    let piece_len = u64::from_le_bytes(header);
    let plausible = piece_len.is_power_of_two()
        && slice_len % piece_len == 0
        && file_length == file_len(length, piece_len) as u64;
    plausible.then_some(piece_len)
}
