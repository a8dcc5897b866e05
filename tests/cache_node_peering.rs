//! End-to-end: the node's side of peering. Piece manifests carry the SHA-256 of the origin's
//! pieces whether the content was cold, warm, partly stored or stored by an earlier run; the
//! tracker records peers under the address it sees and scopes answers by subnet and group; and
//! the API prefix never hides content that names its origin.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use outpost_testkit::{
    eventually, eventually_async, eventually_every, pattern_bytes, sha256_hex, Behaviour,
    MockOrigin,
};
use serde_json::{json, Value};

/// Slices of 256 KiB and pieces of 64 KiB: four pieces a slice, so piece and slice arithmetic
/// are both exercised.
const SLICE: u64 = 256 * 1024;
const PIECE: usize = 64 * 1024;

fn peering_config(storage: &std::path::Path, origin: &MockOrigin) -> cache_node::config::Config {
    let mut config = test_config(storage, &origin.base_url(), SLICE, "1GiB");
    config.peering.piece_size = "64KiB".into();
    config
}

/// The SHA-256 of each piece of `content`, as a manifest lists them.
fn expected_pieces(content: &[u8]) -> Vec<String> {
    content.chunks(PIECE).map(sha256_hex).collect()
}

fn manifest_url(node: &TestNode, path: &str) -> String {
    let original: String =
        form_urlencoded::byte_serialize(format!("http://{ORIGIN_HOST}{path}").as_bytes()).collect();
    format!("http://{}/_outpost/v1/manifest?url={original}", node.addr)
}

async fn manifest(node: &TestNode, path: &str) -> (u16, Value) {
    let fetched = get(&manifest_url(node, path), &[]).await;
    let body = serde_json::from_slice(fetched.bytes()).expect("API answers are JSON");
    (fetched.status, body)
}

fn pieces_of(manifest: &Value) -> Vec<String> {
    manifest["pieces"]
        .as_array()
        .expect("pieces is an array")
        .iter()
        .map(|piece| piece.as_str().unwrap().to_owned())
        .collect()
}

/// A client whose connections come from `source` (any 127.0.0.0/8 address works on Linux).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn announce_from(node: &TestNode, source: &str, announcement: Value) -> (u16, Value) {
    let response = client_from(source)
        .post(format!("http://{}/_outpost/v1/announce", node.addr))
        .header("content-type", "application/json")
        .body(announcement.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

async fn peers_from(node: &TestNode, source: &str, query: &str) -> Vec<String> {
    let response = client_from(source)
        .get(format!("http://{}/_outpost/v1/peers?{query}", node.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    answer["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|peer| peer["address"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_hash_the_origin_pieces_cold_warm_and_after_restarts() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    // Three slices and a short last piece.
    let content = pattern_bytes(2 * SLICE as usize + 3 * PIECE + 1000, 51);
    origin.put("/big.cab", content.clone());
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;

    let (status, cold) = manifest(&node, "/big.cab").await;
    assert_eq!(status, 200, "{cold}");
    assert_eq!(pieces_of(&cold), expected_pieces(&content));
    assert_eq!(cold["size"], content.len() as u64);
    assert_eq!(cold["piece_size"], PIECE as u64);
    assert_eq!(cold["etag"], origin.etag("/big.cab").unwrap());
    let key = format!("{ORIGIN_HOST}/big.cab");
    assert_eq!(cold["key"], key.as_str());
    assert_eq!(cold["content_id"], sha256_hex(key.as_bytes()));
    assert_eq!(origin.max_fetches_of_any_byte("/big.cab"), 1);

    let (status, warm) = manifest(&node, "/big.cab").await;
    assert_eq!((status, &warm), (200, &cold));
    assert_eq!(origin.max_fetches_of_any_byte("/big.cab"), 1);
    let stats = node.stats().await;
    assert_eq!(stats["manifests_served"], 2);
    let metrics = reqwest::get(format!("http://{}/metrics", node.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("outpost_manifests_served_total 2"),
        "{metrics}"
    );

    let entry = node
        .node
        .index
        .get(&cache_node::cache::key::CacheKey::new(
            ORIGIN_HOST,
            "/big.cab",
        ))
        .unwrap();
    let pieces_file = node
        .node
        .layout
        .pieces_path(&entry.key, entry.meta.generation);
    // The manifest is answered from memory as soon as the last hash is known; the file lands
    // right after.
    eventually(
        "the hashes to be stored with the object",
        Duration::from_secs(10),
        || pieces_file.exists(),
    )
    .await;
    drop(entry);
    node.stop().await;

    // A restart reads the stored hashes.
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    let (status, restarted) = manifest(&node, "/big.cab").await;
    assert_eq!((status, &restarted), (200, &cold));
    node.stop().await;

    // Without the hash file (content stored before hashing existed), the hashes come from the
    // stored slices, and the file is written again. The origin is not asked.
    std::fs::remove_file(&pieces_file).unwrap();
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    let (status, rehashed) = manifest(&node, "/big.cab").await;
    assert_eq!((status, &rehashed), (200, &cold));
    assert!(pieces_file.exists());
    assert_eq!(origin.max_fetches_of_any_byte("/big.cab"), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_of_partly_stored_content_fills_the_rest_once() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let content = pattern_bytes(4 * SLICE as usize, 52);
    origin.put("/part.cab", content.clone());
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    let url = node.mcc_url("/part.cab");
    let range = format!("bytes={}-{}", SLICE, 2 * SLICE - 1);
    let partial = get(&url, &[("range", &range)]).await;
    assert_eq!(partial.status, 206);
    node.settle().await;

    let (status, manifest) = manifest(&node, "/part.cab").await;
    assert_eq!(status, 200, "{manifest}");
    assert_eq!(pieces_of(&manifest), expected_pieces(&content));
    assert_eq!(origin.min_fetches_of_any_byte("/part.cab"), 1);
    assert_eq!(origin.max_fetches_of_any_byte("/part.cab"), 1);
    // The rest of the object is now stored: a whole GET is a hit.
    node.settle().await;
    let whole = get(&url, &[]).await;
    assert_eq!(whole.header("x-cache").as_deref(), Some("HIT"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fill_gets_202_with_retry_after_and_then_the_manifest() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let content = pattern_bytes(2 * SLICE as usize, 53);
    let slow = Behaviour {
        chunk_delay: Some(Duration::from_millis(40)),
        chunk_size: Some(32 * 1024),
        ..Behaviour::default()
    };
    origin.put_with("/slow.cab", content.clone(), slow);
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    // The node would hold the request up to manifest_wait (30 s); the client asks for 100 ms,
    // and is told to come back in a second.
    let asked = tokio::time::Instant::now();
    let first = get(
        &format!("{}&wait=0.1", manifest_url(&node, "/slow.cab")),
        &[],
    )
    .await;
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert_eq!(first.status, 202);
    assert_eq!(first.header("retry-after").as_deref(), Some("1"));
    let pending: Value = serde_json::from_slice(first.bytes()).unwrap();
    assert_eq!(pending["status"], "filling");

    eventually_async("the fill to finish", Duration::from_secs(20), async || {
        let (status, answer) = manifest(&node, "/slow.cab").await;
        if status == 200 {
            assert_eq!(pieces_of(&answer), expected_pieces(&content));
            return true;
        }
        assert_eq!(status, 202, "{answer}");
        false
    })
    .await;
    assert_eq!(origin.max_fetches_of_any_byte("/slow.cab"), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_change_drops_the_old_hashes() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let old = pattern_bytes(3 * SLICE as usize, 54);
    let new = pattern_bytes(3 * SLICE as usize, 55);
    origin.put("/v.cab", old.clone());
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    // The first slice of the old version is stored (and hashed).
    let range = format!("bytes=0-{}", SLICE - 1);
    assert_eq!(
        get(&node.mcc_url("/v.cab"), &[("range", &range)])
            .await
            .status,
        206
    );
    node.settle().await;

    origin.put("/v.cab", new.clone());
    let (status, manifest) = manifest(&node, "/v.cab").await;
    assert_eq!(status, 200, "{manifest}");
    assert_eq!(pieces_of(&manifest), expected_pieces(&new));
    assert_eq!(manifest["etag"], origin.etag("/v.cab").unwrap());
    assert!(node.stats().await["version_changes"].as_u64().unwrap() >= 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_object_replaced_at_the_origin_gets_a_new_manifest_once_revalidated() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let old = pattern_bytes(2 * SLICE as usize, 56);
    let new = pattern_bytes(2 * SLICE as usize, 57);
    origin.put("/w.cab", old.clone());
    let mut config = peering_config(storage.path(), &origin);
    config.upstream.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    let (status, first) = manifest(&node, "/w.cab").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(pieces_of(&first), expected_pieces(&old));
    node.settle().await;
    // Complete on disk, so no fill would ever notice the change: only revalidation does.
    origin.put("/w.cab", new.clone());
    let (status, second) = manifest(&node, "/w.cab").await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(pieces_of(&second), expected_pieces(&new));
    assert_eq!(second["etag"], origin.etag("/w.cab").unwrap());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_paths_never_hide_content_that_names_its_origin() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let content = pattern_bytes(10_000, 56);
    origin.put("/_outpost/v1/peers", content.clone());
    origin.put("/_outpost/v1/manifest", content.clone());
    let mut config = peering_config(storage.path(), &origin);
    // Reverse-proxy mode too: requests naming no origin would otherwise go to the origin.
    config.server.default_upstream = Some(origin.base_url());
    let node = TestNode::start(config).await;

    // Host-header mode: the path is content.
    let by_host = client()
        .get(format!("http://{}/_outpost/v1/peers", node.addr))
        .header("host", ORIGIN_HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(by_host.status().as_u16(), 200);
    assert!(by_host.headers().contains_key("x-cache"));
    assert_eq!(by_host.bytes().await.unwrap(), content);
    // MCC mode: content too.
    let by_mcc = get(&node.mcc_url("/_outpost/v1/manifest"), &[]).await;
    assert_eq!(by_mcc.status, 200);
    assert_eq!(by_mcc.bytes(), &content[..]);

    // Naming no origin: the API answers, and nothing goes upstream.
    let requests_before = origin.request_count();
    let api = get(&format!("http://{}/_outpost/v1/peers", node.addr), &[]).await;
    assert_eq!(api.status, 400);
    assert_eq!(
        api.header("content-type").as_deref(),
        Some("application/json")
    );
    let unknown = get(&format!("http://{}/_outpost/v1/nothing", node.addr), &[]).await;
    assert_eq!(unknown.status, 404);
    let wrong_method = request(
        reqwest::Method::DELETE,
        &format!("http://{}/_outpost/v1/announce", node.addr),
        &[],
    )
    .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(wrong_method.header("allow").as_deref(), Some("POST"));
    assert_eq!(origin.request_count(), requests_before);
    // Everything else still goes to the default upstream.
    origin.put("/other", content.clone());
    assert_eq!(
        get(&format!("http://{}/other", node.addr), &[])
            .await
            .bytes(),
        &content[..]
    );
    node.stop().await;

    // With peering off the prefix stays reserved: 404, never content.
    let storage = tempfile::tempdir().unwrap();
    let mut config = peering_config(storage.path(), &origin);
    config.server.default_upstream = Some(origin.base_url());
    config.peering.enabled = false;
    let node = TestNode::start(config).await;
    let disabled = get(&format!("http://{}/_outpost/v1/peers", node.addr), &[]).await;
    assert_eq!(disabled.status, 404);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_scopes_by_the_subnet_it_sees_and_by_group() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(peering_config(storage.path(), &origin)).await;
    let content_id = "ab".repeat(32);

    // The claimed address is ignored: the node records the source it sees.
    let (status, accepted) = announce_from(
        &node,
        "127.0.0.2",
        json!({"content_id": content_id, "port": 7680, "group_id": "blue",
               "complete": true, "address": "10.9.9.9"}),
    )
    .await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(accepted["address"], "127.0.0.2:7680");
    assert_eq!(accepted["ttl_secs"], 300);
    let in_progress = json!({"content_id": content_id, "port": 7681, "group_id": "red",
                             "pieces": [[0, 3], [8, 9]], "active_uploads": 0});
    assert_eq!(announce_from(&node, "127.0.0.3", in_progress).await.0, 200);
    let other_subnet = json!({"content_id": content_id, "port": 7682, "group_id": "blue",
                              "complete": true, "active_uploads": 3});
    assert_eq!(announce_from(&node, "127.0.1.2", other_subnet).await.0, 200);

    let query = |mode: &str| format!("content_id={content_id}&{mode}");
    assert_eq!(
        peers_from(&node, "127.0.0.9", &query("mode=1")).await,
        ["127.0.0.2:7680", "127.0.0.3:7681"],
        "LAN: the /24 the node sees, complete peers first"
    );
    assert_eq!(
        peers_from(&node, "127.0.1.9", &query("mode=1")).await,
        ["127.0.1.2:7682"]
    );
    assert_eq!(
        peers_from(&node, "127.0.5.5", &query("mode=2&group_id=blue")).await,
        ["127.0.0.2:7680", "127.0.1.2:7682"],
        "Group: complete and least loaded first"
    );
    assert_eq!(
        peers_from(&node, "127.0.0.9", &query("mode=3")).await,
        ["127.0.0.2:7680", "127.0.1.2:7682", "127.0.0.3:7681"]
    );
    assert_eq!(
        peers_from(&node, "127.0.0.2", &query("mode=3")).await,
        ["127.0.1.2:7682", "127.0.0.3:7681"],
        "a peer is never offered itself"
    );

    // In-progress pieces are in the answer as announced.
    let answer: Value = serde_json::from_slice(
        get(
            &format!(
                "http://{}/_outpost/v1/peers?{}",
                node.addr,
                query("mode=2&group_id=red")
            ),
            &[],
        )
        .await
        .bytes(),
    )
    .unwrap();
    assert_eq!(answer["peers"][0]["pieces"], json!([[0, 3], [8, 9]]));
    assert_eq!(answer["peers"][0]["complete"], false);

    // Withdrawing: an announcement holding nothing.
    let withdraw = json!({"content_id": content_id, "port": 7681, "pieces": []});
    assert_eq!(announce_from(&node, "127.0.0.3", withdraw).await.0, 200);
    assert_eq!(
        peers_from(&node, "127.0.0.9", &query("mode=1")).await,
        ["127.0.0.2:7680"]
    );

    // Bad requests are refused with a reason.
    for bad in [
        json!({"content_id": "xyz", "port": 1}),
        json!({"content_id": content_id, "port": 0}),
        json!({"content_id": content_id, "port": 1, "pieces": [[5, 1]]}),
        json!({"content_id": content_id}),
    ] {
        let (status, answer) = announce_from(&node, "127.0.0.4", bad).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].is_string());
    }
    let mode_zero = get(
        &format!("http://{}/_outpost/v1/peers?{}", node.addr, query("mode=0")),
        &[],
    )
    .await;
    assert_eq!(mode_zero.status, 400);

    let stats = node.stats().await;
    assert_eq!(stats["peer_announcements"], 4);
    assert!(stats["peer_queries"].as_u64().unwrap() >= 6);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_expire_unless_renewed_and_bounds_refuse_with_retry_after() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = peering_config(storage.path(), &origin);
    // Long enough that a loaded machine still queries before expiry, short enough to wait for.
    config.peering.announce_ttl = Duration::from_secs(3);
    config.peering.max_peers_per_content = 2;
    let node = TestNode::start(config).await;
    let content_id = "cd".repeat(32);
    let holding = json!({"content_id": content_id, "port": 7680, "complete": true});
    for source in ["127.0.0.2", "127.0.0.3"] {
        assert_eq!(announce_from(&node, source, holding.clone()).await.0, 200);
    }
    let refused = client_from("127.0.0.4")
        .post(format!("http://{}/_outpost/v1/announce", node.addr))
        .body(holding.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers()["retry-after"], "3");

    let query = format!("content_id={content_id}&mode=3");
    assert_eq!(peers_from(&node, "127.0.0.9", &query).await.len(), 2);
    // 127.0.0.2 renews its announcement every 500 ms; 127.0.0.3 does not. The unrenewed one goes
    // (bounded wait on the node's real clock) while the renewed one stays listed throughout.
    eventually_every(
        "the unrenewed announcement to expire",
        Duration::from_secs(10),
        Duration::from_millis(500),
        async || {
            assert_eq!(
                announce_from(&node, "127.0.0.2", holding.clone()).await.0,
                200
            );
            let listed = peers_from(&node, "127.0.0.9", &query).await;
            assert!(
                listed
                    .iter()
                    .any(|address| address.starts_with("127.0.0.2:")),
                "a renewed announcement never expires: {listed:?}"
            );
            if listed.len() == 1 {
                Ok(())
            } else {
                Err(format!("{listed:?}"))
            }
        },
    )
    .await;
    // And the expired one's room is free again.
    assert_eq!(announce_from(&node, "127.0.0.4", holding).await.0, 200);
    node.stop().await;
}
