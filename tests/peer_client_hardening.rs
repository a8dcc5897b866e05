//! peer-client against hostile neighbours: a local process that abuses the daemon's control API
//! (another user, a web page's simple request, a URL on an internal address), a daemon whose
//! answers or cached copy are wrong (the CLI must never write a wrong file and exit 0), and peers
//! that hold upload slots by not reading. Every check is on the bytes written or served and on
//! the daemon's counters, not only on status codes.

#[path = "common/mod.rs"]
mod common;
#[path = "peer_common/mod.rs"]
mod peer_common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use outpost_testkit::{
    eventually, eventually_every, open_fds, pattern_bytes, sha256_hex, MockOrigin,
};
use peer_client::sources::node_api::ContentId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use peer_common::swarm::{
    cli, file_digest, get_piece_range, origin_with_content, raw_exchange, run, run_ok, start_node,
    ORIGIN_IP, PIECE,
};
use peer_common::TestDaemon;

/// Files in `directory` whose name contains `.peer-` (copies or partial files left behind).
fn leftovers(directory: &Path) -> Vec<String> {
    std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains(".peer-"))
        .collect()
}

/// `POST /v1/downloads` on a control socket with `content_type`; the status and the body.
async fn control_post(socket: &Path, content_type: &str, body: &str) -> (u16, String) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("/v1/downloads")
        .header("host", "localhost")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The daemon's `perf-snap` counter `name`.
fn counter(daemon: &TestDaemon, name: &str) -> u64 {
    daemon.daemon.perf_snap()[name].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_a_wrong_sha256_exits_non_zero_and_writes_nothing_fresh_or_cached() {
    let (origin, url, content) = origin_with_content(70).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let directory = tempfile::tempdir().unwrap();
    let right = sha256_hex(&content);
    let wrong = sha256_hex(b"another file");
    let get = |name: &str, sha256: &str| {
        let output = directory.path().join(name);
        let arguments = [
            "get",
            &url,
            "-o",
            output.to_str().unwrap(),
            "--sha256",
            sha256,
        ];
        run(cli(&daemon.control_socket, &arguments))
    };

    // The daemon downloads it fresh, and the digest does not match (not even after the repair
    // from the origin).
    let (success, _, stderr) = get("fresh.bin", &wrong).await;
    assert!(!success, "exit 0 for a wrong --sha256");
    assert!(stderr.contains("SHA-256 mismatch"), "{stderr}");
    assert!(!directory.path().join("fresh.bin").exists());

    // Once the content is in the daemon's cache (a correct get puts it there), a wrong digest is
    // still an error and nothing is written.
    let (success, _, stderr) = get("good.bin", &right).await;
    assert!(success, "{stderr}");
    assert_eq!(file_digest(&directory.path().join("good.bin")), right);
    assert_eq!(daemon.daemon.shared().store.entries().len(), 1);
    let (success, _, stderr) = get("cached.bin", &wrong).await;
    assert!(!success, "exit 0 for a wrong --sha256");
    assert!(stderr.contains("SHA-256 mismatch"), "{stderr}");
    assert!(
        stderr.contains("cached copy matches the cache node's piece hashes"),
        "{stderr}"
    );
    assert!(!directory.path().join("cached.bin").exists());
    assert!(leftovers(directory.path()).is_empty());
    // The good cached copy is kept.
    assert_eq!(daemon.daemon.shared().store.entries().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_copy_altered_on_disk_is_detected_and_downloaded_again() {
    let (origin, url, content) = origin_with_content(71).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let id = daemon.download(&url).await.content_id.unwrap();
    let data = daemon.daemon.shared().store.data_path(id);
    // Same length, one byte of piece 5 changed: only the piece hashes can tell.
    let mut altered = std::fs::read(&data).unwrap();
    altered[5 * PIECE + 10] ^= 0xff;
    std::fs::write(&data, &altered).unwrap();

    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("out.bin");
    // No --sha256: the manifest's piece hashes alone must catch it.
    run_ok(cli(
        &daemon.control_socket,
        &["get", &url, "-o", output.to_str().unwrap()],
    ))
    .await;
    assert_eq!(std::fs::read(&output).unwrap(), content);
    assert_eq!(counter(&daemon, "CorruptCopiesDropped"), 1);
    // The daemon dropped the altered copy and holds a good one again.
    assert_eq!(file_digest(&data), sha256_hex(&content));
    assert!(leftovers(directory.path()).is_empty());
}

/// A fake daemon on `socket`: the hand-over succeeds for `content` (with its piece hashes, in
/// pieces of 1 KiB), and the file request is answered with `status` and `body`.
async fn fake_daemon(socket: &Path, content: Bytes, status: u16, body: Bytes) {
    use sha2::Digest;
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let pieces: Vec<String> = content
        .chunks(1024)
        .map(|piece| hex::encode(sha2::Sha256::digest(piece)))
        .collect();
    let answer = serde_json::json!({
        "status": {"Status": "Complete", "FileSize": content.len()},
        "file": "/v1/files/0123456789abcdef0123456789abcdef",
        "size": content.len(),
        "piece_size": 1024,
        "pieces": pieces,
    })
    .to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<_>| {
                    let (code, text) = if request.method() == http::Method::POST {
                        (200, Bytes::from(answer.clone()))
                    } else {
                        (status, body.clone())
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(code)
                                .body(Full::new(text))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

#[tokio::test]
async fn a_daemon_that_answers_404_or_sends_wrong_bytes_fails_get_and_nothing_is_written() {
    let content = pattern_bytes(5000, 72);
    let mut altered = content.to_vec();
    altered[3000] ^= 1;
    let cases: [(&str, u16, Bytes, Option<&str>); 5] = [
        (
            "404",
            404,
            Bytes::from_static(b"no such file\n"),
            Some("404"),
        ),
        ("altered", 200, Bytes::from(altered), Some("piece 2")),
        (
            "short",
            200,
            content.slice(..4096),
            Some("4096 bytes received"),
        ),
        (
            "long",
            200,
            Bytes::from([&content[..], b"!"].concat()),
            Some("more than"),
        ),
        // The control: the same fake daemon sending the right bytes is a success.
        ("right", 200, content.clone(), None),
    ];
    for (name, status, body, expected_error) in cases {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("control.sock");
        fake_daemon(&socket, content.clone(), status, body).await;
        let output = directory.path().join("out.bin");
        let arguments = [
            "get",
            "http://example.org/f.bin",
            "-o",
            output.to_str().unwrap(),
        ];
        let (success, _, stderr) = run(cli(&socket, &arguments)).await;
        match expected_error {
            Some(text) => {
                assert!(!success, "{name}: exit 0");
                assert!(stderr.contains(text), "{name}: {stderr}");
                assert!(!output.exists(), "{name}: an output was written");
            }
            None => {
                assert!(success, "{name}: {stderr}");
                assert_eq!(std::fs::read(&output).unwrap(), content);
            }
        }
        assert!(leftovers(directory.path()).is_empty(), "{name}");
    }
}

/// The binary run as another user: as root, `setpriv` to `nobody`; otherwise this user, with
/// the daemon told it runs as someone else.
fn cli_as_other_user(socket: &Path, arguments: &[&str]) -> tokio::process::Command {
    let mut command = cli(socket, arguments);
    if rustix::process::geteuid().is_root() {
        let program = command.as_std().get_program().to_owned();
        let mut wrapped = tokio::process::Command::new("setpriv");
        wrapped
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program)
            .args(arguments);
        for (key, value) in command.as_std().get_envs() {
            if let Some(value) = value {
                wrapped.env(key, value);
            }
        }
        wrapped.stdin(std::process::Stdio::null());
        command = wrapped;
    }
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_reads_the_status_but_cannot_hand_a_download_over() {
    use std::os::unix::fs::PermissionsExt;
    let (origin, url, content) = origin_with_content(73).await;
    let node = start_node(&origin);
    let euid = rustix::process::geteuid();
    let cache_dir = tempfile::tempdir_in(peer_common::scratch_dir()).unwrap();
    // The other user must reach the socket, as in /run/peer-client (mode 0755).
    std::fs::set_permissions(cache_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = TestDaemon::start_with_control(
        "127.0.0.2",
        node.addr,
        cache_dir,
        |_| {},
        |control| {
            if euid.is_root() {
                control
            } else {
                control.with_daemon_uid(euid.as_raw() + 1)
            }
        },
    )
    .await;
    let directory = tempfile::tempdir().unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let output = directory.path().join("mine.bin");

    let status = run_ok(cli_as_other_user(&daemon.control_socket, &["status"])).await;
    let listed: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert!(listed.is_array(), "{listed}");

    // The daemon refuses the hand-over; get downloads in its own process instead (through the
    // node, as configured), and the file is right.
    let mut get = cli_as_other_user(
        &daemon.control_socket,
        &["get", &url, "-o", output.to_str().unwrap()],
    );
    get.env("PEER_CLIENT__CACHE_HOSTS", node.addr.to_string());
    let (success, _, stderr) = run(get).await;
    assert!(success, "{stderr}");
    assert!(
        stderr.contains("does not take downloads from this user"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), content);
    assert_eq!(counter(&daemon, "HandOversRefused"), 1);
    assert!(daemon.daemon.shared().store.entries().is_empty());
    assert_eq!(counter(&daemon, "FilesDownloaded"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_fetches_no_internal_url_and_no_simple_request() {
    let (origin, url, _) = origin_with_content(74).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.daemon.allow_private_urls = false;
    })
    .await;
    let secret = format!("{}/files/big.bin", origin.base_url());
    let hand_off = serde_json::json!({ "url": secret }).to_string();

    // What a web page can send without a preflight: refused before anything is fetched.
    let (status, body) = control_post(&daemon.control_socket, "text/plain", &hand_off).await;
    assert_eq!(status, 415, "{body}");
    // As JSON, from a permitted user: the URL is on a loopback address, so it is refused.
    let (status, body) = control_post(&daemon.control_socket, "application/json", &hand_off).await;
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"]["Status"], "Error", "{body}");
    let error = answer["status"]["Error"].as_str().unwrap();
    assert!(error.contains("daemon.allow_private_urls"), "{error}");
    assert!(error.contains(ORIGIN_IP), "{error}");
    assert!(answer.get("file").is_none(), "{body}");

    // The CLI reports it and writes nothing.
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("secret.bin");
    let arguments = ["get", &url, "-o", output.to_str().unwrap()];
    let (success, _, stderr) = run(cli(&daemon.control_socket, &arguments)).await;
    assert!(!success);
    assert!(stderr.contains("daemon.allow_private_urls"), "{stderr}");
    assert!(!output.exists());

    assert_eq!(origin.request_count(), 0, "the origin was asked");
    assert_eq!(node.requests().await, 0, "the node was asked");
    assert_eq!(counter(&daemon, "UrlsRefused"), 2);
    assert!(daemon.daemon.shared().store.entries().is_empty());
}

/// A connection from `source` that asks for the whole of `content` and never reads.
async fn non_reading_peer(
    source: &str,
    peer: SocketAddr,
    content: ContentId,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    // A small receive window, so the daemon's writes block early.
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(peer).await.unwrap();
    let request =
        format!("GET /content/{content} HTTP/1.1\r\nHost: peer\r\nRange: bytes=0-\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A daemon on 127.0.0.2 holding a 24 MiB file (more than socket buffers absorb), with `tweak`.
async fn daemon_with_big_content(
    seed: u64,
    tweak: impl FnOnce(&mut peer_client::Config),
) -> (
    MockOrigin,
    peer_common::KillableNode,
    TestDaemon,
    ContentId,
    Bytes,
) {
    let origin = MockOrigin::start_on(ORIGIN_IP).await;
    let content = pattern_bytes(24 << 20, seed);
    origin.put("/files/huge.bin", content.clone());
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, tweak).await;
    let url = format!("{}/files/huge.bin", origin.base_url());
    let id = daemon.download(&url).await.content_id.unwrap();
    (origin, node, daemon, id, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_peers_that_stop_reading_are_dropped_and_a_real_peer_then_gets_its_bytes() {
    let send_timeout = Duration::from_secs(2);
    let (_origin, _node, daemon, id, content) = daemon_with_big_content(75, |config| {
        config.daemon.upload_send_timeout = send_timeout;
    })
    .await;
    let fds_before = open_fds();
    let mut hogs = Vec::new();
    for index in 0..16 {
        hogs.push(
            non_reading_peer(&format!("127.0.1.{}", 100 + index), daemon.peer_addr, id).await,
        );
    }
    let uploads = daemon.daemon.shared().uploads.clone();
    eventually("16 uploads running", Duration::from_secs(10), || {
        uploads.active() == 16
    })
    .await;
    let held_at = Instant::now();

    // A real peer is refused while the slots are held, then served once the daemon dropped the
    // peers that stopped reading.
    let range = 3 * PIECE..4 * PIECE;
    // Every try is a request the daemon refuses or serves: they keep the pace of a real peer.
    let body = eventually_every(
        "a slot to be free for a real peer",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || {
            let (status, body) = get_piece_range(daemon.peer_addr, id, range.clone()).await;
            if status == 206 {
                return Some(body);
            }
            assert_eq!(status, 503);
            None
        },
    )
    .await;
    assert_eq!(body, content[range]);
    assert!(
        held_at.elapsed() >= send_timeout / 2,
        "{:?}",
        held_at.elapsed()
    );
    eprintln!(
        "a real peer was served {:?} after 16 non-reading peers held every slot",
        held_at.elapsed()
    );
    eventually("16 drops counted", Duration::from_secs(10), || {
        counter(&daemon, "SlowPeersDropped") == 16
    })
    .await;
    // The daemon's side of the 16 connections (and the files they read) is closed: this process
    // holds the 16 client sockets the test keeps, and nothing more.
    eventually(
        "the daemon's sockets closed",
        Duration::from_secs(10),
        || open_fds() <= fds_before + 16 + 4,
    )
    .await;
    eprintln!(
        "open fds: {fds_before} before, {} with the test's 16 client sockets left",
        open_fds()
    );
    // The daemon reset their connections: each ends at once, having received far less than it
    // asked for.
    for mut hog in hogs {
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), hog.read_to_end(&mut received))
            .await
            .expect("the daemon closed the connection");
        let _ = read;
        assert!(received.len() < content.len() / 2, "{}", received.len());
    }
    assert_eq!(uploads.active(), 0);
}

/// File descriptors this process has open (the daemon, the node and the test's clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_upload_slot() {
    let (_origin, _node, daemon, id, content) = daemon_with_big_content(76, |_| {}).await;
    let mut hogs = Vec::new();
    for _ in 0..4 {
        hogs.push(non_reading_peer("127.0.1.50", daemon.peer_addr, id).await);
    }
    let uploads = daemon.daemon.shared().uploads.clone();
    eventually("4 uploads running", Duration::from_secs(10), || {
        uploads.active() == 4
    })
    .await;
    let request = format!(
        "GET /content/{id} HTTP/1.1\r\nHost: peer\r\nRange: bytes=0-{}\r\nConnection: close\r\n\r\n",
        PIECE - 1
    );
    let same_address = raw_exchange(
        Some("127.0.1.50".parse().unwrap()),
        daemon.peer_addr,
        &request,
    )
    .await;
    assert_eq!(same_address.status, 503);
    assert!(
        String::from_utf8_lossy(&same_address.body).contains("too many uploads to this address")
    );
    assert!(same_address
        .head
        .to_ascii_lowercase()
        .contains("retry-after: 5"));
    let other: IpAddr = "127.0.1.51".parse().unwrap();
    let other_address = raw_exchange(Some(other), daemon.peer_addr, &request).await;
    assert_eq!(other_address.status, 206);
    assert_eq!(other_address.body, content[..PIECE]);
    assert_eq!(counter(&daemon, "UploadsRefused"), 1);
    drop(hogs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_upload_slot_is_taken_the_peer_port_answers_503_then_serves_again() {
    let (_origin, _node, daemon, id, content) = daemon_with_big_content(77, |config| {
        config.daemon.max_concurrent_uploads = 2;
    })
    .await;
    let first = non_reading_peer("127.0.1.60", daemon.peer_addr, id).await;
    let second = non_reading_peer("127.0.1.61", daemon.peer_addr, id).await;
    let uploads = daemon.daemon.shared().uploads.clone();
    eventually("2 uploads running", Duration::from_secs(10), || {
        uploads.active() == 2
    })
    .await;
    let busy = raw_exchange(
        None,
        daemon.peer_addr,
        &format!("GET /content/{id} HTTP/1.1\r\nHost: peer\r\nRange: bytes=0-99\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(busy.status, 503);
    assert_eq!(busy.body, b"too many uploads\n");
    assert!(busy.head.to_ascii_lowercase().contains("retry-after: 5"));
    // The two peers hang up: their slots come back and the next request is served.
    drop((first, second));
    eventually("slots released", Duration::from_secs(10), || {
        uploads.active() == 0
    })
    .await;
    let (status, body) = get_piece_range(daemon.peer_addr, id, 0..100).await;
    assert_eq!(status, 206);
    assert_eq!(body, content[..100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connection_that_never_finishes_its_request_head_is_closed() {
    let (origin, url, _) = origin_with_content(78).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.daemon.peer_header_timeout = Duration::from_secs(1);
    })
    .await;
    daemon.download(&url).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(daemon.peer_addr)
        .await
        .unwrap();
    let mut partial = tokio::net::TcpStream::connect(daemon.peer_addr)
        .await
        .unwrap();
    partial
        .write_all(b"GET /content/00 HTTP/1.1\r\nHost: peer\r\nX-Slow: ")
        .await
        .unwrap();
    for stream in [&mut silent, &mut partial] {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the daemon closes the connection")
            .ok();
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 2"));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_hangs_up_leaves_the_daemon_to_finish_and_cache_the_download() {
    let (origin, url, content) = origin_with_content(79).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.max_download_bandwidth = "4MiB".into();
    })
    .await;
    let socket = daemon.control_socket.clone();
    let hand_off = serde_json::json!({ "url": url }).to_string();
    let client =
        tokio::spawn(async move { control_post(&socket, "application/json", &hand_off).await });
    let store = daemon.daemon.shared().store.clone();
    eventually("the download started", Duration::from_secs(10), || {
        store
            .entries()
            .first()
            .is_some_and(|(_, entry)| entry.held.iter().any(|held| *held))
    })
    .await;
    // The CLI is interrupted (Ctrl-C): its connection closes mid-download.
    client.abort();
    let _ = client.await;
    eventually("the download completed", Duration::from_secs(30), || {
        store
            .entries()
            .first()
            .is_some_and(|(_, entry)| entry.complete)
    })
    .await;
    let (id, _) = store.entries()[0];
    assert_eq!(file_digest(&store.data_path(id)), sha256_hex(&content));
    assert_eq!(counter(&daemon, "FilesDownloaded"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reading_under_the_minimum_rate_is_dropped() {
    let (_origin, _node, daemon, id, content) = daemon_with_big_content(80, |config| {
        // 64 KiB/s over 2 s of waiting; no send timeout before that.
        config.daemon.upload_min_bytes_per_sec = 64 * 1024;
        config.daemon.upload_min_rate_window = Duration::from_secs(2);
        config.daemon.upload_send_timeout = Duration::from_secs(60);
    })
    .await;
    let mut trickler = non_reading_peer("127.0.1.70", daemon.peer_addr, id).await;
    let started = Instant::now();
    // 1 KiB every 50 ms: about 20 KiB/s, a third of the floor, but never silent.
    let mut received = 0_usize;
    let mut buffer = [0_u8; 1024];
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still served after {received} bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        match trickler.read(&mut buffer).await {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(read) => received += read,
        }
    };
    assert_eq!(counter(&daemon, "SlowPeersDropped"), 1);
    assert!(received < content.len() / 4, "{received}");
    eprintln!("dropped after {closed:?} and {received} bytes");
    let uploads = daemon.daemon.shared().uploads.clone();
    eventually("the slot released", Duration::from_secs(10), || {
        uploads.active() == 0
    })
    .await;
}
