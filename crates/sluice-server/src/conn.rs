//! Accepted connections: `TCP_NODELAY` set (a streamed answer's small writes are not held back
//! waiting for the client's acknowledgement of the previous one), and a limit on how long a
//! write may wait for a client that stopped reading.
//!
//! A streamed answer is produced only as fast as the client takes it: while the client's
//! receive window is full, the response body is not polled, so nothing the gateway does for
//! that request moves on (its timeouts included), and it keeps its in-flight slot, `max_parallel`
//! slot, budget hold and upstream stream. A connection whose writes have made no progress for
//! `server.client_stall_secs` is closed instead: the request ends as its client having left,
//! and everything it held is given back. [`serve`] runs the HTTP/1.1 connections, with a limit
//! on how long a request's head may take to arrive; [`serve_on`] runs each on one of the
//! connection threads ([`Shards`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A listener whose connections are [`Guarded`].
#[derive(Debug)]
pub struct GuardedListener {
    inner: TcpListener,
    stall: Duration,
}

impl GuardedListener {
    /// Wraps `inner`; a write that cannot go on for `stall` fails its connection.
    pub fn new(inner: TcpListener, stall: Duration) -> Self {
        GuardedListener { inner, stall }
    }

    /// Accepts the next connection as a plain socket (TCP_NODELAY set), not yet guarded, so that
    /// a connection thread can take it over; retries after an accept error as axum's listener
    /// does.
    async fn accept_plain(&mut self) -> (TcpStream, std::net::SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        // Best effort: a socket that refuses it still works, with Nagle's delays.
        let _ = io.set_nodelay(true);
        (io, addr)
    }
}

/// Single-threaded runtimes that serve accepted connections, one thread each
/// (`server.connection_threads`). A connection lives on one of them for its whole life: its
/// socket, its timers and the upstream connections its requests use are that thread's (the
/// providers' clients keep a pool per thread, see [`sluice_core::shard`]), so a request is
/// handled start to finish on one thread, with no hand-offs between threads on the way. Under
/// load this costs about a tenth less CPU per request than a work-stealing runtime, whose
/// threads wake each other to share out the tasks. A new connection goes to the thread with the
/// fewest open ones. The threads run until the process exits, so that work a request left
/// behind (a record waiting for room in the log queue, say) always finishes.
#[derive(Debug)]
pub struct Shards {
    handles: Vec<tokio::runtime::Handle>,
    /// Open connections per thread.
    open: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts `n` (at least 1) runtimes, each on a thread of its own.
    pub fn start(n: usize) -> io::Result<Shards> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("sluice-conn-{}", i + 1))
                .spawn(move || {
                    sluice_core::shard::enter(i + 1);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a connection thread ended at its start"))??;
            handles.push(handle);
        }
        Ok(Shards {
            handles,
            open: (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// Open connections on each thread.
    pub fn open(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect()
    }

    /// The thread with the fewest open connections (ties taken in turn), and its count, which
    /// the connection holds until it closes.
    fn pick(&self) -> (tokio::runtime::Handle, OpenCount) {
        let n = self.handles.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let best = (0..n)
            .map(|k| (first + k) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(first);
        self.open[best].fetch_add(1, Ordering::Relaxed);
        (
            self.handles[best].clone(),
            OpenCount(self.open[best].clone()),
        )
    }
}

/// An accepted connection: registered with the accepting runtime, or on its way to another.
enum Accepted {
    Here(TcpStream),
    Moving(std::net::TcpStream),
}

/// One open connection, counted on its thread until dropped.
struct OpenCount(Arc<AtomicUsize>);

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.accept_plain().await;
        (Guarded::new(io, self.stall), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection whose writes fail once they have waited `stall` without progress.
#[derive(Debug)]
pub struct Guarded {
    io: TcpStream,
    stall: Duration,
    /// Armed when a write first has to wait; disarmed by any progress.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Guarded {
    fn new(io: TcpStream, stall: Duration) -> Self {
        Guarded {
            io,
            stall,
            blocked: None,
        }
    }

    /// After the socket said "not now": waits, unless it has said so for `stall` already.
    fn wait<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing for {:.1} s (server.client_stall_secs)",
                    stall.as_secs_f64()
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn went<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.wait(cx),
            ready => {
                self.blocked = None;
                ready
            }
        }
    }
}

/// Serves `app` on `listener` (HTTP/1.1) until `signal` completes, then stops accepting, asks
/// every connection to finish its request in flight and close, and returns once all have. A
/// connection waiting for a request's head gets `header_timeout` for all of it: an idle
/// keep-alive connection is closed after that, and so is one that trickles a head, so that idle
/// sockets cannot use up the gateway's connections.
pub async fn serve(
    listener: GuardedListener,
    app: axum::Router,
    signal: impl Future<Output = ()> + Send + 'static,
    header_timeout: Duration,
) {
    serve_on(listener, app, signal, header_timeout, None).await
}

/// [`serve`], with each connection handed to one of `shards`' runtimes (on the calling runtime
/// when `None`).
pub async fn serve_on(
    mut listener: GuardedListener,
    app: axum::Router,
    signal: impl Future<Output = ()> + Send + 'static,
    header_timeout: Duration,
    shards: Option<Arc<Shards>>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Each connection holds a receiver: all gone, all closed.
    let (open_tx, open_rx) = tokio::sync::watch::channel(());
    let mut signal = std::pin::pin!(signal);
    let stall = listener.stall;
    loop {
        let io = tokio::select! {
            (io, _) = listener.accept_plain() => io,
            () = &mut signal => break,
        };
        // A connection for a connection thread leaves this runtime's I/O driver here and joins
        // its thread's there.
        let (io, thread) = match &shards {
            Some(shards) => match io.into_std() {
                Ok(io) => (Accepted::Moving(io), Some(shards.pick())),
                Err(e) => {
                    tracing::warn!(error = %e, "an accepted connection could not be handed over");
                    continue;
                }
            },
            None => (Accepted::Here(io), None),
        };
        let (runtime, count) = thread.unzip();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let (mut stop, open) = (stop_rx.clone(), open_rx.clone());
        let task = async move {
            let io = match io {
                Accepted::Here(io) => io,
                Accepted::Moving(io) => match TcpStream::from_std(io) {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::warn!(error = %e, "an accepted connection could not be taken over");
                        return;
                    }
                },
            };
            let io = Guarded::new(io, stall);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            // Uncounted before `open` goes: once `serve_on` returns, every count is back to 0.
            drop(count);
            drop(open);
        };
        match runtime {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.went(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.went(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.went(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.went(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(stall: Duration) -> (Guarded, TcpStream) {
        // A small send buffer (accepted sockets inherit it): a write waits for the reader after
        // tens of kilobytes, not megabytes, so progress shows every few milliseconds.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(32 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut guarded = GuardedListener::new(listener, stall);
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = axum::serve::Listener::accept(&mut guarded).await;
        (server, client.await.unwrap())
    }

    /// Writes to a client that reads nothing fail after the stall limit instead of waiting
    /// forever; the socket has TCP_NODELAY.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_off() {
        let (mut server, _client) = pair(Duration::from_millis(300)).await;
        assert!(server.io.nodelay().unwrap());
        let chunk = vec![b'x'; 64 * 1024];
        let started = std::time::Instant::now();
        let e = loop {
            match tokio::time::timeout(Duration::from_secs(10), server.write_all(&chunk)).await {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => break e,
                Err(_) => panic!("the write waited past the stall limit"),
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("client_stall_secs"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    /// A connection that trickles its request head is closed after the head timeout; a whole
    /// request is answered; shutdown lets the request in flight finish, then returns.
    #[tokio::test]
    async fn serve_times_out_a_trickled_head_and_shuts_down_gracefully() {
        use tokio::io::AsyncBufReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            GuardedListener::new(listener, Duration::from_secs(60)),
            app,
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_millis(300),
        ));
        // A head that never ends: closed by the server.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the trickled head was not timed out");
        // A request in flight when the shutdown comes is answered.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(()).unwrap();
        let mut lines = tokio::io::BufReader::new(ok).lines();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    /// A slow reader that keeps taking data is never cut off: progress restarts the clock.
    #[tokio::test]
    async fn a_slow_reader_that_keeps_reading_is_served() {
        let (mut server, mut client) = pair(Duration::from_secs(1)).await;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        });
        let chunk = vec![b'y'; 64 * 1024];
        // Far more than the socket buffers hold, over more than the stall limit (4 MiB at about
        // 1.6 MB/s).
        for _ in 0..64 {
            server
                .write_all(&chunk)
                .await
                .expect("a reading client is served");
        }
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), 64 * 64 * 1024);
    }

    /// Sends `GET path` on `conn` and reads the answer's body (the answer has a length).
    async fn get_body(conn: &mut TcpStream, path: &str) -> String {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .expect("an answer with a length");
                if body.len() >= len {
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    return body[..len].to_string();
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(n > 0, "closed before the answer: {text}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// With connection threads, each connection is served on one of them (a new one on the
    /// thread with the fewest open), requests there see their thread's number, and a shutdown
    /// still lets the request in flight finish before `serve_on` returns.
    #[tokio::test]
    async fn connections_are_served_on_the_connection_threads() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shards = Arc::new(Shards::start(2).unwrap());
        let here = || async {
            let name = std::thread::current().name().unwrap_or("").to_string();
            format!("{} {name}", sluice_core::shard::current())
        };
        // `/slow` says when it has begun, and answers once the test lets it.
        let (begun_tx, mut begun) = tokio::sync::mpsc::unbounded_channel::<()>();
        let go = Arc::new(tokio::sync::Notify::new());
        let let_go = go.clone();
        let app = axum::Router::new()
            .route("/where", axum::routing::get(here))
            .route(
                "/slow",
                axum::routing::get(move || {
                    let (begun_tx, let_go) = (begun_tx.clone(), let_go.clone());
                    async move {
                        let _ = begun_tx.send(());
                        let_go.notified().await;
                        here().await
                    }
                }),
            );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(
            GuardedListener::new(listener, Duration::from_secs(60)),
            app,
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(5),
            Some(shards.clone()),
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        let on_a = get_body(&mut a, "/where").await;
        let on_b = get_body(&mut b, "/where").await;
        let mut seen = [on_a.clone(), on_b.clone()];
        seen.sort();
        assert_eq!(
            seen,
            ["1 sluice-conn-1", "2 sluice-conn-2"],
            "{on_a} / {on_b}"
        );
        // A connection keeps its thread.
        assert_eq!(get_body(&mut a, "/where").await, on_a);
        assert_eq!(shards.open(), [1, 1]);
        // Closed, it no longer counts: the next connection goes to the thread it left.
        drop(a);
        let freed: usize = on_a[..1].parse().unwrap();
        for _ in 0..500 {
            if shards.open()[freed - 1] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shards.open()[freed - 1], 0);
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), begun.recv())
            .await
            .expect("the request began");
        stop_tx.send(()).unwrap();
        // The stop is under way (no new connection is taken) while the request is in flight.
        for _ in 0..500 {
            if TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        go.notify_one();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
            .await
            .expect("the request in flight was answered and its connection closed")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&on_a), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve_on returned")
            .unwrap();
        assert_eq!(shards.open(), [0, 0]);
    }
}
