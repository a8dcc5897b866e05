//! The setting types that config validation parses strings into and the rest of the program
//! uses: a cache host and a bandwidth cap. They sit below everything that uses them (the sources,
//! the rate limiter) so that config depends on nothing above it.

use outpost_shared::units::parse_size;

/// The smallest absolute bandwidth cap, in bytes per second: one cell of the rate limiter, which
/// could not enforce less.
pub const MIN_BYTES_PER_SEC: u64 = 1024;

/// One cache host: an authority (`host` or `host:port`) spoken to in plain HTTP, or in HTTPS
/// when it was written `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheHost {
    authority: String,
    https: bool,
}

impl CacheHost {
    /// Parses `host`, `host:port`, `http://host[:port][/]` or `https://host[:port][/]`. The
    /// scheme's default port (80 or 443) is dropped.
    pub fn parse(text: &str) -> Result<CacheHost, String> {
        let trimmed = text.trim();
        let (https, without_scheme) = match trimmed.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, trimmed.strip_prefix("http://").unwrap_or(trimmed)),
        };
        let authority = without_scheme.trim_end_matches('/');
        let bad = || {
            format!(
                "\"{text}\" is not a cache host; use a host name or address with an optional port, e.g. \"cache.branch.example:80\", or \"https://cache.branch.example\" for HTTPS"
            )
        };
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        let parsed: http::uri::Authority = authority.parse().map_err(|_| bad())?;
        if parsed.host().is_empty() {
            return Err(bad());
        }
        let default_port = if https { 443 } else { 80 };
        let authority = match parsed.port_u16() {
            Some(port) if port != default_port => {
                format!("{}:{port}", parsed.host().to_ascii_lowercase())
            }
            _ => parsed.host().to_ascii_lowercase(),
        };
        Ok(CacheHost { authority, https })
    }

    /// `host` or `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// True when the host is spoken to in HTTPS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// `http://host[:port]` or `https://host[:port]`, without a trailing slash.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl std::fmt::Display for CacheHost {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.https {
            formatter.write_str("https://")?;
        }
        formatter.write_str(&self.authority)
    }
}

/// `max_download_bandwidth`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BandwidthLimit {
    /// `"0"`: no cap.
    Unlimited,
    /// An absolute cap in bytes per second.
    BytesPerSec(u64),
    /// A cap as a percentage (1 to 100) of the rate measured while the download
    /// first runs uncapped (`net::bandwidth` measures it).
    PercentOfMeasured(u8),
}

impl BandwidthLimit {
    /// Parses `"0"`, `"10MiB"` (per second) or `"50%"`.
    pub fn parse(text: &str) -> Result<BandwidthLimit, String> {
        let trimmed = text.trim();
        if let Some(percent_text) = trimmed.strip_suffix('%') {
            return match percent_text.trim().parse::<u8>() {
                Ok(percent @ 1..=100) => Ok(BandwidthLimit::PercentOfMeasured(percent)),
                _ => Err(format!(
                    "\"{text}\" is not a percentage between 1% and 100%; use e.g. \"50%\""
                )),
            };
        }
        match parse_size(trimmed) {
            Ok(0) => Ok(BandwidthLimit::Unlimited),
            Ok(bytes) if bytes < MIN_BYTES_PER_SEC => Err(format!(
                "\"{text}\" is below 1KiB per second; use \"0\" for no cap or e.g. \"10MiB\""
            )),
            Ok(bytes) => Ok(BandwidthLimit::BytesPerSec(bytes)),
            Err(_) => Err(format!(
                "\"{text}\" is not a rate; use \"0\" (no cap), bytes per second with a binary unit such as \"10MiB\", or a percentage such as \"50%\""
            )),
        }
    }
}
