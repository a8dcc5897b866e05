//! End-to-end: the methods a cache does not answer itself. `POST`, `PUT`, `PATCH`, `DELETE` and
//! `OPTIONS` to an allowed origin are relayed with their headers and exact body, in every mode
//! (forward proxy through curl's `-x`, as apt and dnf do with `http_proxy`; MCC; Host header),
//! and never stored; a successful unsafe method drops the stored object for its URL and for the
//! same-origin URL its `Location` names (RFC 9111 §4.4). `TRACE` and `CONNECT` are refused.
//!
//! curl is installed by `.ci/run`. When it is missing locally the curl checks say so and pass,
//! unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI).

mod common;

use std::time::Duration;

use common::*;
use outpost_testkit::{eventually, pattern_bytes, Behaviour};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// What curl printed: the status code on the last line after the body (`-w`).
struct CurlAnswer {
    status: u16,
    body: Vec<u8>,
    headers: String,
}

/// Runs curl with `args`, writing the headers to a file and the status after the body.
async fn curl(args: &[&str]) -> CurlAnswer {
    let scratch = tempfile::tempdir().unwrap();
    let header_file = scratch.path().join("headers");
    let output = Command::new("curl")
        .args(["-sS", "-D"])
        .arg(&header_file)
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let split = output
        .stdout
        .iter()
        .rposition(|&byte| byte == b'\n')
        .unwrap();
    let status = String::from_utf8_lossy(&output.stdout[split + 1..])
        .trim()
        .parse()
        .unwrap();
    CurlAnswer {
        status,
        body: output.stdout[..split].to_vec(),
        headers: std::fs::read_to_string(header_file).unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_and_put_through_curl_as_a_proxy_reach_the_origin_byte_for_byte() {
    if !tool_available("curl") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    let proxy = format!("http://{}", node.addr);
    let scratch = tempfile::tempdir().unwrap();
    // Small enough to be a form post, and a 3 MiB upload that curl sends with
    // `Expect: 100-continue` and that crosses many socket buffers.
    let form = pattern_bytes(1000, 7);
    let upload = pattern_bytes(3 * 1024 * 1024 + 17, 8);
    let form_file = scratch.path().join("form");
    let upload_file = scratch.path().join("upload");
    std::fs::write(&form_file, &form).unwrap();
    std::fs::write(&upload_file, &upload).unwrap();

    let posted = curl(&[
        "-x",
        &proxy,
        "-X",
        "POST",
        "-H",
        "content-type: application/x-outpost-test",
        "-H",
        "x-custom: kept",
        "--data-binary",
        &format!("@{}", form_file.display()),
        &format!("http://{ORIGIN_HOST}/api/submit?x=1"),
    ])
    .await;
    assert_eq!(posted.status, 200, "{}", posted.headers);
    assert_eq!(
        String::from_utf8_lossy(&posted.body),
        "mock origin: POST of 1000 bytes (application/x-outpost-test)\n",
        "the origin's answer is relayed"
    );
    assert!(
        posted
            .headers
            .to_ascii_lowercase()
            .contains("x-cache: bypass"),
        "{}",
        posted.headers
    );

    let put = curl(&[
        "-x",
        &proxy,
        "-T",
        &upload_file.display().to_string(),
        "-H",
        "content-type: application/vnd.debian.binary-package",
        &format!("http://{ORIGIN_HOST}/pool/new.deb"),
    ])
    .await;
    assert_eq!(put.status, 201, "{}", put.headers);

    let requests = origin.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let (post, put) = (&requests[0], &requests[1]);
    assert_eq!(post.method, "POST");
    assert_eq!(post.path, "/api/submit");
    assert_eq!(post.query.as_deref(), Some("x=1"));
    assert_eq!(post.body, form, "the origin sees the exact body");
    assert_eq!(
        post.header("content-type"),
        Some("application/x-outpost-test")
    );
    assert_eq!(post.header("x-custom"), Some("kept"));
    assert_eq!(post.host.as_deref(), Some(ORIGIN_HOST));
    assert!(
        post.header("via")
            .is_some_and(|via| via.contains("outpost-")),
        "the node adds its Via entry: {post:?}"
    );
    assert!(
        post.header("proxy-connection").is_none() && post.header("expect").is_none(),
        "hop-by-hop fields stay at the node: {post:?}"
    );
    assert_eq!(put.method, "PUT");
    assert_eq!(put.body.len(), upload.len());
    assert!(put.body == upload, "the 3 MiB upload arrives byte for byte");
    assert_eq!(
        put.header("content-type"),
        Some("application/vnd.debian.binary-package")
    );

    let stats = node.stats().await;
    assert_eq!(stat(&stats, "relayed_requests"), 2, "{stats}");
    assert_eq!(
        stat(&stats, "relayed_request_bytes"),
        (form.len() + upload.len()) as u64,
        "{stats}"
    );
    assert_eq!(
        stat(&stats, "objects"),
        0,
        "relayed answers are never stored"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_put_drops_the_stored_object_so_the_next_get_asks_the_origin() {
    if !tool_available("curl") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    let fresh_for_a_day = Behaviour {
        headers: vec![("cache-control", "max-age=86400".to_owned())],
        ..Default::default()
    };
    origin.put_with(
        "/files/app.msix",
        pattern_bytes(200_000, 1),
        fresh_for_a_day,
    );
    let url = node.mcc_url("/files/app.msix");
    assert_eq!(
        get(&url, &[]).await.header("x-cache").as_deref(),
        Some("MISS")
    );
    node.settle().await;
    let hit = get(&url, &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(origin.request_count(), 1);

    // The MCC form of a PUT, sent by curl.
    let scratch = tempfile::tempdir().unwrap();
    let replacement = pattern_bytes(150_000, 2);
    let file = scratch.path().join("replacement");
    std::fs::write(&file, &replacement).unwrap();
    let put = curl(&[
        "-X",
        "PUT",
        "--data-binary",
        &format!("@{}", file.display()),
        &url,
    ])
    .await;
    assert_eq!(put.status, 204, "{}", put.headers);
    assert_eq!(origin.requests()[1].body, replacement);
    eventually(
        "the stored object to be dropped",
        Duration::from_secs(5),
        || node.node.index.object_count() == 0,
    )
    .await;

    let after = get(&url, &[]).await;
    assert_eq!(after.header("x-cache").as_deref(), Some("MISS"));
    assert!(
        after.bytes() == replacement,
        "the origin's new content is served"
    );
    let gets = origin
        .requests()
        .iter()
        .filter(|request| request.method == "GET")
        .count();
    assert_eq!(gets, 2, "the GET after the PUT asked the origin again");
    assert_eq!(stat(&node.stats().await, "invalidations"), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_invalidates_the_same_origin_location_it_answers_with_but_a_failed_one_does_not() {
    let (origin, _storage, node) = origin_and_node().await;
    let fresh = |extra: Option<(&'static str, String)>| Behaviour {
        headers: std::iter::once(("cache-control", "max-age=86400".to_owned()))
            .chain(extra)
            .collect(),
        ..Default::default()
    };
    origin.put_with("/items/list", pattern_bytes(5000, 1), fresh(None));
    origin.put_with("/items/other", pattern_bytes(5000, 2), fresh(None));
    for path in ["/items/list", "/items/other"] {
        get(&node.mcc_url(path), &[]).await;
    }
    node.settle().await;
    assert_eq!(node.node.index.object_count(), 2);

    // A failed POST changes nothing.
    origin.put_with(
        "/items/new",
        pattern_bytes(1, 3),
        Behaviour {
            status_override: Some(500),
            ..Default::default()
        },
    );
    let failed = request(reqwest::Method::POST, &node.mcc_url("/items/new"), &[]).await;
    assert_eq!(failed.status, 500);
    // A successful one names another item (absolute, same origin) and a foreign one.
    origin.put_with(
        "/items/create",
        pattern_bytes(1, 4),
        fresh(Some((
            "location",
            format!("http://{ORIGIN_HOST}/items/list"),
        ))),
    );
    let created = request(reqwest::Method::POST, &node.mcc_url("/items/create"), &[]).await;
    assert_eq!(created.status, 200);
    eventually("the Location to be dropped", Duration::from_secs(5), || {
        node.node.index.object_count() == 1
    })
    .await;
    let other = get(&node.mcc_url("/items/other"), &[]).await;
    assert_eq!(other.header("x-cache").as_deref(), Some("HIT"));
    let list = get(&node.mcc_url("/items/list"), &[]).await;
    assert_eq!(list.header("x-cache").as_deref(), Some("MISS"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_is_relayed_in_host_header_mode_and_trace_and_connect_are_refused() {
    let (origin, _storage, node) = origin_and_node().await;
    let options = client()
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}/anything", node.addr),
        )
        .header("host", ORIGIN_HOST)
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(
        options.headers()["allow"],
        "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        "the origin's Allow comes back"
    );
    assert_eq!(origin.requests()[0].method, "OPTIONS");

    let trace = request(reqwest::Method::TRACE, &node.mcc_url("/anything"), &[]).await;
    assert_eq!(trace.status, 405);
    assert_eq!(
        trace.header("allow").as_deref(),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
    );

    let mut socket = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    socket
        .write_all(
            format!("CONNECT {ORIGIN_HOST}:443 HTTP/1.1\r\nHost: {ORIGIN_HOST}:443\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = vec![0; 512];
    let read = socket.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get, head"),
        "{answer}"
    );

    assert_eq!(origin.request_count(), 1, "refusals never reach the origin");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_ends_the_relay_after_the_idle_timeout() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.server.idle_timeout = Duration::from_secs(1);
        config
    })
    .await;
    let mut socket = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    // Announces 100000 bytes, sends ten and stops.
    socket
        .write_all(
            format!(
                "POST /upload?cacheHostOrigin={ORIGIN_HOST} HTTP/1.1\r\nHost: cache\r\n\
                 Content-Length: 100000\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut answer))
        .await
        .expect("the node gives up on a stalled body instead of holding the origin forever");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_err() || answer.is_empty() || answer.starts_with("HTTP/1.1 5"),
        "{answer}"
    );
    eventually(
        "the origin to see the relayed request",
        Duration::from_secs(5),
        || origin.request_count() == 1,
    )
    .await;
    node.stop().await;
}
