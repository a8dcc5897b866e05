//! The body of every client response: a full buffer, or a stream a producer task feeds through
//! a bounded channel (bytes, or stored file windows that leave with `sendfile`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::error::ServeError;
use crate::http::sendfile::SpanQueue;
use crate::node::Node;
use crate::stats::ByteSource;

/// How many body chunks the producer may run ahead of the client.
pub(super) const BODY_CHANNEL_DEPTH: usize = 4;

/// A piece of body on its way from the producer task to hyper.
pub(super) enum Chunk {
    Bytes(Bytes),
    /// A window of a stored slice, sent with `sendfile` (see [`crate::http::sendfile`]).
    File {
        file: Arc<std::fs::File>,
        offset: u64,
        length: usize,
    },
}

pub(super) type BodyItem = Result<(Chunk, ByteSource), ServeError>;

/// The body of every client response.
pub struct ResponseBody {
    pub(super) kind: BodyKind,
}

pub(super) enum BodyKind {
    Empty,
    Full(Option<Bytes>),
    Produced {
        receiver: mpsc::Receiver<BodyItem>,
        node: Arc<Node>,
        /// The connection's zero-copy queue, when the producer may send [`Chunk::File`].
        spans: Option<SpanQueue>,
    },
    Upstream {
        body: Incoming,
        node: Arc<Node>,
    },
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ResponseBody")
    }
}

impl ResponseBody {
    pub(super) fn empty() -> Self {
        ResponseBody {
            kind: BodyKind::Empty,
        }
    }

    /// A body with fixed content (error pages, admin answers).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody {
            kind: BodyKind::Full(Some(bytes.into())),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Empty => Poll::Ready(None),
            BodyKind::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            BodyKind::Produced {
                receiver,
                node,
                spans,
            } => match receiver.poll_recv(context) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Ok((chunk, source)))) => {
                    let bytes = match (chunk, spans) {
                        (Chunk::Bytes(bytes), _) => bytes,
                        (
                            Chunk::File {
                                file,
                                offset,
                                length,
                            },
                            Some(spans),
                        ) => {
                            node.stats.zero_copy_bytes.inc_by(length as u64);
                            spans.frame(file, offset, length)
                        }
                        (Chunk::File { .. }, None) => {
                            return Poll::Ready(Some(Err(
                                "a file chunk on a connection without zero-copy".into(),
                            )))
                        }
                    };
                    node.stats.count_egress(source, bytes.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(bytes))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            },
            BodyKind::Upstream { body, node } => match Pin::new(body).poll_frame(context) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        node.stats.origin_bytes.inc_by(data.len() as u64);
                        node.stats
                            .count_egress(ByteSource::Other, data.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Empty => true,
            BodyKind::Full(bytes) => bytes.is_none(),
            BodyKind::Produced { .. } => false,
            BodyKind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Empty => SizeHint::with_exact(0),
            BodyKind::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |bytes| bytes.len() as u64))
            }
            BodyKind::Produced { .. } => SizeHint::default(),
            BodyKind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// A short plain-text answer.
pub fn text_response(status: StatusCode, message: impl Into<String>) -> Response<ResponseBody> {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
