//! End-to-end: prefill jobs on the admin listener. A listed object is stored whole with no
//! client asking, and the next client gets a HIT; a URL the origin lacks or the allowlist
//! refuses fails with its reason; a job can be cancelled; the shared bandwidth cap holds as a
//! rate (within 15 %); the token is required.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outpost_testkit::{eventually_async, pattern_bytes, Behaviour};

const TOKEN: &str = "test-token";

async fn submit(node: &TestNode, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("http://{}/prefill", node.admin_addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

async fn job(node: &TestNode, id: u64) -> serde_json::Value {
    let bytes = client()
        .get(format!("http://{}/prefill/{id}", node.admin_addr))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn until_ended(node: &TestNode, id: u64) -> serde_json::Value {
    eventually_async("the job ends", Duration::from_secs(30), async || {
        let job = job(node, id).await;
        (job["state"] != "running").then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefilled_object_is_a_hit_for_the_first_client_and_failures_say_why() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(1_000_000, 31);
    origin.put("/patch/kb1.msu", content.clone());
    let (status, submitted) = submit(
        &node,
        serde_json::json!([
            format!("http://{ORIGIN_HOST}/patch/kb1.msu"),
            format!("http://{ORIGIN_HOST}/patch/absent.msu"),
            "http://not-allowed.example/file",
        ]),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_u64().unwrap();
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "done", "{ended}");
    assert_eq!(ended["done"], 1);
    assert_eq!(ended["failed"], 2);
    let urls = ended["urls"].as_array().unwrap();
    assert_eq!(urls[0]["state"], "done");
    assert_eq!(urls[0]["length"], 1_000_000);
    assert_eq!(urls[1]["state"], "failed");
    assert!(
        urls[1]["reason"].as_str().unwrap().contains("404"),
        "{ended}"
    );
    assert_eq!(urls[2]["state"], "failed");
    assert!(!urls[2]["reason"].as_str().unwrap().is_empty());

    let stats = node.stats().await;
    assert_eq!(stat(&stats, "prefill_bytes"), 1_000_000);
    assert_eq!(stat(&stats, "miss_bytes"), 0, "a prefill is no client miss");
    let asked = origin.request_count();
    let first_client = get(&node.mcc_url("/patch/kb1.msu"), &[]).await;
    assert_eq!(first_client.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(first_client.bytes(), &content[..]);
    assert_eq!(
        origin.request_count(),
        asked,
        "no origin request for the first client"
    );

    // The list shows the job; a job needs the token.
    let list: serde_json::Value = serde_json::from_slice(
        &client()
            .get(format!("http://{}/prefill", node.admin_addr))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(list["jobs"][0]["id"], id);
    let anonymous = client()
        .post(format!("http://{}/prefill", node.admin_addr))
        .body("http://dl.delivery.mp.microsoft.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_and_says_so() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put_with(
        "/slow.bin",
        pattern_bytes(4_000_000, 32),
        Behaviour {
            chunk_delay: Some(Duration::from_millis(50)),
            chunk_size: Some(16 * 1024),
            ..Behaviour::default()
        },
    );
    let (_, submitted) = submit(
        &node,
        serde_json::json!([format!("http://{ORIGIN_HOST}/slow.bin")]),
    )
    .await;
    let id = submitted["id"].as_u64().unwrap();
    eventually_async(
        "the object is filling",
        Duration::from_secs(10),
        async || job(&node, id).await["urls"][0]["state"] == "filling",
    )
    .await;
    let cancelled = client()
        .delete(format!("http://{}/prefill/{id}", node.admin_addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "cancelled");
    eventually_async(
        "the URL is cancelled",
        Duration::from_secs(10),
        async || job(&node, id).await["urls"][0]["state"] == "cancelled",
    )
    .await;
    // Its fill stops: the origin stops being read well before the 4 MB.
    let bytes_then = stat(&node.stats().await, "prefill_bytes");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let bytes_later = stat(&node.stats().await, "prefill_bytes");
    assert!(
        bytes_later - bytes_then < 200_000,
        "the fill stopped: {bytes_then} then {bytes_later}"
    );
    assert!(bytes_later < 4_000_000);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_bandwidth_cap_holds_as_a_rate() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        // 2,000,000 bytes per second.
        config.prefill.max_bandwidth = "16Mbit".into();
        config
    })
    .await;
    let length = 8 * 1024 * 1024;
    origin.put("/big.bin", pattern_bytes(length, 33));
    let started = Instant::now();
    let (_, submitted) = submit(
        &node,
        serde_json::json!([format!("http://{ORIGIN_HOST}/big.bin")]),
    )
    .await;
    let id = submitted["id"].as_u64().unwrap();
    // The rate over the middle of the transfer: bytes counted between two readings.
    let (first_bytes, first_at) =
        eventually_async("a megabyte in", Duration::from_secs(20), async || {
            let bytes = stat(&node.stats().await, "prefill_bytes");
            (bytes >= 1 << 20).then(|| (bytes, Instant::now()))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second_bytes = stat(&node.stats().await, "prefill_bytes");
    let rate = (second_bytes - first_bytes) as f64 / first_at.elapsed().as_secs_f64();
    println!("prefill rate {rate:.0} B/s against a cap of 2,000,000 B/s");
    assert!(
        (1_700_000.0..=2_300_000.0).contains(&rate),
        "rate {rate:.0} B/s is not within 15 % of 2,000,000"
    );
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "done");
    let whole = started.elapsed().as_secs_f64();
    assert!(whole >= length as f64 / 2_300_000.0, "{whole} s");
    node.stop().await;
}
