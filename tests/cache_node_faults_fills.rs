//! Faults and abuse around fills and the origin conversation: a client that starts cold
//! downloads and leaves, a client that wants more than its share, a disk slower than the origin,
//! origins that send whole objects to a one-byte check, compress what they were asked to send
//! plainly, have no validators, answer with other bytes than asked, reset mid-body or never end
//! their bodies. Each test asserts on the bytes clients get and the node stores, and on origin
//! traffic, memory and fill counts where the fault is about resources.
//!
//! The tests run one at a time (see [`serial`]): several of them measure the process's resident
//! memory, which a test running beside them would disturb.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_node::config::Config;
use common::*;
use outpost_testkit::{
    connect_from, eventually, eventually_async, eventually_every, pattern_bytes, resident_bytes,
    sha256_hex, Behaviour, MockOrigin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs the tests of this file one at a time (the lock works across their runtimes, and a
/// failed test does not poison it).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Samples the resident memory every millisecond on its own thread, keeping the peak.
struct PeakMemory {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakMemory {
    fn start() -> PeakMemory {
        let peak = Arc::new(AtomicU64::new(resident_bytes(std::process::id())));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let peak = peak.clone();
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(resident_bytes(std::process::id()), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        PeakMemory {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns the peak.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peak.load(Ordering::Relaxed)
    }
}

const MIB: u64 = 1 << 20;

/// The usual test config with room for 4 GiB and `[fill]` set by `tune`.
fn config_with(
    origin: &MockOrigin,
    storage: &std::path::Path,
    tune: impl FnOnce(&mut Config),
) -> Config {
    let mut config = test_config(storage, &origin.base_url(), TEST_SLICE, "4GiB");
    tune(&mut config);
    config
}

/// A mock origin and a node in front of it with [`config_with`]`(tune)`.
async fn scene(tune: impl FnOnce(&mut Config)) -> (MockOrigin, tempfile::TempDir, TestNode) {
    origin_and_node_configured(|storage, origin| config_with(origin, storage, tune)).await
}

fn throttled(chunk_size: usize, delay_ms: u64) -> Behaviour {
    Behaviour {
        chunk_size: Some(chunk_size),
        chunk_delay: Some(Duration::from_millis(delay_ms)),
        ..Behaviour::default()
    }
}

/// The request head of a GET through the node's MCC form, from a raw socket.
fn raw_get(node: &TestNode, path: &str, extra: &str) -> String {
    let url = node.mcc_url(path);
    let target = url.split_once(&node.addr.to_string()).unwrap().1;
    format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\n{extra}Connection: close\r\n\r\n",
        node.addr
    )
}

/// A response read from a raw socket.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Sends `request` on `stream` and reads the head and up to `body_limit` body bytes (all of it
/// when the connection closes first).
async fn exchange(mut stream: TcpStream, request: &str, body_limit: usize) -> RawResponse {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 << 10];
    let head_end = loop {
        if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(read > 0, "the node closed before the response head");
        received.extend_from_slice(&buffer[..read]);
    };
    while received.len() - head_end < body_limit {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    let mut body = received[head_end..].to_vec();
    body.truncate(body_limit);
    RawResponse { status, head, body }
}

/// Item 2: the amplification attack in small. Forty distinct cold 8 MiB URLs, each client
/// reading 1 KiB of the whole object and closing, used to make the node fetch all 320 MiB.
/// Now each fill stops at the end of the slice it is in once its client is gone, fills take
/// turns under `fill.max_concurrent`, and memory stays within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_abandoned_cold_downloads_cost_a_few_slices_each_within_the_fill_caps() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.fill.max_concurrent = 4;
        config.fill.max_per_client = 64;
        config.fill.max_memory = "4MiB".into();
        config.fill.finish_objects_up_to = "1MiB".into();
    })
    .await;
    let urls = 40;
    let content = pattern_bytes(8 * MIB as usize, 201);
    for index in 0..urls {
        // One allocation shared by every path, so the origin adds nothing to the RSS.
        origin.put_with(
            &format!("/attack/{index}.bin"),
            content.clone(),
            throttled(16 << 10, 2),
        );
    }
    let baseline = resident_bytes(std::process::id());
    let peak_memory = PeakMemory::start();
    let watcher = {
        let node = node.node.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let peak_fill_memory = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let stop = stop.clone();
            let peak_fill_memory = peak_fill_memory.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let stats = node.stats_snapshot();
                    peak_fill_memory.fetch_max(stats.fill_memory_bytes, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        (stop, peak_fill_memory, task)
    };

    let mut clients = Vec::new();
    for index in 0..urls {
        let request = raw_get(&node, &format!("/attack/{index}.bin"), "");
        let addr = node.addr;
        clients.push(tokio::spawn(async move {
            let response = exchange(connect_from("127.0.0.1", addr).await, &request, 1024).await;
            // The stream is dropped here: the client leaves after a kilobyte.
            (response.status, response.body)
        }));
    }
    for client in clients {
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("every client is answered")
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, &content[..1024], "the first kilobyte is the object's");
    }
    eventually("every fill has ended", Duration::from_secs(30), || {
        let stats = node.node.stats_snapshot();
        stats.fills_in_flight == 0
            && stats.fills_waiting == 0
            && node.node.index.inflight_slice_count() == 0
    })
    .await;
    let (stop, peak_fill_memory, task) = watcher;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let peak = peak_memory.finish();

    let sent = origin.bytes_sent();
    let asked = urls * TEST_SLICE;
    eprintln!(
        "origin sent {sent} bytes for {urls} abandoned downloads ({asked} bytes of first slices); \
         peak RSS {} MiB over a {} MiB baseline; peak fill memory {} bytes; peak fills {}",
        (peak.saturating_sub(baseline)) / MIB,
        baseline / MIB,
        peak_fill_memory.load(Ordering::Relaxed),
        node.node.fill_limits.peak_in_flight()
    );
    assert!(
        sent <= 16 * asked,
        "origin traffic is a small multiple of the slices asked for, not {urls} whole objects: \
         {sent} bytes"
    );
    assert!(node.node.fill_limits.peak_in_flight() <= 4);
    assert!(node.node.fill_limits.peak_in_flight() >= 1);
    assert!(peak_fill_memory.load(Ordering::Relaxed) <= 4 * MIB);
    assert!(
        peak.saturating_sub(baseline) < 64 * MIB,
        "resident memory grew by {} MiB",
        peak.saturating_sub(baseline) / MIB
    );
    let stats = node.stats().await;
    assert!(stat(&stats, "fills_stopped") >= urls / 2, "{stats}");
    assert_eq!(stat(&stats, "fill_memory_bytes"), 0, "{stats}");

    // What was fetched is right, and the rest is fetched when someone really asks for it.
    origin.set_behaviour("/attack/7.bin", Behaviour::default());
    let whole = get(&node.mcc_url("/attack/7.bin"), &[]).await;
    assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&content));
    node.stop().await;
}

/// Item 2: one client address gets `fill.max_per_client` requests with cold fills at a time. Its
/// next cold request waits `fill.client_wait` and then gets `503` with `Retry-After`, while
/// another address and the same address's hits are served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_cold_fill_cap_gets_503_while_others_are_served() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.fill.max_per_client = 2;
        config.fill.client_wait = Duration::from_millis(300);
    })
    .await;
    let content = pattern_bytes(2 * MIB as usize, 202);
    for path in ["/held/a.bin", "/held/b.bin", "/held/c.bin", "/held/d.bin"] {
        origin.put_with(path, content.clone(), throttled(16 << 10, 20));
    }
    origin.put("/warm.bin", content.clone());
    let warm = get(&node.mcc_url("/warm.bin"), &[]).await;
    assert_eq!(warm.bytes(), &content[..]);
    node.settle().await;

    // Two slow cold downloads from 127.0.0.1 hold both of its slots while they stream.
    let mut held = Vec::new();
    for path in ["/held/a.bin", "/held/b.bin"] {
        let mut stream = connect_from("127.0.0.1", node.addr).await;
        stream
            .write_all(raw_get(&node, path, "").as_bytes())
            .await
            .unwrap();
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        held.push(stream);
    }
    let refused = exchange(
        connect_from("127.0.0.1", node.addr).await,
        &raw_get(&node, "/held/c.bin", ""),
        1 << 20,
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.head);
    assert_eq!(refused.header("retry-after"), Some("2"));
    assert!(String::from_utf8_lossy(&refused.body).contains("cold fills"));
    assert_eq!(stat(&node.stats().await, "fill_refusals"), 1);

    // Another address is not held back, and neither are the first address's hits.
    let other = exchange(
        connect_from("127.0.0.2", node.addr).await,
        &raw_get(&node, "/held/d.bin", ""),
        4 * MIB as usize,
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(sha256_hex(&other.body), sha256_hex(&content));
    let hit = exchange(
        connect_from("127.0.0.1", node.addr).await,
        &raw_get(&node, "/warm.bin", ""),
        4 * MIB as usize,
    )
    .await;
    assert_eq!(hit.header("x-cache"), Some("HIT"));
    assert_eq!(sha256_hex(&hit.body), sha256_hex(&content));

    // Once the held downloads end, the address may start cold fills again.
    drop(held);
    let again = eventually_async(
        "the address to start cold fills again",
        Duration::from_secs(20),
        async || {
            let answer = exchange(
                connect_from("127.0.0.1", node.addr).await,
                &raw_get(&node, "/held/c.bin", ""),
                4 * MIB as usize,
            )
            .await;
            (answer.status != 503).then_some(answer)
        },
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(sha256_hex(&again.body), sha256_hex(&content));
    node.stop().await;
}

/// Item 2: the manifest endpoint fills whole objects, so it is the same lever: it counts in
/// `requests`, takes the same per-client slots, and its fills are prefills that finish although
/// nobody reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_requests_count_take_client_slots_and_prefill_to_the_end() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.fill.max_per_client = 1;
        config.fill.client_wait = Duration::from_millis(200);
        config.fill.finish_objects_up_to = "64KiB".into();
    })
    .await;
    let content = pattern_bytes(3 * MIB as usize, 203);
    origin.put_with("/slow.bin", content.clone(), throttled(16 << 10, 20));
    origin.put_with("/manifest.bin", content.clone(), throttled(64 << 10, 1));
    let manifest_url = |wait: &str| {
        let target = format!("http://{ORIGIN_HOST}/manifest.bin");
        let encoded: String = form_urlencoded_byte_serialize(&target);
        format!(
            "http://{}/_outpost/v1/manifest?url={encoded}&wait={wait}",
            node.addr
        )
    };

    let mut held = connect_from("127.0.0.1", node.addr).await;
    held.write_all(raw_get(&node, "/slow.bin", "").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 1];
    held.read_exact(&mut first).await.unwrap();
    let requests_before = stat(&node.stats().await, "requests");
    let refused = client().get(manifest_url("0")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let after = node.stats().await;
    assert_eq!(stat(&after, "requests"), requests_before + 1, "{after}");
    assert_eq!(stat(&after, "fill_refusals"), 1);
    drop(held);

    // Once the slot is free, a manifest request that does not wait starts a prefill; it runs to
    // the end of the object although no client reads it, and the manifest then comes.
    // Every try is a manifest request the node counts and may start a prefill for: they keep
    // the pace of a client that polls.
    eventually_every(
        "the prefill to finish",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || {
            let response = client().get(manifest_url("0")).send().await.unwrap();
            let status = response.status().as_u16();
            if status == 200 {
                let manifest: serde_json::Value =
                    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
                assert_eq!(manifest["size"].as_u64(), Some(content.len() as u64));
                return true;
            }
            assert!(matches!(status, 202 | 503), "{status}");
            false
        },
    )
    .await;
    node.settle().await;
    let stored = get(&node.mcc_url("/manifest.bin"), &[]).await;
    assert_eq!(stored.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(stored.bytes()), sha256_hex(&content));
    node.stop().await;
}

/// Percent-encodes a URL for a query value.
fn form_urlencoded_byte_serialize(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A disk whose writes take turns and each take a while, as a slow or busy disk does.
struct SlowDisk {
    inner: Arc<dyn cache_node::disk::Storage>,
    turn: Arc<tokio::sync::Mutex<()>>,
    write_time: Duration,
}

impl cache_node::disk::Storage for SlowDisk {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn read_at(
        &self,
        path: std::path::PathBuf,
        offset: u64,
        length: usize,
        buffer: Vec<u8>,
    ) -> cache_node::disk::DiskFuture<Vec<u8>> {
        self.inner.read_at(path, offset, length, buffer)
    }
    fn write_file_atomic(
        &self,
        path: std::path::PathBuf,
        chunks: Vec<Bytes>,
        sync: bool,
    ) -> cache_node::disk::DiskFuture<()> {
        let inner = self.inner.clone();
        let turn = self.turn.clone();
        let write_time = self.write_time;
        Box::pin(async move {
            let _turn = turn.lock().await;
            tokio::time::sleep(write_time).await;
            inner.write_file_atomic(path, chunks, sync).await
        })
    }
    fn remove_dir_all(&self, path: std::path::PathBuf) -> cache_node::disk::DiskFuture<()> {
        self.inner.remove_dir_all(path)
    }
}

/// Item 2: with a disk slower than the origin, each fill used to hold up to 64 MiB of finished
/// slices waiting for their writes, with no bound across fills. Now all fills together hold at
/// most `fill.max_memory`, and the origin waits instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_against_a_slow_disk_hold_no_more_than_the_memory_budget() {
    let _serial = serial().await;
    let origin = MockOrigin::start().await;
    let storage = tempfile::tempdir().unwrap();
    let valid = config_with(&origin, storage.path(), |config| {
        config.fill.max_memory = "1MiB".into();
    })
    .validate()
    .unwrap();
    let layout = cache_node::cache::store::Layout::create_drives(&valid.drives).unwrap();
    let slow_disk = Arc::new(SlowDisk {
        inner: Arc::new(cache_node::disk::portable::PortableStorage::new()),
        turn: Arc::new(tokio::sync::Mutex::new(())),
        write_time: Duration::from_millis(2),
    });
    let node = cache_node::node::Node::open_with_storage(&valid, layout, slow_disk).unwrap();
    let node = TestNode::start_node(node, &valid).await;
    let content = pattern_bytes(16 * MIB as usize, 204);
    let paths: Vec<String> = (0..4)
        .map(|index| format!("/slow-disk/{index}.bin"))
        .collect();
    for path in &paths {
        origin.put(path, content.clone());
    }
    let baseline = resident_bytes(std::process::id());
    let peak_memory = PeakMemory::start();
    let peak_fill_memory = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let node = node.node.clone();
        let peak_fill_memory = peak_fill_memory.clone();
        let stop = stop.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                peak_fill_memory
                    .fetch_max(node.stats_snapshot().fill_memory_bytes, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let mut downloads = Vec::new();
    for path in &paths {
        let url = node.mcc_url(path);
        let content = content.clone();
        downloads.push(tokio::spawn(async move {
            stream_and_compare(&url, &content).await;
        }));
    }
    for download in downloads {
        download.await.unwrap();
    }
    node.settle().await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let peak = peak_memory.finish();
    let grown = peak.saturating_sub(baseline);
    eprintln!(
        "slow disk: peak fill memory {} KiB, RSS grew {} MiB",
        peak_fill_memory.load(Ordering::Relaxed) >> 10,
        grown / MIB
    );
    assert!(peak_fill_memory.load(Ordering::Relaxed) <= MIB);
    assert!(
        grown < 40 * MIB,
        "4 x 16 MiB through a slow disk grew the RSS by {} MiB",
        grown / MIB
    );
    assert_eq!(node.node.index.used_bytes(), 4 * content.len() as u64);
    node.stop().await;
}

/// Streams a GET of `url` and compares each chunk with `content` as it arrives, so the test
/// itself holds no body in memory.
async fn stream_and_compare(url: &str, content: &[u8]) {
    let response = client().get(url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut stream = futures_util::StreamExt::boxed(response.bytes_stream());
    let mut offset = 0;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        let chunk = chunk.expect("the body arrives whole");
        assert_eq!(
            &chunk[..],
            &content[offset..offset + chunk.len()],
            "at {offset}"
        );
        offset += chunk.len();
    }
    assert_eq!(offset, content.len());
}

/// Item 3: a revalidation asks for one byte; an origin that ignores the range answers with the
/// whole object. Its body used to be collected into memory; now only the headers are read and
/// the connection is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revalidation_answered_with_the_whole_object_reads_only_its_headers() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.upstream.revalidate_after = Duration::ZERO;
    })
    .await;
    let content = pattern_bytes(64 * MIB as usize, 205);
    origin.put("/big.bin", content.clone());
    stream_and_compare(&node.mcc_url("/big.bin"), &content).await;
    node.settle().await;

    origin.set_behaviour(
        "/big.bin",
        Behaviour {
            ignore_range: true,
            ..Behaviour::default()
        },
    );
    origin.reset_counters();
    let baseline = resident_bytes(std::process::id());
    let peak_memory = PeakMemory::start();
    // One after the other: concurrent requests would share one check (checks of one version
    // run one at a time anyway, and a request is satisfied by a check that ends after it came).
    for index in 0..6usize {
        let first = index * 1000;
        let range = format!("bytes={first}-{}", first + 1023);
        let answer = get(&node.mcc_url("/big.bin"), &[("range", &range)]).await;
        assert_eq!(answer.status, 206);
        assert_eq!(answer.header("x-cache").as_deref(), Some("HIT"));
        assert_eq!(answer.bytes(), &content[first..first + 1024]);
    }
    let peak = peak_memory.finish();
    let revalidations = origin.request_count() as u64;
    let sent = origin.bytes_sent();
    eprintln!(
        "{revalidations} revalidations of a 64 MiB object answered whole: origin sent {} MiB, \
         RSS grew {} MiB",
        sent / MIB,
        peak.saturating_sub(baseline) / MIB
    );
    assert!(revalidations >= 6, "every request checked the version");
    assert!(
        sent < revalidations * 16 * MIB,
        "bodies were read: {sent} bytes for {revalidations} checks"
    );
    assert!(
        peak.saturating_sub(baseline) < 16 * MIB,
        "resident memory grew by {} MiB",
        peak.saturating_sub(baseline) / MIB
    );
    assert_eq!(node.node.index.used_bytes(), content.len() as u64);
    node.stop().await;
}

/// Item 5: an origin that ignores `Accept-Encoding: identity` and answers gzip. Its
/// representation is stored as sent, bytes and `Content-Encoding` together (issue 12), and is
/// never mixed with bytes of another coding: a stored plain version whose origin turns to gzip
/// is replaced, not completed with gzip slices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_answer_is_stored_with_its_coding_and_never_mixed_with_another() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|_| {}).await;
    let gzip = || Behaviour {
        headers: vec![
            ("content-encoding", "gzip".into()),
            ("vary", "Accept-Encoding".into()),
        ],
        ..Behaviour::default()
    };
    // The mock does not compress: these bytes stand for the compressed body, which is what
    // the client must get, with the header that says what they are.
    let compressed = pattern_bytes(300_000, 206);
    origin.put_with("/gz.bin", compressed.clone(), gzip());
    for round in 0..3 {
        let whole = get(&node.mcc_url("/gz.bin"), &[]).await;
        assert_eq!(whole.status, 200, "round {round}");
        assert_ne!(whole.header("x-cache").as_deref(), Some("BYPASS"));
        assert_eq!(whole.header("content-encoding").as_deref(), Some("gzip"));
        assert_eq!(whole.header("vary").as_deref(), Some("Accept-Encoding"));
        assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&compressed));
        let part = get(&node.mcc_url("/gz.bin"), &[("range", "bytes=100-199")]).await;
        assert_eq!(part.status, 206);
        assert_eq!(part.header("content-encoding").as_deref(), Some("gzip"));
        assert_eq!(part.bytes(), &compressed[100..200]);
        node.settle().await;
    }
    assert_eq!(node.node.index.object_count(), 1);
    let stats = node.stats().await;
    assert!(stat(&stats, "encoded_responses") >= 1, "{stats}");
    assert_eq!(stat(&stats, "pass_through_requests"), 0, "{stats}");

    // Part of an object is stored plainly; then the origin starts compressing. The next fill
    // sees the other coding: the stored part is dropped and the gzip version fetched instead.
    let plain = pattern_bytes(400_000, 207);
    origin.put("/turns.bin", plain.clone());
    let head = get(&node.mcc_url("/turns.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(head.bytes(), &plain[..65536]);
    assert_eq!(head.header("content-encoding"), None);
    origin.set_behaviour("/turns.bin", gzip());
    let tail = get(
        &node.mcc_url("/turns.bin"),
        &[("range", "bytes=200000-299999")],
    )
    .await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(tail.bytes(), &plain[200_000..300_000]);
    node.settle().await;
    let again = get(&node.mcc_url("/turns.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(again.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(again.bytes(), &plain[..65536]);
    let stats = node.stats().await;
    assert!(stat(&stats, "version_changes") >= 1, "{stats}");
    node.stop().await;
}

/// Item 12: an origin without validators changes its content at the same length. Slices of two
/// requests could be two versions, so none is added to another request's: a range that is not
/// stored is relayed, a whole-object request fetches the object again in one request, and no
/// response ever mixes versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_less_versions_at_the_same_length_are_never_mixed() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|_| {}).await;
    let bare = || Behaviour {
        omit_validators: true,
        ..Behaviour::default()
    };
    let length = 600_000;
    let versions: Vec<Bytes> = (0..3)
        .map(|seed| pattern_bytes(length, 210 + seed))
        .collect();
    let which = |body: &[u8]| {
        versions
            .iter()
            .position(|version| sha256_hex(version) == sha256_hex(body))
    };
    origin.put_with("/bare.bin", versions[0].clone(), bare());
    let head = get(&node.mcc_url("/bare.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(head.bytes(), &versions[0][..65536]);
    assert_eq!(head.header("etag"), None);
    node.settle().await;
    assert_eq!(node.node.index.used_bytes(), TEST_SLICE);

    origin.put_with("/bare.bin", versions[1].clone(), bare());
    let tail = get(
        &node.mcc_url("/bare.bin"),
        &[("range", "bytes=200000-299999")],
    )
    .await;
    assert_eq!(tail.header("x-cache").as_deref(), Some("BYPASS"));
    assert_eq!(tail.bytes(), &versions[1][200_000..300_000]);
    // Slice 0 is still the first version's and is served as stored, alone.
    let stored = get(&node.mcc_url("/bare.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(stored.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(stored.bytes(), &versions[0][..65536]);

    // A whole-object request cannot be completed from the stored slice: the object is fetched
    // again whole, in one request, and is one version from then on.
    let requests_before = origin.request_count();
    let whole = get(&node.mcc_url("/bare.bin"), &[]).await;
    assert_eq!(which(whole.bytes()), Some(1), "the current version, whole");
    assert_eq!(origin.request_count(), requests_before + 1);
    node.settle().await;
    origin.put_with("/bare.bin", versions[2].clone(), bare());
    for _ in 0..3 {
        let hit = get(&node.mcc_url("/bare.bin"), &[]).await;
        assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
        // Without a validator nothing tells the node the origin changed; what it serves is one
        // version, whole.
        assert_eq!(which(hit.bytes()), Some(1));
    }
    node.stop().await;
}

/// Item 12: an answer that merely leaves out the ETag the stored version has used to pass the
/// version check, and its bytes were stored beside the old version's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_the_stored_etag_is_another_version() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|_| {}).await;
    let first = pattern_bytes(500_000, 220);
    let second = pattern_bytes(500_000, 221);
    origin.put("/etag.bin", first.clone());
    let head = get(&node.mcc_url("/etag.bin"), &[("range", "bytes=0-65535")]).await;
    assert_eq!(head.bytes(), &first[..65536]);
    assert!(head.header("etag").is_some());
    node.settle().await;

    origin.put_with(
        "/etag.bin",
        second.clone(),
        Behaviour {
            omit_validators: true,
            ..Behaviour::default()
        },
    );
    let whole = get(&node.mcc_url("/etag.bin"), &[]).await;
    // The answer started from the stored slice of the first version and must not go on with
    // the second's bytes; either it is aborted, or it is the second version whole.
    if let Ok(body) = &whole.body {
        assert_eq!(sha256_hex(body), sha256_hex(&second), "never a mix");
    }
    assert!(stat(&node.stats().await, "version_changes") >= 1);
    let again = get(&node.mcc_url("/etag.bin"), &[]).await;
    assert_eq!(sha256_hex(again.bytes()), sha256_hex(&second));
    assert_eq!(again.header("etag"), None);
    node.settle().await;
    let hit = get(&node.mcc_url("/etag.bin"), &[]).await;
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&second));
    node.stop().await;
}

/// A 206 for other bytes than asked, or whose `Content-Length` contradicts its
/// `Content-Range`, is refused: nothing of it is served as the asked bytes or stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_with_wrong_offsets_or_a_contradicting_length_is_never_served_or_stored() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|_| {}).await;
    let content = pattern_bytes(500_000, 230);
    let faults = [
        Behaviour {
            shift_range: Some(1000),
            ..Behaviour::default()
        },
        Behaviour {
            content_length_delta: Some(-100),
            ..Behaviour::default()
        },
        Behaviour {
            content_length_delta: Some(100),
            ..Behaviour::default()
        },
    ];
    for (index, fault) in faults.iter().enumerate() {
        let stored_before = node.node.index.used_bytes();
        // Cold: the discovery gets the bad answer.
        let path = format!("/bad-206/{index}.bin");
        origin.put_with(&path, content.clone(), fault.clone());
        for range in [None, Some("bytes=65536-131071")] {
            let headers: Vec<(&str, &str)> = range.iter().map(|range| ("range", *range)).collect();
            let answer = get(&node.mcc_url(&path), &headers).await;
            assert_eq!(answer.status, 502, "fault {index} {range:?}");
        }
        node.settle().await;
        assert_eq!(node.node.index.used_bytes(), stored_before, "fault {index}");

        // Warm: the first slice is stored, and a later fill gets the bad answer.
        origin.set_behaviour(&path, Behaviour::default());
        let head = get(&node.mcc_url(&path), &[("range", "bytes=0-65535")]).await;
        assert_eq!(head.bytes(), &content[..65536]);
        node.settle().await;
        origin.set_behaviour(&path, fault.clone());
        let whole = get(&node.mcc_url(&path), &[]).await;
        assert!(
            whole.body.is_err(),
            "fault {index}: a response that began from disk is cut short, not completed"
        );
        let tail = get(&node.mcc_url(&path), &[("range", "bytes=200000-")]).await;
        assert_eq!(tail.status, 502, "fault {index}");
        node.settle().await;
        assert_eq!(
            node.node.index.used_bytes(),
            stored_before + TEST_SLICE,
            "fault {index}: only the slice stored before the fault"
        );

        // Mended, the rest is fetched and the whole is right.
        origin.set_behaviour(&path, Behaviour::default());
        let mended = get(&node.mcc_url(&path), &[]).await;
        assert_eq!(sha256_hex(mended.bytes()), sha256_hex(&content));
        node.settle().await;
    }
    node.stop().await;
}

/// An origin that honours Range at first and ignores it on a later fill: the fill reads the
/// whole body from byte 0, keeps the missing slices up to what was asked, and stops there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_ignores_range_on_a_later_fill_gives_the_right_bytes_and_stops_there() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.fill.finish_objects_up_to = "1MiB".into();
    })
    .await;
    let content = pattern_bytes(16 * MIB as usize, 240);
    origin.put("/later.bin", content.clone());
    let slice = TEST_SLICE as usize;
    let head = get(
        &node.mcc_url("/later.bin"),
        &[("range", &format!("bytes=0-{}", 2 * slice - 1))],
    )
    .await;
    assert_eq!(head.bytes(), &content[..2 * slice]);
    node.settle().await;

    origin.set_behaviour(
        "/later.bin",
        Behaviour {
            ignore_range: true,
            chunk_size: Some(64 << 10),
            chunk_delay: Some(Duration::from_millis(1)),
            ..Behaviour::default()
        },
    );
    origin.reset_counters();
    let (first, last) = (10 * slice, 12 * slice - 1);
    let middle = get(
        &node.mcc_url("/later.bin"),
        &[("range", &format!("bytes={first}-{last}"))],
    )
    .await;
    assert_eq!(middle.status, 206);
    assert_eq!(middle.bytes(), &content[first..=last]);
    node.settle().await;
    assert_eq!(
        node.node.index.used_bytes(),
        12 * TEST_SLICE,
        "slices 2 to 9 came with the body and are kept; nothing past slice 11"
    );
    assert!(
        origin.bytes_sent() < 8 * MIB,
        "the rest of the 16 MiB body was not read: {} bytes sent",
        origin.bytes_sent()
    );
    let stored = get(
        &node.mcc_url("/later.bin"),
        &[("range", &format!("bytes=0-{last}"))],
    )
    .await;
    assert_eq!(stored.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(stored.bytes()), sha256_hex(&content[..=last]));
    node.stop().await;
}

/// `upstream.merge_gap_slices > 0`: missing runs separated by a few stored slices are fetched
/// with one request, the stored slices in between are read again and discarded, and every byte
/// served is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_runs_fetch_across_stored_slices_with_one_request_and_serve_the_right_bytes() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|config| {
        config.upstream.merge_gap_slices = 2;
    })
    .await;
    let slice = TEST_SLICE as usize;
    let content = pattern_bytes(12 * slice + 777, 250);
    origin.put("/gaps.bin", content.clone());
    for stored in [1, 4, 5] {
        let range = format!("bytes={}-{}", stored * slice, stored * slice + slice - 1);
        let answer = get(&node.mcc_url("/gaps.bin"), &[("range", &range)]).await;
        assert_eq!(
            answer.bytes(),
            &content[stored * slice..(stored + 1) * slice]
        );
    }
    node.settle().await;
    origin.reset_counters();
    let whole = get(&node.mcc_url("/gaps.bin"), &[]).await;
    assert_eq!(whole.header("x-cache").as_deref(), Some("PARTIAL"));
    assert_eq!(sha256_hex(whole.bytes()), sha256_hex(&content));
    assert_eq!(origin.request_count(), 1, "one request across the gaps");
    // Slices 1, 4 and 5 lie inside the merged run and were fetched again; nothing was fetched
    // twice by this request.
    assert_eq!(origin.max_fetches_of_any_byte("/gaps.bin"), 1);
    assert_eq!(origin.min_fetches_of_any_byte("/gaps.bin"), 1);
    node.settle().await;
    let hit = get(&node.mcc_url("/gaps.bin"), &[]).await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(sha256_hex(hit.bytes()), sha256_hex(&content));
    assert_eq!(node.node.index.used_bytes(), content.len() as u64);
    node.stop().await;
}

/// An origin that resets the connection in the middle of a later fill: the client gets the
/// bytes before the reset and then an aborted body, only complete slices are stored, and the
/// next request completes the object correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_body_keeps_only_complete_slices_and_the_next_request_heals() {
    let _serial = serial().await;
    let (origin, _storage, node) = scene(|_| {}).await;
    let slice = TEST_SLICE as usize;
    let content = pattern_bytes(10 * slice, 260);
    origin.put("/reset.bin", content.clone());
    let head = get(
        &node.mcc_url("/reset.bin"),
        &[("range", &format!("bytes=0-{}", slice - 1))],
    )
    .await;
    assert_eq!(head.bytes(), &content[..slice]);
    node.settle().await;
    // The later fill asks for slices 1..9 and dies 2.5 slices in.
    origin.set_behaviour(
        "/reset.bin",
        Behaviour {
            drop_after_bytes: Some(2 * TEST_SLICE + TEST_SLICE / 2),
            ..Behaviour::default()
        },
    );
    let response = client()
        .get(node.mcc_url("/reset.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut received = Vec::new();
    let mut stream = futures_util::StreamExt::boxed(response.bytes_stream());
    let mut aborted = false;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        match chunk {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    assert!(aborted, "the body is cut short, never ended cleanly");
    assert!(received.len() < content.len());
    assert_eq!(
        received,
        &content[..received.len()],
        "every byte served is right"
    );
    node.settle().await;
    // Slice 0 and the two complete slices of the cut fill are kept. When the response reaches
    // slice 3 after the cut fill has already released it, the response refills from there once
    // (and that fill is cut 2.5 slices in too), so two more whole slices may be kept; never a
    // part of one.
    let kept = node.node.index.used_bytes();
    assert!(
        kept % TEST_SLICE == 0 && (3 * TEST_SLICE..=5 * TEST_SLICE).contains(&kept),
        "only whole slices are kept: {kept} bytes"
    );
    origin.set_behaviour("/reset.bin", Behaviour::default());
    let healed = get(&node.mcc_url("/reset.bin"), &[]).await;
    assert_eq!(healed.header("x-cache").as_deref(), Some("PARTIAL"));
    assert_eq!(sha256_hex(healed.bytes()), sha256_hex(&content));
    node.stop().await;
}

/// What a raw origin answers: the head for a request's path and `Range`, and the body bytes to
/// write after it (`endless` repeats them until the node hangs up).
struct RawAnswer {
    head: String,
    body: Vec<u8>,
    endless: bool,
}

/// How a raw origin answers a path and a `Range` (`first`, optional `last`).
type Answering = dyn Fn(&str, Option<(u64, Option<u64>)>) -> RawAnswer + Send + Sync;

/// An origin on a raw socket, for answers hyper would not let a server send: more bytes than
/// declared, bodies that never end. Counts the body bytes it wrote.
struct RawOrigin {
    addr: SocketAddr,
    written: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RawOrigin {
    async fn start(
        answer: impl Fn(&str, Option<(u64, Option<u64>)>) -> RawAnswer + Send + Sync + 'static,
    ) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let answer = Arc::new(answer);
        let task = tokio::spawn({
            let written = written.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve_raw(stream, answer.clone(), written.clone()));
                }
            }
        });
        RawOrigin {
            addr,
            written,
            task,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves requests on one connection until it closes; bodies are written in 16 KiB pieces, and
/// an endless one stops after 256 MiB at most.
async fn serve_raw(mut stream: TcpStream, answer: Arc<Answering>, written: Arc<AtomicU64>) {
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 16 << 10];
    loop {
        let head_end = loop {
            if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&buffer[..read]),
            }
        };
        let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
        received.drain(..head_end);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let range = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            if !name.trim().eq_ignore_ascii_case("range") {
                return None;
            }
            let (first, last) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
            Some((first.parse().ok()?, last.parse().ok()))
        });
        let reply = answer(&path, range);
        if stream.write_all(reply.head.as_bytes()).await.is_err() {
            return;
        }
        loop {
            for piece in reply.body.chunks(16 << 10) {
                if stream.write_all(piece).await.is_err() {
                    return;
                }
                written.fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            if !reply.endless || written.load(Ordering::Relaxed) > 256 * MIB {
                break;
            }
        }
        if reply.endless {
            return;
        }
    }
}

/// A 206 whose chunked body goes on past its range forever: the node takes exactly the range,
/// stores it, and hangs up instead of reading on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_chunked_body_yields_exactly_the_asked_range_and_is_cut_off() {
    let _serial = serial().await;
    let content = pattern_bytes(1_000_000, 270);
    let served = content.clone();
    let origin = RawOrigin::start(move |_path, range| {
        let length = served.len() as u64;
        let (first, last) = match range {
            Some((first, last)) => (first, last.unwrap_or(length - 1).min(length - 1)),
            None => (0, length - 1),
        };
        let mut body = Vec::new();
        let bytes = &served[first as usize..=last as usize];
        body.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
        // Then chunk after chunk of garbage, never the last chunk.
        let garbage = vec![0x5a_u8; 8192];
        let mut tail = format!("{:x}\r\n", garbage.len()).into_bytes();
        tail.extend_from_slice(&garbage);
        tail.extend_from_slice(b"\r\n");
        let mut answer_body = body;
        answer_body.extend_from_slice(&tail);
        RawAnswer {
            head: format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {first}-{last}/{length}\r\n\
                 ETag: \"endless\"\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            body: answer_body,
            endless: true,
        }
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;
    let part = get(
        &node.mcc_url("/endless.bin"),
        &[("range", "bytes=100000-199999")],
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.bytes(), &content[100_000..200_000]);
    node.settle().await;
    let written = origin.written.load(Ordering::Relaxed);
    assert!(
        written < 64 * MIB,
        "the node hung up instead of reading an endless body: {written} bytes written"
    );
    // Slices 1..3 (65536..262143) were asked for and stored with exactly their bytes.
    assert_eq!(node.node.index.used_bytes(), 3 * TEST_SLICE);
    let hit = get(
        &node.mcc_url("/endless.bin"),
        &[("range", "bytes=65536-262143")],
    )
    .await;
    assert_eq!(hit.header("x-cache").as_deref(), Some("HIT"));
    assert_eq!(hit.bytes(), &content[65_536..262_144]);
    node.stop().await;
}

/// A 200 that sends more than its `Content-Length`, the extra bytes shaped like a response to
/// the node's next request on that connection: the object is stored with its declared bytes
/// only, and the extra bytes never become another object's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_declared_is_cut_at_its_length_and_smuggles_nothing() {
    let _serial = serial().await;
    let first = pattern_bytes(300_000, 280);
    let second = pattern_bytes(200_000, 281);
    let (first_served, second_served) = (first.clone(), second.clone());
    let origin = RawOrigin::start(move |path, _range| {
        let (content, etag) = if path.starts_with("/first") {
            (&first_served, "\"first\"")
        } else {
            (&second_served, "\"second\"")
        };
        let mut body = content.to_vec();
        if path.starts_with("/first") {
            // A forged answer for whatever the node asks next, on the same connection.
            body.extend_from_slice(
                b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\nETag: \"forged\"\r\n\r\n",
            );
            body.extend_from_slice(&vec![0x66_u8; 200_000]);
        }
        RawAnswer {
            head: format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\n\r\n",
                content.len()
            ),
            body,
            endless: false,
        }
    })
    .await;
    let storage = tempfile::tempdir().unwrap();
    let node = TestNode::start(usual_config(storage.path(), &origin.base_url())).await;
    let one = get(&node.mcc_url("/first.bin"), &[]).await;
    assert_eq!(sha256_hex(one.bytes()), sha256_hex(&first));
    node.settle().await;
    assert_eq!(node.node.index.used_bytes(), first.len() as u64);
    let two = get(&node.mcc_url("/second.bin"), &[]).await;
    assert_eq!(two.status, 200);
    assert_eq!(two.header("etag").as_deref(), Some("\"second\""));
    assert_eq!(sha256_hex(two.bytes()), sha256_hex(&second));
    node.settle().await;
    let hits = (
        get(&node.mcc_url("/first.bin"), &[]).await,
        get(&node.mcc_url("/second.bin"), &[]).await,
    );
    assert_eq!(sha256_hex(hits.0.bytes()), sha256_hex(&first));
    assert_eq!(sha256_hex(hits.1.bytes()), sha256_hex(&second));
    node.stop().await;
}
