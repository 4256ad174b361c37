//! A TCP relay that stands in for a long link where `tc netem` is missing
//! (this machine's kernel is built without `CONFIG_NET_SCH_NETEM`): every byte
//! is held `delay` in each direction, and each connection may have at most
//! `window` bytes unacknowledged, acknowledged one more `delay` after delivery
//! — so one stream moves at most `window / (2 × delay)`, as TCP with that
//! window over that round trip does. It models the one property parallel
//! ranges are about (a per-stream bandwidth-delay limit), not loss or jitter.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// A running relay.
#[derive(Debug)]
pub struct DelayProxy {
    pub port: u16,
}

impl DelayProxy {
    /// Relays `127.0.0.1:<port>` to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr, delay: Duration, window: usize) -> std::io::Result<DelayProxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pipe(cr, sw, delay, window));
                    tokio::spawn(pipe(sr, cw, delay, window));
                });
            }
        });
        Ok(DelayProxy { port })
    }
}

async fn pipe<R, W>(mut r: R, mut w: W, delay: Duration, window: usize)
where
    R: AsyncReadExt + Unpin + Send + 'static,
    W: AsyncWriteExt + Unpin + Send + 'static,
{
    let credit = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let c2 = credit.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&data).await.is_err() {
                return;
            }
            // The acknowledgement travels back: the window reopens one delay later.
            let (c, n) = (c2.clone(), data.len());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                c.add_permits(n);
            });
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let room = credit.available_permits().clamp(1, buf.len());
        let n = match r.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // n is at most the 64 KiB buffer.
        let Ok(permits) = u32::try_from(n) else { break };
        let Ok(permit) = credit.acquire_many(permits).await else { break };
        permit.forget();
        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
