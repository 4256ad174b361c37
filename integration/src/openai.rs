//! A minimal HTTP/1.1 client for model servers (llama-server, SGLang's router,
//! the stand-in): one request per connection, chunked bodies decoded, and the
//! time to the first streamed token. Tests and benchmarks only.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and decoded body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON ({}): {}", self.status, self.body))
    }
}

fn request_bytes(method: &str, path: &str, body: Option<&serde_json::Value>) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if !body.is_empty() {
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(&body);
    r.into_bytes()
}

/// `method path` on 127.0.0.1:`port` with an optional JSON body.
pub async fn request(port: u16, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&request_bytes(method, path, body)).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    parse(&raw)
}

/// `GET path`.
pub async fn get(port: u16, path: &str) -> Result<Response> {
    request(port, "GET", path, None).await
}

/// `POST path` with a JSON body.
pub async fn post(port: u16, path: &str, body: &serde_json::Value) -> Result<Response> {
    request(port, "POST", path, Some(body)).await
}

fn parse(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok(Response { status, body })
}

/// Decodes a chunked body (sizes in hex, each chunk followed by CRLF).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

/// Polls `GET path` until it answers 200; returns how long that took.
pub async fn wait_ok(port: u16, path: &str, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(r) = get(port, path).await {
            if r.status == 200 {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > within {
            bail!("127.0.0.1:{port}{path} did not answer 200 within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chat request body: one user message, at most `max_tokens` tokens.
pub fn chat_body(content: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "model": "any",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    })
}

/// Sends a streamed chat request and returns when the first chunk carrying
/// generated text arrives: that text and the time since the request was sent.
pub async fn first_streamed_token(port: u16, content: &str) -> Result<(String, Duration)> {
    let mut body = chat_body(content, 8);
    body["stream"] = serde_json::Value::Bool(true);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let started = Instant::now();
    s.write_all(&request_bytes("POST", "/v1/chat/completions", Some(&body))).await?;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("the stream ended before a token: {seen}");
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Server-sent events: `data: {json}` lines (chunk-size lines in between are skipped).
        for line in seen.lines().filter(|l| l.starts_with("data: {")) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line[6..]) else { continue };
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                return Ok((t.to_string(), started.elapsed()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_bodies() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{}"));
        let r = parse(b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    }
}
