//! End-to-end: the RFC 9110 range and conditional matrix through a real node, on cold, warm and
//! partially warm objects of awkward sizes, with every body checked byte for byte against the
//! origin's content.

mod common;

use bytes::Bytes;
use common::*;
use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};

/// One range request and what a correct answer looks like.
struct RangeCase {
    range: &'static str,
    /// Expected (first, last) inclusive, or None for a 416.
    expected: Option<(u64, u64)>,
}

fn cases_for(length: u64) -> Vec<RangeCase> {
    let mut cases = vec![
        RangeCase {
            range: "bytes=0-0",
            expected: (length > 0).then_some((0, 0)),
        },
        RangeCase {
            range: "bytes=-1",
            expected: (length > 0).then(|| (length - 1, length - 1)),
        },
        RangeCase {
            range: "bytes=-500",
            expected: (length > 0).then(|| (length.saturating_sub(500), length - 1)),
        },
        RangeCase {
            range: "bytes=0-",
            expected: (length > 0).then(|| (0, length - 1)),
        },
        RangeCase {
            range: "bytes=0-999999999999",
            expected: (length > 0).then(|| (0, length - 1)),
        },
        RangeCase {
            range: "bytes=999999999999-",
            expected: None,
        },
    ];
    if length > 100 {
        cases.push(RangeCase {
            range: "bytes=100-",
            expected: Some((100, length - 1)),
        });
        cases.push(RangeCase {
            range: "bytes=50-99",
            expected: Some((50, 99)),
        });
    }
    if length > TEST_SLICE + 10 {
        // Straddles a slice boundary.
        cases.push(RangeCase {
            range: "bytes=65530-65545",
            expected: Some((65530, 65545)),
        });
    }
    cases
}

async fn check_range_matrix(node: &TestNode, path: &str, content: &Bytes) {
    let length = content.len() as u64;
    for case in cases_for(length) {
        let fetched = get(&node.mcc_url(path), &[("range", case.range)]).await;
        match case.expected {
            Some((first, last)) => {
                assert_eq!(fetched.status, 206, "{path} {}", case.range);
                assert_eq!(
                    fetched.header("content-range").unwrap(),
                    format!("bytes {first}-{last}/{length}"),
                    "{path} {}",
                    case.range
                );
                let expected = &content[first as usize..=last as usize];
                assert_eq!(
                    sha256_hex(fetched.bytes()),
                    sha256_hex(expected),
                    "{path} {}",
                    case.range
                );
            }
            None => {
                assert_eq!(fetched.status, 416, "{path} {}", case.range);
                assert_eq!(
                    fetched.header("content-range").unwrap(),
                    format!("bytes */{length}")
                );
            }
        }
    }
}

#[tokio::test]
async fn every_range_form_returns_the_origin_bytes_for_awkward_sizes_cold_and_warm() {
    let (origin, _storage, node) = origin_and_node().await;
    let sizes = [
        0,
        1,
        TEST_SLICE - 1,
        TEST_SLICE,
        TEST_SLICE + 1,
        64 * 1024 * 1024 + 13,
    ];
    for (seed, size) in sizes.iter().enumerate() {
        let path = format!("/files/size-{size}.bin");
        let content = pattern_bytes(*size as usize, seed as u64);
        origin.put(&path, content.clone());
        // Cold: a range first, so the object starts partially warm.
        check_range_matrix(&node, &path, &content).await;
        // A full GET completes the object.
        let full = get(&node.mcc_url(&path), &[]).await;
        assert_eq!(full.status, 200);
        assert_eq!(full.header("content-length").unwrap(), size.to_string());
        assert_eq!(sha256_hex(full.bytes()), sha256_hex(&content), "{path}");
        // Warm: everything again, now from disk, without the origin.
        node.settle().await;
        let requests_before = origin.request_count();
        check_range_matrix(&node, &path, &content).await;
        let again = get(&node.mcc_url(&path), &[]).await;
        assert_eq!(sha256_hex(again.bytes()), sha256_hex(&content));
        assert_eq!(again.header("x-cache").as_deref(), Some("HIT"), "{path}");
        assert_eq!(
            origin.request_count(),
            requests_before,
            "{path}: warm reads must not touch the origin"
        );
        assert!(
            origin.max_fetches_of_any_byte(&path) <= 1,
            "{path}: a byte was fetched twice"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn multiple_ranges_come_back_as_multipart_byteranges() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(300_000, 7);
    origin.put("/multi.bin", content.clone());
    let fetched = get(
        &node.mcc_url("/multi.bin"),
        &[("range", "bytes=0-9, 200000-200009, -5")],
    )
    .await;
    assert_eq!(fetched.status, 206);
    let content_type = fetched.header("content-type").unwrap();
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("multipart content type has a boundary")
        .trim_matches('"')
        .to_owned();
    let body = fetched.bytes();
    assert_eq!(
        fetched.header("content-length").unwrap(),
        body.len().to_string()
    );
    let text = String::from_utf8_lossy(body);
    let parts: Vec<&str> = text.split(&format!("--{boundary}")).collect();
    // Preamble (empty), three parts, and the closing "--".
    assert_eq!(parts.len(), 5, "{text}");
    for (part, (first, last)) in
        parts[1..4]
            .iter()
            .zip([(0usize, 9usize), (200_000, 200_009), (299_995, 299_999)])
    {
        assert!(
            part.contains(&format!("Content-Range: bytes {first}-{last}/300000")),
            "{part}"
        );
        let payload_start = body
            .windows(4)
            .enumerate()
            .filter(|(_, window)| *window == b"\r\n\r\n")
            .map(|(index, _)| index + 4)
            .find(|index| body[*index..].starts_with(&content[first..=last]));
        assert!(
            payload_start.is_some(),
            "part {first}-{last} carries the right bytes"
        );
    }
    // Warm and large, the parts go out with sendfile between hyper's framing: every payload is
    // exactly the object's bytes, each part's framing intact.
    let _ = get(&node.mcc_url("/multi.bin"), &[]).await;
    node.settle().await;
    let zero_copy_before = node.stats().await["zero_copy_bytes"].as_u64().unwrap();
    let large = get(
        &node.mcc_url("/multi.bin"),
        &[("range", "bytes=1000-99999, 150000-299998")],
    )
    .await;
    assert_eq!(large.status, 206);
    let boundary = large
        .header("content-type")
        .unwrap()
        .split("boundary=")
        .nth(1)
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let delimiter = format!("--{boundary}").into_bytes();
    let body = large.bytes();
    let starts: Vec<usize> = (0..body.len().saturating_sub(delimiter.len()))
        .filter(|index| body[*index..].starts_with(&delimiter))
        .collect();
    assert_eq!(starts.len(), 3, "two parts and the closing delimiter");
    for (pair, (first, last)) in starts
        .windows(2)
        .zip([(1000usize, 99_999usize), (150_000, 299_998)])
    {
        let part = &body[pair[0]..pair[1]];
        let header_end = part
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("part headers end")
            + 4;
        let payload = &part[header_end..part.len() - 2];
        assert_eq!(
            payload.len(),
            last - first + 1,
            "part {first}-{last} length"
        );
        assert!(
            payload == &content[first..=last],
            "part {first}-{last} bytes"
        );
    }
    let zero_copy = node.stats().await["zero_copy_bytes"].as_u64().unwrap() - zero_copy_before;
    assert!(
        zero_copy >= 200_000,
        "the parts went out zero-copy ({zero_copy} bytes)"
    );

    // Too many ranges are refused rather than served as a huge multipart body.
    let many: Vec<String> = (0..40)
        .map(|index| format!("{}-{}", index * 10, index * 10 + 1))
        .collect();
    let refused = get(
        &node.mcc_url("/multi.bin"),
        &[("range", &format!("bytes={}", many.join(",")))],
    )
    .await;
    assert_eq!(refused.status, 416);
    node.stop().await;
}

#[tokio::test]
async fn malformed_ranges_are_ignored_and_conditionals_are_honoured() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(100_000, 3);
    origin.put("/cond.bin", content.clone());
    let url = node.mcc_url("/cond.bin");

    for malformed in ["bytes=5-1", "items=0-1", "bytes=abc", "bytes="] {
        let fetched = get(&url, &[("range", malformed)]).await;
        assert_eq!(fetched.status, 200, "{malformed}");
        assert_eq!(sha256_hex(fetched.bytes()), sha256_hex(&content));
    }
    let full = get(&url, &[]).await;
    let etag = full.header("etag").expect("origin ETag is served");
    let last_modified = full
        .header("last-modified")
        .expect("origin Last-Modified is served");
    assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));

    let not_modified = get(&url, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.bytes().is_empty());
    let weak = format!("W/{etag}");
    assert_eq!(
        get(&url, &[("if-none-match", &weak)]).await.status,
        304,
        "If-None-Match compares weakly"
    );
    assert_eq!(
        get(&url, &[("if-none-match", "\"other\"")]).await.status,
        200
    );
    assert_eq!(
        get(&url, &[("if-modified-since", &last_modified)])
            .await
            .status,
        304
    );
    assert_eq!(
        get(
            &url,
            &[("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT")]
        )
        .await
        .status,
        200
    );

    let honoured = get(&url, &[("range", "bytes=10-19"), ("if-range", &etag)]).await;
    assert_eq!(honoured.status, 206);
    assert_eq!(honoured.bytes(), &content[10..20]);
    let stale = get(&url, &[("range", "bytes=10-19"), ("if-range", "\"old\"")]).await;
    assert_eq!(
        stale.status, 200,
        "a failed If-Range serves the whole representation"
    );
    assert_eq!(stale.bytes().len(), content.len());
    let dated = get(
        &url,
        &[("range", "bytes=10-19"), ("if-range", &last_modified)],
    )
    .await;
    assert_eq!(dated.status, 206);

    let head = request(reqwest::Method::HEAD, &url, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length").unwrap(), "100000");
    assert_eq!(head.header("accept-ranges").as_deref(), Some("bytes"));
    assert!(head.bytes().is_empty());
    node.stop().await;
}

#[tokio::test]
async fn origins_outside_the_allowlist_and_other_methods_are_refused() {
    let origin = MockOrigin::start().await;
    origin.put("/a.bin", pattern_bytes(10, 1));
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;

    let mcc = get(
        &format!("http://{}/a.bin?cacheHostOrigin=evil.example", node.addr),
        &[],
    )
    .await;
    assert_eq!(mcc.status, 403);
    assert!(String::from_utf8_lossy(mcc.bytes()).contains("evil.example"));
    let bare = get(&format!("http://{}/a.bin", node.addr), &[]).await;
    assert_eq!(
        bare.status, 403,
        "a request naming no allowed origin is refused"
    );
    let trace = request(reqwest::Method::TRACE, &node.mcc_url("/a.bin"), &[]).await;
    assert_eq!(trace.status, 405);
    assert_eq!(
        trace.header("allow").as_deref(),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
    );
    assert_eq!(origin.request_count(), 0, "refusals never reach the origin");

    // Host-header mode reaches the same content.
    let by_host = client()
        .get(format!("http://{}/a.bin", node.addr))
        .header("host", ORIGIN_HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(by_host.status(), 200);
    assert_eq!(by_host.bytes().await.unwrap(), pattern_bytes(10, 1));
    let upstream = &origin.requests()[0];
    assert_eq!(upstream.host.as_deref(), Some(ORIGIN_HOST));
    assert!(
        upstream.query.as_deref().unwrap_or("").is_empty(),
        "cacheHostOrigin is never sent upstream"
    );

    // An origin 404 (without a lifetime) is passed on as the origin sent it, body included, and
    // not kept: once the object appears, the next request gets the real bytes.
    let missing = get(&node.mcc_url("/missing.bin"), &[]).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.bytes(), b"mock origin: no object at this path\n");
    assert_ne!(missing.header("x-cache").as_deref(), Some("HIT"));
    let appeared = pattern_bytes(70_000, 9);
    origin.put("/missing.bin", appeared.clone());
    let found = get(&node.mcc_url("/missing.bin"), &[]).await;
    assert_eq!(found.status, 200);
    assert_eq!(found.bytes(), &appeared[..]);
    let stats = node.stats().await;
    assert!(stats["requests"].as_u64().unwrap() >= 5);
    node.stop().await;
}

#[tokio::test]
async fn reverse_proxy_mode_serves_requests_that_name_no_origin_from_the_default_upstream() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(150_000, 12);
    origin.put("/pool/main/a.deb", content.clone());
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.server.default_upstream = Some(origin.base_url());
    let node = TestNode::start(config).await;
    let url = format!("http://{}/pool/main/a.deb", node.addr);
    let cold = get(&url, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(cold.status, 206);
    assert_eq!(cold.bytes(), &content[1000..2000]);
    let full = get(&url, &[]).await;
    assert_eq!(sha256_hex(full.bytes()), sha256_hex(&content));
    node.settle().await;
    let warm = get(&url, &[]).await;
    assert_eq!(warm.header("x-cache").as_deref(), Some("HIT"));
    // An explicitly named origin that is not allowed is still refused, default upstream or not.
    let named = get(
        &format!("http://{}/x?cacheHostOrigin=evil.example", node.addr),
        &[],
    )
    .await;
    assert_eq!(named.status, 403);
    node.stop().await;
}

#[tokio::test]
async fn an_upstream_that_points_back_at_the_node_is_a_quick_error_not_a_hang() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    let listeners = cache_node::server::bind_client_listeners(
        "127.0.0.1:0".parse().unwrap(),
        config.server.workers,
    )
    .unwrap();
    // The node's own address and port allowed as an origin: Host-header requests for it come
    // back here.
    config.origin.push(cache_node::config::OriginConfig {
        host: "127.0.0.1".into(),
        upstream: None,
        ports: vec![listeners[0].local_addr().unwrap().port()],
        ..Default::default()
    });
    let valid = config.validate().unwrap();
    let node = TestNode::start_on(
        cache_node::node::Node::open(&valid).unwrap(),
        &valid,
        listeners,
    )
    .await;
    let started = std::time::Instant::now();
    let looped = get(&format!("http://{}/loop.bin", node.addr), &[]).await;
    assert!(
        [502, 508].contains(&looped.status),
        "a loop is refused, got {}",
        looped.status
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "the loop was cut at the second hop, not by a timeout"
    );
    let stats = node.stats().await;
    assert_eq!(stats["origin_requests"].as_u64(), Some(1), "{stats}");
    node.stop().await;
}

#[tokio::test]
async fn the_admin_listener_reports_and_purges_with_the_token() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(200_000, 13);
    origin.put("/admin.bin", content.clone());
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;
    let admin = format!("http://{}", node.admin_addr);
    assert_eq!(get(&format!("{admin}/health"), &[]).await.bytes(), b"ok\n");

    get(&node.mcc_url("/admin.bin"), &[]).await;
    node.settle().await;
    get(&node.mcc_url("/admin.bin"), &[("range", "bytes=0-99")]).await;
    let stats = node.stats().await;
    for field in [
        "hit_bytes",
        "miss_bytes",
        "egress_bytes",
        "origin_bytes",
        "hit_ratio_bytes",
        "requests",
        "cache_used_bytes",
        "cache_max_bytes",
        "objects",
        "disk_backend",
    ] {
        assert!(stats.get(field).is_some(), "/stats has {field}: {stats}");
    }
    assert_eq!(stats["miss_bytes"].as_u64().unwrap(), 200_000);
    assert_eq!(stats["hit_bytes"].as_u64().unwrap(), 100);
    assert_eq!(stats["origin_bytes"].as_u64().unwrap(), 200_000);
    assert_eq!(stats["cache_used_bytes"].as_u64().unwrap(), 200_000);
    assert_eq!(stats["objects"].as_u64().unwrap(), 1);
    let reported = stats["disk_backend"].as_str().unwrap().to_owned();
    assert_eq!(reported, expected_disk_backend(&reported));

    let metrics = get(&format!("{admin}/metrics"), &[]).await;
    let text = String::from_utf8_lossy(metrics.bytes()).into_owned();
    assert!(text.contains("outpost_hit_bytes_total 100"), "{text}");
    assert!(text.contains("outpost_origin_bytes_total 200000"), "{text}");
    assert!(text.contains("outpost_cache_used_bytes 200000"), "{text}");
    let backend_line = format!(
        "outpost_disk_backend_info{{backend=\"{}\"}} 1",
        expected_disk_backend(&reported)
    );
    assert!(text.contains(&backend_line), "{text}");

    // One object, inspected: how much is stored, where, and how fresh.
    let object_url = format!("{admin}/objects?origin={ORIGIN_HOST}&path=%2Fadmin.bin");
    let inspected = get(&object_url, &[]).await;
    assert_eq!(inspected.status, 200);
    let report: serde_json::Value = serde_json::from_slice(inspected.bytes()).unwrap();
    assert_eq!(report["key"], format!("{ORIGIN_HOST}/admin.bin"));
    assert_eq!(report["length"], 200_000);
    assert_eq!(report["stored_bytes"], 200_000);
    assert_eq!(report["complete"], true);
    assert_eq!(report["slices_stored"], report["slices"]);
    assert_eq!(report["slices_filling"], 0);
    assert!(report["age_secs"].as_u64().unwrap() < 60, "{report}");
    assert_eq!(report["fresh_for_secs"], serde_json::Value::Null);
    assert_eq!(
        report["drive"].as_str().unwrap(),
        storage.path().display().to_string()
    );
    let unknown = get(
        &format!("{admin}/objects?origin={ORIGIN_HOST}&path=%2Fnope"),
        &[],
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(
        get(&format!("{admin}/objects?path=%2Fx"), &[]).await.status,
        400
    );

    let purge_url = object_url;
    let refused = request(reqwest::Method::DELETE, &purge_url, &[]).await;
    assert_eq!(refused.status, 401, "state changes need the token");
    let wrong = request(
        reqwest::Method::DELETE,
        &purge_url,
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(wrong.status, 401);
    let purged = request(
        reqwest::Method::DELETE,
        &purge_url,
        &[("authorization", "Bearer test-token")],
    )
    .await;
    assert_eq!(purged.status, 200);
    let again = get(&node.mcc_url("/admin.bin"), &[]).await;
    assert_eq!(
        again.header("x-cache").as_deref(),
        Some("MISS"),
        "a purged object is fetched again"
    );
    assert_eq!(sha256_hex(again.bytes()), sha256_hex(&content));
    node.stop().await;
}
