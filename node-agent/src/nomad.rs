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

/// A model and revision some job wants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Wanted {
    pub repo: String,
    pub revision: String,
}

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

/// The models of the `driver = "aimodel"` tasks of one job (Nomad's job JSON).
pub fn models_of_job(job: &serde_json::Value) -> Vec<Wanted> {
    let mut out = BTreeSet::new();
    let groups = job.get("TaskGroups").and_then(|g| g.as_array()).cloned().unwrap_or_default();
    for g in groups {
        for t in g.get("Tasks").and_then(|t| t.as_array()).cloned().unwrap_or_default() {
            if t.get("Driver").and_then(|d| d.as_str()) != Some("aimodel") {
                continue;
            }
            let cfg = t.get("Config").cloned().unwrap_or_default();
            let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_string);
            if s("engine").as_deref() == Some("ollama") {
                continue; // Ollama models are not HF repos.
            }
            let Some(repo) = s("model") else { continue };
            let revision = s("revision").unwrap_or_else(|| "main".into());
            // Runtime interpolation (`${NOMAD_META_model}`) is only known on the client.
            if repo.contains("${")
                || !hf_cache::layout::is_safe_revision(&revision)
                || repo.split('/').count() != 2
                || repo.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            {
                continue;
            }
            out.insert(Wanted { repo, revision });
        }
    }
    out.into_iter().collect()
}

struct Client {
    http: reqwest::Client,
    address: String,
    token: Option<String>,
}

impl Client {
    async fn get(&self, path: &str, timeout: Duration) -> Result<(serde_json::Value, u64), String> {
        let mut h = HeaderMap::new();
        if let Some(t) = &self.token {
            if let Ok(v) = t.parse() {
                h.insert("X-Nomad-Token", v);
            }
        }
        let url = format!("{}{path}", self.address);
        let r = self.http.get(&url).headers(h).timeout(timeout).send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = r.status();
        let index = r.headers().get("X-Nomad-Index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(format!("{url}: HTTP {status}: {}", body.trim()));
        }
        let v = r.json().await.map_err(|e| format!("{url}: {e}"))?;
        Ok((v, index.unwrap_or(0)))
    }
}

/// A query or path value (`*` stays: it is the all-namespaces wildcard).
fn enc(s: &str) -> String {
    hf_cache::layout::percent_encode(s, b"-_.~*")
}

/// Watches the job list and sends the set of wanted models whenever it changes.
/// Runs until `tx` has no receivers.
pub async fn watch(cfg: NomadConfig, tx: watch::Sender<BTreeSet<Wanted>>, status: Arc<Mutex<NomadStatus>>) {
    let address: String = cfg
        .address
        .clone()
        .or_else(|| std::env::var("NOMAD_ADDR").ok())
        .unwrap_or_else(|| "http://127.0.0.1:4646".into())
        .trim_end_matches('/')
        .to_string();
    let token = cfg.token.clone().or_else(|| std::env::var("NOMAD_TOKEN").ok()).filter(|t| !t.is_empty());
    let client = Client { http: reqwest::Client::new(), address: address.clone(), token };
    status.lock().unwrap_or_else(|p| p.into_inner()).address = address.clone();
    let wait = cfg.wait.0.max(Duration::from_secs(1));
    let mut index = 0u64;
    let mut jobs: BTreeMap<String, (u64, Vec<Wanted>)> = BTreeMap::new();
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
                status.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(e);
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
            if jobs.get(&key).is_some_and(|(m, _)| *m == s.modify_index) {
                continue;
            }
            match client.get(&format!("/v1/job/{}?namespace={}", enc(&s.id), enc(&ns)), Duration::from_secs(30)).await {
                Ok((job, _)) => {
                    jobs.insert(key, (s.modify_index, models_of_job(&job)));
                }
                Err(e) => failed = Some(e),
            }
        }
        jobs.retain(|k, _| seen.contains(k));
        let wanted: BTreeSet<Wanted> = jobs.values().flat_map(|(_, m)| m.iter().cloned()).collect();
        {
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            st.index = index;
            st.jobs_seen = seen.len();
            st.jobs = jobs
                .iter()
                .filter(|(_, (_, m))| !m.is_empty())
                .map(|(k, (_, m))| (k.clone(), m.iter().map(|w| format!("{}@{}", w.repo, w.revision)).collect()))
                .collect();
            st.last_error = failed.clone();
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
    fn models_of_aimodel_tasks_only() {
        let job = serde_json::json!({
            "ID": "llm",
            "TaskGroups": [
                {"Tasks": [
                    {"Driver": "aimodel", "Config": {"engine": "vllm", "model": "org/a", "revision": "v1"}},
                    {"Driver": "aimodel", "Config": {"engine": "sglang", "model": "org/b"}},
                    {"Driver": "aimodel", "Config": {"engine": "ollama", "model": "llama3"}},
                    {"Driver": "docker", "Config": {"model": "org/c"}},
                    {"Driver": "aimodel", "Config": {"engine": "vllm", "model": "${NOMAD_META_model}"}}
                ]},
                {"Tasks": [{"Driver": "aimodel", "Config": {"model": "org/a", "revision": "v1"}}]}
            ]
        });
        let w = models_of_job(&job);
        assert_eq!(
            w,
            [
                Wanted { repo: "org/a".into(), revision: "v1".into() },
                Wanted { repo: "org/b".into(), revision: "main".into() }
            ]
        );
        assert!(models_of_job(&serde_json::json!({})).is_empty());
    }
}
