//! `POST /reload` on the admin listener (and `SIGHUP`, which `server` handles): what a reload
//! promises. The work (re-reading the config file, validating it, applying the settings that can
//! change live) is done by whoever started the node, behind [`Reload`], because only the server
//! layer knows where the config came from.

use serde::Serialize;

/// Re-reads and applies the node's configuration.
pub trait Reload: Send + Sync + std::fmt::Debug {
    /// Re-reads the config and applies what can change live. `Err` (with the reason) when the
    /// new config cannot be loaded or fails validation: then nothing changed.
    fn reload(&self, trigger: &str) -> Result<ReloadReport, String>;
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// The keys that changed and now have their new values.
    pub applied: Vec<String>,
    /// The keys that changed but keep their running values until a restart.
    pub restart_needed: Vec<String>,
}
