//! Host patterns of the allowlist and of `upstream.no_proxy`: an exact host name or a
//! `*.suffix` wildcard, parsed once when the config is validated.

/// One allowlist pattern: an exact host or a `*.suffix` wildcard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches this host only.
    Exact(String),
    /// Matches any host ending in `.suffix` (stored with its leading dot), but not the bare suffix.
    Subdomains(String),
}

impl HostPattern {
    /// Parses `example.com` or `*.example.com`. Wildcards elsewhere, or a lone `*`, are refused,
    /// because they would turn the node into an open proxy.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let lowered = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lowered.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lowered.as_str()),
        };
        let name_is_valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
            });
        if !name_is_valid {
            return Err(format!(
                "\"{text}\" is not a host pattern; use an exact name like \"dl.delivery.mp.microsoft.com\" or a wildcard like \"*.download.windowsupdate.com\""
            ));
        }
        Ok(if wildcard {
            HostPattern::Subdomains(format!(".{name}"))
        } else {
            HostPattern::Exact(name.to_owned())
        })
    }

    /// True when `host` (already lower-case, without port) matches this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Subdomains(dotted_suffix) => {
                host.len() > dotted_suffix.len() && host.ends_with(dotted_suffix.as_str())
            }
        }
    }
}

/// Writes the pattern as it is configured: `example.com` or `*.example.com`.
impl std::fmt::Display for HostPattern {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(name) => formatter.write_str(name),
            HostPattern::Subdomains(dotted_suffix) => write!(formatter, "*{dotted_suffix}"),
        }
    }
}
