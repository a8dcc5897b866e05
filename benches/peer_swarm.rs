//! Benchmark: eight machines download the same large file at the same time while the cache node's
//! egress is capped, with peering off (download mode 0) and on (mode 1), in one run. It prints the
//! time until all eight have the file and what left the node.
//!
//! Run with `cargo bench -p peer-client --bench peer_swarm`. `OUTPOST_BENCH_MIB` sets the file
//! size (default 512), `OUTPOST_BENCH_EGRESS_MBPS` the node's egress cap in MB/s (default 100),
//! `OUTPOST_SCRATCH_DIR` where the eight daemon caches live (default the temporary directory).
//!
//! **How the egress is capped.** A TCP proxy in front of the node paces every byte the node sends
//! (one governor limiter shared by all connections: the branch office's link to the node). The
//! proxy connects to the node *from the client's own address* (each daemon is on its own
//! 127.0.0.x), so the tracker still sees eight machines and LAN scoping works as on a real LAN.
//! Pacing in the proxy rather than in the node keeps the node unmodified and caps exactly what
//! a real link would: manifest, tracker and content bytes alike. The node is warmed first
//! (straight, not through the proxy): the content has crossed the WAN once, as it has on the
//! morning of a patch day.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/peer_common/mod.rs"]
mod peer_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_testkit::{pattern_bytes, sha256_hex, MockOrigin};
use peer_client::config::BandwidthLimit;
use peer_client::net::bandwidth::Bandwidth;
use peer_common::{KillableNode, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const ORIGIN_IP: &str = "127.0.0.10";
const CLIENTS: usize = 8;

/// Forwards connections to `upstream`, pacing what comes back with `bandwidth` and counting it.
async fn throttling_proxy(
    listener: TcpListener,
    upstream: SocketAddr,
    bandwidth: Bandwidth,
    egress: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, client_addr)) = listener.accept().await else {
            return;
        };
        let bandwidth = bandwidth.clone();
        let egress = Arc::clone(&egress);
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            // From the client's own address, so the node sees the machine, not the proxy.
            let socket = TcpSocket::new_v4().unwrap();
            if socket.bind(SocketAddr::new(client_addr.ip(), 0)).is_err() {
                return;
            }
            let Ok(server) = socket.connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            forward(client, server, bandwidth, egress).await;
        });
    }
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    bandwidth: Bandwidth,
    egress: Arc<AtomicU64>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let mut meter = bandwidth.meter();
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            meter.charge(read as u64).await;
            if client_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
            egress.fetch_add(read as u64, Ordering::Relaxed);
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

struct Outcome {
    seconds: f64,
    egress: u64,
    from_cache: u64,
    from_peers: u64,
    from_http: u64,
}

async fn swarm(
    proxy: SocketAddr,
    egress: &AtomicU64,
    url: &str,
    digest: &str,
    peering: bool,
    run: usize,
) -> Outcome {
    let mut daemons = Vec::new();
    for client in 0..CLIENTS {
        let ip = format!("127.0.{}.{}", 20 + run, 2 + client);
        daemons.push(
            TestDaemon::start(&ip, proxy, |config| {
                config.download_mode = if peering { 1 } else { 0 };
                config.peering.peer_refresh_interval = Duration::from_millis(500);
                config.peering.manifest_timeout = Duration::from_secs(120);
                // A swarm that starts together: the first peer lists are empty.
                config.peering.max_peers = CLIENTS;
            })
            .await,
        );
    }
    egress.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let mut downloads = Vec::new();
    for daemon in &daemons {
        let daemon = daemon.daemon.clone();
        let url = url.to_owned();
        downloads.push(tokio::spawn(async move {
            let done = daemon.download(&url, None, None).await.expect("download");
            done
        }));
    }
    let mut outcome = Outcome {
        seconds: 0.0,
        egress: 0,
        from_cache: 0,
        from_peers: 0,
        from_http: 0,
    };
    for download in downloads {
        let done = download.await.unwrap();
        assert_eq!(
            sha256_hex(&std::fs::read(&done.path).unwrap()),
            digest,
            "a client got the wrong bytes"
        );
        outcome.from_cache += done.status.bytes_from_cache_server;
        outcome.from_peers += done.status.bytes_from_peers;
        outcome.from_http += done.status.bytes_from_http;
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.egress = egress.load(Ordering::Relaxed);
    for daemon in daemons {
        drop(daemon.stop().await);
    }
    outcome
}

fn main() {
    let mib: usize = std::env::var("OUTPOST_BENCH_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(512);
    let egress_mbps: u64 = std::env::var("OUTPOST_BENCH_EGRESS_MBPS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let origin = MockOrigin::start_on(ORIGIN_IP).await;
        let content = pattern_bytes(mib << 20, 7);
        let digest = sha256_hex(&content);
        origin.put("/files/swarm.bin", content);
        let url = format!("{}/files/swarm.bin", origin.base_url());
        let node = KillableNode::start_with(
            &origin.base_url(),
            &peer_common::scratch_dir(),
            |config| {
                for allowed in &mut config.origin {
                    if allowed.host == "127.0.0.1" {
                        allowed.host = ORIGIN_IP.into();
                    }
                }
            },
        );
        // Warm the node straight (the content crossed the WAN once already).
        let warm = reqwest::get(format!(
            "http://{}/files/swarm.bin?cacheHostOrigin={}",
            node.addr,
            origin.addr()
        ))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
        assert_eq!(sha256_hex(&warm), digest);
        drop(warm);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let egress = Arc::new(AtomicU64::new(0));
        tokio::spawn(throttling_proxy(
            listener,
            node.addr,
            Bandwidth::new(BandwidthLimit::BytesPerSec(egress_mbps * 1_000_000)),
            Arc::clone(&egress),
        ));

        println!(
            "{CLIENTS} clients, {mib} MiB each, node egress capped at {egress_mbps} MB/s\n"
        );
        println!("| peering | all done (s) | node egress (MiB) | × file | from cache (MiB) | from peers (MiB) | from origin (MiB) |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut results = Vec::new();
        for (run, peering) in [false, true].into_iter().enumerate() {
            let outcome = swarm(proxy, &egress, &url, &digest, peering, run).await;
            let to_mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
            println!(
                "| {} | {:.1} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} |",
                if peering { "on (mode 1)" } else { "off (mode 0)" },
                outcome.seconds,
                to_mib(outcome.egress),
                to_mib(outcome.egress) / mib as f64,
                to_mib(outcome.from_cache),
                to_mib(outcome.from_peers),
                to_mib(outcome.from_http),
            );
            results.push(outcome);
        }
        println!(
            "\npeering on: {:.2}× the time, {:.2}× the node egress of peering off",
            results[1].seconds / results[0].seconds,
            results[1].egress as f64 / results[0].egress as f64
        );
    });
}
