//! The `cache-node` subcommands that talk to a running node rather than run one: `prefill`
//! submits a prefill job to the admin listener and follows it. `main.rs` parses the arguments
//! and calls in here; this layer uses the API's own document types (`api::prefill`), so the
//! command and the node cannot drift.

pub mod prefill;
