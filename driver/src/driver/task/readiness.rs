//! Readiness: a minimal HTTP GET (no client library needed for `GET /health`
//! against a server on this host), and the loop a task runs until its server answers.

use std::time::Duration;

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::driver::Driver;

use super::TaskHandle;

/// Log lines quoted in the event when a server dies while starting.
const LAST_LINES: usize = 10;
/// Bytes of those lines kept at most.
const LAST_BYTES: usize = 8 << 10;

/// Why a readiness probe got no status code.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: only http:// is probed")]
    Scheme(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("bad response {0:?}")]
    BadResponse(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// GETs `url` (`http://host:port/path`); returns the status code.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| ProbeError::Scheme(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let call = async {
        let mut s = TcpStream::connect(authority).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: aimodel-readiness\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let m = s.read(&mut head[n..]).await?;
            if m == 0 {
                break;
            }
            n += m;
        }
        let line = String::from_utf8_lossy(&head[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| ProbeError::BadResponse(line.to_string()))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| ProbeError::Timeout(timeout))?
}

impl TaskHandle {
    /// Polls the readiness URL, emitting "waiting for model server" and "model
    /// server ready after N s", or the last log lines if the server dies first.
    /// Whether the server became ready.
    pub(super) async fn await_ready(
        self: &Arc<Self>,
        driver: &Driver,
        url: &str,
        interval: Duration,
        timeout: Duration,
    ) -> bool {
        let started = Instant::now();
        driver.event(&self.task, format!("waiting for model server at {url}"), &[("url", url.to_string())]);
        loop {
            if let Some(exit) = self.exit_result() {
                let tail = last_log_lines(driver, &self.state.container_id).await;
                driver.event(
                    &self.task,
                    format!("model server exited with code {} while starting; last lines:\n{tail}", exit.exit_code),
                    &[("exit_code", exit.exit_code.to_string())],
                );
                return false;
            }
            if let Ok(code) = probe(url, interval.max(Duration::from_secs(1))).await {
                if (200..300).contains(&code) {
                    let secs = started.elapsed().as_secs_f64();
                    driver.event(
                        &self.task,
                        format!("model server ready after {secs:.1} s"),
                        &[("ready_after_seconds", format!("{secs:.1}"))],
                    );
                    return true;
                }
            }
            if started.elapsed() > timeout {
                driver.event(&self.task, format!("model server not ready after {timeout:?}"), &[]);
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.cancel.cancelled() => return false,
            }
        }
    }
}

/// The last lines of a container's log: Docker is asked for the tail only, and
/// at most `LAST_BYTES` are kept (a server may print one endless line).
async fn last_log_lines(driver: &Driver, container: &str) -> String {
    use futures::StreamExt;
    let Ok(mut s) = driver.runtime().log_tail(container, LAST_LINES).await else { return String::new() };
    let mut text = Vec::new();
    while let Some(Ok(rec)) = s.next().await {
        text.extend(rec.bytes);
        if text.len() > 2 * LAST_BYTES {
            text.drain(..text.len() - LAST_BYTES);
        }
    }
    if text.len() > LAST_BYTES {
        text.drain(..text.len() - LAST_BYTES);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LAST_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_status_code() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await.unwrap();
        });
        assert_eq!(probe(&format!("http://{addr}/health"), Duration::from_secs(2)).await.unwrap(), 503);
        assert!(probe("http://127.0.0.1:1/health", Duration::from_secs(2)).await.is_err());
        assert!(probe("https://x/", Duration::from_secs(1)).await.is_err());
    }
}
