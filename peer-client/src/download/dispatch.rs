//! Dispatch: which sources may be used now, which piece each one fetches next, and the request
//! tasks that fetch them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::Uri;
use tokio::time::Instant;

use crate::content::integrity;
use crate::content::partial::Validator;
use crate::download::progress::Event;
use crate::download::scheduler::{Claim, Scheduler};
use crate::error::{DownloadError, FetchError};
use crate::net::bandwidth::RateProbe;
use crate::net::http::SourceKind;
use crate::net::http::{HttpClients, RangeFailure, RangeRequest, RangeResponse};
use crate::sources::ban::BanReason;
use crate::sources::fallback::OriginGate;
use crate::sources::source::SourceId;

use super::{Engine, RunningAttempt, TaskOutcome};

/// What a request task takes along.
struct RequestContext {
    url: Uri,
    kind: SourceKind,
    http: HttpClients,
    meter: crate::net::bandwidth::BandwidthMeter,
    received: Arc<Vec<AtomicU64>>,
}

impl RequestContext {
    /// Sends the range request.
    async fn fetch(
        mut self,
        source: SourceId,
        range: std::ops::Range<u64>,
        file_len: Option<u64>,
        validator: Option<&Validator>,
    ) -> Result<RangeResponse, RangeFailure> {
        let request = RangeRequest {
            url: &self.url,
            kind: self.kind,
            range,
            file_len,
            validator,
        };
        self.http
            .fetch_range(request, &mut self.meter, &self.received[source])
            .await
    }
}

impl<'a> Engine<'a> {
    pub(super) fn start_rate_probe(&mut self) {
        if self.downloader.bandwidth.wants_measurement() {
            self.rate_probe = Some(RateProbe::new(Instant::now(), self.received_total()));
        }
    }

    /// The sources that may take requests now, in the order to offer them work, and the next
    /// instant at which that may change (a backoff ending, the origin gate opening).
    fn eligible_sources(&mut self, now: Instant) -> (Vec<SourceId>, Option<Instant>) {
        let mut wake: Option<Instant> = None;
        let mut earliest = |instant: Instant| {
            wake = Some(wake.map_or(instant, |current: Instant| current.min(instant)));
        };
        let mut eligible = Vec::new();
        let cache_ids = self.sources.cache_hosts();
        let origin = self
            .sources
            .origin()
            .expect("the origin is always a source");

        if !self.repairing {
            for id in self.sources.peers() {
                let slot = self.sources.get(id);
                if slot.retired {
                    continue;
                }
                match slot.retry_at {
                    Some(retry_at) if retry_at > now => earliest(retry_at),
                    _ => eligible.push(id),
                }
            }
            let bans: Vec<Option<BanReason>> = cache_ids
                .iter()
                .map(|&id| {
                    let host = self
                        .sources
                        .get(id)
                        .source
                        .cache_host()
                        .expect("a cache source");
                    self.downloader
                        .bans
                        .ban_on(host, &self.origin_key, now)
                        .map(|ban| ban.reason)
                })
                .collect();
            let mut usable: Vec<SourceId> = cache_ids
                .iter()
                .zip(&bans)
                .filter(|(_, ban)| ban.is_none())
                .map(|(&id, _)| id)
                .collect();
            if usable.is_empty() && !cache_ids.is_empty() {
                self.policy.record_cache_failure(now);
                if self.policy.origin_forbidden() {
                    // Nothing else may be used: retry banned hosts at the backoff pace rather
                    // than wait out a fifteen-minute ban.
                    usable = cache_ids.clone();
                }
            }
            // One cache host at a time: the first usable one in rendezvous order that is not
            // backing off. The next one takes over while it backs off.
            match usable
                .iter()
                .find(|&&id| self.sources.get(id).backoff_over(now))
            {
                Some(&id) => eligible.push(id),
                None => {
                    for &id in &usable {
                        if let Some(retry_at) = self.sources.get(id).retry_at {
                            earliest(retry_at);
                        }
                    }
                }
            }
            let every_host_refused = !bans.is_empty()
                && bans
                    .iter()
                    .all(|ban| *ban == Some(BanReason::RefusedOrigin));
            match self.policy.gate(now, every_host_refused) {
                OriginGate::Open => {}
                OriginGate::OpensAt(instant) => {
                    earliest(instant);
                    return (eligible, wake);
                }
                OriginGate::Closed => return (eligible, wake),
            }
            // Peers and the cache get their head start (`delay_http_fallback_secs`).
            if let Some(peering) = &self.peering {
                if now < peering.origin_opens_at {
                    earliest(peering.origin_opens_at);
                    return (eligible, wake);
                }
            }
        }
        if !cache_ids.is_empty() && !self.fallback_announced {
            self.fallback_announced = true;
            tracing::info!(origin = %self.origin_key, "falling back to the origin");
            self.emit(Event::FallbackToOrigin);
        }
        match self.sources.get(origin).retry_at {
            Some(retry_at) if retry_at > now => earliest(retry_at),
            _ => eligible.push(origin),
        }
        (eligible, wake)
    }

    /// Starts every request the sources may take now; returns when to look again.
    pub(super) fn dispatch(&mut self, now: Instant) -> Result<Option<Instant>, DownloadError> {
        let (mut eligible, wake) = self.eligible_sources(now);
        if self.layout.is_none() {
            if !self.probe_running {
                if let Some(&source) = eligible.first() {
                    self.spawn_probe(source, now);
                }
            }
            return Ok(wake);
        }
        // Feedback: the fastest source is offered work first; an unmeasured one counts as fast
        // so that it gets measured.
        eligible.sort_by(|&left, &right| {
            let rate = |id: SourceId| {
                self.sources
                    .get(id)
                    .stats
                    .rate_per_connection
                    .unwrap_or(f64::INFINITY)
            };
            rate(right).total_cmp(&rate(left))
        });
        for source in eligible {
            while self.sources.get(source).free_connections() > 0 {
                let layout = self.layout.as_mut().expect("checked above");
                let Some(claim) = layout.scheduler.next_for(source, &self.sources, now) else {
                    break;
                };
                self.spawn_fetch(source, claim, now);
            }
        }
        Ok(wake)
    }

    /// Counts a request to `source` and gathers what its task needs.
    fn start_request(&mut self, source: SourceId) -> RequestContext {
        let slot = self.sources.get_mut(source);
        slot.in_flight += 1;
        slot.stats.requests += 1;
        RequestContext {
            url: slot.source.url().clone(),
            kind: slot.source.kind(),
            http: self.downloader.http.clone(),
            meter: self.downloader.bandwidth.meter(),
            received: Arc::clone(&self.received),
        }
    }

    fn spawn_probe(&mut self, source: SourceId, now: Instant) {
        let context = self.start_request(source);
        let piece_len = self.piece_len;
        self.probe_running = true;
        self.tasks.spawn(async move {
            let result = context.fetch(source, 0..piece_len, None, None).await;
            TaskOutcome::Probed {
                source,
                started: now,
                result,
            }
        });
    }

    fn spawn_fetch(&mut self, source: SourceId, claim: Claim, now: Instant) {
        let context = self.start_request(source);
        let layout = self.layout.as_ref().expect("fetches need the layout");
        let file_len = layout.scheduler.file_len();
        let validator = layout.validator.clone();
        let piece_hashes = self.request.piece_hashes.clone();
        let Claim {
            attempt,
            index,
            range,
            prefix,
            duplicate,
        } = claim;
        tracing::trace!(index, duplicate, url = %context.url, "fetching piece");
        let received = Arc::clone(&context.received);
        let abort = self.tasks.spawn(async move {
            let result = context
                .fetch(source, range, Some(file_len), Some(&validator))
                .await
                .and_then(|response| {
                    let fetched = response.data.len() as u64;
                    let piece = Scheduler::assemble(prefix.clone(), response.data);
                    match &piece_hashes {
                        Some(hashes)
                            if !integrity::piece_matches(hashes.as_ref(), index, &piece) =>
                        {
                            // Bytes that failed their check were not downloaded in any useful
                            // sense: the source's count (BytesFromPeers...) keeps verified bytes.
                            received[source].fetch_sub(fetched, Ordering::Relaxed);
                            Err(RangeFailure::from(FetchError::PieceHash(index)))
                        }
                        _ => Ok(piece),
                    }
                });
            TaskOutcome::Fetched {
                attempt,
                index,
                source,
                started: now,
                prefix,
                result,
            }
        });
        self.attempts
            .insert(attempt, RunningAttempt { abort, source });
    }
}
