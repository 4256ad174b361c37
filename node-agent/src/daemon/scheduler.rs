//! What to prewarm when: the wanted set (manifest + Nomad), one task per
//! model (at most `models_at_once`), re-checks with backoff, and gc passes
//! whenever what is wanted changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use hf_cache::state::unix_now;

use super::{lock, ModelStatus, Shared, SharedRef, Sources, RECENT};
use crate::config::{AgentConfig, ModelSpec};
use crate::nomad::Wanted;
use crate::prewarm::Progress;

fn wanted_set(
    cfg: &AgentConfig,
    from_nomad: &BTreeSet<Wanted>,
) -> BTreeMap<(String, String), (ModelSpec, BTreeSet<String>)> {
    let mut out: BTreeMap<(String, String), (ModelSpec, BTreeSet<String>)> = BTreeMap::new();
    for m in &cfg.models {
        out.entry((m.repo.clone(), m.revision.clone()))
            .or_insert_with(|| (m.clone(), BTreeSet::new()))
            .1
            .insert("manifest".into());
    }
    for w in from_nomad {
        out.entry((w.repo.clone(), w.revision.clone()))
            .or_insert_with(|| {
                let spec = ModelSpec {
                    repo: w.repo.clone(),
                    revision: w.revision.clone(),
                    include: Vec::new(),
                    exclude: Vec::new(),
                    pin: false,
                };
                (spec, BTreeSet::new())
            })
            .1
            .insert("nomad".into());
    }
    out
}

/// Prewarms one model and records the outcome.
async fn keep_warm(cfg: Arc<AgentConfig>, sources: Sources, spec: ModelSpec, shared: SharedRef) {
    let key = (spec.repo.clone(), spec.revision.clone());
    let progress = Arc::new(Progress::default());
    if let Some(m) = lock(&shared).models.get_mut(&key) {
        m.progress = Some(progress.clone());
        if m.state != "warm" {
            m.state = "downloading".into();
        }
    }
    let done = match spec.ollama() {
        Some(name) => super::warm::ollama(&cfg, &sources.registry, &name, progress.clone()).await,
        None => super::warm::hf(&cfg, &sources.hub, &spec, progress.clone()).await,
    };
    let mut g = lock(&shared);
    // Taken, not read: an abandonment may have counted part of it already.
    let downloaded = progress.downloaded.swap(0, Ordering::SeqCst);
    g.counters.downloaded_bytes += downloaded;
    let failed = done.error.is_some();
    if failed {
        g.counters.failures += 1;
    }
    let Some(m) = g.models.get_mut(&key) else { return };
    m.progress = None;
    m.bytes_done = progress.bytes_done.load(Ordering::SeqCst);
    m.bytes_total = progress.bytes_total.load(Ordering::SeqCst);
    m.checked = Some(Instant::now());
    let complete = done.complete;
    match &done.error {
        None => {
            tracing::info!(repo = %spec.repo, revision = %spec.revision, commit = %done.commit.clone().unwrap_or_default(), downloaded, "model is warm");
            m.last_error = None;
        }
        Some(e) => {
            tracing::warn!(repo = %spec.repo, revision = %spec.revision, error = %e, "prewarm failed");
            m.last_error = Some(e.clone());
        }
    }
    m.failures = if complete { 0 } else { m.failures + 1 };
    let key_text = format!("{}@{}", spec.repo, spec.revision);
    if failed {
        *g.counters.model_failures.entry(key_text).or_default() += 1;
    }
    g.recent.push_back(complete);
    while g.recent.len() > RECENT {
        g.recent.pop_front();
    }
    let Some(m) = g.models.get_mut(&key) else { return };
    if complete {
        m.state = "warm".into();
        m.commit = done.commit;
        m.last_ok = Some(unix_now());
    } else {
        // Not (or no longer) complete here: stop advertising it to the scheduler.
        if let Err(e) = hf_cache::state::StateDir::for_hub(&cfg.hub_dir()).remove_warm(&spec.state_key()) {
            tracing::warn!(repo = %spec.repo, error = %e, "could not remove the warm record");
        }
        m.state = "failed".into();
        if m.last_error.is_none() {
            m.last_error = done.findings;
        }
    }
}

/// How long after a check a model is checked again: the interval, or after a
/// failure 30 s, doubling with each failure in a row, at most the interval.
fn period(cfg: &AgentConfig, m: &ModelStatus) -> Duration {
    if m.state == "failed" {
        let backoff = Duration::from_secs(30) * (1u32 << m.failures.saturating_sub(1).min(6));
        cfg.interval.0.min(backoff)
    } else {
        cfg.interval.0
    }
}

/// Keeps the wanted models warm and gc running; returns only if the runtime stops.
pub(super) async fn run_scheduler(
    cfg: Arc<AgentConfig>,
    sources: Sources,
    shared: SharedRef,
    mut rx: watch::Receiver<BTreeSet<Wanted>>,
) {
    // Each model is its own task: a 100 GB download never delays a model a
    // new job wants, nor gc. At most `models_at_once` run at a time.
    let mut running: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
    let mut in_flight: BTreeMap<(String, String), tokio::task::AbortHandle> = BTreeMap::new();
    let mut gc_task: Option<tokio::task::JoinHandle<()>> = None;
    let mut gc_due = true;
    let mut gc_last = Instant::now();
    loop {
        let from_nomad = rx.borrow_and_update().clone();
        let wanted = wanted_set(&cfg, &from_nomad);
        let due: Vec<ModelSpec> = {
            let mut g = lock(&shared);
            // A model nobody wants any more is not worth finishing: its task
            // is aborted (which aborts its blob downloads, prewarm's AbortAll).
            in_flight.retain(|k, h| {
                let keep = wanted.contains_key(k);
                if !keep {
                    tracing::info!(revision = %k.1, "abandoning {}: no longer wanted", k.0);
                    h.abort();
                }
                keep
            });
            let Shared { models, counters, .. } = &mut *g;
            models.retain(|k, m| {
                let keep = wanted.contains_key(k);
                if !keep {
                    // Its bytes stay counted: the counter never goes down.
                    if let Some(p) = &m.progress {
                        counters.downloaded_bytes += p.downloaded.swap(0, Ordering::SeqCst);
                    }
                }
                keep
            });
            let mut due = Vec::new();
            for (k, (spec, sources)) in &wanted {
                let m = g.models.entry(k.clone()).or_insert_with(|| ModelStatus {
                    repo: spec.repo.clone(),
                    revision: spec.revision.clone(),
                    sources: BTreeSet::new(),
                    pinned: spec.pin,
                    state: "pending".into(),
                    commit: None,
                    bytes_done: 0,
                    bytes_total: 0,
                    last_error: None,
                    last_ok: None,
                    failures: 0,
                    progress: None,
                    checked: None,
                });
                m.sources = sources.clone();
                if !in_flight.contains_key(k) && m.checked.is_none_or(|t| t.elapsed() >= period(&cfg, m)) {
                    due.push(spec.clone());
                }
            }
            due
        };
        for spec in due.into_iter().take(cfg.models_at_once.saturating_sub(in_flight.len())) {
            let key = (spec.repo.clone(), spec.revision.clone());
            let handle = running.spawn(keep_warm(cfg.clone(), sources.clone(), spec, shared.clone()));
            in_flight.insert(key, handle);
        }
        if gc_task.as_ref().is_none_or(|t| t.is_finished()) && (gc_due || gc_last.elapsed() >= cfg.interval.0) {
            let protected: Vec<String> = wanted.values().map(|(spec, _)| spec.state_key()).collect();
            let (c, sh) = (cfg.clone(), shared.clone());
            gc_task = Some(tokio::task::spawn_blocking(move || super::gc::gc_pass(&c, protected, &sh)));
            gc_due = false;
            gc_last = Instant::now();
        }
        // Sleep until the next re-check, a finished prewarm, or a change in what Nomad wants.
        let next = {
            let g = lock(&shared);
            g.models
                .iter()
                .filter(|(k, _)| !in_flight.contains_key(*k))
                .filter_map(|(_, m)| m.checked.map(|t| period(&cfg, m).saturating_sub(t.elapsed())))
                .min()
                .unwrap_or(cfg.interval.0)
                .min(cfg.interval.0.saturating_sub(gc_last.elapsed()))
                .max(Duration::from_millis(200))
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            // What is wanted changed: what is protected from gc changed with it.
            Ok(()) = rx.changed() => gc_due = true,
            Some(_) = running.join_next(), if !running.is_empty() => {
                in_flight.retain(|_, h| !h.is_finished());
                gc_due = true;
            }
        }
    }
}
