//! Zero-copy blob reads: `sendfile(2)` from the blob file straight to a plain
//! TCP socket, under hyper.
//!
//! hyper writes response bodies itself, from buffers. For a blob GET on a plain
//! HTTP/1 connection, the handler instead hands the connection's [`SendfileSlot`]
//! the open file and range, and answers with a body made of *marker* chunks:
//! slices of one static buffer, as long as the range. The connection's I/O,
//! [`SendfileStream`], recognises those slices by their address when hyper
//! writes them (it queues body buffers as they are, with vectored writes) and
//! sends that many bytes of the file with `sendfile` instead. Headers and every
//! other buffer are written as usual. Nothing else can produce a pointer into
//! the marker, so no client data can be mistaken for it.
//!
//! Under TLS (the bytes must be encrypted) and on HTTP/2 there is no slot, and
//! blobs are streamed from large buffered reads.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The marker: body chunks that are slices of it stand for file bytes.
static MARKER: [u8; 1 << 20] = [0; 1 << 20];

fn marker_offset(p: *const u8) -> Option<usize> {
    let start = MARKER.as_ptr() as usize;
    let at = p as usize;
    (at >= start && at < start + MARKER.len()).then(|| at - start)
}

/// What the connection sends next from a file.
#[derive(Debug)]
struct Job {
    file: std::fs::File,
    offset: u64,
    remaining: u64,
}

/// One connection's hand-off from the blob handler to its I/O.
#[derive(Debug, Clone, Default)]
pub struct SendfileSlot(Arc<Mutex<Option<Job>>>);

impl SendfileSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Job>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Arranges for `len` bytes of `file` from `offset` to be sent with
    /// `sendfile`; returns the marker body standing for them, or the file back
    /// when the slot is busy (the caller streams the bytes itself).
    pub fn body(
        &self,
        file: std::fs::File,
        offset: u64,
        len: u64,
    ) -> Result<MarkerChunks, std::fs::File> {
        let mut job = self.lock();
        if job.as_ref().is_some_and(|j| j.remaining > 0) {
            return Err(file);
        }
        *job = Some(Job {
            file,
            offset,
            remaining: len,
        });
        Ok(MarkerChunks { left: len })
    }
}

/// The marker chunks of one sendfile job, in order.
#[derive(Debug)]
pub struct MarkerChunks {
    left: u64,
}

impl Iterator for MarkerChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(MARKER.len());
        self.left -= n as u64;
        Some(Bytes::from_static(&MARKER[..n]))
    }
}

/// A plain TCP connection whose marker writes become `sendfile` calls.
#[derive(Debug)]
pub struct SendfileStream {
    inner: TcpStream,
    slot: SendfileSlot,
}

impl SendfileStream {
    /// Wraps `inner`; give `slot` to the requests served on it.
    pub fn new(inner: TcpStream, slot: SendfileSlot) -> Self {
        Self { inner, slot }
    }

    /// Sends up to `want` bytes of the current job.
    fn poll_sendfile(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let mut guard = self.slot.lock();
            let Some(job) = guard.as_mut().filter(|j| j.remaining > 0) else {
                return Poll::Ready(Err(io::Error::other(
                    "a zero-copy body was written with no file to send",
                )));
            };
            let count = usize::try_from(job.remaining)
                .unwrap_or(usize::MAX)
                .min(want);
            let (file, offset) = (&job.file, &mut job.offset);
            match self.inner.try_io(tokio::io::Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, file, Some(offset), count)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the blob file ended before its recorded size",
                    )));
                }
                Ok(n) => {
                    job.remaining -= n as u64;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if marker_offset(buf.as_ptr()).is_some() {
            return self.poll_sendfile(cx, buf.len());
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if marker_offset(bufs[first].as_ptr()).is_some() {
            return self.poll_sendfile(cx, bufs[first].len());
        }
        // The ordinary buffers before the first marker, in one writev.
        let end = bufs[first..]
            .iter()
            .position(|b| !b.is_empty() && marker_offset(b.as_ptr()).is_some())
            .map_or(bufs.len(), |i| first + i);
        Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
