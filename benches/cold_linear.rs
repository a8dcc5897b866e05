//! Benchmark: one linear download of a large object with curl, (1) straight from the origin,
//! (2) through cache-node cold and warm, for several slice sizes, and (3) through nginx set up the
//! way lancache sets it up (the `slice` module with 1 MiB slices, `proxy_cache_lock`), cold and
//! warm. All on loopback, in one run, with ratios against the origin.
//!
//! Run with `cargo bench -p cache-node --bench cold_linear`. `OUTPOST_BENCH_MIB` sets the object
//! size in MiB (default 1024). nginx is used when installed (`apt-get install nginx`).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "lancache_nginx.rs"]
mod lancache_nginx;

use std::path::Path;
use std::time::Duration;

use common::{mcc_url, test_config, NodeProcess};
use outpost_testkit::{pattern_bytes, Behaviour, MockOrigin};

const OBJECT_PATH: &str = "/filestreamingservice/files/bench/object.bin";
/// The same content behind an origin paced like a fast WAN link (1 MiB every 4 ms, at most
/// 250 MiB/s, about 2 Gbit/s): what a branch-office node really fills from. nginx is left out
/// of this table because the pacing applies per response, and its 1 MiB sub-requests each get
/// their first MiB unpaced, which says nothing about a real link.
const PACED_PATH: &str = "/filestreamingservice/files/bench/paced.bin";

/// The fastest of three downloads: warm figures are noisy on a shared virtual machine.
fn best_of_three(url: &str) -> (f64, u64) {
    (0..3)
        .map(|_| lancache_nginx::curl_download(url))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .expect("three runs")
}

struct Row {
    name: String,
    seconds: f64,
    bytes: u64,
}

impl Row {
    fn throughput_mib(&self) -> f64 {
        self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
    }
}

fn main() {
    // `cargo bench` passes --bench; a plain `cargo test --benches` passes nothing: run a tiny
    // object then so the program is exercised without taking minutes.
    let under_cargo_test = !std::env::args().any(|argument| argument == "--bench");
    let size_mib: usize = std::env::var("OUTPOST_BENCH_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(if under_cargo_test { 8 } else { 1024 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let origin = runtime.block_on(MockOrigin::start());
    let origin_port = origin.addr().port();
    eprintln!("generating a {size_mib} MiB object...");
    let content = pattern_bytes(size_mib * 1024 * 1024, 99);
    origin.put(OBJECT_PATH, content.clone());
    origin.put_with(
        PACED_PATH,
        content,
        Behaviour {
            chunk_size: Some(1024 * 1024),
            chunk_delay: Some(Duration::from_millis(4)),
            ..Behaviour::default()
        },
    );
    let binary = Path::new(env!("CARGO_BIN_EXE_cache-node"));
    let mut rows: Vec<Row> = Vec::new();

    let direct_url = format!("http://127.0.0.1:{origin_port}{OBJECT_PATH}");
    let (seconds, bytes) = best_of_three(&direct_url);
    rows.push(Row {
        name: "origin direct".into(),
        seconds,
        bytes,
    });
    let (seconds, bytes) =
        lancache_nginx::curl_download(&format!("http://127.0.0.1:{origin_port}{PACED_PATH}"));
    let paced_direct = Row {
        name: "paced origin direct".into(),
        seconds,
        bytes,
    };
    let mut paced_rows = Vec::new();

    // OUTPOST_BENCH_SLICES_KIB="256,1024" picks the slice sizes; OUTPOST_BENCH_FSYNC=0 turns
    // storage.fsync off to show what the flushes cost.
    let slice_sizes: Vec<u64> = match std::env::var("OUTPOST_BENCH_SLICES_KIB") {
        Ok(list) => list
            .split(',')
            .filter_map(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .collect(),
        Err(_) if under_cargo_test => vec![1024 * 1024],
        Err(_) => vec![256 * 1024, 1024 * 1024, 4 * 1024 * 1024, 16 * 1024 * 1024],
    };
    let fsync = std::env::var("OUTPOST_BENCH_FSYNC").as_deref() != Ok("0");
    for &slice_len in &slice_sizes {
        let storage = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut config = test_config(storage.path(), &origin.base_url(), slice_len, "20GiB");
        config.storage.fsync = fsync;
        let mut node = NodeProcess::spawn(binary, work.path(), config);
        runtime.block_on(node.wait_healthy());
        let url = mcc_url(node.addr, OBJECT_PATH);
        let label = format!(
            "cache-node slice {} KiB{}",
            slice_len / 1024,
            if fsync { "" } else { " nosync" }
        );
        let (seconds, bytes) = lancache_nginx::curl_download(&url);
        rows.push(Row {
            name: format!("{label} cold"),
            seconds,
            bytes,
        });
        let (seconds, bytes) = best_of_three(&url);
        rows.push(Row {
            name: format!("{label} warm"),
            seconds,
            bytes,
        });
        if slice_len == 1024 * 1024 {
            let (seconds, bytes) = lancache_nginx::curl_download(&mcc_url(node.addr, PACED_PATH));
            paced_rows.push(Row {
                name: format!("{label} cold"),
                seconds,
                bytes,
            });
        }
        node.kill_9();
    }

    if lancache_nginx::tool_available("nginx")
        && std::env::var("OUTPOST_BENCH_NGINX").as_deref() != Ok("0")
    {
        let prefix = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let port = common::free_port();
        let nginx = lancache_nginx::LancacheNginx::start(prefix.path(), port, origin_port);
        let url = format!("http://127.0.0.1:{port}{OBJECT_PATH}");
        let (seconds, bytes) = lancache_nginx::curl_download(&url);
        rows.push(Row {
            name: "nginx lancache-style cold".into(),
            seconds,
            bytes,
        });
        let (seconds, bytes) = best_of_three(&url);
        rows.push(Row {
            name: "nginx lancache-style warm".into(),
            seconds,
            bytes,
        });
        drop(nginx);
    } else {
        eprintln!("nginx is not installed; the lancache comparison is skipped");
    }

    print_table(
        &format!("linear download of {size_mib} MiB with curl, loopback, in-memory origin"),
        &rows,
        size_mib,
    );
    let mut paced = vec![paced_direct];
    paced.extend(paced_rows);
    print_table(
        &format!("cold linear download of {size_mib} MiB from a paced origin (<= 250 MiB/s)"),
        &paced,
        size_mib,
    );
    drop(origin);
}

fn print_table(title: &str, rows: &[Row], size_mib: usize) {
    let origin_speed = rows[0].throughput_mib();
    println!("\n{title}");
    println!(
        "{:<36} {:>9} {:>10} {:>9}",
        "path", "seconds", "MiB/s", "x origin"
    );
    for row in rows {
        assert_eq!(
            row.bytes,
            (size_mib * 1024 * 1024) as u64,
            "{} downloaded the whole object",
            row.name
        );
        println!(
            "{:<36} {:>9.3} {:>10.1} {:>9.2}",
            row.name,
            row.seconds,
            row.throughput_mib(),
            row.throughput_mib() / origin_speed
        );
    }
}
