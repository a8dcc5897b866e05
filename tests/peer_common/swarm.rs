//! The swarm the peer scenarios share: a cache node with 256 KiB pieces in front of a mock origin
//! on [`ORIGIN_IP`], daemons that downloaded its content, the tracker's view of them, and raw
//! requests to a daemon's peer port.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use outpost_testkit::{eventually_async, pattern_bytes, sha256_hex, MockOrigin};
use peer_client::sources::node_api::{ContentId, NodeApi, PeerEntry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{KillableNode, TestDaemon};

pub const MIB: usize = 1024 * 1024;
/// Pieces of 256 KiB (the node's `min(peering.piece_size, slice_size)`), so an 8 MiB file has
/// 32 pieces to spread.
pub const PIECE: usize = 256 * 1024;
pub const CONTENT_LEN: usize = 8 * MIB;

/// The mock origin's address. Not 127.0.0.1, where the node listens: the node must be reached
/// by a name that is not an allowed origin, or its peering API would be taken for content.
pub const ORIGIN_IP: &str = "127.0.0.10";

/// A node with 256 KiB pieces that fetches from origins on [`ORIGIN_IP`].
pub fn start_node(origin: &MockOrigin) -> KillableNode {
    start_node_with(origin, |_| {})
}

/// Like [`start_node`], with `tweak` applied to the node's config.
pub fn start_node_with(
    origin: &MockOrigin,
    tweak: impl FnOnce(&mut cache_node::config::Config),
) -> KillableNode {
    KillableNode::start_with(&origin.base_url(), &std::env::temp_dir(), |config| {
        config.peering.piece_size = "256KiB".into();
        for allowed in &mut config.origin {
            if allowed.host == "127.0.0.1" {
                allowed.host = ORIGIN_IP.into();
            }
        }
        tweak(config);
    })
}

/// The tracker's answer for `content` as a mode-3 client on 127.0.0.250 sees it.
pub async fn tracked_peers(node: SocketAddr, content: ContentId) -> Vec<PeerEntry> {
    let api = NodeApi::new(
        &peer_client::config::CacheHost::parse(&node.to_string()).unwrap(),
        Some("127.0.0.250".parse().unwrap()),
        Duration::from_secs(2),
    );
    api.peers(content, peer_client::config::DownloadMode::Internet, "", 32)
        .await
        .unwrap_or_default()
}

/// Waits (bounded) until the tracker lists `count` complete peers of `content`.
pub async fn until_complete_peers(node: SocketAddr, content: ContentId, count: usize) {
    eventually_async(
        &format!("{count} complete peers to be announced"),
        Duration::from_secs(10),
        async || {
            let peers = tracked_peers(node, content).await;
            if peers.iter().filter(|peer| peer.complete).count() >= count {
                Ok(())
            } else {
                Err(format!("{peers:?}"))
            }
        },
    )
    .await;
}

/// An origin with one 8 MiB file; returns its URL and digest.
pub async fn origin_with_content(seed: u64) -> (MockOrigin, String, Bytes) {
    let origin = MockOrigin::start_on(ORIGIN_IP).await;
    let content = pattern_bytes(CONTENT_LEN, seed);
    origin.put("/files/big.bin", content.clone());
    let url = format!("{}/files/big.bin", origin.base_url());
    (origin, url, content)
}

/// Two daemons that downloaded `url` through the node and are announced as complete peers.
pub async fn two_complete_peers(
    node: &KillableNode,
    url: &str,
) -> (TestDaemon, TestDaemon, ContentId) {
    let first = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let second = TestDaemon::start("127.0.0.3", node.addr, |_| {}).await;
    let done = first.download(url).await;
    second.download(url).await;
    let content = done.content_id.expect("the content has a manifest");
    until_complete_peers(node.addr, content, 2).await;
    (first, second, content)
}

pub fn file_digest(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

/// A raw HTTP/1.1 answer.
pub struct RawAnswer {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: Vec<u8>,
}

/// Connects to `addr` (from `source`, when given), sends `request` as it is, and reads the answer
/// to the end (bounded to 10 s).
pub async fn raw_exchange(source: Option<IpAddr>, addr: SocketAddr, request: &str) -> RawAnswer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).unwrap();
    }
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("the answer ends within 10 s")
        .unwrap();
    let head_end = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or(answer.len());
    let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer.get(head_end + 4..).unwrap_or_default().to_vec();
    RawAnswer { status, head, body }
}

/// Sends one raw request line (no client-side normalisation) and returns status and body.
pub async fn raw_get(addr: SocketAddr, target: &str, extra: &str) -> (u16, Vec<u8>) {
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: peer\r\n{extra}Connection: close\r\n\r\n");
    let answer = raw_exchange(None, addr, &request).await;
    (answer.status, answer.body)
}

/// GETs `range` of `content` from a peer, returning the status and the body.
pub async fn get_piece_range(
    peer: SocketAddr,
    content: ContentId,
    range: std::ops::Range<usize>,
) -> (u16, Vec<u8>) {
    raw_get(
        peer,
        &format!("/content/{content}"),
        &format!("Range: bytes={}-{}\r\n", range.start, range.end - 1),
    )
    .await
}

/// The `peer-client` binary with `arguments`, talking to the daemon on `control_socket`.
pub fn cli(control_socket: &Path, arguments: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_peer-client"));
    command
        .args(arguments)
        .env("PEER_CLIENT__DAEMON__CONTROL_SOCKET", control_socket)
        .env("PEER_CLIENT__STORAGE__FSYNC", "false")
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null());
    command
}

/// Runs `command` to its end: whether it succeeded, its stdout, and its stderr as text.
pub async fn run(mut command: tokio::process::Command) -> (bool, Vec<u8>, String) {
    let output = command.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), output.stdout, stderr)
}

/// Runs `command`, which must succeed; its stdout.
pub async fn run_ok(command: tokio::process::Command) -> Vec<u8> {
    let (success, stdout, stderr) = run(command).await;
    assert!(success, "{stderr}");
    stdout
}

/// Starts the download of `url` on `daemon` in a task; its events come through the receiver,
/// which closes when the download ends.
pub fn spawn_download(
    daemon: &TestDaemon,
    url: &str,
) -> (
    tokio::task::JoinHandle<
        Result<peer_client::daemon::service::DaemonDownload, peer_client::DownloadError>,
    >,
    tokio::sync::mpsc::UnboundedReceiver<peer_client::Event>,
) {
    let (events, received) = tokio::sync::mpsc::unbounded_channel();
    let daemon = daemon.daemon.clone();
    let url = url.to_owned();
    let download = tokio::spawn(async move { daemon.download(&url, None, Some(events)).await });
    (download, received)
}

/// Kills `node` on the blocking pool (killing waits for its thread) and hands it back.
pub fn kill_in_background(mut node: KillableNode) -> tokio::task::JoinHandle<KillableNode> {
    tokio::task::spawn_blocking(move || {
        node.kill();
        node
    })
}
