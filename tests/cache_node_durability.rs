//! End-to-end: the store survives restarts. A cleanly restarted node serves its earlier content as
//! hits with no origin traffic; a node killed with SIGKILL in the middle of fills restarts and
//! serves nothing corrupt.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use outpost_testkit::{
    bytes_under, eventually_async, pattern_bytes, sha256_hex, Behaviour, MockOrigin,
};

#[tokio::test]
async fn a_restarted_node_serves_its_earlier_content_as_hits() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let content = pattern_bytes(1_000_000, 21);
    let partial = pattern_bytes(1_000_000, 22);
    origin.put("/kept.bin", content.clone());
    origin.put("/partial.bin", partial.clone());

    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    assert_eq!(
        sha256_hex(get(&node.mcc_url("/kept.bin"), &[]).await.bytes()),
        sha256_hex(&content)
    );
    let first_half = get(
        &node.mcc_url("/partial.bin"),
        &[("range", "bytes=0-499999")],
    )
    .await;
    assert_eq!(first_half.bytes(), &partial[..500_000]);
    node.settle().await;
    let stored_before = node.node.index.used_bytes();
    node.stop().await;

    let requests_before = origin.request_count();
    let restarted = TestNode::start(config).await;
    assert_eq!(
        restarted.node.index.used_bytes(),
        stored_before,
        "the index was rebuilt from disk"
    );
    let hit = get(&restarted.mcc_url("/kept.bin"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&content));
    let ranged_hit = get(
        &restarted.mcc_url("/kept.bin"),
        &[("range", "bytes=123456-654321")],
    )
    .await;
    assert_eq!(ranged_hit.bytes(), &content[123_456..=654_321]);
    assert_eq!(
        origin.request_count(),
        requests_before,
        "no origin traffic for stored content"
    );

    // The partially stored object is completed from the origin, fetching only what is missing.
    let whole = get(&restarted.mcc_url("/partial.bin"), &[]).await;
    assert_eq!(whole.header("x-cache").as_deref(), Some("PARTIAL"));
    assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&partial));
    assert_eq!(origin.max_fetches_of_any_byte("/partial.bin"), 1);
    let stats = restarted.stats().await;
    assert!(stats["hit_bytes"].as_u64().unwrap() > 0);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_fill_restarts_without_serving_anything_corrupt() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cache-node"));
    let objects: Vec<(String, bytes::Bytes)> = (0..4u64)
        .map(|index| {
            (
                format!("/mid-fill-{index}.bin"),
                pattern_bytes(6 * 1024 * 1024 + 7, 100 + index),
            )
        })
        .collect();
    for (path, content) in &objects {
        // Slow enough that the kill lands while every fill is in flight.
        origin.put_with(
            path,
            content.clone(),
            Behaviour {
                chunk_delay: Some(Duration::from_millis(3)),
                chunk_size: Some(32 * 1024),
                ..Behaviour::default()
            },
        );
    }
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.storage.fsync = true;

    let mut node = NodeProcess::spawn(binary, work.path(), config.clone());
    node.wait_healthy().await;
    let mut streams = Vec::new();
    for (path, _) in &objects {
        let response = client().get(mcc_url(node.addr, path)).send().await.unwrap();
        streams.push(response.bytes_stream());
    }
    // Wait until every fill has delivered at least a few slices, then kill the node.
    for stream in &mut streams {
        let mut received = 0;
        while received < 300_000 {
            received += stream.next().await.unwrap().unwrap().len();
        }
    }
    let sent_at_kill = origin.bytes_sent();
    node.kill_9();
    let total: u64 = objects
        .iter()
        .map(|(_, content)| content.len() as u64)
        .sum();
    assert!(sent_at_kill < total, "the kill landed mid-fill");
    for mut stream in streams {
        let mut failed = false;
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a client of a killed node sees an aborted body");
    }

    // No temporary file may be mistaken for a slice after restart.
    let mut restarted = NodeProcess::spawn(binary, work.path(), config);
    restarted.wait_healthy().await;
    let stats = admin_stats(restarted.admin_addr).await;
    let recovered = stats["cache_used_bytes"].as_u64().unwrap();
    assert!(
        recovered > 0,
        "complete slices written before the kill are kept: {stats}"
    );
    assert!(recovered < total);
    for (path, content) in &objects {
        for range in [None, Some("bytes=0-299999"), Some("bytes=-1000")] {
            let headers: Vec<(&str, &str)> = range.iter().map(|range| ("range", *range)).collect();
            let fetched = get(&mcc_url(restarted.addr, path), &headers).await;
            let expected = match range {
                None => &content[..],
                Some("bytes=0-299999") => &content[..300_000],
                Some(_) => &content[content.len() - 1000..],
            };
            assert_eq!(
                sha256_hex(fetched.bytes()),
                sha256_hex(expected),
                "{path} {range:?}"
            );
        }
    }
    restarted.kill_9();
}

#[tokio::test]
async fn when_io_uring_is_unavailable_the_node_falls_back_and_says_so() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(300_000, 51);
    origin.put("/fallback.bin", content.clone());
    let storage = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_cache-node"));
    let simulate = [(cache_node::disk::uring::SIMULATE_FAILURE_ENV, "1")];

    let mut config = usual_config(storage.path(), &origin.base_url());
    config.storage.io_backend = "auto".into();
    let mut node = NodeProcess::spawn_with_env(binary, work.path(), config.clone(), &simulate);
    node.wait_healthy().await;
    let stats = admin_stats(node.admin_addr).await;
    assert_eq!(
        stats["disk_backend"], "portable",
        "auto falls back when the probe fails"
    );
    let fetched = get(&mcc_url(node.addr, "/fallback.bin"), &[]).await;
    assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(&content));
    node.kill_9();

    // Asking for io_uring explicitly when it is unavailable stops the node with a clear message.
    config.storage.io_backend = "io_uring".into();
    std::fs::write(work.path().join("strict.toml"), config_to_toml(&config)).unwrap();
    let strict = std::process::Command::new(binary)
        .arg("--config")
        .arg(work.path().join("strict.toml"))
        .env(cache_node::disk::uring::SIMULATE_FAILURE_ENV, "1")
        .output()
        .unwrap();
    assert!(!strict.status.success());
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(stderr.contains("io_uring is unavailable"), "{stderr}");
}

#[tokio::test]
async fn several_drives_each_keep_to_their_size_and_survive_restarts_in_any_order() {
    let origin = MockOrigin::start().await;
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let third = tempfile::tempdir().unwrap();
    let mut config = test_config(first.path(), &origin.base_url(), TEST_SLICE, "2MiB");
    config.storage.extra_drives = vec![
        cache_node::config::DriveConfig {
            path: second.path().to_path_buf(),
            max_size: "2MiB".into(),
        },
        cache_node::config::DriveConfig {
            path: third.path().to_path_buf(),
            max_size: "6MiB".into(),
        },
    ];
    let node = TestNode::start(config.clone()).await;
    // 16 MiB of content over 10 MiB of drives, spread 20/20/60 by size: each drive is offered
    // more than it holds and evicts (with 64 objects, a drive left empty is a 1-in-10^6 event).
    let objects: Vec<(String, bytes::Bytes)> = (0..64u64)
        .map(|index| {
            (
                format!("/drives/{index}.bin"),
                pattern_bytes(256 * 1024, 100 + index),
            )
        })
        .collect();
    for (path, content) in &objects {
        origin.put(path, content.clone());
        let fetched = get(&node.mcc_url(path), &[]).await;
        assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(content));
    }
    node.settle().await;
    let dirs = [&first, &second, &third];
    // Evicted objects' files are deleted by a background task: wait (bounded) until every drive
    // is back under its size, on disk as in the index.
    let stats = eventually_async(
        "every drive to be back under its size",
        Duration::from_secs(20),
        async || {
            let stats = node.stats().await;
            let settled =
                stats["drives"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(dirs)
                    .all(|(drive, dir)| {
                        let used = drive["used_bytes"].as_u64().unwrap();
                        let max = drive["max_bytes"].as_u64().unwrap();
                        let on_disk = bytes_under(dir.path());
                        used <= max && on_disk >= used && on_disk <= max + 64 * 1024
                    });
            if settled {
                Ok(stats)
            } else {
                Err(stats)
            }
        },
    )
    .await;
    let drives = stats["drives"].as_array().unwrap().clone();
    assert_eq!(drives.len(), 3, "{stats}");
    let used: Vec<u64> = drives
        .iter()
        .map(|drive| drive["used_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(
        used.iter().sum::<u64>(),
        stats["cache_used_bytes"].as_u64().unwrap()
    );
    assert_eq!(stats["cache_max_bytes"].as_u64(), Some(10 << 20));
    for drive in &drives {
        // Each drive holds something; the loop above checked that it is really on that drive
        // (plus small metadata files) and within its size.
        assert!(drive["used_bytes"].as_u64().unwrap() > 0, "{stats}");
    }
    // The big drive holds the most.
    assert!(used[2] > used[0] && used[2] > used[1], "{used:?}");
    let stored_before = node.node.index.used_bytes();
    let (kept, evicted): (Vec<_>, Vec<_>) = objects.iter().partition(|(path, _)| {
        let key = cache_node::cache::key::CacheKey::new(ORIGIN_HOST, path);
        node.node.index.get(&key).is_some()
    });
    assert!(
        !evicted.is_empty(),
        "the drives were offered more than they hold"
    );
    node.stop().await;

    // Restart with the drives listed in another order: every object is found where it was.
    config.storage.path = third.path().to_path_buf();
    config.storage.max_size = "6MiB".into();
    config.storage.extra_drives[1] = cache_node::config::DriveConfig {
        path: first.path().to_path_buf(),
        max_size: "2MiB".into(),
    };
    let restarted = TestNode::start(config).await;
    assert_eq!(restarted.node.index.used_bytes(), stored_before);
    assert_eq!(restarted.node.index.object_count(), kept.len() as u64);
    let requests = origin.request_count();
    for (path, content) in &kept {
        let fetched = get(&restarted.mcc_url(path), &[]).await;
        assert_eq!(fetched.header("x-cache").as_deref(), Some("HIT"), "{path}");
        assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(content));
    }
    assert_eq!(
        origin.request_count(),
        requests,
        "no origin traffic for kept objects"
    );
    let (path, content) = evicted[0];
    let refetched = get(&restarted.mcc_url(path), &[]).await;
    assert_eq!(refetched.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(sha256_hex(refetched.bytes()), sha256_hex(content));
    restarted.stop().await;
}
