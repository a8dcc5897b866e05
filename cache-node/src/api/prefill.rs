//! Prefill jobs (`POST /prefill` on the admin listener): the node fills listed objects whole
//! before any client asks, as a client's request would, so Patch Tuesday's files are on disk
//! when the first machines wake up.
//!
//! - **Bounded.** At most [`MAX_URLS_PER_JOB`] URLs per job and [`MAX_JOBS`] jobs kept (the
//!   oldest finished ones go first); `[prefill] concurrency` objects at once across all jobs.
//! - **Polite.** All prefill fills share one bandwidth cap (`[prefill] max_bandwidth`), counted
//!   in `prefill_bytes` (not as client misses), and an object waits to start while client fills
//!   wait for a turn, so client traffic goes first.
//! - **Visible.** `GET /prefill` lists each job's URLs with their state (`queued`, `filling`
//!   with bytes stored, `done`, `failed` with the reason, `cancelled`); `DELETE /prefill/<id>`
//!   cancels a job: its running fills stop at their next slice.
//! - **Scheduled too.** `api::prefill_schedule` submits jobs from `[[prefill.schedule]]` files
//!   through the same [`PrefillJobs`]; a job's [`JobOrigin`] says who started it.
//!
//! The job documents ([`JobView`] and the types in it) are both serialised here and read back
//! by `cache-node prefill` (`cli::prefill`), so the command cannot drift from the API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{StatusCode, Uri};
use outpost_shared::sync::lock;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cache::fill_limits::{Pace, Requester};
use crate::cache::freshness::ClientDirectives;
use crate::fill::{self, DiscoverError, SliceSpan};
use crate::http::client_key::ClientScheme;
use crate::node::Node;
use crate::upstream::router::{self, Route};

/// The most URLs one job may list.
pub const MAX_URLS_PER_JOB: usize = 10_000;
/// The most jobs kept (running and finished).
pub const MAX_JOBS: usize = 64;
/// The largest `POST /prefill` body read.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How often a waiting or filling object looks again.
const POLL: Duration = Duration::from_millis(100);

/// One URL's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UrlState {
    /// Not started yet.
    Queued,
    /// Being filled: `bytes_done` of `length` stored.
    Filling {
        /// Bytes stored so far.
        bytes_done: u64,
        /// The object's length.
        length: u64,
    },
    /// Stored whole.
    Done {
        /// The object's length.
        length: u64,
    },
    /// Could not be filled.
    Failed {
        /// Why.
        reason: String,
    },
    /// The job was cancelled first.
    Cancelled,
}

/// One URL of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlProgress {
    /// The URL as submitted.
    pub url: String,
    /// Where it stands.
    #[serde(flatten)]
    pub state: UrlState,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Some URL has not ended yet.
    Running,
    /// Every URL ended (done or failed).
    Done,
    /// Cancelled (`DELETE /prefill/<id>`, or the end of its schedule's window): the URLs that
    /// had not ended are `cancelled`.
    Cancelled,
}

/// Who started a job: `"api"` (`POST /prefill`) or `"schedule N"` (the `N`th
/// `[[prefill.schedule]]` table, counted from 0 as in `prefill.schedule[N]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum JobOrigin {
    /// Submitted on the admin listener.
    Api,
    /// Started by `[[prefill.schedule]]` table `N`.
    Schedule(usize),
}

impl std::fmt::Display for JobOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOrigin::Api => f.write_str("api"),
            JobOrigin::Schedule(index) => write!(f, "schedule {index}"),
        }
    }
}

impl From<JobOrigin> for String {
    fn from(origin: JobOrigin) -> String {
        origin.to_string()
    }
}

impl TryFrom<String> for JobOrigin {
    type Error = String;

    fn try_from(text: String) -> Result<JobOrigin, String> {
        if text == "api" {
            return Ok(JobOrigin::Api);
        }
        text.strip_prefix("schedule ")
            .and_then(|index| index.parse().ok())
            .map(JobOrigin::Schedule)
            .ok_or_else(|| format!("\"{text}\" is not a job origin"))
    }
}

/// One job, as `GET /prefill` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// The job's id.
    pub id: u64,
    /// Where it stands.
    pub state: JobState,
    /// Who started it.
    pub origin: JobOrigin,
    /// When it was submitted, in seconds since the Unix epoch.
    pub created_unix: u64,
    /// URLs stored whole.
    pub done: usize,
    /// URLs that failed.
    pub failed: usize,
    /// Its URLs.
    pub urls: Vec<UrlProgress>,
}

#[derive(Debug)]
struct Job {
    id: u64,
    origin: JobOrigin,
    created_unix: u64,
    urls: Mutex<Vec<UrlProgress>>,
    cancel: CancellationToken,
}

impl Job {
    fn set(&self, index: usize, state: UrlState) {
        lock(&self.urls)[index].state = state;
    }

    fn view(&self) -> JobView {
        let urls = lock(&self.urls).clone();
        let ended = |url: &UrlProgress| {
            matches!(
                url.state,
                UrlState::Done { .. } | UrlState::Failed { .. } | UrlState::Cancelled
            )
        };
        let state = if self.cancel.is_cancelled() {
            JobState::Cancelled
        } else if urls.iter().all(ended) {
            JobState::Done
        } else {
            JobState::Running
        };
        JobView {
            id: self.id,
            state,
            origin: self.origin,
            created_unix: self.created_unix,
            done: urls
                .iter()
                .filter(|url| matches!(url.state, UrlState::Done { .. }))
                .count(),
            failed: urls
                .iter()
                .filter(|url| matches!(url.state, UrlState::Failed { .. }))
                .count(),
            urls,
        }
    }
}

/// The admin listener's prefill jobs.
#[derive(Debug)]
pub struct PrefillJobs {
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    next_id: AtomicU64,
    /// Objects filled at once, across jobs.
    turns: Arc<Semaphore>,
    /// The shared cap and the `prefill_bytes` counter.
    pace: Pace,
}

impl PrefillJobs {
    /// No jobs yet, under `node`'s `[prefill]` settings.
    pub fn new(node: &Node) -> PrefillJobs {
        PrefillJobs {
            jobs: Mutex::default(),
            next_id: AtomicU64::new(1),
            turns: Arc::new(Semaphore::new(node.prefill.concurrency)),
            pace: Pace {
                limiter: node
                    .prefill
                    .bytes_per_sec
                    .map(|rate| Arc::new(outpost_shared::rate::ByteLimiter::new(rate))),
                bytes: node.stats.prefill_bytes.clone(),
            },
        }
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobView> {
        lock(&self.jobs).values().map(|job| job.view()).collect()
    }

    /// One job.
    pub fn get(&self, id: u64) -> Option<JobView> {
        lock(&self.jobs).get(&id).map(|job| job.view())
    }

    /// Cancels job `id`; false when there is no such job.
    pub fn cancel(&self, id: u64) -> bool {
        match lock(&self.jobs).get(&id) {
            Some(job) => {
                job.cancel.cancel();
                true
            }
            None => false,
        }
    }

    /// Cancels job `id` if it is still running (a job that ended keeps its state); true when
    /// it was.
    pub fn cancel_running(&self, id: u64) -> bool {
        match lock(&self.jobs).get(&id) {
            Some(job) if job.view().state == JobState::Running => {
                job.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Starts a job for `urls` (already parsed from the request body), on behalf of `origin`.
    /// Every URL is routed first: one the allowlist refuses fails at once with the reason.
    pub fn submit(
        self: &Arc<Self>,
        node: &Arc<Node>,
        origin: JobOrigin,
        urls: Vec<String>,
    ) -> Result<JobView, (StatusCode, String)> {
        if urls.is_empty() {
            return Err((StatusCode::BAD_REQUEST, "no URLs to prefill".into()));
        }
        if urls.len() > MAX_URLS_PER_JOB {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} URLs; a job takes at most {MAX_URLS_PER_JOB}",
                    urls.len()
                ),
            ));
        }
        let routes: Vec<Result<Route, String>> =
            urls.iter().map(|url| route_url(node, url)).collect();
        let job = Arc::new(Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            origin,
            created_unix: crate::cache::store::unix_now(),
            urls: Mutex::new(
                urls.into_iter()
                    .zip(&routes)
                    .map(|(url, route)| UrlProgress {
                        url,
                        state: match route {
                            Ok(_) => UrlState::Queued,
                            Err(reason) => UrlState::Failed {
                                reason: reason.clone(),
                            },
                        },
                    })
                    .collect(),
            ),
            cancel: CancellationToken::new(),
        });
        {
            let mut jobs = lock(&self.jobs);
            while jobs.len() >= MAX_JOBS {
                // The oldest finished job goes; with none finished, the oldest running one.
                let oldest = jobs
                    .iter()
                    .find(|(_, job)| job.view().state != JobState::Running)
                    .or_else(|| jobs.iter().next())
                    .map(|(id, job)| (*id, job.clone()));
                match oldest {
                    Some((id, job)) => {
                        job.cancel.cancel();
                        jobs.remove(&id);
                    }
                    None => break,
                }
            }
            jobs.insert(job.id, job.clone());
        }
        for (index, route) in routes.into_iter().enumerate() {
            let Ok(route) = route else { continue };
            let node = node.clone();
            let job = job.clone();
            let jobs = self.clone();
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    outcome = jobs.fill_one(&node, &route, &job, index) => outcome,
                    () = job.cancel.cancelled() => Err(None),
                };
                job.set(
                    index,
                    match outcome {
                        Ok(length) => UrlState::Done { length },
                        Err(Some(reason)) => UrlState::Failed { reason },
                        Err(None) => UrlState::Cancelled,
                    },
                );
            });
        }
        tracing::info!(
            id = job.id,
            origin = %origin,
            urls = lock(&job.urls).len(),
            "prefill job started"
        );
        Ok(job.view())
    }

    /// Fills the object of `route` whole (the job's URL `index`), after a turn and once no
    /// client fill waits. Its length, or why not.
    async fn fill_one(
        &self,
        node: &Arc<Node>,
        route: &Route,
        job: &Job,
        index: usize,
    ) -> Result<u64, Option<String>> {
        let _turn = self.turns.acquire().await.map_err(|_| None)?;
        // Clients first: wait while any client fill waits for a turn.
        while node.stats.fills.waiting.get() > 0 {
            tokio::time::sleep(POLL).await;
        }
        let requester = Requester::paced_prefill(self.pace.clone());
        let whole = SliceSpan {
            first: 0,
            last: None,
        };
        for _ in 0..3 {
            let route = match fill::select_variant(node, route, &http::HeaderMap::new()) {
                Ok(Some(varied)) => varied,
                Ok(None) => route.clone(),
                Err(reason) => return Err(Some(format!("not storable: {reason}"))),
            };
            let (entry, _discovery_demand) =
                match fill::lookup_or_discover(node, &route, whole, &requester).await {
                    Ok(found) => found,
                    Err(error) => return Err(Some(describe(&error))),
                };
            if fill::other_variant(&entry, &route) {
                continue;
            }
            if let fill::Revalidation::Changed = fill::revalidate_if_stale(
                node,
                &route,
                &entry,
                ClientDirectives::default(),
                std::time::Instant::now(),
                true,
            )
            .await
            {
                continue;
            }
            let length = entry.meta.length;
            let slices = entry.meta.slice_count();
            // Held until the object is whole: it keeps the fills going without readers.
            let _demand = if slices > 0 {
                Some(
                    fill::ensure_filling(node, &route, &entry, 0, slices - 1, &requester)
                        .await
                        .map_err(|refused| Some(refused.to_string()))?,
                )
            } else {
                None
            };
            loop {
                if entry.is_complete() {
                    return Ok(length);
                }
                if entry.is_removed() {
                    return Err(Some(
                        "the stored version was dropped while filling (the origin changed it, or it was evicted)".into(),
                    ));
                }
                job.set(
                    index,
                    UrlState::Filling {
                        bytes_done: entry.stored_bytes(),
                        length,
                    },
                );
                tokio::time::sleep(POLL).await;
            }
        }
        Err(Some("the origin kept changing the object".into()))
    }
}

/// Why a prefill URL could not be filled, in a line.
fn describe(error: &DiscoverError) -> String {
    match error {
        DiscoverError::Origin(error) => format!("origin: {error}"),
        DiscoverError::NotStorable(reason) => format!("not storable: {reason}"),
        DiscoverError::Refused(refused) => format!("refused: {refused}"),
        DiscoverError::Answered { answer, .. } => {
            format!("origin answered {}", answer.status)
        }
    }
}

/// Routes a submitted URL: a plain origin URL (`http://dl.example.com/file.cab`) as a proxy
/// request is, or an MCC-form URL (`http://<cache>/file.cab?cacheHostOrigin=dl.example.com`)
/// by its `cacheHostOrigin`.
fn route_url(node: &Node, url: &str) -> Result<Route, String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "{url:?} is not an absolute http:// or https:// URL"
        ));
    }
    let mcc_form = uri
        .query()
        .is_some_and(|query| query.to_ascii_lowercase().contains("cachehostorigin="));
    // An https:// URL is fetched from its origin over HTTPS, as a request over the TLS
    // listener would be.
    let scheme = if uri.scheme_str() == Some("https") {
        ClientScheme::Https
    } else {
        ClientScheme::Http
    };
    let routed = if mcc_form {
        let origin_form: Uri = uri
            .path_and_query()
            .map(|path| path.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|_| format!("{url:?} is not a URL"))?;
        router::route_over(&node.allowlist.load(), &origin_form, None, scheme)
    } else {
        router::route_over(&node.allowlist.load(), &uri, None, scheme)
    };
    routed.map_err(|error| error.to_string())
}

/// The URLs of a `POST /prefill` body: a JSON array of strings, or text with one URL per line
/// (blank lines and `#` comments skipped).
pub fn parse_urls(body: &[u8], json: bool) -> Result<Vec<String>, String> {
    if json {
        return serde_json::from_slice::<Vec<String>>(body)
            .map_err(|error| format!("not a JSON array of URL strings: {error}"));
    }
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8 text".to_owned())?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// The URLs of a URL-list file (`cache-node prefill`'s argument, a `[[prefill.schedule]]`
/// file): a JSON array when its first character that is not white space is `[`, else one URL
/// per line, read by [`parse_urls`] as `POST /prefill` reads its body.
pub fn parse_url_file(content: &[u8]) -> Result<Vec<String>, String> {
    let json = content
        .iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|first| *first == b'[');
    parse_urls(content, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_arrays_or_lines() {
        assert_eq!(
            parse_urls(br#"["http://a/1", "http://b/2"]"#, true).unwrap(),
            ["http://a/1", "http://b/2"]
        );
        assert!(parse_urls(br#"{"url": "x"}"#, true).is_err());
        assert_eq!(
            parse_urls(b"# patch tuesday\nhttp://a/1\n\n  http://b/2  \n", false).unwrap(),
            ["http://a/1", "http://b/2"]
        );
        assert!(parse_urls(&[0xff, 0xfe], false).is_err());
        assert_eq!(
            parse_url_file(b"\n  [\"http://a/1\"]").unwrap(),
            ["http://a/1"]
        );
        assert_eq!(
            parse_url_file(b"http://a/1\nhttp://b/2").unwrap(),
            ["http://a/1", "http://b/2"]
        );
    }

    #[test]
    fn job_documents_read_back_as_they_were_written() {
        for origin in [JobOrigin::Api, JobOrigin::Schedule(3)] {
            let view = JobView {
                id: 4,
                state: JobState::Running,
                origin,
                created_unix: 1_700_000_000,
                done: 1,
                failed: 1,
                urls: vec![
                    UrlProgress {
                        url: "http://a/1".into(),
                        state: UrlState::Done { length: 5 },
                    },
                    UrlProgress {
                        url: "http://a/2".into(),
                        state: UrlState::Failed {
                            reason: "origin answered 404 Not Found".into(),
                        },
                    },
                    UrlProgress {
                        url: "http://a/3".into(),
                        state: UrlState::Filling {
                            bytes_done: 1,
                            length: 9,
                        },
                    },
                    UrlProgress {
                        url: "http://a/4".into(),
                        state: UrlState::Queued,
                    },
                ],
            };
            let text = serde_json::to_string(&view).unwrap();
            assert_eq!(serde_json::from_str::<JobView>(&text).unwrap(), view);
        }
        let text = serde_json::to_value(JobOrigin::Schedule(0)).unwrap();
        assert_eq!(text, "schedule 0");
        assert!(serde_json::from_str::<JobOrigin>("\"cron\"").is_err());
    }
}
