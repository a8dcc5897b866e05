//! The edge of the listeners: how many connections the node holds, from whom, and for how long,
//! so that clients that open connections and send nothing, or send headers a byte at a time,
//! cannot take the node's file descriptors from everyone else.
//!
//! - **Timeouts.** A request's headers must arrive within `server.header_read_timeout`, counted
//!   from the connection's opening for its first request and from the first byte of each later
//!   one; a keep-alive connection waits at most `server.idle_timeout` for its next request. A
//!   watchdog beside each connection ([`ConnectionGuard::supervise`]) enforces both. It sees
//!   request bytes arrive through [`WatchedIo`], and the requests in flight through
//!   [`RequestGuard`]s, which the response body ([`TrackedBody`]) holds until hyper has written
//!   it. (hyper's own HTTP/1 `header_read_timeout` also runs while a keep-alive connection waits
//!   for its next request, so it cannot give idle connections a longer wait than slow headers,
//!   and HTTP/2 has nothing like it; the watchdog covers both protocols the same way.)
//! - **Caps.** A [`ConnectionTable`] counts a listener's connections, in all and per client
//!   address (`ClientKey::address`). Over
//!   `server.max_connections_per_client` the address's oldest idle connection is closed to make
//!   room; at `server.max_connections` the oldest idle connections of any address are, a batch at
//!   a time. When nothing is idle the new connection is refused: closed at once. A connection is
//!   idle when no request of it is in flight: waiting between keep-alive requests, or still
//!   receiving a request's headers. So a flood of silent or slow connections can only push out
//!   other idle connections, never a client being served.
//! - **The fd limit.** [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at
//!   start-up, and `server.max_connections = 0` resolves to half of the limit in force: a busy
//!   connection also holds slice files and an origin connection.
//!
//! The table is shared by every worker thread: one lock per accept and per close, never per
//! request. A connection's own state is atomics.

use outpost_shared::sync::lock;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::config::ServerConfig;
use crate::http::client_key::ClientKey;
pub use crate::http::connection_limits::ConnectionLimits;
use crate::stats::EdgeCounters;

/// `server.max_connections = 0` allows this share (numerator, denominator) of the open-file limit.
const AUTO_SHARE_OF_FD_LIMIT: (u64, u64) = (1, 2);

/// `server.max_connections = 0` never resolves to fewer connections than this.
const MIN_AUTO_CONNECTIONS: usize = 64;

/// The soft open-file limit asked for when the hard limit is unlimited (Linux's default
/// `fs.nr_open`).
const UNLIMITED_FD_TARGET: u64 = 1 << 20;

/// At the global cap, up to 1/this of the cap is shed at once, so one scan of the table makes
/// room for many new connections rather than one.
const SHED_BATCH_DIVISOR: usize = 64;

/// Connections being shed close on their own tasks, a moment after the accept that shed them;
/// meanwhile at most this fraction (1/N) of the cap (and at least [`MIN_SHED_ALLOWANCE`]) may be
/// open beyond it, so a flood cannot outrun the closing and reach the open-file limit.
const SHED_ALLOWANCE_DIVISOR: usize = 16;

/// The least room over the cap for connections still closing.
const MIN_SHED_ALLOWANCE: usize = 16;

/// A refusal at a cap is logged at most this often (in milliseconds); the counter has them all.
const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

/// "No time": no request has started.
const NO_TIME: u64 = u64::MAX;

/// Milliseconds since the first call in this process: the clock of [`ConnectionState`].
fn now_ms() -> u64 {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The client listener's limits; `max_connections = 0` reads the open-file limit now, so
/// call this after [`raise_fd_limit`].
pub fn client_limits(server: &ServerConfig) -> ConnectionLimits {
    let max_connections = match server.max_connections {
        0 => auto_max_connections(soft_fd_limit()),
        configured => configured,
    };
    ConnectionLimits {
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        max_connections,
        max_connections_per_client: server.max_connections_per_client,
    }
}

/// What `server.max_connections = 0` resolves to under an open-file limit of `fd_limit`.
pub fn auto_max_connections(fd_limit: u64) -> usize {
    let (numerator, denominator) = AUTO_SHARE_OF_FD_LIMIT;
    let share = fd_limit.saturating_mul(numerator) / denominator;
    usize::try_from(share)
        .unwrap_or(usize::MAX)
        .max(MIN_AUTO_CONNECTIONS)
}

/// The soft open-file limit in force.
pub fn soft_fd_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(UNLIMITED_FD_TARGET)
}

/// The open-file limit before and after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub after: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `UNLIMITED_FD_TARGET` when the hard
/// limit is unlimited), so the connection cap derived from it is as high as the system allows.
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(UNLIMITED_FD_TARGET);
    let target = limit.maximum.unwrap_or(UNLIMITED_FD_TARGET);
    if before >= target {
        return Ok(FdLimit {
            before,
            after: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    )?;
    Ok(FdLimit {
        before,
        after: soft_fd_limit(),
    })
}

/// What one connection is doing, as the watchdog and the table see it.
#[derive(Debug)]
pub struct ConnectionState {
    id: u64,
    /// Requests whose responses hyper has not finished writing.
    requests_in_flight: AtomicU32,
    /// When the connection last became idle (opened, or its last response finished).
    idle_since_ms: AtomicU64,
    /// When the headers of the next request started to arrive ([`NO_TIME`]: they have not).
    request_started_ms: AtomicU64,
    /// Set under the table's lock when the table closes this connection to make room.
    shed_requested: AtomicBool,
    shed: Notify,
}

/// Why a watchdog let a connection go on or closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Look again after this long.
    Open(Duration),
    /// A request's headers took longer than `header_read_timeout`.
    HeadersTooSlow,
    /// No request for `idle_timeout`.
    Idle,
}

impl ConnectionState {
    fn new(id: u64, now: u64) -> ConnectionState {
        ConnectionState {
            id,
            requests_in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(now),
            // A new connection owes its first request's headers from the start.
            request_started_ms: AtomicU64::new(now),
            shed_requested: AtomicBool::new(false),
            shed: Notify::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.requests_in_flight.load(Ordering::Acquire) == 0
    }

    /// Bytes arrived: on an idle connection they are the start of the next request's headers.
    fn note_bytes_read(&self) {
        if self.is_idle() {
            let _ = self.request_started_ms.compare_exchange(
                NO_TIME,
                now_ms(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// A request's headers have arrived; the connection is busy until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> RequestGuard {
        self.requests_in_flight.fetch_add(1, Ordering::AcqRel);
        self.request_started_ms.store(NO_TIME, Ordering::Release);
        RequestGuard(self.clone())
    }

    fn verdict(&self, limits: &ConnectionLimits, now: u64) -> Verdict {
        let header_limit = millis(limits.header_read_timeout);
        if !self.is_idle() {
            return Verdict::Open(limits.header_read_timeout);
        }
        let started = self.request_started_ms.load(Ordering::Acquire);
        if started != NO_TIME {
            let waited = now.saturating_sub(started);
            return if waited >= header_limit {
                Verdict::HeadersTooSlow
            } else {
                Verdict::Open(Duration::from_millis(header_limit - waited))
            };
        }
        let idle_limit = millis(limits.idle_timeout);
        let idle = now.saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
        if idle >= idle_limit {
            Verdict::Idle
        } else {
            // Look again no later than a header timeout: the next request may start meanwhile.
            Verdict::Open(Duration::from_millis(
                (idle_limit - idle).min(header_limit.max(1)),
            ))
        }
    }
}

/// One request in flight on a connection; dropping it (with the response body) makes the
/// connection idle again when it was the last.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnectionState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let state = &self.0;
        state.idle_since_ms.store(now_ms(), Ordering::Release);
        state.requests_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections of one listener, shared by its workers.
#[derive(Debug)]
pub struct ConnectionTable {
    limits: ConnectionLimits,
    counters: EdgeCounters,
    next_id: AtomicU64,
    last_refusal_log_ms: AtomicU64,
    inner: Mutex<TableInner>,
}

#[derive(Debug, Default)]
struct TableInner {
    connections: HashMap<u64, Arc<ConnectionState>>,
    per_client: HashMap<ClientKey, Vec<u64>>,
    /// Connections told to close that have not closed yet.
    shedding: usize,
}

impl TableInner {
    /// Tells `victim` to close; it leaves the table when its task ends.
    fn shed(&mut self, victim: &ConnectionState, counters: &EdgeCounters) {
        // Counted before the victim can close, so whoever sees it closed sees it counted.
        counters.connections_shed.inc();
        self.shedding += 1;
        victim.shed_requested.store(true, Ordering::Release);
        victim.shed.notify_one();
    }

    /// The `count` connections idle the longest among `ids` (all when `None`), not yet shed.
    fn oldest_idle(&self, ids: Option<&[u64]>, count: usize) -> Vec<Arc<ConnectionState>> {
        let candidates: Box<dyn Iterator<Item = &Arc<ConnectionState>>> = match ids {
            Some(ids) => Box::new(ids.iter().filter_map(|id| self.connections.get(id))),
            None => Box::new(self.connections.values()),
        };
        // Idle the longest first; among connections idle since the same millisecond, the one
        // admitted first (ids grow in admission order).
        let mut idle: Vec<((u64, u64), &Arc<ConnectionState>)> = candidates
            .filter(|state| state.is_idle() && !state.shed_requested.load(Ordering::Acquire))
            .map(|state| {
                (
                    (state.idle_since_ms.load(Ordering::Acquire), state.id),
                    state,
                )
            })
            .collect();
        if idle.len() > count {
            idle.select_nth_unstable_by_key(count, |(age, _)| *age);
            idle.truncate(count);
        }
        idle.into_iter().map(|(_, state)| state.clone()).collect()
    }

    fn live_of(&self, ids: &[u64]) -> usize {
        ids.iter()
            .filter_map(|id| self.connections.get(id))
            .filter(|state| !state.shed_requested.load(Ordering::Acquire))
            .count()
    }
}

impl ConnectionTable {
    /// An empty table enforcing `limits`, counting into `counters`.
    pub fn new(limits: ConnectionLimits, counters: EdgeCounters) -> Arc<ConnectionTable> {
        Arc::new(ConnectionTable {
            limits,
            counters,
            next_id: AtomicU64::new(1),
            last_refusal_log_ms: AtomicU64::new(NO_TIME),
            inner: Mutex::new(TableInner::default()),
        })
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Connections open now (those being shed included).
    pub fn open_count(&self) -> usize {
        self.lock().connections.len()
    }

    /// True while connections told to close have not closed yet: an accept loop should let them
    /// run before it accepts more.
    pub fn is_shedding(&self) -> bool {
        self.lock().shedding > 0
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        lock(&self.inner)
    }

    /// Makes room for a new connection from `client` and records it, or says no (`None`: close
    /// the connection at once). Over a cap, idle connections are shed, oldest first: first of
    /// the same client, then of anyone.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Option<ConnectionGuard> {
        let key = ClientKey::address(client);
        let limits = &self.limits;
        let mut inner = self.lock();
        let ceiling = limits.max_connections
            + (limits.max_connections / SHED_ALLOWANCE_DIVISOR).max(MIN_SHED_ALLOWANCE);
        if inner.connections.len() >= ceiling {
            drop(inner);
            self.refuse(key, "server.max_connections, while shed connections close");
            return None;
        }
        let client_ids = inner.per_client.get(&key).cloned().unwrap_or_default();
        if inner.live_of(&client_ids) >= limits.max_connections_per_client {
            let Some(victim) = inner.oldest_idle(Some(&client_ids), 1).pop() else {
                drop(inner);
                self.refuse(key, "server.max_connections_per_client, none idle");
                return None;
            };
            inner.shed(&victim, &self.counters);
        }
        if inner.connections.len() - inner.shedding >= limits.max_connections {
            let batch = (limits.max_connections / SHED_BATCH_DIVISOR).max(1);
            let victims = inner.oldest_idle(None, batch);
            if victims.is_empty() {
                drop(inner);
                self.refuse(key, "server.max_connections, none idle");
                return None;
            }
            for victim in &victims {
                inner.shed(victim, &self.counters);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState::new(id, now_ms()));
        inner.connections.insert(id, state.clone());
        inner.per_client.entry(key).or_default().push(id);
        self.counters
            .connections_open
            .set(inner.connections.len() as u64);
        Some(ConnectionGuard {
            table: self.clone(),
            state,
            client: key,
        })
    }

    fn refuse(&self, client: ClientKey, cap: &str) {
        self.counters.connections_refused.inc();
        let now = now_ms();
        let last = self.last_refusal_log_ms.load(Ordering::Relaxed);
        let due = last == NO_TIME || now.saturating_sub(last) >= REFUSAL_LOG_INTERVAL_MS;
        if due
            && self
                .last_refusal_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %client,
                cap,
                max_connections = self.limits.max_connections,
                max_connections_per_client = self.limits.max_connections_per_client,
                refused_so_far = self.counters.connections_refused.get(),
                "connection refused at a connection cap (nothing idle to close, or still closing)"
            );
        }
    }

    fn remove(&self, state: &ConnectionState, client: ClientKey) {
        let mut inner = self.lock();
        if inner.connections.remove(&state.id).is_none() {
            return;
        }
        if state.shed_requested.load(Ordering::Acquire) {
            inner.shedding -= 1;
        }
        if let Some(ids) = inner.per_client.get_mut(&client) {
            if let Some(position) = ids.iter().position(|id| *id == state.id) {
                ids.swap_remove(position);
            }
            if ids.is_empty() {
                inner.per_client.remove(&client);
            }
        }
        self.counters
            .connections_open
            .set(inner.connections.len() as u64);
    }
}

/// A connection's place in its table; dropping it gives the place back.
#[derive(Debug)]
pub struct ConnectionGuard {
    table: Arc<ConnectionTable>,
    state: Arc<ConnectionState>,
    client: ClientKey,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table.remove(&self.state, self.client);
    }
}

impl ConnectionGuard {
    /// The connection's state, for [`WatchedIo`] and [`ConnectionState::start_request`].
    pub fn state(&self) -> &Arc<ConnectionState> {
        &self.state
    }

    /// Drives `connection` (a hyper connection) until it ends, or closes it (by dropping it)
    /// when its headers are too slow, it idles too long, or the table sheds it. Returns the
    /// connection's own result when it ended by itself.
    pub async fn supervise<F: Future>(self, connection: F) -> Option<F::Output> {
        tokio::pin!(connection);
        loop {
            let recheck = match self.state.verdict(&self.table.limits, now_ms()) {
                Verdict::Open(recheck) => recheck,
                Verdict::HeadersTooSlow => {
                    self.table.counters.header_timeouts.inc();
                    tracing::debug!(client = %self.client, "closing a connection: request headers too slow");
                    return None;
                }
                Verdict::Idle => {
                    self.table.counters.idle_timeouts.inc();
                    tracing::debug!(client = %self.client, "closing an idle keep-alive connection");
                    return None;
                }
            };
            tokio::select! {
                biased;
                output = &mut connection => return Some(output),
                () = self.state.shed.notified() => {
                    tracing::debug!(client = %self.client, "closing an idle connection to make room");
                    return None;
                }
                () = tokio::time::sleep(recheck) => {}
            }
        }
    }
}

/// A connection's socket, noting when request bytes arrive on an idle connection.
#[derive(Debug)]
pub struct WatchedIo<S> {
    inner: S,
    state: Arc<ConnectionState>,
}

impl<S> WatchedIo<S> {
    /// Wraps `inner`, reporting to `state`.
    pub fn new(inner: S, state: Arc<ConnectionState>) -> WatchedIo<S> {
        WatchedIo { inner, state }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buffer.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(context, buffer);
        if matches!(polled, Poll::Ready(Ok(()))) && buffer.filled().len() > before {
            this.state.note_bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(context, buffer)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Forwarded as is: the zero-copy stream recognises its placeholders among these slices.
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(context)
    }
}

/// A response body that keeps its request counted as in flight until it has been written.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    request: Option<RequestGuard>,
}

impl<B> TrackedBody<B> {
    /// `inner`, holding `request` until it ends or is dropped.
    pub fn new(inner: B, request: RequestGuard) -> TrackedBody<B> {
        TrackedBody {
            inner,
            request: Some(request),
        }
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(context);
        if matches!(polled, Poll::Ready(None)) {
            this.request = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_connections_per_client: usize) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections,
            max_connections_per_client,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn clients_are_addresses_or_their_ipv6_networks() {
        let address = ClientKey::address;
        let network = ClientKey::network;
        assert_eq!(address(ip("10.0.0.1")), address(ip("::ffff:10.0.0.1")));
        assert_ne!(address(ip("10.0.0.1")), address(ip("10.0.0.2")));
        assert_ne!(address(ip("fd00:1:2:3::1")), address(ip("fd00:1:2:3::2")));
        assert_eq!(network(ip("10.0.0.1")), network(ip("::ffff:10.0.0.1")));
        assert_ne!(network(ip("10.0.0.1")), network(ip("10.0.0.2")));
        assert_eq!(
            network(ip("fd00:1:2:3::1")),
            network(ip("fd00:1:2:3:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(network(ip("fd00:1:2:3::1")), network(ip("fd00:1:2:4::1")));
        assert_eq!(network(ip("fd00:1:2:3::1")).to_string(), "fd00:1:2:3::");
    }

    #[test]
    fn the_automatic_cap_is_half_the_fd_limit() {
        assert_eq!(auto_max_connections(1024), 512);
        assert_eq!(auto_max_connections(1 << 20), 1 << 19);
        assert_eq!(auto_max_connections(50), MIN_AUTO_CONNECTIONS);
    }

    #[test]
    fn over_the_client_cap_the_clients_oldest_idle_connection_makes_room() {
        let counters = EdgeCounters::default();
        let table = ConnectionTable::new(limits(100, 2), counters.clone());
        let first = table.admit(ip("10.0.0.1")).unwrap();
        let second = table.admit(ip("10.0.0.1")).unwrap();
        let _busy = second.state().start_request();
        let other = table.admit(ip("10.0.0.2")).unwrap();
        let third = table.admit(ip("10.0.0.1")).unwrap();
        assert!(first.state().shed_requested.load(Ordering::Acquire));
        assert!(!second.state().shed_requested.load(Ordering::Acquire));
        assert!(!other.state().shed_requested.load(Ordering::Acquire));
        assert_eq!(counters.connections_shed.get(), 1);
        // Both remaining connections of the client are busy now: the next one is refused.
        let _busy_too = third.state().start_request();
        assert!(table.admit(ip("10.0.0.1")).is_none());
        assert_eq!(counters.connections_refused.get(), 1);
        drop(first);
        assert_eq!(table.open_count(), 3);
        assert_eq!(counters.connections_open.get(), 3);
        // The shed connection has gone: still two live ones, both busy.
        assert!(table.admit(ip("10.0.0.1")).is_none());
        assert!(table.admit(ip("10.0.0.3")).is_some());
    }

    #[test]
    fn at_the_global_cap_idle_connections_go_first_and_busy_ones_never() {
        let counters = EdgeCounters::default();
        let table = ConnectionTable::new(limits(3, 10), counters.clone());
        let busy = table.admit(ip("10.0.0.1")).unwrap();
        let _request = busy.state().start_request();
        let idle = table.admit(ip("10.0.0.2")).unwrap();
        let also_busy = table.admit(ip("10.0.0.3")).unwrap();
        let _other_request = also_busy.state().start_request();
        let newcomer = table.admit(ip("10.0.0.4")).unwrap();
        assert!(idle.state().shed_requested.load(Ordering::Acquire));
        assert!(!busy.state().shed_requested.load(Ordering::Acquire));
        // Three live connections, none idle but the newcomer: shed it for the next one.
        let latest = table.admit(ip("10.0.0.5")).unwrap();
        assert!(newcomer.state().shed_requested.load(Ordering::Acquire));
        let _newest_request = latest.state().start_request();
        assert!(table.admit(ip("10.0.0.6")).is_none());
        assert_eq!(counters.connections_shed.get(), 2);
        assert_eq!(counters.connections_refused.get(), 1);
    }

    #[test]
    fn connections_still_closing_may_overrun_the_cap_only_a_little() {
        let counters = EdgeCounters::default();
        let table = ConnectionTable::new(limits(100, 1000), counters.clone());
        let mut open: Vec<ConnectionGuard> = (0..100u32)
            .map(|n| {
                table
                    .admit(IpAddr::from((0x0a00_0000 + n).to_be_bytes()))
                    .unwrap()
            })
            .collect();
        // Each newcomer sheds one idle connection, which has not closed yet.
        for n in 0..MIN_SHED_ALLOWANCE as u32 {
            open.push(
                table
                    .admit(IpAddr::from((0x0b00_0000 + n).to_be_bytes()))
                    .unwrap(),
            );
        }
        assert!(table.is_shedding());
        assert_eq!(counters.connections_shed.get(), MIN_SHED_ALLOWANCE as u64);
        assert!(table.admit(ip("10.9.9.9")).is_none(), "at the ceiling");
        assert_eq!(counters.connections_refused.get(), 1);
        // The first shed one closes: room again.
        assert!(open[0].state().shed_requested.load(Ordering::Acquire));
        open.remove(0);
        assert!(table.admit(ip("10.9.9.9")).is_some());
    }

    #[test]
    fn the_watchdog_gives_headers_and_idleness_their_own_limits() {
        let limits = limits(10, 10);
        let state = Arc::new(ConnectionState::new(1, 1_000));
        // The first request's headers are owed from the opening.
        assert_eq!(
            state.verdict(&limits, 5_000),
            Verdict::Open(Duration::from_secs(6))
        );
        assert_eq!(state.verdict(&limits, 11_000), Verdict::HeadersTooSlow);
        let request = state.start_request();
        assert_eq!(
            state.verdict(&limits, 100_000),
            Verdict::Open(limits.header_read_timeout)
        );
        drop(request);
        let idle_since = state.idle_since_ms.load(Ordering::Acquire);
        // Between requests: idle up to idle_timeout, looked at every header timeout.
        assert_eq!(
            state.verdict(&limits, idle_since + 1_000),
            Verdict::Open(limits.header_read_timeout)
        );
        assert_eq!(
            state.verdict(&limits, idle_since + 55_000),
            Verdict::Open(Duration::from_secs(5))
        );
        assert_eq!(state.verdict(&limits, idle_since + 60_000), Verdict::Idle);
        // A byte of a next request starts its header clock.
        state.note_bytes_read();
        let started = state.request_started_ms.load(Ordering::Acquire);
        assert_ne!(started, NO_TIME);
        assert_eq!(
            state.verdict(&limits, started + 10_000),
            Verdict::HeadersTooSlow
        );
    }
}
