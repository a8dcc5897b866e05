//! Everything about origins: which hosts and addresses may be fetched (the allowlist and the
//! address policy), which origin a request
//! is for (routing), and the pooled HTTP/HTTPS client that reaches them, directly or through an
//! outbound proxy.

pub mod address_policy;
pub mod host_pattern;
pub mod origin;
pub mod outbound_proxy;
pub mod request_body;
pub mod router;
pub mod settings;
