//! The TCP proxy between the replicas and Redis, owned by the campaign: "Redis slowed" is a
//! delay it puts before forwarding every chunk, each way. A connection whose far side closes
//! is closed on the other side too, so a killed Redis looks killed to the replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone)]
pub struct Proxy {
    port: u16,
    /// The delay per chunk, in microseconds.
    delay: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let delay = Arc::new(AtomicU64::new(0));
        let shared = delay.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let delay = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return; // Redis is down: the replica sees its connection closed.
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let mut up = tokio::spawn(pump(client_read, server_write, delay.clone()));
                    let mut down = tokio::spawn(pump(server_read, client_write, delay));
                    // Either side ending ends both (dropping the other's halves closes it).
                    tokio::select! {
                        _ = &mut up => {}
                        _ = &mut down => {}
                    }
                    up.abort();
                    down.abort();
                });
            }
        });
        Self { port, delay }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay.store(delay.as_micros() as u64, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let wait = delay.load(Ordering::SeqCst);
        if wait > 0 {
            tokio::time::sleep(Duration::from_micros(wait)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
