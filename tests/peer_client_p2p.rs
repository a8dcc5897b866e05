//! peer-client end-to-end with peers: one real cache node (piece manifests and the tracker), one
//! mock origin, and several `peer-client daemon`s on distinct 127.0.x.y addresses (Linux routes
//! all of 127/8 to the loopback interface), so the node sees one address per machine and LAN
//! scoping has subnets to compare.

#[path = "common/mod.rs"]
mod common;
#[path = "peer_common/mod.rs"]
mod peer_common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_testkit::{eventually_async, pattern_bytes, sha256_hex, MockOrigin};
use peer_client::sources::node_api::{ContentId, NodeApi, PeerHoldings};
use peer_client::{Config, Event};

use peer_common::swarm::{
    cli, file_digest, get_piece_range, kill_in_background, origin_with_content, raw_get, run_ok,
    spawn_download, start_node, start_node_with, tracked_peers, two_complete_peers,
    until_complete_peers, CONTENT_LEN, MIB, ORIGIN_IP, PIECE,
};
use peer_common::TestDaemon;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_dies_mid_download_and_the_client_finishes_from_peers() {
    let (origin, url, content) = origin_with_content(51).await;
    let node = start_node(&origin);
    let (_first, _second, _) = two_complete_peers(&node, &url).await;
    let third = TestDaemon::start("127.0.0.4", node.addr, |config| {
        // Slow enough that the node is dead long before the end, and the origin kept out.
        config.max_download_bandwidth = "4MiB".into();
        config.delay_http_fallback_secs = 600;
    })
    .await;
    let origin_bytes_before = origin.bytes_sent();

    let (download, mut received) = spawn_download(&third, &url);
    // Once it has the manifest and the peer list, the node dies.
    loop {
        match received
            .recv()
            .await
            .expect("the download reports its peers")
        {
            Event::PeersFound { peers } => {
                assert_eq!(peers, 2);
                break;
            }
            _ => continue,
        }
    }
    kill_in_background(node).await.unwrap();

    let done = tokio::time::timeout(Duration::from_secs(30), download)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let status = &done.status;
    assert_eq!(status.bytes_from_http, 0, "{status:?}");
    assert!(
        status.bytes_from_peers >= CONTENT_LEN as u64 / 2,
        "{status:?}"
    );
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert_eq!(origin.bytes_sent(), origin_bytes_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_draws_from_two_peers_and_the_cache_in_parallel() {
    let (origin, url, content) = origin_with_content(52).await;
    let node = start_node(&origin);
    let (first, second, _) = two_complete_peers(&node, &url).await;
    let third = TestDaemon::start("127.0.0.4", node.addr, |_| {}).await;

    let done = third.download(&url).await;
    let status = &done.status;
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert_eq!(status.num_peers, 2);
    for peer in [first.peer_addr, second.peer_addr] {
        let bytes = status.bytes_by_peer.get(&format!("peer {peer}")).copied();
        assert!(bytes.unwrap_or(0) > 0, "nothing from {peer}: {status:?}");
    }
    assert!(status.bytes_from_cache_server > 0, "{status:?}");
    assert_eq!(status.bytes_from_http, 0);
    // The control API lists it with DO's fields.
    let listed = third.daemon.status();
    assert_eq!(listed[0].status, "Complete");
    assert_eq!(listed[0].bytes_from_peers, status.bytes_from_peers);
    assert_eq!(listed[0].num_peers, 2);
    let snap = third.daemon.perf_snap();
    assert_eq!(snap["FilesDownloaded"], 1);
    assert!(snap["ConnectionsBySource"]["Peers"].as_u64().unwrap() > 0);
    // The peers counted their uploads.
    let uploaded = first
        .daemon
        .shared()
        .stats
        .bytes_uploaded
        .load(Ordering::Relaxed)
        + second
            .daemon
            .shared()
            .stats
            .bytes_uploaded
            .load(Ordering::Relaxed);
    assert!(uploaded >= status.bytes_from_peers - 2 * PIECE as u64);
}

/// A fake peer on `ip` that answers every request with `answer`, counting the requests.
async fn start_fake_peer<A>(ip: &str, answer: A) -> (SocketAddr, Arc<AtomicU64>)
where
    A: Fn(&http::Request<hyper::body::Incoming>) -> http::Response<http_body_util::Full<Bytes>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let listener = tokio::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let response = answer(&request);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

/// A peer that answers every range with the right headers and inverted bytes.
async fn start_malicious_peer(
    ip: &str,
    content: Bytes,
    etag: String,
) -> (SocketAddr, Arc<AtomicU64>) {
    start_fake_peer(ip, move |request| {
        let range = peer_client::daemon::peer_server::parse_range(
            request.headers().get("range").and_then(|v| v.to_str().ok()),
            content.len() as u64,
        )
        .unwrap();
        let bad: Vec<u8> = content[range.start as usize..range.end as usize]
            .iter()
            .map(|byte| !byte)
            .collect();
        let content_range = format!("bytes {}-{}/{}", range.start, range.end - 1, content.len());
        http::Response::builder()
            .status(206)
            .header("content-range", content_range)
            .header("etag", etag.clone())
            .body(http_body_util::Full::new(Bytes::from(bad)))
            .unwrap()
    })
    .await
}

/// `peer` announces itself to the node as a complete peer of `content_id`, from its own address.
async fn announce_complete(node: SocketAddr, peer: SocketAddr, content_id: ContentId) {
    let api = NodeApi::new(
        &peer_client::config::CacheHost::parse(&node.to_string()).unwrap(),
        Some(peer.ip()),
        Duration::from_secs(2),
    );
    api.announce(&peer_client::sources::node_api::Announcement {
        content_id,
        port: peer.port(),
        group_id: None,
        pieces: vec![[0, (CONTENT_LEN / PIECE) as u64 - 1]],
        complete: true,
        active_uploads: 0,
    })
    .await
    .unwrap();
}

/// Runs the download of `url` on `client` to its end; the result and every event it sent.
async fn download_with_events(
    client: &TestDaemon,
    url: &str,
) -> (peer_client::daemon::service::DaemonDownload, Vec<Event>) {
    let (download, mut received) = spawn_download(client, url);
    let mut events = Vec::new();
    while let Some(event) = received.recv().await {
        events.push(event);
    }
    (download.await.unwrap().unwrap(), events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_corrupt_pieces_is_banned_and_the_file_is_still_right() {
    let (origin, url, content) = origin_with_content(53).await;
    let node = start_node(&origin);
    let honest = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let content_id = honest.download(&url).await.content_id.unwrap();
    let (evil, evil_requests) = start_malicious_peer(
        "127.0.0.66",
        content.clone(),
        origin.etag("/files/big.bin").unwrap(),
    )
    .await;
    announce_complete(node.addr, evil, content_id).await;
    until_complete_peers(node.addr, content_id, 2).await;

    let client = TestDaemon::start("127.0.0.5", node.addr, |config| {
        // One cache connection, paced, so the peers are asked for many pieces.
        config.cache.connections_per_host = 1;
        config.max_download_bandwidth = "16MiB".into();
    })
    .await;
    let (done, events) = download_with_events(&client, &url).await;
    let status = &done.status;
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert_eq!(status.banned_peers, 1, "{status:?}");
    let banned: Vec<&String> = events
        .iter()
        .filter_map(|event| match event {
            Event::PeerBanned { label } => Some(label),
            _ => None,
        })
        .collect();
    assert_eq!(banned, [&format!("peer {evil}")]);
    // Three bad pieces, plus at most one request already running on its other connection.
    let asked = evil_requests.load(Ordering::Relaxed);
    assert!(
        (3..=4).contains(&asked),
        "the banned peer was asked {asked} times"
    );
    assert!(status
        .bytes_by_peer
        .contains_key(&format!("peer {}", honest.peer_addr)));
    // Bytes that failed their hash are not counted as downloaded from peers: the banned peer's
    // three bad pieces are not in BytesFromPeers (at most a request cut off when the download
    // ended, never checked, may be).
    let evil_bytes = status
        .bytes_by_peer
        .get(&format!("peer {evil}"))
        .copied()
        .unwrap_or(0);
    assert!(
        evil_bytes < PIECE as u64,
        "{evil_bytes} bytes counted from the banned peer: {status:?}"
    );
    let snap = client.daemon.perf_snap();
    assert_eq!(snap["BytesFromPeers"], status.bytes_from_peers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_subnet_or_group_are_never_offered() {
    let (origin, url, _) = origin_with_content(54).await;
    let node = start_node(&origin);
    // 127.0.1.2 is another /24 than the clients'; the group peer is in the clients' subnet.
    let other_subnet = TestDaemon::start("127.0.1.2", node.addr, |_| {}).await;
    let red_group = TestDaemon::start("127.0.0.7", node.addr, |config| {
        config.download_mode = 2;
        config.group_id = "red".into();
    })
    .await;
    let content = other_subnet.download(&url).await.content_id.unwrap();
    red_group.download(&url).await;
    until_complete_peers(node.addr, content, 2).await;

    let lan_client = TestDaemon::start("127.0.0.8", node.addr, |_| {}).await;
    let lan = lan_client.download(&url).await.status;
    assert_eq!(lan.num_peers, 1, "{lan:?}");
    // The one peer it used is the red one in its subnet, which sent it bytes; the peer in the
    // other subnet sent nothing.
    let peers_used: Vec<&String> = lan.bytes_by_peer.keys().collect();
    assert_eq!(
        peers_used,
        [&format!("peer {}", red_group.peer_addr)],
        "{lan:?}"
    );
    assert!(lan.bytes_from_peers > 0, "{lan:?}");

    let blue_client = TestDaemon::start("127.0.0.9", node.addr, |config| {
        config.download_mode = 2;
        config.group_id = "blue".into();
    })
    .await;
    let blue = blue_client.download(&url).await.status;
    assert_eq!(blue.num_peers, 0, "{blue:?}");
    assert_eq!(blue.bytes_from_peers, 0);

    let red_client = TestDaemon::start("127.0.1.9", node.addr, |config| {
        config.download_mode = 2;
        config.group_id = "red".into();
    })
    .await;
    let red = red_client.download(&url).await.status;
    // Group mode crosses subnets: only the red peer, though it is in another /24.
    assert_eq!(red.num_peers, 1, "{red:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_of_a_download_in_progress_are_announced_and_served() {
    let (origin, url, content) = origin_with_content(55).await;
    let node = start_node(&origin);
    let slow = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.max_download_bandwidth = "2MiB".into();
        // One connection to the cache and no origin: pieces arrive strictly in order.
        config.cache.connections_per_host = 1;
        config.delay_http_fallback_secs = 600;
    })
    .await;
    let (download, mut received) = spawn_download(&slow, &url);
    // Wait for two pieces on disk.
    let mut written = Vec::new();
    while written.len() < 2 {
        if let Event::PieceWritten { index } = received.recv().await.unwrap() {
            written.push(index);
        }
    }
    let content_id = slow.daemon.shared().store.entries()[0].0;
    // The tracker lists it as a partial peer holding those pieces.
    let entry = eventually_async(
        "the partial download to be announced",
        Duration::from_secs(10),
        async || {
            tracked_peers(node.addr, content_id)
                .await
                .into_iter()
                .find(|peer| peer.address == slow.peer_addr)
                .filter(|entry| {
                    written
                        .iter()
                        .all(|&index| entry.holdings(32)[index as usize])
                })
        },
    )
    .await;
    assert!(!entry.complete);
    // A held piece is served with the origin's bytes; the last piece is not there yet.
    let held = written[0] as usize;
    let (status, body) =
        get_piece_range(slow.peer_addr, content_id, held * PIECE..(held + 1) * PIECE).await;
    assert_eq!(status, 206);
    assert_eq!(body, content[held * PIECE..(held + 1) * PIECE]);
    // A download with peering starts at a random piece and wraps around, so the piece just
    // before the first one written is the last it will fetch.
    let pieces = CONTENT_LEN / PIECE;
    let last = (written[0] as usize + pieces - 1) % pieces;
    assert!(!entry.holdings(32)[last], "{written:?} {entry:?}");
    let (status, _) =
        get_piece_range(slow.peer_addr, content_id, last * PIECE..(last + 1) * PIECE).await;
    assert_eq!(status, 404, "piece {last} after {written:?}");
    assert!(!download.is_finished());
    download.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_keep_to_the_rate_cap() {
    let (origin, url, content) = origin_with_content(56).await;
    let node = start_node(&origin);
    let capped = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.daemon.max_upload_bandwidth = "4MiB".into();
    })
    .await;
    let content_id = capped.download(&url).await.content_id.unwrap();

    // 8 MiB in four parallel 2 MiB requests at 4 MiB/s: two seconds.
    let started = Instant::now();
    let mut requests = Vec::new();
    for part in 0..4 {
        let peer = capped.peer_addr;
        requests.push(tokio::spawn(async move {
            get_piece_range(peer, content_id, part * 2 * MIB..(part + 1) * 2 * MIB).await
        }));
    }
    for (part, request) in requests.into_iter().enumerate() {
        let (status, body) = request.await.unwrap();
        assert_eq!(status, 206);
        assert_eq!(body, content[part * 2 * MIB..(part + 1) * 2 * MIB]);
    }
    let rate = CONTENT_LEN as f64 / started.elapsed().as_secs_f64();
    let cap = 4.0 * MIB as f64;
    assert!(
        (rate - cap).abs() <= 0.15 * cap,
        "measured {:.2} MiB/s against a 4 MiB/s cap",
        rate / MIB as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monthly_cap_stops_uploads_and_survives_a_restart() {
    let (origin, url, content) = origin_with_content(57).await;
    let node = start_node(&origin);
    let cap = |config: &mut Config| config.daemon.monthly_upload_cap = "3MiB".into();
    let daemon = TestDaemon::start("127.0.0.2", node.addr, cap).await;
    let content_id = daemon.download(&url).await.content_id.unwrap();
    for part in 0..3 {
        let (status, body) =
            get_piece_range(daemon.peer_addr, content_id, part * MIB..(part + 1) * MIB).await;
        assert_eq!(status, 206);
        assert_eq!(body, content[part * MIB..(part + 1) * MIB]);
    }
    let (status, _) = get_piece_range(daemon.peer_addr, content_id, 3 * MIB..4 * MIB).await;
    assert_eq!(status, 503);

    let cache_dir = daemon.stop().await;
    let restarted = TestDaemon::start_in("127.0.0.2", node.addr, cache_dir, cap).await;
    // The content survived the restart, and so did the month's count.
    assert!(
        restarted
            .daemon
            .shared()
            .store
            .get(content_id)
            .unwrap()
            .complete
    );
    assert_eq!(
        restarted.daemon.shared().uploads.uploaded_this_month(),
        3 * MIB as u64
    );
    let (status, _) = get_piece_range(restarted.peer_addr, content_id, 0..1).await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_try_to_leave_the_cache_get_4xx_and_read_nothing() {
    let (origin, url, content) = origin_with_content(58).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let content_id = daemon.download(&url).await.content_id.unwrap();
    let secret = b"top secret, outside the cache";
    let outside = daemon.cache_dir.path().join("secret.txt");
    std::fs::write(&outside, secret).unwrap();
    std::fs::write("/tmp/outpost-p2p-secret", secret).unwrap();
    let opened_before = daemon
        .daemon
        .shared()
        .stats
        .files_opened
        .load(Ordering::Relaxed);
    let id = content_id.to_string();
    let targets = [
        "/content/../secret.txt".to_owned(),
        "/content/../../../../tmp/outpost-p2p-secret".to_owned(),
        "/content/..%2fsecret.txt".to_owned(),
        "/content/%2e%2e/%2e%2e/tmp/outpost-p2p-secret".to_owned(),
        format!("/content/{id}/../../secret.txt"),
        format!("/content/{id}/..%2f..%2fsecret.txt"),
        format!("/content/{}", id.to_uppercase()),
        "/secret.txt".to_owned(),
        "/../../../tmp/outpost-p2p-secret".to_owned(),
        "/content/%00".to_owned(),
        "http://peer/content/../secret.txt".to_owned(),
        "/content/".to_owned(),
    ];
    for target in &targets {
        let (status, body) = raw_get(daemon.peer_addr, target, "Range: bytes=0-100\r\n").await;
        assert!((400..500).contains(&status), "{target}: {status}");
        assert!(
            !body.windows(secret.len()).any(|window| window == secret),
            "{target} leaked the secret"
        );
    }
    assert_eq!(
        daemon
            .daemon
            .shared()
            .stats
            .files_opened
            .load(Ordering::Relaxed),
        opened_before,
        "a traversal attempt opened a file"
    );
    let _ = std::fs::remove_file("/tmp/outpost-p2p-secret");
    // The real content is still served, byte for byte.
    let (status, body) = get_piece_range(daemon.peer_addr, content_id, 0..100).await;
    assert_eq!(status, 206);
    assert_eq!(body, content[..100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_reach_the_node_downloads_without_peers() {
    let (_origin, url, content) = origin_with_content(59).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let client = TestDaemon::start("127.0.0.2", dead, |config| {
        config.delay_http_fallback_secs = 600;
    })
    .await;
    let done = client.download(&url).await;
    // No manifest: simple mode, no head start for peers, nothing cached for them.
    assert_eq!(done.content_id, None);
    assert_eq!(done.status.bytes_from_http, CONTENT_LEN as u64);
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert!(client.daemon.shared().store.entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_hands_its_download_to_the_daemon_which_then_serves_it() {
    let (origin, url, content) = origin_with_content(60).await;
    let node = start_node(&origin);
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let directory = tempfile::tempdir().unwrap();
    let output = directory.path().join("handed.bin");
    let peer_client = |arguments: &[&str]| cli(&daemon.control_socket, arguments);
    let stdout = run_ok(peer_client(&[
        "get",
        &url,
        "-o",
        output.to_str().unwrap(),
        "--json",
    ]))
    .await;
    let status: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(status["Status"], "Complete");
    assert_eq!(status["BytesFromCacheServer"], CONTENT_LEN as u64);
    assert_eq!(file_digest(&output), sha256_hex(&content));

    // The daemon has it in its cache, announced and servable.
    let entries = daemon.daemon.shared().store.entries();
    assert_eq!(entries.len(), 1);
    let content_id = entries[0].0;
    until_complete_peers(node.addr, content_id, 1).await;
    let (code, body) = get_piece_range(daemon.peer_addr, content_id, 0..PIECE).await;
    assert_eq!(code, 206);
    assert_eq!(body, content[..PIECE]);

    // `status` and `perf-snap` ask the same daemon.
    let listed = run_ok(peer_client(&["status"])).await;
    let listed: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    assert_eq!(listed[0]["Status"], "Complete");
    assert_eq!(listed[0]["Url"], url);
    let snap = run_ok(peer_client(&["perf-snap"])).await;
    let snap: serde_json::Value = serde_json::from_slice(&snap).unwrap();
    assert_eq!(snap["FilesDownloaded"], 1);
    assert_eq!(snap["CacheSizeBytes"], CONTENT_LEN as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_still_filling_is_asked_again_after_retry_after_within_the_timeout() {
    let origin = MockOrigin::start_on(ORIGIN_IP).await;
    let content = pattern_bytes(2 * MIB, 57);
    // About a second to fill: 32 chunks of 64 KiB, 30 ms apart.
    let slow = outpost_testkit::Behaviour {
        chunk_delay: Some(Duration::from_millis(30)),
        chunk_size: Some(64 * 1024),
        ..outpost_testkit::Behaviour::default()
    };
    origin.put_with("/files/slow.bin", content.clone(), slow);
    let url = format!("{}/files/slow.bin", origin.base_url());
    // The node answers 202 (Retry-After: 1) after 100 ms of waiting for the fill.
    let node = start_node_with(&origin, |config| {
        config.peering.manifest_wait = Duration::from_millis(100);
    });
    let api = NodeApi::new(
        &peer_client::config::CacheHost::parse(&node.addr.to_string()).unwrap(),
        None,
        Duration::from_secs(2),
    );
    // No time to retry: the download would run without peers.
    let hurried = api.manifest(&url, Duration::from_millis(400)).await;
    assert!(
        matches!(
            hurried,
            Err(peer_client::sources::node_api::TrackerError::NotReady
                | peer_client::sources::node_api::TrackerError::Timeout(_))
        ),
        "{hurried:?}"
    );
    // Time enough: 202s until the fill lands, then the manifest.
    let started = Instant::now();
    let manifest = api.manifest(&url, Duration::from_secs(20)).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "it had to wait and retry"
    );
    assert_eq!(manifest.size, content.len() as u64);
    let expected: Vec<[u8; 32]> = content
        .chunks(manifest.piece_size as usize)
        .map(|piece| {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(piece);
            digest.into()
        })
        .collect();
    assert_eq!(manifest.pieces, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_requests_keep_failing_is_retired_after_three() {
    let (origin, url, content) = origin_with_content(61).await;
    let node = start_node(&origin);
    let honest = TestDaemon::start("127.0.0.2", node.addr, |_| {}).await;
    let content_id = honest.download(&url).await.content_id.unwrap();
    let (busy, busy_requests) = start_fake_peer("127.0.0.67", |_| {
        http::Response::builder()
            .status(503)
            .header("retry-after", "5")
            .body(http_body_util::Full::new(Bytes::from_static(b"busy\n")))
            .unwrap()
    })
    .await;
    announce_complete(node.addr, busy, content_id).await;
    until_complete_peers(node.addr, content_id, 2).await;

    let client = TestDaemon::start("127.0.0.5", node.addr, |config| {
        // One connection per peer and quick retries: three failures in a row come long before
        // the end of a two-second download.
        config.peering.connections_per_peer = 1;
        config.transfer.retry_initial_backoff = Duration::from_millis(50);
        config.max_download_bandwidth = "4MiB".into();
    })
    .await;
    let (done, events) = download_with_events(&client, &url).await;
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert!(
        done.status.download_duration_secs >= 1.0,
        "too short to tell: {:?}",
        done.status
    );
    assert_eq!(
        busy_requests.load(Ordering::Relaxed),
        u64::from(peer_client::download::PEER_FAILURES_BEFORE_RETIRING),
        "the failing peer was asked again after it was retired"
    );
    let failures = events
        .iter()
        .filter(|event| {
            matches!(event, Event::SourceFailed { label, .. } if *label == format!("peer {busy}"))
        })
        .count();
    assert_eq!(failures, 3);
    // A failing peer is not a bad one: it is retired, not banned, and the origin stayed shut.
    assert_eq!(done.status.banned_peers, 0);
    assert_eq!(done.status.bytes_from_http, 0);
    assert!(done.status.bytes_from_peers > 0, "{:?}", done.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_http_fallback_keeps_the_origin_shut_for_its_time_then_opens_it() {
    let (origin, url, content) = origin_with_content(62).await;
    let node = start_node(&origin);
    let delay = Duration::from_secs(2);
    let client = TestDaemon::start("127.0.0.4", node.addr, |config| {
        config.delay_http_fallback_secs = delay.as_secs();
        config.max_download_bandwidth = "8MiB".into();
    })
    .await;
    // The manifest makes the node fill the content; it must come from the origin only once.
    let origin_requests_before = origin.request_count();

    let (download, mut received) = spawn_download(&client, &url);
    // Once the download has its manifest and (no) peers, the node dies: nothing but the origin
    // is left, and the origin waits for its time.
    let mut events = Vec::new();
    let mut killing = None;
    let mut node = Some(node);
    while let Some(event) = received.recv().await {
        if matches!(event, Event::PeersFound { .. }) {
            killing = node.take().map(kill_in_background);
        }
        events.push((Instant::now(), event));
    }
    let done = tokio::time::timeout(Duration::from_secs(30), download)
        .await
        .expect("the origin opened and the download finished")
        .unwrap()
        .unwrap();
    killing.expect("peers were reported").await.unwrap();
    let started = events
        .iter()
        .find(|(_, event)| matches!(event, Event::PeersFound { .. }))
        .map(|(at, _)| *at)
        .unwrap();
    let opened = events
        .iter()
        .find(|(_, event)| *event == Event::FallbackToOrigin)
        .map(|(at, _)| *at)
        .expect("the origin was opened");
    let waited = opened.duration_since(started);
    // The engine's clock starts a moment before the peers are reported.
    assert!(
        waited >= delay - Duration::from_millis(200),
        "the origin opened after {waited:?}"
    );
    assert!(waited < delay + Duration::from_secs(8), "{waited:?}");
    assert!(done.status.bytes_from_http > 0, "{:?}", done.status);
    assert_eq!(file_digest(&done.path), sha256_hex(&content));
    assert!(origin.request_count() > origin_requests_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_download_that_fails_is_abandoned_and_its_pieces_are_no_longer_served() {
    let (origin, url, content) = origin_with_content(63).await;
    let node = start_node(&origin);
    let client = TestDaemon::start("127.0.0.4", node.addr, |config| {
        // Slow, and without the origin: when the node dies the download must fail.
        config.max_download_bandwidth = "2MiB".into();
        config.cache.connections_per_host = 1;
        config.delay_cache_fallback_secs = -1;
        config.transfer.retry_initial_backoff = Duration::from_millis(50);
        config.transfer.max_consecutive_failures = 3;
    })
    .await;
    let (download, mut received) = spawn_download(&client, &url);
    let written = loop {
        if let Event::PieceWritten { index } = received.recv().await.unwrap() {
            break index as usize;
        }
    };
    let content_id = client.daemon.shared().store.entries()[0].0;
    let entry_dir = client
        .daemon
        .shared()
        .store
        .data_path(content_id)
        .parent()
        .unwrap()
        .to_path_buf();
    let piece = written * PIECE..(written + 1) * PIECE;
    // A written piece of the running download is served to peers.
    let (status, body) = get_piece_range(client.peer_addr, content_id, piece.clone()).await;
    assert_eq!(status, 206);
    assert_eq!(body, content[piece.clone()]);

    kill_in_background(node).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(30), download)
        .await
        .expect("the download gives up")
        .unwrap()
        .expect_err("no source is left");
    assert!(
        matches!(error, peer_client::DownloadError::GaveUp { .. }),
        "{error}"
    );
    // Abandoned: no entry, no files, nothing served, and the status says why.
    assert!(client.daemon.shared().store.entries().is_empty());
    assert!(
        !entry_dir.exists(),
        "{} is still there",
        entry_dir.display()
    );
    let (status, _) = get_piece_range(client.peer_addr, content_id, piece).await;
    assert_eq!(status, 404);
    let listed = client.daemon.status();
    assert_eq!(listed[0].status, "Error");
    assert!(listed[0].error.as_deref().unwrap().contains("gave up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_evicted_to_make_room_is_withdrawn_from_the_tracker_and_no_longer_served() {
    let (origin, first_url, first) = origin_with_content(64).await;
    let second = pattern_bytes(CONTENT_LEN, 65);
    origin.put("/files/second.bin", second.clone());
    let second_url = format!("{}/files/second.bin", origin.base_url());
    let node = start_node(&origin);
    // Room for one of the two 8 MiB files.
    let daemon = TestDaemon::start("127.0.0.2", node.addr, |config| {
        config.daemon.max_cache_size = "12MiB".into();
    })
    .await;
    let first_id = daemon.download(&first_url).await.content_id.unwrap();
    until_complete_peers(node.addr, first_id, 1).await;
    let (status, body) = get_piece_range(daemon.peer_addr, first_id, 0..PIECE).await;
    assert_eq!((status, body), (206, first[..PIECE].to_vec()));

    let second_id = daemon.download(&second_url).await.content_id.unwrap();
    // The older content went as soon as the second download completed.
    let held: Vec<_> = daemon
        .daemon
        .shared()
        .store
        .entries()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(held, [second_id]);
    assert_eq!(
        daemon.daemon.perf_snap()["CacheSizeBytes"],
        CONTENT_LEN as u64
    );
    let (status, _) = get_piece_range(daemon.peer_addr, first_id, 0..PIECE).await;
    assert_eq!(status, 404);
    let (status, body) = get_piece_range(daemon.peer_addr, second_id, 0..PIECE).await;
    assert_eq!((status, body), (206, second[..PIECE].to_vec()));
    // The tracker stops offering it for the evicted content, long before its TTL.
    eventually_async(
        "the evicted content to be withdrawn",
        Duration::from_secs(10),
        async || {
            !tracked_peers(node.addr, first_id)
                .await
                .iter()
                .any(|peer| peer.address == daemon.peer_addr)
        },
    )
    .await;
    until_complete_peers(node.addr, second_id, 1).await;
}
