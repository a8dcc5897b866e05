//! End-to-end: what the origin answers instead of content. A redirect keeps its `Location`, a
//! `404` or `5xx` its own body and fields, in every mode; `301`, `308`, `404` and `410` are kept
//! while the origin says they are fresh (a `404` at most `upstream.not_found_max_age`) and
//! answered without the origin meanwhile; other statuses always go to the origin (RFC 9111 §3,
//! RFC 9110 §15).
//!
//! curl is installed by `.ci/run`. When it is missing locally the curl checks say so and pass,
//! unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use outpost_testkit::{pattern_bytes, Behaviour, MockOrigin};
use tokio::process::Command;

const ORIGIN_TEXT: &str = "mock origin: status override";

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn send(method: reqwest::Method, url: &str, headers: &[(&str, &str)]) -> Fetched {
    let mut builder = no_redirects().request(method, url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = builder.send().await.expect("the node answers");
    Fetched {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.map_err(|error| format!("{error:?}")),
    }
}

async fn fetch(url: &str, headers: &[(&str, &str)]) -> Fetched {
    send(reqwest::Method::GET, url, headers).await
}

fn answering(status: u16, headers: &[(&'static str, &str)]) -> Behaviour {
    Behaviour {
        status_override: Some(status),
        ..with_headers(headers)
    }
}

/// GET requests the origin received for `path`.
fn origin_gets(origin: &MockOrigin, path: &str) -> usize {
    origin
        .requests()
        .iter()
        .filter(|request| request.method == "GET" && request.path == path)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_redirect_keeps_its_location_and_is_answered_from_memory() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put_with(
        "/moved.cab",
        Bytes::from_static(b"old"),
        answering(
            301,
            &[
                ("location", "http://example.test/new.cab"),
                ("cache-control", "max-age=3600"),
                ("x-origin-note", "moved for good"),
            ],
        ),
    );
    let url = node.mcc_url("/moved.cab");

    let first = fetch(&url, &[]).await;
    assert_eq!(first.status, 301);
    assert_eq!(
        first.header("location").as_deref(),
        Some("http://example.test/new.cab")
    );
    assert_eq!(
        first.header("x-origin-note").as_deref(),
        Some("moved for good")
    );
    assert_eq!(first.header("x-cache").as_deref(), Some("MISS"));
    assert!(String::from_utf8_lossy(first.bytes()).starts_with(ORIGIN_TEXT));

    for _ in 0..3 {
        let again = fetch(&url, &[]).await;
        assert_eq!(again.status, 301);
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(again.header("x-cache").as_deref(), Some("HIT"));
        assert!(again.header("age").is_some(), "a kept answer carries Age");
        assert_eq!(again.bytes(), first.bytes(), "the origin's own body");
    }
    // A HEAD is answered from memory too, with the GET's length and no body.
    let head = send(reqwest::Method::HEAD, &url, &[]).await;
    assert_eq!(head.status, 301);
    assert_eq!(
        head.header("content-length"),
        Some(first.bytes().len().to_string())
    );
    assert_eq!(origin_gets(&origin, "/moved.cab"), 1);
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "status_answers_kept"), 1);
    assert_eq!(stat(&stats, "status_answer_hits"), 4);

    // A client's no-cache asks the origin again.
    let checked = fetch(&url, &[("cache-control", "no-cache")]).await;
    assert_eq!(checked.status, 301);
    assert_eq!(checked.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(origin_gets(&origin, "/moved.cab"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_that_are_not_kept_reach_the_client_as_the_origin_sent_them_every_time() {
    let (origin, _storage, node) = origin_and_node().await;
    // A temporary redirect, a refusal and a failure, all marked fresh: none may be kept.
    let cases: [(&str, u16, &str, &str); 3] = [
        ("/temporary", 302, "location", "/elsewhere"),
        ("/forbidden", 403, "x-reason", "geo"),
        ("/failing", 503, "retry-after", "120"),
    ];
    for (path, status, name, value) in cases {
        origin.put_with(
            path,
            Bytes::from_static(b"x"),
            answering(status, &[(name, value), ("cache-control", "max-age=3600")]),
        );
        for round in 1..=2 {
            let answer = fetch(&node.mcc_url(path), &[]).await;
            assert_eq!(answer.status, status, "{path}");
            assert_eq!(answer.header(name).as_deref(), Some(value), "{path}");
            assert_eq!(answer.header("x-cache").as_deref(), Some("MISS"), "{path}");
            assert!(
                String::from_utf8_lossy(answer.bytes()).starts_with(ORIGIN_TEXT),
                "{path}: the origin's body, not the node's"
            );
            assert_eq!(origin_gets(&origin, path), round, "{path}");
        }
    }
    // A 404 without an explicit lifetime is not kept either (no heuristic for it).
    origin.put_with(
        "/missing",
        Bytes::from_static(b"x"),
        answering(404, &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")]),
    );
    for _ in 0..2 {
        assert_eq!(fetch(&node.mcc_url("/missing"), &[]).await.status, 404);
    }
    assert_eq!(origin_gets(&origin, "/missing"), 2);
    assert_eq!(stat(&node.stats().await, "status_answers_kept"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_is_kept_no_longer_than_not_found_max_age_and_then_the_published_file_is_served() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.upstream.not_found_max_age = Duration::from_secs(1);
        config
    })
    .await;
    let content = pattern_bytes(200_000, 41);
    origin.put_with(
        "/kb/update.msu",
        content.clone(),
        answering(404, &[("cache-control", "max-age=86400")]),
    );
    let url = node.mcc_url("/kb/update.msu");
    assert_eq!(fetch(&url, &[]).await.status, 404);
    let kept = fetch(&url, &[]).await;
    assert_eq!(
        (kept.status, kept.header("x-cache").as_deref()),
        (404, Some("HIT"))
    );
    assert_eq!(origin_gets(&origin, "/kb/update.msu"), 1);

    // Published meanwhile: once the cap has passed, the file is fetched and stored.
    origin.set_behaviour("/kb/update.msu", Behaviour::default());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let published = fetch(&url, &[]).await;
    assert_eq!(published.status, 200);
    assert_eq!(published.bytes(), &content[..]);
    node.settle().await;
    let hit = fetch(&url, &[("range", "bytes=100-199")]).await;
    assert_eq!(hit.status, 206);
    assert_eq!(hit.bytes(), &content[100..200]);
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_put_forgets_a_kept_410() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put_with(
        "/gone.bin",
        Bytes::from_static(b"x"),
        answering(410, &[("cache-control", "max-age=3600")]),
    );
    let url = node.mcc_url("/gone.bin");
    assert_eq!(fetch(&url, &[]).await.status, 410);
    assert_eq!(
        fetch(&url, &[]).await.header("x-cache").as_deref(),
        Some("HIT")
    );
    // The origin takes the new file; the node relays the PUT and forgets the 410 (RFC 9111 §4.4).
    origin.set_behaviour("/gone.bin", Behaviour::default());
    let uploaded = pattern_bytes(5000, 3);
    let put = no_redirects()
        .put(&url)
        .body(uploaded.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let now = fetch(&url, &[]).await;
    assert_eq!(now.status, 200);
    assert_eq!(now.bytes(), &uploaded[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_node_as_a_proxy_sees_the_origins_redirect_and_404() {
    if !tool_available("curl") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    origin.put_with(
        "/dists/stable/Release",
        Bytes::from_static(b"x"),
        answering(
            308,
            &[
                ("location", "http://origin.test/dists/bookworm/Release"),
                ("cache-control", "max-age=600"),
            ],
        ),
    );
    origin.put_with(
        "/pool/main/absent.deb",
        Bytes::from_static(b"x"),
        answering(404, &[("cache-control", "max-age=60")]),
    );
    let proxy = format!("http://{}", node.addr);
    for (path, status, cache) in [
        ("/dists/stable/Release", "308", "MISS"),
        ("/dists/stable/Release", "308", "HIT"),
        ("/pool/main/absent.deb", "404", "MISS"),
        ("/pool/main/absent.deb", "404", "HIT"),
    ] {
        let output = Command::new("curl")
            .args(["-sS", "-i", "-x", &proxy])
            .arg(format!("http://{}{path}", common::ORIGIN_HOST))
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        let text = String::from_utf8_lossy(&output.stdout).to_lowercase();
        assert!(
            text.starts_with(&format!("http/1.1 {status}")),
            "{path}: {text}"
        );
        assert!(
            text.contains(&format!("x-cache: {}", cache.to_lowercase())),
            "{text}"
        );
        assert!(text.contains(&ORIGIN_TEXT.to_lowercase()), "{text}");
        if status == "308" {
            assert!(
                text.contains("location: http://origin.test/dists/bookworm/release"),
                "{text}"
            );
        }
    }
    assert_eq!(origin_gets(&origin, "/dists/stable/Release"), 1);
    assert_eq!(origin_gets(&origin, "/pool/main/absent.deb"), 1);
}
