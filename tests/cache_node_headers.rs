//! End-to-end: the stored header section (RFC 9111 §3.1, §4.3.4) and the store format.
//!
//! An origin's end-to-end headers (a custom header, `Link`, `Access-Control-Allow-Origin`,
//! `Cache-Control`, `Content-Encoding` with its bytes) come back through curl on the MISS, the
//! HIT and the HIT after a restart; hop-by-hop headers never do; a `304` refreshes what is
//! stored; a header section over the bound is relayed and counted, not stored. A store written
//! in format 1 (the fixture in `tests/fixtures/store-format-1`) is upgraded in place and served
//! as a HIT with its headers; a store of a newer format stops the node, with nothing deleted.

mod common;

use std::path::Path;

use common::*;
use outpost_testkit::origin::Behaviour;
use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use tokio::process::Command;

/// One answer as curl saw it: the status line's code, the header fields (names lower-cased, in
/// order) and the body bytes exactly as sent (no `--compressed`).
struct CurlAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl CurlAnswer {
    /// Every value of `name`, in order.
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// The only value of `name`, if any.
    fn header(&self, name: &str) -> Option<&str> {
        let values = self.values(name);
        assert!(values.len() <= 1, "{name} sent {} times", values.len());
        values.first().copied()
    }
}

/// `curl -i` of `url`, split into status, headers and body.
async fn curl(url: &str) -> CurlAnswer {
    let output = Command::new("curl")
        .args(["-sS", "-i", "--noproxy", "*", url])
        .output()
        .await
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let end = output
        .stdout
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("curl -i prints a header section");
    let head = String::from_utf8_lossy(&output.stdout[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    CurlAnswer {
        status,
        headers,
        body: output.stdout[end + 4..].to_vec(),
    }
}

/// The origin's end-to-end headers of the replay scenario.
fn end_to_end_headers() -> Vec<(&'static str, String)> {
    vec![
        ("x-outpost-test", "replayed".into()),
        ("link", "</style.css>; rel=preload; as=style".into()),
        ("link", "</app.js>; rel=preload; as=script".into()),
        ("access-control-allow-origin", "*".into()),
        ("cache-control", "max-age=100000".into()),
    ]
}

/// Hop-by-hop fields an origin (or a proxy before it) may send, which describe one connection
/// and must never be stored or replayed. `x-hop` is hop-by-hop because `Connection` names it.
fn hop_by_hop_headers() -> Vec<(&'static str, String)> {
    vec![
        ("connection", "x-hop".into()),
        ("x-hop", "this connection only".into()),
        ("keep-alive", "timeout=5".into()),
        ("proxy-x-outpost", "for the proxy".into()),
        ("trailer", "x-checksum".into()),
        ("upgrade", "outpost-test/1".into()),
    ]
}

fn assert_end_to_end(answer: &CurlAnswer, what: &str) {
    assert_eq!(answer.header("x-outpost-test"), Some("replayed"), "{what}");
    assert_eq!(
        answer.values("link"),
        [
            "</style.css>; rel=preload; as=style",
            "</app.js>; rel=preload; as=script"
        ],
        "{what}"
    );
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("*"),
        "{what}"
    );
    assert_eq!(
        answer.header("cache-control"),
        Some("max-age=100000"),
        "{what}"
    );
    for name in [
        "x-hop",
        "keep-alive",
        "proxy-x-outpost",
        "trailer",
        "upgrade",
    ] {
        assert_eq!(answer.header(name), None, "{what}: {name} is hop-by-hop");
    }
    assert!(
        answer
            .values("connection")
            .iter()
            .all(|value| !value.contains("x-hop")),
        "{what}: the origin's Connection is not replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_end_to_end_header_is_replayed_on_miss_hit_and_after_a_restart_and_no_hop_by_hop_one()
{
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    let content = pattern_bytes(200_000, 120);
    let mut headers = end_to_end_headers();
    headers.extend(hop_by_hop_headers());
    origin.put_with(
        "/replay.bin",
        content.clone(),
        Behaviour {
            headers,
            ..Behaviour::default()
        },
    );
    let url = node.mcc_url("/replay.bin");
    let miss = curl(&url).await;
    assert_eq!(miss.status, 200);
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(sha256_hex(&miss.body), sha256_hex(&content));
    assert_end_to_end(&miss, "MISS");
    node.settle().await;
    let hit = curl(&url).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(sha256_hex(&hit.body), sha256_hex(&content));
    assert_end_to_end(&hit, "HIT");
    node.stop().await;

    let requests_before = origin.request_count();
    let restarted = TestNode::start(config).await;
    let after_restart = curl(&restarted.mcc_url("/replay.bin")).await;
    assert_eq!(after_restart.header("x-cache"), Some("HIT"));
    assert_eq!(sha256_hex(&after_restart.body), sha256_hex(&content));
    assert_end_to_end(&after_restart, "HIT after a restart");
    assert_eq!(
        origin.request_count(),
        requests_before,
        "fresh for 100000 s"
    );
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_representation_is_stored_and_served_byte_exact_with_its_content_encoding() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    // The mock does not compress: these bytes stand for the gzip body, which clients must get
    // as sent, with the header that says what they are.
    let gzip_bytes = pattern_bytes(300_000, 121);
    origin.put_with(
        "/gz.bin",
        gzip_bytes.clone(),
        Behaviour {
            headers: vec![
                ("content-encoding", "gzip".into()),
                ("cache-control", "max-age=100000".into()),
            ],
            ..Behaviour::default()
        },
    );
    let url = node.mcc_url("/gz.bin");
    let miss = curl(&url).await;
    assert_eq!(miss.header("x-cache"), Some("MISS"));
    assert_eq!(miss.header("content-encoding"), Some("gzip"));
    assert_eq!(sha256_hex(&miss.body), sha256_hex(&gzip_bytes));
    node.settle().await;
    let hit = curl(&url).await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.header("content-encoding"), Some("gzip"));
    assert_eq!(sha256_hex(&hit.body), sha256_hex(&gzip_bytes));
    node.stop().await;

    let requests_before = origin.request_count();
    let restarted = TestNode::start(config).await;
    let after_restart = curl(&restarted.mcc_url("/gz.bin")).await;
    assert_eq!(after_restart.header("x-cache"), Some("HIT"));
    assert_eq!(after_restart.header("content-encoding"), Some("gzip"));
    assert_eq!(sha256_hex(&after_restart.body), sha256_hex(&gzip_bytes));
    assert_eq!(origin.request_count(), requests_before);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_refreshes_the_stored_headers_in_memory_and_on_disk() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    let content = pattern_bytes(150_000, 122);
    let behaviour = |cache_control: &str, version: &str| Behaviour {
        headers: vec![
            ("cache-control", cache_control.into()),
            ("x-outpost-test", version.into()),
        ],
        ..Behaviour::default()
    };
    // max-age=0: every use is checked with the origin.
    origin.put_with("/reval.bin", content.clone(), behaviour("max-age=0", "v1"));
    let url = node.mcc_url("/reval.bin");
    let miss = curl(&url).await;
    assert_eq!(miss.header("cache-control"), Some("max-age=0"));
    node.settle().await;

    origin.set_behaviour(
        "/reval.bin",
        behaviour("max-age=100000, stale-while-revalidate=30", "v2"),
    );
    let before = origin.request_count();
    let hit = curl(&url).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(sha256_hex(&hit.body), sha256_hex(&content));
    assert_eq!(
        hit.header("cache-control"),
        Some("max-age=100000, stale-while-revalidate=30")
    );
    assert_eq!(hit.header("x-outpost-test"), Some("v2"));
    // The whole-object check was a conditional GET answered 304, not a ranged If-Range.
    let checks = &origin.requests()[before..];
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(
        checks[0].header("if-none-match"),
        Some(outpost_testkit::origin::etag_for_content(&content).as_str())
    );
    assert_eq!(checks[0].range, None);

    // Fresh now: no more checks, and the refreshed headers survive a restart.
    let again = curl(&url).await;
    assert_eq!(
        again.header("cache-control"),
        Some("max-age=100000, stale-while-revalidate=30")
    );
    assert_eq!(origin.request_count(), before + 1);
    // On disk: the refreshed lifetime and directives, and when the origin confirmed it.
    let meta_file = outpost_testkit::files_under(storage.path())
        .into_iter()
        .find(|path| path.ends_with("meta.json"))
        .expect("a meta.json");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta_file).unwrap()).unwrap();
    assert_eq!(meta["fresh_for_secs"], 100_000);
    assert_eq!(meta["stale_while_revalidate_secs"], 30);
    assert!(
        meta["confirmed_at_unix"].as_u64().unwrap() >= meta["stored_at_unix"].as_u64().unwrap()
    );
    node.stop().await;
    let restarted = TestNode::start(config).await;
    let after_restart = curl(&restarted.mcc_url("/reval.bin")).await;
    assert_eq!(after_restart.header("x-cache"), Some("HIT"));
    assert_eq!(
        after_restart.header("cache-control"),
        Some("max-age=100000, stale-while-revalidate=30")
    );
    assert_eq!(after_restart.header("x-outpost-test"), Some("v2"));
    assert_eq!(origin.request_count(), before + 1);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_if_range_answer_refreshes_the_stored_headers_of_a_ranged_hit() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(150_000, 123);
    let behaviour = |version: &str| Behaviour {
        headers: vec![
            ("cache-control", "no-cache".into()),
            ("x-outpost-test", version.into()),
        ],
        ..Behaviour::default()
    };
    origin.put_with("/ranged.bin", content.clone(), behaviour("v1"));
    let url = node.mcc_url("/ranged.bin");
    let _ = get(&url, &[]).await;
    node.settle().await;
    origin.set_behaviour("/ranged.bin", behaviour("v2"));
    let before = origin.request_count();
    let part = get(&url, &[("range", "bytes=10-19")]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(part.bytes(), &content[10..20]);
    assert_eq!(part.header("x-outpost-test").as_deref(), Some("v2"));
    let checks = &origin.requests()[before..];
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert!(checks[0].if_range.is_some(), "{checks:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_section_over_the_bound_is_relayed_and_counted_not_stored() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(100_000, 124);
    origin.put_with(
        "/big-headers.bin",
        content.clone(),
        Behaviour {
            headers: vec![("x-outpost-big", "b".repeat(70_000))],
            ..Behaviour::default()
        },
    );
    let url = node.mcc_url("/big-headers.bin");
    for round in 0..2 {
        let answer = get(&url, &[]).await;
        assert_eq!(answer.status, 200, "round {round}");
        assert_eq!(answer.header("x-cache").as_deref(), Some("BYPASS"));
        assert_eq!(answer.bytes(), &content[..]);
    }
    node.settle().await;
    assert_eq!(node.node.index.object_count(), 0);
    let stats = node.stats().await;
    assert_eq!(
        stat(&stats, "objects_refused_headers_too_large"),
        1,
        "{stats}"
    );
    let metrics = node.metrics().await;
    assert!(
        metrics.contains("outpost_objects_refused_headers_too_large_total 1"),
        "{metrics}"
    );
    node.stop().await;
}

/// Copies the directory tree `from` into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn fixture_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/store-format-1")
}

/// The fixture's one object: a 1000-byte file stored by a format-1 node (a `meta.json` with
/// `extra_headers` and no `format`, one slice file, no `format` file at the drive root).
const FIXTURE_PATH: &str = "/fixture/format1.bin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_store_is_upgraded_in_place_and_served_as_a_hit_with_its_headers() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir(), storage.path());
    let generation_dir = std::fs::read_dir(storage.path().join("objects/15"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("0000000000001234");
    let content = std::fs::read(generation_dir.join("0")).unwrap();
    // The origin still has the same version: a check, if the node makes one, is answered 304.
    origin.put(FIXTURE_PATH, content.clone().into());
    let node = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;
    let hit = curl(&node.mcc_url(FIXTURE_PATH)).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(hit.body, content);
    assert_eq!(hit.header("cache-control"), Some("max-age=2000000000"));
    assert_eq!(
        hit.header("content-disposition"),
        Some("attachment; filename=\"format1.bin\"")
    );
    assert_eq!(hit.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        hit.header("etag"),
        Some(outpost_testkit::origin::etag_for_content(&content).as_str())
    );
    assert!(
        origin
            .requests()
            .iter()
            .all(|request| request.range.is_none() && request.header("if-none-match").is_some()),
        "no byte came from the origin: {:?}",
        origin.requests()
    );
    // Upgraded in place: the drive and the object say format 2.
    assert_eq!(
        std::fs::read_to_string(storage.path().join("format"))
            .unwrap()
            .trim(),
        "2"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(generation_dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["format"], 2, "{meta}");
    assert!(meta.get("extra_headers").is_none(), "{meta}");
    node.stop().await;
}

#[tokio::test]
async fn a_store_of_a_newer_format_stops_the_node_and_nothing_is_deleted() {
    let origin = MockOrigin::start().await;
    // A drive whose format file says 3.
    let storage = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir(), storage.path());
    std::fs::write(storage.path().join("format"), "3\n").unwrap();
    let valid = usual_config(storage.path(), &origin.base_url())
        .validate()
        .unwrap();
    let error = match cache_node::node::Node::open(&valid) {
        Ok(_) => panic!("a node opened a store of format 3"),
        Err(error) => error.to_string(),
    };
    let format_path = storage.path().join("format");
    assert!(
        error.contains(&format_path.display().to_string())
            && error.contains("format 3")
            && error.contains("format 2"),
        "{error}"
    );
    let slices: Vec<_> = walk(storage.path());
    assert_eq!(slices.len(), 3, "nothing deleted: {slices:?}");

    // An object whose own meta.json says format 3 stops it too.
    let storage = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir(), storage.path());
    let meta_path = walk(storage.path())
        .into_iter()
        .find(|path| path.ends_with("meta.json"))
        .unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["format"] = 3.into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let valid = usual_config(storage.path(), &origin.base_url())
        .validate()
        .unwrap();
    let error = match cache_node::node::Node::open(&valid) {
        Ok(_) => panic!("a node opened an object of format 3"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains(&meta_path.display().to_string()) && error.contains("format 3"),
        "{error}"
    );
    assert!(meta_path.exists());
}

/// Every file under `root`.
fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
