//! Origins named by address, and content sets: Delivery Optimization's
//! `/<path>?cacheHostOrigin=<IP literal>` requests for addresses in an allowed `cidr` range are
//! served and cached; one file reached through several addresses of a content set is stored and
//! fetched once; special-purpose addresses (a literal, or what an allowed name resolves to) are
//! refused with 403 before anything is connected.

mod common;

use std::net::TcpListener;

use cache_node::config::{Config, ContentSetConfig, OriginConfig};
use common::*;
use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use tokio::process::Command;

/// `cacheHostOrigin=<host>` with the host percent-encoded, as a client puts an IPv6 literal's
/// brackets and colons in a query.
fn do_url(node: &TestNode, path: &str, host: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(host.as_bytes()).collect();
    format!("http://{}{path}?cacheHostOrigin={encoded}", node.addr)
}

/// A loopback port with a listener that must never see a connection from the node.
fn untouched_service() -> TcpListener {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

fn assert_never_connected(listener: &TcpListener) {
    assert!(
        matches!(listener.accept(), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "the node connected to a refused address"
    );
}

/// `localhost` allowed by name on `port`, without an upstream.
fn localhost_origin(port: u16) -> OriginConfig {
    OriginConfig {
        host: "localhost".into(),
        ports: vec![port],
        ..Default::default()
    }
}

fn storage_config(storage: &std::path::Path, origins: Vec<OriginConfig>) -> Config {
    let mut config = usual_config(storage, "http://127.0.0.1:9");
    config.origin = origins;
    config
}

/// Fetches `path` naming `host` on a cold node: the content, fetched from `origin` with `host` as
/// the `Host`. Returns how many requests the origin saw.
async fn miss_fetched_from(
    node: &TestNode,
    origin: &MockOrigin,
    path: &str,
    host: &str,
    content: &[u8],
) -> usize {
    let miss = get(&do_url(node, path, host), &[]).await;
    assert_eq!(miss.status, 200, "{host}");
    assert_eq!(miss.bytes(), content);
    node.settle().await;
    let requests = origin.requests();
    assert!(!requests.is_empty());
    assert!(requests
        .iter()
        .all(|request| request.host.as_deref() == Some(host)));
    requests.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn do_literals_in_allowed_ranges_are_served_cached_and_stored_once_per_content_set() {
    let origin_v4 = MockOrigin::start().await;
    let origin_v6 = MockOrigin::start_on("::1").await;
    let storage = tempfile::tempdir().unwrap();
    // Loopback is special-purpose: it is allowed only because these ranges list it explicitly.
    let node = TestNode::start(storage_config(
        storage.path(),
        vec![
            OriginConfig {
                cidr: vec!["127.0.0.0/8".into()],
                ports: vec![origin_v4.addr().port()],
                content_set: Some("cdn".into()),
                ..Default::default()
            },
            OriginConfig {
                cidr: vec!["::1/128".into()],
                ports: vec![origin_v6.addr().port()],
                content_set: Some("cdn".into()),
                ..Default::default()
            },
        ],
    ))
    .await;
    let v4 = format!("127.0.0.1:{}", origin_v4.addr().port());
    let v4_other = format!("127.0.0.2:{}", origin_v4.addr().port());
    let v6 = format!("[::1]:{}", origin_v6.addr().port());
    let first_file = pattern_bytes(300_000, 61);
    let second_file = pattern_bytes(200_000, 62);
    origin_v4.put("/files/first.cab", first_file.clone());
    origin_v6.put("/files/second.cab", second_file.clone());

    // An IPv4 literal: fetched from that address, with its own Host, then a HIT.
    let v4_requests =
        miss_fetched_from(&node, &origin_v4, "/files/first.cab", &v4, &first_file).await;
    let hit = get(&do_url(&node, "/files/first.cab", &v4), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.bytes(), &first_file[..]);

    // A second address of the same set (nothing listens there): the stored object.
    let other_address = get(&do_url(&node, "/files/first.cab", &v4_other), &[]).await;
    assert_eq!(other_address.status, 200);
    assert_eq!(other_address.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(other_address.bytes(), &first_file[..]);
    assert_eq!(origin_v4.request_count(), v4_requests);

    // An IPv6 literal, bracketed: fetched from [::1], then a HIT there and through the IPv4
    // address, whose origin does not even have the file.
    let v6_requests =
        miss_fetched_from(&node, &origin_v6, "/files/second.cab", &v6, &second_file).await;
    for address in [&v6, &v4] {
        let hit = get(&do_url(&node, "/files/second.cab", address), &[]).await;
        assert_eq!(hit.status, 200, "{address}");
        assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"), "{address}");
        assert_eq!(hit.bytes(), &second_file[..]);
    }
    assert_eq!(origin_v6.request_count(), v6_requests);
    assert_eq!(origin_v4.request_count(), v4_requests);
    assert_eq!(node.node.index.object_count(), 2);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_set_sends_its_canonical_host_to_addresses() {
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let mut config = storage_config(
        storage.path(),
        vec![OriginConfig {
            cidr: vec!["127.0.0.0/8".into()],
            ports: vec![origin.addr().port()],
            content_set: Some("windows-update".into()),
            ..Default::default()
        }],
    );
    config.content_set = vec![ContentSetConfig {
        name: "windows-update".into(),
        host_header: Some("dl.delivery.mp.microsoft.com".into()),
    }];
    let node = TestNode::start(config).await;
    origin.put(
        "/filestreamingservice/files/g/x.png",
        pattern_bytes(5_000, 63),
    );
    let served = get(
        &do_url(
            &node,
            "/filestreamingservice/files/g/x.png",
            &origin.addr().to_string(),
        ),
        &[],
    )
    .await;
    assert_eq!(served.status, 200);
    let requests = origin.requests();
    assert!(!requests.is_empty());
    assert!(requests
        .iter()
        .all(|request| request.host.as_deref() == Some("dl.delivery.mp.microsoft.com")));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literals_in_special_ranges_are_refused_with_403_before_any_connection() {
    let service = untouched_service();
    let port = service.local_addr().unwrap().port();
    let storage = tempfile::tempdir().unwrap();
    // Every public address is allowed; no special-purpose range is listed.
    let node = TestNode::start(storage_config(
        storage.path(),
        vec![OriginConfig {
            cidr: vec!["0.0.0.0/0".into(), "::/0".into()],
            ports: vec![port],
            content_set: Some("cdn".into()),
            ..Default::default()
        }],
    ))
    .await;
    let refusals = [
        (format!("127.0.0.1:{port}"), "a loopback address"),
        (format!("[::1]:{port}"), "a loopback address"),
        (format!("[::ffff:127.0.0.1]:{port}"), "a loopback address"),
        ("10.1.2.3".to_owned(), "a private address"),
        ("192.168.1.10".to_owned(), "a private address"),
        ("[fd00::1]".to_owned(), "a private address"),
        ("169.254.169.254".to_owned(), "a link-local address"),
        ("[fe80::1]".to_owned(), "a link-local address"),
        ("224.0.0.251".to_owned(), "a multicast address"),
        ("0.0.0.0".to_owned(), "an unspecified address"),
        ("255.255.255.255".to_owned(), "the broadcast address"),
    ];
    for (literal, reason) in &refusals {
        let refused = get(&do_url(&node, "/files/a.cab", literal), &[]).await;
        assert_eq!(refused.status, 403, "{literal}");
        let text = String::from_utf8_lossy(refused.bytes()).into_owned();
        assert!(text.contains(reason), "{literal}: {text}");
        assert!(text.contains("cidr"), "{literal}: {text}");
    }
    assert_never_connected(&service);
    assert_eq!(node.node.stats_snapshot().origin_requests, 0);
    assert_eq!(node.node.index.object_count(), 0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_refused_with_403_before_any_connection() {
    let service = untouched_service();
    let port = service.local_addr().unwrap().port();
    let origin = MockOrigin::start().await;
    origin.put("/files/a.cab", pattern_bytes(10_000, 64));
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(storage_config(
        storage.path(),
        vec![
            // Allowed by name, without an upstream: the node resolves it itself.
            localhost_origin(port),
            // An upstream URL is the admin's choice: its name is trusted wherever it resolves.
            OriginConfig {
                host: "mirror.example".into(),
                upstream: Some(format!("http://localhost:{}", origin.addr().port())),
                ..Default::default()
            },
        ],
    ))
    .await;
    let by_query = get(
        &do_url(&node, "/files/a.cab", &format!("localhost:{port}")),
        &[],
    )
    .await;
    let by_host = get(
        &format!("http://{}/files/a.cab", node.addr),
        &[("host", &format!("localhost:{port}"))],
    )
    .await;
    for refused in [&by_query, &by_host] {
        assert_eq!(refused.status, 403);
        let text = String::from_utf8_lossy(refused.bytes()).into_owned();
        assert!(
            text.contains("\"localhost\"") && text.contains("a loopback address"),
            "{text}"
        );
    }
    assert_never_connected(&service);
    assert_eq!(node.node.index.object_count(), 0);

    let through_upstream = get(&do_url(&node, "/files/a.cab", "mirror.example"), &[]).await;
    assert_eq!(through_upstream.status, 200);
    assert_eq!(origin.requests()[0].host.as_deref(), Some("mirror.example"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_into_an_explicitly_listed_range_is_fetched() {
    let origin = MockOrigin::start().await;
    origin.put("/files/a.cab", pattern_bytes(10_000, 65));
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(storage_config(
        storage.path(),
        vec![
            localhost_origin(origin.addr().port()),
            // Listing loopback explicitly (for any origin) lets names resolve there.
            OriginConfig {
                cidr: vec!["127.0.0.0/8".into(), "::1/128".into()],
                ports: vec![origin.addr().port()],
                ..Default::default()
            },
        ],
    ))
    .await;
    let served = get(
        &do_url(
            &node,
            "/files/a.cab",
            &format!("localhost:{}", origin.addr().port()),
        ),
        &[],
    )
    .await;
    assert_eq!(served.status, 200);
    assert_eq!(served.bytes(), &pattern_bytes(10_000, 65)[..]);
    node.stop().await;
}

/// The shipped `conf/cache-node.toml`, with the test's listeners and storage, and `upstream`s
/// pointing named hosts at mock mirrors.
fn shipped_config(storage: &std::path::Path, mirrors: &[(&str, &MockOrigin)]) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/cache-node.toml");
    let mut config =
        Config::load_with_env(Some(&path), Some(std::collections::HashMap::new())).unwrap();
    let test = usual_config(storage, "http://127.0.0.1:9");
    config.server = test.server;
    config.admin = test.admin;
    config.storage = test.storage;
    config.upstream = test.upstream;
    for (host, mirror) in mirrors {
        let entry = config
            .origin
            .iter_mut()
            .find(|origin| origin.host == *host)
            .unwrap_or_else(|| panic!("conf/cache-node.toml allows {host}"));
        entry.upstream = Some(mirror.base_url());
    }
    config
}

async fn curl_through(node: &TestNode, url: &str) -> Vec<u8> {
    let output = Command::new("curl")
        .args(["-sS", "--fail", "-x", &format!("http://{}", node.addr), url])
        .output()
        .await
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "curl -x {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_pool_file_through_two_shipped_mirrors_is_stored_once() {
    let debian_mirror = MockOrigin::start().await;
    let other_debian_mirror = MockOrigin::start().await;
    let ubuntu_mirror = MockOrigin::start().await;
    let country_ubuntu_mirror = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(shipped_config(
        storage.path(),
        &[
            ("deb.debian.org", &debian_mirror),
            ("ftp.debian.org", &other_debian_mirror),
            ("archive.ubuntu.com", &ubuntu_mirror),
            ("*.archive.ubuntu.com", &country_ubuntu_mirror),
        ],
    ))
    .await;
    let mirrors = [
        (
            "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
            [
                ("deb.debian.org", &debian_mirror),
                ("ftp.debian.org", &other_debian_mirror),
            ],
        ),
        (
            "/ubuntu/pool/main/h/hello/hello_2.10-3build1_amd64.deb",
            [
                ("archive.ubuntu.com", &ubuntu_mirror),
                ("de.archive.ubuntu.com", &country_ubuntu_mirror),
            ],
        ),
    ];
    for (seed, (path, [(first_host, first_mirror), (second_host, second_mirror)])) in
        (66..).zip(mirrors)
    {
        let package = pattern_bytes(150_000, seed);
        first_mirror.put(path, package.clone());
        second_mirror.put(path, package.clone());
        let first = curl_through(&node, &format!("http://{first_host}{path}")).await;
        assert_eq!(sha256_hex(&first), sha256_hex(&package), "{first_host}");
        node.settle().await;
        let second = curl_through(&node, &format!("http://{second_host}{path}")).await;
        assert_eq!(sha256_hex(&second), sha256_hex(&package), "{second_host}");
        assert_eq!(second_mirror.request_count(), 0, "{second_host}");
    }
    // One object per file, not per mirror; Debian and Ubuntu are different sets.
    assert_eq!(node.node.index.object_count(), 2);
    node.stop().await;
}
