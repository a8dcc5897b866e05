//! The `peer-client` binary: parse arguments, load and validate the config, run one download
//! with [`peer_client::Downloader`], show its progress and print its status.
//!
//! `peer-client daemon` serves peers on port 7680 and the local control API on a Unix socket;
//! `status` and `perf-snap` ask that API; `get` hands its work to the daemon when one is running
//! and accepts it from this user (so the download is cached and served to peers), and downloads
//! by itself otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc;

use peer_client::content::integrity::parse_sha256_hex;
use peer_client::daemon::control::{self, ControlListener, HandOffOutcome};
use peer_client::{Config, DownloadRequest, Downloader, Event};

/// Outpost peer-client: downloads through the branch office's cache node, falling back to the
/// origin, in the manner of Windows Delivery Optimization.
#[derive(Debug, Parser)]
#[command(version)]
struct Arguments {
    /// The TOML configuration file. Keys can be overridden with PEER_CLIENT__<KEY> and
    /// PEER_CLIENT__<SECTION>__<KEY>.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download a URL to a file (through the running daemon, when it takes this user's downloads:
    /// its own user and root). The file is written only once verified.
    Get(GetArguments),
    /// Run the daemon: serve cached pieces to peers, announce them, answer the control API.
    Daemon,
    /// List the daemon's current and cached downloads (JSON, DO's field names).
    Status,
    /// The daemon's totals: files and bytes down and up, cache size, connections by source.
    PerfSnap,
}

#[derive(Debug, clap::Args)]
struct GetArguments {
    /// The URL to download (http:// or https://).
    url: String,
    /// Where to write the file. The partial file and resume state live beside it until the
    /// download is complete and verified.
    #[arg(short, long)]
    output: PathBuf,
    /// A cache host (host or host:port); repeat the flag or give a comma list. Overrides the
    /// configured `cache_hosts`.
    #[arg(long = "cache-host", value_delimiter = ',')]
    cache_hosts: Vec<String>,
    /// A PEM file of CA certificates to trust for `https://` cache hosts besides the system
    /// roots (the enterprise CA that signed the node's certificate). Overrides `cache.ca_file`.
    #[arg(long)]
    ca_file: Option<String>,
    /// The expected SHA-256 of the file (64 hex digits).
    #[arg(long)]
    sha256: Option<String>,
    /// Delivery Optimization download mode: 0, 1, 2, 3, 99 or 100.
    #[arg(long)]
    download_mode: Option<u8>,
    /// Seconds to keep trying cache hosts before using the origin (-1: never).
    #[arg(long, allow_hyphen_values = true)]
    delay_cache_fallback_secs: Option<i64>,
    /// Bandwidth cap: "0", a rate such as "10MiB" (per second), or a percentage such as "50%".
    #[arg(long)]
    max_download_bandwidth: Option<String>,
    /// Print the final status as JSON with Delivery Optimization's field names.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Download in this process even when a daemon is running (nothing is cached for peers).
    /// `--cache-host`, `--download-mode`, `--delay-cache-fallback-secs` and
    /// `--max-download-bandwidth` imply it: the daemon downloads with its own configuration.
    #[arg(long)]
    no_daemon: bool,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    match run(arguments) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("peer-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(arguments: Arguments) -> anyhow::Result<ExitCode> {
    let config = Config::load(arguments.config.as_deref())?;
    match arguments.command {
        Command::Get(get) => run_get(config, get),
        Command::Daemon => run_daemon(config),
        Command::Status => ask_daemon(config, "/v1/status"),
        Command::PerfSnap => ask_daemon(config, "/v1/perf-snap"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn run_daemon(config: Config) -> anyhow::Result<ExitCode> {
    let config = config.validate()?;
    init_logging(&config.raw.log.level)?;
    runtime()?.block_on(async move {
        let peers = tokio::net::TcpListener::bind(config.daemon.listen)
            .await
            .with_context(|| format!("daemon.listen: cannot bind {}", config.daemon.listen))?;
        let socket = config.raw.daemon.control_socket.clone();
        let control = ControlListener::bind(&socket)
            .with_context(|| format!("daemon.control_socket: cannot bind {}", socket.display()))?;
        let daemon = peer_client::daemon::service::Daemon::new(config, peers.local_addr()?)
            .context("cannot open daemon.cache_dir")?;
        tracing::info!(peers = %peers.local_addr()?, control = %socket.display(), "daemon running");
        daemon
            .run(peers, control, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
        Ok(ExitCode::SUCCESS)
    })
}

/// GETs a control API path and prints the JSON.
fn ask_daemon(config: Config, path: &str) -> anyhow::Result<ExitCode> {
    let config = config.validate()?;
    let socket = config.raw.daemon.control_socket;
    let text = runtime()?
        .block_on(control::get_text(&socket, path))
        .context("is the daemon running? (daemon.control_socket)")?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

fn run_get(mut config: Config, get: GetArguments) -> anyhow::Result<ExitCode> {
    if !get.cache_hosts.is_empty() {
        config.cache_hosts = get.cache_hosts.clone();
    }
    if let Some(mode) = get.download_mode {
        config.download_mode = mode;
    }
    if let Some(ca_file) = &get.ca_file {
        config.cache.ca_file = ca_file.clone();
    }
    if let Some(delay) = get.delay_cache_fallback_secs {
        config.delay_cache_fallback_secs = delay;
    }
    if let Some(cap) = &get.max_download_bandwidth {
        config.max_download_bandwidth = cap.clone();
    }
    let config = config.validate()?;
    init_logging(&config.raw.log.level)?;
    let sha256 = get
        .sha256
        .as_deref()
        .map(parse_sha256_hex)
        .transpose()
        .map_err(anyhow::Error::msg)
        .context("--sha256")?;

    runtime()?.block_on(async move {
        // The daemon downloads with its own configuration, so flags that change how to
        // download mean this process does it.
        let overridden = !get.cache_hosts.is_empty()
            || get.ca_file.is_some()
            || get.download_mode.is_some()
            || get.delay_cache_fallback_secs.is_some()
            || get.max_download_bandwidth.is_some();
        if !get.no_daemon && !overridden {
            let socket = &config.raw.daemon.control_socket;
            match control::hand_off(socket, &get.url, sha256, &get.output).await? {
                HandOffOutcome::Done(status) => {
                    if get.json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else if !get.quiet {
                        eprintln!("{}: downloaded by the daemon", get.output.display());
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                HandOffOutcome::NotPermitted(reason) => {
                    if !get.quiet {
                        eprintln!(
                            "peer-client: the daemon does not take downloads from this user ({reason}); downloading in this process"
                        );
                    }
                }
                HandOffOutcome::NoDaemon => {}
            }
        }
        let downloader = Downloader::new(config);
        let (events, event_receiver) = mpsc::unbounded_channel();
        let mut request = DownloadRequest::new(get.url.clone(), get.output.clone());
        request.sha256 = sha256;
        request.events = Some(events);
        let cancel = request.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
        let show_bar = !get.quiet && std::io::stderr().is_terminal();
        let display = tokio::spawn(show_progress(event_receiver, show_bar));
        let result = downloader.download(request).await;
        let _ = display.await;
        match result {
            Ok(status) => {
                if get.json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else if !get.quiet {
                    eprintln!(
                        "{}: {} in {} ({} from cache, {} from the origin)",
                        get.output.display(),
                        HumanBytes(status.file_size),
                        status.download_duration,
                        HumanBytes(status.bytes_from_cache_server),
                        HumanBytes(status.bytes_from_http),
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                if get.json {
                    let failure = serde_json::json!({
                        "Status": "Error",
                        "Error": error.to_string(),
                        "ErrorSource": error.error_source(),
                        "RetryLaterMayHelp": error.retry_later_may_help(),
                    });
                    println!("{}", serde_json::to_string_pretty(&failure)?);
                }
                Err(anyhow::Error::new(error))
            }
        }
    })
}

/// Draws the progress bar (on a terminal) until the download's event channel closes.
async fn show_progress(mut events: mpsc::UnboundedReceiver<Event>, show_bar: bool) {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if !show_bar {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}\n{msg}",
        )
        .expect("the template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    while let Some(event) = events.recv().await {
        match event {
            Event::Started {
                file_len,
                resumed_bytes,
            } => {
                bar.set_length(file_len);
                bar.set_position(resumed_bytes);
                bar.reset_eta();
            }
            Event::Progress(progress) => {
                bar.set_position(progress.done_bytes);
                let per_source: Vec<String> = progress
                    .sources
                    .iter()
                    .filter(|source| source.bytes > 0 || source.connections > 0)
                    .map(|source| {
                        format!(
                            "{}: {} ({} conn)",
                            source.label,
                            HumanBytes(source.bytes),
                            source.connections
                        )
                    })
                    .collect();
                bar.set_message(per_source.join(" · "));
            }
            // Failed requests are logged (at warn) by the library.
            Event::SourceFailed { .. } => {}
            Event::FallbackToOrigin => bar.println("falling back to the origin"),
            Event::Verifying => bar.set_message("verifying SHA-256"),
            Event::Repairing { pieces } => bar.println(format!(
                "SHA-256 mismatch: refetching {pieces} pieces from the origin"
            )),
            Event::PeerBanned { label } => bar.println(format!("{label} sent bad pieces: banned")),
            Event::PeersFound { .. } | Event::PieceWritten { .. } => {}
        }
    }
    bar.finish_and_clear();
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .with_context(|| format!("log.level: \"{level}\" is not a filter; use e.g. \"warn\""))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}
