//! What finished tasks report: the probe's answer (length and validators), fetched pieces and
//! their writes.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::time::Instant;

use crate::content::integrity;
use crate::content::partial::PartialFile;
use crate::download::progress::Event;
use crate::download::scheduler::{AttemptId, Completion, Scheduler};
use crate::error::{DownloadError, FetchError};
use crate::net::http::RangeResponse;
use crate::net::http::SourceKind;
use crate::sources::source::SourceId;

use super::{Engine, Layout, TaskOutcome};

impl<'a> Engine<'a> {
    pub(super) async fn handle(&mut self, outcome: TaskOutcome) -> Result<(), DownloadError> {
        match outcome {
            TaskOutcome::Probed {
                source,
                started,
                result,
            } => {
                self.probe_running = false;
                self.sources.get_mut(source).in_flight -= 1;
                match result {
                    Ok(response) => self.probed(source, started, response),
                    Err(failure) => self.source_failed(source, failure.error),
                }
            }
            TaskOutcome::Fetched {
                attempt,
                index,
                source,
                started,
                prefix,
                result,
            } => {
                if self.attempts.remove(&attempt).is_none() {
                    // Cancelled as an endgame loser, but it finished first; already accounted.
                    return Ok(());
                }
                self.sources.get_mut(source).in_flight -= 1;
                let kind = self.sources.get(source).source.kind();
                match result {
                    Ok(piece) => {
                        let fetched = piece.len() - prefix.len();
                        self.source_succeeded(source, fetched as u64, started);
                        self.piece_fetched(index, attempt, kind, piece);
                        Ok(())
                    }
                    Err(failure) => {
                        let layout = self.layout.as_mut().expect("fetches need the layout");
                        if matches!(failure.error, FetchError::PieceHash(_)) {
                            layout.scheduler.release(index, attempt, kind, Bytes::new());
                            layout.scheduler.reject_copy(index, source);
                            self.bad_piece(source, index);
                            return Ok(());
                        }
                        let received = Scheduler::assemble(prefix, failure.received);
                        layout.scheduler.release(index, attempt, kind, received);
                        self.source_failed(source, failure.error)
                    }
                }
            }
            TaskOutcome::Written { index, result } => self.written(index, result),
            TaskOutcome::Checkpointed { result } => {
                self.checkpoint_running = false;
                result
            }
        }
    }

    /// The probe answered: set up the partial file and keep the first piece.
    fn probed(
        &mut self,
        source: SourceId,
        started: Instant,
        response: RangeResponse,
    ) -> Result<(), DownloadError> {
        let file_len = response.file_len;
        let file = PartialFile::create(&self.paths.partial, file_len).map_err(|error| {
            DownloadError::disk(format!("creating {}", self.paths.partial.display()), error)
        })?;
        let mut scheduler = Scheduler::new(file_len, self.piece_len, &[]);
        self.emit(Event::Started {
            file_len,
            resumed_bytes: 0,
        });
        let kind = self.sources.get(source).source.kind();
        self.source_succeeded(source, response.data.len() as u64, started);
        if file_len > 0 {
            let claim = scheduler.claim_piece(0, source, Instant::now());
            self.layout = Some(Layout {
                scheduler,
                file,
                validator: response.validator,
            });
            let piece = response.data;
            if let Some(hashes) = &self.request.piece_hashes {
                if !integrity::piece_matches(hashes.as_ref(), 0, &piece) {
                    self.received[source].fetch_sub(piece.len() as u64, Ordering::Relaxed);
                    let layout = self.layout.as_mut().expect("just set");
                    layout
                        .scheduler
                        .release(0, claim.attempt, kind, Bytes::new());
                    layout.scheduler.reject_copy(0, source);
                    self.bad_piece(source, 0);
                    self.start_rate_probe();
                    return Ok(());
                }
            }
            self.piece_fetched(0, claim.attempt, kind, piece);
        } else {
            self.layout = Some(Layout {
                scheduler,
                file,
                validator: response.validator,
            });
        }
        self.start_rate_probe();
        Ok(())
    }

    fn source_succeeded(&mut self, source: SourceId, bytes: u64, started: Instant) {
        let slot = self.sources.get_mut(source);
        slot.stats
            .record_rate(bytes, started.elapsed().as_secs_f64());
        slot.consecutive_failures = 0;
        slot.retry_at = None;
        self.failures_without_progress = 0;
    }

    /// A piece arrived whole: the first copy is written, others are cancelled or discarded.
    fn piece_fetched(&mut self, index: u64, attempt: AttemptId, kind: SourceKind, piece: Bytes) {
        let layout = self.layout.as_mut().expect("pieces need the layout");
        match layout.scheduler.complete(index, attempt, kind) {
            Completion::Lost => {}
            Completion::Won { cancel } => {
                for loser in cancel {
                    if let Some(running) = self.attempts.remove(&loser) {
                        running.abort.abort();
                        self.sources.get_mut(running.source).in_flight -= 1;
                    }
                }
                let offset = layout.scheduler.piece_range(index).start;
                let file = layout.file.clone();
                self.pending_writes += 1;
                self.tasks.spawn(async move {
                    let result = file.write_at(offset, piece).await;
                    TaskOutcome::Written { index, result }
                });
            }
        }
    }

    pub(super) fn written(
        &mut self,
        index: u64,
        result: std::io::Result<()>,
    ) -> Result<(), DownloadError> {
        self.pending_writes -= 1;
        let layout = self.layout.as_mut().expect("writes need the layout");
        match result {
            Ok(()) => {
                layout.scheduler.written(index);
                self.checkpoint_due = true;
                self.emit(Event::PieceWritten { index });
                Ok(())
            }
            Err(error) => {
                layout.scheduler.write_failed(index);
                Err(DownloadError::disk(
                    format!("writing piece {index} to {}", self.paths.partial.display()),
                    error,
                ))
            }
        }
    }
}
