//! The body of a request the node sends upstream: empty for the node's own fetches (GET, HEAD),
//! or a client's body streamed through as it arrives for a relayed `POST`, `PUT`, `PATCH`,
//! `DELETE` or `OPTIONS`.
//!
//! A relayed body is never buffered whole: each frame goes upstream as the client sends it, so
//! the node holds at most what hyper buffers on either connection. A client that stops sending
//! for longer than its idle timeout fails the relay ([`RequestBodyError::IdleTimeout`]), so a
//! stalled upload cannot hold an origin connection forever. When the body ends (or is dropped,
//! sent or not) the relay is told, so the first-byte timeout counts from there and a long upload
//! is not mistaken for a silent origin.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

/// Why a relayed request body could not be sent on.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client's connection failed while it sent the body.
    #[error("client request body failed: {0}")]
    Client(#[source] hyper::Error),
    /// The client sent no body bytes for this long.
    #[error("client request body stalled for {0:?}")]
    IdleTimeout(Duration),
}

/// A body sent upstream.
pub enum UpstreamRequestBody {
    /// No body: the node's own GET and HEAD requests.
    Empty,
    /// A client's body, relayed as it arrives.
    Relayed(RelayedBody),
}

/// A client's request body on its way upstream, with an idle timeout between frames.
pub struct RelayedBody {
    body: Incoming,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Body bytes relayed (`relayed_request_bytes`).
    relayed_bytes: Counter,
    /// Fired once, when the body ended or was dropped.
    finished: Option<oneshot::Sender<()>>,
}

impl RelayedBody {
    /// Wraps a client's body. The receiver resolves when the body has ended or was dropped.
    pub fn new(
        body: Incoming,
        idle_timeout: Duration,
        relayed_bytes: Counter,
    ) -> (RelayedBody, oneshot::Receiver<()>) {
        let (finished, finished_receiver) = oneshot::channel();
        let relayed = RelayedBody {
            body,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            relayed_bytes,
            finished: Some(finished),
        };
        (relayed, finished_receiver)
    }

    fn finish(&mut self) {
        if let Some(finished) = self.finished.take() {
            let _ = finished.send(());
        }
    }
}

impl Drop for RelayedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for UpstreamRequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let relayed = match self.get_mut() {
            UpstreamRequestBody::Empty => return Poll::Ready(None),
            UpstreamRequestBody::Relayed(relayed) => relayed,
        };
        match Pin::new(&mut relayed.body).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    relayed.relayed_bytes.inc_by(data.len() as u64);
                }
                let deadline = tokio::time::Instant::now() + relayed.idle_timeout;
                relayed.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                relayed.finish();
                Poll::Ready(Some(Err(RequestBodyError::Client(error))))
            }
            Poll::Ready(None) => {
                relayed.finish();
                Poll::Ready(None)
            }
            Poll::Pending => match relayed.idle.as_mut().poll(context) {
                Poll::Ready(()) => {
                    relayed.finish();
                    Poll::Ready(Some(Err(RequestBodyError::IdleTimeout(
                        relayed.idle_timeout,
                    ))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamRequestBody::Empty => true,
            UpstreamRequestBody::Relayed(relayed) => relayed.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamRequestBody::Empty => SizeHint::with_exact(0),
            UpstreamRequestBody::Relayed(relayed) => relayed.body.size_hint(),
        }
    }
}
