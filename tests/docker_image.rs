//! The shipped container image, with a real Docker engine: build the runtime image without
//! pulling anything (`docker/Dockerfile.prebuilt` around this build's binary), run it with
//! `--network host` against a mock origin on loopback, and check what an admin relies on: the
//! health check turns healthy, ranges come back right, `/stats` answers, the cache survives
//! `docker restart` (a hit, no origin traffic), and `docker stop` ends cleanly within the grace
//! period. Then the same image and cache under a seccomp profile that blocks io_uring (as Docker
//! 25's default does): the node falls back to the portable backend, says so, and still hits.
//!
//! Needs a running Docker engine (`.ci/run` installs Debian's docker.io and starts dockerd).
//! Without one the test fails when `OUTPOST_REQUIRE_DOCKER=1` (always set in CI, whatever user
//! it runs as), and otherwise prints a loud SKIPPED line and passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use outpost_testkit::{eventually_async, eventually_every, pattern_bytes, sha256_hex, MockOrigin};

fn docker(arguments: &[&str]) -> Output {
    Command::new("docker")
        .args(arguments)
        .output()
        .expect("the docker client runs")
}

/// Runs a docker command that must succeed and returns its trimmed standard output.
fn docker_ok(arguments: &[&str]) -> String {
    let output = docker(arguments);
    assert!(
        output.status.success(),
        "docker {}: {}{}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn engine_available() -> bool {
    let running = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    if !running {
        assert!(
            std::env::var("OUTPOST_REQUIRE_DOCKER").as_deref() != Ok("1"),
            "a Docker engine is required (OUTPOST_REQUIRE_DOCKER=1) but `docker info` fails"
        );
        eprintln!(
            "\n*** SKIPPED: no Docker engine is running, so the container test did not run. \
             Set OUTPOST_REQUIRE_DOCKER=1 to make this a failure. ***\n"
        );
    }
    running
}

/// Removes what the test created, however it ends.
struct Cleanup {
    container: String,
    volume: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        if !self.volume.is_empty() {
            let _ = docker(&["volume", "rm", "-f", &self.volume]);
        }
        if !self.image.is_empty() {
            let _ = docker(&["rmi", "-f", &self.image]);
        }
    }
}

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the runtime image around this build's cache-node binary.
fn build_image(tag: &str) {
    let context = tempfile::tempdir().unwrap();
    let status = Command::new("sh")
        .arg(repository_root().join("docker/make-rootfs.sh"))
        .arg(env!("CARGO_BIN_EXE_cache-node"))
        .arg(context.path())
        .status()
        .unwrap();
    assert!(status.success(), "make-rootfs.sh failed");
    let dockerfile = repository_root().join("docker/Dockerfile.prebuilt");
    let output = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag, "-f"])
        .arg(&dockerfile)
        .arg(context.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn health(container: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.Health.Status}}", container])
}

/// A container's health status short of healthy; displayed (with the container's last log
/// lines, fetched only then) when the wait for health times out.
struct NotHealthy<'a> {
    container: &'a str,
    status: String,
}

impl std::fmt::Display for NotHealthy<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let logs = docker(&["logs", "--tail", "50", self.container]);
        let logs = String::from_utf8_lossy(&[logs.stdout, logs.stderr].concat()).into_owned();
        write!(formatter, "{}; logs:\n{logs}", self.status)
    }
}

async fn wait_healthy(container: &str) {
    // Each look runs `docker inspect`: four a second are plenty.
    eventually_every(
        "the container to turn healthy",
        Duration::from_secs(60),
        Duration::from_millis(250),
        async || {
            let status = health(container);
            if status == "healthy" {
                Ok(())
            } else {
                Err(NotHealthy { container, status })
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_survives_restart_and_stops_cleanly() {
    if !engine_available() {
        return;
    }
    let suffix = format!("{:08x}", rand::random::<u32>());
    let cleanup = Cleanup {
        container: format!("outpost-test-{suffix}"),
        volume: format!("outpost-test-cache-{suffix}"),
        image: format!("outpost-cache-node:test-{suffix}"),
    };
    build_image(&cleanup.image);

    let origin = MockOrigin::start().await;
    let content = pattern_bytes(3 * 1024 * 1024 + 123, 61);
    let path = "/filestreamingservice/files/docker/update.cab";
    origin.put(path, content.clone());

    // The config an admin would mount; the storage path is the image's volume.
    let work = tempfile::tempdir().unwrap();
    let mut config = test_config(
        Path::new("/var/cache/outpost"),
        &origin.base_url(),
        1024 * 1024,
        "1GiB",
    );
    let port = free_port();
    let admin_port = free_port();
    config.server.listen = format!("127.0.0.1:{port}");
    config.admin.listen = format!("127.0.0.1:{admin_port}");
    config.storage.fsync = true;
    // The container chooses its backend itself, whatever backend the rest of the suite runs on.
    config.storage.io_backend = "auto".into();
    config.server.shutdown_grace = Duration::from_secs(5);
    let config_path = work.path().join("cache-node.toml");
    std::fs::write(&config_path, config_to_toml(&config)).unwrap();
    let mount = format!("{}:/etc/outpost/cache-node.toml:ro", config_path.display());
    let volume = format!("{}:/var/cache/outpost", cleanup.volume);
    // The first run allows io_uring the way docs/operations.md tells an admin to (a seccomp
    // profile that permits its three calls), so on a machine that has io_uring the container
    // must use it; the second run, below, blocks it.
    let allowing = work.path().join("seccomp-io-uring.json");
    std::fs::write(&allowing, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &cleanup.container,
        "--network",
        "host",
        "--health-interval",
        "1s",
        "--security-opt",
        &format!("seccomp={}", allowing.display()),
        "-v",
        &mount,
        "-v",
        &volume,
        // An environment override wins over the mounted file (which says 1GiB).
        "-e",
        "CACHE_NODE__STORAGE__MAX_SIZE=2GiB",
        &cleanup.image,
    ]);
    wait_healthy(&cleanup.container).await;
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.Config.User}}", &cleanup.container]),
        "10001:10001",
        "the image runs as its service user, not root"
    );

    let node_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin_addr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let url = mcc_url(node_addr, path);
    let whole = get(&url, &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&content));
    let ranged = get(&url, &[("range", "bytes=1000000-2500000")]).await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.bytes(), &content[1_000_000..=2_500_000]);
    let stats = admin_stats(admin_addr).await;
    assert_eq!(stats["cache_max_bytes"].as_u64(), Some(2 << 30), "{stats}");
    eprintln!("disk backend in the container: {}", stats["disk_backend"]);
    if std::env::var("OUTPOST_REQUIRE_IO_URING").as_deref() == Ok("1") {
        assert_eq!(
            stats["disk_backend"], "io_uring",
            "with io_uring allowed, the container must use it on this machine: {stats}"
        );
    } else {
        assert!(
            ["io_uring", "portable"].contains(&stats["disk_backend"].as_str().unwrap()),
            "{stats}"
        );
    }
    let logs = docker(&["logs", &cleanup.container]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(
        logs.contains("disk backend"),
        "the log names the backend:\n{logs}"
    );

    // Every slice is on disk before the restart: wait for the fill to persist them.
    eventually_async(
        "the slices to be stored",
        Duration::from_secs(20),
        async || {
            admin_stats(admin_addr).await["slices_stored"]
                .as_u64()
                .unwrap()
                >= 4
        },
    )
    .await;
    let origin_requests = origin.request_count();
    docker_ok(&["restart", "-t", "10", &cleanup.container]);
    wait_healthy(&cleanup.container).await;
    let after = get(&url, &[("range", "bytes=0-3145850")]).await;
    assert_eq!(after.status, 206);
    assert_eq!(after.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(after.bytes(), &content[..=3_145_850]);
    assert_eq!(
        origin.request_count(),
        origin_requests,
        "after docker restart the cache answered without the origin"
    );

    let started = Instant::now();
    docker_ok(&["stop", "-t", "20", &cleanup.container]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "docker stop took {took:?}; the node should exit within its 5 s grace"
    );
    assert_eq!(
        docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", &cleanup.container]),
        "0",
        "SIGTERM ends the node cleanly"
    );

    // Docker 25 and later block io_uring in their default seccomp profile. A profile that does
    // the same must leave the node on the portable backend, saying why, with the same cache.
    let profile = work.path().join("seccomp-no-io-uring.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["io_uring_setup","io_uring_enter","io_uring_register"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    let blocked = format!("{}-blocked", cleanup.container);
    let blocked_cleanup = Cleanup {
        container: blocked.clone(),
        volume: String::new(),
        image: String::new(),
    };
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &blocked,
        "--network",
        "host",
        "--health-interval",
        "1s",
        "--security-opt",
        &format!("seccomp={}", profile.display()),
        "-v",
        &mount,
        "-v",
        &volume,
        &cleanup.image,
    ]);
    wait_healthy(&blocked).await;
    let stats = admin_stats(admin_addr).await;
    assert_eq!(stats["disk_backend"], "portable", "{stats}");
    let logs = docker(&["logs", &blocked]);
    let logs = String::from_utf8_lossy(&[logs.stdout, logs.stderr].concat()).into_owned();
    assert!(
        logs.contains("io_uring is unavailable"),
        "the log says why the backend is portable:\n{logs}"
    );
    let portable_hit = get(&url, &[("range", "bytes=5-2000000")]).await;
    assert_eq!(portable_hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(portable_hit.bytes(), &content[5..=2_000_000]);
    assert_eq!(origin.request_count(), origin_requests);
    docker_ok(&["stop", "-t", "20", &blocked]);
    // The containers go before the volume they use.
    drop(blocked_cleanup);
    drop(cleanup);
}
