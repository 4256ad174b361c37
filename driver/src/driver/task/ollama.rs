//! Engine `ollama`: the gate over the shared Ollama store (every model the task
//! names complete, or fetched with `prewarm = true`), and the preload that
//! loads them once the server answers, so the first request does not pay it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_cache::ollama::{Check, ModelName, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{HfCacheConfig, TaskConfig};
use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan::NodeFacts;
use crate::types::NomadTask;

use super::TaskHandle;

/// Bytes of a preload answer kept (Ollama's is one small JSON object).
const MAX_ANSWER: usize = 64 << 10;

impl Driver {
    /// The gate of an `ollama` task: the store is mounted when it exists; each
    /// model in `model`/`models` must be complete in it (manifest, then every
    /// blob it names at its listed size), else the start is refused as
    /// recoverable with the command that fixes it, or, with `prewarm = true`,
    /// the agent fetches what is missing first.
    pub(super) async fn ollama_gate(
        &self,
        task: &NomadTask,
        cfg: &TaskConfig,
        mut facts: NodeFacts,
    ) -> Result<NodeFacts, DriverError> {
        let cache = self.config().hf_cache.clone();
        let dir = cache.ollama_store();
        let names = cfg.ollama_models().map_err(DriverError::TaskConfig)?;
        // What is bound into the container: the store's real directory, never a
        // link someone with write access to the cache put in its place.
        let (c, d) = (cache.clone(), dir.clone());
        let mount = probe(&cache, &dir, move || store_to_mount(&c, &d))
            .await?
            .map_err(|reason| DriverError::CacheUnavailable { path: dir.display().to_string(), reason })?;
        if names.is_empty() {
            // No model named: the server sees what the store holds, if there is one.
            facts.ollama_store = mount.map(|m| m.display().to_string());
            return Ok(facts);
        }
        let keys: Vec<String> = names.iter().map(hf_cache::ollama::state_key).collect();
        // In use before the check, as for HF models: a gc that reads the markers
        // after this cannot evict what the check is about to accept.
        mark(&cache, task, &keys, "", true).await;
        let mut checks = check_all(&cache, &dir, &names).await?;
        let missing: Vec<&Check> = checks.iter().filter(|c| !c.is_complete()).collect();
        if !missing.is_empty() {
            let message = failure_message(&cache, &dir, &missing);
            if !cfg.prewarm {
                self.event(task, message.clone(), &[]);
                return Err(DriverError::ModelIncomplete { message });
            }
            // Without the operator's mirror the agent fetches from the host in the
            // model's name: a job must not make this node fetch from a host it picks.
            let foreign = missing.iter().find(|c| !c.name.host.eq_ignore_ascii_case(hf_cache::ollama::DEFAULT_HOST));
            if let (Some(c), None) = (foreign, &self.env().ollama_registry) {
                let message = format!(
                    "{message}; prewarm = true does not fetch {} from {}: only the operator's mirror \
                     (AIMODEL_OLLAMA_REGISTRY) or {} (prewarm it with aimodel-agent)",
                    c.name.short(),
                    c.name.host,
                    hf_cache::ollama::DEFAULT_HOST
                );
                self.event(task, message.clone(), &[]);
                return Err(DriverError::ModelIncomplete { message });
            }
            self.event(task, format!("{message}; prewarm = true: fetching with aimodel-agent"), &[]);
            for c in missing {
                let what = format!("{}{}", hf_cache::ollama::SCHEME, c.name.short());
                let args = vec![
                    "--hf-home".into(),
                    cache.host_path.clone().into(),
                    "--ollama-models".into(),
                    dir.clone().into_os_string(),
                    "prewarm".into(),
                    "--".into(),
                    what.clone().into(),
                ];
                self.run_agent_prewarm(task, &what, args).await?;
            }
            checks = check_all(&cache, &dir, &names).await?;
            let still: Vec<&Check> = checks.iter().filter(|c| !c.is_complete()).collect();
            if !still.is_empty() {
                return Err(DriverError::ModelIncomplete { message: failure_message(&cache, &dir, &still) });
            }
        }
        for c in &checks {
            let digest = c.manifest_digest.clone().unwrap_or_default();
            let blobs = c.manifest.as_ref().map_or(0, |m| m.blobs().len());
            self.event(
                task,
                format!(
                    "ollama model {} is {digest}: {blobs} blobs, {:.2} GB, complete in the store",
                    c.name.short(),
                    c.bytes() as f64 / 1e9
                ),
                &[("manifest", digest.clone())],
            );
        }
        let first = checks.first().and_then(|c| c.manifest_digest.clone()).unwrap_or_default();
        mark(&cache, task, &keys, &first, false).await;
        facts.ollama_store = Some(mount.unwrap_or_else(|| dir.clone()).display().to_string());
        facts.ollama_models = names.iter().map(ModelName::short).collect();
        facts.model_bytes = Some(checks.iter().map(Check::bytes).sum());
        Ok(facts)
    }
}

/// Runs `f` on a blocking thread under the cache's probe timeout (a hung NFS
/// server refuses the start as recoverable instead of wedging it).
async fn probe<T: Send + 'static>(
    cache: &HfCacheConfig,
    dir: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DriverError> {
    let (key, timeout) = (PathBuf::from(&cache.host_path), cache.probe_timeout.0);
    let unavailable = |reason: String| DriverError::CacheUnavailable { path: dir.display().to_string(), reason };
    tokio::task::spawn_blocking(move || hf_cache::mount::probe(&key, timeout, f))
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(|t| unavailable(t.to_string()))
}

/// The store directory to bind into a container, if there is one: a real
/// directory (a symbolic link in its place is refused, not followed), resolved;
/// the default store (`<host_path>/ollama`) must resolve inside the cache.
fn store_to_mount(cache: &HfCacheConfig, dir: &Path) -> Result<Option<PathBuf>, String> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
        Ok(m) if !m.is_dir() => {
            return Err("the Ollama store is not a directory (a symbolic link there is refused, not followed)".into())
        }
        Ok(_) => {}
    }
    let real = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
    if cache.ollama_path.is_empty() {
        let base = std::fs::canonicalize(&cache.host_path).map_err(|e| e.to_string())?;
        if !real.starts_with(&base) {
            return Err(format!("the Ollama store resolves to {}, outside the cache", real.display()));
        }
    }
    Ok(Some(real))
}

/// For a task that gets the cache writable: the shared store, when it is a
/// directory inside the cache, as (host path, path in the container) to mount
/// read-only over the writable cache.
pub(super) async fn store_overlay(cache: &HfCacheConfig) -> Vec<(String, String)> {
    let (c, dir) = (cache.clone(), cache.ollama_store());
    let found = probe(cache, &dir, move || {
        let real = store_to_mount(&c, &c.ollama_store()).ok()??;
        let base = std::fs::canonicalize(&c.host_path).ok()?;
        let rel = real.strip_prefix(&base).ok()?.to_path_buf();
        Some((real, rel))
    })
    .await;
    match found {
        Ok(Some((real, rel))) => {
            let inside = format!("{}/{}", cache.container_path.trim_end_matches('/'), rel.display());
            vec![(real.display().to_string(), inside)]
        }
        _ => Vec::new(),
    }
}

/// The quick check (metadata only) of every model.
async fn check_all(cache: &HfCacheConfig, dir: &Path, names: &[ModelName]) -> Result<Vec<Check>, DriverError> {
    let (store, names) = (Store::new(dir), names.to_vec());
    probe(cache, dir, move || names.iter().map(|n| store.check(n)).collect()).await
}

async fn mark(cache: &HfCacheConfig, task: &NomadTask, keys: &[String], commit: &str, touch: bool) {
    let (c, id, node, k, commit) =
        (cache.clone(), task.id.clone(), task.node_name.clone(), keys.to_vec(), commit.to_string());
    let _ = tokio::task::spawn_blocking(move || crate::driver::cache::mark_in_use(&c, &id, &node, &k, &commit, touch))
        .await;
}

/// What is missing, per model, and the agent command that fetches it.
fn failure_message(cache: &HfCacheConfig, dir: &Path, missing: &[&Check]) -> String {
    let what: Vec<String> = missing
        .iter()
        .map(|c| {
            let shown: Vec<String> = c.problems.iter().take(4).map(ToString::to_string).collect();
            let more = c.problems.len().saturating_sub(shown.len());
            let detail = if shown.is_empty() { "no manifest".to_string() } else { shown.join(", ") };
            let more = if more > 0 { format!(" (and {more} more)") } else { String::new() };
            format!("{}: {detail}{more}", c.name.short())
        })
        .collect();
    let store_arg =
        if cache.ollama_path.is_empty() { String::new() } else { format!(" --ollama-models {}", dir.display()) };
    let fixes: Vec<String> = missing
        .iter()
        .map(|c| {
            format!(
                "aimodel-agent --hf-home {}{store_arg} prewarm {}{}",
                cache.host_path,
                hf_cache::ollama::SCHEME,
                c.name.short()
            )
        })
        .collect();
    format!(
        "ollama {} not complete in the store at {}: {}. Fix: {}",
        if missing.len() == 1 { "model is" } else { "models are" },
        dir.display(),
        what.join("; "),
        fixes.join(" && ")
    )
}

/// How the preload asks the server to keep a model loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// The server's own default (the task set `OLLAMA_KEEP_ALIVE`).
    ServerDefault,
    /// Loaded until the server stops (`keep_alive: -1`).
    Forever,
}

impl KeepAlive {
    /// `OLLAMA_KEEP_ALIVE` in the task's environment is the operator's choice; else forever.
    pub fn for_task(task: &NomadTask) -> Self {
        if task.env.contains_key("OLLAMA_KEEP_ALIVE") {
            KeepAlive::ServerDefault
        } else {
            KeepAlive::Forever
        }
    }
}

/// The body of a load-only `/api/generate` (no prompt: Ollama loads the model and answers once).
pub fn preload_body(model: &str, keep: KeepAlive) -> String {
    let model = serde_json::Value::String(model.to_string());
    match keep {
        KeepAlive::ServerDefault => format!("{{\"model\":{model},\"stream\":false}}"),
        KeepAlive::Forever => format!("{{\"model\":{model},\"stream\":false,\"keep_alive\":-1}}"),
    }
}

/// `http://host:port` of a readiness URL.
fn base_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    Some(&url[..7 + rest.find('/').unwrap_or(rest.len())])
}

/// POSTs JSON to `http://host:port/path`; the status code and the start of the answer.
async fn post(url: &str, body: &str, timeout: Duration) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// is supported")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let call = async {
        let mut s = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: aimodel-preload\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        s.take(MAX_ANSWER as u64).read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&answer);
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad response {:?}", text.chars().take(80).collect::<String>()))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| format!("no answer within {timeout:?}"))?
}

impl TaskHandle {
    /// Loads each model into the ready server (`POST /api/generate` without a
    /// prompt), one after the other, reporting "model X loaded after N s"; a
    /// model that does not load is a warning event, the task keeps running.
    pub(super) async fn preload_ollama(
        self: Arc<Self>,
        driver: Driver,
        ready_url: String,
        models: Vec<String>,
        keep: KeepAlive,
        timeout: Duration,
    ) {
        let Some(base) = base_of(&ready_url) else { return };
        let url = format!("{base}/api/generate");
        for model in models {
            let started = Instant::now();
            let body = preload_body(&model, keep);
            let call = post(&url, &body, timeout);
            let r = tokio::select! {
                r = call => r,
                _ = self.cancel.cancelled() => return,
            };
            let secs = started.elapsed().as_secs_f64();
            match r {
                Ok((code, _)) if (200..300).contains(&code) => driver.event(
                    &self.task,
                    format!("model {model} loaded after {secs:.1} s"),
                    &[("model", model.clone()), ("loaded_after_seconds", format!("{secs:.1}"))],
                ),
                Ok((code, answer)) => driver.event(
                    &self.task,
                    format!(
                        "warning: model {model} did not load (HTTP {code}: {}); the first request will try again",
                        answer.chars().take(300).collect::<String>()
                    ),
                    &[("model", model.clone())],
                ),
                Err(e) => driver.event(
                    &self.task,
                    format!("warning: model {model} did not load ({e}); the first request will try again"),
                    &[("model", model.clone())],
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_store_directory_is_mounted() {
        let d = tempfile::tempdir().unwrap();
        let cache = HfCacheConfig { host_path: d.path().display().to_string(), ..HfCacheConfig::default() };
        let store = d.path().join("ollama");
        assert_eq!(store_to_mount(&cache, &store).unwrap(), None, "no store, nothing mounted");
        std::fs::create_dir(&store).unwrap();
        assert_eq!(store_to_mount(&cache, &store).unwrap(), Some(std::fs::canonicalize(&store).unwrap()));
        std::fs::remove_dir(&store).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &store).unwrap();
        assert!(store_to_mount(&cache, &store).unwrap_err().contains("symbolic link"));
    }

    #[test]
    fn preload_bodies_and_urls() {
        assert_eq!(
            preload_body("llama3.2:3b", KeepAlive::Forever),
            r#"{"model":"llama3.2:3b","stream":false,"keep_alive":-1}"#
        );
        assert_eq!(preload_body("a\"b", KeepAlive::ServerDefault), r#"{"model":"a\"b","stream":false}"#);
        assert_eq!(base_of("http://10.0.0.1:11434/api/version"), Some("http://10.0.0.1:11434"));
        assert_eq!(base_of("http://h:1"), Some("http://h:1"));
        assert_eq!(base_of("https://h/x"), None);
    }

    #[tokio::test]
    async fn post_reads_the_status_and_the_answer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(req.starts_with("POST /api/generate HTTP/1.0\r\n"), "{req}");
            assert!(req.ends_with("\r\n\r\n{}"), "{req}");
            s.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\r\n{\"error\":\"model not found\"}",
            )
            .await
            .unwrap();
        });
        let (code, body) = post(&format!("http://{addr}/api/generate"), "{}", Duration::from_secs(5)).await.unwrap();
        assert_eq!((code, body.as_str()), (404, "{\"error\":\"model not found\"}"));
        assert!(post("http://127.0.0.1:1/api/generate", "{}", Duration::from_secs(2)).await.is_err());
    }
}
