//! `cache-node prefill`: submit a URL-list file as a prefill job (`POST /prefill` on the admin
//! listener), follow it (`GET /prefill/<id>` every [`POLL`]) with a progress bar until every
//! URL ended, and say by the exit status whether every URL was stored.
//!
//! - **Exit status.** [`EXIT_ALL_DONE`] (0): every URL stored whole (or, with `--detach`, the
//!   job was accepted). [`EXIT_SOME_FAILED`] (1): some URL failed or was cancelled; each is
//!   listed on stderr with its reason. [`EXIT_USAGE`] (2): no usable URL list or token, the
//!   admin listener unreachable, or the request refused (401, 403 and 429 explained).
//!   [`EXIT_INTERRUPTED`] (130): Ctrl-C while following; the job was cancelled first
//!   (`DELETE /prefill/<id>`). To leave a job running, use `--detach`.
//! - **Token.** From `--token-file` (first line, so it stays out of `ps` and the shell
//!   history), else `--token`, else the environment variable [`TOKEN_VARIABLE`].
//! - **Plain HTTP only.** The admin listener speaks plain HTTP (keep it on loopback or a
//!   management network), so `https://` admin URLs are refused.
//! - **Progress.** On a terminal, an indicatif bar on stderr; otherwise a plain line on stderr
//!   when a URL ends, and at least every [`PLAIN_LINE_INTERVAL`].

use std::future::Future;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::prefill::{
    parse_url_file, JobState, JobView, UrlState, MAX_BODY_BYTES, MAX_URLS_PER_JOB,
};

/// Every URL was stored (or, with `--detach`, the job was accepted).
pub const EXIT_ALL_DONE: u8 = 0;
/// Some URL failed or was cancelled.
pub const EXIT_SOME_FAILED: u8 = 1;
/// Bad arguments, no token, the admin listener unreachable or refusing.
pub const EXIT_USAGE: u8 = 2;
/// Interrupted with Ctrl-C (128 + SIGINT); the job was cancelled.
pub const EXIT_INTERRUPTED: u8 = 130;

/// The environment variable the admin token is read from when no option gives it.
pub const TOKEN_VARIABLE: &str = "OUTPOST_ADMIN_TOKEN";
/// How often the job is asked for.
pub const POLL: Duration = Duration::from_millis(500);
/// Without a terminal, a progress line at least this often.
pub const PLAIN_LINE_INTERVAL: Duration = Duration::from_secs(10);
/// The longest one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Polls in a row that may fail to connect (a node restarting) before giving up.
const POLL_FAILURES_TOLERATED: u32 = 10;

/// What `cache-node prefill` was asked to do.
#[derive(Debug, Clone)]
pub struct PrefillOptions {
    /// The admin listener: `http://127.0.0.1:9090` or `127.0.0.1:9090`.
    pub admin: String,
    /// `--token`.
    pub token: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// The URL-list file; `-` for stdin.
    pub urls: PathBuf,
    /// Return once the job is accepted.
    pub detach: bool,
}

/// Why the command could not submit or follow the job (exit status [`EXIT_USAGE`]).
#[derive(Debug, thiserror::Error)]
pub enum PrefillError {
    /// Bad arguments or input.
    #[error("{0}")]
    Usage(String),
    /// No connection, or no answer in time.
    #[error("cannot reach the admin listener at {admin}: {reason}")]
    Unreachable {
        /// The admin URL.
        admin: String,
        /// What failed.
        reason: String,
    },
    /// 401.
    #[error("the admin listener refused the token (401 Unauthorized): it is not the node's admin.token; check --token-file, {TOKEN_VARIABLE} or --token")]
    Unauthorized,
    /// 403: the node has no usable token.
    #[error("the node does not accept prefill jobs (403 Forbidden): {0}")]
    Disabled(String),
    /// 429: too many wrong tokens from this address.
    #[error("too many wrong tokens from this address (429 Too Many Requests); the node accepts another try in {retry_after_secs} s")]
    Throttled {
        /// From `Retry-After`.
        retry_after_secs: u64,
    },
    /// Another refusal.
    #[error("the admin listener answered {status}: {body}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its text.
        body: String,
    },
}

/// The admin token: `--token-file`'s first line, else `--token`, else `environment` (the value
/// of [`TOKEN_VARIABLE`]).
pub fn resolve_token(
    token: Option<&str>,
    token_file: Option<&Path>,
    environment: Option<String>,
) -> Result<String, PrefillError> {
    let token = match (token_file, token) {
        (Some(file), _) => std::fs::read_to_string(file)
            .map_err(|error| {
                PrefillError::Usage(format!("--token-file {}: {error}", file.display()))
            })?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        (None, Some(token)) => token.trim().to_owned(),
        (None, None) => environment.unwrap_or_default().trim().to_owned(),
    };
    if token.is_empty() {
        return Err(PrefillError::Usage(format!(
            "no admin token: give --token-file FILE, set {TOKEN_VARIABLE}, or give --token (the node's admin.token)"
        )));
    }
    Ok(token)
}

/// The URLs of `source` (`-` for stdin): one per line or a JSON array, as `POST /prefill` reads
/// them, at most [`MAX_URLS_PER_JOB`] in at most [`MAX_BODY_BYTES`].
pub fn read_urls(source: &Path) -> Result<Vec<String>, PrefillError> {
    let (name, reader): (String, Box<dyn Read>) = if source == Path::new("-") {
        ("stdin".to_owned(), Box::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(source)
            .map_err(|error| PrefillError::Usage(format!("{}: {error}", source.display())))?;
        (source.display().to_string(), Box::new(file))
    };
    let mut content = Vec::new();
    reader
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut content)
        .map_err(|error| PrefillError::Usage(format!("{name}: {error}")))?;
    if content.len() > MAX_BODY_BYTES {
        return Err(PrefillError::Usage(format!(
            "{name} is larger than {MAX_BODY_BYTES} bytes, the most one job takes; split it"
        )));
    }
    let urls = parse_url_file(&content)
        .map_err(|reason| PrefillError::Usage(format!("{name}: {reason}")))?;
    if urls.is_empty() {
        return Err(PrefillError::Usage(format!("{name} lists no URLs")));
    }
    if urls.len() > MAX_URLS_PER_JOB {
        return Err(PrefillError::Usage(format!(
            "{name} lists {} URLs; one job takes at most {MAX_URLS_PER_JOB}; split it",
            urls.len()
        )));
    }
    Ok(urls)
}

/// A client of the admin listener's prefill API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `http://host:port`, without a trailing `/`.
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client of the admin listener at `admin` (`http://host:port` or `host:port`).
    pub fn new(admin: &str, token: String) -> Result<AdminClient, PrefillError> {
        let admin = admin.trim().trim_end_matches('/');
        let base = if admin.contains("://") {
            admin.to_owned()
        } else {
            format!("http://{admin}")
        };
        let uri: http::Uri = base.parse().map_err(|_| {
            PrefillError::Usage(format!(
                "--admin {admin:?} is not a URL; use e.g. http://127.0.0.1:9090"
            ))
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(PrefillError::Usage(format!(
                    "--admin {admin}: the admin listener speaks plain HTTP only; use http://"
                )))
            }
            _ => {
                return Err(PrefillError::Usage(format!(
                    "--admin {admin:?} is not an http:// URL; use e.g. http://127.0.0.1:9090"
                )))
            }
        }
        let Some(authority) = uri.authority() else {
            return Err(PrefillError::Usage(format!(
                "--admin {admin:?} names no host; use e.g. http://127.0.0.1:9090"
            )));
        };
        Ok(AdminClient {
            base: format!("http://{authority}"),
            token,
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build_http(),
        })
    }

    /// The admin listener's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Submits `urls` as a job.
    pub async fn submit(&self, urls: &[String]) -> Result<JobView, PrefillError> {
        let body = urls.join("\n").into_bytes();
        self.job_request(Method::POST, "/prefill", Some(body)).await
    }

    /// Job `id` as it stands.
    pub async fn job(&self, id: u64) -> Result<JobView, PrefillError> {
        self.job_request(Method::GET, &format!("/prefill/{id}"), None)
            .await
    }

    /// Cancels job `id`.
    pub async fn cancel(&self, id: u64) -> Result<JobView, PrefillError> {
        self.job_request(Method::DELETE, &format!("/prefill/{id}"), None)
            .await
    }

    /// One request whose answer is a job document.
    async fn job_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<JobView, PrefillError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |reason: String| PrefillError::Unreachable {
            admin: self.base.clone(),
            reason,
        };
        let mut request = Request::builder().method(method.clone()).uri(&url);
        if method != Method::GET {
            let authorization =
                HeaderValue::from_str(&format!("Bearer {}", self.token)).map_err(|_| {
                    PrefillError::Usage(
                        "the admin token has characters a header cannot carry".into(),
                    )
                })?;
            request = request.header(header::AUTHORIZATION, authorization);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|error| PrefillError::Usage(format!("{url}: {error}")))?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no answer to {method} {path} within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|error| unreachable(outpost_shared::errors::error_chain(&*error)))?;
        let text = || String::from_utf8_lossy(&body).trim().to_owned();
        match parts.status {
            status if status.is_success() => {
                serde_json::from_slice(&body).map_err(|error| PrefillError::Refused {
                    status,
                    body: format!("not a prefill job document ({error}): {}", text()),
                })
            }
            StatusCode::UNAUTHORIZED => Err(PrefillError::Unauthorized),
            StatusCode::FORBIDDEN => Err(PrefillError::Disabled(text())),
            StatusCode::TOO_MANY_REQUESTS => Err(PrefillError::Throttled {
                retry_after_secs: parts
                    .headers
                    .get(header::RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(1),
            }),
            status => Err(PrefillError::Refused {
                status,
                body: text(),
            }),
        }
    }
}

/// Runs `cache-node prefill`; returns the exit status.
pub fn run(options: PrefillOptions) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cache-node prefill: cannot start the tokio runtime: {error}");
            return EXIT_USAGE;
        }
    };
    let result = runtime.block_on(submit_and_follow(&options, tokio::signal::ctrl_c()));
    match result {
        Ok(status) => status,
        Err(error) => {
            eprintln!("cache-node prefill: {error}");
            EXIT_USAGE
        }
    }
}

/// Submits the job and follows it until it ends or `interrupt` completes.
async fn submit_and_follow(
    options: &PrefillOptions,
    interrupt: impl Future,
) -> Result<u8, PrefillError> {
    let token = resolve_token(
        options.token.as_deref(),
        options.token_file.as_deref(),
        std::env::var(TOKEN_VARIABLE).ok(),
    )?;
    let urls = read_urls(&options.urls)?;
    let client = AdminClient::new(&options.admin, token)?;
    let job = client.submit(&urls).await?;
    if options.detach {
        eprintln!(
            "prefill job {} started with {} URLs; follow it with GET {}/prefill/{}",
            job.id,
            job.urls.len(),
            client.base(),
            job.id
        );
        report_failures(&job);
        println!("{}", job.id);
        return Ok(EXIT_ALL_DONE);
    }
    let mut progress = Progress::new(&job);
    tokio::pin!(interrupt);
    let mut failed_polls = 0;
    let mut view = job;
    while view.state == JobState::Running {
        tokio::select! {
            _ = &mut interrupt => {
                progress.clear();
                let cancelled = client.cancel(view.id).await;
                match cancelled {
                    Ok(_) => eprintln!("interrupted: prefill job {} cancelled", view.id),
                    Err(error) => eprintln!("interrupted; cancelling prefill job {} failed: {error}", view.id),
                }
                return Ok(EXIT_INTERRUPTED);
            }
            () = tokio::time::sleep(POLL) => {}
        }
        match client.job(view.id).await {
            Ok(latest) => {
                failed_polls = 0;
                view = latest;
                progress.show(&view);
            }
            Err(PrefillError::Unreachable { .. }) if failed_polls < POLL_FAILURES_TOLERATED => {
                failed_polls += 1;
            }
            Err(PrefillError::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            }) => {
                progress.clear();
                return Err(PrefillError::Usage(format!(
                    "prefill job {} is gone from the node (restarted, or more than 64 jobs since)",
                    view.id
                )));
            }
            Err(error) => {
                progress.clear();
                return Err(error);
            }
        }
    }
    progress.clear();
    let status = report_failures(&view);
    let totals = Totals::of(&view);
    println!(
        "prefill job {}: {} URLs: {} done, {} failed, {} cancelled; {} stored",
        view.id,
        view.urls.len(),
        totals.done,
        totals.failed,
        totals.cancelled,
        HumanBytes(totals.bytes)
    );
    Ok(status)
}

/// Lists every failed or cancelled URL of `job` on stderr; the exit status it makes.
fn report_failures(job: &JobView) -> u8 {
    let mut status = EXIT_ALL_DONE;
    for url in &job.urls {
        match &url.state {
            UrlState::Failed { reason } => eprintln!("failed: {}: {reason}", url.url),
            UrlState::Cancelled => eprintln!("cancelled: {}", url.url),
            UrlState::Done { .. } | UrlState::Queued | UrlState::Filling { .. } => continue,
        }
        status = EXIT_SOME_FAILED;
    }
    status
}

/// A job's counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    done: usize,
    failed: usize,
    cancelled: usize,
    filling: usize,
    /// Bytes stored: whole objects and the stored part of those filling.
    bytes: u64,
}

impl Totals {
    fn of(job: &JobView) -> Totals {
        let mut totals = Totals::default();
        for url in &job.urls {
            match url.state {
                UrlState::Done { length } => {
                    totals.done += 1;
                    totals.bytes += length;
                }
                UrlState::Filling { bytes_done, .. } => {
                    totals.filling += 1;
                    totals.bytes += bytes_done;
                }
                UrlState::Failed { .. } => totals.failed += 1,
                UrlState::Cancelled => totals.cancelled += 1,
                UrlState::Queued => {}
            }
        }
        totals
    }

    fn ended(&self) -> usize {
        self.done + self.failed + self.cancelled
    }
}

/// The progress display on stderr: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    id: u64,
    total: usize,
    last_line: Instant,
    last_ended: usize,
}

impl Progress {
    fn new(job: &JobView) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(
                Some(job.urls.len() as u64),
                ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} URLs {msg}",
                )
                .expect("the template is valid"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let progress = Progress {
            bar,
            id: job.id,
            total: job.urls.len(),
            last_line: Instant::now(),
            last_ended: 0,
        };
        if progress.bar.is_none() {
            eprintln!(
                "prefill job {} started with {} URLs",
                job.id,
                job.urls.len()
            );
        }
        progress
    }

    fn show(&mut self, job: &JobView) {
        let totals = Totals::of(job);
        let message = format!(
            "{} stored, {} filling, {} failed",
            HumanBytes(totals.bytes),
            totals.filling,
            totals.failed + totals.cancelled
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(totals.ended() as u64);
                bar.set_message(message);
            }
            None => {
                if totals.ended() != self.last_ended
                    || self.last_line.elapsed() >= PLAIN_LINE_INTERVAL
                {
                    eprintln!(
                        "prefill job {}: {}/{} URLs ended; {message}",
                        self.id,
                        totals.ended(),
                        self.total
                    );
                    self.last_line = Instant::now();
                    self.last_ended = totals.ended();
                }
            }
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_from_the_file_then_the_option_then_the_environment() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("token");
        std::fs::write(&file, "from-file\nignored\n").unwrap();
        assert_eq!(
            resolve_token(Some("option"), Some(&file), Some("environment".into())).unwrap(),
            "from-file"
        );
        assert_eq!(
            resolve_token(Some("option"), None, Some("environment".into())).unwrap(),
            "option"
        );
        assert_eq!(
            resolve_token(None, None, Some(" environment\n".into())).unwrap(),
            "environment"
        );
        let none = resolve_token(None, None, None).unwrap_err().to_string();
        assert!(none.contains(TOKEN_VARIABLE), "{none}");
        let missing = resolve_token(None, Some(&directory.path().join("absent")), None)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("--token-file"), "{missing}");
    }

    #[test]
    fn admin_urls_are_plain_http() {
        let client = AdminClient::new("127.0.0.1:9090", "t".into()).unwrap();
        assert_eq!(client.base(), "http://127.0.0.1:9090");
        let client = AdminClient::new("http://[::1]:9090/", "t".into()).unwrap();
        assert_eq!(client.base(), "http://[::1]:9090");
        let https = AdminClient::new("https://node:9090", "t".into()).unwrap_err();
        assert!(https.to_string().contains("plain HTTP"), "{https}");
        assert!(AdminClient::new("ftp://node", "t".into()).is_err());
    }

    #[test]
    fn url_lists_are_bounded_and_not_empty() {
        let directory = tempfile::tempdir().unwrap();
        let list = directory.path().join("urls.txt");
        std::fs::write(&list, "# Patch Tuesday\nhttp://a/1\n\nhttp://a/2\n").unwrap();
        assert_eq!(read_urls(&list).unwrap(), ["http://a/1", "http://a/2"]);
        std::fs::write(&list, "# nothing\n").unwrap();
        assert!(read_urls(&list)
            .unwrap_err()
            .to_string()
            .contains("no URLs"));
        std::fs::write(&list, vec![b'x'; MAX_BODY_BYTES + 1]).unwrap();
        assert!(read_urls(&list).unwrap_err().to_string().contains("larger"));
    }
}
