//! End-to-end: what an admin reads from the admin listener besides `/stats`. The counters'
//! history (`/stats/history`, bounded and advancing), MCC's `/summary` (equal to `/stats` since
//! start), and `/metrics` as Prometheus's own `promtool check metrics` reads it, with the
//! latency histograms per cache status.
//!
//! promtool comes from Debian's `prometheus` package, installed by `.ci/run`. When it is missing
//! locally that check says so and passes, unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI).

mod common;

use std::time::Duration;

use common::*;
use outpost_testkit::{eventually_async, pattern_bytes};
use tokio::process::Command;

async fn admin_json(node: &TestNode, path: &str) -> serde_json::Value {
    let response = client()
        .get(format!("http://{}{path}", node.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{path}"
    );
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_advances_bounded_and_the_summary_matches_stats() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.admin.history_interval = Duration::from_secs(1);
        config
    })
    .await;
    let content = pattern_bytes(300_000, 21);
    origin.put("/a.bin", content.clone());
    let url = node.mcc_url("/a.bin");
    assert_eq!(get(&url, &[]).await.bytes().len(), content.len());
    node.settle().await;
    assert_eq!(
        get(&url, &[]).await.header("x-cache").as_deref(),
        Some("HIT")
    );

    // A day of one-second samples at most, and new ones keep coming, each counting the traffic.
    let history = eventually_async(
        "three samples after the traffic",
        Duration::from_secs(15),
        async || {
            let history = admin_json(&node, "/stats/history").await;
            let samples = history["samples"].as_array().unwrap();
            let counted = samples
                .iter()
                .filter(|sample| sample["hit_bytes"].as_u64() == Some(content.len() as u64))
                .count();
            (counted >= 3).then_some(history)
        },
    )
    .await;
    assert_eq!(history["capacity"], 86_400);
    assert_eq!(history["interval_secs"], 1.0);
    let samples = history["samples"].as_array().unwrap();
    let times: Vec<u64> = samples
        .iter()
        .map(|s| s["unix"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "{times:?}");
    let last = samples.last().unwrap();
    assert_eq!(last["miss_bytes"], content.len() as u64);
    assert_eq!(last["origin_bytes"], content.len() as u64);
    assert_eq!(last["objects"], 1);
    assert!(last["cache_used_bytes"].as_u64().unwrap() >= content.len() as u64);
    // `since` returns only newer samples.
    let newest = *times.last().unwrap();
    let newer = admin_json(&node, &format!("/stats/history?since={newest}")).await;
    assert!(newer["samples"]
        .as_array()
        .unwrap()
        .iter()
        .all(|sample| sample["unix"].as_u64().unwrap() > newest));

    // MCC's summary: since start equals /stats; the last interval saw no traffic by now.
    let summary = admin_json(&node, "/summary").await;
    let stats = node.stats().await;
    for (mcc, ours) in [
        ("hitBytes", "hit_bytes"),
        ("missBytes", "miss_bytes"),
        ("egressBytes", "egress_bytes"),
    ] {
        assert_eq!(summary["sinceStart"][mcc], stats[ours], "{mcc}");
    }
    assert_eq!(summary["sinceStart"]["hitRatioBytes"], 0.5);
    assert_eq!(summary["hitBytes"], 0, "{summary}");
    assert_eq!(summary["intervalSecs"], 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics() {
    if !tool_available("promtool") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    origin.put("/m.bin", pattern_bytes(100_000, 22));
    let _ = get(&node.mcc_url("/m.bin"), &[]).await;
    node.settle().await;
    let _ = get(&node.mcc_url("/m.bin"), &[]).await;
    // Latency per cache status: one miss and one hit, their first bytes and their durations.
    let metrics = eventually_async(
        "both durations recorded",
        Duration::from_secs(10),
        async || {
            let metrics = node.metrics().await;
            metrics
                .contains("outpost_response_duration_seconds_count{cache=\"hit\"} 1")
                .then_some(metrics)
        },
    )
    .await;
    for line in [
        "outpost_response_first_byte_seconds_count{cache=\"miss\"} 1",
        "outpost_response_first_byte_seconds_count{cache=\"hit\"} 1",
        "outpost_response_duration_seconds_count{cache=\"miss\"} 1",
        "# TYPE outpost_response_first_byte_seconds histogram",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = check.stdin.take().unwrap();
        stdin.write_all(metrics.as_bytes()).await.unwrap();
    }
    let output = check.wait_with_output().await.unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool: {complaints}");
    assert!(
        complaints.trim().is_empty(),
        "promtool has lint findings: {complaints}"
    );
    // Prometheus itself asks for OpenMetrics, and gets it.
    let scraped = client()
        .get(format!("http://{}/metrics", node.admin_addr))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(scraped.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = String::from_utf8(scraped.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE outpost_requests counter"));
    assert!(metrics.contains("# TYPE outpost_requests_total counter"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_once_every_worker_accepts() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.server.workers = 2;
        config
    })
    .await;
    origin.put("/r.bin", pattern_bytes(1000, 3));
    let ready_url = format!("http://{}/ready", node.admin_addr);
    // The workers register their listeners on their own threads just after start: ready
    // follows within moments, and then a client request is served.
    eventually_async("ready", Duration::from_secs(10), async || {
        let response = client().get(&ready_url).send().await.unwrap();
        (response.status() == 200).then_some(())
    })
    .await;
    let response = client().get(&ready_url).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "ready\n");
    assert_eq!(get(&node.mcc_url("/r.bin"), &[]).await.bytes().len(), 1000);
    let refused = client().post(&ready_url).send().await.unwrap();
    assert_eq!(refused.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_list_the_fills_in_flight_with_their_progress() {
    let (origin, _storage, node) = origin_and_node().await;
    let length = 2 * 1024 * 1024;
    origin.put_with(
        "/slow-fill.bin",
        pattern_bytes(length, 5),
        outpost_testkit::Behaviour {
            chunk_delay: Some(Duration::from_millis(40)),
            chunk_size: Some(32 * 1024),
            ..Default::default()
        },
    );
    let download = tokio::spawn(
        client()
            .get(node.mcc_url("/slow-fill.bin"))
            .send()
            .await
            .unwrap()
            .bytes(),
    );
    let fill = eventually_async(
        "the fill listed with some bytes stored",
        Duration::from_secs(15),
        async || {
            let stats = admin_json(&node, "/stats").await;
            stats["fills"]
                .as_array()
                .unwrap()
                .iter()
                .find(|fill| {
                    fill["key"].as_str().unwrap().ends_with("/slow-fill.bin")
                        && fill["stored_bytes"].as_u64().unwrap() > 0
                })
                .cloned()
        },
    )
    .await;
    assert_eq!(fill["length"], length as u64);
    assert!(fill["stored_bytes"].as_u64().unwrap() < length as u64);
    assert_eq!(download.await.unwrap().unwrap().len(), length);
    node.settle().await;
    let stats = admin_json(&node, "/stats").await;
    assert_eq!(stats["fills"], serde_json::json!([]), "{}", stats["fills"]);
}
