//! The network plumbing every source and the peer port share: checked HTTP range requests, the
//! bandwidth cap, the send guard against slow readers and the public-URL policy.

pub mod bandwidth;
pub mod http;
pub(crate) mod send_guard;
pub(crate) mod url_policy;
