//! Shared helpers for the peer-client end-to-end scenarios: a real cache node that can be killed
//! (it runs on a tokio runtime of its own, and killing it drops that runtime with every listener
//! and connection, as a dying process would), peer-client configurations for tests, and a way to
//! run a download while collecting its events.

#![allow(dead_code)]

pub mod swarm;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cache_node::config::OriginConfig;
use cache_node::node::Node;
use peer_client::daemon::control::ControlListener;
use peer_client::daemon::service::{Daemon, DaemonDownload};
use peer_client::{Config, DownloadError, DownloadRequest, Downloader, Event, Status};
use tokio::sync::mpsc;

use crate::common::{admin_stats, test_config};

/// The slice size of the nodes in these scenarios: the node's default.
pub const NODE_SLICE: u64 = 1024 * 1024;

/// A cache node on its own runtime thread, allowed to fetch from any origin on 127.0.0.1 (the
/// mock origins the tests start) and from the test origin host of `tests/common`.
pub struct KillableNode {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _storage: tempfile::TempDir,
}

impl KillableNode {
    /// Starts a node whose `[[origin]]` list allows `127.0.0.1` (on `origin_base`'s port,
    /// fetched directly) and `tests/common`'s origin host (mapped to `origin_base`).
    pub fn start(origin_base: &str) -> KillableNode {
        Self::start_in(origin_base, &std::env::temp_dir())
    }

    /// Like [`KillableNode::start`], with the cache stored under `parent` (benchmarks put it on
    /// the same disk as the files they download).
    pub fn start_in(origin_base: &str, parent: &Path) -> KillableNode {
        Self::start_with(origin_base, parent, |_| {})
    }

    /// Like [`KillableNode::start_in`], with `tweak` applied to the node's config (peering
    /// settings, for example).
    pub fn start_with(
        origin_base: &str,
        parent: &Path,
        tweak: impl FnOnce(&mut cache_node::config::Config),
    ) -> KillableNode {
        let storage = tempfile::tempdir_in(parent).unwrap();
        let mut config = test_config(storage.path(), origin_base, NODE_SLICE, "4GiB");
        // The portable backend: a killed node must leave no io_uring thread behind.
        config.storage.io_backend = "portable".into();
        // Fetched directly, so the allowlist must name the origin's port too.
        let origin_port = origin_base
            .parse::<http::Uri>()
            .ok()
            .and_then(|uri| uri.port_u16());
        config.origin.push(OriginConfig {
            host: "127.0.0.1".into(),
            upstream: None,
            ports: origin_port.into_iter().collect(),
            ..Default::default()
        });
        tweak(&mut config);
        let valid = config.validate().expect("test node config is valid");
        let (addresses_sender, addresses_receiver) = std::sync::mpsc::channel();
        let (stop_sender, stop_receiver) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let node = Node::open(&valid).expect("store opens");
                let client_listeners = cache_node::server::bind_client_listeners(
                    "127.0.0.1:0".parse().unwrap(),
                    valid.workers,
                )
                .unwrap();
                let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addresses_sender
                    .send((
                        client_listeners[0].local_addr().unwrap(),
                        admin_listener.local_addr().unwrap(),
                    ))
                    .unwrap();
                // No grace: at the stop signal the workers drop their runtimes with every
                // connection and fill in them, as a dying process would.
                cache_node::server::run_node(
                    node,
                    client_listeners,
                    admin_listener,
                    async move {
                        let _ = stop_receiver.await;
                    },
                    Duration::ZERO,
                )
                .await;
            });
            // Drops every task (accept loops, connections, fills) without waiting: the sockets
            // close as they would when the process dies.
            runtime.shutdown_background();
        });
        let (addr, admin_addr) = addresses_receiver
            .recv_timeout(Duration::from_secs(20))
            .expect("node starts");
        KillableNode {
            addr,
            admin_addr,
            stop: Some(stop_sender),
            thread: Some(thread),
            _storage: storage,
        }
    }

    /// Kills the node: every listener and connection closes at once.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }

    /// The node's `/stats` document.
    pub async fn stats(&self) -> serde_json::Value {
        admin_stats(self.admin_addr).await
    }

    /// Client requests the node has answered so far.
    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap()
    }
}

impl Drop for KillableNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A peer-client configuration with `cache_hosts`, no fsync (tests need not survive power cuts)
/// and otherwise the shipped defaults.
pub fn peer_config(cache_hosts: &[SocketAddr]) -> Config {
    let mut config = Config {
        cache_hosts: cache_hosts.iter().map(ToString::to_string).collect(),
        ..Config::default()
    };
    config.storage.fsync = false;
    config
}

/// A downloader for `config`.
pub fn downloader(config: Config) -> Downloader {
    Downloader::new(config.validate().expect("test peer config is valid"))
}

/// What a download returned and the events it sent.
pub struct Finished {
    pub result: Result<Status, DownloadError>,
    pub events: Vec<Event>,
    pub elapsed: Duration,
}

impl Finished {
    /// The status of a download that must have succeeded.
    pub fn status(&self) -> &Status {
        match &self.result {
            Ok(status) => status,
            Err(error) => panic!("download failed: {error}"),
        }
    }
}

/// Runs `request` on `downloader`, collecting events, bounded to a minute.
pub async fn run_download(downloader: &Downloader, mut request: DownloadRequest) -> Finished {
    let (sender, mut receiver) = mpsc::unbounded_channel();
    request.events = Some(sender);
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), downloader.download(request))
        .await
        .expect("the download ends within a minute");
    let elapsed = started.elapsed();
    let mut events = Vec::new();
    while let Ok(event) = receiver.try_recv() {
        events.push(event);
    }
    Finished {
        result,
        events,
        elapsed,
    }
}

/// Downloads `url` into `directory/name`.
pub async fn download_to(
    downloader: &Downloader,
    url: &str,
    directory: &Path,
    name: &str,
) -> Finished {
    run_download(downloader, DownloadRequest::new(url, directory.join(name))).await
}

/// The SHA-256 of a file, in hex.
pub fn file_sha256(path: &Path) -> String {
    outpost_testkit::sha256_hex(&std::fs::read(path).unwrap())
}

/// Where daemons keep their caches: `OUTPOST_SCRATCH_DIR` (benchmarks point it at a real disk),
/// else the system's temporary directory.
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("OUTPOST_SCRATCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A daemon on `ip`, with its own cache directory, running until dropped.
pub struct TestDaemon {
    pub daemon: Daemon,
    pub peer_addr: SocketAddr,
    /// The control API's Unix socket (in the cache directory).
    pub control_socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub cache_dir: tempfile::TempDir,
}

/// A daemon config: mode 1 through `node`, files from 1 MiB peered, no fsync, the control
/// socket in the cache directory, and the test origins on 127.0.0.x allowed.
pub fn daemon_config(node: SocketAddr, cache_dir: &Path) -> Config {
    let mut config = peer_config(&[node]);
    config.download_mode = 1;
    config.daemon.min_file_size_to_cache = "1MiB".into();
    config.daemon.cache_dir = cache_dir.to_path_buf();
    config.daemon.control_socket = cache_dir.join("control.sock");
    config.daemon.allow_private_urls = true;
    config
}

impl TestDaemon {
    pub async fn start(ip: &str, node: SocketAddr, tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        let cache_dir = tempfile::tempdir_in(scratch_dir()).unwrap();
        Self::start_in(ip, node, cache_dir, tweak).await
    }

    pub async fn start_in(
        ip: &str,
        node: SocketAddr,
        cache_dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestDaemon {
        Self::start_with_control(ip, node, cache_dir, tweak, |control| control).await
    }

    /// Like [`TestDaemon::start_in`], with `control` applied to the bound control listener
    /// (a test makes the daemon believe it runs as another user).
    pub async fn start_with_control(
        ip: &str,
        node: SocketAddr,
        cache_dir: tempfile::TempDir,
        tweak: impl FnOnce(&mut Config),
        control: impl FnOnce(ControlListener) -> ControlListener,
    ) -> TestDaemon {
        let mut config = daemon_config(node, cache_dir.path());
        tweak(&mut config);
        let peers = tokio::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
            .await
            .unwrap();
        let control_socket = config.daemon.control_socket.clone();
        let listener = control(ControlListener::bind(&control_socket).unwrap());
        let peer_addr = peers.local_addr().unwrap();
        let daemon = Daemon::new(config.validate().unwrap(), peer_addr).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon.clone().run(peers, listener, async move {
            let _ = stopped.await;
        }));
        TestDaemon {
            daemon,
            peer_addr,
            control_socket,
            stop: Some(stop),
            task: Some(task),
            cache_dir,
        }
    }

    /// Stops the daemon and hands back its cache directory (for a restart).
    pub async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        let directory = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.cache_dir, directory)
    }

    pub async fn download(&self, url: &str) -> DaemonDownload {
        tokio::time::timeout(
            Duration::from_secs(60),
            self.daemon.download(url, None, None),
        )
        .await
        .expect("the download ends within a minute")
        .expect("the download succeeds")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
