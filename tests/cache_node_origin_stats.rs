//! End-to-end: per-origin figures in `/stats` and `/metrics`. A node allows two origins, one by
//! host name and one as a content set reached under two names; after a miss and a hit on each,
//! every label's requests and bytes are the known ones, the labels add up to the global
//! counters, a refused origin makes no label, and a restarted node counts its recovered objects
//! under the same labels.

mod common;

use std::path::Path;

use cache_node::config::{Config, OriginConfig};
use common::*;
use outpost_testkit::{pattern_bytes, MockOrigin};

/// The first origin's size: not a multiple of the test slice.
const A_LEN: u64 = 300_000;
/// The second origin's size.
const B_LEN: u64 = 200_000;

/// `a.example` by name to `a`; `b.example` and `*.b.example` as the content set `b-set` to `b`.
fn two_origins(storage: &Path, a: &MockOrigin, b: &MockOrigin) -> Config {
    let mut config = usual_config(storage, &a.base_url());
    let upstream = |origin: &MockOrigin| Some(origin.base_url());
    config.origin = vec![
        OriginConfig {
            host: "a.example".into(),
            upstream: upstream(a),
            ..Default::default()
        },
        OriginConfig {
            host: "b.example".into(),
            upstream: upstream(b),
            content_set: Some("b-set".into()),
            ..Default::default()
        },
        OriginConfig {
            host: "*.b.example".into(),
            upstream: upstream(b),
            content_set: Some("b-set".into()),
            ..Default::default()
        },
    ];
    config
}

/// `path` on `node`, naming `host` with `cacheHostOrigin`.
fn url(node: &TestNode, path: &str, host: &str) -> String {
    format!("http://{}{path}?cacheHostOrigin={host}", node.addr)
}

/// The sum over every origin label of the field `name`.
fn sum_over_origins(stats: &serde_json::Value, name: &str) -> u64 {
    stats["origins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|origin| stat(origin, name))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_origin_numbers_after_traffic_to_two_origins() {
    let (a, b) = (MockOrigin::start().await, MockOrigin::start().await);
    let storage = tempfile::tempdir().unwrap();
    let config = two_origins(storage.path(), &a, &b);
    let node = TestNode::start(config.clone()).await;
    a.put("/a.bin", pattern_bytes(A_LEN as usize, 71));
    b.put("/b.bin", pattern_bytes(B_LEN as usize, 72));

    // Before any traffic, both labels are there at zero: the labels come from the config.
    let stats = node.stats().await;
    assert_eq!(origin_labels(&stats), ["a.example", "b-set"]);
    assert_eq!(sum_over_origins(&stats, "requests"), 0);

    // A miss and a hit on each; the content set's under two of its names.
    for (path, host, expected) in [
        ("/a.bin", "a.example", "MISS"),
        ("/a.bin", "a.example", "HIT"),
        ("/b.bin", "x.b.example", "MISS"),
        ("/b.bin", "b.example", "HIT"),
    ] {
        let fetched = get(&url(&node, path, host), &[]).await;
        assert_eq!(fetched.status, 200, "{host}{path}");
        assert_eq!(fetched.header("x-cache").as_deref(), Some(expected));
        node.settle().await;
    }
    // A refused origin: a 403, and no label for it anywhere.
    let refused = get(&url(&node, "/a.bin", "not-allowed.example"), &[]).await;
    assert_eq!(refused.status, 403);

    let stats = node.stats().await;
    for (label, length) in [("a.example", A_LEN), ("b-set", B_LEN)] {
        let origin = origin_figures(&stats, label);
        assert_eq!(stat(origin, "requests"), 2, "{label}");
        assert_eq!(stat(origin, "egress_bytes"), 2 * length, "{label}");
        assert_eq!(stat(origin, "origin_bytes"), length, "{label}");
        // The hit is all from disk; the miss is from its fill, except slices the fill had
        // already stored when the response reached them.
        assert_eq!(
            stat(origin, "hit_bytes") + stat(origin, "miss_bytes"),
            2 * length,
            "{label}"
        );
        assert!(stat(origin, "hit_bytes") >= length, "{label}: {origin}");
        assert_eq!(stat(origin, "objects"), 1, "{label}");
        assert_eq!(stat(origin, "stored_bytes"), length, "{label}");
    }
    assert_eq!(stats["origins"].as_array().unwrap().len(), 2);

    // The labels add up to the node's own figures; only the refusal has no origin.
    for field in ["hit_bytes", "miss_bytes", "egress_bytes", "origin_bytes"] {
        assert_eq!(
            sum_over_origins(&stats, field),
            stat(&stats, field),
            "{field}"
        );
    }
    assert_eq!(sum_over_origins(&stats, "objects"), stat(&stats, "objects"));
    assert_eq!(
        sum_over_origins(&stats, "stored_bytes"),
        stat(&stats, "cache_used_bytes")
    );
    assert_eq!(stat(&stats, "requests"), 5);
    assert_eq!(sum_over_origins(&stats, "requests"), 4);

    // /metrics has the same figures, one series per label.
    let metrics = node.metrics().await;
    let a_stats = origin_figures(&stats, "a.example");
    for line in [
        "outpost_per_origin_requests_total{origin=\"a.example\"} 2".to_owned(),
        "outpost_per_origin_requests_total{origin=\"b-set\"} 2".to_owned(),
        format!(
            "outpost_per_origin_egress_bytes_total{{origin=\"a.example\"}} {}",
            2 * A_LEN
        ),
        format!(
            "outpost_per_origin_hit_bytes_total{{origin=\"a.example\"}} {}",
            a_stats["hit_bytes"]
        ),
        format!(
            "outpost_per_origin_miss_bytes_total{{origin=\"a.example\"}} {}",
            a_stats["miss_bytes"]
        ),
        format!("outpost_per_origin_origin_bytes_total{{origin=\"b-set\"}} {B_LEN}"),
        "outpost_per_origin_stored_objects{origin=\"b-set\"} 1".to_owned(),
        format!("outpost_per_origin_stored_bytes{{origin=\"a.example\"}} {A_LEN}"),
    ] {
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    assert!(!metrics.contains("not-allowed"), "{metrics}");
    assert!(!stats.to_string().contains("not-allowed"), "{stats}");
    let series = metrics
        .lines()
        .filter(|line| line.starts_with("outpost_per_origin_requests_total{"))
        .count();
    assert_eq!(series, 2, "{metrics}");
    node.stop().await;

    // A restarted node counts the recovered objects under the same labels, with no traffic yet.
    let node = TestNode::start(config).await;
    let stats = node.stats().await;
    for (label, length) in [("a.example", A_LEN), ("b-set", B_LEN)] {
        let origin = origin_figures(&stats, label);
        assert_eq!(stat(origin, "objects"), 1, "{label} after the restart");
        assert_eq!(
            stat(origin, "stored_bytes"),
            length,
            "{label} after the restart"
        );
        assert_eq!(stat(origin, "requests"), 0, "{label} after the restart");
        assert_eq!(stat(origin, "egress_bytes"), 0, "{label} after the restart");
    }
    let hit = get(&url(&node, "/b.bin", "b.example"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    let stats = node.stats().await;
    let b_stats = origin_figures(&stats, "b-set");
    assert_eq!(stat(b_stats, "hit_bytes"), B_LEN);
    assert_eq!(stat(b_stats, "origin_bytes"), 0);
    node.stop().await;
}
