//! Benchmark: downloading a large object from a warm cache node with peer-client, against
//! `aria2c -x8` and `curl` from the same node, in one run. Every tool writes a real file in the
//! same directory (on the same disk as the node's cache), and the table shows the best of three
//! runs per tool with ratios against curl and aria2c.
//!
//! Run with `cargo bench -p peer-client --bench peer_download`. `OUTPOST_BENCH_MIB` sets the object
//! size in MiB (default 1024). aria2c and curl must be installed (`apt-get install aria2 curl`);
//! a missing one is left out of the table.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/peer_common/mod.rs"]
mod peer_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use peer_common::KillableNode;

const OBJECT_PATH: &str = "/filestreamingservice/files/bench/peer.bin";

struct Row {
    name: String,
    seconds: f64,
}

/// Runs `command` (which writes `output`) and returns its wall time, after checking it succeeded
/// and wrote `expected_len` bytes.
fn timed_run(mut command: Command, output: &Path, expected_len: u64) -> f64 {
    let _ = std::fs::remove_file(output);
    let started = Instant::now();
    let result = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .expect("the tool runs");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        result.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert_eq!(
        std::fs::metadata(output).unwrap().len(),
        expected_len,
        "{command:?} wrote the whole object"
    );
    seconds
}

fn tool_available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a tiny object then
    // so the program is exercised without taking minutes.
    let under_cargo_test = !std::env::args().any(|argument| argument == "--bench");
    let size_mib: usize = std::env::var("OUTPOST_BENCH_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if under_cargo_test { 8 } else { 1024 });
    let runs = if under_cargo_test { 1 } else { 3 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let origin = runtime.block_on(MockOrigin::start());
    eprintln!("generating a {size_mib} MiB object...");
    let content = pattern_bytes(size_mib * 1024 * 1024, 77);
    let expected_sha256 = sha256_hex(&content);
    let object_len = content.len() as u64;
    origin.put(OBJECT_PATH, content);
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let node = KillableNode::start_in(&origin.base_url(), work.path());
    let origin_url = format!("{}{OBJECT_PATH}", origin.base_url());
    // The MCC form of the same URL, which is what peer-client sends, so all tools hit the same
    // cached object.
    let node_url = format!(
        "http://{}{OBJECT_PATH}?cacheHostOrigin=127.0.0.1:{}",
        node.addr,
        origin.addr().port()
    );

    // Warm the node: one download through it, then wait until every slice is on its disk.
    eprintln!("warming the node...");
    let warm_output = work.path().join("warm.bin");
    let mut warm = Command::new("curl");
    warm.args(["-sS", "--fail", "--noproxy", "*", "-o"])
        .arg(&warm_output)
        .arg(&node_url);
    timed_run(warm, &warm_output, object_len);
    let deadline = Instant::now() + Duration::from_secs(120);
    while runtime.block_on(node.stats())["cache_used_bytes"]
        .as_u64()
        .unwrap()
        < object_len
    {
        assert!(
            Instant::now() < deadline,
            "the node never stored the object"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&warm_output).unwrap();
    runtime.block_on(async { origin.reset_counters() });

    let peer_client = Path::new(env!("CARGO_BIN_EXE_peer-client"));
    let output = work.path().join("download.bin");
    let peer_command = |extra: &[&str], fsync: bool| {
        let mut command = Command::new(peer_client);
        command
            .args(["get", &origin_url, "--quiet", "-o"])
            .arg(&output)
            .args(["--cache-host", &node.addr.to_string()])
            .args(extra)
            .env("PEER_CLIENT__STORAGE__FSYNC", fsync.to_string());
        command
    };
    let mut tools: Vec<(String, Box<dyn Fn() -> Command>)> = vec![
        (
            "peer-client (fsync, default)".into(),
            Box::new(|| peer_command(&[], true)),
        ),
        (
            "peer-client (no fsync)".into(),
            Box::new(|| peer_command(&[], false)),
        ),
        (
            "peer-client --sha256 (fsync)".into(),
            Box::new(|| peer_command(&["--sha256", &expected_sha256], true)),
        ),
    ];
    if tool_available("aria2c") {
        tools.push((
            "aria2c -x8 -s8 -k1M".into(),
            Box::new(|| {
                let mut command = Command::new("aria2c");
                command
                    .args([
                        "-x8",
                        "-s8",
                        "-k1M",
                        "--file-allocation=none",
                        "--allow-overwrite=true",
                        "--auto-file-renaming=false",
                        "--console-log-level=warn",
                        "--summary-interval=0",
                        "--download-result=hide",
                        "--no-conf",
                        "--all-proxy=",
                        "-d",
                    ])
                    .arg(output.parent().unwrap())
                    .arg("-o")
                    .arg(output.file_name().unwrap())
                    .arg(&node_url);
                command
            }),
        ));
    } else {
        eprintln!("aria2c is not installed; left out");
    }
    tools.push((
        "curl".into(),
        Box::new(|| {
            let mut command = Command::new("curl");
            command
                .args(["-sS", "--fail", "--noproxy", "*", "-o"])
                .arg(&output)
                .arg(&node_url);
            command
        }),
    ));

    // Rounds rather than one tool at a time, so that a slow phase of the shared machine hits
    // every tool alike; each tool's figure is its best round.
    let mut best: Vec<f64> = vec![f64::INFINITY; tools.len()];
    for round in 0..runs {
        for (index, (name, make_command)) in tools.iter().enumerate() {
            let seconds = timed_run(make_command(), &output, object_len);
            eprintln!("round {round}: {name}: {seconds:.3} s");
            best[index] = best[index].min(seconds);
            if round == 0 {
                assert_eq!(
                    outpost_testkit::sha256_hex(&std::fs::read(&output).unwrap()),
                    expected_sha256,
                    "{name} wrote the right bytes"
                );
            }
        }
    }
    assert_eq!(
        runtime.block_on(async { origin.bytes_sent() }),
        0,
        "every download was a cache hit"
    );
    let rows: Vec<Row> = tools
        .iter()
        .zip(&best)
        .map(|((name, _), &seconds)| Row {
            name: name.clone(),
            seconds,
        })
        .collect();
    print_table(size_mib, &rows);
}

fn print_table(size_mib: usize, rows: &[Row]) {
    let seconds_of = |prefix: &str| {
        rows.iter()
            .find(|row| row.name.starts_with(prefix))
            .map(|row| row.seconds)
    };
    let curl = seconds_of("curl");
    let aria2c = seconds_of("aria2c");
    println!("\ndownload of {size_mib} MiB from a warm cache-node on loopback, to a file (best of the rounds)");
    println!(
        "{:<32} {:>9} {:>10} {:>13} {:>15}",
        "tool", "seconds", "MiB/s", "speed x curl", "speed x aria2c"
    );
    for row in rows {
        let ratio = |reference: Option<f64>| {
            reference.map_or("-".to_owned(), |reference| {
                format!("{:.2}", reference / row.seconds)
            })
        };
        println!(
            "{:<32} {:>9.3} {:>10.1} {:>13} {:>15}",
            row.name,
            row.seconds,
            size_mib as f64 / row.seconds,
            ratio(curl),
            ratio(aria2c)
        );
    }
}
