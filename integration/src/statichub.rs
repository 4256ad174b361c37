//! A fast hub-protocol server of ours over files on disk: the revision and
//! tree APIs, `resolve` downloads with HEAD (the headers huggingface_hub reads:
//! `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`) and byte ranges.
//! It counts the body bytes it serves, so tests and benchmarks can tell how
//! often each byte left the server. olah streams about 15 MB/s; this one is
//! limited by the page cache and loopback.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One file of the served model.
#[derive(Debug, Clone)]
pub struct ServedFile {
    pub path: String,
    pub on_disk: PathBuf,
    pub size: u64,
    /// sha256 for LFS files, git blob sha1 otherwise.
    pub etag: String,
    pub lfs: bool,
}

/// A running static hub serving one commit of any repo name.
#[derive(Debug)]
pub struct StaticHub {
    pub port: u16,
    pub commit: String,
    pub files: Arc<Vec<ServedFile>>,
    /// Body bytes sent (GET only).
    pub served: Arc<AtomicU64>,
    /// Range requests seen.
    pub ranges: Arc<AtomicU64>,
    /// Microseconds of pause after each MiB sent (0: full speed), to catch a download midway.
    pub pause_per_mib_us: Arc<AtomicU64>,
}

/// Describes `files` (relative path → file on disk); LFS for files of at least
/// `lfs_min` bytes, hashing them once.
pub fn describe(files: &[(String, PathBuf)], lfs_min: u64) -> std::io::Result<Vec<ServedFile>> {
    let mut out = Vec::new();
    for (path, on_disk) in files {
        let size = std::fs::metadata(on_disk)?.len();
        let lfs = size >= lfs_min;
        let etag = if lfs { hf_cache::check::sha256_file(on_disk)? } else { hf_cache::check::git_blob_sha1(on_disk)? };
        out.push(ServedFile { path: path.clone(), on_disk: on_disk.clone(), size, etag, lfs });
    }
    Ok(out)
}

impl StaticHub {
    /// Serves `files` at `commit` on `addr` (`127.0.0.1:0` for an ephemeral port).
    pub async fn start(addr: &str, commit: &str, files: Vec<ServedFile>) -> std::io::Result<StaticHub> {
        let l = TcpListener::bind(addr).await?;
        let port = l.local_addr()?.port();
        let hub = StaticHub {
            port,
            commit: commit.to_string(),
            files: Arc::new(files),
            served: Arc::default(),
            ranges: Arc::default(),
            pause_per_mib_us: Arc::default(),
        };
        let (files, served, ranges, pause, commit) = (
            hub.files.clone(),
            hub.served.clone(),
            hub.ranges.clone(),
            hub.pause_per_mib_us.clone(),
            commit.to_string(),
        );
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let _ = s.set_nodelay(true);
                let (files, served, ranges, pause, commit) =
                    (files.clone(), served.clone(), ranges.clone(), pause.clone(), commit.clone());
                tokio::spawn(async move {
                    let _ = serve(s, &commit, &files, &served, &ranges, &pause).await;
                });
            }
        });
        Ok(hub)
    }

    /// `HF_ENDPOINT` for it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Bytes of all files.
    pub fn total(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Serves requests on one connection (keep-alive) until it closes.
async fn serve(
    mut s: TcpStream,
    commit: &str,
    files: &[ServedFile],
    served: &AtomicU64,
    ranges: &AtomicU64,
    pause: &AtomicU64,
) -> std::io::Result<()> {
    let (rd, mut wr) = s.split();
    let mut r = BufReader::new(rd);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
        let mut range: Option<(u64, Option<u64>)> = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await? == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    let v = v.trim().trim_start_matches("bytes=");
                    if let Some((a, b)) = v.split_once('-') {
                        if let Ok(a) = a.parse() {
                            range = Some((a, b.parse().ok()));
                        }
                    }
                }
            }
        }
        let path = target.split('?').next().unwrap_or("/");
        if let Some(rest) = path.strip_prefix("/api/models/") {
            let repo: Vec<&str> = rest.splitn(3, '/').collect();
            let body = if rest.contains("/revision/") {
                let siblings: Vec<serde_json::Value> =
                    files.iter().map(|f| serde_json::json!({"rfilename": f.path})).collect();
                serde_json::json!({"id": format!("{}/{}", repo[0], repo.get(1).unwrap_or(&"")), "sha": commit,
                    "siblings": siblings, "private": false, "disabled": false, "gated": false})
            } else if rest.contains("/tree/") {
                serde_json::Value::Array(
                    files
                        .iter()
                        .map(|f| {
                            let mut v = serde_json::json!({"type": "file", "path": f.path, "size": f.size,
                                "oid": if f.lfs { "0".repeat(40) } else { f.etag.clone() }});
                            if f.lfs {
                                v["lfs"] = serde_json::json!({"oid": f.etag, "size": f.size, "pointerSize": 134});
                            }
                            v
                        })
                        .collect(),
                )
            } else {
                serde_json::json!({"error": "not found"})
            };
            let b = body.to_string();
            head_to(&mut wr, "200 OK", &[("Content-Type", "application/json".into())], b.len() as u64).await?;
            wr.write_all(b.as_bytes()).await?;
            continue;
        }
        // /{org}/{name}/resolve/{commit}/{path}
        let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        let file = (segs.len() == 5 && segs[2] == "resolve")
            .then(|| files.iter().find(|f| f.path == decode(segs[4])))
            .flatten();
        let Some(f) = file else {
            head_to(&mut wr, "404 Not Found", &[("X-Error-Code", "EntryNotFound".into())], 0).await?;
            continue;
        };
        let mut headers = vec![
            ("X-Repo-Commit", commit.to_string()),
            ("ETag", format!("\"{}\"", f.etag)),
            ("Accept-Ranges", "bytes".to_string()),
        ];
        if f.lfs {
            headers.push(("X-Linked-Etag", format!("\"{}\"", f.etag)));
            headers.push(("X-Linked-Size", f.size.to_string()));
        }
        let (start, end) = match range {
            Some((a, b)) if a < f.size => (a, b.map_or(f.size, |b| (b + 1).min(f.size))),
            _ => (0, f.size),
        };
        let status = if range.is_some() {
            ranges.fetch_add(1, Ordering::Relaxed);
            headers.push(("Content-Range", format!("bytes {start}-{}/{}", end.saturating_sub(1), f.size)));
            "206 Partial Content"
        } else {
            "200 OK"
        };
        head_to(&mut wr, status, &headers, end - start).await?;
        if method == "HEAD" {
            continue;
        }
        let mut src = tokio::fs::File::open(&f.on_disk).await?;
        src.seek(std::io::SeekFrom::Start(start)).await?;
        let mut left = end - start;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            let n = src.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            wr.write_all(&buf[..n]).await?;
            served.fetch_add(n as u64, Ordering::Relaxed);
            left -= n as u64;
            let p = pause.load(Ordering::Relaxed);
            if p > 0 {
                tokio::time::sleep(std::time::Duration::from_micros(p * n as u64 / (1 << 20))).await;
            }
        }
    }
}

async fn head_to<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    status: &str,
    headers: &[(&str, String)],
    len: u64,
) -> std::io::Result<()> {
    let mut h = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    w.write_all(h.as_bytes()).await
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A model of `sizes` (bytes per weights file) plus config files, written to
/// `dir` from a fast deterministic generator; returns (relative path, file).
pub fn write_model(dir: &std::path::Path, sizes: &[u64]) -> std::io::Result<Vec<(String, PathBuf)>> {
    use std::io::Write;
    let mut out = Vec::new();
    let n = sizes.len();
    for (i, &size) in sizes.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let p = dir.join(&name);
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&p)?);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            let k = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
            f.write_all(&buf[..k])?;
            left -= k as u64;
        }
        f.flush()?;
        out.push((name, p));
    }
    let mut index = BTreeMap::new();
    for (name, _) in &out {
        index.insert(format!("layer.{name}"), name.clone());
    }
    let small = [
        ("config.json", serde_json::json!({"architectures": ["Bench"], "hidden_size": 4096}).to_string()),
        ("model.safetensors.index.json", serde_json::json!({"weight_map": index}).to_string()),
        ("tokenizer.json", serde_json::json!({"model": {"vocab": {"a": 0}}}).to_string()),
    ];
    for (name, text) in small {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        out.push((name.to_string(), p));
    }
    Ok(out)
}
