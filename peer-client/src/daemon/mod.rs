//! `peer-client daemon`: the service that runs downloads into the content cache and announces
//! them, the peer port that serves them, upload accounting and the local control API.

pub mod control;
pub(crate) mod file_refs;
pub mod peer_server;
pub mod service;
pub mod uploads;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::daemon::control::ControlListener;
use crate::daemon::peer_server::ConnectionLimits;
use crate::daemon::service::Daemon;

/// The top of the daemon: it wires the peer port, the control API and the service's background
/// tasks together. It lives here, above all three, so that neither the service nor the peer
/// port depends on the control API.
impl Daemon {
    /// Serves peers, the control API and the background tasks until `shutdown` resolves.
    pub async fn run(
        self,
        peer_listener: TcpListener,
        control_listener: ControlListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let (stop_sender, stop) = tokio::sync::watch::channel(false);
        let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        let peers = {
            let shared = self.shared();
            let limits = ConnectionLimits::from_config(
                &shared.config.raw.daemon,
                Arc::clone(&shared.stats.slow_peers_dropped),
            );
            let port = Arc::new(shared.peer_port());
            peer_server::serve_http(
                peer_listener,
                limits,
                move |request, remote: SocketAddr| {
                    peer_server::handle(Arc::clone(&port), request, remote.ip())
                },
                stopped(stop.clone()),
            )
        };
        let status = control::serve(self.clone(), control_listener, stopped(stop.clone()));
        let background = self.background(stopped(stop.clone()));
        let trigger = async move {
            shutdown.await;
            let _ = stop_sender.send(true);
        };
        tokio::join!(peers, status, background, trigger);
    }
}
