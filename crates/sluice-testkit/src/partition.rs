//! [`Partition`]: a TCP proxy that a test can cut and mend, to put a network partition between
//! Sluice and a server (Redis, PostgreSQL). While cut, every connection through it is closed and
//! new ones are closed at once, so nothing sent reaches the server. While muted, what is sent
//! reaches the server but its answers are lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy on `127.0.0.1:PORT` to one target. Dropping it stops it.
pub struct Partition {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    muted: Arc<AtomicBool>,
    /// Bumped by each cut: sessions end when it changes.
    cuts: watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// A proxy to `target` (`host:port`), passing traffic.
    pub async fn start(target: &str) -> std::io::Result<Partition> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let muted = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let (target, flag, tx) = (target.to_string(), up.clone(), cuts.clone());
        let mute = muted.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let (target, mut cut, mute) = (target.clone(), tx.subscribe(), mute.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let requests = tokio::io::copy(&mut from_client, &mut to_server);
                    let answers = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            match from_server.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) if mute.load(Ordering::SeqCst) => {
                                    let _ = n; // lost on the way
                                }
                                Ok(n) => {
                                    if to_client.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = requests => {}
                        _ = answers => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Partition {
            addr,
            up,
            muted,
            cuts,
            accept,
        })
    }

    /// `host:port` to connect to instead of the target.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Closes every connection through the proxy and refuses new ones until [`mend`](Self::mend).
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Lets connections through again, answers included.
    pub fn mend(&self) {
        self.up.store(true, Ordering::SeqCst);
        self.muted.store(false, Ordering::SeqCst);
    }

    /// Passes what clients send but loses the server's answers until [`mend`](Self::mend).
    pub fn mute(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
