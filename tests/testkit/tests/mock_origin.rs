//! Loopback tests of [`MockOrigin`]: range replies, `If-Range`, every [`Behaviour`] knob, byte fetch
//! accounting and shutdown. Requests are made with hyper's low-level HTTP/1.1 client, which reports
//! incomplete bodies as errors, and with a raw `TcpStream` where the exact bytes on the wire matter,
//! such as how many body bytes arrive before a deliberate abort.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use outpost_testkit::origin::{etag_for_content, MOCK_LAST_MODIFIED};
use outpost_testkit::{pattern_bytes, Behaviour, MockOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as seen by the hyper client; `body` is an error when the message was cut short.
struct ClientResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, hyper::Error>,
}

impl ClientResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("test headers are ASCII"))
    }

    fn complete_body(&self) -> &Bytes {
        self.body
            .as_ref()
            .expect("the body should have arrived completely")
    }
}

/// Opens one kept-alive HTTP/1.1 client connection to the origin.
async fn connect_client(origin: &MockOrigin) -> Result<SendRequest<Empty<Bytes>>, hyper::Error> {
    let stream = TcpStream::connect(origin.addr())
        .await
        .expect("connecting to the mock origin");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection driver ends on its own when the sender is dropped or the server hangs up;
    // its error, if any, is also reported through the response, where the tests look for it.
    tokio::spawn(connection);
    Ok(sender)
}

async fn send_on(
    sender: &mut SendRequest<Empty<Bytes>>,
    origin: &MockOrigin,
    method: Method,
    path_and_query: &str,
    extra_headers: &[(&str, &str)],
) -> Result<ClientResponse, hyper::Error> {
    let mut request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("host", origin.addr().to_string());
    for (name, value) in extra_headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes());
    Ok(ClientResponse {
        status,
        headers,
        body,
    })
}

/// Sends one request on a fresh connection and panics if no response head arrives.
async fn send(
    origin: &MockOrigin,
    method: Method,
    path_and_query: &str,
    extra_headers: &[(&str, &str)],
) -> ClientResponse {
    let mut sender = connect_client(origin).await.expect("client handshake");
    send_on(&mut sender, origin, method, path_and_query, extra_headers)
        .await
        .expect("a response head from the mock origin")
}

async fn get(origin: &MockOrigin, path: &str, extra_headers: &[(&str, &str)]) -> ClientResponse {
    send(origin, Method::GET, path, extra_headers).await
}

/// What a raw client read from the socket until the server closed it.
struct RawExchange {
    head: String,
    body: Vec<u8>,
}

impl RawExchange {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (header_name, value) = line.split_once(':')?;
            header_name
                .trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }
}

/// Sends a GET asking the server to close afterwards and reads everything until the server closes
/// the connection, so that tests see exactly the bytes that were put on the wire.
async fn raw_get(origin: &MockOrigin, path: &str, extra_header_lines: &str) -> RawExchange {
    let mut stream = TcpStream::connect(origin.addr())
        .await
        .expect("connecting to the mock origin");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{extra_header_lines}\r\n",
        origin.addr()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("writing the request");
    let mut received = Vec::new();
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        // A reset after an abort ends the exchange just as a clean close does; what matters to
        // the tests is the bytes that made it across before.
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read_length) => received.extend_from_slice(&buffer[..read_length]),
        }
    }
    let head_end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a complete response head");
    RawExchange {
        head: String::from_utf8(received[..head_end].to_vec()).expect("an ASCII head"),
        body: received[head_end + 4..].to_vec(),
    }
}

#[tokio::test]
async fn full_get_serves_the_object_with_validators_and_records_the_request() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(100_000, 1);
    origin.put("/files/a.bin", content.clone());

    let response = get(&origin, "/files/a.bin?version=3", &[("x-test", "yes")]).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.complete_body(), &content);
    assert_eq!(response.header("content-length"), Some("100000"));
    assert_eq!(response.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        response.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(response.header("last-modified"), Some(MOCK_LAST_MODIFIED));
    let etag = response.header("etag").expect("an ETag").to_owned();
    assert_eq!(etag.len(), 18, "16 hex digits in quotes: {etag}");
    assert_eq!(etag, etag_for_content(&content));
    assert_eq!(origin.etag("/files/a.bin"), Some(etag));

    let requests = origin.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(origin.request_count(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.path, "/files/a.bin");
    assert_eq!(request.query.as_deref(), Some("version=3"));
    assert_eq!(request.host, Some(origin.addr().to_string()));
    assert_eq!(request.range, None);
    assert_eq!(request.if_range, None);
    assert_eq!(request.header("X-Test"), Some("yes"));

    assert_eq!(origin.bytes_sent(), 100_000);
    assert!(origin
        .byte_fetch_counts("/files/a.bin")
        .iter()
        .all(|count| *count == 1));
    assert_eq!(origin.max_fetches_of_any_byte("/files/a.bin"), 1);
    assert_eq!(origin.min_fetches_of_any_byte("/files/a.bin"), 1);
    assert_eq!(origin.base_url(), format!("http://{}", origin.addr()));
}

#[tokio::test]
async fn single_ranges_get_206_with_content_range() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(1000, 2);
    origin.put("/r", content.clone());

    let cases: [(&str, usize, usize); 5] = [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=900-5000", 900, 999),
        ("bytes=-5000", 0, 999),
    ];
    for (range, first, last) in cases {
        let response = get(&origin, "/r", &[("range", range)]).await;
        assert_eq!(response.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            response.header("content-range"),
            Some(format!("bytes {first}-{last}/1000").as_str()),
            "{range}"
        );
        assert_eq!(
            response.header("content-length"),
            Some((last - first + 1).to_string().as_str())
        );
        assert_eq!(response.complete_body(), &content.slice(first..=last));
    }
    assert_eq!(
        origin.requests()[0].range.as_deref(),
        Some("bytes=10-19"),
        "the Range header is recorded"
    );

    // Only the requested bytes are counted: 10..20 once, and the overlapping tails several times.
    let counts = origin.byte_fetch_counts("/r");
    assert_eq!(counts.len(), 1000);
    assert_eq!(counts[9], 1, "covered only by bytes=-5000");
    assert_eq!(counts[10], 2);
    assert_eq!(counts[899], 1);
    assert_eq!(counts[900], 2);
    assert_eq!(counts[990], 3);
    assert_eq!(counts[999], 4);
    assert_eq!(origin.max_fetches_of_any_byte("/r"), 4);
}

#[tokio::test]
async fn unsatisfiable_empty_and_multiple_ranges() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(1000, 3);
    origin.put("/r", content.clone());
    origin.put("/empty", Bytes::new());

    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let response = get(&origin, "/r", &[("range", range)]).await;
        assert_eq!(
            response.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{range}"
        );
        assert_eq!(response.header("content-range"), Some("bytes */1000"));
        assert!(response.complete_body().is_empty());
    }

    for range in ["bytes=0-", "bytes=-1", "bytes=0-0"] {
        let response = get(&origin, "/empty", &[("range", range)]).await;
        assert_eq!(
            response.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "{range}"
        );
        assert_eq!(response.header("content-range"), Some("bytes */0"));
    }
    let response = get(&origin, "/empty", &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-length"), Some("0"));
    assert!(response.complete_body().is_empty());
    assert_eq!(origin.max_fetches_of_any_byte("/empty"), 0);
    assert!(origin.byte_fetch_counts("/empty").is_empty());

    // Multiple ranges and malformed ranges are ignored in favour of the whole object.
    for range in ["bytes=0-1,5-6", "bytes=9-2", "lines=1-2"] {
        let response = get(&origin, "/r", &[("range", range)]).await;
        assert_eq!(response.status, StatusCode::OK, "{range}");
        assert_eq!(response.complete_body(), &content);
    }
    assert_eq!(origin.bytes_sent(), 3 * 1000);
}

#[tokio::test]
async fn if_range_keeps_the_range_only_for_the_current_validator() {
    let origin = MockOrigin::start().await;
    let old_content = pattern_bytes(500, 4);
    let new_content = pattern_bytes(600, 5);
    origin.put("/v", old_content.clone());
    let old_etag = origin.etag("/v").expect("an ETag");

    let matching = get(
        &origin,
        "/v",
        &[("range", "bytes=0-9"), ("if-range", &old_etag)],
    )
    .await;
    assert_eq!(matching.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(matching.complete_body(), &old_content.slice(0..10));

    let by_date = get(
        &origin,
        "/v",
        &[("range", "bytes=0-9"), ("if-range", MOCK_LAST_MODIFIED)],
    )
    .await;
    assert_eq!(by_date.status, StatusCode::PARTIAL_CONTENT);

    let weak = format!("W/{old_etag}");
    let weak_response = get(
        &origin,
        "/v",
        &[("range", "bytes=0-9"), ("if-range", &weak)],
    )
    .await;
    assert_eq!(weak_response.status, StatusCode::OK);

    origin.put("/v", new_content.clone());
    let changed = get(
        &origin,
        "/v",
        &[("range", "bytes=0-9"), ("if-range", &old_etag)],
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.complete_body(), &new_content);
    assert_ne!(changed.header("etag"), Some(old_etag.as_str()));
    assert_eq!(
        origin.requests().last().and_then(|r| r.if_range.clone()),
        Some(old_etag)
    );
    // Replacing the object restarted its counts, sized to the new content.
    assert_eq!(origin.byte_fetch_counts("/v"), vec![1; 600]);
}

#[tokio::test]
async fn head_sends_headers_without_a_body_and_counts_nothing() {
    let origin = MockOrigin::start().await;
    origin.put("/h", pattern_bytes(4096, 6));

    let full = send(&origin, Method::HEAD, "/h", &[]).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.header("content-length"), Some("4096"));
    assert!(full.header("etag").is_some());
    assert!(full.complete_body().is_empty());

    let partial = send(&origin, Method::HEAD, "/h", &[("range", "bytes=100-199")]).await;
    assert_eq!(partial.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.header("content-range"), Some("bytes 100-199/4096"));
    assert_eq!(partial.header("content-length"), Some("100"));

    assert_eq!(origin.bytes_sent(), 0);
    assert_eq!(origin.max_fetches_of_any_byte("/h"), 0);
    assert_eq!(origin.requests()[0].method, "HEAD");
}

#[tokio::test]
async fn other_methods_are_described_and_unknown_paths_are_refused() {
    let origin = MockOrigin::start().await;
    origin.put("/present", pattern_bytes(10, 7));

    // Other methods are answered (the node relays them): a POST is described, not stored.
    let post = send(&origin, Method::POST, "/present", &[]).await;
    assert_eq!(post.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(post.complete_body()).contains("POST of 0 bytes"));
    assert_eq!(
        get(&origin, "/present", &[]).await.complete_body().len(),
        10
    );

    let missing = get(&origin, "/absent", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    origin.remove("/present");
    let removed = get(&origin, "/present", &[]).await;
    assert_eq!(removed.status, StatusCode::NOT_FOUND);
    assert_eq!(origin.request_count(), 4);
}

#[tokio::test]
async fn ignore_range_always_sends_the_whole_object() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(2000, 8);
    origin.put_with(
        "/i",
        content.clone(),
        Behaviour {
            ignore_range: true,
            ..Behaviour::default()
        },
    );

    let response = get(&origin, "/i", &[("range", "bytes=100-199")]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-range"), None);
    assert_eq!(response.complete_body(), &content);
    assert_eq!(origin.byte_fetch_counts("/i"), vec![1; 2000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_bytes_delivers_exactly_the_limit_then_aborts() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(1 << 20, 9);
    origin.put_with(
        "/d",
        content.clone(),
        Behaviour {
            drop_after_bytes: Some(300_000),
            ..Behaviour::default()
        },
    );

    let exchange = raw_get(&origin, "/d", "").await;
    assert!(
        exchange.head.starts_with("HTTP/1.1 200"),
        "{}",
        exchange.head
    );
    assert_eq!(
        exchange.header("content-length").as_deref(),
        Some("1048576")
    );
    assert_eq!(exchange.body.len(), 300_000);
    assert_eq!(exchange.body, content.slice(..300_000));

    let counts = origin.byte_fetch_counts("/d");
    assert!(counts[..300_000].iter().all(|count| *count == 1));
    assert!(counts[300_000..].iter().all(|count| *count == 0));
    assert_eq!(origin.bytes_sent(), 300_000);

    // A range response is cut after the same number of its own body bytes.
    let partial = raw_get(&origin, "/d", "Range: bytes=500000-\r\n").await;
    assert!(partial.head.starts_with("HTTP/1.1 206"), "{}", partial.head);
    assert_eq!(partial.body, content.slice(500_000..800_000));
    assert_eq!(
        origin.fetch_count_segments("/d"),
        vec![
            (0..300_000, 1),
            (300_000..500_000, 0),
            (500_000..800_000, 1),
            (800_000..1 << 20, 0)
        ]
    );

    // A real HTTP client sees an error rather than a clean end of the body.
    let response = get(&origin, "/d", &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.body.is_err(), "the body must be incomplete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_bytes_cuts_inside_a_chunk_and_works_with_chunked_framing() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(100_000, 10);
    origin.put_with(
        "/c",
        content.clone(),
        Behaviour {
            drop_after_bytes: Some(45_500),
            chunk_size: Some(10_000),
            ..Behaviour::default()
        },
    );
    let exchange = raw_get(&origin, "/c", "").await;
    assert_eq!(exchange.body, content.slice(..45_500));
    assert_eq!(origin.min_fetches_of_any_byte("/c"), 0);
    assert_eq!(
        origin.fetch_count_segments("/c"),
        vec![(0..45_500, 1), (45_500..100_000, 0)]
    );

    origin.put_with(
        "/c",
        content.clone(),
        Behaviour {
            drop_after_bytes: Some(45_500),
            chunked: true,
            ..Behaviour::default()
        },
    );
    let response = get(&origin, "/c", &[]).await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(response.body.is_err(), "no terminating chunk was sent");

    // A limit of zero still sends the response head before hanging up.
    origin.put_with(
        "/c",
        content,
        Behaviour {
            drop_after_bytes: Some(0),
            ..Behaviour::default()
        },
    );
    let exchange = raw_get(&origin, "/c", "").await;
    assert!(
        exchange.head.starts_with("HTTP/1.1 200"),
        "{}",
        exchange.head
    );
    assert!(exchange.body.is_empty());
}

#[tokio::test]
async fn drop_after_bytes_at_or_beyond_the_body_length_changes_nothing() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(1000, 11);
    origin.put_with(
        "/n",
        content.clone(),
        Behaviour {
            drop_after_bytes: Some(1000),
            ..Behaviour::default()
        },
    );
    assert_eq!(get(&origin, "/n", &[]).await.complete_body(), &content);
    let tail = get(&origin, "/n", &[("range", "bytes=900-")]).await;
    assert_eq!(tail.complete_body(), &content.slice(900..));
}

#[tokio::test]
async fn lie_total_len_declares_a_wrong_length() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(1000, 12);
    origin.put_with(
        "/long-lie",
        content.clone(),
        Behaviour {
            lie_total_len: Some(5000),
            ..Behaviour::default()
        },
    );

    // Declaring more than exists: the real bytes arrive and then the connection is cut.
    let exchange = raw_get(&origin, "/long-lie", "").await;
    assert_eq!(exchange.header("content-length").as_deref(), Some("5000"));
    assert_eq!(exchange.body, content);
    let response = get(&origin, "/long-lie", &[]).await;
    assert!(response.body.is_err());

    // A range is resolved against the real bytes; only the total in Content-Range lies.
    let partial = get(&origin, "/long-lie", &[("range", "bytes=0-9")]).await;
    assert_eq!(partial.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.header("content-range"), Some("bytes 0-9/5000"));
    assert_eq!(partial.complete_body(), &content.slice(0..10));
    let beyond = get(&origin, "/long-lie", &[("range", "bytes=2000-")]).await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.header("content-range"), Some("bytes */5000"));

    // Declaring less than exists: only the declared bytes are sent and counted, and the framing
    // stays intact, so the kept-alive connection serves the next request correctly.
    origin.put_with(
        "/short-lie",
        content.clone(),
        Behaviour {
            lie_total_len: Some(400),
            ..Behaviour::default()
        },
    );
    let mut sender = connect_client(&origin).await.expect("client handshake");
    for _ in 0..2 {
        let response = send_on(&mut sender, &origin, Method::GET, "/short-lie", &[])
            .await
            .expect("a response");
        assert_eq!(response.header("content-length"), Some("400"));
        assert_eq!(response.complete_body(), &content.slice(..400));
    }
    assert_eq!(
        origin.fetch_count_segments("/short-lie"),
        vec![(0..400, 2), (400..1000, 0)]
    );
}

#[tokio::test]
async fn chunked_sends_transfer_encoding_chunked_without_content_length() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(200_000, 13);
    origin.put_with(
        "/chunked",
        content.clone(),
        Behaviour {
            chunked: true,
            chunk_size: Some(50_000),
            ..Behaviour::default()
        },
    );

    let exchange = raw_get(&origin, "/chunked", "").await;
    assert_eq!(
        exchange.header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(exchange.header("content-length"), None);

    let response = get(&origin, "/chunked", &[]).await;
    assert_eq!(response.complete_body(), &content);

    // Ranges still get a Content-Length.
    let partial = get(&origin, "/chunked", &[("range", "bytes=0-99")]).await;
    assert_eq!(partial.header("content-length"), Some("100"));
    assert_eq!(partial.header("transfer-encoding"), None);
}

#[tokio::test]
async fn status_override_answers_with_the_status_and_a_short_body() {
    let origin = MockOrigin::start().await;
    origin.put_with(
        "/broken",
        pattern_bytes(1000, 14),
        Behaviour {
            status_override: Some(503),
            ..Behaviour::default()
        },
    );

    let response = get(&origin, "/broken", &[("range", "bytes=0-9")]).await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = response.complete_body();
    assert!(!body.is_empty() && body.len() < 100);
    assert_eq!(response.header("etag"), None);
    assert_eq!(origin.max_fetches_of_any_byte("/broken"), 0);
    assert_eq!(origin.bytes_sent(), body.len() as u64);

    // Restoring a normal behaviour keeps the content and its ETag.
    let etag = origin.etag("/broken");
    assert!(origin.set_behaviour("/broken", Behaviour::default()));
    assert_eq!(get(&origin, "/broken", &[]).await.status, StatusCode::OK);
    assert_eq!(origin.etag("/broken"), etag);
    assert!(!origin.set_behaviour("/absent", Behaviour::default()));
}

#[tokio::test]
async fn header_delay_and_chunk_delay_slow_the_response_down() {
    let origin = MockOrigin::start().await;
    origin.put_with(
        "/slow-head",
        pattern_bytes(10, 15),
        Behaviour {
            header_delay: Some(Duration::from_millis(300)),
            ..Behaviour::default()
        },
    );
    origin.put_with(
        "/slow-body",
        pattern_bytes(4000, 16),
        Behaviour {
            chunk_delay: Some(Duration::from_millis(100)),
            chunk_size: Some(1000),
            ..Behaviour::default()
        },
    );

    // Only lower bounds are asserted: a loaded machine may be slower, never faster.
    let started = Instant::now();
    let response = get(&origin, "/slow-head", &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Four chunks have three gaps between them.
    let started = Instant::now();
    let response = get(&origin, "/slow-body", &[]).await;
    assert_eq!(response.complete_body().len(), 4000);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(origin.byte_fetch_counts("/slow-body"), vec![1; 4000]);
}

#[tokio::test]
async fn counters_reset_and_concurrent_fetches_are_counted() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(300_000, 17);
    origin.put("/shared", content.clone());

    let (first, second) = tokio::join!(get(&origin, "/shared", &[]), get(&origin, "/shared", &[]));
    assert_eq!(first.complete_body(), &content);
    assert_eq!(second.complete_body(), &content);
    assert_eq!(origin.max_fetches_of_any_byte("/shared"), 2);
    assert_eq!(origin.min_fetches_of_any_byte("/shared"), 2);
    assert_eq!(origin.bytes_sent(), 600_000);
    assert_eq!(origin.request_count(), 2);

    origin.reset_counters();
    assert_eq!(origin.request_count(), 0);
    assert_eq!(origin.bytes_sent(), 0);
    assert_eq!(origin.max_fetches_of_any_byte("/shared"), 0);
    assert_eq!(origin.byte_fetch_counts("/shared").len(), 300_000);

    // Several requests on one kept-alive connection are recorded in order.
    let mut sender = connect_client(&origin).await.expect("client handshake");
    for path in ["/shared?one", "/shared?two", "/missing"] {
        send_on(&mut sender, &origin, Method::GET, path, &[])
            .await
            .expect("a response");
    }
    let queries: Vec<Option<String>> = origin.requests().into_iter().map(|r| r.query).collect();
    assert_eq!(
        queries,
        vec![Some("one".to_owned()), Some("two".to_owned()), None]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_aborts_responses_in_flight_and_refuses_new_requests() {
    let origin = MockOrigin::start().await;
    // Throttled so that the body would take about a minute, which keeps it in flight for sure.
    origin.put_with(
        "/stream",
        pattern_bytes(1 << 20, 18),
        Behaviour {
            chunk_delay: Some(Duration::from_millis(50)),
            chunk_size: Some(1024),
            ..Behaviour::default()
        },
    );

    let mut sender = connect_client(&origin).await.expect("client handshake");
    let request = Request::get("/stream")
        .header("host", origin.addr().to_string())
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("a response head");
    assert_eq!(response.status(), StatusCode::OK);

    origin.shutdown();
    assert!(
        response.into_body().collect().await.is_err(),
        "the body in flight must end abruptly"
    );

    // A new request either cannot connect or is never answered.
    let new_request_outcome = async {
        let mut sender = connect_client(&origin).await?;
        send_on(&mut sender, &origin, Method::GET, "/stream", &[]).await
    };
    let refused = match TcpStream::connect(origin.addr()).await {
        Err(_) => true,
        Ok(_) => new_request_outcome.await.is_err(),
    };
    assert!(refused, "no request may be answered after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_stream_intact_and_are_counted_once() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(64 << 20, 19);
    origin.put("/big", content.clone());

    let response = get(&origin, "/big", &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    let body = response.complete_body();
    assert_eq!(body.len(), content.len());
    assert!(body == &content, "the 64 MiB body must arrive unchanged");
    assert_eq!(origin.max_fetches_of_any_byte("/big"), 1);
    assert_eq!(origin.min_fetches_of_any_byte("/big"), 1);
    assert_eq!(origin.fetch_count_segments("/big"), vec![(0..64 << 20, 1)]);
    assert_eq!(origin.bytes_sent(), 64 << 20);
}

#[tokio::test]
async fn validators_can_be_left_out_and_206s_can_lie_about_offsets_and_length() {
    let origin = MockOrigin::start().await;
    let content = pattern_bytes(10_000, 19);
    let knobs = [
        (
            "/bare",
            Behaviour {
                omit_validators: true,
                ..Behaviour::default()
            },
        ),
        (
            "/shifted",
            Behaviour {
                shift_range: Some(100),
                ..Behaviour::default()
            },
        ),
        (
            "/short",
            Behaviour {
                content_length_delta: Some(-10),
                ..Behaviour::default()
            },
        ),
    ];
    for (path, behaviour) in knobs {
        origin.put_with(path, content.clone(), behaviour);
    }

    let bare = get(&origin, "/bare", &[("range", "bytes=0-99")]).await;
    assert_eq!(bare.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bare.header("etag"), None);
    assert_eq!(bare.header("last-modified"), None);
    assert_eq!(bare.complete_body(), &content[..100]);
    // Without validators no If-Range can match: the whole object comes back.
    let etag = etag_for_content(&content);
    let bare = get(
        &origin,
        "/bare",
        &[("range", "bytes=0-99"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(bare.status, StatusCode::OK);
    assert_eq!(bare.complete_body(), &content);

    let shifted = get(&origin, "/shifted", &[("range", "bytes=1000-1999")]).await;
    assert_eq!(
        shifted.header("content-range"),
        Some("bytes 1100-2099/10000")
    );
    assert_eq!(shifted.complete_body(), &content[1100..2100]);

    let short = get(&origin, "/short", &[("range", "bytes=1000-1999")]).await;
    assert_eq!(short.header("content-range"), Some("bytes 1000-1999/10000"));
    assert_eq!(short.header("content-length"), Some("990"));
    assert_eq!(short.complete_body(), &content[1000..1990]);
}
