//! Fills: fetching missing slices from the origin once, storing them, and letting any number of
//! clients stream the bytes while they arrive (read-while-write).
//!
//! - **Discovery.** The first request for an unknown object sends one ranged request upstream
//!   for the slices it needs, and learns the object's length and validators from the answer.
//!   Concurrent requests for the same unknown object wait for that one discovery instead of
//!   sending their own.
//! - **Runs.** A request that needs missing slices of a known object groups them into runs of
//!   adjacent slices (merging runs separated by a few stored slices), and fetches each run with
//!   one upstream range request. A run is reserved in the object's slice table as one range;
//!   its fill claims slices only a window ahead of the bytes it reads ([`CLAIM_WINDOW_SLICES`]),
//!   so nothing is sized from the length an origin declares. A reader that reaches a reserved
//!   slice before its fill does waits on a planned buffer the fill takes over.
//! - **Slice buffers.** Each claimed slice gets a [`SliceBuffer`] in the object's slice table.
//!   The fill appends origin chunks to it as they arrive and wakes its readers; a reader never
//!   waits for a whole slice. A finished slice is written to disk in the background and then
//!   marked stored.
//! - **Failure.** If the origin stops early, lies about the range, or turns out to have changed
//!   the content, every unfinished slice of the fill is failed: its readers end their responses
//!   with an error (never a clean end), and nothing of it is stored.
//! - **Demand.** A response registers a [`Demand`] on the slices it will read (one range). A fill is a
//!   spawned task and outlives the client that started it, but only so far: entering each new
//!   slice it checks that some response (or a prefill) still wants one of its remaining slices,
//!   and otherwise stops, dropping the origin response and releasing the rest of its claims, so a
//!   client that asks for a whole object and leaves costs the slice it was reading, not the
//!   object. Objects up to `fill.finish_objects_up_to` are finished anyway.
//! - **Limits.** Every fill waits for a turn and reserves memory for each slice before taking
//!   its bytes; requests that start fills take a slot of their client address
//!   (see [`crate::cache::fill_limits`]).
//! - **Versions.** Slices of one object fetched by different requests are only put together when
//!   the object has a validator the origin checks (`If-Range` with a strong ETag or
//!   Last-Modified). A validator-less object keeps what its first fill brought, and missing slices
//!   are refused ([`FillRefused::NoValidator`]) rather than spliced in from another request.
//! - **Encodings.** An answer with a `Content-Encoding` is stored as sent: its bytes and its
//!   `Content-Encoding` together, byte-exact. An answer in another coding than the stored one is
//!   another version, so bytes of two codings are never put together.
//! - **Revalidation.** A stale version is checked with a conditional `GET` (`If-None-Match` or
//!   `If-Modified-Since`) when the answer is about the whole object, else with a one-byte
//!   `If-Range` request; a confirming answer refreshes the stored header fields it carries.
//! - **Variants.** An answer with `Vary` is stored under its variant's key (what the node sent
//!   for each field it names); [`select_variant`] keys later requests by their own values before
//!   the lookup, and a request that finds another variant selects again ([`other_variant`]).

mod discover;
mod revalidate;
mod runs;
mod stream;

use discover::*;
pub use discover::{lookup, lookup_or_discover, other_variant, select_variant, SliceSpan};
use revalidate::*;
pub use revalidate::{revalidate_if_stale, Revalidation};
pub use runs::ensure_filling;
use runs::*;
use stream::*;

pub use crate::cache::discovery::DiscoverError;
pub use crate::cache::fill_limits::{FillRefused, Requester};
pub use crate::cache::index::Demand;
pub use crate::cache::slice_buffer::{BufferRead, SliceBuffer};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OriginError;
    use bytes::Bytes;
    use std::sync::Arc;

    #[tokio::test]
    async fn readers_get_their_window_as_chunks_arrive() {
        let buffer = Arc::new(SliceBuffer::new(10));
        let mut early = buffer.reader(2, 8);
        let writer = buffer.clone();
        let feeder = tokio::spawn(async move {
            for chunk in [&b"abc"[..], b"def", b"ghij"] {
                writer.append(Bytes::copy_from_slice(chunk));
                tokio::task::yield_now().await;
            }
        });
        let mut collected = Vec::new();
        loop {
            match early.next().await {
                BufferRead::Data(bytes) => collected.extend_from_slice(&bytes),
                BufferRead::End => break,
                BufferRead::Failed(error) => panic!("{error}"),
            }
        }
        feeder.await.unwrap();
        assert_eq!(collected, b"cdefgh");
        // A reader that joins after completion reads from memory too.
        let mut late = buffer.reader(0, 10);
        let mut all = Vec::new();
        while let BufferRead::Data(bytes) = late.next().await {
            all.extend_from_slice(&bytes);
        }
        assert_eq!(all, b"abcdefghij");
    }

    #[tokio::test]
    async fn a_failed_fill_fails_its_readers_instead_of_ending_cleanly() {
        let buffer = Arc::new(SliceBuffer::new(10));
        buffer.append(Bytes::from_static(b"abc"));
        let mut reader = buffer.reader(0, 10);
        assert!(matches!(reader.next().await, BufferRead::Data(_)));
        buffer.fail(OriginError::Body("reset".into()));
        assert!(matches!(reader.next().await, BufferRead::Failed(_)));
        assert!(buffer.wait_started().await.is_err());
    }
}
