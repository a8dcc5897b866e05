//! Finishing: the whole-file check, the repair from the origin when it fails, and the rename to
//! the final name with the final status.

use std::sync::atomic::Ordering;

use crate::config::CacheHost;
use crate::content::integrity::{self};
use crate::download::progress::{self, Event, Status};
use crate::error::DownloadError;
use crate::net::http::SourceKind;

use super::{Engine, BAD_PIECES_BEFORE_BAN};

impl<'a> Engine<'a> {
    /// All pieces are on disk: verify the whole file. Returns true when it is good; on a
    /// mismatch, marks the pieces to refetch from the origin and returns false.
    pub(super) async fn finish_or_repair(&mut self) -> Result<bool, DownloadError> {
        let Some(expected) = self.request.sha256 else {
            return Ok(true);
        };
        self.emit(Event::Verifying);
        let layout = self
            .layout
            .as_mut()
            .expect("complete downloads have a layout");
        layout.file.sync_data().await.map_err(|error| {
            DownloadError::disk(format!("flushing {}", self.paths.partial.display()), error)
        })?;
        let partial = self.paths.partial.clone();
        let actual = tokio::task::spawn_blocking(move || integrity::hash_file(&partial))
            .await
            .map_err(|error| {
                DownloadError::disk("hashing the partial file", std::io::Error::other(error))
            })?
            .map_err(|error| {
                DownloadError::disk(format!("hashing {}", self.paths.partial.display()), error)
            })?;
        if actual == expected {
            return Ok(true);
        }
        let mismatch = |detail: &str| DownloadError::IntegrityMismatch {
            expected: hex::encode(expected),
            actual: hex::encode(actual),
            detail: detail.to_owned(),
        };
        if self.repairing {
            self.paths.remove_all();
            return Err(mismatch(" after refetching from the origin"));
        }
        if self.policy.origin_forbidden() {
            self.paths.remove_all();
            return Err(mismatch(
                "; the origin cannot repair it because delay_cache_fallback_secs = -1",
            ));
        }
        let reset = layout.scheduler.reset_pieces_not_from_origin();
        if reset == 0 {
            self.paths.remove_all();
            return Err(mismatch(" and every byte came from the origin"));
        }
        tracing::warn!(
            pieces = reset,
            "SHA-256 mismatch: refetching from the origin what other sources sent"
        );
        self.emit(Event::Repairing { pieces: reset });
        self.repairing = true;
        self.checkpoint_due = true;
        Ok(false)
    }

    /// Renames the verified file into place and builds the status.
    pub(super) async fn complete(mut self) -> Result<Status, DownloadError> {
        let progress = self.progress();
        let layout = self
            .layout
            .take()
            .expect("complete downloads have a layout");
        if self.downloader.config.raw.storage.fsync {
            layout.file.sync_data().await.map_err(|error| {
                DownloadError::disk(format!("flushing {}", self.paths.partial.display()), error)
            })?;
        }
        drop(layout);
        std::fs::rename(&self.paths.partial, &self.paths.output).map_err(|error| {
            DownloadError::disk(
                format!(
                    "renaming {} to {}",
                    self.paths.partial.display(),
                    self.paths.output.display()
                ),
                error,
            )
        })?;
        let _ = std::fs::remove_file(&self.paths.state);
        self.emit(Event::Progress(progress.clone()));
        let requests_of = |kind: SourceKind| -> u64 {
            self.sources
                .slots
                .iter()
                .filter(|slot| slot.source.kind() == kind)
                .map(|slot| slot.stats.requests)
                .sum()
        };
        let cache_host = self
            .sources
            .slots
            .iter()
            .enumerate()
            .filter(|(id, slot)| {
                slot.source.kind() == SourceKind::CacheHost
                    && self.received[*id].load(Ordering::Relaxed) > 0
            })
            .max_by_key(|(id, _)| self.received[*id].load(Ordering::Relaxed))
            .and_then(|(_, slot)| slot.source.cache_host().map(CacheHost::to_string))
            .unwrap_or_default();
        let total = progress.received_bytes;
        let from_cache = progress.bytes_from(SourceKind::CacheHost);
        let from_peers = progress.bytes_from(SourceKind::Peer);
        let duration = self.started.elapsed();
        Ok(Status {
            file_size: progress.file_len.unwrap_or(0),
            total_bytes_downloaded: total,
            bytes_from_cache_server: from_cache,
            bytes_from_peers: from_peers,
            bytes_from_http: progress.bytes_from(SourceKind::Origin),
            percent_peer_caching: progress::percent_of(from_cache + from_peers, total),
            download_duration: progress::format_duration(duration),
            status: "Complete".into(),
            cache_host,
            download_mode: self.downloader.config.download_mode.number(),
            cache_server_connection_count: requests_of(SourceKind::CacheHost),
            cdn_connection_count: requests_of(SourceKind::Origin),
            bytes_resumed: self.resumed_bytes,
            download_duration_secs: duration.as_secs_f64(),
            num_peers: self
                .peering
                .as_ref()
                .map_or(0, |peering| peering.peers_known),
            peer_connection_count: requests_of(SourceKind::Peer),
            banned_peers: self
                .sources
                .slots
                .iter()
                .filter(|slot| {
                    slot.source.kind() == SourceKind::Peer
                        && slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN
                })
                .count(),
            bytes_by_peer: progress
                .sources
                .iter()
                .filter(|source| source.kind == SourceKind::Peer && source.bytes > 0)
                .map(|source| (source.label.clone(), source.bytes))
                .collect(),
        })
    }
}
