//! Backend connections: our own HTTP/1.1 client. A request goes out as bytes the
//! handler wrote once (head, and the body when it was small enough to keep), the
//! response head is parsed with `httparse`, and the response body is read straight
//! from the socket by the body hyper's server streams to the client. There is no
//! task, channel or request object per exchange, and a request that must be sent
//! again is the same bytes again.
//!
//! A connection goes back to its backend's idle list only once its response body
//! has ended and the response allowed keep-alive, so an idle connection is always
//! free for the next request.

use super::*;
use crate::forward::InFlight;
use bytes::{Buf, BytesMut};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWriteExt;

/// Response heads larger than this are refused (hyper's default is 400 KiB;
/// HAProxy's buffer is 16 KiB).
const MAX_HEAD: usize = 64 << 10;
/// Response headers beyond this count are refused.
const MAX_HEADERS: usize = 128;
/// A chunk-size or trailer line longer than this is refused.
const MAX_LINE: usize = 4096;
/// Reads take at least this much room.
const READ_CHUNK: usize = 16 << 10;

/// Why forwarding failed.
pub(crate) struct Failure {
    /// Nothing of the request reached the backend: it may go to another one,
    /// whatever its method.
    pub(crate) unsent: bool,
    pub(crate) message: String,
    /// Some bytes of a response arrived: the request is not sent again.
    pub(crate) answered: bool,
    /// It failed on a new connection (connecting, or the first request on it):
    /// the backend itself is failing, not a pooled connection it had closed.
    pub(crate) fresh: bool,
}

/// A request on its way to a backend: its head (with the body appended when it
/// was kept) and, for a large or unknown-length body, the body still to stream.
pub(crate) struct Outgoing {
    pub(crate) message: Bytes,
    pub(crate) stream: Option<StreamBody>,
    /// A HEAD request: its response has no body whatever its headers say.
    pub(crate) head_only: bool,
}

/// A request body streamed to the backend as it arrives.
pub(crate) struct StreamBody {
    pub(crate) body: Incoming,
    /// Sent with chunked framing (the client gave no length).
    pub(crate) chunked: bool,
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or a length of 0 left).
    Done,
    /// This many bytes left.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Close,
}

/// One HTTP/1.1 connection to a backend, with what it has read but not consumed.
pub(crate) struct Upstream {
    io: tokio::net::TcpStream,
    buf: BytesMut,
    /// Requests it has answered: a failure on the first is the backend's, on a
    /// later one it may be a keep-alive race.
    served: u64,
    /// The last read failed because sent bytes went unacknowledged.
    timed_out: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

/// How long sent bytes may stay unacknowledged before a backend connection fails.
const USER_TIMEOUT_MS: u32 = 2000;

impl Upstream {
    /// Opens a connection to `addr`.
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let io = match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect timed out".into()),
        };
        let _ = io.set_nodelay(true);
        // A backend whose machine died or was cut off never acknowledges what is
        // sent to it: after 2 s the socket fails, and a request that got no
        // answer is tried on another backend, instead of waiting forever on a
        // kept-alive connection. A slow backend still acknowledges at once.
        let _ = rustix::net::sockopt::set_tcp_user_timeout(&io, USER_TIMEOUT_MS);
        Ok(Self {
            io,
            buf: BytesMut::new(),
            served: 0,
            timed_out: false,
        })
    }

    /// Whether an idle connection can take a request: the backend has neither
    /// closed it nor sent anything unasked. Costs a syscall only when the
    /// socket's last readiness says it is readable.
    pub(crate) fn alive(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends `out` and reads the response head: the head, its body's framing and
    /// whether the connection may be reused after the body.
    pub(crate) async fn exchange(
        &mut self,
        out: &mut Outgoing,
    ) -> Result<(http::response::Parts, Framing, bool), Failure> {
        // A new connection (no answered request yet) that fails says the backend
        // is failing; a pooled one may have lost a keep-alive race.
        let mut fresh = self.served == 0;
        let failed = |message, answered, fresh| Failure {
            unsent: false,
            message,
            answered,
            fresh,
        };
        if let Err(e) = self.io.write_all(&out.message).await {
            return Err(failed(format!("writing the request: {e}"), false, fresh));
        }
        if let Some(stream) = out.stream.as_mut() {
            self.send_body(stream)
                .await
                .map_err(|message| failed(message, false, fresh))?;
        }
        let head = self.read_head(out.head_only).await;
        // Sent bytes that were never acknowledged (TCP_USER_TIMEOUT) say the
        // backend's machine is gone, however old the connection.
        if let Err((_, false)) = &head
            && self.timed_out
        {
            fresh = true;
        }
        head.map_err(|(message, answered)| failed(message, answered, fresh))
    }

    async fn send_body(&mut self, stream: &mut StreamBody) -> Result<(), String> {
        use http_body_util::BodyExt as _;
        while let Some(frame) = stream.body.frame().await {
            let frame = frame.map_err(|e| format!("reading the request body: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers are not forwarded
            };
            if data.is_empty() {
                continue;
            }
            let w = if stream.chunked {
                let mut framed = BytesMut::with_capacity(data.len() + 20);
                framed.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                framed.extend_from_slice(&data);
                framed.extend_from_slice(b"\r\n");
                self.io.write_all(&framed).await
            } else {
                self.io.write_all(&data).await
            };
            w.map_err(|e| format!("writing the request body: {e}"))?;
        }
        if stream.chunked {
            self.io
                .write_all(b"0\r\n\r\n")
                .await
                .map_err(|e| format!("writing the request body: {e}"))?;
        }
        Ok(())
    }

    /// Reads until a whole response head is buffered, skipping interim (1xx)
    /// responses, and parses it.
    async fn read_head(
        &mut self,
        head_only: bool,
    ) -> Result<(http::response::Parts, Framing, bool), (String, bool)> {
        loop {
            if !self.buf.is_empty() {
                match parse_head(&self.buf, head_only).map_err(|e| (e, true))? {
                    Parsed::Partial => {}
                    Parsed::Interim(n) => {
                        self.buf.advance(n);
                        continue;
                    }
                    Parsed::Head {
                        len,
                        parts,
                        framing,
                        keep_alive,
                    } => {
                        self.buf.advance(len);
                        self.served += 1;
                        return Ok((parts, framing, keep_alive));
                    }
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(("the response head is too large".into(), true));
                }
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if self.buf.is_empty() => {
                    let msg = "the backend closed the connection without answering";
                    return Err((msg.into(), false));
                }
                Ok(0) => {
                    let msg = "the backend closed the connection mid-answer";
                    return Err((msg.into(), true));
                }
                Ok(_) => {}
                Err(e) => {
                    let answered = !self.buf.is_empty();
                    self.timed_out = e.kind() == std::io::ErrorKind::TimedOut;
                    return Err((format!("reading the response: {e}"), answered));
                }
            }
        }
    }

    /// Reads what the socket has into the buffer; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

enum Parsed {
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    Head {
        len: usize,
        parts: http::response::Parts,
        framing: Framing,
        keep_alive: bool,
    },
}

/// Whether a header is hop-by-hop (RFC 9110 §7.6.1) by name alone.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 7] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The non-empty, trimmed elements of a comma-separated header value.
pub(crate) fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn parse_head(buf: &[u8], head_only: bool) -> Result<Parsed, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
    if status.is_informational() {
        if code == 101 {
            return Err("the backend switched protocols unasked".into());
        }
        return Ok(Parsed::Interim(len));
    }
    let version = resp.version.unwrap_or(1);
    // What the Connection header says, and which headers it names.
    let mut close = version == 0;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut chunked = false;
    let mut coded = false;
    let mut length: Option<u64> = None;
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if n.eq_ignore_ascii_case(b"connection") {
            for t in list_tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                } else {
                    named.push(t);
                }
            }
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            // Chunked must be the last coding for the length to be known.
            chunked = list_tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if n.eq_ignore_ascii_case(b"content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != v) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(v);
        }
    }
    let mut map = http::HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        if is_hop_by_hop(n) || named.iter().any(|t| t.eq_ignore_ascii_case(n)) {
            continue;
        }
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3): hyper
        // frames the client's side from the body.
        if coded && n.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        let name = http::HeaderName::from_bytes(n).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| "invalid header value")?;
        map.append(name, value);
    }
    let framing = if head_only || code == 204 || code == 304 {
        Framing::Done
    } else if chunked {
        Framing::Chunked(Chunked::Size)
    } else if coded {
        Framing::Close
    } else {
        match length {
            Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive = !close && framing != Framing::Close;
    let mut r = Response::new(());
    *r.status_mut() = status;
    *r.headers_mut() = map;
    let (parts, ()) = r.into_parts();
    Ok(Parsed::Head {
        len,
        parts,
        framing,
        keep_alive,
    })
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// This many bytes of chunk data left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// Reading trailer lines until an empty one.
    Trailers,
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// More input is needed.
    More,
    /// The body has ended.
    End,
}

impl Chunked {
    /// Decodes from `buf`, consuming what it used.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Result<Decoded, String> {
        loop {
            match *self {
                Self::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    let digits = line[..]
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err("invalid chunk size".into());
                    }
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| u64::from_str_radix(d, 16).ok())
                        .ok_or("invalid chunk size")?;
                    *self = if size == 0 {
                        Self::Trailers
                    } else {
                        Self::Data(size)
                    };
                }
                Self::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Self::DataEnd
                    } else {
                        Self::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                Self::DataEnd => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if !line.is_empty() {
                        return Err("chunk data longer than its size".into());
                    }
                    *self = Self::Size;
                }
                Self::Trailers => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::More);
                    };
                    if line.is_empty() {
                        return Ok(Decoded::End);
                    }
                }
            }
        }
    }
}

/// Takes one line (without its CRLF or bare LF) off `buf`; `None` when it is not
/// complete yet.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

/// The error of a response body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body read straight from the backend connection as the client
/// takes it. It keeps its backend counted as busy until it ends; then the
/// connection goes back to the backend's idle list if the response allowed it.
pub(crate) struct UpstreamBody {
    up: Option<Upstream>,
    framing: Framing,
    keep_alive: bool,
    guard: InFlight,
}

impl UpstreamBody {
    pub(crate) fn new(up: Upstream, framing: Framing, keep_alive: bool, guard: InFlight) -> Self {
        let mut body = Self {
            up: Some(up),
            framing,
            keep_alive,
            guard,
        };
        if body.framing == Framing::Done {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(up) = self.up.take()
            && self.keep_alive
            && up.buf.is_empty()
        {
            self.guard.0.put_idle(up);
        }
    }

    fn fail(&mut self, msg: &str) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.up = None;
        self.framing = Framing::Done;
        Poll::Ready(Some(Err(msg.into())))
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            let Some(up) = this.up.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if up.buf.is_empty() {
                        match ready!(up.poll_fill(cx)) {
                            Ok(0) => return this.fail("the backend closed mid-body"),
                            Ok(_) => {}
                            Err(e) => return this.fail(&format!("reading the body: {e}")),
                        }
                    }
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(up.buf.len());
                    let data = up.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    if left == 0 {
                        this.framing = Framing::Done;
                        this.release();
                    } else {
                        this.framing = Framing::Length(left);
                    }
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                }
                Framing::Chunked(mut state) => {
                    let step = state.step(&mut up.buf);
                    this.framing = Framing::Chunked(state);
                    match step {
                        Ok(Decoded::Data(data)) => {
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                        }
                        Ok(Decoded::End) => {
                            this.framing = Framing::Done;
                            this.release();
                            return Poll::Ready(None);
                        }
                        Ok(Decoded::More) => match ready!(up.poll_fill(cx)) {
                            Ok(0) => return this.fail("the backend closed mid-body"),
                            Ok(_) => {}
                            Err(e) => return this.fail(&format!("reading the body: {e}")),
                        },
                        Err(e) => return this.fail(&e),
                    }
                }
                Framing::Close => {
                    if up.buf.is_empty() {
                        match ready!(up.poll_fill(cx)) {
                            Ok(0) => {
                                this.up = None;
                                this.framing = Framing::Done;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(&format!("reading the body: {e}")),
                        }
                    }
                    let data = up.buf.split().freeze();
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.framing {
            Framing::Done => hyper::body::SizeHint::with_exact(0),
            Framing::Length(n) => hyper::body::SizeHint::with_exact(n),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

/// The current thread's id, without touching its `Thread` handle's refcount.
pub(crate) fn this_thread() -> std::thread::ThreadId {
    thread_local!(static ID: std::thread::ThreadId = std::thread::current().id());
    ID.with(|id| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, String> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match state.step(&mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::End => return Ok(out),
                }
            }
        }
        Err("incomplete".into())
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let input = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
        for split in 1..input.len() {
            assert_eq!(
                decode_all(input, split).as_deref(),
                Ok(&b"hello, world"[..]),
                "split {split}"
            );
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"3\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert!(decode_all(bad, 64).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_heads_give_framing_and_keep_alive() {
        let parse = |s: &str, head_only| match parse_head(s.as_bytes(), head_only) {
            Ok(Parsed::Head {
                framing,
                keep_alive,
                parts,
                ..
            }) => (framing, keep_alive, parts),
            Ok(_) => panic!("not a whole head: {s}"),
            Err(e) => panic!("{e}: {s}"),
        };
        let (f, k, p) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
            false,
        );
        assert_eq!((f, k), (Framing::Length(5), true));
        assert!(p.headers.get("x-a").is_none() && p.headers.get("x-b").is_some());
        assert!(p.headers.get("connection").is_none());
        let (f, k, p) = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            false,
        );
        assert_eq!((f, k), (Framing::Chunked(Chunked::Size), true));
        assert!(p.headers.get("content-length").is_none());
        assert!(p.headers.get("transfer-encoding").is_none());
        let (f, k, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false);
        assert_eq!((f, k), (Framing::Length(2), false));
        let (f, k, _) = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
            false,
        );
        assert_eq!((f, k), (Framing::Length(2), true));
        let (f, k, _) = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((f, k), (Framing::Close, false));
        let (f, k, p) = parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
        assert_eq!((f, k), (Framing::Done, true));
        assert_eq!(p.headers["content-length"], "9");
        let (f, _, _) = parse(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(f, Framing::Done);
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200", false),
            Ok(Parsed::Interim(25))
        ));
        assert!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        assert!(parse_head(b"NOT HTTP\r\n\r\n", false).is_err());
    }
}
