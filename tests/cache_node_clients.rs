//! End-to-end with real clients: curl's `-r` ranges, warm hits over HTTP/1.1 (the zero-copy
//! `sendfile` path) and HTTP/2 (the copying path), and aria2c's 8-connection segmented download of
//! a 256 MiB file through MCC-mode URLs, all checked by SHA-256.
//!
//! The tools are installed by `.ci/run`. When one is missing locally the test says so and
//! passes, unless `OUTPOST_REQUIRE_TOOLS=1` (set in CI), where a missing tool is a failure.

mod common;

use common::*;
use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_ranges_through_the_node_match_the_origin() {
    if !tool_available("curl") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(3_000_000, 31);
    origin.put("/curl.bin", content.clone());
    let url = node.mcc_url("/curl.bin");
    for (range, first, last) in [
        ("0-99", 0, 99),
        ("1000000-2000000", 1_000_000, 2_000_000),
        ("2999990-", 2_999_990, 2_999_999),
    ] {
        let output = Command::new("curl")
            .args(["-sS", "--fail", "--noproxy", "*", "-r", range, &url])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "curl -r {range}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            sha256_hex(&output.stdout),
            sha256_hex(&content[first..=last]),
            "curl -r {range}"
        );
    }
    // HTTP-proxy mode: curl sends an absolute-form request line, as apt and yum do.
    let proxied = Command::new("curl")
        .args(["-sS", "--fail", "-x", &format!("http://{}", node.addr)])
        .arg(format!("http://{ORIGIN_HOST}/curl.bin"))
        .output()
        .await
        .unwrap();
    assert!(
        proxied.status.success(),
        "curl -x: {}",
        String::from_utf8_lossy(&proxied.stderr)
    );
    assert_eq!(
        sha256_hex(&proxied.stdout),
        sha256_hex(&content),
        "curl through the node as a proxy"
    );
    let refused = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &format!("http://{}", node.addr),
        ])
        .arg("http://not-allowed.example/curl.bin")
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&refused.stdout),
        "403",
        "the node is not an open proxy"
    );
    let whole = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--noproxy",
            "*",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let headers = String::from_utf8_lossy(&whole.stdout).to_ascii_lowercase();
    assert!(
        headers.contains("x-cache: partial") || headers.contains("x-cache: hit"),
        "{headers}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_hits_are_byte_exact_over_http1_sendfile_and_http2() {
    if !tool_available("curl") {
        return;
    }
    let (origin, _storage, node) = origin_and_node().await;
    // Slices are 64 KiB in the test config: windows of all sizes, at and around the zero-copy
    // threshold, unaligned starts and ends, and spans crossing many slices.
    let content = pattern_bytes(5_000_003, 77);
    origin.put("/zc.bin", content.clone());
    let url = node.mcc_url("/zc.bin");
    let cases: [(u64, u64); 6] = [
        (0, 5_000_002),
        (1, 32 * 1024),
        (65_535, 65_536 + 32 * 1024),
        (100_000, 1_234_567),
        (4_999_000, 5_000_002),
        (3, 30),
    ];
    let curl_range = |protocol: &'static str, first: u64, last: u64| {
        let url = url.clone();
        async move {
            let output = Command::new("curl")
                .args(["-sS", "--fail", "--noproxy", "*", protocol])
                .args(["-r", &format!("{first}-{last}"), &url])
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "curl {protocol} -r {first}-{last}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        }
    };
    // Warm the whole object, then every window is a hit.
    curl_range("--http1.1", 0, 5_000_002).await;
    node.settle().await;
    let before = node.stats().await["zero_copy_bytes"].as_u64().unwrap();
    // Bytes of the HTTP/1.1 windows large enough for zero-copy (32 KiB and up).
    let mut large_window_bytes = 0;
    for (first, last) in cases {
        let expected = sha256_hex(&content[first as usize..=last as usize]);
        let http1 = curl_range("--http1.1", first, last).await;
        assert_eq!(sha256_hex(&http1), expected, "HTTP/1.1 -r {first}-{last}");
        let http2 = curl_range("--http2-prior-knowledge", first, last).await;
        assert_eq!(sha256_hex(&http2), expected, "HTTP/2 -r {first}-{last}");
        if last - first + 1 >= 32 * 1024 {
            large_window_bytes += last - first + 1;
        }
    }
    let zero_copy = node.stats().await["zero_copy_bytes"].as_u64().unwrap() - before;
    // The object is warm in the page cache, so nearly all of those bytes go out with sendfile;
    // only the unaligned ends of a window may be copied.
    assert!(
        zero_copy >= large_window_bytes * 9 / 10 && zero_copy <= large_window_bytes,
        "the HTTP/1.1 hits went out with sendfile ({zero_copy} of {large_window_bytes} bytes)"
    );
    assert_eq!(origin.max_fetches_of_any_byte("/zc.bin"), 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aria2c_with_eight_connections_downloads_256_mib_through_mcc_urls() {
    if !tool_available("aria2c") {
        return;
    }
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = test_config(storage.path(), &origin.base_url(), 1024 * 1024, "2GiB");
    config.upstream.idle_read_timeout = std::time::Duration::from_secs(30);
    let node = TestNode::start(config).await;
    let content = pattern_bytes(256 * 1024 * 1024, 41);
    let expected = sha256_hex(&content);
    origin.put("/filestreamingservice/files/0b5e/big.cab", content);
    let download = tempfile::tempdir().unwrap();
    let url = node.mcc_url("/filestreamingservice/files/0b5e/big.cab");
    for round in ["cold", "warm"] {
        let output = Command::new("aria2c")
            .args([
                "-x8",
                "-s8",
                "-k1M",
                "--no-conf",
                "--allow-overwrite=true",
                "--auto-file-renaming=false",
            ])
            .args([
                "--console-log-level=warn",
                "--summary-interval=0",
                "--all-proxy=",
                "--file-allocation=none",
            ])
            .arg("-d")
            .arg(download.path())
            .args(["-o", "big.cab", &url])
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "aria2c ({round}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let downloaded = std::fs::read(download.path().join("big.cab")).unwrap();
        assert_eq!(sha256_hex(&downloaded), expected, "aria2c {round} download");
    }
    assert_eq!(
        origin.max_fetches_of_any_byte("/filestreamingservice/files/0b5e/big.cab"),
        1,
        "8 parallel connections still fetch each byte once"
    );
    let stats = node.stats().await;
    assert_eq!(stats["origin_bytes"].as_u64().unwrap(), 256 * 1024 * 1024);
    node.stop().await;
}
