//! The caps and timeouts of a listener's connections: how many a listener holds, how many one
//! client may hold, and how long headers and idle keep-alive may take. The server enforces them.

use std::time::Duration;

/// The admin listener's cap: a scraper and a few people, never a crowd.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// The admin listener's cap per client address.
pub const ADMIN_MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// The caps and timeouts of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// `server.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// `server.idle_timeout`.
    pub idle_timeout: Duration,
    /// `server.max_connections`, resolved.
    pub max_connections: usize,
    /// `server.max_connections_per_client`.
    pub max_connections_per_client: usize,
}

impl ConnectionLimits {
    /// The admin listener's limits: the same timeouts, and small caps of its own.
    pub fn admin(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections.min(ADMIN_MAX_CONNECTIONS),
            max_connections_per_client: self
                .max_connections_per_client
                .min(ADMIN_MAX_CONNECTIONS_PER_CLIENT),
            ..*self
        }
    }
}
