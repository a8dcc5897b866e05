//! Listeners and connection loops, thread-per-core.
//!
//! The node serves clients on `server.workers` worker threads (one per core by default). Each
//! worker owns a single-threaded runtime and its own `SO_REUSEPORT` listener on the client
//! address, so the kernel spreads new connections across workers and a connection lives on one
//! thread from accept to close. With the io_uring backend a worker's runtime is a tokio-uring
//! runtime whose ring also runs the disk jobs its requests submit
//! ([`crate::disk::uring::attach_worker_ring`]); with the portable backend it is a plain tokio
//! current-thread runtime. The request path is the same either way.
//!
//! Everything else is shared through the [`Node`]: the index, the pending discoveries, the fill
//! limits, the origin client and the counters. A fill runs on the worker whose request started
//! it and feeds clients on any worker.
//!
//! Client sockets are `ZeroCopyStream`s, so stored slices go out with `sendfile` (see
//! `crate::http::sendfile`). The admin listener runs on the caller's runtime.
//!
//! Every accepted connection, on either listener, is first admitted by its listener's
//! [`ConnectionTable`] (the caps), then served under a watchdog (the header and idle timeouts;
//! see [`crate::server::connections`]). Requests whose target or `Host` routing cannot trust are
//! answered 400 here, before the request handler sees them (`router::check_request`).
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind `127.0.0.1:0` and
//! run many nodes in one process.

pub mod connections;
pub(crate) mod dispatch;
mod primed_body;
pub mod reload;
mod starting;
pub(crate) mod startup;
mod tls_watch;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::api::admin;
use crate::api::auth_throttle::AuthThrottle;
use crate::api::readiness::Readiness;
use crate::api::reload::Reload;
use crate::config::ValidConfig;
use crate::error::DiskError;
use crate::history::Sample;
use crate::http::client_key::{ClientAddr, ClientScheme};
use crate::http::sendfile::{SpanQueue, ZeroCopyStream};
use crate::node::Node;
use crate::serve::{text_response, ResponseBody};
use crate::server::connections::{ConnectionGuard, ConnectionTable, TrackedBody, WatchedIo};
use crate::server::primed_body::PrimedBody;
use crate::server::reload::{ConfigReloader, ReloadSource};
use crate::server::starting::answer_while_starting;
use crate::stats::EdgeCounters;
use crate::upstream::router;

/// Pending connections each listener queues before the kernel refuses more.
const LISTEN_BACKLOG: i32 = 1024;

/// Pause after a failed `accept` (for example, out of file descriptors) before trying again.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Binds `workers` listeners on `address` sharing the port with `SO_REUSEPORT`: one per worker.
/// Port 0 picks a free port for the first and binds the rest to the same one.
pub fn bind_client_listeners(
    address: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = reuse_port_listener(address)?;
    let bound = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers.max(1) {
        listeners.push(reuse_port_listener(bound)?);
    }
    Ok(listeners)
}

fn reuse_port_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The client-facing listeners: one plain listener per worker and, with `[tls]`, one TLS
/// listener per worker beside it (each set sharing its port with `SO_REUSEPORT`). Worker `i`
/// accepts on `plain[i]` and `tls[i]`.
#[derive(Debug, Default)]
pub struct ClientListeners {
    /// `server.listen`, one per worker.
    pub plain: Vec<std::net::TcpListener>,
    /// `tls.listen`, one per worker, or none when TLS is off.
    pub tls: Vec<std::net::TcpListener>,
}

impl From<Vec<std::net::TcpListener>> for ClientListeners {
    fn from(plain: Vec<std::net::TcpListener>) -> ClientListeners {
        ClientListeners {
            plain,
            tls: Vec::new(),
        }
    }
}

/// Runs a node until `shutdown` completes, then waits up to `server.shutdown_grace` for open
/// connections to finish.
pub async fn run(
    config: ValidConfig,
    client_listeners: impl Into<ClientListeners>,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    reload_source: ReloadSource,
) -> Result<(), DiskError> {
    let opening = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Node::open(&config))
    };
    let opened = answer_while_starting(&admin_listener, opening).await;
    let node = match opened {
        Ok(opened) => opened?,
        Err(panicked) => std::panic::resume_unwind(panicked.into_panic()),
    };
    let reload: Arc<dyn Reload> = Arc::new(ConfigReloader::new(
        node.clone(),
        reload_source,
        config.raw.clone(),
    ));
    serve_node(
        node,
        client_listeners,
        admin_listener,
        shutdown,
        config.raw.server.shutdown_grace,
        Some(reload),
    )
    .await;
    Ok(())
}

/// Runs an already opened node (tests use this to inspect the node while it runs): one worker
/// thread per plain client listener (each also accepting on its TLS listener, if any), and the
/// admin listener on the calling runtime.
pub async fn run_node(
    node: Arc<Node>,
    client_listeners: impl Into<ClientListeners>,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    shutdown_grace: Duration,
) {
    serve_node(
        node,
        client_listeners,
        admin_listener,
        shutdown,
        shutdown_grace,
        None,
    )
    .await;
}

/// [`run_node`], reloading the config with `reload` on `SIGHUP` and `POST /reload` when given.
async fn serve_node(
    node: Arc<Node>,
    client_listeners: impl Into<ClientListeners>,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    shutdown_grace: Duration,
    reload: Option<Arc<dyn Reload>>,
) {
    let ClientListeners {
        plain: client_listeners,
        tls: tls_listeners,
    } = client_listeners.into();
    let tls_acceptor = match (&node.tls, tls_listeners.is_empty()) {
        (Some(certificate), false) => {
            tracing::info!(
                listen = %tls_listeners[0].local_addr().map(|a| a.to_string()).unwrap_or_default(),
                subject = %certificate.current().info.subject,
                sans = ?certificate.current().info.sans,
                serial = %certificate.current().info.serial,
                not_after = %certificate.current().info.not_after,
                "TLS listener serving"
            );
            Some(tokio_rustls::TlsAcceptor::from(certificate.server_config()))
        }
        (None, false) => {
            tracing::error!("TLS listeners were given to a node without [tls]; not serving them");
            None
        }
        _ => None,
    };
    let mut tls_listeners = tls_listeners.into_iter();
    tracing::info!(
        listen = %client_listeners.first().and_then(|listener| listener.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        workers = client_listeners.len(),
        disk_backend = node.storage.backend_name(),
        "cache-node serving"
    );
    let stop = CancellationToken::new();
    if !node.summary_interval.is_zero() {
        tokio::spawn(log_traffic_summaries(node.clone(), stop.clone()));
    }
    tokio::spawn(sample_history(node.clone(), stop.clone()));
    if let Some(reload) = &reload {
        tokio::spawn(reload::reload_on_hangup(reload.clone(), stop.clone()));
    }
    if let Some(certificate) = &node.tls {
        tokio::spawn(tls_watch::watch_certificate(
            certificate.clone(),
            node.stats.clone(),
            stop.clone(),
        ));
    }
    let client_connections = ConnectionTable::new(node.connection_limits, node.stats.edge.clone());
    tracing::info!(
        max_connections = node.connection_limits.max_connections,
        max_connections_per_client = node.connection_limits.max_connections_per_client,
        header_read_timeout = ?node.connection_limits.header_read_timeout,
        idle_timeout = ?node.connection_limits.idle_timeout,
        "client connection limits"
    );
    let readiness = Arc::new(Readiness::new(client_listeners.len(), stop.clone()));
    let mut workers_done = Vec::new();
    for (index, listener) in client_listeners.into_iter().enumerate() {
        let (done, finished) = oneshot::channel::<()>();
        let tls = match (&tls_acceptor, tls_listeners.next()) {
            (Some(acceptor), Some(tls_listener)) => Some((tls_listener, acceptor.clone())),
            _ => None,
        };
        let worker = Worker {
            node: node.clone(),
            listener,
            tls,
            connections: client_connections.clone(),
            stop: stop.clone(),
            shutdown_grace,
            readiness: readiness.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("outpost-worker-{index}"))
            .spawn(move || {
                worker.run();
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => workers_done.push(finished),
            Err(error) => tracing::error!(%error, index, "cannot start a worker thread"),
        }
    }

    let admin_graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let admin_node = node.clone();
    // Failed admin-token attempts per client address, the prefill jobs, and readiness.
    let admin_context = Arc::new(admin::AdminContext {
        throttle: AuthThrottle::default(),
        prefill: Arc::new(crate::api::prefill::PrefillJobs::new(&node)),
        readiness: readiness.clone(),
        reload,
    });
    // Scheduled prefills submit their jobs to the same prefill jobs as the admin API.
    // (Always running: a config reload may add schedules.)
    tokio::spawn(crate::api::prefill_schedule::run(
        node.clone(),
        admin_context.prefill.clone(),
        crate::cache::store::unix_now,
        stop.clone(),
    ));
    // The admin listener's own caps, and counters that stay out of the client listener's.
    let admin_connections =
        ConnectionTable::new(node.connection_limits.admin(), EdgeCounters::default());
    let accept_admin = accept_until(
        &admin_listener,
        &stop,
        &admin_connections,
        |stream, peer, admitted| {
            let state = admitted.state().clone();
            let node = admin_node.clone();
            let context = admin_context.clone();
            let service = service_fn(move |mut request: Request<Incoming>| {
                let in_flight = state.start_request();
                request.extensions_mut().insert(ClientAddr(peer));
                let node = node.clone();
                let context = context.clone();
                async move {
                    let response = admin::handle(node, context, request).await?;
                    Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
                }
            });
            let io = TokioIo::new(WatchedIo::new(stream, admitted.state().clone()));
            let connection = builder.serve_connection(io, service).into_owned();
            let connection = admin_graceful.watch(connection);
            tokio::spawn(admitted.supervise(connection));
        },
    );
    tokio::pin!(shutdown);
    tokio::select! {
        () = accept_admin => {}
        () = &mut shutdown => {}
    }
    tracing::info!("shutting down: no new connections, waiting for open ones");
    stop.cancel();
    drop(admin_listener);
    let _ = tokio::time::timeout(shutdown_grace, admin_graceful.shutdown()).await;
    for finished in workers_done {
        let _ = finished.await;
    }
    let unfinished = node.index.inflight_slice_count();
    if unfinished > 0 {
        tracing::warn!(
            unfinished,
            "exiting with fills in flight; their slices will be fetched again"
        );
    }
}

/// Samples the counters into `Node::history` every `admin.history_interval`, from start until
/// `stop`.
async fn sample_history(node: Arc<Node>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(node.history.interval());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let snapshot = node.stats_snapshot();
        node.history
            .record(Sample::of(&snapshot, crate::cache::store::unix_now()));
    }
}

/// Logs a traffic summary every `log.summary_interval` with traffic in it, until `stop`.
async fn log_traffic_summaries(node: Arc<Node>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(node.summary_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut previous = node.stats_snapshot();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        let current = node.stats_snapshot();
        if let Some(summary) = crate::stats::TrafficSummary::between(&previous, &current) {
            tracing::info!(
                interval = %humantime::format_duration(node.summary_interval),
                requests = summary.requests,
                hit_bytes = summary.hit_bytes,
                miss_bytes = summary.miss_bytes,
                egress_bytes = summary.egress_bytes,
                origin_bytes = summary.origin_bytes,
                hit_ratio_bytes = format!("{:.3}", summary.hit_ratio_bytes),
                cache_used_bytes = current.cache_used_bytes,
                "traffic summary"
            );
        }
        previous = current;
    }
}

/// Accepts connections until `stop` is cancelled, admits each into `connections` (closing it at
/// once when the table says no), and hands the admitted ones to `on_accept` with the client's
/// address.
async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    connections: &Arc<ConnectionTable>,
    mut on_accept: impl FnMut(TcpStream, SocketAddr, ConnectionGuard),
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Some(admitted) = connections.admit(peer.ip()) {
                        on_accept(stream, peer, admitted);
                    }
                    // Let the connections this accept shed close before accepting more.
                    if connections.is_shedding() {
                        tokio::task::yield_now().await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
            () = stop.cancelled() => return,
        }
    }
}

/// The 400 answer to a request that [`router::check_request`] refuses, if it does, and the 405
/// to `CONNECT`, whose authority-form target would otherwise be a 400: the node opens no
/// tunnels.
fn refuse_malformed(node: &Node, request: &Request<Incoming>) -> Option<Response<ResponseBody>> {
    if request.method() == http::Method::CONNECT {
        node.stats.requests.inc();
        node.stats.refused_requests.inc();
        return Some(crate::serve::method_not_allowed(request.method()));
    }
    let refusal =
        router::check_request(request.version(), request.uri(), request.headers()).err()?;
    node.stats.requests.inc();
    node.stats.refused_requests.inc();
    node.stats.edge.bad_requests.inc();
    tracing::info!(uri = %request.uri(), %refusal, "refused a malformed request");
    Some(text_response(StatusCode::BAD_REQUEST, refusal.to_string()))
}

/// One serving thread: its runtime, its listeners, and a share of the node.
struct Worker {
    node: Arc<Node>,
    listener: std::net::TcpListener,
    /// Its TLS listener and the acceptor of the node's certificate, when TLS is on.
    tls: Option<(std::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    /// The client listener's table, shared by every worker.
    connections: Arc<ConnectionTable>,
    stop: CancellationToken,
    shutdown_grace: Duration,
    /// Told once this worker accepts.
    readiness: Arc<Readiness>,
}

impl Worker {
    /// Runs the worker's runtime until it has shut down.
    fn run(self) {
        let name = std::thread::current().name().unwrap_or("worker").to_owned();
        if self.node.storage.backend_name() == "io_uring" {
            match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                Ok(runtime) => {
                    runtime.block_on(async move {
                        crate::disk::uring::attach_worker_ring();
                        self.serve().await;
                    });
                    return;
                }
                Err(error) => tracing::warn!(
                    %error,
                    worker = name,
                    "cannot create this worker's io_uring; its disk jobs go to the shared ring"
                ),
            }
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(self.serve()),
            Err(error) => tracing::error!(%error, worker = name, "cannot start a worker runtime"),
        }
    }

    async fn serve(self) {
        let wants_tls = self.tls.is_some();
        let listener = match TcpListener::from_std(self.listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot register a client listener");
                return;
            }
        };
        let tls = match self.tls.map(|(tls_listener, acceptor)| {
            TcpListener::from_std(tls_listener).map(|tls_listener| (tls_listener, acceptor))
        }) {
            Some(Err(error)) => {
                tracing::error!(%error, "cannot register a TLS listener");
                None
            }
            Some(Ok(tls)) => Some(tls),
            None => None,
        };
        if tls.is_some() == wants_tls {
            self.readiness.worker_accepting();
        }
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Queue body frames instead of flattening them, so placeholders reach the socket intact
        // (and, over TLS, rustls encrypts each frame from the pooled buffer it was read into).
        builder.http1().writev(true);
        let served = ServedConnections {
            node: &self.node,
            builder: &builder,
            graceful: &graceful,
        };
        let connections = &self.connections;
        let plain = accept_until(
            &listener,
            &self.stop,
            connections,
            |stream, peer, admitted| served.plain(stream, peer, admitted),
        );
        let tls_accepting = async {
            if let Some((tls_listener, acceptor)) = &tls {
                accept_until(
                    tls_listener,
                    &self.stop,
                    connections,
                    |stream, peer, admitted| served.tls(stream, peer, admitted, acceptor.clone()),
                )
                .await;
            }
        };
        tokio::join!(plain, tls_accepting);
        drop(tls);
        drop(listener);
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        if tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                shutdown_grace = ?self.shutdown_grace,
                "connections still open after the grace period; closing them"
            );
        }
        // Fills keep running without clients, on whichever worker started them; keep this runtime
        // turning for the rest of the grace period so the slices they are writing land on disk
        // rather than being fetched again after the restart.
        let mut ticker = tokio::time::interval(Duration::from_millis(20));
        while self.node.index.inflight_slice_count() > 0 && tokio::time::Instant::now() < deadline {
            ticker.tick().await;
        }
    }
}

/// What the client listeners answer: the handler's response, held in flight until written.
type ClientResponse = Response<TrackedBody<PrimedBody<ResponseBody>>>;

/// What a worker needs to serve an accepted client connection, plain or TLS.
struct ServedConnections<'a> {
    node: &'a Arc<Node>,
    builder: &'a auto::Builder<TokioExecutor>,
    graceful: &'a GracefulShutdown,
}

impl ServedConnections<'_> {
    /// Serves a plain connection: its socket is a `ZeroCopyStream`, so HTTP/1 hits go out with
    /// `sendfile`.
    fn plain(&self, stream: TcpStream, peer: SocketAddr, admitted: ConnectionGuard) {
        let _ = stream.set_nodelay(true);
        let spans = SpanQueue::default();
        let io = TokioIo::new(WatchedIo::new(
            ZeroCopyStream::new(stream, spans.clone()),
            admitted.state().clone(),
        ));
        let service = self.service(peer, &admitted, Some(spans), ClientScheme::Http);
        let connection = self.builder.serve_connection(io, service).into_owned();
        let connection = self.graceful.watch(connection);
        tokio::spawn(async move {
            if let Some(Err(error)) = admitted.supervise(connection).await {
                tracing::debug!(error = %error, "client connection ended with an error");
            }
        });
    }

    /// Serves a TLS connection: the handshake runs under the connection's watchdog, so a client
    /// that stalls in it is closed at `server.header_read_timeout` like one that stalls in its
    /// headers, and it holds its place in the connection table meanwhile. Bodies go through
    /// rustls (no `sendfile`: the kernel has no TLS offload here, see docs/architecture.md).
    fn tls(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        admitted: ConnectionGuard,
        acceptor: tokio_rustls::TlsAcceptor,
    ) {
        let _ = stream.set_nodelay(true);
        let service = self.service(peer, &admitted, None, ClientScheme::Https);
        let builder = self.builder.clone();
        let watcher = self.graceful.watcher();
        let state = admitted.state().clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            let served = async move {
                let tls_stream = match acceptor.accept(stream).await {
                    Ok(tls_stream) => tls_stream,
                    Err(error) => {
                        node.stats.edge.tls_handshake_failures.inc();
                        tracing::debug!(%error, client = %peer, "TLS handshake failed");
                        return Ok(());
                    }
                };
                let io = TokioIo::new(WatchedIo::new(tls_stream, state));
                let connection = builder.serve_connection(io, service).into_owned();
                watcher.watch(connection).await
            };
            match admitted.supervise(served).await {
                Some(Err(error)) => {
                    tracing::debug!(error = %error, "TLS client connection ended with an error");
                }
                Some(Ok(())) => {}
                None => {}
            }
        });
    }

    /// The request handler of one connection. Over TLS each response's head waits for its
    /// first body bytes (see [`primed_body`]), so they share a TLS record.
    fn service(
        &self,
        peer: SocketAddr,
        admitted: &ConnectionGuard,
        spans: Option<SpanQueue>,
        scheme: ClientScheme,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = ClientResponse,
        Error = Infallible,
        Future = impl Future<Output = Result<ClientResponse, Infallible>> + Send + 'static,
    > + Clone
           + Send
           + 'static {
        let client_addr = ClientAddr(peer);
        let state = admitted.state().clone();
        let node = self.node.clone();
        service_fn(move |mut request: Request<Incoming>| {
            let in_flight = state.start_request();
            request.extensions_mut().insert(client_addr);
            request.extensions_mut().insert(scheme);
            let node = node.clone();
            let spans = spans.clone();
            async move {
                let response = match refuse_malformed(&node, &request) {
                    Some(refusal) => refusal,
                    None => dispatch::client_request(node, request, spans).await?,
                };
                let response = match scheme {
                    ClientScheme::Https => primed_body::prime(response).await,
                    ClientScheme::Http => response.map(PrimedBody::unprimed),
                };
                Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
            }
        })
    }
}
