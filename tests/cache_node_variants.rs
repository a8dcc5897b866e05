//! End-to-end: `Vary` (RFC 9111 §4.1). An origin that negotiates `Accept-Encoding` gets one
//! request per normalised coding, and each representation is stored apart and served only to
//! clients that asked for its coding: on the MISS, the HIT, the HIT after a restart and the HIT
//! after a revalidation, byte-exact with its `Content-Encoding`, through curl and reqwest.
//! `Vary: *` and `Vary: Cookie` are never stored; a URL gets at most `MAX_VARIANTS` variants.

mod common;

use bytes::Bytes;
use common::*;
use outpost_testkit::{pattern_bytes, sha256_hex, Behaviour, MockOrigin};
use tokio::process::Command;

/// The origin's second representation of a file, "gzip" (the mock does not compress; these
/// bytes stand for the gzip body, which clients must get as sent).
fn negotiated(gzip: &Bytes, cache_control: &str) -> Behaviour {
    Behaviour {
        encodings: vec![("gzip", gzip.clone())],
        ..with_headers(&[("cache-control", cache_control)])
    }
}

/// Requests the origin got for `path` with `Accept-Encoding: coding`.
fn origin_asks(origin: &MockOrigin, path: &str, coding: &str) -> usize {
    origin
        .requests()
        .iter()
        .filter(|request| request.path == path && request.header("accept-encoding") == Some(coding))
        .count()
}

/// curl's answer, raw (no `--compressed`): (`X-Cache`, `Content-Encoding`, body).
async fn curl(url: &str, accept_encoding: Option<&str>) -> (String, Option<String>, Vec<u8>) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-i", "--noproxy", "*", url]);
    if let Some(coding) = accept_encoding {
        command.args(["-H", &format!("Accept-Encoding: {coding}")]);
    }
    let output = command.output().await.expect("curl runs");
    assert!(output.status.success());
    let end = output
        .stdout
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap();
    let head = String::from_utf8_lossy(&output.stdout[..end]).to_lowercase();
    let field = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .map(|value| value.trim().to_owned())
    };
    (
        field("x-cache").unwrap_or_default(),
        field("content-encoding"),
        output.stdout[end + 4..].to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_encoding_variants_are_stored_apart_through_restart_and_revalidation() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let config = usual_config(storage.path(), &origin.base_url());
    let node = TestNode::start(config.clone()).await;
    let identity = pattern_bytes(300_000, 201);
    let gzip = pattern_bytes(90_000, 202);
    origin.put_with(
        "/app.js",
        identity.clone(),
        negotiated(&gzip, "max-age=100000"),
    );
    let url = node.mcc_url("/app.js");
    let browser = [("accept-encoding", "gzip, deflate, br")];
    let gzip_only = [("accept-encoding", "gzip")];

    // The first request learns the Vary; each coding is fetched once and stored apart.
    let plain = get(&url, &[]).await;
    assert_eq!(plain.status, 200);
    assert_eq!(sha256_hex(plain.bytes()), sha256_hex(&identity));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary").as_deref(), Some("Accept-Encoding"));
    let zipped = get(&url, &gzip_only).await;
    assert_eq!(zipped.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(sha256_hex(zipped.bytes()), sha256_hex(&gzip));
    node.settle().await;
    // A browser listing br first asks the origin for br: a third variant, answered in gzip
    // or identity by this origin, which only knows gzip, so it gets identity here.
    let from_browser = get(&url, &browser).await;
    assert_eq!(from_browser.status, 200);
    node.settle().await;

    for round in 0..2 {
        let plain = get(&url, &[]).await;
        assert_eq!(plain.header("x-cache").as_deref(), Some("HIT"), "{round}");
        assert_eq!(sha256_hex(plain.bytes()), sha256_hex(&identity));
        assert_eq!(plain.header("content-encoding"), None);
        let zipped = get(&url, &gzip_only).await;
        assert_eq!(zipped.header("x-cache").as_deref(), Some("HIT"), "{round}");
        assert_eq!(zipped.header("content-encoding").as_deref(), Some("gzip"));
        assert_eq!(sha256_hex(zipped.bytes()), sha256_hex(&gzip));
        // A range of the gzip variant is a range of the gzip bytes.
        let ranged = get(
            &url,
            &[("accept-encoding", "gzip"), ("range", "bytes=1000-1999")],
        )
        .await;
        assert_eq!(ranged.status, 206);
        assert_eq!(ranged.bytes(), &gzip[1000..2000]);
    }
    assert_eq!(origin_asks(&origin, "/app.js", "identity"), 1);
    assert_eq!(origin_asks(&origin, "/app.js", "gzip"), 1);
    assert_eq!(origin_asks(&origin, "/app.js", "br"), 1);
    node.stop().await;

    // After a restart, the variants are known from disk: no origin request at all.
    let before = origin.request_count();
    let node = TestNode::start(config.clone()).await;
    let url = node.mcc_url("/app.js");
    if tool_available("curl") {
        let (cache, coding, body) = curl(&url, Some("gzip")).await;
        assert_eq!((cache.as_str(), coding.as_deref()), ("hit", Some("gzip")));
        assert_eq!(sha256_hex(&body), sha256_hex(&gzip));
        let (cache, coding, body) = curl(&url, None).await;
        assert_eq!((cache.as_str(), coding), ("hit", None));
        assert_eq!(sha256_hex(&body), sha256_hex(&identity));
    }
    let zipped = get(&url, &gzip_only).await;
    assert_eq!(zipped.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(zipped.bytes()), sha256_hex(&gzip));
    assert_eq!(origin.request_count(), before);

    // Revalidation of the gzip variant asks in gzip, and a 304 keeps serving its bytes.
    origin.set_behaviour("/app.js", negotiated(&gzip, "max-age=100000"));
    let checked = get(
        &url,
        &[("accept-encoding", "gzip"), ("cache-control", "no-cache")],
    )
    .await;
    assert_eq!(checked.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(checked.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(sha256_hex(checked.bytes()), sha256_hex(&gzip));
    let check = origin.requests().last().cloned().unwrap();
    assert!(check.is_conditional(), "{check:?}");
    assert_eq!(check.header("accept-encoding"), Some("gzip"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_star_and_vary_cookie_are_relayed_and_never_stored() {
    let (origin, _storage, node) = origin_and_node().await;
    for (path, vary) in [("/star", "*"), ("/per-user", "Cookie")] {
        origin.put_with(
            path,
            pattern_bytes(70_000, 9),
            with_headers(&[("vary", vary), ("cache-control", "max-age=3600")]),
        );
        for _ in 0..2 {
            let answer = get(&node.mcc_url(path), &[]).await;
            assert_eq!(answer.status, 200);
            assert_eq!(
                answer.header("x-cache").as_deref(),
                Some("BYPASS"),
                "{path}"
            );
        }
    }
    assert_eq!(stat(&node.stats().await, "objects"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_gets_at_most_eight_variants_and_the_rest_are_relayed() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put_with(
        "/by-language",
        pattern_bytes(10_000, 10),
        with_headers(&[
            ("vary", "Accept-Language"),
            ("cache-control", "max-age=3600"),
        ]),
    );
    let url = node.mcc_url("/by-language");
    let languages = ["da", "de", "en", "es", "fi", "fr", "it", "nl", "pl", "sv"];
    for language in languages {
        let answer = get(&url, &[("accept-language", language)]).await;
        assert_eq!(answer.status, 200);
        node.settle().await;
    }
    // The first request learned the Vary from an answer to a request without the field: that
    // variant is "no Accept-Language". With it, seven languages make eight variants; the
    // last three are relayed with the client's own value.
    let mut hits = 0;
    let mut relayed = 0;
    for language in languages {
        let answer = get(&url, &[("accept-language", language)]).await;
        match answer.header("x-cache").as_deref() {
            Some("HIT") => hits += 1,
            Some("BYPASS") => relayed += 1,
            other => panic!("{language}: {other:?}"),
        }
    }
    assert_eq!((hits, relayed), (7, 3));
    // The origin got the client's own value each time it was asked, stored or relayed.
    let requests = origin.requests();
    let asked: Vec<Option<&str>> = requests
        .iter()
        .map(|request| request.header("accept-language"))
        .collect();
    assert_eq!(asked[0], None);
    assert!(asked[1..].iter().all(Option::is_some), "{asked:?}");
    assert_eq!(asked.len(), 1 + 10 + 3);
}
