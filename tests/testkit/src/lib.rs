//! Loopback test harness for Outpost. Integration tests and benchmarks of the cache node need a
//! controllable upstream to fetch from and deterministic content to fetch, and this crate provides
//! both without touching the network beyond `127.0.0.1`.
//!
//! # Layout
//!
//! - [`origin`]: [`MockOrigin`], a scriptable HTTP/1.1 origin server bound to `127.0.0.1:0`. It
//!   serves objects with single-range support, `If-Range`, strong ETags and a fixed `Last-Modified`,
//!   records every request it sees, counts how many times each byte of each object has been sent,
//!   and can misbehave on demand ([`Behaviour`]): ignore ranges, delay headers, throttle the body,
//!   abort mid-body, lie about the length, use chunked framing, answer with an error status,
//!   corrupt bytes while keeping the ETag, leave out its validators, or answer a range with
//!   other bytes or a `Content-Length` that contradicts its `Content-Range`.
//! - [`proxy`]: [`MockProxy`], a forward HTTP proxy (absolute-form requests and `CONNECT`
//!   tunnels, optional `Proxy-Authorization`), as a corporate proxy in front of the WAN.
//! - [`host`]: what a scenario sees of the machine: connections from a chosen loopback address,
//!   the files under a directory and their bytes, a process's resident memory and open
//!   descriptors.
//! - [`wait`]: [`eventually`], the one bounded wait for background effects that every scenario
//!   polls with, and its async forms.
//! - This file: content helpers shared by tests, [`pattern_bytes`] (fast deterministic
//!   pseudo-random content) and [`sha256_hex`] (digests for comparing large bodies).

pub mod host;
pub mod origin;
pub mod proxy;
pub mod wait;

pub use host::{bytes_under, connect_from, files_under, open_fds, resident_bytes};
pub use origin::{Behaviour, MockOrigin, RecordedRequest};
pub use proxy::{MockProxy, ProxiedRequest};
pub use wait::{eventually, eventually_async, eventually_every};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Returns `len` bytes of deterministic pseudo-random content derived from `seed`.
///
/// The generator is SplitMix64, filling the buffer one little-endian `u64` word at a time, so that
/// even the 1 GiB objects of the benchmarks are produced in well under a second in release builds.
/// Different seeds give unrelated content, which lets tests tell two versions of an object apart.
pub fn pattern_bytes(len: usize, seed: u64) -> Bytes {
    let mut generator_state = seed;
    let mut next_word = move || {
        generator_state = generator_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = generator_state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    };

    let mut content = vec![0_u8; len];
    let mut words = content.chunks_exact_mut(8);
    for word in &mut words {
        word.copy_from_slice(&next_word().to_le_bytes());
    }
    // The tail shorter than a word takes the leading bytes of one more word, so the content of a
    // shorter buffer is always a prefix of the content of a longer one with the same seed.
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let tail_length = tail.len();
        tail.copy_from_slice(&next_word().to_le_bytes()[..tail_length]);
    }
    Bytes::from(content)
}

/// Returns the SHA-256 digest of `data` as lowercase hexadecimal.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_bytes_is_deterministic_and_seed_dependent() {
        assert_eq!(pattern_bytes(1000, 7), pattern_bytes(1000, 7));
        assert_ne!(pattern_bytes(1000, 7), pattern_bytes(1000, 8));
        assert_eq!(pattern_bytes(0, 7).len(), 0);
    }

    #[test]
    fn pattern_bytes_of_a_shorter_length_is_a_prefix_of_a_longer_one() {
        let longer = pattern_bytes(1003, 42);
        for shorter_length in [0, 1, 7, 8, 9, 1000, 1003] {
            assert_eq!(
                pattern_bytes(shorter_length, 42),
                longer.slice(..shorter_length)
            );
        }
    }

    #[test]
    fn sha256_hex_matches_the_published_test_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
