//! Shared helpers for the cache-node end-to-end scenarios: start a real node (in this process or
//! as a child process) on `127.0.0.1:0` in front of a mock origin, and fetch through it.

#![allow(dead_code)]

pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cache_node::config::{Config, OriginConfig, ValidConfig};
use cache_node::node::Node;
use outpost_testkit::{eventually, eventually_async, MockOrigin};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The origin host name the tests use in MCC URLs; the node maps it to the mock origin.
pub const ORIGIN_HOST: &str = "dl.delivery.mp.microsoft.com";

/// The slice size most scenarios use: the smallest allowed, so small objects span many slices.
pub const TEST_SLICE: u64 = 64 * 1024;

/// A configuration for a node in `storage_dir` that sends `ORIGIN_HOST` (and its subdomains) to
/// `origin_base`.
pub fn test_config(
    storage_dir: &Path,
    origin_base: &str,
    slice_len: u64,
    max_size: &str,
) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.admin.listen = "127.0.0.1:0".into();
    config.admin.token = "test-token".into();
    config.storage.path = storage_dir.to_path_buf();
    config.storage.max_size = max_size.into();
    config.storage.slice_size = format!("{}KiB", slice_len / 1024);
    config.storage.fsync = false;
    // CI runs the whole suite once per backend: OUTPOST_TEST_IO_BACKEND=portable for the second.
    config.storage.io_backend = test_io_backend();
    config.upstream.idle_read_timeout = Duration::from_secs(5);
    config.upstream.first_byte_timeout = Duration::from_secs(5);
    config.server.shutdown_grace = Duration::from_secs(2);
    // Two workers, so every scenario crosses threads: a fill started on one worker feeds clients
    // on the other.
    config.server.workers = 2;
    config.origin = vec![
        OriginConfig {
            host: ORIGIN_HOST.into(),
            upstream: Some(origin_base.into()),
            ..Default::default()
        },
        OriginConfig {
            host: format!("*.{ORIGIN_HOST}"),
            upstream: Some(origin_base.into()),
            ..Default::default()
        },
    ];
    config
}

/// The `storage.io_backend` the scenarios run with (`auto` unless the environment says).
pub fn test_io_backend() -> String {
    std::env::var("OUTPOST_TEST_IO_BACKEND").unwrap_or_else(|_| "auto".to_owned())
}

/// The `disk_backend` a node started with [`test_config`] should report: `portable` when asked
/// for, `io_uring` where the machine must have it (`OUTPOST_REQUIRE_IO_URING=1`, as in CI), and
/// otherwise whatever the probe found on this machine.
pub fn expected_disk_backend(reported: &str) -> &'static str {
    if test_io_backend() == "portable" {
        "portable"
    } else if std::env::var("OUTPOST_REQUIRE_IO_URING").as_deref() == Ok("1")
        || reported == "io_uring"
    {
        "io_uring"
    } else {
        "portable"
    }
}

/// The usual node's configuration: storage in `storage_dir`, `ORIGIN_HOST` sent to
/// `origin_base`, the test slice size and room for 1 GiB.
pub fn usual_config(storage_dir: &Path, origin_base: &str) -> Config {
    test_config(storage_dir, origin_base, TEST_SLICE, "1GiB")
}

/// The usual scene: a mock origin and a node in front of it with [`usual_config`]. The storage
/// directory lives as long as the returned guard.
pub async fn origin_and_node() -> (MockOrigin, tempfile::TempDir, TestNode) {
    origin_and_node_configured(|storage, origin| usual_config(storage, &origin.base_url())).await
}

/// A mock origin and a node in front of it whose configuration `configure` makes from the
/// storage directory and the origin (for scenes that are not the usual one).
pub async fn origin_and_node_configured(
    configure: impl FnOnce(&Path, &MockOrigin) -> Config,
) -> (MockOrigin, tempfile::TempDir, TestNode) {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(configure(storage.path(), &origin)).await;
    (origin, storage, node)
}

/// The counter `name` of a `/stats` document.
pub fn stat(stats: &serde_json::Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing from {stats}"))
}

/// A well-behaved origin object whose answers carry `headers` besides the usual ones
/// (`Cache-Control`, `Date`...).
pub fn with_headers(headers: &[(&'static str, &str)]) -> outpost_testkit::Behaviour {
    outpost_testkit::Behaviour {
        headers: headers
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect(),
        ..outpost_testkit::Behaviour::default()
    }
}

/// A node running inside the test process.
pub struct TestNode {
    pub addr: SocketAddr,
    /// The TLS listener's address, when the config has `[tls]`.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestNode {
    /// Starts a node with `config` (listen addresses are ignored: both bind 127.0.0.1:0).
    pub async fn start(config: Config) -> TestNode {
        let valid: ValidConfig = config.validate().expect("test config is valid");
        let node = Node::open(&valid).expect("store opens");
        Self::start_node(node, &valid).await
    }

    /// Starts an already opened node (for example one with a fault-injecting storage backend).
    pub async fn start_node(node: Arc<Node>, valid: &ValidConfig) -> TestNode {
        let client_listeners = cache_node::server::bind_client_listeners(
            "127.0.0.1:0".parse().unwrap(),
            valid.workers,
        )
        .unwrap();
        Self::start_on(node, valid, client_listeners).await
    }

    /// Starts an already opened node on client listeners bound beforehand (for a config that
    /// must name the node's own port).
    pub async fn start_on(
        node: Arc<Node>,
        valid: &ValidConfig,
        client_listeners: Vec<std::net::TcpListener>,
    ) -> TestNode {
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = client_listeners[0].local_addr().unwrap();
        let tls_listeners = match &valid.tls {
            Some(_) => cache_node::server::bind_client_listeners(
                "127.0.0.1:0".parse().unwrap(),
                valid.workers,
            )
            .unwrap(),
            None => Vec::new(),
        };
        let tls_addr = tls_listeners.first().map(|l| l.local_addr().unwrap());
        let client_listeners = cache_node::server::ClientListeners {
            plain: client_listeners,
            tls: tls_listeners,
        };
        let admin_addr = admin_listener.local_addr().unwrap();
        let (shutdown_sender, shutdown_receiver) = oneshot::channel::<()>();
        let task = tokio::spawn(cache_node::server::run_node(
            node.clone(),
            client_listeners,
            admin_listener,
            async move {
                let _ = shutdown_receiver.await;
            },
            valid.raw.server.shutdown_grace,
        ));
        TestNode {
            addr,
            tls_addr,
            admin_addr,
            node,
            shutdown: Some(shutdown_sender),
            task: Some(task),
        }
    }

    /// The MCC-form URL of `path` on this node.
    pub fn mcc_url(&self, path: &str) -> String {
        mcc_url(self.addr, path)
    }

    /// Stops the node and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Waits (bounded) until no fill is in flight, so every slice fetched so far is on disk and
    /// the next read of it is a hit.
    pub async fn settle(&self) {
        eventually("the fills to settle", Duration::from_secs(20), || {
            self.node.index.inflight_slice_count() == 0
        })
        .await;
    }

    /// The `/stats` document.
    pub async fn stats(&self) -> serde_json::Value {
        admin_stats(self.admin_addr).await
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("http://{}/metrics", self.admin_addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The MCC-form URL of `path` on a node at `addr`.
pub fn mcc_url(addr: SocketAddr, path: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("http://{addr}{path}{separator}cacheHostOrigin={ORIGIN_HOST}")
}

/// Fetches `/stats` from an admin listener.
pub async fn admin_stats(admin_addr: SocketAddr) -> serde_json::Value {
    let text = reqwest::get(format!("http://{admin_addr}/stats"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A plain HTTP client with no connection reuse surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// What a GET returned.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    /// The body, or the error that cut it short.
    pub body: Result<bytes::Bytes, String>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }

    pub fn bytes(&self) -> &[u8] {
        self.body.as_ref().expect("body arrived complete")
    }
}

/// GETs `url` with extra headers, collecting the whole body.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Fetched {
    request(reqwest::Method::GET, url, headers).await
}

/// Sends `method` to `url` with extra headers, collecting the whole body.
pub async fn request(method: reqwest::Method, url: &str, headers: &[(&str, &str)]) -> Fetched {
    let mut builder = client().request(method, url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = builder.send().await.expect("request reaches the node");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|error| format!("{error:?}"));
    Fetched {
        status,
        headers,
        body,
    }
}

/// True when the command-line tool `name` is installed. When it is not, the caller skips its
/// checks, unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI), where a missing tool is a failure.
pub fn tool_available(name: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("OUTPOST_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{name} is required (OUTPOST_REQUIRE_TOOLS=1) but not installed"
        );
        eprintln!("{name} is not installed; skipping its checks");
    }
    found
}

/// A node running as a child process (for kill -9 scenarios).
pub struct NodeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// Picks a free loopback port. The tiny window between closing and reuse is acceptable for a
/// child process that must be told its port on the command line.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NodeProcess {
    /// Starts the real `cache-node` binary with `config` written to a file in `work_dir`.
    pub fn spawn(binary: &Path, work_dir: &Path, config: Config) -> NodeProcess {
        Self::spawn_with_env(binary, work_dir, config, &[])
    }

    /// Like [`NodeProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        binary: &Path,
        work_dir: &Path,
        mut config: Config,
        env: &[(&str, &str)],
    ) -> NodeProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        config.server.listen = addr.to_string();
        config.admin.listen = admin_addr.to_string();
        let config_path: PathBuf = work_dir.join("node.toml");
        std::fs::write(&config_path, config_to_toml(&config)).unwrap();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cache-node binary starts");
        NodeProcess {
            child,
            addr,
            admin_addr,
        }
    }

    /// Waits until the admin listener answers `/health`.
    pub async fn wait_healthy(&mut self) {
        let health = format!("http://{}/health", self.admin_addr);
        eventually_async(
            "the node to become healthy",
            Duration::from_secs(20),
            async || {
                if let Ok(response) = reqwest::get(&health).await {
                    if response.status().is_success() {
                        return true;
                    }
                }
                assert!(
                    self.child.try_wait().unwrap().is_none(),
                    "cache-node exited during start-up"
                );
                false
            },
        )
        .await;
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Serialises the whole config to TOML, every section and per-origin setting included, so a
/// spawned node runs with exactly the config the test built.
pub fn config_to_toml(config: &Config) -> String {
    toml::to_string(config).expect("every config serialises to TOML")
}

/// The labels of `/stats` `origins`, in their order.
pub fn origin_labels(stats: &serde_json::Value) -> Vec<&str> {
    stats["origins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|origin| origin["label"].as_str().unwrap())
        .collect()
}

/// The `/stats` `origins` entry labelled `label`.
pub fn origin_figures<'a>(stats: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    stats["origins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|origin| origin["label"] == label)
        .unwrap_or_else(|| panic!("no origin {label:?} in {stats}"))
}
