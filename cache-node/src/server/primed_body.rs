//! Batching a response's head with its first body bytes on TLS connections.
//!
//! hyper writes a response's head as soon as the handler returns it, and flushes it on its own
//! when the body's first frame is not ready yet, which for a hit is always the case: the bytes
//! come from a disk read a moment later. On a plain socket that costs one extra `writev`; over
//! TLS it also costs a TLS record of its own, encrypted and framed separately, and the client
//! decrypts two records for a 4 KiB object. [`prime`] waits (briefly, at most
//! [`PRIME_WAIT`]) for the first frame before the response goes to hyper, so the head, the body
//! and, for a small object, its end leave in one record and one system call.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

/// The longest a response head waits for its first body bytes. A hit's first read takes
/// microseconds; a body that is slower to start (a pass-through from a slow origin) goes out as
/// before, head first.
pub const PRIME_WAIT: Duration = Duration::from_millis(2);

/// A body whose first frame has already been taken from `rest`.
#[derive(Debug)]
pub struct PrimedBody<B: Body> {
    first: Option<Result<Frame<B::Data>, B::Error>>,
    rest: B,
}

impl<B: Body> PrimedBody<B> {
    /// `rest` as it is, nothing held (plain connections, where the head's own `writev` costs
    /// less than a wait would).
    pub fn unprimed(rest: B) -> PrimedBody<B> {
        PrimedBody { first: None, rest }
    }
}

/// `response` with its body's first frame awaited (up to [`PRIME_WAIT`]), so hyper can write
/// it with the head.
pub async fn prime<B>(response: Response<B>) -> Response<PrimedBody<B>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, mut rest) = response.into_parts();
    let first = if rest.is_end_stream() {
        None
    } else {
        // Dropping an unfinished `frame()` future loses nothing: it only polls `poll_frame`.
        tokio::time::timeout(PRIME_WAIT, rest.frame())
            .await
            .unwrap_or_default()
    };
    Response::from_parts(parts, PrimedBody { first, rest })
}

impl<B> Body for PrimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut this.rest).poll_frame(context)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |data| data.remaining() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + held);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn the_first_frame_is_held_and_given_back_first_with_the_length_unchanged() {
        let body = Full::new(Bytes::from_static(b"four kib stand-in"));
        let primed = prime(Response::new(body)).await;
        assert_eq!(primed.body().size_hint().exact(), Some(17));
        assert!(!primed.body().is_end_stream());
        let collected = primed.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"four kib stand-in");
        let empty = prime(Response::new(Full::new(Bytes::new()))).await;
        assert!(empty.body().is_end_stream());
        assert_eq!(empty.body().size_hint().exact(), Some(0));
    }
}
