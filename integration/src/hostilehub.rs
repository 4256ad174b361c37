//! A hub of ours that attacks the agent (security issue #11): tree listings
//! whose blob names escape the cache or name host files, absurd sizes, a
//! malformed Link header, bodies longer than listed or endless, a giant JSON
//! page, endless pagination, a next page on another host, a listing that
//! trickles forever. Every repo `hostile/<case>` is one attack; a second host
//! records whether the token reached it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::faulthub::respond;
use tokio::net::{TcpListener, TcpStream};

/// The commit every repo is at.
pub const COMMIT: &str = "c0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ff";

/// Each attack: the repo and a word its error must contain.
pub const CASES: &[(&str, &str)] = &[
    ("hostile/traversal", "not a git blob id"),
    ("hostile/traversal-lfs", "not a sha256"),
    ("hostile/hostfile", "not a git blob id"),
    ("hostile/badlink", "Link header"),
    ("hostile/hugesize", "exceeds the limit"),
    ("hostile/oversum", "exceeds the limit"),
    ("hostile/overlong", "longer than the 10 bytes"),
    ("hostile/endless", "longer than the 10 bytes"),
    ("hostile/giantpage", "answer larger than"),
    ("hostile/giantrevision", "answer larger than"),
    ("hostile/endlesspages", "more than 1000 pages"),
    ("hostile/crosshost", "refusing the next page link"),
];

/// The git blob id of `{}`, the benign file every listing has.
pub const GOOD_OID: &str = "9e26dfeeb6e641a33dae4961196235bdb965b21b";

/// What the servers saw (the fault hub's record: the second host's requests
/// are counted under `second:<path>`).
pub use crate::faulthub::Log;

/// A running hostile hub and its second host.
#[derive(Debug)]
pub struct HostileHub {
    pub port: u16,
    pub second_port: u16,
    pub log: Arc<Mutex<Log>>,
    /// A relative path from a repo's `blobs/` directory to the sentinel directory
    /// the traversal attacks aim at (`../../../../tmp/x/sentinel`).
    pub escape: String,
}

impl HostileHub {
    /// `HF_ENDPOINT` for it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts both servers. `escape` is where traversal oids point (relative to `blobs/`).
    pub async fn start(escape: &str) -> std::io::Result<HostileHub> {
        let hub = TcpListener::bind("127.0.0.1:0").await?;
        let second = TcpListener::bind("127.0.0.1:0").await?;
        let (port, second_port) = (hub.local_addr()?.port(), second.local_addr()?.port());
        let log = Arc::new(Mutex::new(Log::default()));
        for (listener, is_second) in [(hub, false), (second, true)] {
            let (log, escape) = (log.clone(), escape.to_string());
            tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (log, escape) = (log.clone(), escape.clone());
                    tokio::spawn(async move {
                        let _ = serve(s, is_second, second_port, log, &escape).await;
                    });
                }
            });
        }
        Ok(HostileHub { port, second_port, log, escape: escape.into() })
    }
}

/// Sends `head` (without a length) and then `piece` until the client hangs up
/// (or `max` bytes, a safety net). Returns the bytes sent.
async fn endless(s: &mut TcpStream, head: &str, piece: &[u8], max: u64) -> u64 {
    let mut sent = 0u64;
    if s.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    while sent < max {
        if s.write_all(piece).await.is_err() {
            break;
        }
        sent += piece.len() as u64;
    }
    sent
}

fn file(path: &str, size: u64, oid: &str) -> String {
    format!(r#"{{"type":"file","path":"{path}","size":{size},"oid":"{oid}"}}"#)
}

fn lfs_file(path: &str, size: u64, sha: &str) -> String {
    format!(
        r#"{{"type":"file","path":"{path}","size":{size},"oid":"{}","lfs":{{"oid":"{sha}","size":{size},"pointerSize":130}}}}"#,
        "0".repeat(40)
    )
}

async fn serve(
    mut s: TcpStream,
    is_second: bool,
    second_port: u16,
    log: Arc<Mutex<Log>>,
    escape: &str,
) -> std::io::Result<()> {
    let mut r = BufReader::new(&mut s);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            }
        }
    }
    {
        let mut l = log.lock().unwrap();
        if is_second {
            l.second_host_auth.push(auth.clone());
        } else {
            l.hub_auth.push(auth.clone());
        }
        *l.hits.entry(format!("{}{path}", if is_second { "second:" } else { "" })).or_default() += 1;
    }
    let api = path.starts_with("/api/models/");
    let rest = path.trim_start_matches("/api/models/").trim_start_matches('/');
    let repo = rest.split('/').take(2).collect::<Vec<_>>().join("/");
    let case = repo.trim_start_matches("hostile/");
    let json_head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
    if api && path.contains("/revision/") {
        if case == "giantrevision" {
            endless(&mut s, json_head, &[b' '; 65536], 1 << 28).await;
            return Ok(());
        }
        return respond(&mut s, "200 OK", &[], format!(r#"{{"sha":"{COMMIT}"}}"#).as_bytes()).await;
    }
    if api && path.contains("/tree/") {
        let page = |items: &[String]| format!("[{}]", items.join(","));
        // A benign file (`{}`, its real git blob id): the attack is the only fault.
        let ok = file("config.json", 2, GOOD_OID);
        let hostname = std::fs::metadata("/etc/hostname").map(|m| m.len()).unwrap_or(0);
        let tree = match case {
            "traversal" => page(&[ok, file("x.json", 10, &format!("{escape}/pwned"))]),
            "traversal-lfs" => page(&[ok, lfs_file("m.bin", 10, &format!("{escape}/pwned-lfs"))]),
            "hostfile" => page(&[file("hostname", hostname, "../../../../../../../../../../etc/hostname")]),
            "hugesize" => page(&[lfs_file("m.bin", 1 << 62, &"b".repeat(64))]),
            "oversum" => page(&[
                lfs_file("a.bin", (1 << 63) + 1, &"b".repeat(64)),
                lfs_file("b.bin", (1 << 63) + 1, &"c".repeat(64)),
            ]),
            "overlong" | "endless" => page(&[file("ten.txt", 10, &"d".repeat(40))]),
            "giantpage" => {
                let piece = r#"{"type":"directory","path":"d","oid":"x"},"#.repeat(1000);
                endless(&mut s, &format!("{json_head}["), piece.as_bytes(), 1 << 28).await;
                return Ok(());
            }
            "trickle" => {
                // One byte every 200 ms, forever: only a deadline ends it.
                let _ = s.write_all(format!("{json_head}[").as_bytes()).await;
                for _ in 0..3000 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if s.write_all(b" ").await.is_err() {
                        break;
                    }
                }
                return Ok(());
            }
            "endlesspages" => {
                let n: u64 = path.split("cursor=").nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                let next = format!("</api/models/{repo}/tree/{COMMIT}?recursive=true&cursor={}>; rel=\"next\"", n + 1);
                return respond(&mut s, "200 OK", &[("Link", next)], b"[]").await;
            }
            "badlink" => {
                return respond(&mut s, "200 OK", &[("Link", r#">x<; rel="next""#.into())], page(&[ok]).as_bytes())
                    .await;
            }
            "crosshost" if !is_second => {
                let next = format!(
                    "<http://127.0.0.1:{second_port}/api/models/{repo}/tree/{COMMIT}?recursive=true&cursor=2>; rel=\"next\""
                );
                return respond(&mut s, "200 OK", &[("Link", next)], page(&[ok]).as_bytes()).await;
            }
            _ => page(&[ok]),
        };
        return respond(&mut s, "200 OK", &[], tree.as_bytes()).await;
    }
    // resolve: /{org}/{name}/resolve/{commit}/{file}
    let sent = match case {
        "overlong" => {
            let body = vec![b'x'; 50 << 20];
            let _ = respond(&mut s, "200 OK", &[], &body).await;
            body.len() as u64
        }
        "endless" => {
            let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
            endless(&mut s, head, &[b'y'; 65536], 1 << 28).await
        }
        _ => {
            let _ = respond(&mut s, "200 OK", &[], b"{}").await;
            2
        }
    };
    *log.lock().unwrap().body_bytes.entry(repo).or_default() += sent;
    Ok(())
}
