//! Scheduled prefills (`[[prefill.schedule]]`): inside a schedule's window the node reads its
//! URL-list file and starts a prefill job through the admin listener's [`PrefillJobs`], so the
//! job shows in `GET /prefill` with the origin `schedule N`; at the window's end, what is still
//! running is cancelled.
//!
//! A schedule runs once per occurrence of its window, and again in the same occurrence when
//! the file's content changes (the new job replaces the old one, which is cancelled). URLs
//! already stored whole cost a lookup, so a file left in place runs again every night for
//! little. The file is looked at every [`TICK`], from the node's start; what ran is kept in
//! memory, so a node restarted inside a window runs its file again. Windows are in UTC (see
//! [`crate::schedule`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::api::prefill::{parse_url_file, JobOrigin, PrefillJobs, MAX_BODY_BYTES};
use crate::node::Node;
use crate::schedule::{Schedule, ScheduledRuns, Step};

/// How often the schedules are looked at: a run starts, and a window's end cancels, at most
/// this late.
pub const TICK: Duration = Duration::from_secs(30);

/// Runs `node`'s schedules until `stop`, with `now` (seconds since the Unix epoch) as the
/// clock. Returns at once without schedules.
pub async fn run(
    node: Arc<Node>,
    jobs: Arc<PrefillJobs>,
    now: impl Fn() -> u64,
    stop: CancellationToken,
) {
    // A config reload replaces the schedules (`Node::prefill_schedules`): a schedule that stays
    // the same keeps its run state, a removed one's running job is cancelled.
    let mut schedules = node.prefill_schedules.load_full();
    let mut runs: Vec<ScheduledRuns> = schedules.iter().map(|_| ScheduledRuns::default()).collect();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let current = node.prefill_schedules.load_full();
        if current != schedules {
            let mut previous: Vec<(Schedule, ScheduledRuns)> =
                schedules.iter().cloned().zip(runs.drain(..)).collect();
            for schedule in current.iter() {
                let kept = previous.iter().position(|(old, _)| {
                    old.urls == schedule.urls && old.window == schedule.window
                });
                runs.push(match kept {
                    Some(position) => previous.swap_remove(position).1,
                    None => ScheduledRuns::default(),
                });
            }
            for (old, dropped) in previous {
                if let Some(job) = dropped.running_job() {
                    if jobs.cancel_running(job) {
                        tracing::info!(
                            schedule = old.index,
                            job,
                            "scheduled prefill: the schedule was removed by a reload; its job is cancelled"
                        );
                    }
                }
            }
            schedules = current;
        }
        let now = now();
        for (schedule, runs) in schedules.iter().zip(&mut runs) {
            look_at(&node, &jobs, schedule, runs, now).await;
        }
    }
}

/// One schedule at `now`: start, replace or end its run.
async fn look_at(
    node: &Arc<Node>,
    jobs: &Arc<PrefillJobs>,
    schedule: &Schedule,
    runs: &mut ScheduledRuns,
    now: u64,
) {
    let occurrence = match runs.step(&schedule.window, now) {
        Step::Wait => return,
        Step::End { job } => {
            if jobs.cancel_running(job) {
                tracing::info!(
                    schedule = schedule.index,
                    job,
                    "scheduled prefill: the window ended; the job's unfinished URLs are cancelled"
                );
            }
            return;
        }
        Step::Check(occurrence) => occurrence,
    };
    let content = read_url_file(&schedule.urls).await;
    // A read error has a fingerprint too, so it is logged once per window, not every tick.
    let fingerprint: [u8; 32] = match &content {
        Ok(bytes) => Sha256::new().chain_update(b"content").chain_update(bytes),
        Err(message) => Sha256::new().chain_update(b"error").chain_update(message),
    }
    .finalize()
    .into();
    if !runs.should_start(occurrence, fingerprint) {
        return;
    }
    let file = schedule.urls.display();
    let urls = content
        .and_then(|bytes| parse_url_file(&bytes).map_err(|reason| format!("{file}: {reason}")));
    let job = match urls {
        Err(reason) => {
            tracing::warn!(schedule = schedule.index, %reason, "scheduled prefill cannot start");
            None
        }
        Ok(urls) => match jobs.submit(node, JobOrigin::Schedule(schedule.index), urls) {
            Ok(view) => {
                tracing::info!(
                    schedule = schedule.index,
                    job = view.id,
                    file = %file,
                    urls = view.urls.len(),
                    window_ends_unix = occurrence.end_unix,
                    "scheduled prefill started"
                );
                Some(view.id)
            }
            Err((_, reason)) => {
                tracing::warn!(schedule = schedule.index, file = %file, %reason, "scheduled prefill cannot start");
                None
            }
        },
    };
    if let Some(replaced) = runs.started(occurrence, fingerprint, job) {
        if jobs.cancel_running(replaced) {
            tracing::info!(
                schedule = schedule.index,
                job = replaced,
                "scheduled prefill: the file changed; the earlier job is cancelled"
            );
        }
    }
}

/// The file's content, at most [`MAX_BODY_BYTES`] (the bound of a `POST /prefill` body), or why
/// not, naming the file.
async fn read_url_file(path: &Path) -> Result<Vec<u8>, String> {
    let file = path.display();
    let opened = tokio::fs::File::open(path).await.map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            format!("{file} does not exist (yet)")
        } else {
            format!("cannot open {file}: {error}")
        }
    })?;
    let mut content = Vec::new();
    opened
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut content)
        .await
        .map_err(|error| format!("cannot read {file}: {error}"))?;
    if content.len() > MAX_BODY_BYTES {
        return Err(format!(
            "{file} is larger than {MAX_BODY_BYTES} bytes, the most a prefill job reads"
        ));
    }
    Ok(content)
}
