//! The access log (`[log] access`): one line per client request, in JSON or in the Apache/nginx
//! "combined" format with the cache's own fields after it.
//!
//! Nothing is written on the request path. A finished response hands an [`AccessEntry`] to a
//! bounded channel with `try_send`; a writer thread formats the lines and appends them to the file,
//! rotating it by size. When the writer falls behind (a slow or stuck disk), entries are dropped
//! and counted (`access_log_dropped`), so a request never waits for the log.
//!
//! Query parameters named in `log.access_redact` (signatures and tokens in CDN URLs) are written
//! as `REDACTED`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

/// How many finished requests may wait for the writer before new ones are dropped.
pub const QUEUE_ENTRIES: usize = 65_536;

/// The line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// One JSON object per line.
    Json,
    /// `combined` (`%h - - [%t] "%r" %>s %b "%{Referer}i" "%{User-Agent}i"`), then the cache's
    /// fields as `name=value`.
    Combined,
}

impl AccessFormat {
    /// Parses `log.access`: `None` for `off`, `Err` for anything unknown.
    pub fn parse(text: &str) -> Result<Option<AccessFormat>, String> {
        match text {
            "off" | "" => Ok(None),
            "json" => Ok(Some(AccessFormat::Json)),
            "combined" => Ok(Some(AccessFormat::Combined)),
            other => Err(format!(
                "\"{other}\" is not an access log format; use \"off\", \"json\" or \"combined\""
            )),
        }
    }
}

/// The access log's settings, validated.
#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    /// The line format.
    pub format: AccessFormat,
    /// The file written to; rotated files get `.1`, `.2`... after its name.
    pub path: PathBuf,
    /// The size at which the file is rotated.
    pub max_bytes: u64,
    /// How many rotated files are kept.
    pub keep: usize,
    /// Query parameter names whose values are written as `REDACTED` (compared without case).
    pub redact: Vec<String>,
    /// How many entries may wait for the writer ([`QUEUE_ENTRIES`] by default).
    pub queue: usize,
}

/// One finished request.
#[derive(Debug, Clone)]
pub struct AccessEntry {
    /// When the request arrived.
    pub time: SystemTime,
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The request method.
    pub method: String,
    /// The origin it was routed to, or `-`.
    pub origin: String,
    /// The request target as the client sent it (path and query, or the absolute URL of a
    /// proxy request).
    pub target: String,
    /// The HTTP version, e.g. `HTTP/1.1`.
    pub version: &'static str,
    /// The `Range` asked for.
    pub range: Option<String>,
    /// The status sent.
    pub status: u16,
    /// `HIT`, `MISS`, `PARTIAL`, `BYPASS` or `-`.
    pub cache: String,
    /// Body bytes sent.
    pub bytes: u64,
    /// Until the response's headers were ready.
    pub first_byte: Duration,
    /// Until the body ended (or the client went away).
    pub duration: Duration,
    /// False when the body did not reach its end (an abort, or a client that left).
    pub complete: bool,
    /// `Referer`.
    pub referer: Option<String>,
    /// `User-Agent`.
    pub user_agent: Option<String>,
}

/// The sending side, shared by every worker.
#[derive(Debug, Clone)]
pub struct AccessLog {
    sender: SyncSender<AccessEntry>,
    /// Entries dropped because the writer was behind.
    pub dropped: Counter,
    /// Entries written.
    pub written: Counter,
}

impl AccessLog {
    /// Opens (creates) the log file and starts its writer thread, which counts in `written` the
    /// lines it writes; `dropped` counts the entries it could not take.
    pub fn start(
        settings: AccessLogSettings,
        written: Counter,
        dropped: Counter,
    ) -> std::io::Result<AccessLog> {
        if let Some(parent) = settings.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = open_append(&settings.path)?;
        let (sender, receiver) = sync_channel(settings.queue.max(1));
        let log = AccessLog {
            sender,
            dropped,
            written,
        };
        let written = log.written.clone();
        std::thread::Builder::new()
            .name("outpost-access-log".into())
            .spawn(move || write_lines(settings, file, receiver, written))?;
        Ok(log)
    }

    /// Queues `entry` without waiting; counts it as dropped when the writer is behind.
    pub fn record(&self, entry: AccessEntry) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.sender.try_send(entry)
        {
            self.dropped.inc();
        }
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread: formats and appends lines, flushing when the queue runs dry, and rotates
/// the file when the next line would take it past `max_bytes`.
fn write_lines(
    settings: AccessLogSettings,
    file: File,
    receiver: Receiver<AccessEntry>,
    written: Counter,
) {
    let mut size = file.metadata().map(|meta| meta.len()).unwrap_or(0);
    let mut out = BufWriter::with_capacity(64 << 10, file);
    let mut line = String::with_capacity(512);
    while let Ok(mut entry) = receiver.recv() {
        loop {
            line.clear();
            format_line(&settings, &entry, &mut line);
            if size + line.len() as u64 > settings.max_bytes && size > 0 {
                let _ = out.flush();
                match rotate(&settings) {
                    Ok(file) => {
                        out = BufWriter::with_capacity(64 << 10, file);
                        size = 0;
                    }
                    Err(error) => {
                        tracing::warn!(%error, path = %settings.path.display(), "cannot rotate the access log");
                    }
                }
            }
            if out.write_all(line.as_bytes()).is_ok() {
                size += line.len() as u64;
                written.inc();
            }
            match receiver.try_recv() {
                Ok(next) => entry = next,
                Err(_) => break,
            }
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// Renames `path` to `path.1` (and `.1` to `.2`..., dropping the oldest beyond `keep`) and opens a
/// new `path`.
fn rotate(settings: &AccessLogSettings) -> std::io::Result<File> {
    let numbered = |n: usize| {
        let mut name = settings.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if settings.keep == 0 {
        std::fs::remove_file(&settings.path)?;
    } else {
        let _ = std::fs::remove_file(numbered(settings.keep));
        for n in (1..settings.keep).rev() {
            let _ = std::fs::rename(numbered(n), numbered(n + 1));
        }
        std::fs::rename(&settings.path, numbered(1))?;
    }
    open_append(&settings.path)
}

/// `target` with the values of the `redact` parameters replaced.
pub fn redacted(target: &str, redact: &[String]) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let parameters: Vec<String> = query
        .split('&')
        .map(|parameter| {
            let name = parameter.split('=').next().unwrap_or("");
            if redact
                .iter()
                .any(|secret| secret.eq_ignore_ascii_case(name))
            {
                format!("{name}=REDACTED")
            } else {
                parameter.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", parameters.join("&"))
}

fn format_line(settings: &AccessLogSettings, entry: &AccessEntry, line: &mut String) {
    use std::fmt::Write as _;
    let target = redacted(&entry.target, &settings.redact);
    let client = entry
        .client
        .map_or_else(|| "-".to_owned(), |ip| ip.to_string());
    let first_byte_ms = entry.first_byte.as_secs_f64() * 1000.0;
    let duration_ms = entry.duration.as_secs_f64() * 1000.0;
    match settings.format {
        AccessFormat::Json => {
            let time = humantime::format_rfc3339_millis(entry.time).to_string();
            let value = serde_json::json!({
                "time": time,
                "client": client,
                "method": entry.method,
                "origin": entry.origin,
                "target": target,
                "version": entry.version,
                "range": entry.range,
                "status": entry.status,
                "cache": entry.cache,
                "bytes": entry.bytes,
                "first_byte_ms": (first_byte_ms * 1000.0).round() / 1000.0,
                "duration_ms": (duration_ms * 1000.0).round() / 1000.0,
                "complete": entry.complete,
                "referer": entry.referer,
                "user_agent": entry.user_agent,
            });
            let _ = writeln!(line, "{value}");
        }
        AccessFormat::Combined => {
            let time = httpdate::fmt_http_date(entry.time);
            let quoted = |value: &Option<String>| match value {
                Some(value) => format!("\"{}\"", value.replace(['"', '\\'], "_")),
                None => "\"-\"".to_owned(),
            };
            let _ = writeln!(
                line,
                "{client} - - [{time}] \"{} {} {}\" {} {} {} {} origin={} cache={} range={} first_byte_ms={first_byte_ms:.3} duration_ms={duration_ms:.3} complete={}",
                entry.method,
                target.replace(['"', ' '], "_"),
                entry.version,
                entry.status,
                entry.bytes,
                quoted(&entry.referer),
                quoted(&entry.user_agent),
                entry.origin,
                entry.cache,
                entry.range.as_deref().unwrap_or("-").replace(' ', ""),
                entry.complete,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> AccessEntry {
        AccessEntry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            client: Some("192.0.2.7".parse().unwrap()),
            method: "GET".into(),
            origin: "dl.example.com".into(),
            target: "/file.cab?sig=abc&x=1&Token=t".into(),
            version: "HTTP/1.1",
            range: Some("bytes=0-99".into()),
            status: 206,
            cache: "HIT".into(),
            bytes: 100,
            first_byte: Duration::from_micros(1500),
            duration: Duration::from_millis(3),
            complete: true,
            referer: None,
            user_agent: Some("Microsoft-Delivery-Optimization/10.0".into()),
        }
    }

    fn settings(format: AccessFormat, path: PathBuf) -> AccessLogSettings {
        AccessLogSettings {
            format,
            path,
            max_bytes: 1 << 20,
            keep: 2,
            redact: vec!["sig".into(), "token".into()],
            queue: QUEUE_ENTRIES,
        }
    }

    #[test]
    fn secrets_in_the_query_are_redacted() {
        let redact = vec!["sig".to_owned(), "token".to_owned()];
        assert_eq!(
            redacted("/a?sig=abc&x=1&Token=t&sig", &redact),
            "/a?sig=REDACTED&x=1&Token=REDACTED&sig=REDACTED"
        );
        assert_eq!(redacted("/plain", &redact), "/plain");
    }

    #[test]
    fn both_formats_carry_the_fields() {
        let mut line = String::new();
        format_line(
            &settings(AccessFormat::Json, "x".into()),
            &entry(),
            &mut line,
        );
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["status"], 206);
        assert_eq!(value["cache"], "HIT");
        assert_eq!(value["target"], "/file.cab?sig=REDACTED&x=1&Token=REDACTED");
        assert_eq!(value["first_byte_ms"], 1.5);
        assert_eq!(value["time"], "2023-11-14T22:13:20.000Z");
        line.clear();
        format_line(
            &settings(AccessFormat::Combined, "x".into()),
            &entry(),
            &mut line,
        );
        assert_eq!(
            line,
            "192.0.2.7 - - [Tue, 14 Nov 2023 22:13:20 GMT] \"GET /file.cab?sig=REDACTED&x=1&Token=REDACTED HTTP/1.1\" 206 100 \"-\" \"Microsoft-Delivery-Optimization/10.0\" origin=dl.example.com cache=HIT range=bytes=0-99 first_byte_ms=1.500 duration_ms=3.000 complete=true\n"
        );
    }

    #[test]
    fn the_file_is_rotated_by_size_keeping_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut settings = settings(AccessFormat::Json, path.clone());
        settings.max_bytes = 2_000;
        let log = AccessLog::start(settings, Counter::default(), Counter::default()).unwrap();
        for _ in 0..100 {
            log.record(entry());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.written.get() < 100 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(log.written.get(), 100);
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 2_000, "{}", current.len());
        assert!(dir.path().join("access.log.1").exists());
        assert!(dir.path().join("access.log.2").exists());
        assert!(!dir.path().join("access.log.3").exists(), "keep = 2");
    }
}
