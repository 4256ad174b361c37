//! The models Nomad jobs will need: every `driver = "aimodel"` task of every
//! (running or pending) job, found through blocking queries on the job list,
//! so a model is prewarmed as soon as its job is registered — before a node
//! is picked, and before the driver's StartTask would refuse it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::NomadConfig;
pub use crate::config::{resolve_address, token_safe_over};
pub use crate::jobs::{images_of_job, models_of_job, ImageWants, TaskImage, Wanted};

/// What the watcher knows, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NomadStatus {
    pub address: String,
    pub index: u64,
    pub jobs_seen: usize,
    /// `namespace/job` → models.
    pub jobs: BTreeMap<String, Vec<String>>,
    pub last_error: Option<String>,
    pub queries: u64,
    /// Failed job list or job reads since the start (`aimodel_agent_nomad_errors_total`).
    pub errors: u64,
    /// Unix seconds of the last job list Nomad answered.
    pub last_ok: Option<u64>,
    /// `/health` fails once Nomad has not answered for this long (`nomad.health_grace`).
    pub health_grace_secs: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JobStub {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    modify_index: u64,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    status: String,
}

/// How the Nomad API is reached.
#[derive(Debug)]
enum Transport {
    /// `http://` or `https://` through reqwest.
    Http(reqwest::Client),
    /// Nomad's task API socket (`unix://${NOMAD_SECRETS_DIR}/api.sock`, Nomad ≥ 1.5):
    /// no network, and the token is the task's own workload identity.
    Unix(std::path::PathBuf),
}

/// A Nomad API client (http(s) or the task API socket), with the token.
pub struct Client {
    transport: Transport,
    address: String,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// Largest Nomad answer read (a job list of a big cluster is a few MB).
const MAX_ANSWER: usize = 64 << 20;

impl Client {
    /// A client of `address` (`http(s)://…` or `unix://…`).
    pub fn new(address: &str, token: Option<String>) -> Self {
        let transport = match address.strip_prefix("unix://") {
            Some(path) => Transport::Unix(path.into()),
            // No proxy (a "local" token would reach it) and no redirects (reqwest
            // keeps X-Nomad-Token on a redirect to another host).
            None => Transport::Http(
                reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap_or_else(|_| reqwest::Client::new()),
            ),
        };
        Client { transport, address: address.to_string(), token }
    }

    /// GETs `path`: the JSON answer and its `X-Nomad-Index`.
    pub async fn get(&self, path: &str, timeout: Duration) -> Result<(serde_json::Value, u64), String> {
        let url = format!("{}{path}", self.address);
        let (status, index, body) = match &self.transport {
            Transport::Http(http) => {
                let mut h = HeaderMap::new();
                if let Some(t) = &self.token {
                    if let Ok(v) = t.parse() {
                        h.insert("X-Nomad-Token", v);
                    }
                }
                let r = http.get(&url).headers(h).timeout(timeout).send().await.map_err(|e| format!("{url}: {e}"))?;
                let status = r.status().as_u16();
                let index = r.headers().get("X-Nomad-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                let body = read_capped(r).await.map_err(|e| format!("{url}: {e}"))?;
                (status, index, body)
            }
            Transport::Unix(sock) => tokio::time::timeout(timeout, unix_get(sock, path, self.token.as_deref()))
                .await
                .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
                .map_err(|e| format!("{url}: {e}"))?,
        };
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string();
            return Err(format!("{url}: HTTP {status}: {text}"));
        }
        let v = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
        Ok((v, index.unwrap_or(0)))
    }
}

async fn read_capped(mut r: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("answer larger than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// One GET over a unix socket. HTTP/1.0, so the server (Go's net/http) answers
/// without chunking and closes: the body is everything after the head.
async fn unix_get(
    sock: &std::path::Path,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, Option<u64>, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if token.is_some_and(|t| t.contains(['\r', '\n'])) {
        return Err("the token contains a line break".into());
    }
    let mut s = tokio::net::UnixStream::connect(sock).await.map_err(|e| format!("{}: {e}", sock.display()))?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(t) = token {
        req.push_str(&format!("X-Nomad-Token: {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    (&mut s).take(MAX_ANSWER as u64 + 1).read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.len() > MAX_ANSWER {
        return Err(format!("answer larger than {MAX_ANSWER} bytes"));
    }
    parse_response(&buf)
}

/// Status, `X-Nomad-Index` and body of a whole HTTP/1.x answer.
fn parse_response(buf: &[u8]) -> Result<(u16, Option<u64>, Vec<u8>), String> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no complete HTTP head in the answer")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or("not an HTTP answer")?;
    let mut index = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("x-nomad-index") {
                index = v.trim().parse().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = buf[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body).ok_or("malformed chunked body")?;
    }
    Ok((status, index, body))
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// A query or path value (`*` stays: it is the all-namespaces wildcard).
fn enc(s: &str) -> String {
    hf_cache::layout::percent_encode(s, b"-_.~*")
}

/// Watches the job list and sends the set of wanted models whenever it changes.
/// Runs until `tx` has no receivers.
/// The images of the jobs' tasks go to `images` (the agent's image pull-ahead).
pub async fn watch(
    cfg: NomadConfig,
    tx: watch::Sender<BTreeSet<Wanted>>,
    images: watch::Sender<Option<ImageWants>>,
    status: Arc<Mutex<NomadStatus>>,
) {
    // Both were completed from the environment when the configuration was loaded.
    let address = resolve_address(cfg.address.as_deref(), &crate::env::Environment::default());
    let token = cfg.token.clone().filter(|t| !t.is_empty());
    let client = Client::new(&address, token);
    {
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.address = address.clone();
        st.health_grace_secs = cfg.health_grace.0.as_secs();
    }
    let wait = cfg.wait.0.max(Duration::from_secs(1));
    let mut index = 0u64;
    let mut jobs: BTreeMap<String, (u64, Vec<Wanted>, Vec<TaskImage>)> = BTreeMap::new();
    let mut backoff = Duration::from_millis(500);
    loop {
        if tx.is_closed() {
            return;
        }
        let path = format!("/v1/jobs?namespace={}&index={index}&wait={}s", enc(&cfg.namespace), wait.as_secs().max(1));
        status.lock().unwrap_or_else(|p| p.into_inner()).queries += 1;
        // The server holds the query up to `wait` (plus jitter of wait/16).
        let listed = client.get(&path, wait + wait / 8 + Duration::from_secs(5)).await;
        let parsed = listed.and_then(|(list, idx)| {
            if idx == 0 {
                return Err(format!("{address}: no X-Nomad-Index in the answer (is this the Nomad API?)"));
            }
            serde_json::from_value::<Vec<JobStub>>(list).map(|l| (l, idx)).map_err(|e| format!("job list: {e}"))
        });
        let (stubs, new_index) = match parsed {
            Ok(v) => v,
            Err(e) => {
                // Keep what we knew (the wanted set keeps its gc protection) and back off.
                tracing::warn!(error = %e, "nomad job list failed");
                {
                    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_error = Some(e);
                    st.errors += 1;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        // An index that goes backwards (a restored or new cluster) restarts the watch.
        index = if new_index < index { 0 } else { new_index };
        let mut seen = BTreeSet::new();
        let mut failed = None;
        for s in stubs.iter().filter(|s| !s.stop && s.status != "dead") {
            let ns = s.namespace.clone().unwrap_or_else(|| "default".into());
            let key = format!("{ns}/{}", s.id);
            seen.insert(key.clone());
            if jobs.get(&key).is_some_and(|(m, _, _)| *m == s.modify_index) {
                continue;
            }
            match client.get(&format!("/v1/job/{}?namespace={}", enc(&s.id), enc(&ns)), Duration::from_secs(30)).await {
                Ok((job, _)) => {
                    jobs.insert(key, (s.modify_index, models_of_job(&job), images_of_job(&ns, &job)));
                }
                Err(e) => failed = Some(e),
            }
        }
        jobs.retain(|k, _| seen.contains(k));
        let wanted: BTreeSet<Wanted> = jobs.values().flat_map(|(_, m, _)| m.iter().cloned()).collect();
        // A job whose read failed keeps what was known of it; `complete` says
        // whether an image no task lists may be released.
        let all = ImageWants {
            tasks: jobs.values().flat_map(|(_, _, i)| i.iter().cloned()).collect(),
            complete: failed.is_none(),
        };
        images.send_if_modified(|cur| {
            let changed = cur.as_ref() != Some(&all);
            if changed {
                *cur = Some(all);
            }
            changed
        });
        {
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            st.index = index;
            st.jobs_seen = seen.len();
            st.jobs = jobs
                .iter()
                .filter(|(_, (_, m, _))| !m.is_empty())
                .map(|(k, (_, m, _))| (k.clone(), m.iter().map(|w| format!("{}@{}", w.repo, w.revision)).collect()))
                .collect();
            st.last_error = failed.clone();
            st.errors += u64::from(failed.is_some());
            st.last_ok = Some(hf_cache::state::unix_now());
        }
        tx.send_if_modified(|cur| {
            if *cur == wanted {
                false
            } else {
                *cur = wanted.clone();
                true
            }
        });
        if failed.is_some() {
            // Retry the failed job reads after a growing pause rather than after
            // a long block (index 0 answers at once).
            index = 0;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        } else {
            backoff = Duration::from_millis(500);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_travel_only_over_tls_the_socket_or_loopback() {
        for ok in [
            "https://nomad.example:4646",
            "unix:///secrets/api.sock",
            "http://127.0.0.1:4646",
            "http://localhost:4646",
            "http://[::1]:4646",
        ] {
            assert!(token_safe_over(ok), "{ok}");
        }
        for bad in [
            "http://10.0.0.5:4646",
            "http://nomad.example",
            "http://127.0.0.1.evil.example:4646",
            "ftp://x",
            "http://localhost:4646@evil.example/",
            "http://[::1]@evil.example",
        ] {
            assert!(!token_safe_over(bad), "{bad}");
        }
    }

    #[test]
    fn raw_answers_parse_with_and_without_chunking() {
        let plain = b"HTTP/1.0 200 OK\r\nX-Nomad-Index: 42\r\nContent-Type: application/json\r\n\r\n[1,2]";
        assert_eq!(parse_response(plain).unwrap(), (200, Some(42), b"[1,2]".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-nomad-index: 7\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, Some(7), b"[1,2]".to_vec()));
        assert_eq!(parse_response(b"HTTP/1.1 403 Forbidden\r\n\r\nPermission denied").unwrap().0, 403);
        for bad in [&b"garbage"[..], b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", b"SSH-2.0\r\n\r\n"]
        {
            assert!(parse_response(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
