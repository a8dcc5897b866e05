//! The zero-copy hit path: bytes of stored slices go from the page cache to the client's socket
//! with `sendfile(2)`, never through user space, while hyper still frames every response.
//!
//! hyper writes whatever body frames it is given, so it cannot `sendfile` by itself. The trick is
//! a pair of pieces that agree on an order:
//! - [`SpanQueue::frame`] records "the next body frame is `length` bytes of this file at this
//!   offset" and returns a *placeholder* frame of that length: a view into a private static
//!   region, which costs nothing to make.
//! - [`ZeroCopyStream`] is the connection's socket. hyper's HTTP/1 writer queues body frames and
//!   hands them to the socket as `IoSlice`s without copying them, so the stream recognises a
//!   placeholder by its address and sends the recorded file span instead, in the same position.
//!
//! HTTP/1 answers one request at a time, and hyper writes body frames in the order the body
//! produced them, so the queue and the frames cannot drift apart. The stream still checks that
//! each placeholder has the length of the span at the head of the queue, and fails the connection
//! rather than send a byte it cannot account for. HTTP/2 copies frames into its own buffers, so the
//! request handler only uses placeholders on HTTP/1 connections.
//!
//! A slice file opened for a span stays readable when eviction or a version change deletes it, so
//! a response always carries the generation it started with. A file shorter than its span (which
//! the store's atomic writes rule out) ends the connection mid-body instead of sending padding.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The longest single placeholder frame; longer spans are cut into frames of at most this.
pub const FRAME_MAX: usize = 1 << 20;

/// The placeholder region. Its content is never sent: only its address matters.
static PLACEHOLDER: [u8; FRAME_MAX] = [0; FRAME_MAX];

/// One body frame's worth of a stored file.
#[derive(Debug)]
struct FileSpan {
    file: Arc<File>,
    offset: u64,
    remaining: usize,
}

/// The file spans a connection's placeholder frames stand for, in body order.
#[derive(Debug, Clone, Default)]
pub struct SpanQueue(Arc<Mutex<VecDeque<FileSpan>>>);

impl SpanQueue {
    /// Records that the next placeholder body frame is `length` bytes of `file` at `offset`, and
    /// returns that frame. `length` must be between 1 and [`FRAME_MAX`].
    pub fn frame(&self, file: Arc<File>, offset: u64, length: usize) -> Bytes {
        assert!(
            (1..=FRAME_MAX).contains(&length),
            "placeholder frames are 1..=FRAME_MAX bytes"
        );
        self.lock().push_back(FileSpan {
            file,
            offset,
            remaining: length,
        });
        Bytes::from_static(&PLACEHOLDER[..length])
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FileSpan>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many recorded spans have not been sent completely.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.lock().len()
    }
}

fn is_placeholder(bytes: &[u8]) -> bool {
    let base = PLACEHOLDER.as_ptr() as usize;
    let start = bytes.as_ptr() as usize;
    !bytes.is_empty() && start >= base && start < base + FRAME_MAX
}

/// A client socket that sends placeholder frames with `sendfile(2)`.
#[derive(Debug)]
pub struct ZeroCopyStream {
    stream: TcpStream,
    spans: SpanQueue,
}

impl ZeroCopyStream {
    /// Wraps an accepted socket; placeholders written to it resolve through `spans`.
    pub fn new(stream: TcpStream, spans: SpanQueue) -> Self {
        ZeroCopyStream { stream, spans }
    }

    /// Sends (part of) the span at the head of the queue, which the placeholder about to be
    /// written, `frame_len` bytes long, stands for.
    fn poll_send_span(
        &self,
        context: &mut Context<'_>,
        frame_len: usize,
    ) -> Poll<io::Result<usize>> {
        let mut spans = self.spans.lock();
        let Some(span) = spans.front_mut() else {
            return Poll::Ready(Err(io::Error::other(
                "zero-copy: a placeholder frame has no file span",
            )));
        };
        if span.remaining != frame_len {
            return Poll::Ready(Err(io::Error::other(format!(
                "zero-copy: a {frame_len}-byte placeholder does not match the {}-byte span queued",
                span.remaining
            ))));
        }
        loop {
            ready!(self.stream.poll_write_ready(context))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(
                    &self.stream,
                    &*span.file,
                    Some(&mut span.offset),
                    span.remaining,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zero-copy: a slice file is shorter than its index entry",
                    )))
                }
                Ok(count) => {
                    span.remaining -= count;
                    if span.remaining == 0 {
                        spans.pop_front();
                    }
                    return Poll::Ready(Ok(count));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<io::Result<usize>> {
        if is_placeholder(buffer) {
            self.poll_send_span(context, buffer.len())
        } else {
            Pin::new(&mut self.get_mut().stream).poll_write(context, buffer)
        }
    }

    /// Writes either a run of ordinary buffers (one `writev`) or one placeholder (`sendfile`),
    /// whichever comes first; the caller loops for the rest.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = buffers.iter().position(|buffer| !buffer.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if is_placeholder(&buffers[first]) {
            return self.poll_send_span(context, buffers[first].len());
        }
        let end = buffers[first..]
            .iter()
            .position(|buffer| is_placeholder(buffer))
            .map_or(buffers.len(), |offset| first + offset);
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(context, &buffers[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn file_with(content: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut temp = tempfile::NamedTempFile::new().unwrap();
        temp.write_all(content).unwrap();
        temp.flush().unwrap();
        let file = Arc::new(File::open(temp.path()).unwrap());
        (temp, file)
    }

    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn placeholders_become_file_bytes_in_order_between_ordinary_writes() {
        let content: Vec<u8> = (0..3 << 20).map(|index| (index % 251) as u8).collect();
        let (_temp, file) = file_with(&content);
        let (mut client, server) = socket_pair().await;
        let spans = SpanQueue::default();
        let mut stream = ZeroCopyStream::new(server, spans.clone());
        let writer = tokio::spawn(async move {
            stream.write_all(b"head|").await.unwrap();
            // Two spans out of order within the file, each written through `write_all`, which
            // resumes partially sent placeholders from their advanced address.
            let second = spans.frame(file.clone(), 2 << 20, 1 << 20);
            let first = spans.frame(file.clone(), 10, 100_000);
            stream.write_all(&second).await.unwrap();
            let mid = b"|mid|";
            let mut done = 0;
            while done < mid.len() {
                let slices = [IoSlice::new(&mid[done..]), IoSlice::new(&first)];
                let count = stream.write_vectored(&slices).await.unwrap();
                assert!(
                    count <= mid.len() - done,
                    "one call never runs into a placeholder"
                );
                done += count;
            }
            stream.write_all(&first).await.unwrap();
            stream.write_all(b"|tail").await.unwrap();
            stream.shutdown().await.unwrap();
            assert_eq!(spans.pending(), 0);
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        let mut expected = b"head|".to_vec();
        expected.extend_from_slice(&content[2 << 20..3 << 20]);
        expected.extend_from_slice(b"|mid|");
        expected.extend_from_slice(&content[10..100_010]);
        expected.extend_from_slice(b"|tail");
        assert_eq!(received.len(), expected.len());
        assert!(received == expected, "bytes differ");
    }

    #[tokio::test]
    async fn a_short_file_or_a_stray_placeholder_fails_instead_of_sending_padding() {
        let (_temp, file) = file_with(b"only ten b");
        let (_client, server) = socket_pair().await;
        let spans = SpanQueue::default();
        let mut stream = ZeroCopyStream::new(server, spans.clone());
        let frame = spans.frame(file, 0, 4096);
        let error = stream.write_all(&frame).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let stray = Bytes::from_static(&PLACEHOLDER[..16]);
        let (_client, server) = socket_pair().await;
        let mut stream = ZeroCopyStream::new(server, SpanQueue::default());
        assert!(stream.write_all(&stray).await.is_err());
    }
}
