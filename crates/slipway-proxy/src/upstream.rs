//! Backend connections: one HTTP/1 connection with no task of its own, driven by
//! whoever uses it, and the response body that drives it and hands it back to its
//! backend's idle list.

use super::*;
use crate::forward::InFlight;

/// Why forwarding failed, with the request when it was never sent.
pub(crate) struct Failure {
    pub(crate) unsent: Option<Request<Body>>,
    pub(crate) message: String,
    /// It failed on a new connection (connecting, or the first request on it):
    /// the backend itself is failing, not a pooled connection it had closed.
    pub(crate) fresh: bool,
}

/// One HTTP/1 connection to a backend. It has no task of its own: whoever uses it
/// drives it, first the request handler until the response head arrives, then the
/// response body as the client reads it. That saves a task wake-up and a channel hop
/// per request, the largest per-request cost after the kernel's.
pub(crate) struct Upstream {
    pub(crate) sender: Sender,
    pub(crate) conn: ClientConn,
}

impl Upstream {
    /// Polls the connection; `true` once it has closed (or failed) for good.
    pub(crate) fn drive(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        std::pin::Pin::new(&mut self.conn).poll(cx).is_ready()
    }

    /// Opens a connection to `addr`, ready for a request.
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect timed out".into()),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut up = Self { sender, conn };
        if !up.ready().await {
            return Err("connection closed before the request".into());
        }
        Ok(up)
    }

    /// Waits until the connection can take a request; `false` when it has closed.
    pub(crate) async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            if self.drive(cx) {
                return std::task::Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` and drives the connection until the response head arrives.
    pub(crate) async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        let mut closed = false;
        std::future::poll_fn(|cx| {
            // After the connection ends, the response future resolves on its own.
            if !closed {
                closed = self.drive(cx);
            }
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// The current thread's id, without touching its `Thread` handle's refcount.
pub(crate) fn this_thread() -> std::thread::ThreadId {
    thread_local!(static ID: std::thread::ThreadId = std::thread::current().id());
    ID.with(|id| *id)
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

/// A response body that keeps its backend counted as busy until it ends, and drives
/// the backend connection that delivers it. Once the body has ended, the connection
/// goes back to the backend's idle list.
pub(crate) struct GuardedBody {
    pub(crate) inner: Incoming,
    pub(crate) upstream: Option<Upstream>,
    pub(crate) guard: InFlight,
}

impl GuardedBody {
    pub(crate) fn release(&mut self) {
        if let Some(up) = self.upstream.take() {
            self.guard.0.put_idle(up);
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // The server stops polling once `is_end_stream` says so; a body read to its
        // end leaves its connection ready for the next request. One dropped half-way
        // (the client went away) takes its connection with it.
        if hyper::body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(up) = this.upstream.as_mut()
            && up.drive(cx)
        {
            // Closed: what it read is already in `inner`; it cannot be reused.
            this.upstream = None;
        }
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
