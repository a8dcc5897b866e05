//! Benchmark: the node under a bounded abuse load, against nginx configured as lancache under the
//! same load, in one run.
//!
//! For each cold-object size (32 MiB and 256 MiB, to show memory is flat in object size):
//! - 2,000 connections, ten from each of 200 loopback addresses (as 200 machines would), stream
//!   random 1 MiB ranges of warm objects in a loop for the whole run;
//! - meanwhile 200 clients, each from an address of its own, ask for a distinct cold object
//!   whole, read 1 KiB and close the connection;
//! - one well-behaved client, from an address of its own, asks for a random 64 KiB range of a warm object every 50 ms and
//!   records its time to first byte.
//!
//! Reported: the server's peak RSS (sampled every 100 ms from `/proc/<pid>/status`), its peak
//! open file descriptors, the origin bytes the abandoned requests cost, the streamers' and the
//! probe's successes and failures, and the probe's p50/p99 time to first byte.
//!
//! Run with `cargo bench -p cache-node --bench abuse_load`. `OUTPOST_BENCH_SECONDS` sets the
//! duration of each round (default 20). nginx is skipped, with a line saying so, when it is not
//! installed.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lancache_nginx.rs"]
mod lancache_nginx;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use outpost_testkit::{pattern_bytes, MockOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{test_config, NodeProcess, ORIGIN_HOST};

const WARM_OBJECTS: usize = 4;
const WARM_MIB: usize = 64;

/// How a server names an object: the MCC form for the node, a plain path for nginx (whose
/// lancache config proxies every path to the origin).
#[derive(Clone)]
struct Target {
    address: SocketAddr,
    mcc: bool,
}

impl Target {
    fn path_and_query(&self, path: &str) -> String {
        if self.mcc {
            format!("{path}?cacheHostOrigin={ORIGIN_HOST}")
        } else {
            path.to_owned()
        }
    }
}

#[derive(Default)]
struct Counters {
    streamed_ok: AtomicU64,
    streamed_failed: AtomicU64,
    streamed_bytes: AtomicU64,
}

/// A loopback source address for client `index`: clients are spread over 127.0.1.0/24 in groups
/// of `per_address`, as the machines of an office would be, so per-client caps apply as they
/// would in a real office.
fn client_ip(index: usize, per_address: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 1, (1 + index / per_address.max(1) % 250) as u8)
}

/// Connects to `address` from the loopback address `source`.
async fn connect_from(
    source: std::net::Ipv4Addr,
    address: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    socket.connect(address).await
}

/// Streams random 1 MiB ranges of the warm objects over one keep-alive connection until `until`.
async fn stream_ranges(
    target: Target,
    source: std::net::Ipv4Addr,
    until: Instant,
    seed: u64,
    counters: Arc<Counters>,
) {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    'connection: while Instant::now() < until {
        let Ok(stream) = connect_from(source, target.address).await else {
            counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(connection);
        while Instant::now() < until {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let object = (state >> 33) as usize % WARM_OBJECTS;
            let slice = (state >> 40) as usize % WARM_MIB;
            let first = slice << 20;
            let request =
                http::Request::get(target.path_and_query(&format!("/bench/warm-{object}.bin")))
                    .header("host", ORIGIN_HOST)
                    .header("range", format!("bytes={first}-{}", first + (1 << 20) - 1))
                    .body(Empty::new())
                    .unwrap();
            let Ok(response) = sender.send_request(request).await else {
                counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
                continue 'connection;
            };
            if response.status() != 206 {
                counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
                continue 'connection;
            }
            let mut body = response.into_body();
            let mut received = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            received += data.len() as u64;
                        }
                    }
                    Err(_) => {
                        counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
                        continue 'connection;
                    }
                }
            }
            counters
                .streamed_bytes
                .fetch_add(received, Ordering::Relaxed);
            if received == 1 << 20 {
                counters.streamed_ok.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.streamed_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Asks for a cold object whole on a fresh connection, reads about 1 KiB and closes.
async fn abandon(target: Target, source: std::net::Ipv4Addr, path: String) {
    let Ok(mut stream) = connect_from(source, target.address).await else {
        return;
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {ORIGIN_HOST}\r\n\r\n",
        target.path_and_query(&path)
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buffer = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await;
}

/// One well-behaved client: a 64 KiB range every 50 ms; returns each request's time to first
/// byte, or `None` for a failure.
async fn probe(target: Target, until: Instant) -> Vec<Option<Duration>> {
    // The well-behaved client is a machine of its own.
    let client = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 2, 1]))
        .build()
        .unwrap();
    let mut results = Vec::new();
    let mut index = 0usize;
    while Instant::now() < until {
        index += 1;
        let object = index % WARM_OBJECTS;
        let first = (index * 7919 % (WARM_MIB * 16)) << 16;
        let url = format!(
            "http://{}{}",
            target.address,
            target.path_and_query(&format!("/bench/warm-{object}.bin"))
        );
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let response = client
                .get(&url)
                .header("host", ORIGIN_HOST)
                .header("range", format!("bytes={first}-{}", first + 65535))
                .send()
                .await
                .ok()?;
            if response.status() != 206 {
                return None;
            }
            let mut stream = response;
            let first_chunk = stream.chunk().await.ok()??;
            let to_first_byte = started.elapsed();
            let mut length = first_chunk.len();
            while let Some(chunk) = stream.chunk().await.ok()? {
                length += chunk.len();
            }
            (length == 65536).then_some(to_first_byte)
        })
        .await
        .ok()
        .flatten();
        results.push(outcome);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    results
}

/// Peak RSS (bytes) and peak open fds of the processes `pids` together, sampled every 100 ms
/// until `until`.
async fn sample_processes(pids: Vec<u32>, until: Instant) -> (u64, u64) {
    let mut peak_rss = 0;
    let mut peak_fds = 0;
    while Instant::now() < until {
        let mut rss = 0;
        let mut fds = 0;
        for pid in &pids {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let rss_kib = status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
                rss += rss_kib * 1024;
            }
            if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                fds += entries.count() as u64;
            }
        }
        peak_rss = peak_rss.max(rss);
        peak_fds = peak_fds.max(fds);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (peak_rss, peak_fds)
}

struct Round {
    peak_rss: u64,
    peak_fds: u64,
    origin_bytes_for_abandoned: u64,
    streamed_ok: u64,
    streamed_failed: u64,
    streamed_gb_per_second: f64,
    probe_ok: usize,
    probe_failed: usize,
    probe_p50: Duration,
    probe_p99: Duration,
}

async fn run_round(
    target: Target,
    pids: Vec<u32>,
    origin: &MockOrigin,
    cold_prefix: &str,
    streamers: usize,
    abandoners: usize,
    seconds: u64,
) -> Round {
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let counters = Arc::new(Counters::default());
    let sampler = tokio::spawn(sample_processes(pids, until + Duration::from_secs(2)));
    let mut tasks = Vec::new();
    for index in 0..streamers {
        tasks.push(tokio::spawn(stream_ranges(
            target.clone(),
            // Ten connections per machine.
            client_ip(index, 10),
            until,
            index as u64 + 1,
            Arc::clone(&counters),
        )));
    }
    let probe_task = tokio::spawn(probe(target.clone(), until));
    // The abandoned cold requests arrive over the first quarter of the round.
    let origin_before = origin.bytes_sent();
    let spread = Duration::from_secs(seconds) / 4 / abandoners.max(1) as u32;
    for index in 0..abandoners {
        tokio::spawn(abandon(
            target.clone(),
            // Each abandoned download comes from a machine of its own (127.0.3.x).
            std::net::Ipv4Addr::new(127, 0, 3, (1 + index % 250) as u8),
            format!("/bench/{cold_prefix}-{index}.bin"),
        ));
        tokio::time::sleep(spread).await;
    }
    for task in tasks {
        let _ = task.await;
    }
    let probe_results = probe_task.await.unwrap();
    let (peak_rss, peak_fds) = sampler.await.unwrap();
    // The warm objects cost the origin nothing during the round, so everything it sent was for
    // the abandoned requests.
    let origin_bytes_for_abandoned = origin.bytes_sent() - origin_before;
    let mut times: Vec<Duration> = probe_results.iter().flatten().copied().collect();
    times.sort();
    let quantile = |q: f64| {
        times
            .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Round {
        peak_rss,
        peak_fds,
        origin_bytes_for_abandoned,
        streamed_ok: counters.streamed_ok.load(Ordering::Relaxed),
        streamed_failed: counters.streamed_failed.load(Ordering::Relaxed),
        streamed_gb_per_second: counters.streamed_bytes.load(Ordering::Relaxed) as f64
            / started.elapsed().as_secs_f64()
            / 1e9,
        probe_ok: times.len(),
        probe_failed: probe_results.len() - times.len(),
        probe_p50: quantile(0.50),
        probe_p99: quantile(0.99),
    }
}

/// Downloads each warm object whole once through `target`.
async fn warm(target: &Target) {
    for object in 0..WARM_OBJECTS {
        let url = format!(
            "http://{}{}",
            target.address,
            target.path_and_query(&format!("/bench/warm-{object}.bin"))
        );
        let body = common::client()
            .get(&url)
            .header("host", ORIGIN_HOST)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body.len(), WARM_MIB << 20, "warming {url}");
    }
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

fn print_round(name: &str, round: &Round) {
    println!(
        "{name:<34} {:>9.0} MiB {:>6} fds {:>9.1} MiB {:>8}/{:<6} {:>6.2} GB/s {:>5}/{:<4} {:>8.1?} {:>8.1?}",
        round.peak_rss as f64 / (1 << 20) as f64,
        round.peak_fds,
        round.origin_bytes_for_abandoned as f64 / (1 << 20) as f64,
        round.streamed_ok,
        round.streamed_failed,
        round.streamed_gb_per_second,
        round.probe_ok,
        round.probe_failed,
        round.probe_p50,
        round.probe_p99,
    );
}

fn main() {
    let under_cargo_test = !std::env::args().any(|argument| argument == "--bench");
    let seconds: u64 = std::env::var("OUTPOST_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if under_cargo_test { 3 } else { 20 });
    let (streamers, abandoners) = if under_cargo_test {
        (100, 20)
    } else {
        (2000, 200)
    };
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = runtime.block_on(MockOrigin::start());
    for object in 0..WARM_OBJECTS {
        origin.put(
            &format!("/bench/warm-{object}.bin"),
            pattern_bytes(WARM_MIB << 20, object as u64 + 1),
        );
    }
    // Every cold object of a size shares one buffer in the origin (Bytes clones share memory).
    let cold_sizes: [(&str, usize); 2] = [("cold32", 32 << 20), ("cold256", 256 << 20)];
    for (prefix, size) in cold_sizes {
        let content = pattern_bytes(size, 99);
        for index in 0..abandoners {
            origin.put(&format!("/bench/{prefix}-{index}.bin"), content.clone());
        }
    }

    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));
    let storage = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node_work = tempfile::tempdir().unwrap();
    // The shipped defaults, but for the test origin and a 1 MiB slice like the product's.
    let config = test_config(storage.path(), &origin.base_url(), 1024 * 1024, "20GiB");
    let mut node = NodeProcess::spawn(binary, node_work.path(), config);
    runtime.block_on(node.wait_healthy());
    let node_target = Target {
        address: node.addr,
        mcc: true,
    };
    runtime.block_on(warm(&node_target));
    let node_pids = vec![node.child.id()];
    let mut rows = Vec::new();
    for (prefix, size) in cold_sizes {
        let round = runtime.block_on(run_round(
            node_target.clone(),
            node_pids.clone(),
            &origin,
            prefix,
            streamers,
            abandoners,
            seconds,
        ));
        rows.push((format!("cache-node, cold {} MiB", size >> 20), round));
    }
    let stats = runtime.block_on(common::admin_stats(node.admin_addr));
    node.kill_9();

    if lancache_nginx::tool_available("nginx") {
        let prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let port = common::free_port();
        let nginx = lancache_nginx::LancacheNginx::start(prefix.path(), port, origin.addr().port());
        let nginx_target = Target {
            address: format!("127.0.0.1:{port}").parse().unwrap(),
            mcc: false,
        };
        runtime.block_on(warm(&nginx_target));
        let pids = nginx.process_ids();
        for (prefix, size) in cold_sizes {
            // nginx's master and workers are sampled together.
            let round = runtime.block_on(run_round(
                nginx_target.clone(),
                pids.clone(),
                &origin,
                prefix,
                streamers,
                abandoners,
                seconds,
            ));
            rows.push((format!("nginx-lancache, cold {} MiB", size >> 20), round));
        }
        drop(nginx);
    } else {
        println!("nginx is not installed (apt-get install nginx); the lancache rows are skipped");
    }

    println!(
        "\nabuse load: {streamers} streaming connections, {abandoners} abandoned cold requests per round, {seconds} s per round, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<34} {:>13} {:>10} {:>13} {:>15} {:>11} {:>10} {:>8} {:>8}",
        "server",
        "peak RSS",
        "peak fds",
        "origin (cold)",
        "ranges ok/fail",
        "streamed",
        "probe",
        "p50",
        "p99"
    );
    for (name, round) in &rows {
        print_round(name, round);
    }
    println!(
        "node counters after both rounds: fills in flight {}, fill memory {} bytes",
        stats["fills_in_flight"], stats["fill_memory_bytes"]
    );
    drop(origin);
}
