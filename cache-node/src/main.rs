//! The `cache-node` binary: parse arguments, load and validate the config, set up logging, bind
//! the listeners and run the node until SIGTERM or Ctrl-C. The subcommands run without a
//! config: `tls` (keys and certificates) and `prefill` (a job on a running node, in
//! `cache_node::cli::prefill`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;

use cache_node::config::Config;

/// Outpost cache-node: an MCC-compatible range-serving HTTP cache.
#[derive(Debug, Parser)]
#[command(version)]
struct Arguments {
    /// The TOML configuration file. Keys can be overridden with CACHE_NODE__<SECTION>__<KEY>.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Ask the running node's admin `/health` (at the configured `admin.listen`) and exit 0 when
    /// it answers 200. For container health checks: the image has no shell and no curl.
    #[arg(long)]
    health_check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Keys, certificate requests and certificates for the TLS listener ([tls]).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Submit a URL list as a prefill job to a running node's admin listener and follow it with
    /// a progress bar. Exit status: 0 every URL stored, 1 some failed (listed on stderr), 2
    /// usage, connection or token errors, 130 interrupted (the job is cancelled first).
    Prefill(PrefillArguments),
}

#[derive(Debug, clap::Args)]
struct PrefillArguments {
    /// The node's admin listener (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// The admin token (admin.token). Prefer --token-file or OUTPOST_ADMIN_TOKEN: a command line
    /// is visible to every user of the machine.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file whose first line is the admin token.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Return once the job is accepted, printing its id, instead of following it.
    #[arg(long)]
    detach: bool,
    /// The URL list: one URL per line (`#` comments allowed) or a JSON array; `-` for stdin.
    urls: std::path::PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum TlsCommand {
    /// Write a new private key (mode 0600) and a certificate signing request (CSR) to have
    /// signed by your CA. Install the signed certificate as tls.cert and the key as tls.key.
    Request {
        /// A DNS name or IP address clients use to reach the node; repeat for each. The first
        /// is also the subject's common name.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Where to write the new private key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the CSR (PEM).
        #[arg(long)]
        csr: PathBuf,
    },
    /// Write a new private key (mode 0600) and a self-signed certificate, for labs and tests.
    SelfSigned {
        /// A DNS name or IP address clients use to reach the node; repeat for each.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Where to write the certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Where to write the private key (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Print the subject, SANs, serial and validity of the first certificate of a PEM file, as
    /// JSON (to check a signed certificate before installing it).
    Show {
        /// The PEM file.
        #[arg(long)]
        cert: PathBuf,
    },
}

fn run_tls_command(command: TlsCommand) -> anyhow::Result<()> {
    use cache_node::tls::issue;
    match command {
        TlsCommand::Request { sans, key, csr } => {
            issue::write_request(&sans, &key, &csr)?;
            println!(
                "wrote the private key to {} (mode 0600) and the certificate request to {}; have your CA sign the request, then set tls.cert to the signed certificate and tls.key to {}",
                key.display(),
                csr.display(),
                key.display()
            );
        }
        TlsCommand::SelfSigned {
            sans,
            cert,
            key,
            days,
        } => {
            issue::write_self_signed(&sans, days, &cert, &key)?;
            println!(
                "wrote a self-signed certificate to {} and its private key to {} (mode 0600), valid for {days} days",
                cert.display(),
                key.display()
            );
        }
        TlsCommand::Show { cert } => {
            use rustls_pki_types::pem::PemObject;
            let bytes =
                std::fs::read(&cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let der = rustls_pki_types::CertificateDer::from_pem_slice(&bytes)
                .with_context(|| format!("{} holds no PEM certificate", cert.display()))?;
            let info = cache_node::tls::pair::describe(&der)
                .map_err(|reason| anyhow::anyhow!("{}: {reason}", cert.display()))?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    let arguments = Arguments::parse();
    match arguments.command {
        Some(Command::Tls(command)) => {
            run_tls_command(command)?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Some(Command::Prefill(prefill)) => {
            let status = cache_node::cli::prefill::run(cache_node::cli::prefill::PrefillOptions {
                admin: prefill.admin,
                token: prefill.token,
                token_file: prefill.token_file,
                urls: prefill.urls,
                detach: prefill.detach,
            });
            return Ok(std::process::ExitCode::from(status));
        }
        None => {}
    }
    let config = Config::load(arguments.config.as_deref())?;
    let config = config.validate()?;
    let set_log_level = init_logging(&config.raw.log.level, &config.raw.log.format)?;
    if arguments.check_config {
        println!("configuration is valid");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if arguments.health_check {
        health_check(config.admin_listen)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if !cache_node::api::admin::token_is_usable(&config.raw.admin.token) {
        tracing::warn!("{}", cache_node::api::admin::TOKEN_UNSET_MESSAGE);
    }
    // Before the node opens: the connection cap of `server.max_connections = 0` is derived from
    // the limit in force.
    match cache_node::server::connections::raise_fd_limit() {
        Ok(limit) => tracing::info!(
            before = limit.before,
            open_files = limit.after,
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(error) => tracing::warn!(
            %error,
            open_files = cache_node::server::connections::soft_fd_limit(),
            "cannot raise the open-file limit (RLIMIT_NOFILE); keeping it"
        ),
    }
    if config.raw.origin.is_empty() && config.raw.server.default_upstream.is_none() {
        tracing::warn!("no [[origin]] is configured: every request will be refused with 403");
    }
    // The client listeners are bound before the workers start, one per worker on the same port
    // (and as many TLS listeners on the TLS port).
    let plain_listeners =
        cache_node::server::bind_client_listeners(config.server_listen, config.workers)
            .with_context(|| format!("server.listen: cannot bind {}", config.server_listen))?;
    let tls_listeners = match &config.tls {
        Some(tls) => cache_node::server::bind_client_listeners(tls.listen, config.workers)
            .with_context(|| format!("tls.listen: cannot bind {}", tls.listen))?,
        None => Vec::new(),
    };
    let client_listeners = cache_node::server::ClientListeners {
        plain: plain_listeners,
        tls: tls_listeners,
    };
    // This runtime runs start-up (store recovery), the admin listener and signal handling; the
    // client-facing workers run their own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("admin.listen: cannot bind {}", config.admin_listen))?;
        let reload_source = cache_node::server::reload::ReloadSource {
            path: arguments.config.clone(),
            set_log_level: Some(set_log_level),
        };
        cache_node::server::run(
            config,
            client_listeners,
            admin_listener,
            shutdown_signal(),
            reload_source,
        )
        .await
        .context("cannot open the cache store")?;
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Timeout of the whole `--health-check` request.
const HEALTH_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

fn health_check(admin_listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    // A wildcard listen address is reached on loopback.
    let mut address = admin_listen;
    if address.ip().is_unspecified() {
        address.set_ip(match address {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let status = runtime.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{address}/health").parse()?;
        let response = tokio::time::timeout(HEALTH_CHECK_TIMEOUT, client.get(uri))
            .await
            .with_context(|| format!("no answer from http://{address}/health within 3 s"))??;
        let status = response.status();
        let _ = response.into_body().collect().await;
        anyhow::Ok(status)
    })?;
    anyhow::ensure!(
        status.is_success(),
        "http://{address}/health answered {status}"
    );
    println!("healthy");
    Ok(())
}

/// Installs the logger, and returns what sets its level again on a config reload.
fn init_logging(
    level: &str,
    format: &str,
) -> anyhow::Result<cache_node::server::reload::LogLevelSetter> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .with_context(|| format!("log.level: \"{level}\" is not a filter; use e.g. \"info\""))?;
    fn setter<S: 'static>(
        handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
    ) -> cache_node::server::reload::LogLevelSetter {
        Box::new(move |level: &str| {
            let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|error| {
                format!("\"{level}\" is not a filter ({error}); use e.g. \"info\"")
            })?;
            handle.reload(filter).map_err(|error| error.to_string())
        })
    }
    if format == "json" {
        let builder = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Ok(setter(handle))
    } else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        builder.init();
        Ok(setter(handle))
    }
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
