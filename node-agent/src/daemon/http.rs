//! The HTTP listener: `/health`, `/status` (optionally behind a bearer
//! token) and `/metrics`, with bounded request heads.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{health, lock, metrics_text, status_json, SharedRef};
use crate::config::AgentConfig;

/// Connections whose request head is still arriving, at most. Reading a head
/// costs 4 KiB and ends after `HEAD_TIMEOUT`, so idle clients cannot hold
/// every slot for long, and a few hundred of them do not keep `/health` from
/// answering.
const HTTP_SLOTS: usize = 512;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn run_http(listener: tokio::net::TcpListener, cfg: Arc<AgentConfig>, shared: SharedRef) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP_SLOTS));
    loop {
        let mut s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends pass; the listener must not die.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await;
            drop(permit);
            let Ok(Ok(head)) = head else { return };
            // Writing the answer has its own deadline, however slowly a client reads.
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(&mut s, &head, &cfg, &shared)).await;
        });
    }
}

/// The request head (GET only; no body), at most 4 KiB.
async fn read_head(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(head: &str, token: &str) -> bool {
    head.split("\r\n").skip(1).filter_map(|l| l.split_once(':')).any(|(k, v)| {
        k.trim().eq_ignore_ascii_case("authorization")
            && v.trim().strip_prefix("Bearer ").is_some_and(|given| {
                let (a, b) = (given.trim().as_bytes(), token.as_bytes());
                a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            })
    })
}

async fn answer(
    s: &mut tokio::net::TcpStream,
    head: &str,
    cfg: &AgentConfig,
    shared: &SharedRef,
) -> std::io::Result<()> {
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/health") => {
            let why = health(&lock(shared));
            if why.is_empty() {
                ("200 OK", "application/json", "{\"status\":\"ok\"}\n".to_string())
            } else {
                let body = serde_json::json!({ "status": "unhealthy", "reasons": why });
                ("503 Service Unavailable", "application/json", body.to_string() + "\n")
            }
        }
        ("GET", "/status") if cfg.status_token.as_ref().is_some_and(|t| !authorized(head, &t.0)) => {
            ("401 Unauthorized", "text/plain", "/status needs Authorization: Bearer <status_token>\n".into())
        }
        ("GET", "/status") => {
            let v = status_json(cfg, shared);
            ("200 OK", "application/json", serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics_text(cfg, shared)),
        ("GET", _) => ("404 Not Found", "text/plain", "try /health, /status or /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await
}
