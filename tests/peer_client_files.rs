//! peer-client end-to-end: what ends up on disk. Resume after the client is killed with
//! SIGKILL (the real binary, with `--json`), repair of a file that fails `--sha256` because the
//! cache served corrupt bytes, piece-hash checks, and the bandwidth cap.

#[path = "common/mod.rs"]
mod common;
#[path = "peer_common/mod.rs"]
mod peer_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_testkit::{
    eventually, eventually_async, pattern_bytes, sha256_hex, Behaviour, MockOrigin,
};
use peer_client::content::integrity::{parse_sha256_hex, PieceManifest};
use peer_client::content::partial::{decode_bitmap, PartialPaths, ResumeState};
use peer_client::{DownloadError, DownloadRequest, Downloader, Event};

use peer_common::{downloader, file_sha256, peer_config, run_download, KillableNode};

const MIB: usize = 1024 * 1024;

/// Pieces recorded as done in the resume state beside `output`, if it exists yet.
fn done_pieces(output: &Path) -> usize {
    let paths = PartialPaths::beside(output);
    let Ok(text) = std::fs::read_to_string(&paths.state) else {
        return 0;
    };
    let state: ResumeState = serde_json::from_str(&text).unwrap();
    let count = state.file_len.div_ceil(state.piece_len) as usize;
    decode_bitmap(&state.done_pieces, count)
        .unwrap()
        .iter()
        .filter(|done| **done)
        .count()
}

/// Starts `request` on `client` and returns once `done_bytes` are on disk (bounded to 20 s), with
/// the running download.
async fn start_until_done(
    client: Downloader,
    mut request: DownloadRequest,
    done_bytes: u64,
) -> tokio::task::JoinHandle<Result<peer_client::Status, DownloadError>> {
    let (sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    request.events = Some(sender);
    let running = tokio::spawn(async move { client.download(request).await });
    loop {
        match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
            Ok(Some(Event::Progress(progress))) if progress.done_bytes >= done_bytes => {
                return running
            }
            Ok(Some(_)) => {}
            other => panic!("no progress: {other:?}"),
        }
    }
}

fn peer_client_command(node: &KillableNode, url: &str, output: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_peer-client"));
    command
        .args(["get", url, "-o"])
        .arg(output)
        .args(["--cache-host", &node.addr.to_string()])
        .env("PEER_CLIENT__STORAGE__FSYNC", "false")
        .env("PEER_CLIENT__STORAGE__CHECKPOINT_INTERVAL", "100ms")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    command
}

#[tokio::test]
async fn a_download_killed_with_sigkill_resumes_where_it_stopped() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(16 * MIB, 10);
    origin.put("/files/resume.bin", content.clone());
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/resume.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("resume.bin");

    // A capped first run, killed once a quarter of the pieces are recorded.
    let mut first_run = peer_client_command(&node, &url, &output)
        .args(["--max-download-bandwidth", "4MiB", "--quiet"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        "the first run to checkpoint",
        Duration::from_secs(20),
        || {
            if done_pieces(&output) >= 4 {
                return true;
            }
            assert!(
                first_run.try_wait().unwrap().is_none(),
                "the first run ended early"
            );
            false
        },
    )
    .await;
    first_run.kill().unwrap();
    first_run.wait().unwrap();
    assert!(
        !output.exists(),
        "a partial download never has the final name"
    );
    let recorded = done_pieces(&output);
    assert!(recorded < 16, "the first run finished before the kill");

    // The rerun keeps what was recorded and fetches only the rest.
    let second_run = tokio::task::spawn_blocking({
        let mut command = peer_client_command(&node, &url, &output);
        command.args(["--json", "--sha256", &sha256_hex(&content)]);
        move || command.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        second_run.status.success(),
        "{}",
        String::from_utf8_lossy(&second_run.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&second_run.stdout).unwrap();
    for key in [
        "FileSize",
        "TotalBytesDownloaded",
        "BytesFromCacheServer",
        "BytesFromPeers",
        "BytesFromHttp",
        "PercentPeerCaching",
        "DownloadDuration",
        "Status",
        "CacheHost",
        "DownloadMode",
    ] {
        assert!(status.get(key).is_some(), "{key} missing from {status}");
    }
    assert_eq!(status["Status"], "Complete");
    assert_eq!(status["FileSize"], content.len() as u64);
    assert_eq!(status["CacheHost"], node.addr.to_string());
    let resumed = status["BytesResumed"].as_u64().unwrap();
    let downloaded = status["TotalBytesDownloaded"].as_u64().unwrap();
    assert!(resumed >= (recorded * MIB) as u64, "{status}");
    assert!(
        downloaded <= content.len() as u64 - resumed + 2 * MIB as u64,
        "recorded pieces were fetched again: {status}"
    );
    assert_eq!(file_sha256(&output), sha256_hex(&content));
    let paths = PartialPaths::beside(&output);
    assert!(!paths.partial.exists() && !paths.state.exists());
}

/// A node whose copy of `/files/corrupt.bin` has 100 inverted bytes in its fourth MiB, in front
/// of an origin that serves the object correctly (under the same ETag) by now.
async fn node_with_a_corrupt_copy() -> (MockOrigin, KillableNode, Bytes, String) {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(8 * MIB, 11);
    let corrupt_range = 3 * MIB as u64 + 100..3 * MIB as u64 + 200;
    origin.put_with(
        "/files/corrupt.bin",
        content.clone(),
        Behaviour {
            corrupt_range: Some(corrupt_range),
            ..Behaviour::default()
        },
    );
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/corrupt.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let warm = run_download(
        &downloader(peer_config(&[node.addr])),
        DownloadRequest::new(url.clone(), directory.path().join("warm.bin")),
    )
    .await;
    assert_eq!(warm.status().bytes_from_http, 0);
    assert_ne!(
        file_sha256(&directory.path().join("warm.bin")),
        sha256_hex(&content)
    );
    eventually_async(
        "the node to store the object",
        Duration::from_secs(20),
        async || node.stats().await["cache_used_bytes"].as_u64().unwrap() >= content.len() as u64,
    )
    .await;
    origin.set_behaviour("/files/corrupt.bin", Behaviour::default());
    (origin, node, content, url)
}

#[tokio::test]
async fn a_sha256_mismatch_is_repaired_from_the_origin() {
    let (_origin, node, content, url) = node_with_a_corrupt_copy().await;
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("repaired.bin");
    let mut request = DownloadRequest::new(url, &output);
    request.sha256 = Some(parse_sha256_hex(&sha256_hex(&content)).unwrap());

    let finished = run_download(&downloader(peer_config(&[node.addr])), request).await;
    let status = finished.status();
    // Every piece came from the cache, so every piece is fetched again from the origin.
    assert!(
        finished.events.contains(&Event::Repairing { pieces: 8 }),
        "{:?}",
        finished.events
    );
    assert_eq!(status.bytes_from_http, content.len() as u64);
    assert!(status.bytes_from_cache_server >= content.len() as u64);
    assert_eq!(file_sha256(&output), sha256_hex(&content));
}

#[tokio::test]
async fn with_piece_hashes_only_the_bad_piece_is_fetched_elsewhere() {
    let (_origin, node, content, url) = node_with_a_corrupt_copy().await;
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("pieces.bin");
    let mut request = DownloadRequest::new(url, &output);
    request.piece_hashes = Some(Arc::new(PieceManifest::of_content(&content, MIB as u64)));

    let finished = run_download(&downloader(peer_config(&[node.addr])), request).await;
    let status = finished.status();
    assert!(
        finished.events.iter().any(|event| matches!(
            event,
            Event::SourceFailed { error, .. } if error == "piece 3 does not match its hash"
        )),
        "{:?}",
        finished.events
    );
    assert!(!finished
        .events
        .iter()
        .any(|event| matches!(event, Event::Repairing { .. })));
    assert!(status.bytes_from_http >= MIB as u64, "{status:?}");
    assert_eq!(file_sha256(&output), sha256_hex(&content));
}

#[tokio::test]
async fn the_bandwidth_cap_holds_within_fifteen_percent_across_connections() {
    let origin = MockOrigin::start().await;
    // Four seconds at the cap: the limiter's small burst and the endgame's duplicate requests
    // (counted in TotalBytesDownloaded) are a fixed few hundred KiB, which a two-second download
    // on a loaded machine could push just past 15%.
    let content = pattern_bytes(16 * MIB, 12);
    origin.put("/files/capped.bin", content.clone());
    let mut config = peer_config(&[]);
    config.max_download_bandwidth = "4MiB".into();
    config.origin.connections = 4;
    let directory = tempfile::tempdir().unwrap();
    let finished = run_download(
        &downloader(config),
        DownloadRequest::new(
            format!("{}/files/capped.bin", origin.base_url()),
            directory.path().join("capped.bin"),
        ),
    )
    .await;
    let status = finished.status();
    let rate = status.total_bytes_downloaded as f64 / status.download_duration_secs;
    let cap = 4.0 * MIB as f64;
    assert!(
        (rate - cap).abs() / cap <= 0.15,
        "measured {:.2} MiB/s against a 4 MiB/s cap",
        rate / MIB as f64
    );
    assert_eq!(
        file_sha256(&directory.path().join("capped.bin")),
        sha256_hex(&content)
    );
}

#[tokio::test]
async fn a_cancelled_download_keeps_its_pieces_and_the_next_run_resumes() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(8 * MIB, 13);
    origin.put("/files/cancel.bin", content.clone());
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/cancel.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("cancel.bin");
    let mut capped = peer_config(&[node.addr]);
    capped.max_download_bandwidth = "4MiB".into();
    let request = DownloadRequest::new(url.clone(), &output);
    let cancel = request.cancel.clone();
    // Cancel (what Ctrl-C does in the binary) once two pieces are on disk.
    let running = start_until_done(downloader(capped), request, 2 * MIB as u64).await;
    cancel.cancel();
    let error = running.await.unwrap().expect_err("cancelled");
    assert!(
        matches!(error, peer_client::DownloadError::Cancelled),
        "{error}"
    );
    assert!(error.retry_later_may_help());
    assert!(!output.exists());
    assert!(done_pieces(&output) >= 2);

    let resumed = run_download(
        &downloader(peer_config(&[node.addr])),
        DownloadRequest::new(url, &output),
    )
    .await;
    let status = resumed.status();
    assert!(status.bytes_resumed >= 2 * MIB as u64, "{status:?}");
    assert_eq!(file_sha256(&output), sha256_hex(&content));
}

/// An origin-only client (download mode 100) capped at `rate`, with fast retries.
fn origin_only(rate: &str) -> Downloader {
    let mut config = peer_config(&[]);
    config.download_mode = 100;
    config.max_download_bandwidth = rate.into();
    config.transfer.retry_initial_backoff = Duration::from_millis(50);
    downloader(config)
}

#[tokio::test]
async fn content_that_changes_mid_download_is_never_mixed_and_the_next_run_gets_the_new_version() {
    let origin = MockOrigin::start().await;
    let old = pattern_bytes(8 * MIB, 14);
    let new = pattern_bytes(8 * MIB, 15);
    origin.put("/files/moving.bin", old.clone());
    let url = format!("{}/files/moving.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("moving.bin");

    let running = start_until_done(
        origin_only("2MiB"),
        DownloadRequest::new(url.clone(), &output),
        2 * MIB as u64,
    )
    .await;
    // Same length, new bytes and a new ETag, while the rest of the file is still to come.
    origin.put("/files/moving.bin", new.clone());
    let error = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .unwrap()
        .unwrap()
        .expect_err("a file of two versions must not be completed");
    assert!(
        matches!(error, DownloadError::ContentChanged { .. }),
        "{error}"
    );
    assert!(error.retry_later_may_help());
    assert!(!output.exists());
    let paths = PartialPaths::beside(&output);
    assert!(!paths.partial.exists() && !paths.state.exists());

    let again = run_download(&origin_only("0"), DownloadRequest::new(url, &output)).await;
    assert_eq!(again.status().bytes_resumed, 0);
    assert_eq!(std::fs::read(&output).unwrap(), new);
}

#[tokio::test]
async fn content_that_changes_before_a_resume_is_started_over_not_mixed() {
    let origin = MockOrigin::start().await;
    let old = pattern_bytes(8 * MIB, 16);
    let new = pattern_bytes(8 * MIB, 17);
    origin.put("/files/resumed.bin", old.clone());
    let url = format!("{}/files/resumed.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("resumed.bin");
    let request = DownloadRequest::new(url.clone(), &output);
    let cancel = request.cancel.clone();
    let running = start_until_done(origin_only("4MiB"), request, 2 * MIB as u64).await;
    cancel.cancel();
    assert!(matches!(
        running.await.unwrap(),
        Err(DownloadError::Cancelled)
    ));
    assert!(done_pieces(&output) >= 2);

    origin.put("/files/resumed.bin", new.clone());
    // The resume state's version is gone: the rerun says so and throws the old pieces away...
    let rerun = run_download(
        &origin_only("0"),
        DownloadRequest::new(url.clone(), &output),
    )
    .await;
    let error = rerun
        .result
        .expect_err("old pieces must not complete a new version");
    assert!(
        matches!(error, DownloadError::ContentChanged { .. }),
        "{error}"
    );
    assert!(!output.exists());
    assert_eq!(done_pieces(&output), 0);
    // ...and the next run downloads the new version whole.
    let fresh = run_download(&origin_only("0"), DownloadRequest::new(url, &output)).await;
    assert_eq!(fresh.status().bytes_resumed, 0);
    assert_eq!(std::fs::read(&output).unwrap(), new);
}

#[tokio::test]
async fn a_zero_length_file_downloads_to_an_empty_file_directly_and_through_the_node() {
    let origin = MockOrigin::start().await;
    origin.put("/files/empty.bin", Bytes::new());
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/empty.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let mut sha256_of_nothing = DownloadRequest::new(url.clone(), directory.path().join("direct"));
    sha256_of_nothing.sha256 = Some(parse_sha256_hex(&sha256_hex(b"")).unwrap());
    for (name, client, request) in [
        ("direct", origin_only("0"), sha256_of_nothing),
        (
            "cached",
            downloader(peer_config(&[node.addr])),
            DownloadRequest::new(url.clone(), directory.path().join("cached")),
        ),
    ] {
        let finished = run_download(&client, request).await;
        let status = finished.status();
        assert_eq!(status.file_size, 0, "{name}: {status:?}");
        let output = directory.path().join(name);
        assert_eq!(std::fs::read(&output).unwrap(), b"", "{name}");
        let paths = PartialPaths::beside(&output);
        assert!(!paths.partial.exists() && !paths.state.exists(), "{name}");
    }
}

#[tokio::test]
async fn a_missing_output_directory_is_a_clear_error_before_any_request() {
    let origin = MockOrigin::start().await;
    origin.put("/files/nowhere.bin", pattern_bytes(MIB, 18));
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("not/there/nowhere.bin");
    let finished = run_download(
        &origin_only("0"),
        DownloadRequest::new(format!("{}/files/nowhere.bin", origin.base_url()), &output),
    )
    .await;
    let error = finished.result.expect_err("no directory to write into");
    assert!(matches!(error, DownloadError::InvalidRequest(_)), "{error}");
    assert!(error.to_string().contains("does not exist"), "{error}");
    assert_eq!(origin.request_count(), 0);
    assert!(!directory.path().join("not").exists());
}

#[tokio::test]
async fn an_output_directory_that_cannot_be_written_fails_get_clearly_and_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let origin = MockOrigin::start().await;
    origin.put("/files/readonly.bin", pattern_bytes(2 * MIB, 19));
    let url = format!("{}/files/readonly.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let output = directory.path().join("readonly.bin");
    // Root writes anywhere: as root, the binary runs as nobody.
    let binary = env!("CARGO_BIN_EXE_peer-client");
    let mut command = if rustix::process::geteuid().is_root() {
        let mut command = tokio::process::Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary);
        command
    } else {
        tokio::process::Command::new(binary)
    };
    let output_arg = output.to_str().unwrap();
    let run = command
        .args([
            "get",
            &url,
            "-o",
            output_arg,
            "--no-daemon",
            "--download-mode",
            "100",
        ])
        .env("PEER_CLIENT__STORAGE__FSYNC", "false")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "exit 0 without an output");
    assert!(stderr.contains("disk: creating"), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 0);
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn with_piece_hashes_a_resumed_piece_altered_on_disk_is_fetched_again() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(8 * MIB, 20);
    origin.put("/files/tampered.bin", content.clone());
    let url = format!("{}/files/tampered.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("tampered.bin");
    let hashes = Arc::new(PieceManifest::of_content(&content, MIB as u64));
    let request = || {
        let mut request = DownloadRequest::new(url.clone(), &output);
        request.piece_hashes = Some(hashes.clone());
        request
    };
    let first = request();
    let cancel = first.cancel.clone();
    let running = start_until_done(origin_only("4MiB"), first, 2 * MIB as u64).await;
    cancel.cancel();
    assert!(matches!(
        running.await.unwrap(),
        Err(DownloadError::Cancelled)
    ));
    // One recorded piece is altered in the partial file between the runs.
    let paths = PartialPaths::beside(&output);
    let state: ResumeState =
        serde_json::from_str(&std::fs::read_to_string(&paths.state).unwrap()).unwrap();
    let done = decode_bitmap(&state.done_pieces, 8).unwrap();
    let recorded = done.iter().filter(|done| **done).count();
    let altered = done.iter().position(|done| *done).unwrap();
    let mut partial = std::fs::read(&paths.partial).unwrap();
    partial[altered * MIB + 7] ^= 0xff;
    std::fs::write(&paths.partial, &partial).unwrap();

    let resumed = run_download(&origin_only("0"), request()).await;
    let status = resumed.status();
    assert_eq!(
        status.bytes_resumed,
        (recorded as u64 - 1) * MIB as u64,
        "{status:?}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percentage_cap_holds_the_download_to_that_share_of_its_first_seconds() {
    // An origin that gives each connection about 800 KB/s (16 KiB every 20 ms): four connections
    // make a few MB/s unthrottled, so the cap, not the origin, sets the pace afterwards.
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(12 * MIB, 21);
    let throttled = Behaviour {
        chunk_size: Some(16 * 1024),
        chunk_delay: Some(Duration::from_millis(20)),
        ..Behaviour::default()
    };
    origin.put_with("/files/half.bin", content.clone(), throttled);
    let mut config = peer_config(&[]);
    config.download_mode = 100;
    config.origin.connections = 4;
    config.max_download_bandwidth = "50%".into();
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("half.bin");
    let mut request =
        DownloadRequest::new(format!("{}/files/half.bin", origin.base_url()), &output);
    let (sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    request.events = Some(sender);
    let running = tokio::spawn({
        let client = client.clone();
        async move { client.download(request).await }
    });
    // (instant, bytes received) at every progress event from the moment the length is known,
    // which is when the measurement starts (the first piece, the probe, comes before).
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Started { .. } => samples.push((Instant::now(), 0)),
            Event::Progress(progress) if !samples.is_empty() => {
                samples.push((Instant::now(), progress.received_bytes));
            }
            _ => {}
        }
    }
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .unwrap()
        .unwrap()
        .expect("the capped download completes");
    assert_eq!(std::fs::read(&output).unwrap(), content);

    // The limiter's own figure: half of what it measured.
    let cap = client.bandwidth_cap().expect("the percentage cap was set") as f64;
    let rate_between = |from: Duration, to: Option<Duration>| {
        let start = samples[0].0;
        let at = |offset: Duration| {
            samples
                .iter()
                .find(|(instant, _)| instant.duration_since(start) >= offset)
                .copied()
                .unwrap_or(*samples.last().unwrap())
        };
        let (first_at, first_bytes) = at(from);
        let (last_at, last_bytes) = to.map_or(*samples.last().unwrap(), at);
        (last_bytes - first_bytes) as f64 / last_at.duration_since(first_at).as_secs_f64()
    };
    let unthrottled = rate_between(
        Duration::from_millis(150),
        Some(Duration::from_millis(1900)),
    );
    // From a moment after the measurement to the end: the capped pace, over seconds.
    let capped = rate_between(Duration::from_millis(2800), None);
    let share = cap / unthrottled;
    eprintln!("unthrottled {unthrottled:.0} B/s, cap {cap:.0} B/s, capped phase {capped:.0} B/s");
    assert!(
        (0.35..=0.65).contains(&share),
        "cap {cap:.0} B/s is {share:.2} of the {unthrottled:.0} B/s measured"
    );
    assert!(
        (capped - cap).abs() <= 0.25 * cap,
        "ran at {capped:.0} B/s under a cap of {cap:.0} B/s"
    );
}
