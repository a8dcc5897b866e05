//! peer-client and an HTTPS cache host: a node whose certificate a private (enterprise) CA
//! signed serves every byte when `cache.ca_file` trusts that CA; without it the certificate is
//! refused, the host is banned as unreachable, and the download falls back to the origin by DO's
//! rules, never to the node in plain HTTP.

#[path = "common/mod.rs"]
mod common;
#[path = "peer_common/mod.rs"]
mod peer_common;

use outpost_testkit::{pattern_bytes, sha256_hex};
use peer_client::config::CacheHost;
use peer_client::sources::ban::BanReason;

use common::pki::Pki;
use common::{origin_and_node_configured, usual_config};
use peer_common::{download_to, downloader, file_sha256, peer_config};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_cache_host_signed_by_a_private_ca_serves_and_an_untrusted_one_falls_back() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("node.crt"), pki.path("node.key"));
    pki.issue(0x77, -1, 90, &cert, &key);
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.tls.listen = "127.0.0.1:0".into();
        config.tls.cert = cert.clone();
        config.tls.key = key.clone();
        // The download URL names the mock origin by address; it speaks plain HTTP, so the node
        // fetches it over HTTP even for requests that came over TLS.
        config.origin.push(cache_node::config::OriginConfig {
            host: "127.0.0.1".into(),
            ports: vec![origin.addr().port()],
            upstream_scheme: Some("http".into()),
            ..Default::default()
        });
        config
    })
    .await;
    let content = pattern_bytes(3 * MIB + 77, 9);
    origin.put("/files/secure.bin", content.clone());
    let url = format!("{}/files/secure.bin", origin.base_url());
    let https_host = format!("https://{}", node.tls_addr.unwrap());
    let directory = tempfile::tempdir().unwrap();

    // Trusted through cache.ca_file: every byte from the cache host, over TLS.
    let mut config = peer_config(&[]);
    config.cache_hosts = vec![https_host.clone()];
    config.cache.ca_file = pki.ca_file().display().to_string();
    let trusting = downloader(config);
    let finished = download_to(&trusting, &url, directory.path(), "trusted.bin").await;
    let status = finished.status();
    assert_eq!(status.bytes_from_http, 0, "{status:?}");
    assert!(status.bytes_from_cache_server >= content.len() as u64);
    assert_eq!(
        file_sha256(&directory.path().join("trusted.bin")),
        sha256_hex(&content)
    );
    let served_requests = node.stats().await["requests"].as_u64().unwrap();
    assert!(served_requests >= 1);

    // Without the CA the node's certificate is untrusted: the host is banned as unreachable and
    // the origin serves, after the configured delay; the node sees no request at all.
    origin.reset_counters();
    let mut config = peer_config(&[]);
    config.cache_hosts = vec![https_host.clone()];
    config.delay_cache_fallback_secs = 0;
    let untrusting = downloader(config);
    let finished = download_to(&untrusting, &url, directory.path(), "fallback.bin").await;
    let status = finished.status();
    assert_eq!(status.bytes_from_cache_server, 0, "{status:?}");
    assert_eq!(status.bytes_from_http, content.len() as u64);
    assert_eq!(
        file_sha256(&directory.path().join("fallback.bin")),
        sha256_hex(&content)
    );
    let host = CacheHost::parse(&https_host).unwrap();
    let ban = untrusting
        .bans()
        .ban_on(&host, "any.origin", tokio::time::Instant::now())
        .expect("an untrusted certificate bans the host");
    assert_eq!(ban.reason, BanReason::Unreachable);
    let stats = node.stats().await;
    assert_eq!(
        stats["requests"].as_u64().unwrap(),
        served_requests,
        "{stats}"
    );
    assert!(
        stats["tls_handshake_failures"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    node.stop().await;
}
