//! Listeners and the connection loop: accept on the client and admin listeners, serve each
//! connection with hyper (HTTP/1.1 and HTTP/2), and shut down gracefully when told to.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0` and
//! run many nodes in one process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::ValidConfig;
use crate::error::DiskError;
use crate::node::Node;
use crate::{admin, serve};

/// Runs a node until `shutdown` completes, then waits up to `server.shutdown_grace` for open
/// connections to finish.
pub async fn run(
    config: ValidConfig,
    client_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DiskError> {
    let node = Node::open(&config)?;
    run_node(
        node,
        client_listener,
        admin_listener,
        shutdown,
        config.raw.server.shutdown_grace,
    )
    .await;
    Ok(())
}

/// Runs an already opened node (tests use this to inspect the node while it runs).
pub async fn run_node(
    node: Arc<Node>,
    client_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    shutdown_grace: Duration,
) {
    tracing::info!(
        listen = %client_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        disk_backend = node.storage.backend_name(),
        "cache-node serving"
    );
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = client_listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let node = node.clone();
                let service = service_fn(move |request| serve::handle(node.clone(), request));
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(error = %error, "client connection ended with an error");
                    }
                });
            }
            accepted = admin_listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let node = node.clone();
                let service = service_fn(move |request| admin::handle(node.clone(), request));
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: no new connections, waiting for open ones");
    drop(client_listener);
    drop(admin_listener);
    let deadline = tokio::time::Instant::now() + shutdown_grace;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?shutdown_grace,
            "connections still open after the grace period; closing them"
        );
    }
    // Fills keep running without clients; give them the rest of the grace period so the slices
    // they are writing land on disk rather than being fetched again after the restart.
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    while node.index.inflight_slice_count() > 0 && tokio::time::Instant::now() < deadline {
        ticker.tick().await;
    }
    let unfinished = node.index.inflight_slice_count();
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "exiting with fills in flight; their slices will be fetched again"
        );
    }
}
