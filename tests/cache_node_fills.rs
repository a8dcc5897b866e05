//! End-to-end: how fills behave. Many clients of one cold object cost one origin fetch and all
//! stream while it arrives; a fill outlives the client that started it; an origin that dies, lies
//! or changes its content never leads to a wrong byte being served as complete.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use outpost_testkit::{
    eventually, eventually_every, files_under, pattern_bytes, sha256_hex, Behaviour, MockOrigin,
};

/// How long a background effect (a fill that finishes after its client left, files deleted after
/// an eviction) may take.
const PATIENCE: Duration = Duration::from_secs(20);

fn slow(chunk_delay_ms: u64) -> Behaviour {
    Behaviour {
        chunk_delay: Some(Duration::from_millis(chunk_delay_ms)),
        chunk_size: Some(64 * 1024),
        ..Behaviour::default()
    }
}

/// Starts one client per range (None = the whole object) at once, checks every body, and
/// returns when each client received its first body bytes.
async fn concurrent_clients(
    url: String,
    content: bytes::Bytes,
    ranges: Vec<Option<(usize, usize)>>,
) -> Vec<Instant> {
    let mut clients = Vec::new();
    for (client_index, range) in ranges.into_iter().enumerate() {
        let url = url.clone();
        let content = content.clone();
        clients.push(tokio::spawn(async move {
            let mut builder = client().get(&url);
            let expected = match range {
                Some((first, last)) => {
                    builder = builder.header("range", format!("bytes={first}-{last}"));
                    content.slice(first..=last)
                }
                None => content.clone(),
            };
            let response = builder.send().await.unwrap();
            assert!(response.status().is_success());
            let mut stream = response.bytes_stream();
            let mut body = Vec::new();
            let mut first_bytes_at = None;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.expect("body streams without error");
                if !chunk.is_empty() && first_bytes_at.is_none() {
                    first_bytes_at = Some(Instant::now());
                }
                body.extend_from_slice(&chunk);
            }
            assert_eq!(
                sha256_hex(&body),
                sha256_hex(&expected),
                "client {client_index} {range:?}"
            );
            first_bytes_at.expect("every client got bytes")
        }));
    }
    let mut first_bytes = Vec::new();
    for client in clients {
        first_bytes.push(client.await.unwrap());
    }
    first_bytes
}

/// Resolves when the origin has sent `total` body bytes in all, at the moment it sees that.
async fn origin_sent(origin: &MockOrigin, total: u64) -> Instant {
    // Looked at every millisecond: the moment is compared with when clients got their first bytes.
    eventually_every(
        &format!("the origin to send {total} bytes"),
        Duration::from_secs(60),
        Duration::from_millis(1),
        async || origin.bytes_sent() >= total,
    )
    .await;
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_cost_one_origin_fetch_and_all_stream_while_it_fills() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(8 * 1024 * 1024 + 13, 11);
    // At 5 ms per 64 KiB the fill takes at least 0.6 s, far longer than 32 clients take to
    // connect.
    origin.put_with("/cold.bin", content.clone(), slow(5));
    let (first_bytes, fill_ended) = tokio::join!(
        concurrent_clients(node.mcc_url("/cold.bin"), content.clone(), vec![None; 32]),
        origin_sent(&origin, content.len() as u64)
    );
    let streamed_early = first_bytes.iter().filter(|at| **at < fill_ended).count();
    assert_eq!(
        streamed_early, 32,
        "every client got its first bytes before the origin finished sending"
    );
    assert_eq!(
        origin.request_count(),
        1,
        "one upstream request for all 32 clients"
    );
    assert_eq!(
        origin.max_fetches_of_any_byte("/cold.bin"),
        1,
        "every byte fetched once"
    );
    assert_eq!(origin.min_fetches_of_any_byte("/cold.bin"), 1);
    let stats = node.stats().await;
    assert_eq!(
        stats["origin_bytes"].as_u64().unwrap(),
        content.len() as u64
    );
    assert_eq!(
        stats["egress_bytes"].as_u64().unwrap(),
        32 * content.len() as u64
    );

    // Mixed whole and overlapping ranged clients: whoever starts the discovery, the other
    // clients only fetch the runs nobody has claimed, so no byte crosses the WAN twice.
    content_with_mixed_clients(&node, &origin).await;
    node.stop().await;
}

async fn content_with_mixed_clients(node: &TestNode, origin: &MockOrigin) {
    let content = pattern_bytes(6 * 1024 * 1024 + 5, 12);
    origin.put_with("/mixed.bin", content.clone(), slow(2));
    let ranges: Vec<Option<(usize, usize)>> = (0..32usize)
        .map(|index| (index % 4 == 3).then(|| (index * 150_000, index * 150_000 + 900_000)))
        .collect();
    concurrent_clients(node.mcc_url("/mixed.bin"), content, ranges).await;
    assert_eq!(
        origin.max_fetches_of_any_byte("/mixed.bin"),
        1,
        "every byte fetched at most once"
    );
    assert_eq!(
        origin.min_fetches_of_any_byte("/mixed.bin"),
        1,
        "and every byte was fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_bytes_before_the_fill_ends_and_the_fill_outlives_it() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(4 * 1024 * 1024, 5);
    origin.put_with("/slow.bin", content.clone(), slow(5));

    let response = client()
        .get(node.mcc_url("/slow.bin"))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert!(
        origin.bytes_sent() < content.len() as u64,
        "the first bytes reached the client while the origin was still sending"
    );
    drop(stream);

    eventually("the abandoned fill completes", PATIENCE, || {
        node.node.index.used_bytes() == content.len() as u64
    })
    .await;
    let requests = origin.request_count();
    let again = get(&node.mcc_url("/slow.bin"), &[]).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(again.bytes()), sha256_hex(&content));
    assert_eq!(origin.request_count(), requests);
    node.stop().await;
}

#[tokio::test]
async fn an_origin_that_drops_mid_body_aborts_the_response_and_nothing_partial_is_kept() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(300_000, 9);
    origin.put_with(
        "/drop.bin",
        content.clone(),
        Behaviour {
            drop_after_bytes: Some(100_000),
            ..Behaviour::default()
        },
    );
    let cut = get(&node.mcc_url("/drop.bin"), &[]).await;
    assert_eq!(
        cut.status, 200,
        "the response had started when the origin died"
    );
    assert!(
        cut.body.is_err(),
        "the client must see an aborted body, not a clean end: {:?}",
        cut.body.as_ref().map(|b| b.len())
    );
    let ranged = get(&node.mcc_url("/drop.bin"), &[("range", "bytes=150000-")]).await;
    assert!(
        ranged.status >= 500 || ranged.body.is_err(),
        "a ranged read of the lost part fails too"
    );

    // Only complete slices were stored. The first response died after 100,000 bytes: slice 0
    // (0..65536) is complete, slice 1 is not. The ranged request fetched from slice 2 (131072) and
    // died after another 100,000 bytes: slice 2 is complete, slice 3 is not. The writes finish in
    // the background.
    node.settle().await;
    assert_eq!(node.node.index.used_bytes(), 2 * TEST_SLICE);
    assert_eq!(node.node.index.object_count(), 1);
    origin.put("/drop.bin", content.clone());
    let healed = get(&node.mcc_url("/drop.bin"), &[]).await;
    assert_eq!(sha256_hex(healed.bytes()), sha256_hex(&content));
    assert_eq!(healed.header("x-cache").as_deref(), Some("PARTIAL"));
    node.stop().await;
}

#[tokio::test]
async fn an_origin_that_lies_about_the_length_never_gets_a_response_served_as_complete() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(200_000, 4);
    origin.put_with(
        "/liar.bin",
        content.clone(),
        Behaviour {
            lie_total_len: Some(400_000),
            ..Behaviour::default()
        },
    );
    // The first slice really exists, so a small range is served, byte-exact.
    let small = get(&node.mcc_url("/liar.bin"), &[("range", "bytes=0-99")]).await;
    assert_eq!(small.status, 206);
    assert_eq!(small.bytes(), &content[..100]);
    // The whole object and a range past the real end cannot be served completely: they fail
    // (a 5xx, or a body cut short), and never arrive as a successful complete response.
    for range in [None, Some("bytes=250000-")] {
        let headers: Vec<(&str, &str)> = range.iter().map(|range| ("range", *range)).collect();
        let fetched = get(&node.mcc_url("/liar.bin"), &headers).await;
        let complete_and_successful = fetched.status < 300 && fetched.body.is_ok();
        assert!(
            !complete_and_successful,
            "{range:?} was served as complete: {} with {:?} bytes",
            fetched.status,
            fetched.body.as_ref().map(|body| body.len())
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn an_etag_change_between_fills_never_stitches_two_versions() {
    let (origin, _storage, node) = origin_and_node().await;
    let version_one = pattern_bytes(300_000, 1);
    let version_two = pattern_bytes(300_000, 2);
    origin.put("/changing.bin", version_one.clone());
    let head = get(
        &node.mcc_url("/changing.bin"),
        &[("range", "bytes=0-65535")],
    )
    .await;
    assert_eq!(head.bytes(), &version_one[..65536]);
    let etag_one = head.header("etag").unwrap();

    origin.put("/changing.bin", version_two.clone());
    let tail = get(
        &node.mcc_url("/changing.bin"),
        &[("range", "bytes=200000-299999")],
    )
    .await;
    assert_eq!(tail.status, 206);
    assert_eq!(
        tail.bytes(),
        &version_two[200_000..],
        "the new version's bytes, not a mix"
    );
    let etag_two = tail.header("etag").unwrap();
    assert_ne!(etag_one, etag_two);

    let full = get(&node.mcc_url("/changing.bin"), &[]).await;
    assert_eq!(sha256_hex(full.bytes()), sha256_hex(&version_two));
    assert_eq!(full.header("etag").unwrap(), etag_two);
    assert!(node.stats().await["version_changes"].as_u64().unwrap() >= 1);

    // A change of length is a change of version too.
    let version_three = pattern_bytes(500_000, 3);
    origin.put("/changing.bin", version_three.clone());
    node.node
        .index
        .remove(&node.node.index.get(&cache_key("/changing.bin")).unwrap());
    let _ = get(&node.mcc_url("/changing.bin"), &[("range", "bytes=0-10")]).await;
    let version_four = pattern_bytes(400_000, 4);
    origin.put("/changing.bin", version_four.clone());
    // Slice 0 of version three is stored, so the answer starts from disk before the fill of the
    // rest discovers the change: that response must be cut short, never completed with a mix.
    let mixed = get(&node.mcc_url("/changing.bin"), &[]).await;
    assert!(
        mixed.body.is_err(),
        "a response that began with the old version is aborted"
    );
    let retried = get(&node.mcc_url("/changing.bin"), &[]).await;
    assert_eq!(retried.header("content-length").unwrap(), "400000");
    assert_eq!(sha256_hex(retried.bytes()), sha256_hex(&version_four));
    node.stop().await;
}

fn cache_key(path: &str) -> cache_node::cache::key::CacheKey {
    cache_node::cache::key::CacheKey::new(ORIGIN_HOST, path)
}

#[tokio::test]
async fn an_origin_that_ignores_range_is_stored_whole_and_one_without_length_is_passed_through() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(500_000, 8);
    origin.put_with(
        "/norange.bin",
        content.clone(),
        Behaviour {
            ignore_range: true,
            ..Behaviour::default()
        },
    );
    let part = get(
        &node.mcc_url("/norange.bin"),
        &[("range", "bytes=300000-300099")],
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.bytes(), &content[300_000..300_100]);
    eventually("the whole body is stored", PATIENCE, || {
        node.node.index.used_bytes() == content.len() as u64
    })
    .await;
    let full = get(&node.mcc_url("/norange.bin"), &[]).await;
    assert_eq!(full.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(full.bytes()), sha256_hex(&content));
    assert_eq!(origin.request_count(), 1);

    origin.put_with(
        "/chunked.bin",
        content.clone(),
        Behaviour {
            ignore_range: true,
            chunked: true,
            ..Behaviour::default()
        },
    );
    let passed = get(&node.mcc_url("/chunked.bin"), &[]).await;
    assert_eq!(passed.status, 200);
    assert_eq!(passed.header("x-cache").as_deref(), Some("BYPASS"));
    assert_eq!(sha256_hex(passed.bytes()), sha256_hex(&content));
    node.stop().await;
}

#[tokio::test]
async fn eviction_keeps_the_store_under_max_size_and_deletes_the_files() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    // Room for about four 1 MiB objects.
    let node = TestNode::start(test_config(
        storage.path(),
        &origin.base_url(),
        TEST_SLICE,
        "4MiB",
    ))
    .await;
    for index in 0..12u64 {
        let path = format!("/evict-{index}.bin");
        let content = pattern_bytes(1024 * 1024, index);
        origin.put(&path, content.clone());
        let fetched = get(&node.mcc_url(&path), &[]).await;
        assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(&content));
        eventually("the object is stored", PATIENCE, || {
            node.node
                .index
                .get(&cache_key(&path))
                .is_some_and(|entry| entry.is_complete())
                || node.node.index.get(&cache_key(&path)).is_none()
        })
        .await;
    }
    let limit = 4 * 1024 * 1024;
    eventually("evicted files are deleted", PATIENCE, || {
        disk_usage(storage.path()) <= limit + 64 * 1024
    })
    .await;
    let stats = node.stats().await;
    assert!(
        stats["cache_used_bytes"].as_u64().unwrap() <= limit,
        "{stats}"
    );
    assert!(stats["objects"].as_u64().unwrap() <= 4, "{stats}");
    assert_eq!(stats["cache_max_bytes"].as_u64().unwrap(), limit);
    // The most recent object survived and is a hit; the oldest is gone and refetched.
    let recent = get(&node.mcc_url("/evict-11.bin"), &[]).await;
    assert_eq!(recent.header("x-cache").as_deref(), Some("HIT"));
    let oldest = get(&node.mcc_url("/evict-0.bin"), &[]).await;
    assert_eq!(oldest.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(
        sha256_hex(oldest.bytes()),
        sha256_hex(&pattern_bytes(1024 * 1024, 0))
    );
    node.stop().await;
}

/// Bytes in regular files under `root` (slice files and metadata).
fn disk_usage(root: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let metadata = entry.metadata().unwrap();
            if metadata.is_dir() {
                pending.push(entry.path());
            } else if entry.file_name() != "meta.json" {
                total += metadata.len();
            }
        }
    }
    total
}

#[tokio::test]
async fn origin_timeouts_give_a_clean_gateway_error_or_an_aborted_body() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.upstream.first_byte_timeout = Duration::from_millis(300);
    config.upstream.idle_read_timeout = Duration::from_millis(300);
    let node = TestNode::start(config).await;

    // No response headers within the first-byte timeout: nothing was sent yet, so a clean 504.
    origin.put_with(
        "/silent.bin",
        pattern_bytes(1000, 1),
        Behaviour {
            header_delay: Some(Duration::from_secs(3)),
            ..Behaviour::default()
        },
    );
    let silent = get(&node.mcc_url("/silent.bin"), &[]).await;
    assert_eq!(silent.status, 504);

    // The body stalls longer than the idle timeout after the first chunk: the response had
    // started, so it is aborted; and the stalled slice is not stored.
    let content = pattern_bytes(300_000, 2);
    origin.put_with(
        "/stall.bin",
        content.clone(),
        Behaviour {
            chunk_size: Some(100_000),
            chunk_delay: Some(Duration::from_secs(3)),
            ..Behaviour::default()
        },
    );
    let stalled = get(&node.mcc_url("/stall.bin"), &[]).await;
    assert_eq!(stalled.status, 200);
    assert!(stalled.body.is_err(), "a stalled fill aborts its client");
    node.settle().await;
    assert_eq!(
        node.node.index.used_bytes(),
        TEST_SLICE,
        "only the complete first slice is kept"
    );
    assert!(node.stats().await["origin_errors"].as_u64().unwrap() >= 2);
    node.stop().await;
}

/// A storage backend whose disk is "full": every write after the first `allowed_writes` fails
/// with ENOSPC, as a real full disk would.
struct FullDisk {
    inner: cache_node::disk::SharedStorage,
    allowed_writes: std::sync::atomic::AtomicUsize,
}

impl cache_node::disk::Storage for FullDisk {
    fn backend_name(&self) -> &'static str {
        "full-disk"
    }
    fn read_at(
        &self,
        path: std::path::PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> cache_node::disk::DiskFuture<Vec<u8>> {
        self.inner.read_at(path, offset, length, buffer)
    }
    fn write_file_atomic(
        &self,
        path: std::path::PathBuf,
        chunks: Vec<bytes::Bytes>,
        sync: bool,
    ) -> cache_node::disk::DiskFuture<()> {
        use std::sync::atomic::Ordering;
        let allowed = self
            .allowed_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok();
        if allowed {
            return self.inner.write_file_atomic(path, chunks, sync);
        }
        Box::pin(async move {
            Err(cache_node::error::DiskError::io(
                "write",
                path,
                std::io::Error::from_raw_os_error(28),
            ))
        })
    }
    fn remove_dir_all(&self, path: std::path::PathBuf) -> cache_node::disk::DiskFuture<()> {
        self.inner.remove_dir_all(path)
    }
}

#[tokio::test]
async fn a_full_disk_still_serves_every_byte_correctly_and_stores_nothing_broken() {
    let origin = MockOrigin::start().await;
    let storage_dir = tempfile::tempdir().unwrap();
    let valid = usual_config(storage_dir.path(), &origin.base_url())
        .validate()
        .unwrap();
    let layout = cache_node::cache::store::Layout::create_drives(&valid.drives).unwrap();
    // The metadata and two slices fit; then the disk is full.
    let full_disk = std::sync::Arc::new(FullDisk {
        inner: std::sync::Arc::new(cache_node::disk::portable::PortableStorage::new()),
        allowed_writes: std::sync::atomic::AtomicUsize::new(3),
    });
    let node = cache_node::node::Node::open_with_storage(&valid, layout, full_disk).unwrap();
    let node = TestNode::start_node(node, &valid).await;
    let content = pattern_bytes(500_000, 61);
    origin.put("/full.bin", content.clone());

    let first = get(&node.mcc_url("/full.bin"), &[]).await;
    assert_eq!(
        sha256_hex(first.bytes()),
        sha256_hex(&content),
        "clients are served from the origin stream"
    );
    node.settle().await;
    let stats = node.stats().await;
    assert!(stats["disk_write_errors"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(
        stats["cache_used_bytes"].as_u64().unwrap(),
        2 * TEST_SLICE,
        "only the slices that were written count"
    );

    // The next request serves the stored slices and fetches the rest again, correctly.
    let second = get(&node.mcc_url("/full.bin"), &[]).await;
    assert_eq!(second.header("x-cache").as_deref(), Some("PARTIAL"));
    assert_eq!(sha256_hex(second.bytes()), sha256_hex(&content));
    let ranged = get(
        &node.mcc_url("/full.bin"),
        &[("range", "bytes=60000-200000")],
    )
    .await;
    assert_eq!(ranged.bytes(), &content[60_000..=200_000]);
    node.stop().await;

    // After a restart on a working disk, nothing broken was left behind.
    let restarted = TestNode::start(usual_config(storage_dir.path(), &origin.base_url())).await;
    let healed = get(&restarted.mcc_url("/full.bin"), &[]).await;
    assert_eq!(sha256_hex(healed.bytes()), sha256_hex(&content));
    restarted.stop().await;
}

#[tokio::test]
async fn stored_versions_are_revalidated_after_revalidate_after_and_served_stale_when_the_origin_fails(
) {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    // Every request is checked (a volatile mirror's index files need that).
    config.upstream.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    let url = node.mcc_url("/dists/stable/InRelease");
    let version_one = pattern_bytes(200_000, 11);
    origin.put("/dists/stable/InRelease", version_one.clone());
    let first = get(&url, &[]).await;
    assert_eq!(sha256_hex(first.bytes()), sha256_hex(&version_one));
    node.settle().await;

    // Unchanged: a one-byte check, then a hit from disk.
    let requests = origin.request_count();
    let again = get(&url, &[]).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(again.bytes()), sha256_hex(&version_one));
    assert_eq!(
        origin.request_count(),
        requests + 1,
        "one revalidation request"
    );

    // Changed at the origin (same length, new ETag): the new version, never the stored one.
    let version_two = pattern_bytes(200_000, 12);
    origin.put("/dists/stable/InRelease", version_two.clone());
    let changed = get(&url, &[]).await;
    assert_eq!(sha256_hex(changed.bytes()), sha256_hex(&version_two));
    node.settle().await;

    // The origin fails: the stored version is served (stale-if-error), not an error.
    origin.set_behaviour(
        "/dists/stable/InRelease",
        Behaviour {
            status_override: Some(503),
            ..Behaviour::default()
        },
    );
    let stale = get(&url, &[]).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(stale.bytes()), sha256_hex(&version_two));

    // Gone at the origin: its answer, not the stored copy.
    origin.remove("/dists/stable/InRelease");
    let gone = get(&url, &[]).await;
    assert_eq!(gone.status, 404);
    let stats = node.stats().await;
    assert!(stats["revalidations"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["version_changes"].as_u64().unwrap() >= 2, "{stats}");
    node.stop().await;
}

#[tokio::test]
async fn within_revalidate_after_a_stored_version_is_served_without_asking_the_origin() {
    let (origin, _storage, node) = origin_and_node().await;
    let version_one = pattern_bytes(100_000, 21);
    origin.put("/pool/a.deb", version_one.clone());
    let _ = get(&node.mcc_url("/pool/a.deb"), &[]).await;
    node.settle().await;
    origin.put("/pool/a.deb", pattern_bytes(100_000, 22));
    let requests = origin.request_count();
    let hit = get(&node.mcc_url("/pool/a.deb"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&version_one));
    assert_eq!(
        origin.request_count(),
        requests,
        "the default hour has not passed"
    );
    assert_eq!(node.stats().await["revalidations"].as_u64(), Some(0));
    node.stop().await;
}

#[tokio::test]
async fn the_origins_cache_control_sets_how_long_a_version_is_served_unchecked() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    // The node's own default would check every request; the origin says otherwise per object.
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.upstream.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config.clone()).await;
    let long = pattern_bytes(150_000, 31);
    origin.put_with(
        "/pool/long.deb",
        long.clone(),
        with_headers(&[("cache-control", "public, max-age=3600")]),
    );
    let volatile = pattern_bytes(150_000, 32);
    origin.put_with(
        "/dists/InRelease",
        volatile.clone(),
        with_headers(&[("cache-control", "no-cache")]),
    );
    let _ = get(&node.mcc_url("/pool/long.deb"), &[]).await;
    let _ = get(&node.mcc_url("/dists/InRelease"), &[]).await;
    node.settle().await;

    // max-age=3600: served for the hour without asking, though the origin changed it.
    origin.put_with(
        "/pool/long.deb",
        pattern_bytes(150_000, 33),
        with_headers(&[("cache-control", "public, max-age=3600")]),
    );
    let requests = origin.request_count();
    let hit = get(&node.mcc_url("/pool/long.deb"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&long));
    assert_eq!(origin.request_count(), requests, "max-age has not run out");
    // The origin's own header goes to the client, with the stored copy's age.
    assert_eq!(
        hit.header("cache-control").as_deref(),
        Some("public, max-age=3600")
    );
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!(age < 60, "{age}");

    // no-cache: checked on every request; a change is seen at once.
    let checked = get(&node.mcc_url("/dists/InRelease"), &[]).await;
    assert_eq!(checked.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(origin.request_count(), requests + 1, "one revalidation");
    let newer = pattern_bytes(150_000, 34);
    origin.put_with(
        "/dists/InRelease",
        newer.clone(),
        with_headers(&[("cache-control", "no-cache")]),
    );
    let changed = get(&node.mcc_url("/dists/InRelease"), &[]).await;
    assert_eq!(sha256_hex(changed.bytes()), sha256_hex(&newer));
    node.settle().await;
    node.stop().await;

    // The lifetime is stored with the version: after a restart the hour still holds.
    let restarted = TestNode::start(config).await;
    let requests = origin.request_count();
    let after_restart = get(&restarted.mcc_url("/pool/long.deb"), &[]).await;
    assert_eq!(after_restart.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(after_restart.bytes()), sha256_hex(&long));
    assert_eq!(origin.request_count(), requests);
    restarted.stop().await;
}

#[tokio::test]
async fn content_marked_no_store_or_private_is_relayed_ranges_and_all_and_never_stored() {
    let (origin, storage, node) = origin_and_node().await;
    let content = pattern_bytes(300_000, 35);
    for (path, cache_control) in [
        ("/account/statement.pdf", "private, max-age=60"),
        ("/live/feed.json", "no-store"),
    ] {
        origin.put_with(
            path,
            content.clone(),
            with_headers(&[("cache-control", cache_control)]),
        );
        let whole = get(&node.mcc_url(path), &[]).await;
        assert_eq!(whole.status, 200, "{path}");
        assert_eq!(whole.header("x-cache").as_deref(), Some("BYPASS"));
        assert_eq!(
            whole.header("cache-control").as_deref(),
            Some(cache_control)
        );
        assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&content));

        // A range goes to the origin as a range, and only it comes back.
        let requests = origin.request_count();
        let part = get(&node.mcc_url(path), &[("range", "bytes=1000-1999")]).await;
        assert_eq!(part.status, 206, "{path}");
        assert_eq!(
            part.header("content-range").as_deref(),
            Some("bytes 1000-1999/300000")
        );
        assert_eq!(part.bytes(), &content[1000..2000]);
        // Remembered as not storable: no second discovery, one relayed request.
        assert_eq!(origin.request_count(), requests + 1, "{path}");
    }
    node.settle().await;
    assert_eq!(node.node.index.used_bytes(), 0);
    assert_eq!(node.node.index.object_count(), 0);
    let stats = node.stats().await;
    assert_eq!(stats["pass_through_requests"].as_u64(), Some(4), "{stats}");
    assert_eq!(stats["hit_bytes"].as_u64(), Some(0), "{stats}");
    node.stop().await;
    // Nothing on disk either: no metadata or slice file anywhere under the store (the drive's
    // `format` file says what the store is, not what it holds).
    let stored: Vec<_> = files_under(storage.path())
        .into_iter()
        .filter(|path| !path.to_string_lossy().contains("peer"))
        .filter(|path| *path != storage.path().join("format"))
        .collect();
    assert!(stored.is_empty(), "{stored:?}");
}

#[tokio::test]
async fn a_stored_version_the_origin_later_marks_no_store_is_dropped_and_relayed() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.upstream.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    let content = pattern_bytes(120_000, 36);
    origin.put("/feed.xml", content.clone());
    let _ = get(&node.mcc_url("/feed.xml"), &[]).await;
    node.settle().await;
    assert_eq!(node.node.index.object_count(), 1);

    origin.set_behaviour("/feed.xml", with_headers(&[("cache-control", "no-store")]));
    let relayed = get(&node.mcc_url("/feed.xml"), &[]).await;
    assert_eq!(relayed.header("x-cache").as_deref(), Some("BYPASS"));
    assert_eq!(sha256_hex(relayed.bytes()), sha256_hex(&content));
    assert_eq!(node.node.index.object_count(), 0);
    node.stop().await;
}

#[tokio::test]
async fn in_ignore_mode_everything_is_stored_as_lancache_does() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.upstream.cache_control = "ignore".into();
    let node = TestNode::start(config).await;
    let content = pattern_bytes(120_000, 37);
    origin.put_with(
        "/update.cab",
        content.clone(),
        with_headers(&[("cache-control", "private, no-store")]),
    );
    let _ = get(&node.mcc_url("/update.cab"), &[]).await;
    node.settle().await;
    let hit = get(&node.mcc_url("/update.cab"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&content));
    node.stop().await;
}

fn proxied_config(
    storage: &std::path::Path,
    origin: &MockOrigin,
    proxy: &str,
) -> cache_node::config::Config {
    let mut config = test_config(storage, &origin.base_url(), TEST_SLICE, "1GiB");
    config.upstream.proxy = proxy.to_owned();
    config
}

#[tokio::test]
async fn origins_are_reached_through_the_outbound_proxy_with_its_credentials() {
    let origin = MockOrigin::start().await;
    // "outpost:s3cret" in base64.
    let proxy = outpost_testkit::MockProxy::start_requiring("Basic b3V0cG9zdDpzM2NyZXQ=").await;
    let proxy_url = proxy.url().replace("http://", "http://outpost:s3cret@");
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(proxied_config(storage.path(), &origin, &proxy_url)).await;
    let content = pattern_bytes(300_000, 41);
    origin.put("/proxied.bin", content.clone());
    let whole = get(&node.mcc_url("/proxied.bin"), &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&content));
    let part = get(&node.mcc_url("/proxied.bin"), &[("range", "bytes=5-9")]).await;
    assert_eq!(part.bytes(), &content[5..10]);
    // Every origin request went through the proxy, in absolute form, with the credentials.
    let seen = proxy.requests();
    assert_eq!(seen.len(), origin.request_count(), "{seen:?}");
    for request in &seen {
        assert_eq!(request.method, "GET");
        assert!(
            request
                .target
                .starts_with(&format!("{}/proxied.bin", origin.base_url())),
            "{request:?}"
        );
        assert_eq!(
            request.authorization.as_deref(),
            Some("Basic b3V0cG9zdDpzM2NyZXQ=")
        );
    }
    node.stop().await;

    // Wrong credentials: a clear 502 for the client, never the proxy's 407.
    let wrong = proxy.url().replace("http://", "http://outpost:wrong@");
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(proxied_config(storage.path(), &origin, &wrong)).await;
    let refused = get(&node.mcc_url("/proxied.bin"), &[]).await;
    assert_eq!(refused.status, 502);
    assert!(
        String::from_utf8_lossy(refused.bytes()).contains("upstream.proxy"),
        "{:?}",
        String::from_utf8_lossy(refused.bytes())
    );
    node.stop().await;
}

#[tokio::test]
async fn https_origins_are_tunnelled_and_no_proxy_hosts_go_direct() {
    let origin = MockOrigin::start().await;
    let proxy = outpost_testkit::MockProxy::start().await;
    let storage = tempfile::tempdir().unwrap();
    // An https origin through the proxy: the node asks for a CONNECT tunnel and runs TLS inside
    // it. The far end here is the plain-HTTP mock origin, so the handshake fails: a 502, and
    // no byte of it is served or stored.
    let mut config = proxied_config(storage.path(), &origin, &proxy.url());
    let https_base = origin.base_url().replace("http://", "https://");
    config.origin[0].upstream = Some(https_base);
    let node = TestNode::start(config).await;
    origin.put("/tls.bin", pattern_bytes(1000, 42));
    let failed = get(&node.mcc_url("/tls.bin"), &[]).await;
    assert_eq!(failed.status, 502);
    let seen = proxy.requests();
    assert_eq!(seen[0].method, "CONNECT", "{seen:?}");
    assert_eq!(seen[0].target, origin.addr().to_string());
    assert_eq!(node.node.index.object_count(), 0);
    node.stop().await;

    // no_proxy: the origin's address is reached directly; the proxy sees nothing more.
    let before = proxy.requests().len();
    let storage = tempfile::tempdir().unwrap();
    let mut config = proxied_config(storage.path(), &origin, &proxy.url());
    config.upstream.no_proxy = "localhost, 127.0.0.1".into();
    let node = TestNode::start(config).await;
    let content = pattern_bytes(10_000, 43);
    origin.put("/direct.bin", content.clone());
    let direct = get(&node.mcc_url("/direct.bin"), &[]).await;
    assert_eq!(sha256_hex(direct.bytes()), sha256_hex(&content));
    assert_eq!(proxy.requests().len(), before);
    node.stop().await;
}

#[tokio::test]
async fn an_origin_can_override_the_freshness_settings() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    // The subdomains (a Linux mirror, say) are checked on every request whatever the origin
    // says; the main host keeps the global settings and honours max-age.
    config.origin[1].revalidate_after = Some(Duration::ZERO);
    config.origin[1].cache_control = Some("ignore".into());
    let node = TestNode::start(config).await;
    let mirror_url = format!(
        "http://{}/dists/InRelease?cacheHostOrigin=mirror.{ORIGIN_HOST}",
        node.addr
    );
    let main_url = node.mcc_url("/dists/InRelease");
    let headers = with_headers(&[("cache-control", "max-age=3600")]);
    origin.put_with(
        "/dists/InRelease",
        pattern_bytes(50_000, 44),
        headers.clone(),
    );
    let first = get(&mirror_url, &[]).await;
    let main_first = get(&main_url, &[]).await;
    assert_eq!(first.bytes(), main_first.bytes());
    node.settle().await;

    let newer = pattern_bytes(50_000, 45);
    origin.put_with("/dists/InRelease", newer.clone(), headers);
    let mirror_again = get(&mirror_url, &[]).await;
    assert_eq!(sha256_hex(mirror_again.bytes()), sha256_hex(&newer));
    let main_again = get(&main_url, &[]).await;
    assert_eq!(main_again.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(
        main_again.bytes(),
        main_first.bytes(),
        "max-age still holds here"
    );
    node.stop().await;
}

#[tokio::test]
async fn while_the_origin_does_not_answer_stale_hits_wait_out_one_timeout_not_one_each() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.upstream.revalidate_after = Duration::ZERO;
    config.upstream.first_byte_timeout = Duration::from_secs(2);
    let node = TestNode::start(config).await;
    let a = pattern_bytes(100_000, 46);
    let b = pattern_bytes(100_000, 47);
    origin.put("/a.bin", a.clone());
    origin.put("/b.bin", b.clone());
    let _ = get(&node.mcc_url("/a.bin"), &[]).await;
    let _ = get(&node.mcc_url("/b.bin"), &[]).await;
    node.settle().await;

    // The WAN goes quiet: the origin takes connections but never answers.
    for path in ["/a.bin", "/b.bin"] {
        origin.set_behaviour(
            path,
            Behaviour {
                header_delay: Some(Duration::from_secs(60)),
                ..Behaviour::default()
            },
        );
    }
    let started = tokio::time::Instant::now();
    let first = get(&node.mcc_url("/a.bin"), &[]).await;
    assert_eq!(first.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(first.bytes()), sha256_hex(&a));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "one check timed out"
    );

    // Every other stale hit of that origin is served at once, without asking it again.
    let requests = origin.request_count();
    let started = tokio::time::Instant::now();
    for _ in 0..3 {
        for (path, content) in [("/b.bin", &b), ("/a.bin", &a)] {
            let stale = get(&node.mcc_url(path), &[]).await;
            assert_eq!(stale.header("x-cache").as_deref(), Some("HIT"));
            assert_eq!(sha256_hex(stale.bytes()), sha256_hex(content));
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "six stale hits took {:?}",
        started.elapsed()
    );
    assert_eq!(origin.request_count(), requests);
    node.stop().await;
}
