//! End-to-end: prefill jobs on the admin listener. A listed object is stored whole with no
//! client asking, and the next client gets a HIT; a URL the origin lacks or the allowlist
//! refuses fails with its reason; a job can be cancelled; the shared bandwidth cap holds as a
//! rate (within 15 %); the token is required; a client's cold miss and hit keep their time to
//! first byte while a prefill holds every fill slot.
//!
//! `cache-node prefill`, the real binary against a node in this process: every URL stored and
//! exit 0 (then a HIT); a failing URL listed with its reason and exit 1; a wrong token explained
//! and exit 2; `--detach` back at once with the job id. A `[[prefill.schedule]]` whose window
//! contains now fills its file's objects with no client and no job submitted.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use outpost_testkit::{eventually_async, pattern_bytes, Behaviour};

const TOKEN: &str = "test-token";

async fn submit(node: &TestNode, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = client()
        .post(format!("http://{}/prefill", node.admin_addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

/// The JSON document of `GET <path>` on the admin listener.
async fn admin_document(node: &TestNode, path: &str) -> serde_json::Value {
    let bytes = client()
        .get(format!("http://{}{path}", node.admin_addr))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// `GET /prefill/<id>`: one job.
async fn job(node: &TestNode, id: u64) -> serde_json::Value {
    admin_document(node, &format!("/prefill/{id}")).await
}

/// `GET /prefill`: every job.
async fn jobs(node: &TestNode) -> serde_json::Value {
    admin_document(node, "/prefill").await
}

/// Puts `content` at `path`, served in 16 KiB chunks 50 ms apart (about 320 KB/s), so a job
/// on it is still running seconds later.
fn put_slow(origin: &outpost_testkit::MockOrigin, path: &str, content: bytes::Bytes) {
    origin.put_with(
        path,
        content,
        Behaviour {
            chunk_delay: Some(Duration::from_millis(50)),
            chunk_size: Some(16 * 1024),
            ..Behaviour::default()
        },
    );
}

/// The first client's request for `path` is a HIT with `content`, with no origin request.
async fn assert_first_client_hits(
    node: &TestNode,
    origin: &outpost_testkit::MockOrigin,
    path: &str,
    content: &[u8],
) {
    let asked = origin.request_count();
    let first_client = get(&node.mcc_url(path), &[]).await;
    assert_eq!(
        first_client.header("x-cache").as_deref(),
        Some("HIT"),
        "{path}"
    );
    assert_eq!(first_client.bytes(), content);
    assert_eq!(
        origin.request_count(),
        asked,
        "no origin request for the first client of {path}"
    );
}

async fn until_ended(node: &TestNode, id: u64) -> serde_json::Value {
    eventually_async("the job ends", Duration::from_secs(30), async || {
        let job = job(node, id).await;
        (job["state"] != "running").then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefilled_object_is_a_hit_for_the_first_client_and_failures_say_why() {
    let (origin, _storage, node) = origin_and_node().await;
    let content = pattern_bytes(1_000_000, 31);
    origin.put("/patch/kb1.msu", content.clone());
    let (status, submitted) = submit(
        &node,
        serde_json::json!([
            format!("http://{ORIGIN_HOST}/patch/kb1.msu"),
            format!("http://{ORIGIN_HOST}/patch/absent.msu"),
            "http://not-allowed.example/file",
        ]),
    )
    .await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_u64().unwrap();
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "done", "{ended}");
    assert_eq!(ended["done"], 1);
    assert_eq!(ended["failed"], 2);
    let urls = ended["urls"].as_array().unwrap();
    assert_eq!(urls[0]["state"], "done");
    assert_eq!(urls[0]["length"], 1_000_000);
    assert_eq!(urls[1]["state"], "failed");
    assert!(
        urls[1]["reason"].as_str().unwrap().contains("404"),
        "{ended}"
    );
    assert_eq!(urls[2]["state"], "failed");
    assert!(!urls[2]["reason"].as_str().unwrap().is_empty());

    let stats = node.stats().await;
    assert_eq!(stat(&stats, "prefill_bytes"), 1_000_000);
    assert_eq!(stat(&stats, "miss_bytes"), 0, "a prefill is no client miss");
    assert_first_client_hits(&node, &origin, "/patch/kb1.msu", &content).await;

    // The list shows the job; a job needs the token.
    let list = jobs(&node).await;
    assert_eq!(list["jobs"][0]["id"], id);
    let anonymous = client()
        .post(format!("http://{}/prefill", node.admin_addr))
        .body("http://dl.delivery.mp.microsoft.com/x")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_stops_and_says_so() {
    let (origin, _storage, node) = origin_and_node().await;
    put_slow(&origin, "/slow.bin", pattern_bytes(4_000_000, 32));
    let (_, submitted) = submit(
        &node,
        serde_json::json!([format!("http://{ORIGIN_HOST}/slow.bin")]),
    )
    .await;
    let id = submitted["id"].as_u64().unwrap();
    eventually_async(
        "the object is filling",
        Duration::from_secs(10),
        async || job(&node, id).await["urls"][0]["state"] == "filling",
    )
    .await;
    let cancelled = client()
        .delete(format!("http://{}/prefill/{id}", node.admin_addr))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "cancelled");
    eventually_async(
        "the URL is cancelled",
        Duration::from_secs(10),
        async || job(&node, id).await["urls"][0]["state"] == "cancelled",
    )
    .await;
    // Its fill stops: the origin stops being read well before the 4 MB.
    let bytes_then = stat(&node.stats().await, "prefill_bytes");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let bytes_later = stat(&node.stats().await, "prefill_bytes");
    assert!(
        bytes_later - bytes_then < 200_000,
        "the fill stopped: {bytes_then} then {bytes_later}"
    );
    assert!(bytes_later < 4_000_000);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_bandwidth_cap_holds_as_a_rate() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        // 2,000,000 bytes per second.
        config.prefill.max_bandwidth = "16Mbit".into();
        config
    })
    .await;
    let length = 8 * 1024 * 1024;
    origin.put("/big.bin", pattern_bytes(length, 33));
    let started = Instant::now();
    let (_, submitted) = submit(
        &node,
        serde_json::json!([format!("http://{ORIGIN_HOST}/big.bin")]),
    )
    .await;
    let id = submitted["id"].as_u64().unwrap();
    // The rate over the middle of the transfer: bytes counted between two readings.
    let (first_bytes, first_at) =
        eventually_async("a megabyte in", Duration::from_secs(20), async || {
            let bytes = stat(&node.stats().await, "prefill_bytes");
            (bytes >= 1 << 20).then(|| (bytes, Instant::now()))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second_bytes = stat(&node.stats().await, "prefill_bytes");
    let rate = (second_bytes - first_bytes) as f64 / first_at.elapsed().as_secs_f64();
    println!("prefill rate {rate:.0} B/s against a cap of 2,000,000 B/s");
    assert!(
        (1_700_000.0..=2_300_000.0).contains(&rate),
        "rate {rate:.0} B/s is not within 15 % of 2,000,000"
    );
    let ended = until_ended(&node, id).await;
    assert_eq!(ended["state"], "done");
    let whole = started.elapsed().as_secs_f64();
    assert!(whole >= length as f64 / 2_300_000.0, "{whole} s");
    node.stop().await;
}

/// Runs `cache-node prefill` against `node` with `arguments` after the admin URL, `stdin` as
/// its standard input and `OUTPOST_ADMIN_TOKEN` set to `environment_token` (if any).
async fn prefill_command(
    node: &TestNode,
    arguments: &[&str],
    stdin: &str,
    environment_token: Option<&str>,
) -> Output {
    prefill_command_at(node.admin_addr, arguments, stdin, environment_token).await
}

/// [`prefill_command`] against the admin listener at `admin_addr`.
async fn prefill_command_at(
    admin_addr: std::net::SocketAddr,
    arguments: &[&str],
    stdin: &str,
    environment_token: Option<&str>,
) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cache-node"));
    command
        .arg("prefill")
        .arg("--admin")
        .arg(format!("http://{admin_addr}"))
        .args(arguments)
        .env_remove("OUTPOST_ADMIN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(token) = environment_token {
        command.env("OUTPOST_ADMIN_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    // A command that fails before reading its input (no token) has closed the pipe: not an error.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("cache-node prefill ends within 60 s")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_command_stores_every_url_and_exits_0() {
    let (origin, _storage, node) = origin_and_node().await;
    let first = pattern_bytes(700_000, 41);
    let second = pattern_bytes(150_000, 42);
    origin.put("/patch/kb1.msu", first.clone());
    origin.put("/patch/kb2.msu", second.clone());
    // The URL list on stdin, the token from the environment.
    let list = format!(
        "# Patch Tuesday\nhttp://{ORIGIN_HOST}/patch/kb1.msu\n\n{}\n",
        node.mcc_url("/patch/kb2.msu")
    );
    let output = prefill_command(&node, &["-"], &list, Some(TOKEN)).await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 URLs: 2 done, 0 failed"), "{stdout}");

    assert_first_client_hits(&node, &origin, "/patch/kb1.msu", &first).await;
    assert_first_client_hits(&node, &origin, "/patch/kb2.msu", &second).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_command_lists_each_failed_url_with_its_reason_and_exits_1() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put("/patch/kb1.msu", pattern_bytes(200_000, 43));
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let list = directory.path().join("urls.txt");
    std::fs::write(
        &list,
        format!(
            "http://{ORIGIN_HOST}/patch/kb1.msu\nhttp://{ORIGIN_HOST}/patch/absent.msu\nhttp://not-allowed.example/file\n"
        ),
    )
    .unwrap();
    let output = prefill_command(
        &node,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            list.to_str().unwrap(),
        ],
        "",
        None,
    )
    .await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 URLs: 1 done, 2 failed"), "{stdout}");
    let absent = stderr
        .lines()
        .find(|line| line.starts_with(&format!("failed: http://{ORIGIN_HOST}/patch/absent.msu: ")))
        .unwrap_or_else(|| panic!("the 404 is listed: {stderr}"));
    assert!(absent.contains("404"), "{absent}");
    assert!(
        stderr
            .lines()
            .any(|line| line.starts_with("failed: http://not-allowed.example/file: ")),
        "the refused origin is listed: {stderr}"
    );
    assert!(
        !stderr.contains("kb1.msu:"),
        "the stored one is not: {stderr}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_command_explains_a_wrong_token_and_an_unreachable_node_and_exits_2() {
    let (origin, _storage, node) = origin_and_node().await;
    origin.put("/a.bin", pattern_bytes(1000, 44));
    let list = format!("http://{ORIGIN_HOST}/a.bin\n");
    let wrong = prefill_command(&node, &["--token", "wrong", "-"], &list, None).await;
    let stderr = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("admin.token"),
        "{stderr}"
    );

    let without = prefill_command(&node, &["-"], &list, None).await;
    let stderr = text(&without.stderr);
    assert_eq!(without.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("OUTPOST_ADMIN_TOKEN"), "{stderr}");

    let listed = jobs(&node).await;
    assert_eq!(listed["jobs"], serde_json::json!([]), "no job was started");
    let admin_addr = node.admin_addr;
    node.stop().await;

    // The node is gone: nobody listens on its admin port.
    let unreachable = prefill_command_at(admin_addr, &["-"], &list, Some(TOKEN)).await;
    let stderr = text(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot reach the admin listener"),
        "{stderr}"
    );
    // An empty list is refused before any connection.
    let empty = prefill_command_at(admin_addr, &["-"], "# nothing yet\n", Some(TOKEN)).await;
    assert_eq!(empty.status.code(), Some(2));
    assert!(text(&empty.stderr).contains("no URLs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_command_with_detach_returns_the_job_id_at_once() {
    let (origin, _storage, node) = origin_and_node().await;
    put_slow(&origin, "/slow.bin", pattern_bytes(2_000_000, 45));
    let list = format!("http://{ORIGIN_HOST}/slow.bin\n");
    let output = prefill_command(&node, &["--detach", "-"], &list, Some(TOKEN)).await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let id: u64 = stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the id: {stdout}"));
    // The object takes over 6 s at that pace; the command is back while the job runs.
    let running = job(&node, id).await;
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(running["origin"], "api");
    node.stop().await;
}

/// A window in UTC that contains now: from a minute ago to ten minutes on.
fn window_around_now() -> String {
    let minute_of_day = (cache_node::cache::store::unix_now() / 60) % 1440;
    let start = (minute_of_day + 1440 - 1) % 1440;
    let end = (minute_of_day + 10) % 1440;
    format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_prefill_inside_its_window_stores_the_listed_objects_with_no_client() {
    let origin = outpost_testkit::MockOrigin::start().await;
    let content = pattern_bytes(600_000, 46);
    origin.put("/patch/kb9.msu", content.clone());
    let storage = tempfile::tempdir().unwrap();
    let list = storage.path().join("patch-tuesday.txt");
    std::fs::write(&list, format!("http://{ORIGIN_HOST}/patch/kb9.msu\n")).unwrap();
    let mut config = usual_config(storage.path(), &origin.base_url());
    config.prefill.schedule = vec![cache_node::schedule::ScheduleConfig {
        urls: list.clone(),
        window: window_around_now(),
        days: Vec::new(),
    }];
    let node = TestNode::start(config).await;

    // No client asks and nobody submits: the schedule's job fills the object.
    let stored = eventually_async(
        "the scheduled job ends",
        Duration::from_secs(30),
        async || {
            let list = jobs(&node).await;
            let job = list["jobs"][0].clone();
            (job["state"] == "done").then_some(job)
        },
    )
    .await;
    assert_eq!(stored["origin"], "schedule 0", "{stored}");
    assert_eq!(stored["urls"][0]["state"], "done", "{stored}");
    let stats = node.stats().await;
    assert_eq!(stat(&stats, "prefill_bytes"), 600_000);
    assert_eq!(stat(&stats, "requests"), 0, "no client request");

    assert_first_client_hits(&node, &origin, "/patch/kb9.msu", &content).await;
    node.stop().await;
}

/// Time to the response head of a GET, and its `X-Cache`.
async fn time_to_first_byte(url: &str) -> (Duration, String) {
    let started = Instant::now();
    let response = client().get(url).send().await.unwrap();
    let elapsed = started.elapsed();
    let cache = response
        .headers()
        .get("x-cache")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    (elapsed, cache)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_served_first_while_a_prefill_holds_every_fill_slot() {
    let (origin, _storage, node) = origin_and_node_configured(|storage, origin| {
        let mut config = usual_config(storage, &origin.base_url());
        // Two fills at once in all, and a prefill that may take both.
        config.fill.max_concurrent = 2;
        config.prefill.concurrency = 2;
        config
    })
    .await;
    for index in 0..4 {
        put_slow(
            &origin,
            &format!("/slow-{index}.bin"),
            pattern_bytes(1024 * 1024, 60 + index),
        );
    }
    for index in 0..10 {
        origin.put(
            &format!("/cold-{index}.bin"),
            pattern_bytes(64 * 1024, 80 + index),
        );
    }
    origin.put("/warm.bin", pattern_bytes(64 * 1024, 99));
    let warm = node.mcc_url("/warm.bin");
    get(&warm, &[]).await;
    node.settle().await;

    let mut idle = (Vec::new(), Vec::new());
    for index in 0..5 {
        let (miss, cache) = time_to_first_byte(&node.mcc_url(&format!("/cold-{index}.bin"))).await;
        assert_eq!(cache, "MISS");
        idle.0.push(miss);
        let (hit, cache) = time_to_first_byte(&warm).await;
        assert_eq!(cache, "HIT");
        idle.1.push(hit);
    }

    // A job on four objects that take over three seconds each, two at a time: both fill slots.
    let urls: Vec<String> = (0..4)
        .map(|index| format!("http://{ORIGIN_HOST}/slow-{index}.bin"))
        .collect();
    let (status, submitted) = submit(&node, serde_json::json!(urls)).await;
    assert_eq!(status, 202, "{submitted}");
    let id = submitted["id"].as_u64().unwrap();
    eventually_async(
        "two prefill fills running",
        Duration::from_secs(10),
        async || {
            let urls = job(&node, id).await["urls"].clone();
            let filling = urls
                .as_array()
                .unwrap()
                .iter()
                .filter(|url| url["state"] == "filling")
                .count();
            filling == 2
        },
    )
    .await;
    let mut busy = (Vec::new(), Vec::new());
    for index in 5..10 {
        let (miss, cache) = time_to_first_byte(&node.mcc_url(&format!("/cold-{index}.bin"))).await;
        assert_eq!(cache, "MISS");
        busy.0.push(miss);
        let (hit, cache) = time_to_first_byte(&warm).await;
        assert_eq!(cache, "HIT");
        busy.1.push(hit);
    }
    assert_eq!(
        job(&node, id).await["state"],
        "running",
        "the prefill was still running while the clients were measured"
    );
    let (idle_miss, idle_hit) = (median(idle.0), median(idle.1));
    let (busy_miss, busy_hit) = (median(busy.0), median(busy.1));
    println!(
        "time to first byte, median of 5: cold miss {idle_miss:?} idle, {busy_miss:?} while a prefill holds both fill slots; hit {idle_hit:?} idle, {busy_hit:?} during the prefill"
    );
    // A client queued behind the prefill would wait for a slot: over three seconds.
    assert!(
        busy_miss < Duration::from_secs(1),
        "a client's cold miss waited {busy_miss:?} behind the prefill"
    );
    assert!(busy_hit < Duration::from_millis(500), "{busy_hit:?}");
    node.stop().await;
}
