//! Faults and attacks on the store: what an origin declares, what is on the disk, and what the
//! disk can hold never make the node crash, allocate for a claim, or serve a wrong byte.
//!
//! - A declared length sizes nothing: an origin claiming 2^64 - 1 bytes is refused with 502, one
//!   claiming an exabyte below `storage.max_object_size` costs only what is stored (before and
//!   after a restart), and 60 objects claiming a terabyte each keep the node's RSS flat.
//! - The disk is not trusted: a slice deleted, truncated or corrupted behind the node's back is
//!   filled again or caught by its piece hashes, never served short or wrong; recovery deletes
//!   metadata it cannot trust (corrupt, filed under another key, another slice size).
//! - A full filesystem lowers the effective size and evicts, so partial objects stop refetching.
//! - Objects purged, evicted or replaced while a response streams give complete and correct bytes
//!   or a cut connection; a slow disk holds a fill back, and a purge in mid-write leaves nothing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_node::cache::key::CacheKey;
use cache_node::disk::{DiskFuture, SharedStorage, Storage};
use common::*;
use outpost_testkit::{
    bytes_under, eventually, eventually_async, eventually_every, files_under, pattern_bytes,
    resident_bytes, sha256_hex, Behaviour, MockOrigin,
};
use serde_json::Value;

/// The longest any poll in this file waits.
const DEADLINE: Duration = Duration::from_secs(30);

fn cache_key(path: &str) -> CacheKey {
    CacheKey::new(ORIGIN_HOST, path)
}

/// `GET /objects` for `path` on the node's admin listener: the report, or `None` on 404.
async fn object_report(node: &TestNode, path: &str) -> Option<Value> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("origin", ORIGIN_HOST)
        .append_pair("path", path)
        .finish();
    let response = client()
        .get(format!("http://{}/objects?{query}", node.admin_addr))
        .send()
        .await
        .unwrap();
    match response.status().as_u16() {
        404 => None,
        200 => Some(serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()),
        other => panic!("GET /objects answered {other}"),
    }
}

/// `DELETE /objects` for `path`.
async fn purge(node: &TestNode, path: &str) {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("origin", ORIGIN_HOST)
        .append_pair("path", path)
        .finish();
    let response = client()
        .delete(format!("http://{}/objects?{query}", node.admin_addr))
        .bearer_auth("test-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// The file of slice `index` of the stored version of `path`.
fn slice_file(node: &TestNode, path: &str, index: u64) -> PathBuf {
    let entry = node
        .node
        .index
        .get(&cache_key(path))
        .expect("the object is indexed");
    node.node
        .layout
        .slice_path(&entry.key, entry.meta.generation, index)
}

/// Waits until `path` is stored complete.
async fn stored_complete(node: &TestNode, path: &str) {
    eventually("the object is stored complete", DEADLINE, || {
        node.node
            .index
            .get(&cache_key(path))
            .is_some_and(|entry| entry.is_complete())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Item 1: a declared length sizes nothing.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_origin_declaring_two_to_the_64_bytes_is_refused_with_502_and_the_node_serves_on() {
    let (origin, storage, node) = origin_and_node().await;
    let content = pattern_bytes(1 << 20, 1);
    // `Content-Range: bytes 0-65535/18446744073709551615`: the node used to allocate a slice
    // table and a piece table for that length, abort, and abort again at every restart.
    origin.put_with(
        "/liar.bin",
        content.clone(),
        Behaviour {
            lie_total_len: Some(u64::MAX),
            ..Behaviour::default()
        },
    );
    let refused = get(&node.mcc_url("/liar.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(refused.status, 502);
    let message = String::from_utf8_lossy(refused.bytes()).into_owned();
    assert!(message.contains("max_object_size"), "{message}");
    assert!(
        files_under(storage.path())
            .iter()
            .all(|file| !file.ends_with("meta.json")),
        "nothing of the refused object is stored"
    );
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "objects_refused_too_large"), 1, "{stats}");
    assert_eq!(stat(&stats, "objects"), 0);

    // The node serves on, and so does a restart over the same directory.
    origin.put("/honest.bin", content.clone());
    let honest = get(&node.mcc_url("/honest.bin"), &[]).await;
    assert_eq!(sha256_hex(honest.bytes()), sha256_hex(&content));
    node.settle().await;
    node.stop().await;
    let restarted = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;
    let hit = get(&restarted.mcc_url("/honest.bin"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&content));
    let again = get(
        &restarted.mcc_url("/liar.bin"),
        &[("range", "bytes=0-65535")],
    )
    .await;
    assert_eq!(again.status, 502);
    restarted.stop().await;
}

#[tokio::test]
async fn an_object_declaring_an_exabyte_below_the_limit_costs_what_is_stored_across_a_restart() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.storage.max_object_size = "1048576TiB".into();
    let declared: u64 = 1 << 60;
    let content = pattern_bytes(4 * TEST_SLICE as usize, 2);
    origin.put_with(
        "/exabyte.bin",
        content.clone(),
        Behaviour {
            lie_total_len: Some(declared),
            ..Behaviour::default()
        },
    );
    let node = TestNode::start(config.clone()).await;
    // 2^44 slices and 2^44 pieces: a table per slice or per piece cannot even be allocated.
    let first = get(&node.mcc_url("/exabyte.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(first.status, 206);
    assert_eq!(first.bytes(), &content[..65536]);
    assert_eq!(
        first.header("content-range").as_deref(),
        Some(format!("bytes 0-65535/{declared}").as_str())
    );
    let middle = get(
        &node.mcc_url("/exabyte.bin"),
        &[("range", "bytes=100000-165535")],
    )
    .await;
    assert_eq!(middle.bytes(), &content[100_000..=165_535]);
    node.settle().await;
    let report = object_report(&node, "/exabyte.bin").await.unwrap();
    assert_eq!(report["length"], declared);
    assert_eq!(report["slices"], declared / TEST_SLICE);
    assert_eq!(report["slices_stored"], 3);
    assert_eq!(report["stored_bytes"], 3 * TEST_SLICE);
    assert_eq!(report["complete"], false);
    node.stop().await;

    let restarted = TestNode::start(config).await;
    let hit = get(
        &restarted.mcc_url("/exabyte.bin"),
        &[("range", "bytes=65536-196607")],
    )
    .await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.bytes(), &content[65536..196_608]);
    let report = object_report(&restarted, "/exabyte.bin").await.unwrap();
    assert_eq!(report["slices_stored"], 3);
    restarted.stop().await;
}

#[tokio::test]
async fn a_restart_over_metadata_declaring_two_to_the_64_bytes_deletes_it_and_starts() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    // What a node without storage.max_object_size left behind for the lying origin.
    let layout = cache_node::cache::store::Layout::create(storage.path()).unwrap();
    let key = cache_key("/liar.bin");
    let meta = cache_node::cache::store::ObjectMeta {
        format: cache_node::cache::store::STORE_FORMAT,
        key: key.as_str().to_owned(),
        generation: 7,
        length: u64::MAX,
        slice_len: TEST_SLICE,
        etag: Some("\"x\"".into()),
        last_modified: None,
        content_type: None,
        content_encoding: None,
        headers: vec![],
        stored_at_unix: cache_node::cache::store::unix_now(),
        confirmed_at_unix: None,
        fresh_for_secs: None,
        heuristic_fresh_for_secs: None,
        stale_while_revalidate_secs: None,
        stale_if_error_secs: None,
        must_revalidate: false,
        vary: Vec::new(),
    };
    std::fs::create_dir_all(layout.generation_dir(&key, 7)).unwrap();
    std::fs::write(
        layout.meta_path(&key, 7),
        serde_json::to_vec(&meta).unwrap(),
    )
    .unwrap();
    std::fs::write(
        layout.slice_path(&key, 7, 0),
        vec![0u8; TEST_SLICE as usize],
    )
    .unwrap();

    let node = TestNode::start(config).await;
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "objects"), 0, "{stats}");
    assert!(
        !layout.object_dir(&key).exists(),
        "the untrusted version is deleted"
    );
    let content = pattern_bytes(100_000, 3);
    origin.put("/liar.bin", content.clone());
    let fresh = get(&node.mcc_url("/liar.bin"), &[]).await;
    assert_eq!(fresh.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(fresh.bytes(), &content[..]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_objects_declaring_a_terabyte_each_keep_the_node_small() {
    const OBJECTS: usize = 60;
    const SLICE: u64 = 1 << 20;
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));
    // The default storage.max_object_size (1 TiB) admits them; the default slice (1 MiB) and
    // piece (1 MiB) sizes are what the attack measured 34 MB of state per object with.
    let config = test_config(storage.path(), &origin.base_url(), SLICE, "10GiB");
    let content = pattern_bytes(SLICE as usize, 4);
    let declared: u64 = 1 << 40;
    for index in 0..OBJECTS {
        origin.put_with(
            &format!("/tera-{index}.bin"),
            content.clone(),
            Behaviour {
                lie_total_len: Some(declared),
                ..Behaviour::default()
            },
        );
    }
    origin.put("/warm-up.bin", content.clone());
    let mut process = NodeProcess::spawn(binary, work.path(), config.clone());
    process.wait_healthy().await;
    let url = |path: &str| mcc_url(process.addr, path);
    // Every code path runs once before the baseline, so the baseline holds the node's working set.
    let warm = get(&url("/warm-up.bin"), &[]).await;
    assert_eq!(warm.bytes(), &content[..]);
    let stored_slices = async || stat(&admin_stats(process.admin_addr).await, "slices_stored");
    // One deadline for both waits below.
    let started = tokio::time::Instant::now();
    eventually_async("the warm-up to be stored", DEADLINE, async || {
        stored_slices().await >= 1
    })
    .await;
    let baseline = resident_bytes(process.child.id());

    for index in 0..OBJECTS {
        let ranged = get(
            &url(&format!("/tera-{index}.bin")),
            &[("range", "bytes=0-1048575")],
        )
        .await;
        assert_eq!(ranged.status, 206);
        assert_eq!(ranged.bytes(), &content[..]);
    }
    eventually_async(
        "a slice of every object to be stored",
        DEADLINE.saturating_sub(started.elapsed()),
        // The warm-up's slice and one of each object.
        async || stored_slices().await > OBJECTS as u64,
    )
    .await;
    let after = resident_bytes(process.child.id());
    let growth = after.saturating_sub(baseline);
    eprintln!(
        "RSS with {OBJECTS} objects declaring 1 TiB: {} MiB -> {} MiB (+{} MiB)",
        baseline >> 20,
        after >> 20,
        growth >> 20
    );
    // Slot-per-slice and slot-per-piece state took about 34 MB per object (2 GB in all).
    assert!(growth < 200 << 20, "RSS grew by {growth} bytes");
    process.kill_9();

    // A restart over the same state recovers the sixty objects without sizing anything from
    // their claims.
    let mut restarted = NodeProcess::spawn(binary, work.path(), config);
    restarted.wait_healthy().await;
    let stats = admin_stats(restarted.admin_addr).await;
    assert_eq!(stat(&stats, "objects"), 1 + OBJECTS as u64, "{stats}");
    let hit = get(
        &mcc_url(restarted.addr, "/tera-7.bin"),
        &[("range", "bytes=1000-2000")],
    )
    .await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.bytes(), &content[1000..=2000]);
    let restarted_rss = resident_bytes(restarted.child.id());
    eprintln!("RSS after the restart: {} MiB", restarted_rss >> 20);
    assert!(restarted_rss < 200 << 20, "RSS {restarted_rss} bytes");
    restarted.kill_9();
}

// ---------------------------------------------------------------------------------------------
// Item 13: what is on the disk is checked, never trusted into a wrong answer.
// ---------------------------------------------------------------------------------------------

/// A node whose every disk read for a hit is checked against the piece hashes.
async fn checking_node(origin: &MockOrigin, storage: &Path) -> TestNode {
    let mut config = usual_config(storage, &origin.base_url());
    config.storage.verify_hits = 1.0;
    config.peering.piece_size = "64KiB".into();
    TestNode::start(config).await
}

#[tokio::test]
async fn a_deleted_or_truncated_slice_is_filled_again_never_served_short() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(6 * TEST_SLICE as usize + 1234, 5);
    origin.put("/lost.bin", content.clone());
    let first = get(&node.mcc_url("/lost.bin"), &[]).await;
    assert_eq!(sha256_hex(first.bytes()), sha256_hex(&content));
    stored_complete(&node, "/lost.bin").await;

    // Slice 1 goes missing and slice 4 loses its second half behind the node's back.
    std::fs::remove_file(slice_file(&node, "/lost.bin", 1)).unwrap();
    let truncated = slice_file(&node, "/lost.bin", 4);
    std::fs::write(&truncated, &content[4 * 65536..4 * 65536 + 30_000]).unwrap();
    assert_eq!(
        object_report(&node, "/lost.bin").await.unwrap()["complete"],
        true,
        "the node cannot know before it reads"
    );
    origin.reset_counters();
    // The response committed as a hit still carries every byte: the lost slices come from the
    // fills their failed reads started. (It used to be cut at the first lost slice, every time.)
    let healed = get(&node.mcc_url("/lost.bin"), &[]).await;
    assert_eq!(healed.status, 200);
    assert_eq!(sha256_hex(healed.bytes()), sha256_hex(&content));
    let refetched = origin.fetch_count_segments("/lost.bin");
    let fetched_bytes: u64 = refetched
        .iter()
        .filter(|(_, count)| *count > 0)
        .map(|(range, _)| range.end - range.start)
        .sum();
    assert_eq!(
        fetched_bytes,
        2 * TEST_SLICE,
        "only the two lost slices: {refetched:?}"
    );
    node.settle().await;
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "slices_lost"), 2, "{stats}");
    let report = object_report(&node, "/lost.bin").await.unwrap();
    assert_eq!(report["complete"], true);
    assert_eq!(report["stored_bytes"], content.len());
    let ranged = get(
        &node.mcc_url("/lost.bin"),
        &[("range", "bytes=60000-300000")],
    )
    .await;
    assert_eq!(ranged.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(ranged.bytes(), &content[60_000..=300_000]);
    node.stop().await;
}

#[tokio::test]
async fn a_lost_slice_the_origin_cannot_refill_cuts_the_response_and_the_admin_view_says_so() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(4 * TEST_SLICE as usize, 6);
    origin.put("/gone.bin", content.clone());
    assert_eq!(
        get(&node.mcc_url("/gone.bin"), &[]).await.bytes(),
        &content[..]
    );
    stored_complete(&node, "/gone.bin").await;
    std::fs::remove_file(slice_file(&node, "/gone.bin", 2)).unwrap();
    origin.set_behaviour(
        "/gone.bin",
        Behaviour {
            status_override: Some(500),
            ..Behaviour::default()
        },
    );
    let cut = client()
        .get(node.mcc_url("/gone.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status().as_u16(), 200);
    let mut received = Vec::new();
    let mut stream = cut;
    let outcome = loop {
        match stream.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    assert!(
        outcome.is_err(),
        "a response that cannot be completed is cut"
    );
    assert!(received.len() <= 2 * TEST_SLICE as usize);
    assert_eq!(
        &received[..],
        &content[..received.len()],
        "never a wrong byte"
    );
    let report = object_report(&node, "/gone.bin").await.unwrap();
    assert_eq!(report["complete"], false, "{report}");
    assert_eq!(report["slices_stored"], 3);

    origin.set_behaviour("/gone.bin", Behaviour::default());
    let healed = get(&node.mcc_url("/gone.bin"), &[]).await;
    assert_eq!(healed.header("x-cache").as_deref(), Some("PARTIAL"));
    assert_eq!(healed.bytes(), &content[..]);
    node.stop().await;
}

/// Inverts the bytes of a file in place, keeping its length.
fn corrupt(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    for byte in &mut bytes[100..200] {
        *byte = !*byte;
    }
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test]
async fn a_corrupted_slice_is_caught_by_its_piece_hashes_and_never_served() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let node = checking_node(&origin, storage.path()).await;
    let content = pattern_bytes(5 * TEST_SLICE as usize, 7);
    origin.put("/rot.bin", content.clone());
    assert_eq!(
        get(&node.mcc_url("/rot.bin"), &[]).await.bytes(),
        &content[..]
    );
    stored_complete(&node, "/rot.bin").await;
    let entry = node.node.index.get(&cache_key("/rot.bin")).unwrap();
    let pieces_file = node
        .node
        .layout
        .pieces_path(&entry.key, entry.meta.generation);
    eventually("pieces.sha256 is written", DEADLINE, || {
        pieces_file.exists()
    })
    .await;
    drop(entry);

    // The same length, other bytes: only the hashes can tell.
    corrupt(&slice_file(&node, "/rot.bin", 2));
    let response = client().get(node.mcc_url("/rot.bin")).send().await.unwrap();
    assert_eq!(response.headers()["x-cache"], "HIT");
    let mut received = Vec::new();
    let mut stream = response;
    let outcome = loop {
        match stream.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    assert!(
        outcome.is_err(),
        "the response stops before the corrupt slice"
    );
    assert!(
        received.len() <= 2 * TEST_SLICE as usize,
        "{}",
        received.len()
    );
    assert_eq!(&received[..], &content[..received.len()]);
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "integrity_failures"), 1, "{stats}");
    assert!(stat(&stats, "slices_verified") >= 3, "{stats}");
    // The version is dropped: the admin view says so, its files go, the next request refetches.
    assert!(object_report(&node, "/rot.bin").await.is_none());
    eventually("the corrupt version's files are deleted", DEADLINE, || {
        !pieces_file.exists()
    })
    .await;
    let refetched = get(&node.mcc_url("/rot.bin"), &[]).await;
    assert_eq!(refetched.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(sha256_hex(refetched.bytes()), sha256_hex(&content));
    stored_complete(&node, "/rot.bin").await;
    let hit = get(&node.mcc_url("/rot.bin"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&content));
    node.stop().await;
}

#[tokio::test]
async fn a_slice_corrupted_while_the_node_was_down_is_caught_before_the_first_manifest() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.peering.piece_size = "64KiB".into();
    // Hits are never checked here: only the manifest's check can catch the damage.
    config.storage.verify_hits = 0.0;
    let content = pattern_bytes(4 * TEST_SLICE as usize + 10, 8);
    origin.put("/down.bin", content.clone());
    let node = TestNode::start(config.clone()).await;
    assert_eq!(
        get(&node.mcc_url("/down.bin"), &[]).await.bytes(),
        &content[..]
    );
    stored_complete(&node, "/down.bin").await;
    let entry = node.node.index.get(&cache_key("/down.bin")).unwrap();
    let pieces_file = node
        .node
        .layout
        .pieces_path(&entry.key, entry.meta.generation);
    eventually("pieces.sha256 is written", DEADLINE, || {
        pieces_file.exists()
    })
    .await;
    let damaged = slice_file(&node, "/down.bin", 3);
    drop(entry);
    node.stop().await;
    corrupt(&damaged);

    let restarted = TestNode::start(config).await;
    origin.reset_counters();
    let original: String =
        form_urlencoded::byte_serialize(format!("http://{ORIGIN_HOST}/down.bin").as_bytes())
            .collect();
    let manifest = get(
        &format!(
            "http://{}/_outpost/v1/manifest?url={original}",
            restarted.addr
        ),
        &[],
    )
    .await;
    assert_eq!(manifest.status, 200);
    let manifest: Value = serde_json::from_slice(manifest.bytes()).unwrap();
    let expected: Vec<String> = content.chunks(65536).map(sha256_hex).collect();
    let listed: Vec<String> = manifest["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|piece| piece.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, expected);
    let stats = restarted.stats().await;
    assert_eq!(stat(&stats, "integrity_failures"), 1, "{stats}");
    assert_eq!(
        origin.min_fetches_of_any_byte("/down.bin"),
        1,
        "the dropped version was fetched again whole"
    );
    restarted.settle().await;
    // What peers will be sent now matches what the manifest vouches for.
    let served = get(&restarted.mcc_url("/down.bin"), &[]).await;
    assert_eq!(served.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(served.bytes()), sha256_hex(&content));
    restarted.stop().await;
}

#[tokio::test]
async fn recovery_drops_what_it_cannot_trust_and_serves_the_rest() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let contents: Vec<(String, Bytes)> = ["/kept", "/edited", "/garbled"]
        .iter()
        .enumerate()
        .map(|(index, path)| {
            (
                format!("{path}.bin"),
                pattern_bytes(200_000, 20 + index as u64),
            )
        })
        .collect();
    let node = TestNode::start(config.clone()).await;
    for (path, content) in &contents {
        origin.put(path, content.clone());
        assert_eq!(get(&node.mcc_url(path), &[]).await.bytes(), &content[..]);
        stored_complete(&node, path).await;
    }
    let meta_of = |path: &str| {
        let entry = node.node.index.get(&cache_key(path)).unwrap();
        node.node
            .layout
            .meta_path(&entry.key, entry.meta.generation)
    };
    let edited_meta = meta_of("/edited.bin");
    let garbled_meta = meta_of("/garbled.bin");
    node.stop().await;
    // An edited meta.json files /edited.bin's bytes under the key of /kept.bin's neighbour.
    let text = std::fs::read_to_string(&edited_meta).unwrap();
    std::fs::write(&edited_meta, text.replace("/edited.bin", "/victim.bin")).unwrap();
    std::fs::write(&garbled_meta, b"{\"key\": \"dl.delivery").unwrap();

    let restarted = TestNode::start(config.clone()).await;
    assert_eq!(stat(&restarted.stats().await, "objects"), 1);
    assert!(!edited_meta.exists() && !garbled_meta.exists());
    let victim = pattern_bytes(150_000, 99);
    origin.put("/victim.bin", victim.clone());
    let served = get(&restarted.mcc_url("/victim.bin"), &[]).await;
    assert_eq!(served.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(served.bytes(), &victim[..], "never another URL's bytes");
    let kept = get(&restarted.mcc_url("/kept.bin"), &[]).await;
    assert_eq!(kept.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(kept.bytes(), &contents[0].1[..]);
    restarted.settle().await;
    restarted.stop().await;

    // Another slice size: the stored objects cannot be read with it, so they are deleted rather
    // than left on disk uncounted.
    let mut resliced = config;
    resliced.storage.slice_size = "128KiB".into();
    let resliced = TestNode::start(resliced).await;
    let stats = resliced.stats().await;
    assert_eq!(stat(&stats, "objects"), 0, "{stats}");
    assert_eq!(stat(&stats, "cache_used_bytes"), 0);
    assert_eq!(bytes_under(&storage.path().join("objects")), 0);
    let refetched = get(&resliced.mcc_url("/kept.bin"), &[]).await;
    assert_eq!(refetched.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(refetched.bytes(), &contents[0].1[..]);
    resliced.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Item 14: a filesystem smaller than max_size.
// ---------------------------------------------------------------------------------------------

/// A filesystem of `capacity` bytes over the portable backend: a write that would take the
/// regular files under `root` past it fails with `ENOSPC`, as a small partition would. Writes are
/// serialised so the check and the write cannot interleave.
struct SmallDisk {
    inner: SharedStorage,
    root: PathBuf,
    capacity: u64,
    writing: Arc<tokio::sync::Mutex<()>>,
}

impl Storage for SmallDisk {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn read_at(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> DiskFuture<Vec<u8>> {
        self.inner.read_at(path, offset, length, buffer)
    }
    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()> {
        let inner = self.inner.clone();
        let root = self.root.clone();
        let capacity = self.capacity;
        let writing = self.writing.clone();
        Box::pin(async move {
            let _one_at_a_time = writing.lock().await;
            let length: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
            if bytes_under(&root) + length > capacity {
                return Err(cache_node::error::DiskError::io(
                    "write",
                    path,
                    std::io::Error::from_raw_os_error(28),
                ));
            }
            inner.write_file_atomic(path, chunks, sync).await
        })
    }
    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()> {
        self.inner.remove_dir_all(path)
    }
}

/// Objects A and B fill most of a 1 MiB filesystem whose node believes it has 64 MiB; C does
/// not fit. The first write refused for lack of space must lower the effective size and evict
/// the least recently used object, so that C is stored after one more request instead of
/// fetching its missing slices from the origin on every request forever.
async fn a_full_filesystem_makes_room(node: &TestNode, origin: &MockOrigin, root: &Path) {
    let objects: Vec<(&str, Bytes)> = [("/a.bin", 30), ("/b.bin", 31), ("/c.bin", 32)]
        .into_iter()
        .map(|(path, seed)| (path, pattern_bytes(6 * TEST_SLICE as usize, seed)))
        .collect();
    for (path, content) in &objects {
        origin.put(path, content.clone());
    }
    for (path, content) in &objects[..2] {
        assert_eq!(get(&node.mcc_url(path), &[]).await.bytes(), &content[..]);
        stored_complete(node, path).await;
    }
    let (c_path, c_content) = &objects[2];
    let first = get(&node.mcc_url(c_path), &[]).await;
    assert_eq!(sha256_hex(first.bytes()), sha256_hex(c_content));
    node.settle().await;
    let stats = node.stats().await;
    assert!(stat(&stats, "disk_full_events") >= 1, "{stats}");
    let effective = stat(&stats, "cache_effective_max_bytes");
    // What the drive held when the write was refused, counting the writes still in flight.
    assert!(
        (512 << 10..=(1 << 20) + TEST_SLICE).contains(&effective),
        "the effective size is about what the disk holds: {stats}"
    );
    assert_eq!(stats["drives"][0]["effective_max_bytes"], effective);
    assert_eq!(stat(&stats, "cache_max_bytes"), 64 << 20);
    assert!(
        object_report(node, "/a.bin").await.is_none(),
        "the least recently used object made room"
    );
    let a_directory = node.node.layout.object_dir(&cache_key("/a.bin"));
    eventually("the evicted object's files are deleted", DEADLINE, || {
        files_under(&a_directory).is_empty()
    })
    .await;
    let metrics = client()
        .get(format!("http://{}/metrics", node.admin_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!("outpost_cache_effective_max_bytes {effective}")),
        "{metrics}"
    );

    // One more request stores what the full disk refused; the next is a hit.
    let second = get(&node.mcc_url(c_path), &[]).await;
    assert_eq!(sha256_hex(second.bytes()), sha256_hex(c_content));
    node.settle().await;
    let third = get(&node.mcc_url(c_path), &[]).await;
    assert_eq!(third.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(third.bytes()), sha256_hex(c_content));
    assert!(origin.max_fetches_of_any_byte(c_path) <= 2);
    let b = get(&node.mcc_url("/b.bin"), &[]).await;
    assert_eq!(b.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(b.bytes(), &objects[1].1[..]);
    eventually("the evicted files are deleted", DEADLINE, || {
        bytes_under(root) <= 1 << 20
    })
    .await;
}

#[tokio::test]
async fn a_filesystem_smaller_than_max_size_lowers_the_effective_size_and_evicts() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let valid = test_config(storage.path(), &origin.base_url(), TEST_SLICE, "64MiB")
        .validate()
        .unwrap();
    let layout = cache_node::cache::store::Layout::create_drives(&valid.drives).unwrap();
    let small_disk = Arc::new(SmallDisk {
        inner: Arc::new(cache_node::disk::portable::PortableStorage::new()),
        root: storage.path().to_path_buf(),
        capacity: 1 << 20,
        writing: Arc::default(),
    });
    let node = cache_node::node::Node::open_with_storage(&valid, layout, small_disk).unwrap();
    let node = TestNode::start_node(node, &valid).await;
    a_full_filesystem_makes_room(&node, &origin, storage.path()).await;
    node.stop().await;
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` on a fresh directory, or says why it cannot (not root, no
    /// `CAP_SYS_ADMIN`).
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|error| error.to_string())?;
        if mounted.status.success() {
            Ok(Tmpfs { dir })
        } else {
            Err(String::from_utf8_lossy(&mounted.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_real_full_tmpfs_lowers_the_effective_size_and_evicts_on_either_backend() {
    let tmpfs = match Tmpfs::mount("1m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            // The Storage-level test above covers the behaviour; this one checks the kernel's
            // own ENOSPC through the real backends where a tmpfs can be mounted.
            eprintln!("SKIPPED a_real_full_tmpfs...: cannot mount a tmpfs here ({reason})");
            return;
        }
    };
    let origin = MockOrigin::start().await;
    let storage = tmpfs.dir.path().join("cache");
    let node = TestNode::start(test_config(
        &storage,
        &origin.base_url(),
        TEST_SLICE,
        "64MiB",
    ))
    .await;
    a_full_filesystem_makes_room(&node, &origin, &storage).await;
    node.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Behaviours no test exercised: objects going away under a response, and a slow disk.
// ---------------------------------------------------------------------------------------------

/// What a client got from a response that something happened to in the middle.
struct Interrupted {
    /// Every body byte received.
    received: Vec<u8>,
    /// True when the body ended cleanly.
    complete: bool,
}

/// GETs `path`, reads the first body chunk, runs `interruption`, then reads the rest. Whatever
/// happened, every byte received must be the right one, and a clean end means every byte came.
async fn read_across(
    node: &TestNode,
    path: &str,
    expected: &[u8],
    interruption: impl std::future::Future<Output = ()>,
) -> Interrupted {
    let mut response = client().get(node.mcc_url(path)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // The first chunk, unless the response was cut before any (the replaced object's stored
    // slices may be deleted before the first is read).
    let (mut received, cut_early) = match response.chunk().await {
        Ok(Some(chunk)) => (chunk.to_vec(), false),
        Ok(None) => (Vec::new(), false),
        Err(_) => (Vec::new(), true),
    };
    interruption.await;
    let complete = !cut_early
        && loop {
            match response.chunk().await {
                Ok(Some(chunk)) => received.extend_from_slice(&chunk),
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
    assert!(received.len() <= expected.len());
    assert!(
        received[..] == expected[..received.len()],
        "a wrong byte was served"
    );
    assert!(
        !complete || received.len() == expected.len(),
        "a clean end came short"
    );
    Interrupted { received, complete }
}

/// Waits until the generation directory of `path`'s current version holds no file.
async fn files_deleted(node: &TestNode, generation_dir: &Path) {
    let _ = node;
    eventually("the version's files are deleted", DEADLINE, || {
        files_under(generation_dir).is_empty()
    })
    .await;
}

fn generation_dir_of(node: &TestNode, path: &str) -> PathBuf {
    let entry = node.node.index.get(&cache_key(path)).unwrap();
    node.node
        .layout
        .generation_dir(&entry.key, entry.meta.generation)
}

#[tokio::test]
async fn an_object_purged_while_a_response_streams_gives_complete_bytes_or_a_cut_never_wrong_ones()
{
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(24 << 20, 40);
    origin.put("/purged.bin", content.clone());
    assert_eq!(
        sha256_hex(get(&node.mcc_url("/purged.bin"), &[]).await.bytes()),
        sha256_hex(&content)
    );
    stored_complete(&node, "/purged.bin").await;
    let directory = generation_dir_of(&node, "/purged.bin");
    let outcome = read_across(&node, "/purged.bin", &content, async {
        purge(&node, "/purged.bin").await;
        files_deleted(&node, &directory).await;
    })
    .await;
    eprintln!(
        "purged mid-stream: {} of {} bytes, complete: {}",
        outcome.received.len(),
        content.len(),
        outcome.complete
    );
    let again = get(&node.mcc_url("/purged.bin"), &[]).await;
    assert_eq!(again.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(sha256_hex(again.bytes()), sha256_hex(&content));
    node.stop().await;
}

#[tokio::test]
async fn an_object_evicted_while_a_response_streams_gives_complete_bytes_or_a_cut_never_wrong_ones()
{
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(test_config(
        storage.path(),
        &origin.base_url(),
        TEST_SLICE,
        "32MiB",
    ))
    .await;
    let victim = pattern_bytes(20 << 20, 41);
    origin.put("/victim.bin", victim.clone());
    assert_eq!(
        sha256_hex(get(&node.mcc_url("/victim.bin"), &[]).await.bytes()),
        sha256_hex(&victim)
    );
    stored_complete(&node, "/victim.bin").await;
    let directory = generation_dir_of(&node, "/victim.bin");
    let newer: Vec<(String, Bytes)> = (0..2)
        .map(|index| {
            (
                format!("/newer-{index}.bin"),
                pattern_bytes(10 << 20, 42 + index),
            )
        })
        .collect();
    let outcome = read_across(&node, "/victim.bin", &victim, async {
        // Two newer objects push the least recently used one, the victim, out.
        for (path, content) in &newer {
            origin.put(path, content.clone());
            let fetched = get(&node.mcc_url(path), &[]).await;
            assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(content));
            node.settle().await;
        }
        assert!(node.node.index.get(&cache_key("/victim.bin")).is_none());
        files_deleted(&node, &directory).await;
    })
    .await;
    eprintln!(
        "evicted mid-stream: {} of {} bytes, complete: {}",
        outcome.received.len(),
        victim.len(),
        outcome.complete
    );
    node.stop().await;
}

#[tokio::test]
async fn an_object_replaced_at_the_origin_while_a_response_streams_is_cut_never_stitched() {
    let (origin, _storage, node) = origin_and_node().await;
    let old = pattern_bytes(8 << 20, 43);
    let new = pattern_bytes(8 << 20, 44);
    origin.put("/replaced.bin", old.clone());
    let half = format!("bytes=0-{}", (4 << 20) - 1);
    let first_half = get(&node.mcc_url("/replaced.bin"), &[("range", &half)]).await;
    assert_eq!(first_half.bytes(), &old[..4 << 20]);
    node.settle().await;
    // The origin's content changes: the stored first half is still the old version, and the
    // fill of the second half finds the new one.
    origin.put("/replaced.bin", new.clone());
    let outcome = read_across(&node, "/replaced.bin", &old, async {}).await;
    assert!(
        !outcome.complete,
        "two versions are never stitched into one body"
    );
    assert!(outcome.received.len() <= 4 << 20);
    let fresh = get(&node.mcc_url("/replaced.bin"), &[]).await;
    assert_eq!(sha256_hex(fresh.bytes()), sha256_hex(&new));
    assert_eq!(stat(&node.stats().await, "version_changes"), 1);
    node.stop().await;
}

/// A disk whose slice writes wait at a gate the test opens, counting how many wait at once.
struct GatedDisk {
    inner: SharedStorage,
    gate: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
    most_waiting: Arc<AtomicUsize>,
    slice_writes: Arc<AtomicU64>,
}

impl GatedDisk {
    fn new() -> GatedDisk {
        GatedDisk {
            inner: Arc::new(cache_node::disk::portable::PortableStorage::new()),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            waiting: Arc::default(),
            most_waiting: Arc::default(),
            slice_writes: Arc::default(),
        }
    }

    /// Lets every waiting and later write through.
    fn open(&self) {
        self.gate.close();
    }
}

impl Storage for GatedDisk {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn read_at(
        &self,
        path: PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> DiskFuture<Vec<u8>> {
        self.inner.read_at(path, offset, length, buffer)
    }
    fn write_file_atomic(&self, path: PathBuf, chunks: Vec<Bytes>, sync: bool) -> DiskFuture<()> {
        let is_slice = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().parse::<u64>().is_ok());
        if !is_slice {
            return self.inner.write_file_atomic(path, chunks, sync);
        }
        let inner = self.inner.clone();
        let gate = self.gate.clone();
        let waiting = self.waiting.clone();
        let most_waiting = self.most_waiting.clone();
        let slice_writes = self.slice_writes.clone();
        Box::pin(async move {
            let now_waiting = waiting.fetch_add(1, Ordering::SeqCst) + 1;
            most_waiting.fetch_max(now_waiting, Ordering::SeqCst);
            // A closed semaphore is an open gate.
            let _ = gate.acquire().await;
            waiting.fetch_sub(1, Ordering::SeqCst);
            slice_writes.fetch_add(1, Ordering::SeqCst);
            inner.write_file_atomic(path, chunks, sync).await
        })
    }
    fn remove_dir_all(&self, path: PathBuf) -> DiskFuture<()> {
        self.inner.remove_dir_all(path)
    }
}

/// Bytes of finished slices one fill may hold waiting for the disk (`fill.rs`); an upper bound
/// for this test, which holds as long as fills hold no more.
const PENDING_WRITE_BYTES_PER_FILL: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_disk_holds_the_fill_back_and_a_purge_in_mid_write_leaves_nothing() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let valid = usual_config(storage.path(), &origin.base_url())
        .validate()
        .unwrap();
    let layout = cache_node::cache::store::Layout::create_drives(&valid.drives).unwrap();
    let disk = Arc::new(GatedDisk::new());
    let node = cache_node::node::Node::open_with_storage(&valid, layout, disk.clone()).unwrap();
    let node = TestNode::start_node(node, &valid).await;
    // Half again as much as a fill may hold for the disk.
    let content = pattern_bytes((96 << 20) as usize, 45);
    origin.put("/slow-disk.bin", content.clone());
    // A client reads the whole object all along, so the fill has a reader throughout.
    let reader = {
        let url = node.mcc_url("/slow-disk.bin");
        let expected = content.clone();
        tokio::spawn(async move {
            let mut response = client().get(url).send().await.unwrap();
            let mut received = Vec::new();
            let complete = loop {
                match response.chunk().await {
                    Ok(Some(chunk)) => received.extend_from_slice(&chunk),
                    Ok(None) => break true,
                    Err(_) => break false,
                }
            };
            assert!(received[..] == expected[..received.len()], "a wrong byte");
            (complete, received.len())
        })
    };
    // The writes pile up until the fill stops for the disk: wait until the pile stops growing.
    // Stopped means unchanged over 20 looks 25 ms apart, so the pace is part of the condition.
    let (mut last, mut unchanged) = ((0usize, 0u64), 0);
    let (waiting, sent) = eventually_every(
        "the fill to stop for the disk",
        DEADLINE,
        Duration::from_millis(25),
        async || {
            let now = (disk.waiting.load(Ordering::SeqCst), origin.bytes_sent());
            unchanged = if now.0 > 0 && now == last {
                unchanged + 1
            } else {
                0
            };
            last = now;
            (unchanged >= 20).then_some(now)
        },
    )
    .await;
    // The fill holds at most its window of finished slices for the disk, and reads no more
    // from the origin than that window plus what sockets and buffers hold.
    let slots = (PENDING_WRITE_BYTES_PER_FILL / TEST_SLICE) as usize;
    assert!(waiting <= slots, "{waiting} writes waiting");
    assert!(disk.most_waiting.load(Ordering::SeqCst) <= slots);
    let bound = PENDING_WRITE_BYTES_PER_FILL + (16 << 20);
    assert!(
        sent <= bound,
        "origin sent {sent} bytes against a stuck disk"
    );
    assert!(sent < content.len() as u64, "the fill went on to the end");
    eprintln!(
        "stuck disk: {waiting} slice writes waiting, origin sent {} MiB of {} MiB",
        sent >> 20,
        content.len() >> 20
    );

    // The object is purged while its writes wait; then the disk moves again.
    let directory = generation_dir_of(&node, "/slow-disk.bin");
    let purged = node.node.index.get(&cache_key("/slow-disk.bin")).unwrap();
    purge(&node, "/slow-disk.bin").await;
    disk.open();
    let (complete, received) = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the reader finishes")
        .unwrap();
    eprintln!("reader of the purged object: {received} bytes, complete: {complete}");
    // Once no slice of the purged version is in flight, no write of it can come any more...
    eventually("the fill of the purged object is over", DEADLINE, || {
        purged.table().inflight.is_empty()
    })
    .await;
    assert!(disk.slice_writes.load(Ordering::SeqCst) >= waiting as u64);
    // ...and every slice written after the purge is deleted again, directory and all.
    let objects = storage.path().join("objects");
    eventually("nothing of the purged object is left", DEADLINE, || {
        files_under(&objects).is_empty() && !directory.exists()
    })
    .await;
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "cache_used_bytes"), 0, "{stats}");
    assert_eq!(stat(&stats, "objects"), 0);
    node.stop().await;
}

/// GETs `url`, keeping the body bytes that arrived before an error cut it: the bytes, and whether
/// the body ended cleanly.
async fn get_until_cut(url: &str) -> (u16, Vec<u8>, bool) {
    let mut response = client()
        .get(url)
        .send()
        .await
        .expect("request reaches the node");
    let status = response.status().as_u16();
    let mut received = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received.extend_from_slice(&chunk),
            Ok(None) => return (status, received, true),
            Err(_) => return (status, received, false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_get_of_an_object_declaring_a_terabyte_claims_slices_as_it_streams() {
    const SLICE: u64 = 1 << 20;
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));
    // The default storage.max_object_size (1 TiB) admits the claim; 2^20 slices of 1 MiB.
    let config = test_config(storage.path(), &origin.base_url(), SLICE, "10GiB");
    let content = pattern_bytes(4 * SLICE as usize, 6);
    let declared: u64 = 1 << 40;
    origin.put_with(
        "/tera.bin",
        content.clone(),
        Behaviour {
            lie_total_len: Some(declared),
            ..Behaviour::default()
        },
    );
    origin.put("/warm-up.bin", content.clone());
    let mut process = NodeProcess::spawn(binary, work.path(), config);
    process.wait_healthy().await;
    let url = |path: &str| mcc_url(process.addr, path);
    let warm = get(&url("/warm-up.bin"), &[]).await;
    assert_eq!(warm.bytes(), &content[..]);
    let baseline = resident_bytes(process.child.id());

    // The first slice makes the node learn the declared length.
    let first = get(&url("/tera.bin"), &[("range", "bytes=0-1048575")]).await;
    assert_eq!(first.status, 206);
    assert_eq!(first.bytes(), &content[..SLICE as usize]);
    // A plain GET then asks for the whole declared terabyte. The origin's real body ends after
    // 4 MiB: the client gets the bytes the origin has and then a cut response, never padding.
    let (status, received, clean) = get_until_cut(&url("/tera.bin")).await;
    assert_eq!(status, 200);
    assert!(
        !clean,
        "a body shorter than declared is cut, never ended cleanly"
    );
    assert!(!received.is_empty() && received.len() <= content.len());
    assert_eq!(
        sha256_hex(&received),
        sha256_hex(&content[..received.len()])
    );
    // A manifest asks for every slice of it too (a prefill).
    let original: String =
        form_urlencoded::byte_serialize(format!("http://{ORIGIN_HOST}/tera.bin").as_bytes())
            .collect();
    let manifest_url = format!(
        "http://{}/_outpost/v1/manifest?url={original}&wait=1",
        process.addr
    );
    let _ = get(&manifest_url, &[]).await;
    let after = resident_bytes(process.child.id());
    let growth = after.saturating_sub(baseline);
    eprintln!(
        "RSS around a whole GET and a manifest of an object declaring 1 TiB: {} MiB -> {} MiB (+{} MiB)",
        baseline >> 20,
        after >> 20,
        growth >> 20
    );
    // One buffer per slice of the declared run took about 535 MiB here.
    assert!(growth < 50 << 20, "RSS grew by {growth} bytes");
    process.kill_9();
}
