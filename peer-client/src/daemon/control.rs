//! The daemon's control API, on a Unix socket (`daemon.control_socket`), and its client (the
//! CLI's `get`, `status` and `perf-snap`).
//!
//! **Who may do what.** Each connection's peer credentials (`SO_PEERCRED`) say which user is on
//! the other end. Any local user may read `GET /v1/status` and `GET /v1/perf-snap`; only the
//! daemon's own user and root may hand a download over (`POST /v1/downloads`, JSON only), since
//! the daemon fetches it from its own network position. A web page cannot reach a Unix socket,
//! and a local process of another user is refused with `403`. The downloaded file is handed back
//! through a reference of 128 random bits (`GET /v1/files/<ref>`), usable once, by the user who
//! asked, within [`FILE_REF_LIFETIME`].
//!
//! **Nothing unverified is written.** The daemon checks a cached copy against the manifest's piece
//! hashes (and `--sha256`) before it hands it over, and again piece by piece while it streams
//! it. The client checks every status, writes into `<output>.peer-copy`, hashes what it receives
//! (the whole-file SHA-256 against `--sha256`, each piece against the manifest the daemon sent,
//! the length), and renames the copy into place only when everything matches; otherwise the copy
//! is deleted and the error says why.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::content::integrity::{self, PieceHashes, PieceManifest, Sha256Digest, StreamCheck};
use crate::content::store::ContentStore;
use crate::daemon::file_refs::HandedFile;
use crate::daemon::peer_server::{serve_connection, text_response, ChannelBody};
use crate::daemon::service::Daemon;

/// A file reference not used within this time is forgotten (and a transient file deleted).
pub const FILE_REF_LIFETIME: Duration = Duration::from_secs(600);

/// A control request head must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest `POST /v1/downloads` body.
const MAX_HAND_OFF_BODY: usize = 64 * 1024;

/// Bytes read per chunk when streaming a file out.
const STREAM_CHUNK: usize = 256 * 1024;

/// The body of `POST /v1/downloads`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandOff {
    /// The URL.
    pub url: String,
    /// The expected SHA-256, hex.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The answer to a successful `POST /v1/downloads`.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandedOver {
    /// The download's status, with DO's field names.
    pub status: serde_json::Value,
    /// Where to fetch the file: `/v1/files/<ref>`.
    pub file: String,
    /// The file's length.
    pub size: u64,
    /// The manifest's piece size, when the content has one.
    #[serde(default)]
    pub piece_size: Option<u64>,
    /// The manifest's piece hashes, hex.
    #[serde(default)]
    pub pieces: Vec<String>,
}

/// True when a caller of `caller_uid` may hand downloads to a daemon running as `daemon_uid`.
pub fn may_submit(caller_uid: u32, daemon_uid: u32) -> bool {
    caller_uid == 0 || caller_uid == daemon_uid
}

/// The control socket, bound, with the user the daemon runs as.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    daemon_uid: u32,
}

impl ControlListener {
    /// Binds `path` (a stale socket left by a dead daemon is replaced; a live daemon's is not)
    /// and lets every local user connect; the requests are checked one by one.
    pub fn bind(path: &Path) -> std::io::Result<ControlListener> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("another daemon answers on {}", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(ControlListener {
            listener,
            path: path.to_path_buf(),
            daemon_uid: rustix::process::geteuid().as_raw(),
        })
    }

    /// Treats `uid` as the daemon's own user (tests pretend the caller is someone else).
    pub fn with_daemon_uid(mut self, uid: u32) -> ControlListener {
        self.daemon_uid = uid;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    may_submit: bool,
}

/// Serves the control API on `listener` until `shutdown` resolves; the socket file is removed
/// at the end.
pub async fn serve(
    daemon: Daemon,
    listener: ControlListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(credentials) = stream.peer_cred() else {
            continue;
        };
        let caller = Caller {
            uid: credentials.uid(),
            may_submit: may_submit(credentials.uid(), listener.daemon_uid),
        };
        let daemon = daemon.clone();
        tokio::spawn(serve_connection(stream, HEADER_TIMEOUT, move |request| {
            let daemon = daemon.clone();
            async move { answer(&daemon, request, caller).await }
        }));
    }
    let _ = std::fs::remove_file(&listener.path);
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<ChannelBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(ChannelBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn answer(
    daemon: &Daemon,
    request: Request<Incoming>,
    caller: Caller,
) -> Response<ChannelBody> {
    let path = request.uri().path().to_owned();
    match (request.method().clone(), path.as_str()) {
        (Method::GET, "/v1/status") => json_response(StatusCode::OK, &daemon.status()),
        (Method::GET, "/v1/perf-snap") => json_response(StatusCode::OK, &daemon.perf_snap()),
        (Method::POST, "/v1/downloads") => hand_over(daemon, request, caller).await,
        (Method::GET, path) if path.starts_with("/v1/files/") => {
            let reference = &path["/v1/files/".len()..];
            match daemon.shared().file_refs.take(reference, caller.uid) {
                Some(file) => stream_file(daemon.shared().store.clone(), file).await,
                None => text_response(StatusCode::NOT_FOUND, "no such file"),
            }
        }
        _ => text_response(StatusCode::NOT_FOUND, "see docs/protocol.md, control API"),
    }
}

/// `POST /v1/downloads`: runs the download and hands out a reference to the file.
async fn hand_over(
    daemon: &Daemon,
    request: Request<Incoming>,
    caller: Caller,
) -> Response<ChannelBody> {
    let shared = daemon.shared();
    if !caller.may_submit {
        shared.stats.control_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            uid = caller.uid,
            "download hand-over refused: not the daemon's user"
        );
        return text_response(
            StatusCode::FORBIDDEN,
            "only the daemon's own user and root may hand downloads over",
        );
    }
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return text_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type: application/json only",
        );
    }
    let Ok(body) = http_body_util::Limited::new(request.into_body(), MAX_HAND_OFF_BODY)
        .collect()
        .await
    else {
        return text_response(StatusCode::BAD_REQUEST, "body too large");
    };
    let Ok(hand_off) = serde_json::from_slice::<HandOff>(&body.to_bytes()) else {
        return text_response(StatusCode::BAD_REQUEST, "expected {\"url\": ...}");
    };
    let sha256 = match hand_off.sha256.as_deref().map(integrity::parse_sha256_hex) {
        Some(Err(message)) => return text_response(StatusCode::BAD_REQUEST, &message),
        Some(Ok(digest)) => Some(digest),
        None => None,
    };
    // The download runs in a task of its own: a caller that hangs up (Ctrl-C) must not cancel it
    // half-way, which would leave its cache entry neither complete nor abandoned.
    let running = {
        let daemon = daemon.clone();
        tokio::spawn(async move { daemon.download(&hand_off.url, sha256, None).await })
    };
    let Ok(result) = running.await else {
        return text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the download task failed",
        );
    };
    match result {
        Ok(done) => {
            let size = done.status.file_size;
            let manifest = done.manifest.clone();
            let transient = done.content_id.is_none();
            let reference = shared.file_refs.insert(HandedFile {
                path: done.path,
                owner_uid: caller.uid,
                expires: Instant::now() + FILE_REF_LIFETIME,
                manifest: manifest.clone(),
                cached: done.content_id,
                transient,
            });
            let answer = HandedOver {
                status: serde_json::to_value(&done.status).unwrap_or_default(),
                file: format!("/v1/files/{reference}"),
                size,
                piece_size: manifest.as_ref().map(|manifest| manifest.piece_size),
                pieces: manifest
                    .as_ref()
                    .map(|manifest| manifest.pieces.iter().map(hex::encode).collect())
                    .unwrap_or_default(),
            };
            json_response(StatusCode::OK, &answer)
        }
        Err(error) => json_response(
            StatusCode::OK,
            &serde_json::json!({"status": {
                "Status": "Error",
                "Error": error.to_string(),
                "ErrorSource": error.error_source(),
                "RetryLaterMayHelp": error.retry_later_may_help(),
            }}),
        ),
    }
}

/// Streams a handed-over file, checking it piece by piece against its manifest: a piece that
/// does not match ends the stream with an error (and drops the cached copy, which is corrupt).
async fn stream_file(store: ContentStore, handed: HandedFile) -> Response<ChannelBody> {
    let Ok(file) = tokio::fs::File::open(&handed.path).await else {
        return text_response(StatusCode::NOT_FOUND, "the file is gone");
    };
    let length = file.metadata().await.map(|meta| meta.len()).unwrap_or(0);
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut file = file;
        let no_hashes = PieceManifest::new(1 << 20, Vec::new());
        let hashes: &dyn PieceHashes = match &handed.manifest {
            Some(manifest) => manifest.as_ref(),
            None => &no_hashes,
        };
        let mut check = StreamCheck::new(hashes);
        let mut buffer = vec![0_u8; STREAM_CHUNK];
        loop {
            let chunk = match file.read(&mut buffer).await {
                Ok(0) => break,
                Ok(read) => &buffer[..read],
                Err(error) => {
                    let _ = sender.send(Err(error)).await;
                    break;
                }
            };
            check.update(chunk);
            if let Some(index) = check.first_bad_piece() {
                tracing::warn!(path = %handed.path.display(), piece = index, "the copy on disk fails its piece hash; dropped");
                if let Some(id) = handed.cached {
                    store.drop_complete(id);
                }
                let error = std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("piece {index} of the daemon's copy fails its hash"),
                );
                let _ = sender.send(Err(error)).await;
                break;
            }
            if sender
                .send(Ok(Bytes::copy_from_slice(chunk)))
                .await
                .is_err()
            {
                break;
            }
        }
        if handed.transient {
            let _ = tokio::fs::remove_file(&handed.path).await;
        }
    });
    let mut response = Response::new(ChannelBody::streamed(receiver));
    if let Ok(value) = HeaderValue::from_str(&length.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    response
}

/// Why the CLI could not use the daemon's answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be reached or the exchange broke off.
    #[error("control socket {socket}: {detail}")]
    Transport {
        /// The socket path.
        socket: String,
        /// What went wrong.
        detail: String,
    },
    /// The daemon answered with an error status.
    #[error("the daemon answered {status} to {what}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The request.
        what: String,
        /// The daemon's text.
        message: String,
    },
    /// The daemon's answer is not what the API promises.
    #[error("the daemon's answer to {what} is not understood: {detail}")]
    Protocol {
        /// The request.
        what: String,
        /// What is wrong.
        detail: String,
    },
    /// The daemon's download failed.
    #[error("the daemon's download failed: {0}")]
    DownloadFailed(String),
    /// The bytes the daemon sent are not the file asked for; nothing was written.
    #[error("the daemon's copy was not written: {0}")]
    Integrity(String),
    /// The output could not be written.
    #[error("{context}: {source}")]
    Disk {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What handing a download to the daemon came to.
#[derive(Debug)]
pub enum HandOffOutcome {
    /// No daemon answers on the socket: download in this process.
    NoDaemon,
    /// The daemon refuses this user: download in this process.
    NotPermitted(String),
    /// The file is at the output, verified; the daemon's status.
    Done(serde_json::Value),
}

/// Sends one request over the control socket.
async fn send(
    socket: &Path,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, ControlError> {
    let transport = |detail: String| ControlError::Transport {
        socket: socket.display().to_string(),
        detail,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|error| transport(error.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| transport(error.to_string()))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|error| transport(error.to_string()))
}

fn control_request(method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = path.parse().expect("API paths are valid URIs");
    request
        .headers_mut()
        .insert(header::HOST, HeaderValue::from_static("localhost"));
    request
}

async fn read_text(response: Response<Incoming>) -> String {
    match response.into_body().collect().await {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).trim().to_owned(),
        Err(error) => error.to_string(),
    }
}

/// `GET <path>` on the control socket: the body of a `200`, or an error.
pub async fn get_text(socket: &Path, path: &str) -> Result<String, ControlError> {
    let response = send(socket, control_request(Method::GET, path, Bytes::new())).await?;
    let status = response.status();
    let text = read_text(response).await;
    if status != StatusCode::OK {
        return Err(ControlError::Status {
            status: status.as_u16(),
            what: format!("GET {path}"),
            message: text,
        });
    }
    Ok(text)
}

/// Hands the download of `url` to the daemon on `socket` and copies the file to `output`,
/// verified against `sha256` and the manifest's piece hashes.
pub async fn hand_off(
    socket: &Path,
    url: &str,
    sha256: Option<Sha256Digest>,
    output: &Path,
) -> Result<HandOffOutcome, ControlError> {
    match UnixStream::connect(socket).await {
        Ok(_) => {}
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(HandOffOutcome::NoDaemon)
        }
        Err(error) => {
            return Ok(HandOffOutcome::NotPermitted(format!(
                "cannot reach {}: {error}",
                socket.display()
            )))
        }
    }
    let body = serde_json::json!({"url": url, "sha256": sha256.map(hex::encode)});
    let mut request = control_request(Method::POST, "/v1/downloads", body.to_string().into());
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let response = send(socket, request).await?;
    let status = response.status();
    if status == StatusCode::FORBIDDEN {
        return Ok(HandOffOutcome::NotPermitted(read_text(response).await));
    }
    let what = "POST /v1/downloads".to_owned();
    let text = read_text(response).await;
    if status != StatusCode::OK {
        return Err(ControlError::Status {
            status: status.as_u16(),
            what,
            message: text,
        });
    }
    let answer: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| ControlError::Protocol {
            what: what.clone(),
            detail: error.to_string(),
        })?;
    if answer["status"]["Status"] != "Complete" {
        return Err(ControlError::DownloadFailed(
            answer["status"]["Error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_owned(),
        ));
    }
    let handed: HandedOver =
        serde_json::from_value(answer).map_err(|error| ControlError::Protocol {
            what: what.clone(),
            detail: error.to_string(),
        })?;
    let hashes = piece_hashes(&handed).map_err(|detail| ControlError::Protocol { what, detail })?;
    copy_verified(socket, &handed, &hashes, sha256, output).await?;
    Ok(HandOffOutcome::Done(handed.status))
}

/// The manifest the daemon sent, in checkable form (one covering nothing when there is none).
fn piece_hashes(handed: &HandedOver) -> Result<PieceManifest, String> {
    let Some(piece_size) = handed.piece_size else {
        return Ok(PieceManifest::new(1 << 20, Vec::new()));
    };
    if piece_size == 0 || handed.pieces.len() as u64 != handed.size.div_ceil(piece_size) {
        return Err(format!(
            "{} piece hashes of {piece_size} bytes for {} bytes",
            handed.pieces.len(),
            handed.size
        ));
    }
    let digests = handed
        .pieces
        .iter()
        .map(|text| integrity::parse_sha256_hex(text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PieceManifest::new(piece_size, digests))
}

/// Fetches the handed-over file into `<output>.peer-copy`, checks it, and renames it to `output`.
/// On any failure the copy is deleted.
async fn copy_verified(
    socket: &Path,
    handed: &HandedOver,
    hashes: &dyn PieceHashes,
    sha256: Option<Sha256Digest>,
    output: &Path,
) -> Result<(), ControlError> {
    let mut copy_name = output.as_os_str().to_owned();
    copy_name.push(".peer-copy");
    let copy = PathBuf::from(copy_name);
    let result = write_copy(socket, handed, hashes, sha256, &copy).await;
    let result = match result {
        Ok(()) => tokio::fs::rename(&copy, output)
            .await
            .map_err(|source| ControlError::Disk {
                context: format!("renaming {} to {}", copy.display(), output.display()),
                source,
            }),
        Err(error) => Err(error),
    };
    if result.is_err() {
        let _ = tokio::fs::remove_file(&copy).await;
    }
    result
}

async fn write_copy(
    socket: &Path,
    handed: &HandedOver,
    hashes: &dyn PieceHashes,
    sha256: Option<Sha256Digest>,
    copy: &Path,
) -> Result<(), ControlError> {
    let what = format!("GET {}", handed.file);
    let response = send(
        socket,
        control_request(Method::GET, &handed.file, Bytes::new()),
    )
    .await?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(ControlError::Status {
            status: status.as_u16(),
            what,
            message: read_text(response).await,
        });
    }
    let disk = |context: String| move |source| ControlError::Disk { context, source };
    let _ = tokio::fs::remove_file(copy).await;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(copy)
        .await
        .map_err(disk(format!("creating {}", copy.display())))?;
    let mut check = StreamCheck::new(hashes);
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ControlError::Transport {
            socket: socket.display().to_string(),
            detail: format!("the file stream broke off: {error}"),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        check.update(&data);
        if let Some(index) = check.first_bad_piece() {
            return Err(ControlError::Integrity(format!(
                "piece {index} does not match the cache node's piece hash"
            )));
        }
        if check.bytes_seen() > handed.size {
            return Err(ControlError::Integrity(format!(
                "more than the {} bytes announced",
                handed.size
            )));
        }
        file.write_all(&data)
            .await
            .map_err(disk(format!("writing {}", copy.display())))?;
    }
    let checked = check.finish();
    if checked.len != handed.size {
        return Err(ControlError::Integrity(format!(
            "{} bytes received, {} announced",
            checked.len, handed.size
        )));
    }
    if let Some(index) = checked.first_bad_piece {
        return Err(ControlError::Integrity(format!(
            "piece {index} does not match the cache node's piece hash"
        )));
    }
    if let Some(expected) = sha256 {
        if checked.sha256 != expected {
            return Err(ControlError::Integrity(format!(
                "SHA-256 mismatch: expected {}, got {}",
                hex::encode(expected),
                hex::encode(checked.sha256)
            )));
        }
    }
    file.sync_all()
        .await
        .map_err(disk(format!("flushing {}", copy.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_daemons_user_and_root_may_hand_downloads_over() {
        assert!(may_submit(0, 990));
        assert!(may_submit(990, 990));
        assert!(!may_submit(1000, 990));
        assert!(may_submit(0, 0));
        assert!(!may_submit(1000, 0));
    }

    #[tokio::test]
    async fn file_references_are_random_single_use_and_bound_to_their_user() {
        let refs = crate::daemon::file_refs::FileRefs::default();
        let handed = |owner_uid| HandedFile {
            path: PathBuf::from("/nonexistent"),
            owner_uid,
            expires: Instant::now() + FILE_REF_LIFETIME,
            manifest: None,
            cached: None,
            transient: false,
        };
        let first = refs.insert(handed(1000));
        let second = refs.insert(handed(1000));
        assert_eq!(first.len(), 32);
        assert!(first.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(first, second);
        // Another user cannot take it, nor use it up for its owner.
        assert!(refs.take(&first, 1001).is_none());
        assert!(refs.take(&first, 1000).is_some());
        assert!(refs.take(&first, 1000).is_none());
        assert!(refs.take("f0", 1000).is_none());
        assert_eq!(refs.len(), 1);
    }
}
