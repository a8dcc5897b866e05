//! The cache itself: what an object is and where its bytes live, with no HTTP client and no
//! request handling in it. Keys, freshness rules, the on-disk layout and its recovery, the
//! in-memory index, piece hashes, and the budget fills run under.

pub(crate) mod discovery;
pub(crate) mod fill_limits;
pub(crate) mod freshness;
pub mod header_section;
pub(crate) mod index;
pub mod key;
pub(crate) mod piece_file;
pub(crate) mod piece_state;
pub(crate) mod pieces;
pub(crate) mod slice_buffer;
pub(crate) mod status_answer;
pub mod store;
pub mod vary;
