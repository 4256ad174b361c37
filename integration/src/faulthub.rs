//! A small hub-protocol server of ours that injects the faults olah cannot:
//! redirects to another host, error codes, 429 with Retry-After, 500s,
//! truncated and wrong bodies, stalls. It counts what it serves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The one file every fault repo serves (an LFS file).
pub const FILE: &str = "model.safetensors";
/// The commit every repo is at.
pub const COMMIT: &str = "f00df00df00df00df00df00df00df00df00df00d";

/// What the server saw.
#[derive(Debug, Default)]
pub struct Log {
    /// Requests per path.
    pub hits: BTreeMap<String, u32>,
    /// Bytes of file bodies fully or partly sent, per repo.
    pub body_bytes: BTreeMap<String, u64>,
    /// Authorization headers seen by the second host.
    pub second_host_auth: Vec<String>,
    /// Authorization headers seen by the hub.
    pub hub_auth: Vec<String>,
    /// Where each download of a `slow/` repo started (0, or its `Range: bytes=N-`).
    pub starts: Vec<(String, usize)>,
}

/// A running fault hub (and its second host for redirects).
#[derive(Debug)]
pub struct FaultHub {
    pub port: u16,
    pub log: Arc<Mutex<Log>>,
    pub content: Arc<Vec<u8>>,
}

impl FaultHub {
    /// `HF_ENDPOINT` for it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the hub and its second host on ephemeral ports.
    pub async fn start(content: Vec<u8>) -> std::io::Result<FaultHub> {
        let hub = TcpListener::bind("127.0.0.1:0").await?;
        let cdn = TcpListener::bind("127.0.0.1:0").await?;
        let (port, cdn_port) = (hub.local_addr()?.port(), cdn.local_addr()?.port());
        let log = Arc::new(Mutex::new(Log::default()));
        let content = Arc::new(content);
        for (listener, is_cdn) in [(hub, false), (cdn, true)] {
            let (log, content) = (log.clone(), content.clone());
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (log, content) = (log.clone(), content.clone());
                    tokio::spawn(async move {
                        let _ = serve(s, is_cdn, cdn_port, log, content).await;
                    });
                }
            });
        }
        Ok(FaultHub { port, log, content })
    }
}

/// Writes a whole answer with its length and closes the exchange.
pub(crate) async fn respond(
    s: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await
}

async fn serve(
    mut s: TcpStream,
    is_cdn: bool,
    cdn_port: u16,
    log: Arc<Mutex<Log>>,
    content: Arc<Vec<u8>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut auth = String::new();
    let mut range_from: Option<usize> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                let v = v.trim().trim_start_matches("bytes=");
                range_from = v.strip_suffix('-').and_then(|n| n.parse().ok());
            }
        }
        if let Some(v) = h.strip_prefix("authorization:").or_else(|| h.strip_prefix("Authorization:")) {
            auth = v.trim().to_string();
        }
    }
    let n = {
        let mut l = log.lock().unwrap();
        if is_cdn {
            l.second_host_auth.push(auth.clone());
        } else {
            l.hub_auth.push(auth.clone());
        }
        let c = l.hits.entry(format!("{}{path}", if is_cdn { "cdn:" } else { "" })).or_default();
        *c += 1;
        *c
    };
    let repo = path.trim_start_matches("/api/models/").split('/').take(2).collect::<Vec<_>>().join("/");
    let repo = if path.starts_with("/api/") {
        repo
    } else {
        path.trim_start_matches('/').split('/').take(2).collect::<Vec<_>>().join("/")
    };
    let code = |c: &str| vec![("X-Error-Code", c.to_string())];
    match repo.as_str() {
        "fault/unauthorized" => return respond(&mut s, "401 Unauthorized", &code("RepoNotFound"), b"{}").await,
        "fault/gated" => return respond(&mut s, "403 Forbidden", &code("GatedRepo"), b"{}").await,
        "fault/missing" => return respond(&mut s, "404 Not Found", &code("RepoNotFound"), b"{}").await,
        _ => {}
    }
    if path.starts_with("/api/models/") && path.contains("/revision/") {
        return respond(&mut s, "200 OK", &[], format!("{{\"sha\":\"{COMMIT}\"}}").as_bytes()).await;
    }
    if path.starts_with("/api/models/") && path.contains("/tree/") {
        let sha = format!("{:x}", sha2::Sha256::digest(content.as_slice()));
        let tree = format!(
            "[{{\"type\":\"file\",\"path\":\"{FILE}\",\"size\":{n},\"oid\":\"0000000000000000000000000000000000000000\",\"lfs\":{{\"oid\":\"{sha}\",\"size\":{n},\"pointerSize\":130}}}}]",
            n = content.len()
        );
        return respond(&mut s, "200 OK", &[], tree.as_bytes()).await;
    }
    // resolve: /{org}/{name}/resolve/{commit}/{file}
    if repo == "fault/redirect" && !is_cdn {
        let to = format!("http://127.0.0.1:{cdn_port}{path}");
        return respond(&mut s, "302 Found", &[("Location", to)], b"").await;
    }
    let count_body = |bytes: u64| *log.lock().unwrap().body_bytes.entry(repo.clone()).or_default() += bytes;
    if repo == "fault/othercommit" {
        // The resolve answer says it is another commit's file (a stale mirror).
        let other = ("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567".to_string());
        count_body(content.len() as u64);
        return respond(&mut s, "200 OK", &[other], &content).await;
    }
    if repo == "fault/otheretag" {
        let other = ("X-Linked-Etag", format!("\"{}\"", "e".repeat(64)));
        count_body(content.len() as u64);
        return respond(&mut s, "200 OK", &[other], &content).await;
    }
    if repo.starts_with("slow/") {
        // 64 KiB every 20 ms, counted as sent: slow enough to pause a downloader mid-file.
        // `Range: bytes=N-` is honoured, so a resumed download fetches only the rest.
        let from = range_from.filter(|&f| f < content.len());
        log.lock().unwrap().starts.push((repo.clone(), from.unwrap_or(0)));
        let head = match from {
            Some(f) => format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {f}-{}/{}\r\nConnection: close\r\n\r\n",
                content.len() - f,
                content.len() - 1,
                content.len()
            ),
            None => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", content.len()),
        };
        s.write_all(head.as_bytes()).await?;
        for piece in content[from.unwrap_or(0)..].chunks(64 << 10) {
            s.write_all(piece).await?;
            count_body(piece.len() as u64);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        return Ok(());
    }
    match (repo.as_str(), n) {
        ("fault/ratelimit", 1) => respond(&mut s, "429 Too Many Requests", &[("Retry-After", "1".into())], b"").await,
        ("fault/flaky", 1) => respond(&mut s, "500 Internal Server Error", &[], b"oops").await,
        ("fault/truncated", 1) => {
            let half = content.len() / 2;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", content.len());
            s.write_all(head.as_bytes()).await?;
            s.write_all(&content[..half]).await?;
            count_body(half as u64);
            Ok(())
        }
        ("fault/stall", 1) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", content.len());
            s.write_all(head.as_bytes()).await?;
            s.write_all(&content[..1000]).await?;
            count_body(1000);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }
        ("fault/corrupt", _) => {
            let mut bad = content.as_ref().clone();
            bad[0] ^= 0xff;
            count_body(bad.len() as u64);
            respond(&mut s, "200 OK", &[], &bad).await
        }
        _ => {
            count_body(content.len() as u64);
            respond(&mut s, "200 OK", &[], &content).await
        }
    }
}
