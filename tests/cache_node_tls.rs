//! HTTPS for clients, end to end: curl over HTTP/1.1 and HTTP/2 through the TLS listener
//! (MCC and Host forms, whole objects and ranges, MISS then HIT, checked by SHA-256) beside the
//! plain listener; origins fetched over HTTPS for requests that came over TLS; certificate
//! rotation under a running transfer; a stalled handshake closed by the header timeout; the
//! certificate seen in `/stats` and `/metrics`; and start-up refused for each bad `[tls]` value.
//!
//! Certificates are real: an enterprise-like CA and its leaves made with rcgen in the test, or
//! the node's own `cache-node tls request` signed with `openssl x509 -req`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::pki::{replace_file, Pki};
use common::*;
use outpost_testkit::{eventually_async, pattern_bytes, sha256_hex, MockOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// The usual node with a TLS listener serving the leaf at `cert`/`key`.
async fn tls_node(cert: &Path, key: &Path) -> (MockOrigin, tempfile::TempDir, TestNode) {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    origin_and_node_configured(move |storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        config.tls.listen = "127.0.0.1:0".into();
        config.tls.cert = cert;
        config.tls.key = key;
        config.server.header_read_timeout = Duration::from_secs(2);
        config
    })
    .await
}

/// What curl got: its header block (every response's, for redirects none) and the body.
struct Curled {
    headers: String,
    body: Vec<u8>,
}

impl Curled {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }
}

async fn curl(ca: &Path, arguments: &[&str]) -> Curled {
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body");
    let headers_path = dir.path().join("headers");
    let output = Command::new("curl")
        .args(["-sS", "--fail", "--noproxy", "*", "--cacert"])
        .arg(ca)
        .arg("-D")
        .arg(&headers_path)
        .arg("-o")
        .arg(&body_path)
        .args(arguments)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "curl {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Curled {
        headers: std::fs::read_to_string(&headers_path).unwrap(),
        body: std::fs::read(&body_path).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_https_gets_whole_objects_and_ranges_byte_exact_on_http1_and_http2() {
    if !tool_available("curl") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = (pki.path("node.crt"), pki.path("node.key"));
    pki.issue(0xA1, -1, 90, &cert, &key);
    let (origin, _storage, node) = tls_node(&cert, &key).await;
    let content = pattern_bytes(3_000_000, 13);
    origin.put("/tls.bin", content.clone());
    let tls_addr = node.tls_addr.unwrap();
    let mcc = format!("https://{tls_addr}/tls.bin?cacheHostOrigin={ORIGIN_HOST}");
    let ca = pki.ca_file();

    let miss = curl(&ca, &["--http1.1", &mcc]).await;
    assert!(miss.headers.starts_with("HTTP/1.1 200"), "{}", miss.headers);
    assert_eq!(miss.header("x-cache").as_deref(), Some("MISS"));
    assert_eq!(sha256_hex(&miss.body), sha256_hex(&content));
    node.settle().await;

    for protocol in ["--http1.1", "--http2"] {
        let hit = curl(&ca, &[protocol, &mcc]).await;
        let status_line = if protocol == "--http2" {
            "HTTP/2 200"
        } else {
            "HTTP/1.1 200"
        };
        assert!(hit.headers.starts_with(status_line), "{}", hit.headers);
        assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"), "{protocol}");
        assert_eq!(sha256_hex(&hit.body), sha256_hex(&content), "{protocol}");
        for (range, first, last) in [
            ("0-99", 0, 99),
            ("1000000-2000000", 1_000_000, 2_000_000),
            ("2999990-", 2_999_990, 2_999_999),
        ] {
            let part = curl(&ca, &[protocol, "-r", range, &mcc]).await;
            assert!(part.headers.contains(" 206"), "{}", part.headers);
            assert_eq!(
                sha256_hex(&part.body),
                sha256_hex(&content[first..=last]),
                "{protocol} -r {range}"
            );
        }
        // Host-header mode: the client names the origin in Host (:authority on HTTP/2).
        let by_host = curl(
            &ca,
            &[
                protocol,
                "-H",
                &format!("Host: {ORIGIN_HOST}"),
                &format!("https://{tls_addr}/tls.bin"),
            ],
        )
        .await;
        assert_eq!(
            by_host.header("x-cache").as_deref(),
            Some("HIT"),
            "{protocol}"
        );
        assert_eq!(sha256_hex(&by_host.body), sha256_hex(&content));
    }
    // The plain listener works beside it, and serves the same object: the key has no scheme.
    let plain = get(&node.mcc_url("/tls.bin"), &[]).await;
    assert_eq!(plain.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(plain.bytes()), sha256_hex(&content));
    let full_fetches = origin
        .requests()
        .iter()
        .filter(|request| request.path.starts_with("/tls.bin") && !request.is_conditional())
        .count();
    assert_eq!(full_fetches, 1, "one fill for every scheme and protocol");
    // The certificate in service is visible to the admin.
    let stats = node.stats().await;
    assert_eq!(stats["tls"]["serial"], "A1", "{stats}");
    assert_eq!(stats["tls"]["subject"], "CN=cache.test");
    assert_eq!(stats["tls"]["sans"][0], "127.0.0.1");
    let left = stats["tls"]["expires_in_seconds"].as_i64().unwrap();
    assert!((89 * 86_400..=90 * 86_400).contains(&left), "{left}");
    assert!(stats["tls"]["not_after"].as_str().unwrap().ends_with('Z'));
    let metrics = node.metrics().await;
    let gauge = metrics
        .lines()
        .find(|line| line.contains("tls_certificate_expiry_seconds{"))
        .unwrap_or_else(|| panic!("no expiry gauge in {metrics}"));
    let value: i64 = gauge.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((89 * 86_400..=90 * 86_400).contains(&value), "{gauge}");
    node.stop().await;
}

/// Opens a TLS connection to `addr` trusting `config`'s roots, and returns the stream and the
/// serial of the certificate the server presented.
async fn handshake(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    String,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("the handshake succeeds");
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let serial = cache_node::tls::pair::describe(&leaf).unwrap().serial;
    (stream, serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_handshakes_while_an_open_transfer_completes() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("node.crt"), pki.path("node.key"));
    pki.issue(0xA1, -1, 90, &cert, &key);
    let (origin, _storage, node) = tls_node(&cert, &key).await;
    let content = pattern_bytes(24 << 20, 7);
    origin.put("/big.bin", content.clone());
    // Warm over plain HTTP, so the TLS transfer is a hit that outruns nothing.
    assert_eq!(
        sha256_hex(get(&node.mcc_url("/big.bin"), &[]).await.bytes()),
        sha256_hex(&content)
    );
    node.settle().await;
    let tls_addr = node.tls_addr.unwrap();
    let client = pki.client_config();

    // A transfer starts on the old certificate and reads its first bytes only.
    let (mut old_connection, old_serial) = handshake(tls_addr, client.clone()).await;
    assert_eq!(old_serial, "A1");
    old_connection
        .write_all(
            format!(
                "GET /big.bin?cacheHostOrigin={ORIGIN_HOST} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut received = vec![0u8; 1 << 20];
    old_connection.read_exact(&mut received).await.unwrap();

    // The admin replaces both files; new handshakes see the new certificate within seconds.
    pki.issue(0xB2, -1, 120, &cert, &key);
    eventually_async(
        "new handshakes to present the rotated certificate",
        Duration::from_secs(15),
        async || handshake(tls_addr, client.clone()).await.1 == "B2",
    )
    .await;

    // The transfer begun before the rotation completes, byte-exact.
    old_connection.read_to_end(&mut received).await.unwrap();
    let header_end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap()
        + 4;
    let head = String::from_utf8_lossy(&received[..header_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(received.len() - header_end, content.len(), "{head}");
    assert_eq!(sha256_hex(&received[header_end..]), sha256_hex(&content));

    // A broken pair (a key that is not the certificate's) is refused: the new one stays.
    let (other_cert, other_key) = (pki.path("other.crt"), pki.path("other.key"));
    pki.issue(0xC3, -1, 90, &other_cert, &other_key);
    replace_file(&key, &std::fs::read(&other_key).unwrap());
    eventually_async(
        "the broken pair to be refused",
        Duration::from_secs(15),
        async || node.stats().await["tls"]["reload_failures"].as_u64() == Some(1),
    )
    .await;
    assert_eq!(handshake(tls_addr, client.clone()).await.1, "B2");
    let stats = node.stats().await;
    assert_eq!(stats["tls"]["serial"], "B2");
    assert_eq!(stats["tls"]["reloads"], 1);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_the_handshake_is_closed_at_the_header_timeout() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("node.crt"), pki.path("node.key"));
    pki.issue(1, -1, 90, &cert, &key);
    let (_origin, _storage, node) = tls_node(&cert, &key).await;
    let tls_addr = node.tls_addr.unwrap();
    // One connection says nothing, one sends the first bytes of a ClientHello and stops.
    let mut silent = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for stream in [&mut silent, &mut partial] {
        let mut buffer = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("the node closes a stalled handshake");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    let stats = node.stats().await;
    assert_eq!(stats["connection_header_timeouts"], 2, "{stats}");
    // A client that does not trust the certificate fails its handshake, counted.
    // Public roots only: the private CA's certificate is untrusted.
    let untrusting = Arc::new(outpost_shared::tls_roots::client_config(&[]));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    assert!(tokio_rustls::TlsConnector::from(untrusting)
        .connect(name, tcp)
        .await
        .is_err());
    eventually_async(
        "the failed handshake to be counted",
        Duration::from_secs(5),
        async || node.stats().await["tls_handshake_failures"] == 1,
    )
    .await;
    node.stop().await;
}

/// A TLS front for `backend` (a plain-HTTP mock origin), presenting `cert`/`key`: an HTTPS
/// origin. Returns its address and a count of the TLS connections it accepted.
async fn https_front(
    backend: SocketAddr,
    cert: &Path,
    key: &Path,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls_pki_types::pem::PemObject;
    let pair =
        cache_node::tls::pair::LoadedPair::load(cert, key, std::time::SystemTime::now()).unwrap();
    let private_key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&std::fs::read(key).unwrap()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(pair.certified.cert.clone(), private_key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_tls_fetch_their_origin_over_https_trusting_upstream_ca_file() {
    let pki = Pki::new();
    let (cert, key) = (pki.path("node.crt"), pki.path("node.key"));
    pki.issue(1, -1, 90, &cert, &key);
    let (origin_cert, origin_key) = (pki.path("origin.crt"), pki.path("origin.key"));
    pki.issue(2, -1, 90, &origin_cert, &origin_key);
    let origin = MockOrigin::start().await;
    let (front, front_connections) = https_front(origin.addr(), &origin_cert, &origin_key).await;
    let content = pattern_bytes(300_000, 5);
    origin.put("/secure.bin", content.clone());
    origin.put("/plain.bin", content.clone());
    let storage = tempfile::tempdir().unwrap();
    let start = |ca_file: Option<PathBuf>| {
        let mut config = usual_config(storage.path(), &origin.base_url());
        config.tls.listen = "127.0.0.1:0".into();
        config.tls.cert = cert.clone();
        config.tls.key = key.clone();
        if let Some(ca_file) = ca_file {
            config.upstream.ca_file = ca_file.display().to_string();
        }
        // The origin is named by address: the front (HTTPS by default over TLS), and the mock
        // origin itself with upstream_scheme = "http".
        config.origin.push(cache_node::config::OriginConfig {
            host: "127.0.0.1".into(),
            cidr: vec!["127.0.0.1/32".into()],
            ports: vec![front.port(), origin.addr().port()],
            ..Default::default()
        });
        config.origin.insert(
            0,
            cache_node::config::OriginConfig {
                host: "localhost".into(),
                ports: vec![origin.addr().port()],
                upstream_scheme: Some("http".into()),
                ..Default::default()
            },
        );
        TestNode::start(config)
    };
    let node = start(Some(pki.ca_file())).await;
    let tls_addr = node.tls_addr.unwrap();
    let client = pki.client_config();
    let front_origin = format!("127.0.0.1:{}", front.port());
    let (status, fetched) = get_over_tls(
        tls_addr,
        client.clone(),
        &format!("/secure.bin?cacheHostOrigin={front_origin}"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&fetched), sha256_hex(&content));
    let connections = || front_connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(connections() >= 1, "the origin was reached over HTTPS");
    // `upstream_scheme = "http"`: over TLS, fetched in plain HTTP all the same.
    let before = connections();
    let (status, fetched) = get_over_tls(
        tls_addr,
        client.clone(),
        &format!(
            "/plain.bin?cacheHostOrigin=localhost:{}",
            origin.addr().port()
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(sha256_hex(&fetched), sha256_hex(&content));
    assert_eq!(connections(), before);
    node.stop().await;
    // Without upstream.ca_file the origin's certificate is not trusted: 502, and never a
    // fetch in plain HTTP instead.
    let requests_before = origin.request_count();
    let node = start(None).await;
    let (status, _) = get_over_tls(
        node.tls_addr.unwrap(),
        client,
        &format!("/other.bin?cacheHostOrigin={front_origin}"),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(origin.request_count(), requests_before);
    node.stop().await;
}

/// `GET path_and_query` over HTTP/1.1 on a new TLS connection: the status and the body.
async fn get_over_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path_and_query: &str,
) -> (u16, Vec<u8>) {
    let (mut stream, _) = handshake(addr, config).await;
    stream
        .write_all(
            format!(
                "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received).await;
    let header_end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete header block")
        + 4;
    let head = String::from_utf8_lossy(&received[..header_end]).to_string();
    let status = head[9..12].parse().unwrap();
    (status, received[header_end..].to_vec())
}

/// Runs the real binary on `config` and returns its exit status and standard error: it must
/// exit by itself (refusing to start) within a few seconds.
async fn refused_start(work_dir: &Path, config: &cache_node::config::Config) -> String {
    let config_path = work_dir.join("refused.toml");
    std::fs::write(&config_path, config_to_toml(config)).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_cache-node"))
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the node refuses to start instead of running")
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_start_up_naming_the_key_and_the_reason() {
    let pki = Pki::new();
    let (good_cert, good_key) = (pki.path("good.crt"), pki.path("good.key"));
    pki.issue(1, -1, 90, &good_cert, &good_key);
    let (other_cert, other_key) = (pki.path("other.crt"), pki.path("other.key"));
    pki.issue(2, -1, 90, &other_cert, &other_key);
    let (old_cert, old_key) = (pki.path("old.crt"), pki.path("old.key"));
    pki.issue(3, -100, -10, &old_cert, &old_key);
    let storage = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = || {
        let mut config = usual_config(storage.path(), "http://127.0.0.1:9");
        config.server.listen = format!("127.0.0.1:{}", free_port());
        config.admin.listen = format!("127.0.0.1:{}", free_port());
        config.tls.listen = format!("127.0.0.1:{}", free_port());
        config.tls.cert = good_cert.clone();
        config.tls.key = good_key.clone();
        config
    };
    type Change<'a> = Box<dyn Fn(&mut cache_node::config::Config) + 'a>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|c| c.tls.cert = pki.path("missing.crt")),
            "tls.cert: cannot read",
        ),
        (
            Box::new(|c| c.tls.key = pki.path("missing.key")),
            "tls.key: cannot read",
        ),
        (
            Box::new(|c| c.tls.key = other_key.clone()),
            "tls.key: the key in",
        ),
        (
            Box::new(|c| {
                c.tls.cert = old_cert.clone();
                c.tls.key = old_key.clone();
            }),
            "tls.cert: the certificate in",
        ),
        (Box::new(|c| c.tls.cert = good_key.clone()), "tls.cert:"),
        (
            Box::new(|c| c.tls.listen = "localhost:443".into()),
            "tls.listen: \"localhost:443\" is not an address",
        ),
        (
            Box::new(|c| c.tls.listen = taken.local_addr().unwrap().to_string()),
            "tls.listen: cannot bind",
        ),
        (
            Box::new(|c| c.tls.listen = String::new()),
            "tls.listen: is empty",
        ),
    ];
    for (change, expected) in cases {
        let mut config = base();
        change(&mut config);
        let stderr = refused_start(storage.path(), &config).await;
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
    let expired = {
        let mut config = base();
        config.tls.cert = old_cert.clone();
        config.tls.key = old_key.clone();
        refused_start(storage.path(), &config).await
    };
    assert!(expired.contains("expired at"), "{expired}");
    let mismatch = {
        let mut config = base();
        config.tls.cert = other_cert.clone();
        refused_start(storage.path(), &config).await
    };
    assert!(
        mismatch.contains("does not match the certificate"),
        "{mismatch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_key_signed_by_the_enterprise_ca_serves_https() {
    if !tool_available("openssl") || !tool_available("curl") {
        return;
    }
    let pki = Pki::new();
    let (key, csr, cert) = (
        pki.path("node.key"),
        pki.path("node.csr"),
        pki.path("node.crt"),
    );
    let binary = env!("CARGO_BIN_EXE_cache-node");
    let requested = Command::new(binary)
        .args([
            "tls",
            "request",
            "--san",
            "localhost",
            "--san",
            "127.0.0.1",
            "--key",
        ])
        .arg(&key)
        .arg("--csr")
        .arg(&csr)
        .output()
        .await
        .unwrap();
    assert!(
        requested.status.success(),
        "{}",
        String::from_utf8_lossy(&requested.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The enterprise CA signs the request (openssl standing in for AD CS), copying its SANs.
    let ca_key = pki.path("ca.key");
    std::fs::write(&ca_key, pki.ca.key().serialize_pem()).unwrap();
    let extensions = pki.path("san.ext");
    std::fs::write(
        &extensions,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let signed = Command::new("openssl")
        .args([
            "x509",
            "-req",
            "-days",
            "30",
            "-set_serial",
            "0x5EED",
            "-in",
        ])
        .arg(&csr)
        .arg("-CA")
        .arg(pki.ca_file())
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&extensions)
        .arg("-out")
        .arg(&cert)
        .output()
        .await
        .unwrap();
    assert!(
        signed.status.success(),
        "{}",
        String::from_utf8_lossy(&signed.stderr)
    );
    let (origin, _storage, node) = tls_node(&cert, &key).await;
    origin.put("/signed.bin", pattern_bytes(100_000, 3));
    let fetched = curl(
        &pki.ca_file(),
        &[&format!(
            "https://localhost:{}/signed.bin?cacheHostOrigin={ORIGIN_HOST}",
            node.tls_addr.unwrap().port()
        )],
    )
    .await;
    assert_eq!(
        sha256_hex(&fetched.body),
        sha256_hex(&pattern_bytes(100_000, 3))
    );
    assert_eq!(node.stats().await["tls"]["serial"], "5EED");
    // The self-signed variant, for labs.
    let (lab_cert, lab_key) = (pki.path("lab.crt"), pki.path("lab.key"));
    let lab = Command::new(binary)
        .args([
            "tls",
            "self-signed",
            "--san",
            "127.0.0.1",
            "--days",
            "10",
            "--cert",
        ])
        .arg(&lab_cert)
        .arg("--key")
        .arg(&lab_key)
        .output()
        .await
        .unwrap();
    assert!(
        lab.status.success(),
        "{}",
        String::from_utf8_lossy(&lab.stderr)
    );
    let shown = Command::new(binary)
        .args(["tls", "show", "--cert"])
        .arg(&lab_cert)
        .output()
        .await
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["sans"][0], "127.0.0.1");
    node.stop().await;
}
