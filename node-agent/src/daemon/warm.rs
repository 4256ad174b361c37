//! One prewarm attempt of the daemon, HF or Ollama, and what the disk says after it.

use std::sync::Arc;

use hf_cache::ollama::ModelName;

use crate::config::{AgentConfig, ModelSpec};
use crate::fetch::FetchOptions;
use crate::hub::Hub;
use crate::ollama::{pull, PullOptions, Registry};
use crate::prewarm::{prewarm, record_if_warm, Options, Progress};

/// What one attempt ended in. Warm means complete on disk: a hub outage does
/// not un-warm a model that is all there, and a success is re-checked rather
/// than trusted.
pub(super) struct Done {
    /// Why the prewarm failed.
    pub error: Option<String>,
    /// Complete on disk after the attempt.
    pub complete: bool,
    /// The commit (HF) or manifest digest (Ollama) found complete.
    pub commit: Option<String>,
    /// What is missing, when it is not complete.
    pub findings: Option<String>,
}

fn fetch_options(cfg: &AgentConfig) -> FetchOptions {
    FetchOptions {
        heartbeat: cfg.heartbeat.0,
        stale_after: cfg.stale_after.0,
        stall: cfg.stall_timeout.0,
        ranges: cfg.ranges,
        range_min: cfg.range_min.0,
        ..FetchOptions::default()
    }
}

/// Prewarms an HF model and records it as warm when it is complete.
pub(super) async fn hf(cfg: &AgentConfig, hub: &Hub, spec: &ModelSpec, progress: Arc<Progress>) -> Done {
    let mut o = Options::new(cfg.hub_dir());
    o.include = spec.include.clone();
    o.exclude = spec.exclude.clone();
    o.concurrency = cfg.concurrency;
    o.fetch = fetch_options(cfg);
    let r = prewarm(hub, &spec.repo, &spec.revision, &o, progress).await;
    let (hub_dir, repo, rev) = (cfg.hub_dir(), spec.repo.clone(), spec.revision.clone());
    let checked = tokio::task::spawn_blocking(move || record_if_warm(&hub_dir, &repo, &rev)).await.ok();
    let (local, record_err) = checked.map_or((None, None), |(r, e)| (Some(r), e));
    if let Some(e) = record_err {
        tracing::warn!(repo = %spec.repo, error = %e, "could not write the warm record");
    }
    Done {
        error: r.err().map(|e| e.to_string()),
        complete: local.as_ref().is_some_and(|l| l.is_complete()),
        commit: local.as_ref().and_then(|l| l.commit.clone()),
        findings: local.map(|l| l.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
    }
}

/// Pulls an Ollama model and records it as warm when it is complete.
pub(super) async fn ollama(cfg: &AgentConfig, registry: &Registry, name: &ModelName, progress: Arc<Progress>) -> Done {
    let o = PullOptions {
        store: cfg.ollama_store(),
        concurrency: cfg.concurrency,
        fetch: fetch_options(cfg),
        deadline: crate::prewarm::DEFAULT_DEADLINE,
    };
    let r = pull(registry, name, &o, progress).await;
    let (hub_dir, store, n) = (cfg.hub_dir(), o.store.clone(), name.clone());
    let checked = tokio::task::spawn_blocking(move || crate::ollama::record_if_warm(&hub_dir, &store, &n)).await.ok();
    let (local, record_err) = checked.map_or((None, None), |(r, e)| (Some(r), e));
    if let Some(e) = record_err {
        tracing::warn!(model = %name, error = %e, "could not write the warm record");
    }
    Done {
        error: r.err().map(|e| e.to_string()),
        complete: local.as_ref().is_some_and(|l| l.is_complete()),
        commit: local.as_ref().and_then(|l| l.manifest_digest.clone()),
        findings: local.map(|l| l.problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
    }
}
