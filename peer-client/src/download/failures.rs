//! Failures: what a failed request means for its source (ban, backoff, retiring a peer, falling
//! back to the origin) and for the download.

use tokio::time::Instant;

use crate::download::progress::Event;
use crate::error::{DownloadError, ErrorSource, FailureClass, FetchError};
use crate::net::http::SourceKind;
use crate::sources::source::{Source, SourceId};

use super::{Engine, BAD_PIECES_BEFORE_BAN, PEER_FAILURES_BEFORE_RETIRING};

impl<'a> Engine<'a> {
    /// Applies DO's fallback rules to a failed request.
    pub(super) fn source_failed(
        &mut self,
        source: SourceId,
        error: FetchError,
    ) -> Result<(), DownloadError> {
        let now = Instant::now();
        if self.sources.get(source).source.kind() == SourceKind::Peer {
            self.peer_failed(source, &error, now);
            return Ok(());
        }
        let config = &self.downloader.config.raw;
        let class = error.class();
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        // Failures of requests that were already running when the source started backing off
        // belong to the same incident: they neither lengthen the backoff nor count again.
        let new_incident = slot.backoff_over(now);
        if new_incident {
            slot.consecutive_failures += 1;
            slot.retry_at = Some(now + self.backoff.delay(slot.consecutive_failures));
            self.failures_without_progress += 1;
        }
        let label = slot.source.label();
        let mut banned_for = None;
        match slot.source.clone() {
            Source::CacheHost { host, .. } => {
                self.policy.record_cache_failure(now);
                let ban = config.cache.ban_duration;
                match class {
                    FailureClass::Unreachable => {
                        self.downloader.bans.ban_unreachable(&host, now, ban);
                        banned_for = Some(ban);
                    }
                    // A cache that refuses this origin, or holds another version of the content,
                    // is no use for this origin for now.
                    FailureClass::Refused | FailureClass::VersionMismatch => {
                        self.downloader
                            .bans
                            .ban_for_origin(&host, &self.origin_key, now, ban);
                        banned_for = Some(ban);
                    }
                    FailureClass::Transient => {}
                }
            }
            Source::Peer { .. } => unreachable!("peer failures are handled by peer_failed"),
            Source::Origin { .. } => match (class, &error) {
                (FailureClass::Refused, FetchError::Status(status)) => {
                    return Err(DownloadError::OriginRefused {
                        url: self.request.url.clone(),
                        status: *status,
                    });
                }
                (FailureClass::VersionMismatch, FetchError::ContentChanged(detail)) => {
                    self.abort_all();
                    self.paths.remove_all();
                    return Err(DownloadError::ContentChanged {
                        url: self.request.url.clone(),
                        detail: detail.clone(),
                    });
                }
                _ => {}
            },
        }
        tracing::warn!(source = %label, %error, ?banned_for, "request failed");
        self.emit(Event::SourceFailed {
            label: label.clone(),
            error: error.to_string(),
            banned_for,
        });
        if self.failures_without_progress >= config.transfer.max_consecutive_failures {
            return Err(DownloadError::GaveUp {
                failures: self.failures_without_progress,
                source_label: label,
                origin_of_failure: match self.sources.get(source).source.kind() {
                    SourceKind::CacheHost => ErrorSource::CacheHost,
                    SourceKind::Origin => ErrorSource::Origin,
                    SourceKind::Peer => ErrorSource::Peer,
                },
                last: error,
            });
        }
        Ok(())
    }

    /// A peer request failed: the peer backs off, and after [`PEER_FAILURES_BEFORE_RETIRING`]
    /// failures in a row it is not asked again. Peers come and go, so their failures never count
    /// towards giving up the download, nor open the origin.
    fn peer_failed(&mut self, source: SourceId, error: &FetchError, now: Instant) {
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        if slot.backoff_over(now) {
            slot.consecutive_failures += 1;
            slot.retry_at = Some(now + self.backoff.delay(slot.consecutive_failures));
        }
        if slot.consecutive_failures >= PEER_FAILURES_BEFORE_RETIRING {
            slot.retired = true;
        }
        let label = slot.source.label();
        tracing::info!(source = %label, %error, retired = slot.retired, "peer request failed");
        self.emit(Event::SourceFailed {
            label,
            error: error.to_string(),
            banned_for: None,
        });
    }

    /// A piece failed its hash check. The piece goes to another source; the sender is not
    /// backed off (its transport works), but it counts as a cache failure for the fallback
    /// rules, and a cache host that sends [`BAD_PIECES_BEFORE_BAN`] bad pieces is banned for
    /// this origin, as DO bans a peer that sends several.
    pub(super) fn bad_piece(&mut self, source: SourceId, index: u64) {
        let now = Instant::now();
        let slot = self.sources.get_mut(source);
        slot.stats.failures += 1;
        slot.stats.bad_pieces += 1;
        let label = slot.source.label();
        let mut banned_for = None;
        if slot.source.kind() == SourceKind::Peer
            && slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN
            && !slot.retired
        {
            slot.retired = true;
            tracing::warn!(source = %label, "peer banned for the rest of the download");
            if let Some(events) = &self.request.events {
                let _ = events.send(Event::PeerBanned {
                    label: label.clone(),
                });
            }
        }
        if let Some(host) = slot.source.cache_host().cloned() {
            self.policy.record_cache_failure(now);
            if slot.stats.bad_pieces >= BAD_PIECES_BEFORE_BAN {
                let ban = self.downloader.config.raw.cache.ban_duration;
                self.downloader
                    .bans
                    .ban_for_origin(&host, &self.origin_key, now, ban);
                banned_for = Some(ban);
            }
        }
        let error = FetchError::PieceHash(index);
        tracing::warn!(source = %label, %error, ?banned_for, "bad piece discarded");
        self.emit(Event::SourceFailed {
            label,
            error: error.to_string(),
            banned_for,
        });
    }

    pub(super) fn no_source_left(&self) -> DownloadError {
        if let Some(layout) = &self.layout {
            let all: Vec<SourceId> = (0..self.sources.slots.len()).collect();
            if let Some(index) = layout.scheduler.piece_refused_by_all(&all) {
                return DownloadError::GaveUp {
                    failures: self.failures_without_progress,
                    source_label: "every source".into(),
                    last: FetchError::PieceHash(index),
                    origin_of_failure: ErrorSource::Origin,
                };
            }
        }
        DownloadError::GaveUp {
            failures: self.failures_without_progress,
            source_label: "every source".into(),
            last: FetchError::Connect(
                "no source may be used: the cache hosts are unavailable and delay_cache_fallback_secs = -1 forbids the origin".into(),
            ),
            origin_of_failure: ErrorSource::CacheHost,
        }
    }
}
