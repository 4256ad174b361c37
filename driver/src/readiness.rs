//! A minimal HTTP GET for readiness probes (no client library needed for
//! `GET /health` against a server on this host).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `url` (`http://host:port/path`); returns the status code.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// is probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let call = async {
        let mut s = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: aimodel-readiness\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let m = s.read(&mut head[n..]).await.map_err(|e| e.to_string())?;
            if m == 0 {
                break;
            }
            n += m;
        }
        let line = String::from_utf8_lossy(&head[..n]);
        line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad response {line:?}"))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| format!("no answer within {timeout:?}"))?
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
        assert_eq!(probe(&format!("http://{addr}/health"), Duration::from_secs(2)).await, Ok(503));
        assert!(probe("http://127.0.0.1:1/health", Duration::from_secs(2)).await.is_err());
        assert!(probe("https://x/", Duration::from_secs(1)).await.is_err());
    }
}
