//! Benchmark: the hit path under concurrent load, cache-node against nginx configured as lancache
//! configures it, both warmed, both measured with the same wrk settings in one run.
//!
//! - (a) random 1 MiB-aligned 1 MiB ranges of a 1 GiB object, 32 connections, in GB/s;
//! - (b) whole-object hits of a 4 KiB object, 64 connections, in requests/s;
//! - (c) (a) again with `storage.io_backend = "portable"`;
//! - (d) (a) and (b) over HTTPS (the `[tls]` listener, TLS 1.3, the suite OpenSSL's client and
//!   rustls agree on) against nginx serving the same files from disk over TLS 1.3 pinned to that
//!   suite, and as a fraction of the same node's plain-HTTP figures, in alternating rounds.
//!
//! Run with `cargo bench -p cache-node --bench hit_path`. As root it installs wrk, nginx and curl
//! from Debian's packages when they are missing; otherwise it says what to install.
//! `OUTPOST_BENCH_SECONDS` sets each wrk run's duration (default 10; 1 under `cargo test`).
//! `OUTPOST_BENCH_PROFILE=<dir>` records `perf` profiles of the node during each run
//! (`node-<backend>.data` for the ranges, `node-<backend>-small.data` for the small hits).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lancache_nginx.rs"]
mod lancache_nginx;

use std::path::Path;
use std::process::Command;

use common::{mcc_url, test_config, NodeProcess};
use outpost_testkit::{pattern_bytes, MockOrigin};

const BIG_PATH: &str = "/filestreamingservice/files/bench/big.bin";
const SMALL_PATH: &str = "/filestreamingservice/files/bench/small.bin";

/// A wrk Lua script asking for random 1 MiB-aligned 1 MiB ranges of an object of `mib` MiB.
fn random_range_script(directory: &Path, mib: u64) -> std::path::PathBuf {
    let path = directory.join("random_range.lua");
    std::fs::write(
        &path,
        format!(
            r#"math.randomseed(42)
request = function()
  local slice = math.random(0, {last})
  local first = slice * 1048576
  wrk.headers["Range"] = "bytes=" .. first .. "-" .. (first + 1048575)
  return wrk.format("GET")
end
"#,
            last = mib - 1
        ),
    )
    .unwrap();
    path
}

/// What one wrk run reported.
#[derive(Debug, Clone, Copy)]
struct Load {
    requests_per_second: f64,
    bytes_per_second: f64,
    errors: u64,
}

fn parse_size_per_second(text: &str) -> f64 {
    let trimmed = text.trim();
    let (number, unit) = trimmed.split_at(
        trimmed
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(trimmed.len()),
    );
    let value: f64 = number.parse().unwrap_or(0.0);
    value
        * match unit {
            "KB" => 1024.0,
            "MB" => 1024.0 * 1024.0,
            "GB" => 1024.0 * 1024.0 * 1024.0,
            _ => 1.0,
        }
}

fn run_wrk(url: &str, connections: u32, seconds: u64, script: Option<&Path>) -> Load {
    let mut command = Command::new("wrk");
    command
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency");
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = command.arg(url).output().expect("wrk runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut load = Load {
        requests_per_second: 0.0,
        bytes_per_second: 0.0,
        errors: 0,
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            load.requests_per_second = rest.trim().parse().unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("Transfer/sec:") {
            load.bytes_per_second = parse_size_per_second(rest);
        } else if line.starts_with("Non-2xx or 3xx responses:")
            || line.starts_with("Socket errors:")
        {
            load.errors += line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|number| number.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    assert!(
        load.requests_per_second > 0.0,
        "wrk produced no result for {url}:\n{text}"
    );
    load
}

/// Downloads the big and the small object whole once, so both caches hold every slice before
/// the measurement (nginx's slice module stores a whole-object GET slice by slice too).
fn warm(big_url: &str, small_url: &str) {
    for url in [big_url, small_url] {
        lancache_nginx::curl_download(url);
    }
}

/// Runs `measure`; with `OUTPOST_BENCH_PROFILE=<dir>`, records a `perf` profile of process `pid`
/// meanwhile into `<dir>/node-<name>.data` (read it with `perf report -i`).
fn profiled<T>(pid: u32, name: &str, seconds: u64, measure: impl FnOnce() -> T) -> T {
    let profiler = start_profiler(pid, name, seconds);
    let result = measure();
    if let Some(mut profiler) = profiler {
        let _ = profiler.wait();
    }
    result
}

fn start_profiler(pid: u32, name: &str, seconds: u64) -> Option<std::process::Child> {
    let directory = std::env::var("OUTPOST_BENCH_PROFILE").ok()?;
    let output = Path::new(&directory).join(format!("node-{name}.data"));
    Command::new("perf")
        .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&output)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|error| eprintln!("perf is not available ({error}); no profile"))
        .ok()
}

/// The run with the median throughput of `runs`.
fn median(mut runs: Vec<Load>) -> Load {
    runs.sort_by(|a, b| a.bytes_per_second.total_cmp(&b.bytes_per_second));
    runs[runs.len() / 2]
}

/// The TLS 1.3 cipher suite a server on `port` negotiates with OpenSSL's default client
/// settings (what wrk uses), from `openssl s_client`.
fn negotiated(port: u16) -> String {
    let output = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.split_once("Cipher is ").map(|(_, suite)| suite.trim()))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no cipher suite in openssl s_client's output:\n{text}"))
}

fn main() {
    let under_cargo_test = !std::env::args().any(|argument| argument == "--bench");
    let missing: Vec<&str> = ["wrk", "nginx", "curl", "openssl"]
        .into_iter()
        .filter(|name| !lancache_nginx::tool_available(name))
        .collect();
    if !missing.is_empty() && lancache_nginx::is_root() && !under_cargo_test {
        // Install what is missing from Debian's packages, as the benchmark promises.
        eprintln!("installing {missing:?} with apt-get...");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .status();
    }
    for name in ["wrk", "nginx", "curl", "openssl"] {
        if !lancache_nginx::tool_available(name) {
            eprintln!("{name} is not installed (apt-get install wrk nginx curl); skipping the hit-path benchmark");
            return;
        }
    }
    let seconds: u64 = std::env::var("OUTPOST_BENCH_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if under_cargo_test { 1 } else { 10 });
    let big_mib: u64 = if under_cargo_test { 16 } else { 1024 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let origin = runtime.block_on(MockOrigin::start());
    origin.put(BIG_PATH, pattern_bytes((big_mib * 1024 * 1024) as usize, 7));
    origin.put(SMALL_PATH, pattern_bytes(4096, 8));
    let work = tempfile::tempdir().unwrap();
    let script = random_range_script(work.path(), big_mib);
    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));

    // A self-signed pair for both TLS servers.
    let tls_files = tempfile::tempdir().unwrap();
    let (tls_cert, tls_key) = (
        tls_files.path().join("node.crt"),
        tls_files.path().join("node.key"),
    );
    cache_node::tls::issue::write_self_signed(&["127.0.0.1".to_owned()], 30, &tls_cert, &tls_key)
        .unwrap();
    let mut node_results = Vec::new();
    for backend in ["auto", "portable"] {
        let storage = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let node_work = tempfile::tempdir().unwrap();
        let mut config = test_config(storage.path(), &origin.base_url(), 1024 * 1024, "20GiB");
        config.storage.io_backend = backend.into();
        let mut node = NodeProcess::spawn(binary, node_work.path(), config);
        runtime.block_on(node.wait_healthy());
        let reported = runtime.block_on(common::admin_stats(node.admin_addr))["disk_backend"]
            .as_str()
            .unwrap()
            .to_owned();
        warm(
            &mcc_url(node.addr, BIG_PATH),
            &mcc_url(node.addr, SMALL_PATH),
        );
        let pid = node.child.id();
        let ranges = profiled(pid, backend, seconds, || {
            run_wrk(&mcc_url(node.addr, BIG_PATH), 32, seconds, Some(&script))
        });
        let small = profiled(pid, &format!("{backend}-small"), seconds, || {
            run_wrk(&mcc_url(node.addr, SMALL_PATH), 64, seconds, None)
        });
        let stats = runtime.block_on(common::admin_stats(node.admin_addr));
        node.kill_9();
        node_results.push((
            reported,
            ranges,
            small,
            stats["origin_bytes"].as_u64().unwrap(),
        ));
    }

    let prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let port = common::free_port();
    let nginx = lancache_nginx::LancacheNginx::start(prefix.path(), port, origin.addr().port());
    let nginx_big = format!("http://127.0.0.1:{port}{BIG_PATH}");
    let nginx_small = format!("http://127.0.0.1:{port}{SMALL_PATH}");
    warm(&nginx_big, &nginx_small);
    let nginx_ranges = run_wrk(&nginx_big, 32, seconds, Some(&script));
    let nginx_small_load = run_wrk(&nginx_small, 64, seconds, None);
    drop(nginx);

    // The ceiling: plain nginx sending the same files straight from disk, no cache logic at all.
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let big_file = root.path().join(BIG_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(big_file.parent().unwrap()).unwrap();
    std::fs::write(
        &big_file,
        pattern_bytes((big_mib * 1024 * 1024) as usize, 7),
    )
    .unwrap();
    std::fs::write(
        root.path().join(SMALL_PATH.trim_start_matches('/')),
        pattern_bytes(4096, 8),
    )
    .unwrap();
    let static_prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let static_port = common::free_port();
    let plain =
        lancache_nginx::LancacheNginx::start_static(static_prefix.path(), static_port, root.path());
    let plain_big = format!("http://127.0.0.1:{static_port}{BIG_PATH}");
    let plain_small = format!("http://127.0.0.1:{static_port}{SMALL_PATH}");
    warm(&plain_big, &plain_small);
    let plain_ranges = run_wrk(&plain_big, 32, seconds, Some(&script));
    let plain_small_load = run_wrk(&plain_small, 64, seconds, None);
    drop(plain);

    // HTTPS: a node with [tls] (the default backend) and nginx over TLS 1.3 with the suite the
    // node negotiates, serving the same files; measured in alternating rounds (node TLS, nginx
    // TLS, node plain HTTP), so a machine whose load changes during the run weighs on all three
    // alike, and each figure is the median of its rounds.
    let storage = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node_work = tempfile::tempdir().unwrap();
    let mut config = test_config(storage.path(), &origin.base_url(), 1024 * 1024, "20GiB");
    let node_tls_port = common::free_port();
    config.tls.listen = format!("127.0.0.1:{node_tls_port}");
    config.tls.cert = tls_cert.clone();
    config.tls.key = tls_key.clone();
    let mut node = NodeProcess::spawn(binary, node_work.path(), config);
    runtime.block_on(node.wait_healthy());
    warm(
        &mcc_url(node.addr, BIG_PATH),
        &mcc_url(node.addr, SMALL_PATH),
    );
    let node_suite = negotiated(node_tls_port);
    let tls_prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let nginx_tls_port = common::free_port();
    let nginx_tls = lancache_nginx::LancacheNginx::start_static_tls(
        tls_prefix.path(),
        nginx_tls_port,
        root.path(),
        &tls_cert,
        &tls_key,
        &node_suite,
    );
    let nginx_suite = negotiated(nginx_tls_port);
    let node_https = |path: &str| {
        format!(
            "https://127.0.0.1:{node_tls_port}{path}?cacheHostOrigin={}",
            common::ORIGIN_HOST
        )
    };
    let nginx_https = |path: &str| format!("https://127.0.0.1:{nginx_tls_port}{path}");
    let rounds = if under_cargo_test { 1 } else { 3 };
    let mut https_runs: [Vec<Load>; 6] = Default::default();
    for _ in 0..rounds {
        https_runs[0].push(run_wrk(&node_https(BIG_PATH), 32, seconds, Some(&script)));
        https_runs[1].push(run_wrk(&nginx_https(BIG_PATH), 32, seconds, Some(&script)));
        https_runs[2].push(run_wrk(
            &mcc_url(node.addr, BIG_PATH),
            32,
            seconds,
            Some(&script),
        ));
        https_runs[3].push(run_wrk(&node_https(SMALL_PATH), 64, seconds, None));
        https_runs[4].push(run_wrk(&nginx_https(SMALL_PATH), 64, seconds, None));
        https_runs[5].push(run_wrk(&mcc_url(node.addr, SMALL_PATH), 64, seconds, None));
    }
    let tls_stats = runtime.block_on(common::admin_stats(node.admin_addr));
    node.kill_9();
    drop(nginx_tls);
    let [node_tls_ranges, nginx_tls_ranges, node_plain_ranges, node_tls_small, nginx_tls_small, node_plain_small] =
        https_runs.map(median);

    // The access log's cost: two nodes (default backend), one logging every request as JSON
    // lines and one not, 4 KiB hits (the most lines per second) and 1 MiB ranges in alternating
    // rounds; the logging node's /stats say how many lines were written and dropped.
    let mut access_nodes = Vec::new();
    for access in ["off", "json"] {
        let storage = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let node_work = tempfile::tempdir().unwrap();
        let mut config = test_config(storage.path(), &origin.base_url(), 1024 * 1024, "20GiB");
        config.log.access = access.into();
        let mut node = NodeProcess::spawn(binary, node_work.path(), config);
        runtime.block_on(node.wait_healthy());
        warm(
            &mcc_url(node.addr, BIG_PATH),
            &mcc_url(node.addr, SMALL_PATH),
        );
        access_nodes.push((node, storage, node_work));
    }
    let mut access_runs: [Vec<Load>; 4] = Default::default();
    for _ in 0..rounds {
        for (index, (node, _, _)) in access_nodes.iter().enumerate() {
            access_runs[index].push(run_wrk(&mcc_url(node.addr, SMALL_PATH), 64, seconds, None));
            access_runs[2 + index].push(run_wrk(
                &mcc_url(node.addr, BIG_PATH),
                32,
                seconds,
                Some(&script),
            ));
        }
    }
    let logged = runtime.block_on(common::admin_stats(access_nodes[1].0.admin_addr));
    for (node, _, _) in access_nodes {
        node.kill_9();
    }
    let [small_off, small_json, ranges_off, ranges_json] = access_runs.map(median);

    let gb = |load: &Load| load.bytes_per_second / 1e9;
    println!(
        "\nhit path, {} cores, wrk -t2, {seconds} s per run, object {big_mib} MiB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<46} {:>14} {:>14} {:>8} {:>14} {:>9} {:>7}",
        "run", "cache-node", "nginx-lancache", "ratio", "plain nginx", "/ceiling", "errors"
    );
    for (label, (backend, ranges, small, _)) in ["(a)", "(c)"].iter().zip(&node_results) {
        let rows = [
            (
                format!("{label} random 1 MiB ranges, 32 conns [{backend}]"),
                gb(ranges),
                gb(&nginx_ranges),
                gb(&plain_ranges),
                "GB/s",
                ranges.errors,
            ),
            (
                format!("    4 KiB hits, 64 conns [{backend}]"),
                small.requests_per_second,
                nginx_small_load.requests_per_second,
                plain_small_load.requests_per_second,
                "req/s",
                small.errors,
            ),
        ];
        for (name, ours, theirs, ceiling, unit, errors) in rows {
            println!(
                "{name:<46} {:>14} {:>14} {:>8.2} {:>14} {:>9.2} {errors:>7}",
                format!("{ours:.2} {unit}"),
                format!("{theirs:.2} {unit}"),
                ours / theirs,
                format!("{ceiling:.2} {unit}"),
                ours / ceiling
            );
        }
    }
    println!(
        "\nHTTPS hits: TLS 1.3, cache-node {node_suite}, nginx {nginx_suite}; nginx serves the files from disk; median of {rounds} alternating rounds"
    );
    println!(
        "{:<46} {:>14} {:>14} {:>8} {:>16} {:>9} {:>7}",
        "run", "cache-node TLS", "nginx TLS", "ratio", "node plain HTTP", "TLS/plain", "errors"
    );
    for (name, ours, theirs, plain, unit, errors) in [
        (
            "(d) random 1 MiB ranges, 32 conns, https",
            gb(&node_tls_ranges),
            gb(&nginx_tls_ranges),
            gb(&node_plain_ranges),
            "GB/s",
            node_tls_ranges.errors + nginx_tls_ranges.errors,
        ),
        (
            "    4 KiB hits, 64 conns, https",
            node_tls_small.requests_per_second,
            nginx_tls_small.requests_per_second,
            node_plain_small.requests_per_second,
            "req/s",
            node_tls_small.errors + nginx_tls_small.errors,
        ),
    ] {
        println!(
            "{name:<46} {:>14} {:>14} {:>8.2} {:>16} {:>9.2} {errors:>7}",
            format!("{ours:.2} {unit}"),
            format!("{theirs:.2} {unit}"),
            ours / theirs,
            format!("{plain:.2} {unit}"),
            ours / plain
        );
    }
    println!(
        "\naccess log: two nodes [default backend], [log] access = off / json, median of {rounds} alternating rounds"
    );
    println!(
        "{:<46} {:>14} {:>14} {:>8}",
        "run", "access off", "access json", "json/off"
    );
    for (name, off, json, unit) in [
        (
            "    4 KiB hits, 64 conns",
            small_off.requests_per_second,
            small_json.requests_per_second,
            "req/s",
        ),
        (
            "    random 1 MiB ranges, 32 conns",
            gb(&ranges_off),
            gb(&ranges_json),
            "GB/s",
        ),
    ] {
        println!(
            "{name:<46} {:>14} {:>14} {:>8.3}",
            format!("{off:.2} {unit}"),
            format!("{json:.2} {unit}"),
            json / off
        );
    }
    println!(
        "    lines written {}, dropped {} (requests {})",
        logged["access_log_lines"], logged["access_log_dropped"], logged["requests"]
    );
    assert_eq!(
        tls_stats["origin_bytes"].as_u64().unwrap(),
        big_mib * 1024 * 1024 + 4096,
        "the HTTPS runs were all hits too"
    );
    let origin_bytes = node_results[0].3;
    assert_eq!(
        origin_bytes,
        big_mib * 1024 * 1024 + 4096,
        "the measured runs were all hits: the origin sent each byte once, during warm-up"
    );
    drop(origin);
}
