//! The cache gate: a model must be complete in the cache before its server
//! starts (or be fetched with `prewarm = true`), and the in-use markers that keep
//! the agents' gc away from it.

use std::path::{Path, PathBuf};

use crate::config::TaskConfig;
use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan::NodeFacts;
use crate::types::NomadTask;

impl Driver {
    /// The completeness gate: with `offline = true` a model must be complete in
    /// the cache before anything is created; the revision is pinned to a commit.
    pub(crate) async fn cache_gate(&self, task: &NomadTask, cfg: &TaskConfig) -> Result<NodeFacts, DriverError> {
        let plugin = self.config();
        let cache_cfg = plugin.hf_cache.clone();
        let on_nfs = crate::driver::cache::on_nfs(&cache_cfg);
        let mut facts = NodeFacts { cache_on_nfs: on_nfs, ..NodeFacts::default() };
        if cfg.engine == crate::config::Engine::Ollama {
            return self.ollama_gate(task, cfg, facts).await;
        }
        if !cfg.offline && cache_cfg.allow_write {
            // The cache is mounted writable: the Ollama store inside it is not.
            facts.readonly_overlays = super::ollama::store_overlay(&cache_cfg).await;
        }
        let (Some(model), true) = (&cfg.model, crate::driver::cache::uses_hf_cache(cfg)) else { return Ok(facts) };
        // In use before the check: an agent's gc that reads the markers after
        // this cannot evict what the check is about to accept.
        let (c, id, node, m) = (cache_cfg.clone(), task.id.clone(), task.node_name.clone(), vec![model.clone()]);
        let _ =
            tokio::task::spawn_blocking(move || crate::driver::cache::mark_in_use(&c, &id, &node, &m, "", true)).await;
        let hub = crate::driver::cache::hub_dir(&cache_cfg);
        let checked = check_cached(&cache_cfg, model, &cfg.revision).await?;
        if checked.complete {
            let commit = checked.commit.clone().unwrap_or_default();
            facts.model_file = chosen_file(cfg, &checked, &cache_cfg, &hub).await?;
            facts.resolved_revision = Some(commit.clone());
            facts.model_bytes = Some(checked.bytes);
            let (c, id, node, m, k) =
                (cache_cfg.clone(), task.id.clone(), task.node_name.clone(), vec![model.clone()], commit.clone());
            let _ =
                tokio::task::spawn_blocking(move || crate::driver::cache::mark_in_use(&c, &id, &node, &m, &k, false))
                    .await;
            self.event(
                task,
                format!(
                    "model {model}@{} is {commit}: {} files, {:.2} GB, complete in the cache{}",
                    cfg.revision,
                    checked.files,
                    checked.bytes as f64 / 1e9,
                    facts.model_file.as_deref().map(|f| format!("; loading {f}")).unwrap_or_default(),
                ),
                &[("commit", commit.clone())],
            );
            return Ok(facts);
        }
        let message = checked.failure_message(&hub);
        if cfg.prewarm {
            self.event(task, format!("{message}; prewarm = true: fetching it with aimodel-agent"), &[]);
            self.prewarm_with_agent(task, model, &cfg.revision, &hub).await?;
            let again = check_cached(&cache_cfg, model, &cfg.revision).await?;
            if again.complete {
                let commit = again.commit.clone().unwrap_or_default();
                facts.model_file = chosen_file(cfg, &again, &cache_cfg, &hub).await?;
                facts.resolved_revision = Some(commit.clone());
                facts.model_bytes = Some(again.bytes);
                self.event(
                    task,
                    format!(
                        "model {model}@{} is {commit}: prewarmed, {:.2} GB",
                        cfg.revision,
                        again.bytes as f64 / 1e9
                    ),
                    &[("commit", commit)],
                );
                return Ok(facts);
            }
            return Err(DriverError::ModelIncomplete { message: again.failure_message(&hub) });
        }
        if !cfg.offline && !reads_a_file(cfg) {
            // The engine may download what is missing itself.
            self.event(task, format!("{message}; offline = false, the engine will download it"), &[]);
            return Ok(facts);
        }
        self.event(task, message.clone(), &[]);
        Err(DriverError::ModelIncomplete { message })
    }

    /// `prewarm = true`: runs `aimodel-agent prewarm` (the same fetch the node
    /// agent does: leases, verification, ordered publishing) for a missing
    /// model, from the plugin's `HF_ENDPOINT` with the task's `HF_TOKEN` if it
    /// sets one, and turns its progress lines into task events.
    async fn prewarm_with_agent(
        &self,
        task: &NomadTask,
        model: &str,
        revision: &str,
        hub: &Path,
    ) -> Result<(), DriverError> {
        let args = vec![
            "--cache".into(),
            hub.as_os_str().to_owned(),
            "prewarm".into(),
            "--".into(),
            format!("{model}@{revision}").into(),
        ];
        self.run_agent_prewarm(task, &format!("{model}@{revision}"), args).await
    }

    /// Runs `aimodel-agent <args>` (a prewarm of `what`) as the cache's owner,
    /// in the plugin's environment (its hub endpoint and Ollama registry, never
    /// the task's) plus the task's `HF_TOKEN`; each progress line becomes a task event.
    pub(super) async fn run_agent_prewarm(
        &self,
        task: &NomadTask,
        what: &str,
        args: Vec<std::ffi::OsString>,
    ) -> Result<(), DriverError> {
        use tokio::io::AsyncBufReadExt;
        let bin = agent_binary(self.env()).ok_or(DriverError::AgentMissing)?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args(args);
        // The hub is the operator's (the plugin's own HF_ENDPOINT), never the
        // task's: a job must not fill the shared cache from a server of its
        // choosing under a real repo's name. The task may bring its token.
        if let Some(v) = task.env.get("HF_TOKEN") {
            cmd.env("HF_TOKEN", v);
        }
        // The cache's owner writes the cache: the node agent may run as a user of
        // its own, and must be able to resume, replace and collect what this
        // prewarm leaves (the plugin itself is root).
        if nix::unistd::geteuid().is_root() {
            if let Ok(m) = std::fs::metadata(&self.config().hf_cache.host_path) {
                use std::os::unix::fs::MetadataExt;
                if m.uid() != 0 {
                    cmd.uid(m.uid()).gid(m.gid());
                }
            }
        }
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mut child =
            cmd.spawn().map_err(|source| DriverError::AgentSpawn { path: bin.display().to_string(), source })?;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            self.event(task, format!("prewarm: {line}"), &[]);
            last = line;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| DriverError::PrewarmFailed { model: what.to_string(), reason: e.to_string() })?;
        if !out.status.success() {
            return Err(DriverError::PrewarmFailed { model: what.to_string(), reason: last });
        }
        let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
        tracing::info!(task_id = %task.id, model = %what, summary = %summary, "prewarmed");
        self.event(task, format!("prewarm: {summary}"), &[]);
        Ok(())
    }

    /// Rewrites the in-use markers of running tasks that use a cached model,
    /// so the agents' gc on every node keeps seeing them as live.
    pub async fn refresh_in_use(&self) {
        let cache = self.config().hf_cache.clone();
        let live: Vec<(String, String, Vec<String>, String)> = self
            .tasks()
            .ids()
            .into_iter()
            .filter_map(|id| self.tasks().get(&id))
            .filter(|e| e.exit_result().is_none())
            .map(|e| {
                let keys = e.state.in_use_keys();
                (e.task.id.clone(), e.task.node_name.clone(), keys, e.state.revision.clone().unwrap_or_default())
            })
            .filter(|(_, _, keys, _)| !keys.is_empty())
            .collect();
        if live.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for (id, node, keys, commit) in live {
                // Touching last-used too: a model in use is the most recently used.
                crate::driver::cache::mark_in_use(&cache, &id, &node, &keys, &commit, true);
            }
        })
        .await;
    }
}

/// The quick completeness check of `model@revision`, off the async threads, under the probe timeout.
async fn check_cached(
    cache: &crate::config::HfCacheConfig,
    model: &str,
    revision: &str,
) -> Result<crate::driver::cache::ModelCheck, DriverError> {
    let (c, m, r, t) = (cache.clone(), model.to_string(), revision.to_string(), cache.probe_timeout.0);
    tokio::task::spawn_blocking(move || crate::driver::cache::check_model(&c, &m, &r, t))
        .await
        .map_err(|e| DriverError::CacheUnavailable { path: cache.host_path.clone(), reason: e.to_string() })?
}

/// Whether the engine loads one file of the snapshot (llama.cpp's GGUF): it
/// downloads nothing, so the model must be in the cache whatever `offline` says.
fn reads_a_file(cfg: &TaskConfig) -> bool {
    cfg.engine == crate::config::Engine::Llamacpp
}

/// For an engine that loads one file: the file `gguf_file` names among the
/// complete model's files, checked there with its full size; its path relative
/// to the hub cache. No match, or several, is a task configuration error; a
/// missing or short file makes the model incomplete.
async fn chosen_file(
    cfg: &TaskConfig,
    checked: &crate::driver::cache::ModelCheck,
    cache: &crate::config::HfCacheConfig,
    hub: &Path,
) -> Result<Option<String>, DriverError> {
    use crate::driver::cache::{check_file, choose_file, snapshot_file};
    if !reads_a_file(cfg) {
        return Ok(None);
    }
    let (file, size) = choose_file(&checked.sizes, cfg.gguf_pattern()).map_err(|message| {
        DriverError::TaskConfig(crate::config::ConfigError::Invalid { field: "gguf_file".into(), message })
    })?;
    let commit = checked.commit.clone().unwrap_or_default();
    let (c, m, k, f) = (cache.clone(), checked.repo.clone(), commit.clone(), file.clone());
    let found = tokio::task::spawn_blocking(move || check_file(&c, &m, &k, &f, size))
        .await
        .map_err(|e| DriverError::CacheUnavailable { path: cache.host_path.clone(), reason: e.to_string() })?;
    if let Err(finding) = found {
        let incomplete =
            crate::driver::cache::ModelCheck { complete: false, findings: vec![finding], ..checked.clone() };
        return Err(DriverError::ModelIncomplete { message: incomplete.failure_message(hub) });
    }
    Ok(Some(snapshot_file(&checked.repo, &commit, &file)))
}

/// The agent binary: `AIMODEL_AGENT_BIN`, else beside the plugin (`plugin_dir`), else on PATH.
fn agent_binary(env: &crate::config::EnvOverrides) -> Option<PathBuf> {
    if let Some(p) = &env.agent_bin {
        return Some(p.clone());
    }
    let beside = std::env::current_exe().ok()?.parent()?.join("aimodel-agent");
    if beside.is_file() {
        return Some(beside);
    }
    env.path.as_deref()?.split(':').map(|d| Path::new(d).join("aimodel-agent")).find(|p| p.is_file())
}
