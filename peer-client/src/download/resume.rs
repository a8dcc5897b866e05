//! Resuming: a partial file with a matching state file is picked up where it stopped, and the
//! resume state is checkpointed while the download runs.

use tokio::time::Instant;

use crate::content::integrity;
use crate::content::partial::{encode_bitmap, PartialFile, ResumeState, STATE_VERSION};
use crate::download::progress::Event;
use crate::download::scheduler::Scheduler;
use crate::error::DownloadError;

use super::{Engine, Layout};

impl<'a> Engine<'a> {
    /// Loads the resume state when it belongs to this download. With piece hashes, the pieces
    /// it records are checked again first: one altered on disk since is fetched again.
    pub(super) async fn try_resume(&mut self) -> Result<(), DownloadError> {
        let Some((state, done)) = self.paths.load_resumable(&self.request.url) else {
            self.paths.remove_all();
            return Ok(());
        };
        let manifest_len = self
            .request
            .piece_hashes
            .as_ref()
            .map(|hashes| hashes.piece_len());
        if manifest_len.is_some_and(|len| len != state.piece_len) {
            self.paths.remove_all();
            return Ok(());
        }
        let file = PartialFile::open_existing(&self.paths.partial).map_err(|error| {
            DownloadError::disk(format!("opening {}", self.paths.partial.display()), error)
        })?;
        let done = match self.request.piece_hashes.clone() {
            Some(hashes) => {
                let path = self.paths.partial.clone();
                let (file_len, piece_len) = (state.file_len, state.piece_len);
                let recorded = done.iter().filter(|done| **done).count();
                let checked = tokio::task::spawn_blocking(move || {
                    integrity::recheck_pieces(&path, file_len, piece_len, &done, hashes.as_ref())
                })
                .await
                .map_err(|error| {
                    DownloadError::disk("checking resumed pieces", std::io::Error::other(error))
                })?
                .map_err(|error| {
                    DownloadError::disk(format!("checking {}", self.paths.partial.display()), error)
                })?;
                let dropped = recorded - checked.iter().filter(|done| **done).count();
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        partial = %self.paths.partial.display(),
                        "resumed pieces fail their hash: fetching them again"
                    );
                }
                checked
            }
            None => done,
        };
        self.piece_len = state.piece_len;
        let scheduler = Scheduler::new(state.file_len, state.piece_len, &done);
        self.resumed_bytes = scheduler.done_bytes();
        tracing::info!(
            url = %self.request.url,
            resumed_bytes = self.resumed_bytes,
            file_len = state.file_len,
            "resuming"
        );
        self.emit(Event::Started {
            file_len: state.file_len,
            resumed_bytes: self.resumed_bytes,
        });
        self.layout = Some(Layout {
            scheduler,
            file,
            validator: state.validator,
        });
        self.start_rate_probe();
        Ok(())
    }

    /// Writes the resume state now.
    pub(super) async fn checkpoint(&mut self) -> Result<(), DownloadError> {
        match self.checkpoint_job() {
            Some(job) => job.await,
            None => Ok(()),
        }
    }

    /// The work of one checkpoint: the pieces written so far, flushed first with
    /// `storage.fsync`, then the state file replaced. The bitmap is taken before the flush, so it
    /// never names a piece the flush did not cover.
    pub(super) fn checkpoint_job(
        &mut self,
    ) -> Option<impl std::future::Future<Output = Result<(), DownloadError>> + Send + 'static> {
        let layout = self.layout.as_ref()?;
        let state = ResumeState {
            version: STATE_VERSION,
            url: self.request.url.clone(),
            file_len: layout.scheduler.file_len(),
            piece_len: layout.scheduler.piece_len(),
            validator: layout.validator.clone(),
            done_pieces: encode_bitmap(&layout.scheduler.done_map()),
        };
        let fsync = self.downloader.config.raw.storage.fsync;
        let file = layout.file.clone();
        let paths = self.paths.clone();
        self.checkpoint_due = false;
        self.last_checkpoint = Instant::now();
        Some(async move {
            if fsync {
                file.sync_data().await.map_err(|error| {
                    DownloadError::disk(format!("flushing {}", paths.partial.display()), error)
                })?;
            }
            tokio::task::spawn_blocking(move || {
                paths.save_state(&state).map_err(|error| {
                    DownloadError::disk(format!("writing {}", paths.state.display()), error)
                })
            })
            .await
            .map_err(|error| {
                DownloadError::disk("writing the resume state", std::io::Error::other(error))
            })?
        })
    }
}
