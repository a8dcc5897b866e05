//! The node's own HTTP APIs: the peering API (`/_outpost/v1/`) on the client listener, and the
//! admin listener with its dashboard page.

pub mod admin;
pub mod auth_throttle;
pub(crate) mod dashboard;
pub(crate) mod peering;
pub mod prefill;
pub mod prefill_schedule;
pub mod readiness;
pub mod reload;
