//! Serving: one pool of single-threaded runtimes shared by every ingress, each
//! connection handed to the thread with the fewest open ones.
//!
//! A connection and its backend connections stay on one thread, so no request
//! crosses threads (the model of HAProxy and pingora); with the shared
//! work-stealing pool, wake-ups between workers cost every request. Each ingress's
//! accept loop hands connections to the least loaded thread, which keeps the cores
//! evenly loaded across all ingresses (a shared accept is first come, first
//! served, and often left one thread with most of the connections). Threads follow
//! the cores, not the number of services.

use super::*;

/// The serving threads every ingress shares.
pub struct Pool {
    workers: RwLock<Vec<Worker>>,
}

/// A connection on its way to a serving thread.
struct HandOff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
}

/// A serving thread: where to hand it connections, and how many it has open.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<HandOff>,
    open: Arc<AtomicUsize>,
}

impl Pool {
    /// A pool of `threads` serving threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Arc<Self>> {
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            workers.push(Worker::spawn(i)?);
        }
        Ok(Arc::new(Self {
            workers: RwLock::new(workers),
        }))
    }

    /// A pool sized to the machine: one thread per core, at most 8.
    pub fn for_this_machine() -> std::io::Result<Arc<Self>> {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get().min(8)))
    }

    /// Serving threads still running.
    pub fn threads(&self) -> usize {
        self.workers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Open connections per thread, across every ingress.
    pub fn open_connections(&self) -> Vec<usize> {
        self.workers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Hands a connection to the thread with the fewest open ones; `false` when
    /// no thread is left (the connection is dropped).
    fn hand_off(&self, mut conn: HandOff) -> bool {
        loop {
            {
                let workers = self
                    .workers
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(worker) = workers
                    .iter()
                    .min_by_key(|w| w.open.load(Ordering::Relaxed))
                else {
                    tracing::error!("proxy: no serving thread left");
                    return false;
                };
                worker.open.fetch_add(1, Ordering::Relaxed);
                match worker.tx.send(conn) {
                    Ok(()) => return true,
                    Err(tokio::sync::mpsc::error::SendError(back)) => {
                        worker.open.fetch_sub(1, Ordering::Relaxed);
                        conn = back;
                    }
                }
            }
            // A thread that ended (it cannot, short of a bug) leaves the rotation
            // rather than swallowing every connection it would be handed.
            self.workers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|w| !w.tx.is_closed());
        }
    }
}

impl Worker {
    /// Starts serving thread `i`; it ends once the pool is dropped and its last
    /// connection has ended.
    fn spawn(i: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<HandOff>();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        std::thread::Builder::new()
            .name(format!("slipway-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Each connection task holds a clone: the receiver ends when
                    // the last one has.
                    let (alive, mut all_ended) = tokio::sync::mpsc::channel::<()>(1);
                    while let Some(c) = rx.recv().await {
                        c.proxy
                            .serve_connection(c.stream, c.peer, &count, alive.clone());
                    }
                    drop(alive);
                    let _ = all_ended.recv().await;
                });
            })?;
        Ok(Self { tx, open })
    }
}

impl Proxy {
    /// Accepts on `listener` and hands each connection to `pool`, until `stop`
    /// fires or the proxy is closed. Connections already open are not touched by
    /// `stop` (the ingress moved to another address); [`Proxy::close`] ends them,
    /// letting open requests finish (up to 5 s).
    pub async fn serve(
        self: Arc<Self>,
        pool: Arc<Pool>,
        listener: TcpListener,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut closed = self.closed.subscribe();
        let ended = async move {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => {}
                _ = closed.wait_for(|c| *c) => {}
            }
        };
        let mut ended = std::pin::pin!(ended);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    // Out of descriptors or similar: back off instead of spinning.
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
                () = &mut ended => break,
            };
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            if !pool.hand_off(HandOff {
                stream,
                peer,
                proxy: self.clone(),
            }) {
                break;
            }
        }
    }

    /// Stops every accept loop of this proxy and ends its connections once their
    /// open requests have finished (up to 5 s). Other proxies on the same pool
    /// are untouched.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Connections open on this proxy.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn serve_connection(
        self: Arc<Self>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        thread_open: &Arc<AtomicUsize>,
        alive: tokio::sync::mpsc::Sender<()>,
    ) {
        // Counted by `hand_off` already.
        let open = OpenConnection(thread_open.clone());
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let mine = OpenConnection::new(self.open.clone());
        let mut closed = self.closed.subscribe();
        let proxy = self.clone();
        let svc = hyper::service::service_fn(move |req| proxy.clone().handle(req, peer));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _open = (open, mine, alive);
            let mut conn = std::pin::pin!(conn);
            let closing = async move {
                let _ = closed.wait_for(|c| *c).await;
            };
            tokio::select! {
                _ = conn.as_mut() => return,
                () = closing => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        });
    }
}

/// Counts a connection as open (on its thread, on its proxy) until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
