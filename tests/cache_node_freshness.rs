//! End-to-end: what the origin's freshness directives and the client's request directives make
//! the node do with a stored version (RFC 9111 §4.2, §5.2; RFC 5861). Each scenario stores an
//! object with a short real lifetime (`max-age=1`), lets it pass, and checks what reaches the
//! origin and what the client gets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outpost_testkit::{
    eventually, eventually_async, pattern_bytes, sha256_hex, Behaviour, MockOrigin,
};

/// How long a background effect (a background check, a fill) may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// Lets a stored version's one-second lifetime (and `extra` beyond it) pass. A real wait: the
/// node's clock is the real one in these scenarios; it is short and bounded, and nothing else
/// is waited for with it.
async fn let_lifetime_pass(extra: Duration) {
    tokio::time::sleep(Duration::from_millis(1100) + extra).await;
}

/// The usual config with `configure` applied to both `[[origin]]` tables.
fn config_with(
    storage: &std::path::Path,
    origin: &MockOrigin,
    configure: impl Fn(&mut cache_node::config::OriginConfig),
) -> cache_node::config::Config {
    let mut config = usual_config(storage, &origin.base_url());
    config.origin.iter_mut().for_each(configure);
    config
}

/// Two nodes in front of `origin`: one with the usual config, one with `switch` applied to its
/// origins; and their storage directories, which must outlive them.
async fn usual_and_switched_nodes(
    origin: &MockOrigin,
    switch: impl Fn(&mut cache_node::config::OriginConfig),
) -> (TestNode, TestNode, [tempfile::TempDir; 2]) {
    let storages = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let usual = TestNode::start(usual_config(storages[0].path(), &origin.base_url())).await;
    let switched = TestNode::start(config_with(storages[1].path(), origin, switch)).await;
    (usual, switched, storages)
}

/// Stores `path` through the node (a MISS, then the fill settles).
async fn store(node: &TestNode, path: &str) -> Fetched {
    let miss = get(&node.mcc_url(path), &[]).await;
    assert_eq!(miss.status, 200);
    node.settle().await;
    miss
}

#[tokio::test]
async fn stale_while_revalidate_answers_from_disk_at_once_and_checks_once_in_the_background() {
    let (origin, _storage, node) = origin_and_node().await;
    let directives = with_headers(&[("cache-control", "max-age=1, stale-while-revalidate=60")]);
    let version_one = pattern_bytes(150_000, 1);
    origin.put_with("/swr.bin", version_one.clone(), directives.clone());
    store(&node, "/swr.bin").await;

    // The origin has a new version now, and is slow to answer anything about it.
    let version_two = pattern_bytes(150_000, 2);
    origin.put_with(
        "/swr.bin",
        version_two.clone(),
        Behaviour {
            header_delay: Some(Duration::from_secs(2)),
            ..directives
        },
    );
    let_lifetime_pass(Duration::ZERO).await;
    origin.reset_counters();

    // Stale: answered from disk at once, not after the origin's two seconds.
    let url = node.mcc_url("/swr.bin");
    for _ in 0..3 {
        let started = Instant::now();
        let stale = get(&url, &[]).await;
        assert_eq!(stale.status, 200);
        assert_eq!(stale.header("x-cache").as_deref(), Some("HIT"));
        assert_eq!(sha256_hex(stale.bytes()), sha256_hex(&version_one));
        let age: u64 = stale.header("age").unwrap().parse().unwrap();
        assert!(age >= 1, "the Age shows the version is past its max-age=1");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "a stale hit waited for the origin: {:?}",
            started.elapsed()
        );
    }

    // Exactly one background check, a conditional one, for all three stale hits; it finds the
    // new version, and the next request gets it.
    eventually(
        "the background check to drop the old version",
        PATIENCE,
        || node.node.stats.version_changes.get() == 1,
    )
    .await;
    let checks = origin.requests();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(checks[0].is_conditional(), "{checks:?}");
    let fresh = get(&url, &[]).await;
    assert_eq!(sha256_hex(fresh.bytes()), sha256_hex(&version_two));
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "background_revalidations"), 1, "{stats}");
    node.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_the_stored_version_inside_its_window_and_504_beyond_it() {
    let (origin, _storage, node) = origin_and_node().await;
    let inside = pattern_bytes(100_000, 3);
    origin.put_with(
        "/inside.bin",
        inside.clone(),
        with_headers(&[("cache-control", "max-age=1, stale-if-error=600")]),
    );
    origin.put_with(
        "/beyond.bin",
        pattern_bytes(100_000, 4),
        with_headers(&[("cache-control", "max-age=1, stale-if-error=1")]),
    );
    store(&node, "/inside.bin").await;
    store(&node, "/beyond.bin").await;
    // Past the lifetime and past one second of stale-if-error.
    let_lifetime_pass(Duration::from_millis(1100)).await;
    origin.shutdown();

    let served = get(&node.mcc_url("/inside.bin"), &[]).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(served.bytes()), sha256_hex(&inside));

    let refused = get(&node.mcc_url("/beyond.bin"), &[]).await;
    assert_eq!(refused.status, 504, "{:?}", refused.body);
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "stale_refusals"), 1, "{stats}");
    node.stop().await;
}

#[tokio::test]
async fn the_stale_if_error_window_is_configurable_when_the_origin_gives_none() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.upstream.stale_if_error = Duration::ZERO;
        config
    })
    .await;
    origin.put_with(
        "/plain.bin",
        pattern_bytes(100_000, 5),
        with_headers(&[("cache-control", "max-age=1")]),
    );
    store(&node, "/plain.bin").await;
    let_lifetime_pass(Duration::ZERO).await;
    origin.shutdown();
    let refused = get(&node.mcc_url("/plain.bin"), &[]).await;
    assert_eq!(refused.status, 504, "{:?}", refused.body);
    node.stop().await;
}

#[tokio::test]
async fn must_revalidate_is_never_served_stale_unless_the_origin_is_switched_to_availability() {
    let origin = MockOrigin::start().await;
    let (strict, lenient, _storages) =
        usual_and_switched_nodes(&origin, |origin| origin.serve_stale_on_error = true).await;
    for (path, directive) in [
        (
            "/must.bin",
            "max-age=1, must-revalidate, stale-if-error=600",
        ),
        (
            "/proxy.bin",
            "max-age=1, proxy-revalidate, stale-while-revalidate=600",
        ),
    ] {
        origin.put_with(
            path,
            pattern_bytes(100_000, 6),
            with_headers(&[("cache-control", directive)]),
        );
        store(&strict, path).await;
        store(&lenient, path).await;
    }
    let_lifetime_pass(Duration::ZERO).await;
    origin.shutdown();
    for path in ["/must.bin", "/proxy.bin"] {
        let refused = get(&strict.mcc_url(path), &[]).await;
        assert_eq!(refused.status, 504, "{path}: {:?}", refused.body);
        let served = get(&lenient.mcc_url(path), &[]).await;
        assert_eq!(served.status, 200, "{path}");
        assert_eq!(served.bytes(), &pattern_bytes(100_000, 6)[..]);
    }
    strict.stop().await;
    lenient.stop().await;
}

#[tokio::test]
async fn the_directives_survive_a_restart() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    origin.put_with(
        "/must.bin",
        pattern_bytes(100_000, 7),
        with_headers(&[("cache-control", "max-age=1, must-revalidate")]),
    );
    store(&node, "/must.bin").await;
    node.stop().await;
    let restarted = TestNode::start(config).await;
    let_lifetime_pass(Duration::ZERO).await;
    origin.shutdown();
    let refused = get(&restarted.mcc_url("/must.bin"), &[]).await;
    assert_eq!(refused.status, 504, "must-revalidate was forgotten");
    restarted.stop().await;
}

#[tokio::test]
async fn serve_stale_while_revalidating_answers_every_stale_hit_at_once() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        config_with(storage, origin, |origin| {
            origin.serve_stale_while_revalidating = true;
        })
    })
    .await;
    // No stale-while-revalidate from the origin: the switch alone decides.
    let directives = with_headers(&[("cache-control", "max-age=1")]);
    let version_one = pattern_bytes(100_000, 8);
    origin.put_with("/mcc.bin", version_one.clone(), directives.clone());
    store(&node, "/mcc.bin").await;
    origin.put_with(
        "/mcc.bin",
        version_one.clone(),
        Behaviour {
            header_delay: Some(Duration::from_secs(2)),
            ..directives
        },
    );
    let_lifetime_pass(Duration::ZERO).await;
    origin.reset_counters();
    let started = Instant::now();
    let stale = get(&node.mcc_url("/mcc.bin"), &[]).await;
    assert_eq!(stale.header("x-cache").as_deref(), Some("HIT"));
    assert!(started.elapsed() < Duration::from_millis(1500));
    // The background check confirms the version: hits meanwhile are stale and ask nothing
    // more, then the version is fresh again (its Age starts over).
    let url = node.mcc_url("/mcc.bin");
    eventually_async(
        "the background check to confirm the version",
        PATIENCE,
        async || get(&url, &[]).await.header("age").as_deref() == Some("0"),
    )
    .await;
    assert_eq!(origin.request_count(), 1, "{:?}", origin.requests());
    assert_eq!(node.node.stats.background_revalidations.get(), 1);
    node.stop().await;
}

#[tokio::test]
async fn the_heuristic_lifetime_is_a_tenth_of_the_time_since_last_modified() {
    let (origin, _storage, node) = origin_and_node().await;
    // Modified 20 s before the origin's Date: fresh for 2 s, not for revalidate_after's hour.
    origin.put_with(
        "/heuristic.bin",
        pattern_bytes(100_000, 9),
        with_headers(&[("date", "Mon, 01 Jan 2024 00:00:20 GMT")]),
    );
    let url = node.mcc_url("/heuristic.bin");
    store(&node, "/heuristic.bin").await;
    origin.reset_counters();
    let hit = get(&url, &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(origin.request_count(), 0, "still fresh");
    // A real wait past the two seconds, short and bounded.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let checked = get(&url, &[]).await;
    assert_eq!(checked.status, 200);
    let requests = origin.requests();
    assert_eq!(
        requests.len(),
        1,
        "one check after the heuristic lifetime: {requests:?}"
    );
    assert!(requests[0].is_conditional());
    node.stop().await;
}

#[tokio::test]
async fn a_clients_no_cache_forces_one_conditional_check_unless_the_origin_ignores_it() {
    let origin = MockOrigin::start().await;
    let (obeying, ignoring, _storages) =
        usual_and_switched_nodes(&origin, |origin| origin.ignore_client_no_cache = true).await;
    origin.put_with(
        "/long.bin",
        pattern_bytes(100_000, 10),
        with_headers(&[("cache-control", "max-age=100000")]),
    );
    store(&obeying, "/long.bin").await;
    store(&ignoring, "/long.bin").await;
    let forcing: [&[(&str, &str)]; 3] = [
        &[("cache-control", "no-cache")],
        &[("cache-control", "max-age=0")],
        &[("pragma", "no-cache")],
    ];
    for headers in forcing {
        origin.reset_counters();
        let checked = get(&obeying.mcc_url("/long.bin"), headers).await;
        assert_eq!(checked.status, 200);
        assert_eq!(checked.header("x-cache").as_deref(), Some("HIT"));
        let requests = origin.requests();
        assert_eq!(requests.len(), 1, "{headers:?}: {requests:?}");
        assert!(requests[0].is_conditional(), "a conditional check");

        origin.reset_counters();
        let unchecked = get(&ignoring.mcc_url("/long.bin"), headers).await;
        assert_eq!(unchecked.header("x-cache").as_deref(), Some("HIT"));
        assert_eq!(origin.request_count(), 0, "{headers:?}");
    }
    // Without the directive, the fresh version is served unchecked.
    origin.reset_counters();
    let _ = get(&obeying.mcc_url("/long.bin"), &[]).await;
    assert_eq!(origin.request_count(), 0);
    obeying.stop().await;
    ignoring.stop().await;
}

#[tokio::test]
async fn only_if_cached_is_504_on_a_miss_and_200_on_a_hit_without_asking_the_origin() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(100_000, 11);
    origin.put("/cached.bin", content.clone());
    let url = node.mcc_url("/cached.bin");
    let only_if_cached = [("cache-control", "only-if-cached")];

    let miss = get(&url, &only_if_cached).await;
    assert_eq!(miss.status, 504);
    assert_eq!(
        origin.request_count(),
        0,
        "a miss never contacts the origin"
    );

    store(&node, "/cached.bin").await;
    origin.reset_counters();
    let hit = get(&url, &only_if_cached).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.bytes(), &content[..]);
    let ranged = get(
        &url,
        &[
            ("cache-control", "only-if-cached"),
            ("range", "bytes=10-19"),
        ],
    )
    .await;
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.bytes(), &content[10..20]);
    assert_eq!(origin.request_count(), 0, "a hit never contacts the origin");
    node.stop().await;
}

#[tokio::test]
async fn only_if_cached_serves_a_stored_range_of_a_partly_stored_object_and_504s_the_rest() {
    let (origin, _storage, node) = origin_and_node().await;
    // Eight 64 KiB slices; only the first is fetched by a ranged request, and the fill stops
    // there (nobody wants the rest).
    let content = pattern_bytes(8 * TEST_SLICE as usize, 12);
    origin.put_with(
        "/partial.bin",
        content.clone(),
        with_headers(&[("cache-control", "max-age=100000")]),
    );
    let url = node.mcc_url("/partial.bin");
    let first = get(&url, &[("range", "bytes=0-999")]).await;
    assert_eq!(first.status, 206);
    node.settle().await;
    origin.reset_counters();
    let stored = get(
        &url,
        &[
            ("cache-control", "only-if-cached"),
            ("range", "bytes=100-199"),
        ],
    )
    .await;
    assert_eq!(stored.status, 206);
    assert_eq!(stored.bytes(), &content[100..200]);
    let not_stored = get(
        &url,
        &[
            ("cache-control", "only-if-cached"),
            ("range", "bytes=400000-400099"),
        ],
    )
    .await;
    assert_eq!(not_stored.status, 504);
    assert_eq!(
        origin.request_count(),
        0,
        "only-if-cached never asks the origin"
    );
    node.stop().await;
}

#[tokio::test]
async fn max_stale_takes_a_stale_version_unchecked_and_min_fresh_forces_a_check() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(50_000, 13);
    origin.put_with(
        "/short.bin",
        content.clone(),
        with_headers(&[("cache-control", "max-age=1")]),
    );
    origin.put_with(
        "/strict.bin",
        content.clone(),
        with_headers(&[("cache-control", "max-age=1, must-revalidate")]),
    );
    origin.put_with(
        "/long.bin",
        content.clone(),
        with_headers(&[("cache-control", "max-age=100")]),
    );
    for path in ["/short.bin", "/strict.bin", "/long.bin"] {
        store(&node, path).await;
    }
    let_lifetime_pass(Duration::ZERO).await;
    origin.reset_counters();
    // Stale by well under a minute: taken as it is.
    let stale = get(
        &node.mcc_url("/short.bin"),
        &[("cache-control", "max-stale=60")],
    )
    .await;
    assert_eq!(stale.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(stale.bytes(), &content[..]);
    assert_eq!(origin.request_count(), 0, "max-stale: no check");
    // But never what the origin said must be revalidated.
    let strict = get(
        &node.mcc_url("/strict.bin"),
        &[("cache-control", "max-stale")],
    )
    .await;
    assert_eq!(strict.status, 200);
    assert_eq!(
        origin.request_count(),
        1,
        "must-revalidate wins over max-stale"
    );
    // Fresh for 100 s, but not for the 200 more the client wants: checked.
    origin.reset_counters();
    let checked = get(
        &node.mcc_url("/long.bin"),
        &[("cache-control", "min-fresh=200")],
    )
    .await;
    assert_eq!(checked.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(origin.request_count(), 1, "min-fresh: checked");
    assert!(origin.requests()[0].is_conditional());
    let _ = get(
        &node.mcc_url("/long.bin"),
        &[("cache-control", "min-fresh=10")],
    )
    .await;
    assert_eq!(origin.request_count(), 1, "fresh enough: no check");
    node.stop().await;
}
