//! Faults and abuse at the node's edge: what a hostile LAN client or local process can do with
//! connections, request lines, hosts, the tracker and the admin token (issue 10, items 4, 9, 10,
//! 11 and 15), and the peering API's error paths. Every attack is made over real sockets on
//! loopback, and every test checks bytes and counts (open connections, file descriptors, origin
//! requests), never only a status code.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cache_node::config::{Config, OriginConfig};
use common::*;
use outpost_testkit::{
    connect_from, eventually, eventually_every, open_fds, pattern_bytes, Behaviour, MockOrigin,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The most any wait in these tests may take on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Tests in this file run in one process, and one of them counts the process's file
/// descriptors: it holds this lock for writing, every other test for reading.
static DESCRIPTORS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What a scene keeps alive: the node's storage and its hold on [`DESCRIPTORS`].
struct Held {
    _storage: tempfile::TempDir,
    _descriptors: Box<dyn std::any::Any + Send>,
}

/// A mock origin and a node in front of it, with `tweak` applied to the node's config.
async fn scene(tweak: impl FnOnce(&mut Config, &MockOrigin)) -> (MockOrigin, Held, TestNode) {
    let shared = Box::new(DESCRIPTORS.read().await);
    scene_holding(shared, tweak).await
}

/// Like [`scene`], alone in the process (for counting file descriptors).
async fn exclusive_scene(
    tweak: impl FnOnce(&mut Config, &MockOrigin),
) -> (MockOrigin, Held, TestNode) {
    let exclusive = Box::new(DESCRIPTORS.write().await);
    scene_holding(exclusive, tweak).await
}

async fn scene_holding(
    descriptors: Box<dyn std::any::Any + Send>,
    tweak: impl FnOnce(&mut Config, &MockOrigin),
) -> (MockOrigin, Held, TestNode) {
    let (origin, storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        tweak(&mut config, origin);
        config
    })
    .await;
    let held = Held {
        _storage: storage,
        _descriptors: descriptors,
    };
    (origin, held, node)
}

/// Opens `count` connections from `source` that send the start of a request and never finish
/// its headers: a slowloris client.
async fn slow_header_connections(source: &str, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = connect_from(source, addr).await;
        stream
            .write_all(
                format!("GET /never.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\nX-Slow: ").as_bytes(),
            )
            .await
            .unwrap();
        streams.push(stream);
    }
    streams
}

/// Like [`slow_header_connections`], one at a time, each admitted by the node before the next
/// opens: the first returned has been idle the longest.
async fn slow_connections_in_order(source: &str, node: &TestNode, count: usize) -> Vec<TcpStream> {
    let edge = &node.node.stats.edge;
    let mut streams = Vec::with_capacity(count);
    for _ in 0..count {
        let before = edge.connections_open.get();
        streams.extend(slow_header_connections(source, node.addr, 1).await);
        eventually("the node admits the connection", PATIENCE, || {
            edge.connections_open.get() == before + 1
        })
        .await;
    }
    streams
}

/// True when the node has closed `stream`: a read returns end-of-file or a reset, and nothing
/// else (a connection the node closes for a timeout, to make room, or at once, gets no answer).
async fn wait_closed(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buffer = [0u8; 64];
    match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(read)) => panic!(
            "the node answered {:?} on a connection it should have closed unanswered",
            String::from_utf8_lossy(&buffer[..read])
        ),
    }
}

/// True when `stream` is still open with nothing to read.
fn still_open(stream: &TcpStream) -> bool {
    let mut buffer = [0u8; 1];
    matches!(stream.try_read(&mut buffer), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock)
}

/// An HTTP answer read off a raw connection.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` exactly as written (hyper clients would normalise it) from `source` and reads
/// the answer; the request must ask for `Connection: close`.
async fn raw_exchange(source: &str, addr: SocketAddr, request: &str) -> RawAnswer {
    let mut stream = connect_from(source, addr).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("the node answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, _) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let body = answer[head.len() + 4..].to_vec();
    RawAnswer {
        status,
        head: head.to_owned(),
        body,
    }
}

/// Item 4: 300 connections that never finish their headers are closed at the header timeout,
/// their descriptors come back, and a well-behaved client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_at_the_header_timeout_and_their_descriptors_come_back() {
    const SLOW: usize = 300;
    let header_read_timeout = Duration::from_secs(2);
    let (origin, _held, node) = exclusive_scene(|config, _| {
        config.server.header_read_timeout = header_read_timeout;
        config.server.max_connections = 2 * SLOW;
        config.server.max_connections_per_client = 2 * SLOW;
    })
    .await;
    let content = pattern_bytes(300_000, 41);
    origin.put("/good.bin", content.clone());
    let edge = node.node.stats.edge.clone();
    let baseline = open_fds();

    let opened = Instant::now();
    let mut slow = slow_header_connections("127.0.0.1", node.addr, SLOW).await;
    eventually("the node holds every slow connection", PATIENCE, || {
        edge.connections_open.get() == SLOW as u64
    })
    .await;
    // Both ends of each connection live in this process.
    let held = open_fds();
    assert!(
        held >= baseline + 2 * SLOW,
        "{held} fds held, baseline {baseline}"
    );

    // A well-behaved client is served while they hang.
    let good = get(&node.mcc_url("/good.bin"), &[]).await;
    assert_eq!(good.status, 200);
    assert_eq!(good.bytes(), &content[..]);

    let deadline = Instant::now() + PATIENCE;
    for (index, stream) in slow.iter_mut().enumerate() {
        assert!(
            wait_closed(stream, deadline).await,
            "slow connection {index} still open after {:?}",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() >= header_read_timeout,
        "closed before the header timeout: {:?}",
        opened.elapsed()
    );
    assert_eq!(edge.header_timeouts.get(), SLOW as u64);
    eventually("the node's connections are all closed", PATIENCE, || {
        edge.connections_open.get() == 0
    })
    .await;
    // The node's ends are closed; only this test's ends are left.
    let after_timeout = open_fds();
    assert!(
        after_timeout <= baseline + SLOW + 16,
        "{after_timeout} fds open, baseline {baseline}: the node kept descriptors"
    );
    drop(slow);
    let released = open_fds();
    assert!(
        released <= baseline + 16,
        "{released} fds open, baseline {baseline}"
    );
    eprintln!(
        "slowloris: {SLOW} connections; fds baseline {baseline}, held {held}, after the header \
         timeout {after_timeout} (the test's ends only), released {released}; all closed {:?} \
         after opening",
        opened.elapsed()
    );
    assert_eq!(
        origin
            .requests()
            .iter()
            .filter(|r| r.path == "/never.bin")
            .count(),
        0
    );
    node.stop().await;
}

/// Item 4: a keep-alive connection gets `idle_timeout` between requests, not the header timeout,
/// and the admin listener cuts slow headers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_the_idle_timeout() {
    let (origin, _held, node) = scene(|config, _| {
        config.server.header_read_timeout = Duration::from_secs(1);
        config.server.idle_timeout = Duration::from_secs(3);
    })
    .await;
    let content = pattern_bytes(1000, 42);
    origin.put("/small.bin", content.clone());
    let edge = node.node.stats.edge.clone();

    let mut stream = connect_from("127.0.0.1", node.addr).await;
    let request =
        format!("GET /small.bin?cacheHostOrigin={ORIGIN_HOST} HTTP/1.1\r\nHost: cache\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 8192];
    while !answer.ends_with(&content[content.len() - 16..]) {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(read > 0, "closed before the whole answer");
        answer.extend_from_slice(&buffer[..read]);
    }
    assert!(answer.ends_with(&content), "the body is the object");
    let answered = Instant::now();
    let mut admin_slow = slow_header_connections("127.0.0.1", node.admin_addr, 3).await;

    assert!(wait_closed(&mut stream, Instant::now() + PATIENCE).await);
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(2500),
        "an idle keep-alive connection was closed after {idle_for:?}, before idle_timeout"
    );
    assert_eq!(edge.idle_timeouts.get(), 1);
    assert_eq!(edge.header_timeouts.get(), 0);
    for admin in &mut admin_slow {
        assert!(wait_closed(admin, Instant::now() + PATIENCE).await);
    }
    node.stop().await;
}

/// Item 4: at `max_connections` the connection idle the longest makes room for a new client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_oldest_idle_connection_makes_room() {
    const CAP: usize = 64;
    let (origin, _held, node) = scene(|config, _| {
        config.server.max_connections = CAP;
        config.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let content = pattern_bytes(200_000, 43);
    origin.put("/good.bin", content.clone());
    let edge = node.node.stats.edge.clone();
    let mut slow = slow_connections_in_order("127.0.0.1", &node, CAP).await;

    let good = get(&node.mcc_url("/good.bin"), &[]).await;
    assert_eq!(good.status, 200);
    assert_eq!(good.bytes(), &content[..]);
    assert!(wait_closed(&mut slow[0], Instant::now() + PATIENCE).await);
    assert!(
        slow[1..].iter().all(still_open),
        "only the oldest made room"
    );
    assert_eq!(edge.connections_shed.get(), 1);
    assert_eq!(edge.connections_refused.get(), 0);
    assert!(edge.connections_open.get() <= CAP as u64);
    node.stop().await;
}

/// Item 4: busy connections are never shed; with every connection busy a new one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_connection_busy_new_ones_are_refused_and_the_busy_ones_finish() {
    const CAP: usize = 4;
    let (origin, _held, node) = scene(|config, _| {
        config.server.max_connections = CAP;
    })
    .await;
    let content = pattern_bytes(50_000, 44);
    origin.put_with(
        "/slow.bin",
        content.clone(),
        Behaviour {
            header_delay: Some(Duration::from_secs(3)),
            ..Behaviour::default()
        },
    );
    let edge = node.node.stats.edge.clone();
    let request = format!(
        "GET /slow.bin?cacheHostOrigin={ORIGIN_HOST} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n"
    );
    let busy: Vec<_> = (0..CAP)
        .map(|_| {
            let request = request.clone();
            let addr = node.addr;
            tokio::spawn(async move { raw_exchange("127.0.0.1", addr, &request).await })
        })
        .collect();
    // Busy: each connection's request has reached the handler, which waits for the origin.
    let stats = &node.node.stats;
    eventually("every connection is busy", PATIENCE, || {
        edge.connections_open.get() == CAP as u64 && stats.requests.get() == CAP as u64
    })
    .await;
    let mut refused = connect_from("127.0.0.2", node.addr).await;
    // The node may have closed it before this write lands.
    let _ = refused.write_all(request.as_bytes()).await;
    assert!(wait_closed(&mut refused, Instant::now() + PATIENCE).await);
    assert_eq!(edge.connections_refused.get(), 1);
    assert_eq!(edge.connections_shed.get(), 0);
    for answer in busy {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, &content[..]);
    }
    node.stop().await;
}

/// Item 4: one address over `max_connections_per_client` pushes out its own idle connections,
/// never another address's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_cap_makes_room_from_its_own_idle_connections() {
    const PER_CLIENT: usize = 16;
    let (origin, _held, node) = scene(|config, _| {
        config.server.max_connections_per_client = PER_CLIENT;
        config.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let content = pattern_bytes(100_000, 45);
    origin.put("/good.bin", content.clone());
    let edge = node.node.stats.edge.clone();
    let neighbour = slow_header_connections("127.0.0.3", node.addr, PER_CLIENT).await;
    eventually(
        "the node holds the neighbour's connections",
        PATIENCE,
        || edge.connections_open.get() == PER_CLIENT as u64,
    )
    .await;
    let mut attacker = slow_connections_in_order("127.0.0.2", &node, PER_CLIENT).await;
    attacker.extend(slow_header_connections("127.0.0.2", node.addr, 4).await);
    let deadline = Instant::now() + PATIENCE;
    for (index, stream) in attacker[..4].iter_mut().enumerate() {
        assert!(
            wait_closed(stream, deadline).await,
            "attacker connection {index}"
        );
    }
    assert!(attacker[4..].iter().all(still_open));
    assert!(
        neighbour.iter().all(still_open),
        "another address lost nothing"
    );
    assert_eq!(edge.connections_shed.get(), 4);
    // A normal request from the attacker's address still gets through, in place of its oldest.
    let mut fetch = connect_from("127.0.0.2", node.addr).await;
    let request = format!(
        "GET /good.bin?cacheHostOrigin={ORIGIN_HOST} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n"
    );
    fetch.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, fetch.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(answer.ends_with(&content));
    assert!(wait_closed(&mut attacker[4], Instant::now() + PATIENCE).await);
    assert!(neighbour.iter().all(still_open));
    node.stop().await;
}

/// Item 10: an allowed host name reaches ports 80 and 443 and those its `[[origin]]` lists,
/// never another local service or the node's own admin port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_host_reaches_only_its_default_and_listed_ports() {
    let (origin, _held, node) = scene(|config, origin| {
        config.origin.push(OriginConfig {
            host: "localhost".into(),
            ..Default::default()
        });
        config.origin.push(OriginConfig {
            host: "127.0.0.1".into(),
            ports: vec![origin.addr().port()],
            ..Default::default()
        });
    })
    .await;
    // Another local service, which must never see a connection from the node.
    let other_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    other_service.set_nonblocking(true).unwrap();
    let other_port = other_service.local_addr().unwrap().port();

    let mcc = get(
        &format!(
            "http://{}/x?cacheHostOrigin=localhost:{other_port}",
            node.addr
        ),
        &[],
    )
    .await;
    assert_eq!(mcc.status, 403);
    assert!(String::from_utf8_lossy(mcc.bytes()).contains(&format!("not on port {other_port}")));
    let proxied = raw_exchange(
        "127.0.0.1",
        node.addr,
        &format!("GET http://localhost:{other_port}/x HTTP/1.1\r\nHost: localhost:{other_port}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(proxied.status, 403);
    let own_admin = raw_exchange(
        "127.0.0.1",
        node.addr,
        &format!(
            "GET /stats HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
            node.admin_addr.port()
        ),
    )
    .await;
    assert_eq!(own_admin.status, 403);
    assert!(
        !own_admin.text().contains("hit_bytes"),
        "{}",
        own_admin.text()
    );
    assert!(
        matches!(other_service.accept(), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "the node connected to another local service"
    );
    let stats = node.node.stats_snapshot();
    assert_eq!(stats.origin_requests, 0);
    assert_eq!(node.node.index.object_count(), 0);

    // A port the admin listed is reached, without an upstream.
    let content = pattern_bytes(20_000, 46);
    origin.put("/listed.bin", content.clone());
    let listed = get(
        &format!(
            "http://{}/listed.bin?cacheHostOrigin=127.0.0.1:{}",
            node.addr,
            origin.addr().port()
        ),
        &[],
    )
    .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.bytes(), &content[..]);
    node.stop().await;
}

/// Item 11: request-targets that are neither a path nor an absolute URL, duplicate `Host`
/// headers and malformed hosts get 400, and none reaches the origin or becomes a cache key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_targets_and_hosts_get_400_and_never_reach_the_origin() {
    let (origin, _held, node) = scene(|_, _| {}).await;
    let content = pattern_bytes(10_000, 47);
    origin.put("/a.bin", content.clone());
    let close = "Connection: close\r\n\r\n";
    let attacks = [
        format!("GET * HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n{close}"),
        format!("OPTIONS * HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n{close}"),
        format!("GET {ORIGIN_HOST}:80 HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n{close}"),
        format!("GET /a.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\nHost: {ORIGIN_HOST}\r\n{close}"),
        format!("GET /a.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\nHost: evil.example\r\n{close}"),
        format!("GET /a.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}:80:80\r\n{close}"),
        format!("GET /a.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}..\r\n{close}"),
        format!(
            "GET /a.bin?cacheHostOrigin={ORIGIN_HOST}:80:80 HTTP/1.1\r\nHost: cache\r\n{close}"
        ),
        format!("GET /a.bin?cacheHostOrigin={ORIGIN_HOST}.. HTTP/1.1\r\nHost: cache\r\n{close}"),
    ];
    for attack in &attacks {
        let answer = raw_exchange("127.0.0.1", node.addr, attack).await;
        assert_eq!(answer.status, 400, "{attack:?} got {}", answer.head);
        assert!(!answer.body.is_empty(), "a 400 says why");
    }
    assert_eq!(origin.request_count(), 0, "{:?}", origin.requests());
    assert_eq!(node.node.index.object_count(), 0);
    assert_eq!(
        node.node.stats.edge.bad_requests.get(),
        attacks.len() as u64
    );
    // The same request, well formed, is served.
    let good = raw_exchange(
        "127.0.0.1",
        node.addr,
        &format!("GET /a.bin HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n{close}"),
    )
    .await;
    assert_eq!(good.status, 200);
    assert_eq!(good.body, &content[..]);
    node.stop().await;
}

/// The body of an announcement of `content_id` holding every piece.
fn holding(content_id: &str) -> String {
    json!({"content_id": content_id, "port": 7680, "complete": true}).to_string()
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: cache\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn get_request(path_and_query: &str) -> String {
    format!("GET {path_and_query} HTTP/1.1\r\nHost: cache\r\nConnection: close\r\n\r\n")
}

/// Item 9: four addresses announcing without end, and renewing, never lock a real peer out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_addresses_announcing_without_end_never_lock_out_a_real_peer() {
    let (_origin, _held, node) = scene(|config, _| {
        config.peering.max_contents = 64;
        config.peering.max_contents_per_address = 16;
    })
    .await;
    let fake = |index: usize| format!("{index:064x}");
    let attackers = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"];
    let announce = "/_outpost/v1/announce";
    for index in 0..4 * 32 {
        let answer = raw_exchange(
            attackers[index % 4],
            node.addr,
            &post(announce, &holding(&fake(index))),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let tracker = &node.node.peering.as_ref().unwrap().tracker;
    assert_eq!(tracker.counts(), (64, 64), "each attacker holds its share");
    let real = "ab".repeat(32);
    let accepted = raw_exchange("127.0.0.50", node.addr, &post(announce, &holding(&real))).await;
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    // They go on: new content and renewals of what they hold.
    for index in 4 * 32..4 * 48 {
        for id in [fake(index), fake(index - 8)] {
            let answer = raw_exchange(
                attackers[index % 4],
                node.addr,
                &post(announce, &holding(&id)),
            )
            .await;
            assert_eq!(answer.status, 200, "{}", answer.text());
        }
    }
    let found = raw_exchange(
        "127.0.0.60",
        node.addr,
        &get_request(&format!("/_outpost/v1/peers?content_id={real}&mode=3")),
    )
    .await;
    assert_eq!(found.status, 200);
    let found: Value = serde_json::from_slice(&found.body).unwrap();
    assert_eq!(found["peers"][0]["address"], "127.0.0.50:7680", "{found}");
    let evictions = node.node.stats.edge.tracker_evictions.get();
    assert!(evictions >= 4 * 16, "{evictions} evictions");
    assert_eq!(tracker.counts().0, 64);
    node.stop().await;
}

/// Item 15: wrong tokens are throttled per address, the right one still works (elsewhere at
/// once, from the flooding address once it has waited), and tokens are never compared while
/// throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_admin_tokens_are_throttled_per_address_and_the_right_one_still_works() {
    let (origin, _held, node) = scene(|config, _| {
        config.admin.token = "the-real-token-0123456789".into();
    })
    .await;
    for path in ["/one.bin", "/two.bin"] {
        origin.put(path, pattern_bytes(5_000, 48));
        assert_eq!(get(&node.mcc_url(path), &[]).await.status, 200);
    }
    node.settle().await;
    let delete = |path: &str, token: &str| {
        format!(
            "DELETE /objects?origin={ORIGIN_HOST}&path=%2F{path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
    };
    let mut statuses = Vec::new();
    for attempt in 0..30 {
        let answer = raw_exchange(
            "127.0.0.1",
            node.admin_addr,
            &delete("one.bin", &format!("guess-{attempt}")),
        )
        .await;
        if answer.status == 429 {
            assert!(answer.header("retry-after").is_some(), "{}", answer.head);
        }
        statuses.push(answer.status);
    }
    let burst = cache_node::api::auth_throttle::AUTH_FAILURE_BURST as usize;
    assert!(
        statuses[..burst].iter().all(|status| *status == 401),
        "{statuses:?}"
    );
    assert!(
        statuses[burst..].iter().all(|status| *status == 429),
        "{statuses:?}"
    );
    // Throttled means the token is not even looked at.
    let right_but_throttled = raw_exchange(
        "127.0.0.1",
        node.admin_addr,
        &delete("one.bin", "the-real-token-0123456789"),
    )
    .await;
    assert_eq!(right_but_throttled.status, 429);
    // Another address is not throttled.
    let purged = raw_exchange(
        "127.0.0.2",
        node.admin_addr,
        &delete("two.bin", "the-real-token-0123456789"),
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.text(), format!("purged {ORIGIN_HOST}/two.bin\n"));
    // The flooding address may try again once it has waited.
    // Every try is a request the throttle sees: they keep the pace of a patient client.
    eventually_every(
        "the right token to work again",
        PATIENCE,
        Duration::from_millis(200),
        async || {
            let answer = raw_exchange(
                "127.0.0.1",
                node.admin_addr,
                &delete("one.bin", "the-real-token-0123456789"),
            )
            .await;
            if answer.status == 200 {
                assert_eq!(answer.text(), format!("purged {ORIGIN_HOST}/one.bin\n"));
                return true;
            }
            assert_eq!(answer.status, 429, "{}", answer.text());
            false
        },
    )
    .await;
    let edge = &node.node.stats.edge;
    assert_eq!(edge.admin_auth_failures.get(), burst as u64);
    assert!(edge.admin_auth_throttled.get() >= (30 - burst + 1) as u64);
    assert_eq!(node.node.index.object_count(), 0);
    node.stop().await;
}

/// Item 15: with the shipped or an empty token, the endpoints that change state are disabled
/// and say how to enable them; reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_or_an_empty_token_disables_the_endpoints_that_change_state() {
    for token in ["change-me", ""] {
        let (origin, _held, node) = scene(|config, _| {
            config.admin.token = token.into();
        })
        .await;
        origin.put("/kept.bin", pattern_bytes(5_000, 49));
        assert_eq!(get(&node.mcc_url("/kept.bin"), &[]).await.status, 200);
        node.settle().await;
        let refused = raw_exchange(
            "127.0.0.1",
            node.admin_addr,
            &format!(
                "DELETE /objects?origin={ORIGIN_HOST}&path=%2Fkept.bin HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(refused.status, 403, "token {token:?}");
        assert!(
            refused.text().contains("CACHE_NODE__ADMIN__TOKEN"),
            "{}",
            refused.text()
        );
        let inspected = raw_exchange(
            "127.0.0.1",
            node.admin_addr,
            &format!("GET /objects?origin={ORIGIN_HOST}&path=%2Fkept.bin HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(inspected.status, 200, "the object is still there");
        let report: Value = serde_json::from_slice(&inspected.body).unwrap();
        assert_eq!(report["complete"], true);
        assert_eq!(node.node.index.object_count(), 1);
        node.stop().await;
    }
}

/// The peering API's error paths: 403 for origins it may not fetch, 404 for content it may not
/// store and unknown paths, 413 for oversized announcements, 400 for piece ranges out of bounds,
/// and the periodic sweep that drops announcements nobody touches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peering_api_refuses_what_it_must_and_sweeps_what_expires() {
    let (origin, _held, node) = scene(|config, _| {
        config.server.header_read_timeout = Duration::from_secs(2);
        config.peering.announce_ttl = Duration::from_secs(1);
        config.peering.max_peers_returned = 2;
    })
    .await;
    origin.put_with(
        "/private.bin",
        pattern_bytes(10_000, 50),
        Behaviour {
            headers: vec![("cache-control", "no-store".into())],
            ..Behaviour::default()
        },
    );
    let manifest = |url: &str| {
        let encoded: String = form_urlencoded::byte_serialize(url.as_bytes()).collect();
        get_request(&format!("/_outpost/v1/manifest?url={encoded}"))
    };
    let json_of = |answer: &RawAnswer| -> Value { serde_json::from_slice(&answer.body).unwrap() };

    for (url, status) in [
        ("http://evil.example/x".to_owned(), 403),
        (format!("http://{ORIGIN_HOST}:8080/x"), 403),
        (format!("http://{ORIGIN_HOST}/private.bin"), 404),
        ("/relative".to_owned(), 400),
    ] {
        let answer = raw_exchange("127.0.0.1", node.addr, &manifest(&url)).await;
        assert_eq!(answer.status, status, "{url}: {}", answer.text());
        assert!(json_of(&answer)["error"].is_string(), "{url}");
    }
    assert_eq!(
        origin
            .requests()
            .iter()
            .map(|r| r.path.as_str())
            .collect::<Vec<_>>(),
        ["/private.bin"],
        "only the allowed origin was asked, once"
    );
    let unknown = raw_exchange(
        "127.0.0.1",
        node.addr,
        &get_request("/_outpost/v2/manifest"),
    )
    .await;
    assert_eq!(unknown.status, 404);

    let announce = "/_outpost/v1/announce";
    let content_id = "cd".repeat(32);
    let oversized = json!({"content_id": content_id, "port": 7680, "group_id": "g",
                           "padding": "x".repeat(17 << 10)});
    let too_large = raw_exchange(
        "127.0.0.2",
        node.addr,
        &post(announce, &oversized.to_string()),
    )
    .await;
    assert_eq!(too_large.status, 413, "{}", too_large.text());
    let scattered: Vec<[u32; 2]> = (0..=cache_node::peering::tracker::MAX_PIECE_RANGES as u32)
        .map(|n| [n * 2, n * 2])
        .collect();
    for bad in [
        json!({"content_id": content_id, "port": 7680, "pieces": scattered}),
        json!({"content_id": content_id, "port": 7680, "pieces": [[0.5, 3]]}),
        json!({"content_id": content_id, "port": 7680, "pieces": [[-1, 3]]}),
        json!({"content_id": content_id, "port": 7680, "pieces": [[9, 3]]}),
        json!({"content_id": content_id, "port": 70000, "complete": true}),
        json!({"content_id": content_id, "port": 7680, "complete": true, "group_id": "g".repeat(129)}),
    ] {
        let answer = raw_exchange("127.0.0.2", node.addr, &post(announce, &bad.to_string())).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.text());
        assert!(json_of(&answer)["error"].is_string());
    }
    // A body that stops short is not waited for longer than headers are.
    let mut trickle = connect_from("127.0.0.2", node.addr).await;
    let started = Instant::now();
    trickle
        .write_all(
            format!("POST {announce} HTTP/1.1\r\nHost: cache\r\nContent-Length: 100\r\n\r\n{{\"content_id\"")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, trickle.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let tracker = &node.node.peering.as_ref().unwrap().tracker;
    assert_eq!(tracker.counts(), (0, 0), "nothing refused was recorded");

    // Three peers, and `limit` is capped by max_peers_returned.
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let answer = raw_exchange(source, node.addr, &post(announce, &holding(&content_id))).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let listed = raw_exchange(
        "127.0.0.9",
        node.addr,
        &get_request(&format!(
            "/_outpost/v1/peers?content_id={content_id}&mode=3&limit=1000"
        )),
    )
    .await;
    assert_eq!(json_of(&listed)["peers"].as_array().unwrap().len(), 2);
    assert_eq!(tracker.counts(), (1, 3));
    // Nobody renews or asks again: the periodic sweep drops them all.
    eventually(
        "the sweep dropped the expired announcements",
        PATIENCE,
        || tracker.counts() == (0, 0),
    )
    .await;
    node.stop().await;
}
