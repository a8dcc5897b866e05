//! End-to-end: the access log (`[log] access`). One line per request in either format, with
//! the client, origin, target (secrets redacted), range, status, cache status, bytes and times;
//! no line lost at a steady hit rate; and a log on a stuck disk never slows a request: lines
//! are dropped and counted instead.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use outpost_testkit::{eventually, pattern_bytes};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_combined_lines_carry_every_field_with_secrets_redacted() {
    for format in ["json", "combined"] {
        let logs = tempfile::tempdir().unwrap();
        let log_path = logs.path().join("access.log");
        let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
            let mut config = usual_config(storage, &origin.base_url());
            config.log.access = format.into();
            config.log.access_path = log_path.to_string_lossy().into_owned();
            config
        })
        .await;
        let content = pattern_bytes(100_000, 3);
        origin.put("/kb/file.cab", content.clone());
        let url = format!("{}&sig=s3cr3t&x=1", node.mcc_url("/kb/file.cab"));
        let miss = get(
            &url,
            &[("range", "bytes=0-999"), ("user-agent", "test-agent/1")],
        )
        .await;
        assert_eq!(miss.status, 206);
        node.settle().await;
        let hit = get(
            &url,
            &[("range", "bytes=0-999"), ("user-agent", "test-agent/1")],
        )
        .await;
        assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
        eventually("two access lines", Duration::from_secs(10), || {
            lines(&log_path).len() >= 2
        })
        .await;
        let written = lines(&log_path);
        assert_eq!(written.len(), 2, "{written:?}");
        for (line, cache) in written.iter().zip(["MISS", "HIT"]) {
            assert!(!line.contains("s3cr3t"), "{line}");
            match format {
                "json" => {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    assert_eq!(value["client"], "127.0.0.1");
                    assert_eq!(value["method"], "GET");
                    assert_eq!(value["origin"], ORIGIN_HOST);
                    assert!(value["target"]
                        .as_str()
                        .unwrap()
                        .contains("sig=REDACTED&x=1"));
                    assert_eq!(value["range"], "bytes=0-999");
                    assert_eq!(value["status"], 206);
                    assert_eq!(value["cache"], cache);
                    assert_eq!(value["bytes"], 1000);
                    assert_eq!(value["complete"], true);
                    assert_eq!(value["user_agent"], "test-agent/1");
                    let first_byte = value["first_byte_ms"].as_f64().unwrap();
                    let duration = value["duration_ms"].as_f64().unwrap();
                    assert!(first_byte >= 0.0 && duration >= first_byte, "{line}");
                }
                _ => {
                    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
                    assert!(
                        line.contains("\"GET /kb/file.cab?cacheHostOrigin="),
                        "{line}"
                    );
                    assert!(
                        line.contains(
                            "sig=REDACTED&x=1 HTTP/1.1\" 206 1000 \"-\" \"test-agent/1\""
                        ),
                        "{line}"
                    );
                    assert!(
                        line.contains(&format!(
                            "origin={ORIGIN_HOST} cache={cache} range=bytes=0-999"
                        )),
                        "{line}"
                    );
                    assert!(line.ends_with("complete=true"), "{line}");
                }
            }
        }
        assert_eq!(stat(&node.stats().await, "access_log_lines"), 2);
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_hit_rate_loses_no_line() {
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("access.log");
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.log.access = "json".into();
        config.log.access_path = log_path.to_string_lossy().into_owned();
        config
    })
    .await;
    origin.put("/small.bin", pattern_bytes(4096, 4));
    let url = node.mcc_url("/small.bin");
    let _ = get(&url, &[]).await;
    node.settle().await;
    // 8 clients, 250 requests each, back to back.
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..250 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.bytes().await.unwrap().len(), 4096);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    eventually("2,001 access lines", Duration::from_secs(20), || {
        lines(&log_path).len() >= 2001
    })
    .await;
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "access_log_dropped"), 0);
    assert_eq!(stat(&stats, "access_log_lines"), 2001);
    assert_eq!(lines(&log_path).len(), 2001);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_log_disk_never_slows_a_request_and_the_lost_lines_are_counted() {
    // A FIFO whose reader never reads: the writer blocks for good once the pipe is full, as on a
    // hung disk.
    let logs = tempfile::tempdir().unwrap();
    let fifo = logs.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader_path = fifo.clone();
    let (opened, reader_ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(reader_path).unwrap();
        opened.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(600));
        drop(file);
    });
    let fifo_text = fifo.to_string_lossy().into_owned();
    let (origin, _storage, node) = origin_and_node_configured(move |storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.log.access = "combined".into();
        config.log.access_path = fifo_text;
        config.log.access_buffer = 64;
        config
    })
    .await;
    reader_ready.recv_timeout(Duration::from_secs(10)).unwrap();
    origin.put("/small.bin", pattern_bytes(4096, 5));
    let url = node.mcc_url("/small.bin");
    let _ = get(&url, &[]).await;
    node.settle().await;
    // Each line is about 250 bytes: 2,000 lines are far more than the pipe (64 KiB) and the
    // queue (64 lines) hold.
    let client = client();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..2000 {
        let asked = Instant::now();
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.bytes().await.unwrap().len(), 4096);
        slowest = slowest.max(asked.elapsed());
    }
    let elapsed = started.elapsed();
    let stats = node.stats().await;
    assert!(
        stat(&stats, "access_log_dropped") > 1000,
        "lines dropped, not waited for: {stats}"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "no request waits for the log: slowest {slowest:?}"
    );
    println!("2,000 hits with the log stuck: {elapsed:?}, slowest {slowest:?}");
    node.stop().await;
}
