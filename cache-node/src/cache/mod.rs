//! The cache itself: what an object is and where its bytes live, with no HTTP client and no
//! request handling in it. Keys, freshness rules, the on-disk layout and its recovery, the
//! in-memory index, piece hashes, and the budget fills run under.

pub mod discovery;
pub mod fill_limits;
pub mod freshness;
pub mod index;
pub mod key;
pub mod piece_file;
pub mod piece_state;
pub mod pieces;
pub mod slice_buffer;
pub mod store;
