//! peer-client end-to-end: which source serves the bytes. A real cache node (or three) in front
//! of a mock origin, all on loopback: cache hits, a node that is down, a node killed mid-download,
//! a node that refuses an origin, rendezvous spread and failover, and the origin's 4xx.

#[path = "common/mod.rs"]
mod common;
#[path = "peer_common/mod.rs"]
mod peer_common;

use std::time::Duration;

use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use peer_client::config::CacheHost;
use peer_client::sources::ban::BanReason;
use peer_client::sources::cache_host::{content_key, rendezvous_order};
use peer_client::{DownloadError, DownloadRequest, Event};
use tokio::sync::mpsc;

use common::free_port;
use peer_common::{download_to, downloader, file_sha256, peer_config, run_download, KillableNode};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_cache_hit_gives_every_byte_from_the_cache_host() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(8 * MIB + 123, 1);
    origin.put("/files/hit.bin", content.clone());
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/hit.bin", origin.base_url());
    let client = downloader(peer_config(&[node.addr]));
    let directory = tempfile::tempdir().unwrap();

    // The first download fills the node; the client still gets every byte from it.
    let cold = download_to(&client, &url, directory.path(), "cold.bin").await;
    assert_eq!(cold.status().bytes_from_http, 0);
    assert_eq!(
        file_sha256(&directory.path().join("cold.bin")),
        sha256_hex(&content)
    );
    origin.reset_counters();

    let warm = download_to(&client, &url, directory.path(), "warm.bin").await;
    let status = warm.status();
    assert_eq!(status.file_size, content.len() as u64);
    assert_eq!(status.bytes_from_http, 0, "{status:?}");
    // Endgame duplicates may add a few pieces; every byte still came from the cache host.
    assert!(status.bytes_from_cache_server >= content.len() as u64);
    assert_eq!(
        status.total_bytes_downloaded,
        status.bytes_from_cache_server
    );
    assert_eq!(status.percent_peer_caching, 100.0);
    assert_eq!(status.cache_host, node.addr.to_string());
    assert_eq!(status.status, "Complete");
    assert_eq!(
        origin.bytes_sent(),
        0,
        "a warm node answers without the origin"
    );
    assert_eq!(
        file_sha256(&directory.path().join("warm.bin")),
        sha256_hex(&content)
    );
    let leftovers: Vec<_> = std::fs::read_dir(directory.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains(".peer-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial state left behind: {leftovers:?}"
    );
}

#[tokio::test]
async fn a_cache_node_that_is_down_falls_back_to_the_origin_after_the_configured_delay() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(2 * MIB, 2);
    origin.put("/files/down.bin", content.clone());
    let dead_host = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = peer_config(&[dead_host]);
    config.delay_cache_fallback_secs = 1;
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();
    let url = format!("{}/files/down.bin", origin.base_url());

    let finished = download_to(&client, &url, directory.path(), "down.bin").await;
    let status = finished.status();
    assert_eq!(status.bytes_from_http, content.len() as u64);
    assert_eq!(status.bytes_from_cache_server, 0);
    assert!(
        finished.elapsed >= Duration::from_secs(1),
        "the origin was used before the delay: {:?}",
        finished.elapsed
    );
    assert!(
        finished.elapsed < Duration::from_millis(2500),
        "the fallback took {:?}",
        finished.elapsed
    );
    assert!(finished.events.contains(&Event::FallbackToOrigin));
    let host = CacheHost::parse(&dead_host.to_string()).unwrap();
    let ban = client
        .bans()
        .ban_on(&host, "any.origin", tokio::time::Instant::now())
        .expect("a connect failure bans the host");
    assert_eq!(ban.reason, BanReason::Unreachable);
    assert_eq!(
        file_sha256(&directory.path().join("down.bin")),
        sha256_hex(&content)
    );
}

#[tokio::test]
async fn with_fallback_never_a_dead_cache_fails_the_download_clearly_instead_of_using_the_origin() {
    let origin = MockOrigin::start().await;
    origin.put("/files/never.bin", pattern_bytes(MIB, 3));
    let dead_host = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut config = peer_config(&[dead_host]);
    config.delay_cache_fallback_secs = -1;
    config.transfer.retry_initial_backoff = Duration::from_millis(50);
    config.transfer.max_consecutive_failures = 3;
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();
    let url = format!("{}/files/never.bin", origin.base_url());

    let finished = download_to(&client, &url, directory.path(), "never.bin").await;
    let error = finished.result.expect_err("the origin is forbidden");
    assert!(
        matches!(error, DownloadError::GaveUp { failures: 3, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("cannot connect"), "{error}");
    assert_eq!(origin.request_count(), 0);
}

#[tokio::test]
async fn a_cache_node_killed_mid_download_still_completes_from_the_origin() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(16 * MIB, 4);
    origin.put("/files/killed.bin", content.clone());
    let mut node = KillableNode::start(&origin.base_url());
    // Capped so that the download lasts long enough to kill the node in the middle of it.
    let mut config = peer_config(&[node.addr]);
    config.max_download_bandwidth = "16MiB".into();
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();
    let mut request = DownloadRequest::new(
        format!("{}/files/killed.bin", origin.base_url()),
        directory.path().join("killed.bin"),
    );
    request.sha256 =
        Some(peer_client::content::integrity::parse_sha256_hex(&sha256_hex(&content)).unwrap());
    let (sender, mut events) = mpsc::unbounded_channel();
    request.events = Some(sender);

    let download = tokio::spawn({
        let client = client.clone();
        async move { client.download(request).await }
    });
    // Kill the node once it has delivered a few MiB.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
            Ok(Some(Event::Progress(progress))) if progress.received_bytes >= 4 * MIB as u64 => {
                break
            }
            Ok(Some(_)) => {}
            other => panic!("the download never made progress: {other:?}"),
        }
    }
    node.kill();
    let status = tokio::time::timeout(Duration::from_secs(60), download)
        .await
        .expect("the download finishes")
        .unwrap()
        .expect("the download completes from the origin");
    assert!(
        status.bytes_from_cache_server >= 4 * MIB as u64,
        "{status:?}"
    );
    assert!(status.bytes_from_http > 0, "{status:?}");
    assert!(status.bytes_from_cache_server + status.bytes_from_http >= content.len() as u64);
    assert_eq!(
        file_sha256(&directory.path().join("killed.bin")),
        sha256_hex(&content)
    );
}

#[tokio::test]
async fn a_4xx_from_the_cache_bans_it_for_that_origin_only() {
    let allowed_origin = MockOrigin::start().await;
    let refused_origin = MockOrigin::start().await;
    let content = pattern_bytes(2 * MIB, 5);
    allowed_origin.put("/files/a.bin", content.clone());
    refused_origin.put("/files/b.bin", content.clone());
    let node = KillableNode::start(&allowed_origin.base_url());
    // The node allows 127.0.0.1 but not `localhost`, so it refuses the second origin with 403.
    let refused_url = format!(
        "http://localhost:{}/files/b.bin",
        refused_origin.addr().port()
    );
    let allowed_url = format!("{}/files/a.bin", allowed_origin.base_url());
    let mut config = peer_config(&[node.addr]);
    // A refusal is a definitive answer: the origin is used at once, not after this delay.
    config.delay_cache_fallback_secs = 600;
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();

    let refused = download_to(&client, &refused_url, directory.path(), "b1.bin").await;
    assert_eq!(refused.status().bytes_from_http, content.len() as u64);
    assert!(refused.elapsed < Duration::from_secs(10));
    let host = CacheHost::parse(&node.addr.to_string()).unwrap();
    let now = tokio::time::Instant::now();
    let origin_key = format!("localhost:{}", refused_origin.addr().port());
    assert_eq!(
        client
            .bans()
            .ban_on(&host, &origin_key, now)
            .unwrap()
            .reason,
        BanReason::RefusedOrigin
    );

    // The other origin still goes through the cache.
    let allowed = download_to(&client, &allowed_url, directory.path(), "a.bin").await;
    assert_eq!(
        allowed.status().bytes_from_cache_server,
        content.len() as u64
    );
    assert_eq!(allowed.status().bytes_from_http, 0);
    assert_eq!(
        file_sha256(&directory.path().join("a.bin")),
        sha256_hex(&content)
    );

    // The refused origin does not even ask the cache again while the ban lasts.
    let requests_before = node.requests().await;
    let again = download_to(&client, &refused_url, directory.path(), "b2.bin").await;
    assert_eq!(again.status().bytes_from_http, content.len() as u64);
    assert_eq!(again.status().cache_server_connection_count, 0);
    assert_eq!(node.requests().await, requests_before);
    assert_eq!(
        file_sha256(&directory.path().join("b2.bin")),
        sha256_hex(&content)
    );
}

#[tokio::test]
async fn a_4xx_from_the_origin_fails_the_download_with_a_clear_error() {
    let origin = MockOrigin::start().await;
    let mut config = peer_config(&[]);
    config.download_mode = 100;
    let client = downloader(config);
    let directory = tempfile::tempdir().unwrap();
    let url = format!("{}/files/missing.bin", origin.base_url());

    let finished = download_to(&client, &url, directory.path(), "missing.bin").await;
    let error = finished.result.expect_err("404 is fatal");
    assert!(
        matches!(error, DownloadError::OriginRefused { status: 404, .. }),
        "{error}"
    );
    assert_eq!(
        error.error_source(),
        peer_client::error::ErrorSource::Origin
    );
    assert_eq!(origin.request_count(), 1, "a 4xx is not retried");
    assert!(!directory.path().join("missing.bin").exists());
}

#[tokio::test]
async fn rendezvous_hashing_spreads_items_over_three_nodes_and_fails_over_in_hash_order() {
    let origin = MockOrigin::start().await;
    let mut nodes: Vec<KillableNode> = (0..3)
        .map(|_| KillableNode::start(&origin.base_url()))
        .collect();
    let addresses: Vec<_> = nodes.iter().map(|node| node.addr).collect();
    let hosts: Vec<CacheHost> = addresses
        .iter()
        .map(|addr| CacheHost::parse(&addr.to_string()).unwrap())
        .collect();
    let client = downloader(peer_config(&addresses));
    let directory = tempfile::tempdir().unwrap();
    let mut items_per_host = std::collections::HashMap::new();
    // 60 items over 3 hosts: 20 each on average; fewer than 6 on one host happens about once in
    // 5000 runs (the ports, and so the hashes, differ from run to run).
    let item_count = 60;
    for item in 0..item_count {
        let path = format!("/items/{item}.bin");
        origin.put(&path, pattern_bytes(48 * 1024, 100 + item as u64));
        let url = format!("{}{path}", origin.base_url());
        let expected = rendezvous_order(&hosts, &content_key(&url.parse().unwrap()))[0].clone();
        let finished = download_to(&client, &url, directory.path(), &format!("{item}.bin")).await;
        assert_eq!(
            finished.status().cache_host,
            expected.to_string(),
            "item {item}"
        );
        assert_eq!(finished.status().bytes_from_http, 0);
        *items_per_host.entry(expected).or_insert(0) += 1;
    }
    assert_eq!(items_per_host.len(), 3, "{items_per_host:?}");
    assert!(
        items_per_host.values().all(|&count| count >= 4),
        "{items_per_host:?}"
    );
    for node in &nodes {
        assert!(node.requests().await >= 6);
    }

    // Kill the node that serves item 0: it is served by the next host in its hash order.
    let url = format!("{}/items/0.bin", origin.base_url());
    let order = rendezvous_order(&hosts, &content_key(&url.parse().unwrap()));
    let first = addresses
        .iter()
        .position(|addr| addr.to_string() == order[0].to_string())
        .unwrap();
    nodes[first].kill();
    let failover = download_to(&client, &url, directory.path(), "0-again.bin").await;
    assert_eq!(failover.status().cache_host, order[1].to_string());
    assert_eq!(failover.status().bytes_from_http, 0);
}

#[tokio::test]
async fn simple_and_bypass_modes_use_only_the_origin_and_peer_modes_use_the_cache_too() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(MIB + 7, 6);
    origin.put("/files/modes.bin", content.clone());
    let node = KillableNode::start(&origin.base_url());
    let url = format!("{}/files/modes.bin", origin.base_url());
    let directory = tempfile::tempdir().unwrap();
    for (mode, from_cache) in [
        (99, false),
        (100, false),
        (0, true),
        (1, true),
        (2, true),
        (3, true),
    ] {
        let mut config = peer_config(&[node.addr]);
        config.download_mode = mode;
        config.group_id = "branch".into();
        // This node allows 127.0.0.1, its own address, as an origin, so its peering API answers
        // nothing useful here (protocol.md): peer modes must not wait long for a manifest.
        config.peering.manifest_timeout = Duration::from_millis(300);
        let finished = run_download(
            &downloader(config),
            DownloadRequest::new(url.clone(), directory.path().join(format!("{mode}.bin"))),
        )
        .await;
        let status = finished.status();
        assert_eq!(status.download_mode, mode);
        assert_eq!(
            status.bytes_from_cache_server > 0,
            from_cache,
            "mode {mode}: {status:?}"
        );
        assert_eq!(
            status.bytes_from_http > 0,
            !from_cache,
            "mode {mode}: {status:?}"
        );
        assert_eq!(
            file_sha256(&directory.path().join(format!("{mode}.bin"))),
            sha256_hex(&content),
            "mode {mode}"
        );
    }
}
