//! Reloading the configuration while the node runs, on `SIGHUP` and `POST /reload`: the file
//! (and the `CACHE_NODE__…` environment) is read again and validated as a whole; if it fails,
//! nothing changes and the reason is logged and returned. Otherwise the settings of
//! [`LIVE_KEYS`](crate::config::LIVE_KEYS) take effect for new requests (the allowlist is swapped
//! whole, so a request sees either the old one or the new one), and the other keys that changed
//! are named in a warning and keep their running values. Open connections and fills carry on.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::api::reload::{Reload, ReloadReport};
use crate::config::{is_live_key, Config};
use crate::node::Node;

/// Sets the process's log filter (`log.level`); `Err` with the reason when it is not a filter.
pub type LogLevelSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where the running config came from, for reloading it.
pub struct ReloadSource {
    /// The `--config` file, if any (the environment is read again either way).
    pub path: Option<PathBuf>,
    /// Applies a new `log.level`; `None` where the process does not own the logger (tests).
    pub set_log_level: Option<LogLevelSetter>,
}

/// Reloads the config of one node.
pub struct ConfigReloader {
    node: Arc<Node>,
    source: ReloadSource,
    /// The config in effect: as loaded at start, with the live settings of every reload since.
    running: Mutex<Config>,
}

impl std::fmt::Debug for ConfigReloader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConfigReloader")
            .field("path", &self.source.path)
            .finish()
    }
}

impl ConfigReloader {
    /// A reloader for `node`, which was started with `running`.
    pub fn new(node: Arc<Node>, source: ReloadSource, running: Config) -> ConfigReloader {
        ConfigReloader {
            node,
            source,
            running: Mutex::new(running),
        }
    }

    fn try_reload(&self) -> Result<ReloadReport, String> {
        let loaded =
            Config::load(self.source.path.as_deref()).map_err(|error| error.to_string())?;
        let valid = loaded
            .clone()
            .validate()
            .map_err(|error| error.to_string())?;
        let mut running = outpost_shared::sync::lock(&self.running);
        let changed = running.changed_keys(&loaded);
        let (applied, restart_needed): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|key| is_live_key(key));
        // The log level first: it is the one live setting validation does not check.
        if applied.iter().any(|key| key == "log.level") {
            if std::env::var_os("RUST_LOG").is_some() {
                tracing::warn!("log.level changed, but RUST_LOG is set and takes precedence");
            } else if let Some(set_log_level) = &self.source.set_log_level {
                set_log_level(&loaded.log.level)
                    .map_err(|reason| format!("log.level: {reason}"))?;
            }
        }
        if applied.iter().any(|key| {
            !matches!(key.as_str(), "log.level" | "admin.token") && !key.starts_with("prefill.")
        }) {
            let mut allowlist = valid.allowlist.clone();
            allowlist.adopt_address_policy(self.node.allowlist.load().address_policy());
            // Labels the stats know keep their counters; new ones get theirs.
            allowlist.count_under(&self.node.stats.origins.adopt_labels(allowlist.labels()));
            self.node.allowlist.store(Arc::new(allowlist));
        }
        if applied
            .iter()
            .any(|key| key.starts_with("prefill.schedule"))
        {
            self.node
                .prefill_schedules
                .store(Arc::new(valid.prefill.schedule.clone()));
        }
        if applied.iter().any(|key| key == "admin.token") {
            self.node
                .admin_token
                .store(Arc::new(loaded.admin.token.clone()));
        }
        running.take_live_settings(&loaded);
        Ok(ReloadReport {
            applied,
            restart_needed,
        })
    }
}

impl Reload for ConfigReloader {
    fn reload(&self, trigger: &str) -> Result<ReloadReport, String> {
        match self.try_reload() {
            Ok(report) => {
                self.node.stats.edge.config_reloads.inc();
                tracing::info!(trigger, applied = ?report.applied, "configuration reloaded");
                if !report.restart_needed.is_empty() {
                    tracing::warn!(
                        trigger,
                        keys = ?report.restart_needed,
                        "these settings changed but only take effect after a restart; they keep their running values"
                    );
                }
                Ok(report)
            }
            Err(reason) => {
                self.node.stats.edge.config_reload_failures.inc();
                tracing::error!(trigger, %reason, "configuration reload refused; the running configuration stays");
                Err(reason)
            }
        }
    }
}

/// Reloads on every `SIGHUP` until `stop`.
pub(crate) async fn reload_on_hangup(reload: Arc<dyn Reload>, stop: CancellationToken) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; reload with POST /reload instead");
            return;
        }
    };
    loop {
        tokio::select! {
            received = hangup.recv() => if received.is_none() { return },
            () = stop.cancelled() => return,
        }
        let reload = reload.clone();
        // Reading the file is blocking work; the admin runtime keeps answering meanwhile.
        let _ = tokio::task::spawn_blocking(move || reload.reload("SIGHUP")).await;
    }
}
