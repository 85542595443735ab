//! A TCP proxy in front of PostgreSQL that can freeze or cut the connections going through it.
//!
//! `freeze()` stops forwarding on every connection open at that moment, in both directions,
//! while keeping the sockets open: the peer sees a stalled server, exactly what TCP keepalives
//! do not notice. Connections made afterwards pass. `cut()` closes every open connection.
//! `refuse(true)` closes new connections as soon as they are accepted (a server that is down).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct Conn {
    frozen: Arc<AtomicBool>,
    /// Dropping the sender (or sending `true`) closes the connection.
    cut: watch::Sender<bool>,
}

pub struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<Conn>>>,
    refusing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let registry = conns.clone();
        let refusing = Arc::new(AtomicBool::new(false));
        let refuse = refusing.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                let (cut, cut_rx) = watch::channel(false);
                registry.lock().unwrap().push(Conn {
                    frozen: frozen.clone(),
                    cut,
                });
                tokio::spawn(pipe(client, server, frozen, cut_rx));
            }
        });
        Proxy {
            port,
            conns,
            refusing,
            task,
        }
    }

    /// Stalls every connection open now.
    pub fn freeze(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.frozen.store(true, Ordering::SeqCst);
        }
    }

    /// Closes every connection open now.
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.cut.send(true);
        }
    }

    /// While on, new connections are closed at once.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    frozen: Arc<AtomicBool>,
    mut cut: watch::Receiver<bool>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = copy(&mut cr, &mut sw, &frozen);
    let down = copy(&mut sr, &mut cw, &frozen);
    // Either direction ending (or a cut) closes both sides.
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut.wait_for(|c| *c) => {}
    }
}

/// Copies until EOF; once frozen, holds the connection without forwarding anything.
async fn copy(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    frozen: &AtomicBool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
