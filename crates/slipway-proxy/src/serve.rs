//! Serving: one single-threaded runtime per core, each connection handed to the
//! thread with the fewest open ones.

use super::*;

impl Proxy {
    /// Serves on `listener` until `shutdown` fires, then lets open requests finish
    /// (up to 5 s).
    ///
    /// Connections are served by one single-threaded runtime per core. A
    /// connection and its backend connections stay on one thread, so no request
    /// crosses threads (the model of HAProxy and pingora); with the shared
    /// work-stealing pool, wake-ups between workers cost every request. This loop
    /// accepts and hands each connection to the thread with the fewest open ones,
    /// which keeps the cores evenly loaded (a shared accept is first come, first
    /// served, and often left one thread with most of the connections).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let mut workers = Vec::new();
        let mut done = Vec::new();
        for i in 0..threads {
            match self.clone().spawn_worker(i) {
                Ok((worker, finished)) => {
                    workers.push(worker);
                    done.push(finished);
                }
                Err(e) => tracing::error!("proxy: cannot start serving thread {i}: {e}"),
            }
        }
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
                _ = shutdown.changed() => break,
            };
            let Ok(mut stream) = stream.into_std() else {
                continue;
            };
            // A thread that ended (it cannot, short of a bug) leaves the rotation
            // rather than swallowing every connection it would be handed.
            loop {
                let Some(worker) = workers
                    .iter()
                    .min_by_key(|w| w.open.load(Ordering::Relaxed))
                else {
                    tracing::error!("proxy: no serving thread left");
                    break;
                };
                worker.open.fetch_add(1, Ordering::Relaxed);
                match worker.tx.send((stream, peer)) {
                    Ok(()) => break,
                    Err(tokio::sync::mpsc::error::SendError((back, _))) => {
                        stream = back;
                        workers.retain(|w| !w.tx.is_closed());
                    }
                }
            }
            if workers.is_empty() {
                break;
            }
        }
        drop(listener);
        drop(workers); // closes the hand-off channels: each thread drains and ends
        for finished in done {
            let _ = finished.await;
        }
    }

    /// Starts serving thread `i`; the receiver resolves when it has ended.
    pub(crate) fn spawn_worker(
        self: Arc<Self>,
        i: usize,
    ) -> std::io::Result<(Worker, tokio::sync::oneshot::Receiver<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (finished_tx, finished) = tokio::sync::oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        std::thread::Builder::new()
            .name(format!("slipway-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                    while let Some((stream, peer)) = rx.recv().await {
                        self.clone()
                            .serve_connection(stream, peer, &graceful, &count);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
                });
                drop(finished_tx);
            })?;
        Ok((Worker { tx, open }, finished))
    }

    pub(crate) fn serve_connection(
        self: Arc<Self>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        graceful: &hyper_util::server::graceful::GracefulShutdown,
        open: &Arc<AtomicUsize>,
    ) {
        let open = OpenConnection(open.clone());
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper::service::service_fn(move |req| self.clone().handle(req, peer));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _open = open;
            let _ = conn.await;
        });
    }
}

/// A serving thread: where to hand it connections, and how many it has open.
pub(crate) struct Worker {
    pub(crate) tx: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>,
    pub(crate) open: Arc<AtomicUsize>,
}

/// Counts a connection as open on its thread until dropped.
pub(crate) struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
