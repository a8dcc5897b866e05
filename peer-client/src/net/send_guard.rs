//! The peer port's socket wrapper: a peer that stops reading, or reads too slowly, loses its
//! connection (and so its upload slot) instead of holding it for as long as it likes.
//!
//! Two rules, both judged only while the daemon has bytes waiting to go out (a write returned
//! `Pending`), so an idle keep-alive connection and an upload held back by the daemon's own
//! `max_upload_bandwidth` are never punished:
//!
//! - **Send timeout:** a write that makes no progress for `send_timeout` fails with `TimedOut`.
//! - **Minimum rate:** over every `window` of time spent waiting to write, at least
//!   `floor_bytes_per_sec × window` bytes must have left (DO drops peers under 4000 B/s for 20 s).
//!
//! The error ends hyper's connection task, which drops the socket and the response body; the
//! upload task then sees its channel closed and gives its slot back. The socket is closed with a
//! reset, so the megabytes still queued in the kernel's send buffer are discarded at once instead
//! of trickling out to the slow peer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A connection that can be told to end with a reset, discarding what its buffers still hold.
pub trait ResetOnClose {
    /// The coming close resets the connection.
    fn reset_on_close(&self);
}

impl ResetOnClose for tokio::net::TcpStream {
    fn reset_on_close(&self) {
        if let Err(error) = self.set_zero_linger() {
            tracing::debug!(%error, "cannot set SO_LINGER 0");
        }
    }
}

impl ResetOnClose for tokio::io::DuplexStream {
    fn reset_on_close(&self) {}
}

/// The limits a [`SendGuard`] applies.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// A write that makes no progress for this long fails.
    pub send_timeout: Duration,
    /// The minimum rate while bytes wait to go out; `0` for none.
    pub floor_bytes_per_sec: u64,
    /// The time spent waiting over which the rate is judged.
    pub window: Duration,
}

/// Why a connection was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPeer {
    /// No write progress for `send_timeout`.
    NoProgress,
    /// Under the minimum rate for a whole window.
    UnderMinimumRate,
}

/// A stream whose writes obey [`SendLimits`]; `dropped` counts the connections it failed.
#[derive(Debug)]
pub struct SendGuard<S> {
    inner: S,
    limits: SendLimits,
    dropped: Arc<AtomicU64>,
    /// When the write now waiting first returned `Pending`.
    pending_since: Option<Instant>,
    /// Time spent waiting to write in the current window, not counting the wait in progress.
    waited: Duration,
    /// Bytes written in the current window.
    window_bytes: u64,
    timer: Pin<Box<Sleep>>,
    failed: Option<SlowPeer>,
}

impl<S: ResetOnClose> SendGuard<S> {
    /// Wraps `inner`; each connection it drops adds one to `dropped`.
    pub fn new(inner: S, limits: SendLimits, dropped: Arc<AtomicU64>) -> SendGuard<S> {
        SendGuard {
            inner,
            limits,
            dropped,
            pending_since: None,
            waited: Duration::ZERO,
            window_bytes: 0,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            failed: None,
        }
    }

    /// Judges the connection at `now`; `Err` once it broke a rule (it stays broken).
    fn judge(&mut self, now: Instant) -> Result<(), SlowPeer> {
        if let Some(reason) = self.failed {
            return Err(reason);
        }
        let current_wait = self
            .pending_since
            .map_or(Duration::ZERO, |since| now.duration_since(since));
        let verdict = if current_wait >= self.limits.send_timeout {
            Err(SlowPeer::NoProgress)
        } else if self.limits.floor_bytes_per_sec > 0
            && self.waited + current_wait >= self.limits.window
        {
            let floor = self.limits.floor_bytes_per_sec as f64 * self.limits.window.as_secs_f64();
            if (self.window_bytes as f64) < floor {
                Err(SlowPeer::UnderMinimumRate)
            } else {
                // A new window starts; the wait in progress counts from now.
                self.waited = Duration::ZERO;
                self.window_bytes = 0;
                if self.pending_since.is_some() {
                    self.pending_since = Some(now);
                }
                Ok(())
            }
        } else {
            Ok(())
        };
        if let Err(reason) = verdict {
            self.failed = Some(reason);
            self.inner.reset_on_close();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// When the next judgement is due while a write waits.
    fn next_deadline(&self, since: Instant) -> Instant {
        let timeout = since + self.limits.send_timeout;
        if self.limits.floor_bytes_per_sec == 0 {
            return timeout;
        }
        let window_end = since + self.limits.window.saturating_sub(self.waited);
        timeout.min(window_end)
    }

    /// Accounts for the outcome of one write attempt.
    fn after_write(
        &mut self,
        context: &mut Context<'_>,
        outcome: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let now = Instant::now();
        match outcome {
            Poll::Ready(Ok(written)) => {
                if let Some(since) = self.pending_since.take() {
                    self.waited += now.duration_since(since);
                }
                self.window_bytes += written as u64;
                match self.judge(now) {
                    Ok(()) => Poll::Ready(Ok(written)),
                    Err(reason) => Poll::Ready(Err(slow_peer_error(reason))),
                }
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                let since = *self.pending_since.get_or_insert(now);
                if let Err(reason) = self.judge(now) {
                    return Poll::Ready(Err(slow_peer_error(reason)));
                }
                // Wake up to judge again even if the peer never reads another byte.
                let deadline = self.next_deadline(self.pending_since.unwrap_or(since));
                self.timer.as_mut().reset(deadline);
                if self.timer.as_mut().poll(context).is_ready() {
                    context.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

fn slow_peer_error(reason: SlowPeer) -> io::Error {
    let text = match reason {
        SlowPeer::NoProgress => "the peer stopped reading (daemon.upload_send_timeout)",
        SlowPeer::UnderMinimumRate => {
            "the peer reads under the minimum rate (daemon.upload_min_bytes_per_sec)"
        }
    };
    io::Error::new(io::ErrorKind::TimedOut, text)
}

impl<S: AsyncRead + ResetOnClose + Unpin> AsyncRead for SendGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl<S: AsyncWrite + ResetOnClose + Unpin> AsyncWrite for SendGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write(context, buffer);
        self.after_write(context, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let outcome = Pin::new(&mut self.inner).poll_write_vectored(context, buffers);
        self.after_write(context, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: SendLimits = SendLimits {
        send_timeout: Duration::from_secs(10),
        floor_bytes_per_sec: 4000,
        window: Duration::from_secs(20),
    };

    /// Writes `total` bytes through a guard into `pipe` while `reader` drains its other end.
    async fn write_through(
        limits: SendLimits,
        total: usize,
        pipe: tokio::io::DuplexStream,
        reader: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (io::Result<()>, u64) {
        let dropped = Arc::new(AtomicU64::new(0));
        let mut guard = SendGuard::new(pipe, limits, Arc::clone(&dropped));
        let reading = tokio::spawn(reader);
        let result = guard.write_all(&vec![7_u8; total]).await;
        reading.abort();
        (result, dropped.load(Ordering::Relaxed))
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_fails_the_write_after_the_send_timeout() {
        let (writer, reader) = tokio::io::duplex(1024);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut guard = SendGuard::new(writer, LIMITS, Arc::clone(&dropped));
        let started = Instant::now();
        let error = guard.write_all(&[1_u8; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.send_timeout);
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        // Broken for good: the next write fails at once.
        assert!(guard.write_all(&[1]).await.is_err());
        drop(reader);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_reader_under_the_floor_is_dropped_and_a_fast_one_is_not() {
        // 1 KiB every half second: 2 KiB/s against a floor of 4000 B/s.
        let (writer, mut reader) = tokio::io::duplex(1024);
        let trickle = async move {
            let mut buffer = [0_u8; 1024];
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if reader.read(&mut buffer).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        };
        let started = Instant::now();
        let (result, dropped) = write_through(LIMITS, 1 << 20, writer, trickle).await;
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(dropped, 1);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= LIMITS.window && elapsed <= LIMITS.window + Duration::from_secs(1),
            "{elapsed:?}"
        );

        // 8 KiB/s: above the floor, the whole megabyte goes through.
        let (writer, mut reader) = tokio::io::duplex(1024);
        let steady = async move {
            let mut buffer = [0_u8; 1024];
            loop {
                tokio::time::sleep(Duration::from_millis(125)).await;
                if reader.read(&mut buffer).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        };
        let (result, dropped) = write_through(LIMITS, 256 * 1024, writer, steady).await;
        result.unwrap();
        assert_eq!(dropped, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_between_answers_is_not_held_against_the_peer() {
        let (writer, mut reader) = tokio::io::duplex(64 * 1024);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut guard = SendGuard::new(writer, LIMITS, Arc::clone(&dropped));
        for _ in 0..3 {
            // A small answer that never waits, then a minute of keep-alive silence.
            guard.write_all(&[3_u8; 100]).await.unwrap();
            let mut buffer = [0_u8; 100];
            reader.read_exact(&mut buffer).await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        guard.write_all(&[3_u8; 100]).await.unwrap();
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
    }
}
