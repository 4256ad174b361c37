//! `aimodel-agent run --config FILE`: keeps every wanted model (the manifest,
//! plus the models of Nomad's `driver = "aimodel"` tasks) warm in the shared
//! cache, records warm models for the driver's fingerprint, evicts cold ones
//! above the disk watermark, and serves `/health`, `/status` and `/metrics`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use hf_cache::state::{node_name, unix_now};

use crate::config::{AgentConfig, ModelSpec};
use crate::hub::Hub;
use crate::nomad::{NomadStatus, Wanted};
use crate::prewarm::{prewarm, record_if_warm, Options, Progress};

/// The state of one wanted model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    pub repo: String,
    pub revision: String,
    /// `manifest` and/or `nomad`.
    pub sources: BTreeSet<String>,
    pub pinned: bool,
    /// `pending`, `downloading`, `warm` or `failed`.
    pub state: String,
    pub commit: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub last_error: Option<String>,
    /// Unix seconds of the last successful check.
    pub last_ok: Option<u64>,
    /// Failed checks in a row (the retry pause doubles with each, up to `interval`).
    pub failures: u32,
    #[serde(skip)]
    pub progress: Option<Arc<Progress>>,
    #[serde(skip)]
    pub checked: Option<Instant>,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    /// Bytes fetched from the hub by finished prewarms.
    pub downloaded_bytes: u64,
    pub failures: u64,
    pub evicted_models: u64,
    pub evicted_bytes: u64,
    pub cache_bytes: u64,
    pub cache_free_bytes: u64,
    /// Failed prewarms per `repo@revision` since the start.
    pub model_failures: BTreeMap<String, u64>,
    /// Whether the last gc pass could reach its target (none before the first pass with a target).
    pub gc_target_reachable: Option<bool>,
}

/// Prewarm outcomes remembered for `/health`.
const RECENT: usize = 5;
/// How long Nomad may fail to answer before `/health` reports it.
/// How often the cache is probed for writes.
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Everything `/status` shows.
#[derive(Debug, Default)]
pub struct Shared {
    pub models: BTreeMap<(String, String), ModelStatus>,
    pub counters: Counters,
    /// The Nomad watcher's own status, read when `/status` is served.
    pub nomad: Option<Arc<Mutex<NomadStatus>>>,
    pub gc_last: Option<serde_json::Value>,
    /// Why the last write probe of the cache failed (`None`: writable, or not probed yet).
    pub cache_error: Option<String>,
    /// The last prewarm outcomes (true: the model ended complete), newest last.
    pub recent: std::collections::VecDeque<bool>,
    pub started: Option<Instant>,
}

/// Why the agent cannot do its job now (empty: healthy): the cache is not
/// writable, Nomad (when configured) has not answered for `nomad.health_grace`, or
/// every recent prewarm failed.
pub fn health(g: &Shared) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(e) = &g.cache_error {
        why.push(format!("the cache is not writable: {e}"));
    }
    if let Some(n) = &g.nomad {
        let n = n.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &n.last_error {
            let since_ok = n.last_ok.map(|t| Duration::from_secs(unix_now().saturating_sub(t)));
            let since_start = g.started.map(|t| t.elapsed()).unwrap_or_default();
            if since_ok.unwrap_or(since_start) >= Duration::from_secs(n.health_grace_secs) {
                let d = since_ok.unwrap_or(since_start).as_secs();
                why.push(format!("nomad has not answered for {d}s: {e}"));
            }
        }
    }
    if !g.recent.is_empty() && g.recent.iter().all(|ok| !ok) {
        let last = g
            .models
            .values()
            .filter(|m| m.state == "failed")
            .find_map(|m| m.last_error.as_ref().map(|e| format!("{}@{}: {e}", m.repo, m.revision)));
        why.push(format!(
            "the last {} prewarms failed{}",
            g.recent.len(),
            last.map(|l| format!(" ({l})")).unwrap_or_default()
        ));
    }
    why
}

/// Bytes fetched from the hub since the start: finished prewarms plus running ones.
fn downloaded_total(g: &Shared) -> u64 {
    let live: u64 =
        g.models.values().filter_map(|m| m.progress.as_ref()).map(|p| p.downloaded.load(Ordering::SeqCst)).sum();
    g.counters.downloaded_bytes + live
}

/// Tries to create and remove a file in the state directory and in the hub
/// cache directory: the agent's two places of writing.
fn probe_cache(hub_dir: &std::path::Path) -> std::io::Result<()> {
    let name = format!(".health-probe-{}-{}", std::process::id(), hf_cache::safefs::random_hex(4));
    let state = hf_cache::state::StateDir::for_hub(hub_dir);
    let root =
        state.open_root().map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", state.root().display())))?;
    hf_cache::safefs::write_atomic_at(&root, std::ffi::OsStr::new(&name), b"ok")
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", state.root().display())))?;
    let _ = hf_cache::safefs::remove_at(&root, std::ffi::OsStr::new(&name));
    let p = hub_dir.join(&name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", hub_dir.display())))?;
    std::fs::remove_file(&p)
}

/// Probes the cache every `PROBE_EVERY` (a hung mount counts as not writable).
async fn probe_loop(cfg: Arc<AgentConfig>, shared: SharedRef) {
    loop {
        let hub = cfg.hub_dir();
        let r =
            tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || probe_cache(&hub))).await;
        let err = match r {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("a write probe did not finish within 10s (a hung mount?)".to_string()),
        };
        {
            let mut g = lock(&shared);
            if err.is_some() && g.cache_error.is_none() {
                tracing::warn!(error = err.as_deref().unwrap_or_default(), "the cache is not writable");
            } else if err.is_none() && g.cache_error.is_some() {
                tracing::info!("the cache is writable again");
            }
            g.cache_error = err;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `/status` document.
pub fn status_json(cfg: &AgentConfig, s: &SharedRef) -> serde_json::Value {
    let g = lock(s);
    let models: Vec<serde_json::Value> = g
        .models
        .values()
        .map(|m| {
            let mut m = m.clone();
            if let Some(p) = &m.progress {
                m.bytes_done = p.bytes_done.load(Ordering::SeqCst);
                m.bytes_total = p.bytes_total.load(Ordering::SeqCst);
            }
            serde_json::to_value(m).unwrap_or_default()
        })
        .collect();
    let reasons = health(&g);
    let mut counters = serde_json::to_value(&g.counters).unwrap_or_default();
    // The same number as /metrics: finished prewarms plus running ones.
    counters["downloaded_bytes"] = downloaded_total(&g).into();
    serde_json::json!({
        "node": node_name(),
        "hf_home": cfg.hf_home,
        "health": { "ok": reasons.is_empty(), "reasons": reasons },
        "models": models,
        "counters": counters,
        "nomad": g.nomad.as_ref().map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        "gc": g.gc_last,
    })
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `/metrics` page (Prometheus text format 0.0.4).
pub fn metrics_text(cfg: &AgentConfig, s: &SharedRef) -> String {
    let g = lock(s);
    let in_flight = g.models.values().filter(|m| m.state == "downloading").count();
    let downloaded = downloaded_total(&g);
    let healthy = health(&g).is_empty();
    let nomad = g.nomad.as_ref().map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).clone());
    let c = &g.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "aimodel_agent_downloaded_bytes_total",
        "counter",
        "Bytes fetched from the hub by this agent.",
        vec![(String::new(), downloaded)],
    );
    metric(
        "aimodel_agent_downloads_in_flight",
        "gauge",
        "Models being prewarmed now.",
        vec![(String::new(), in_flight as u64)],
    );
    metric("aimodel_agent_failures_total", "counter", "Prewarms that failed.", vec![(String::new(), c.failures)]);
    metric(
        "aimodel_agent_cache_bytes",
        "gauge",
        "Bytes of the models in the cache.",
        vec![(String::new(), c.cache_bytes)],
    );
    metric(
        "aimodel_agent_cache_free_bytes",
        "gauge",
        "Free bytes of the cache filesystem.",
        vec![(String::new(), c.cache_free_bytes)],
    );
    metric(
        "aimodel_agent_evicted_bytes_total",
        "counter",
        "Bytes freed by gc.",
        vec![(String::new(), c.evicted_bytes)],
    );
    metric(
        "aimodel_agent_evicted_models_total",
        "counter",
        "Models evicted by gc.",
        vec![(String::new(), c.evicted_models)],
    );
    let warm = g
        .models
        .values()
        .map(|m| {
            (
                format!("{{repo=\"{}\",revision=\"{}\"}}", label(&m.repo), label(&m.revision)),
                u64::from(m.state == "warm"),
            )
        })
        .collect();
    metric("aimodel_agent_model_warm", "gauge", "1 when the model is complete in the cache.", warm);
    let labels = |key: &str| {
        let (repo, rev) = key.split_once('@').unwrap_or((key, ""));
        format!("{{repo=\"{}\",revision=\"{}\"}}", label(repo), label(rev))
    };
    metric(
        "aimodel_agent_model_failures_total",
        "counter",
        "Failed prewarms of one model since the agent started.",
        c.model_failures.iter().map(|(k, v)| (labels(k), *v)).collect(),
    );
    metric(
        "aimodel_agent_model_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the model's last check that found it complete.",
        g.models
            .values()
            .filter_map(|m| m.last_ok.map(|t| (labels(&format!("{}@{}", m.repo, m.revision)), t)))
            .collect(),
    );
    metric(
        "aimodel_agent_gc_target_reachable",
        "gauge",
        "1 when the last gc pass could reach its target (absent before a gc with a target ran).",
        c.gc_target_reachable.map(|r| vec![(String::new(), u64::from(r))]).unwrap_or_default(),
    );
    if let Some(gc) = &cfg.gc {
        let mut targets = Vec::new();
        if let Some(t) = gc.target_free {
            targets.push(("{kind=\"target_free\"}".to_string(), t.0));
        }
        if let Some(t) = gc.max_size {
            targets.push(("{kind=\"max_size\"}".to_string(), t.0));
        }
        metric("aimodel_agent_gc_target_bytes", "gauge", "The gc watermarks of the configuration.", targets);
    }
    if let Some(n) = nomad {
        metric(
            "aimodel_agent_nomad_errors_total",
            "counter",
            "Failed Nomad job list or job reads.",
            vec![(String::new(), n.errors)],
        );
    }
    metric(
        "aimodel_agent_cache_writable",
        "gauge",
        "1 when the last write probe of the cache succeeded.",
        vec![(String::new(), u64::from(g.cache_error.is_none()))],
    );
    metric("aimodel_agent_healthy", "gauge", "1 when /health answers 200.", vec![(String::new(), u64::from(healthy))]);
    out
}

/// Connections whose request head is still arriving, at most. Reading a head
/// costs 4 KiB and ends after `HEAD_TIMEOUT`, so idle clients cannot hold
/// every slot for long, and a few hundred of them do not keep `/health` from
/// answering.
const HTTP_SLOTS: usize = 512;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

async fn serve_http(listener: tokio::net::TcpListener, cfg: Arc<AgentConfig>, shared: SharedRef) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP_SLOTS));
    loop {
        let mut s = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends pass; the listener must not die.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let (cfg, shared) = (cfg.clone(), shared.clone());
        tokio::spawn(async move {
            let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await;
            drop(permit);
            let Ok(Ok(head)) = head else { return };
            // Writing the answer has its own deadline, however slowly a client reads.
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(&mut s, &head, &cfg, &shared)).await;
        });
    }
}

/// The request head (GET only; no body), at most 4 KiB.
async fn read_head(s: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let k = s.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Whether the request carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(head: &str, token: &str) -> bool {
    head.split("\r\n").skip(1).filter_map(|l| l.split_once(':')).any(|(k, v)| {
        k.trim().eq_ignore_ascii_case("authorization")
            && v.trim().strip_prefix("Bearer ").is_some_and(|given| {
                let (a, b) = (given.trim().as_bytes(), token.as_bytes());
                a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
            })
    })
}

async fn answer(
    s: &mut tokio::net::TcpStream,
    head: &str,
    cfg: &AgentConfig,
    shared: &SharedRef,
) -> std::io::Result<()> {
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = path.split('?').next().unwrap_or("/");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/health") => {
            let why = health(&lock(shared));
            if why.is_empty() {
                ("200 OK", "application/json", "{\"status\":\"ok\"}\n".to_string())
            } else {
                let body = serde_json::json!({ "status": "unhealthy", "reasons": why });
                ("503 Service Unavailable", "application/json", body.to_string() + "\n")
            }
        }
        ("GET", "/status") if cfg.status_token.as_ref().is_some_and(|t| !authorized(head, &t.0)) => {
            ("401 Unauthorized", "text/plain", "/status needs Authorization: Bearer <status_token>\n".into())
        }
        ("GET", "/status") => {
            let v = status_json(cfg, shared);
            ("200 OK", "application/json", serde_json::to_string_pretty(&v).unwrap_or_default() + "\n")
        }
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics_text(cfg, shared)),
        ("GET", _) => ("404 Not Found", "text/plain", "try /health, /status or /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await
}

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
async fn keep_warm(cfg: Arc<AgentConfig>, hub: Hub, spec: ModelSpec, shared: SharedRef) {
    let key = (spec.repo.clone(), spec.revision.clone());
    let progress = Arc::new(Progress::default());
    if let Some(m) = lock(&shared).models.get_mut(&key) {
        m.progress = Some(progress.clone());
        if m.state != "warm" {
            m.state = "downloading".into();
        }
    }
    let mut o = Options::new(cfg.hub_dir());
    o.include = spec.include.clone();
    o.exclude = spec.exclude.clone();
    o.concurrency = cfg.concurrency;
    o.heartbeat = cfg.heartbeat.0;
    o.stale_after = cfg.stale_after.0;
    o.stall = cfg.stall_timeout.0;
    o.ranges = cfg.ranges;
    o.range_min = cfg.range_min.0;
    let r = prewarm(&hub, &spec.repo, &spec.revision, &o, progress.clone()).await;
    let hub_dir = cfg.hub_dir();
    let (repo, rev) = (spec.repo.clone(), spec.revision.clone());
    // Warm means complete on disk: a hub outage does not un-warm a model
    // that is all there, and a success is re-checked rather than trusted.
    let checked = tokio::task::spawn_blocking(move || record_if_warm(&hub_dir, &repo, &rev)).await.ok();
    let (local, record_err) = match checked {
        Some((r, e)) => (Some(r), e),
        None => (None, None),
    };
    if let Some(e) = record_err {
        tracing::warn!(repo = %spec.repo, error = %e, "could not write the warm record");
    }
    let mut g = lock(&shared);
    // Taken, not read: an abandonment may have counted part of it already.
    let downloaded = progress.downloaded.swap(0, Ordering::SeqCst);
    g.counters.downloaded_bytes += downloaded;
    let failed = r.is_err();
    if failed {
        g.counters.failures += 1;
    }
    let Some(m) = g.models.get_mut(&key) else { return };
    m.progress = None;
    m.bytes_done = progress.bytes_done.load(Ordering::SeqCst);
    m.bytes_total = progress.bytes_total.load(Ordering::SeqCst);
    m.checked = Some(Instant::now());
    let complete = local.as_ref().is_some_and(|l| l.is_complete());
    match &r {
        Ok(s) => {
            tracing::info!(repo = %spec.repo, revision = %spec.revision, commit = %s.commit, files = s.files, downloaded, "model is warm");
            m.last_error = None;
        }
        Err(e) => {
            tracing::warn!(repo = %spec.repo, revision = %spec.revision, error = %e, "prewarm failed");
            m.last_error = Some(e.to_string());
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
        m.commit = local.as_ref().and_then(|l| l.commit.clone());
        m.last_ok = Some(unix_now());
    } else {
        // Not (or no longer) complete here: stop advertising it to the scheduler.
        if let Err(e) = hf_cache::state::StateDir::for_hub(&cfg.hub_dir()).remove_warm(&spec.repo) {
            tracing::warn!(repo = %spec.repo, error = %e, "could not remove the warm record");
        }
        m.state = "failed".into();
        if m.last_error.is_none() {
            m.last_error = local.map(|l| l.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
        }
    }
}

/// Keeps the shared pins (`aimodel/pins/`) in line with this node's manifest:
/// every `pin = true` model pinned (every node's gc honours it); a pin this
/// node's manifest wrote for a model it no longer pins removed.
fn sync_pins(cfg: &AgentConfig) {
    let state = hf_cache::state::StateDir::for_hub(&cfg.hub_dir());
    let me = format!("{}:manifest", node_name());
    let wanted = cfg.pinned();
    let have = state.pins();
    for repo in &wanted {
        if !have.iter().any(|p| &p.repo == repo) {
            if let Err(e) = state.pin(repo, &me) {
                tracing::warn!(repo = %repo, error = %e, "could not write the shared pin");
            }
        }
    }
    for p in have.iter().filter(|p| p.by == me && !wanted.contains(&p.repo)) {
        if let Err(e) = state.unpin(&p.repo) {
            tracing::warn!(repo = %p.repo, error = %e, "could not remove the shared pin");
        }
    }
}

fn gc_pass(cfg: &AgentConfig, protected: Vec<String>, shared: &SharedRef) {
    sync_pins(cfg);
    let hub = cfg.hub_dir();
    let Ok(free) = hf_cache::mount::space(&hub).map(|(f, _)| f) else { return };
    let policy_base = hf_cache::gc::Policy {
        pinned: cfg.pinned(),
        protected,
        in_use_ttl: cfg.gc.as_ref().map(|g| g.in_use_ttl.0).unwrap_or(crate::config::default_in_use_ttl().0),
        lease_fresh: cfg.stale_after.0,
        ..Default::default()
    };
    let Some(gc) = &cfg.gc else {
        if let Ok(inv) = hf_cache::gc::inventory(&hub, &policy_base) {
            let mut g = lock(shared);
            g.counters.cache_bytes = inv.iter().map(|m| m.bytes).sum();
            g.counters.cache_free_bytes = free;
        }
        return;
    };
    let policy = hf_cache::gc::Policy {
        target_free: gc.target_free.map(|b| b.0),
        max_size: gc.max_size.map(|b| b.0),
        ..policy_base
    };
    let outcome = if gc.dry_run {
        hf_cache::gc::plan(&hub, &policy).map(|p| (p, Vec::new()))
    } else {
        hf_cache::gc::run(&hub, &policy)
    };
    match outcome {
        Ok((plan, done)) => {
            for (repo, bytes) in &done {
                tracing::info!(repo = %repo, bytes, "evicted");
            }
            let mut g = lock(shared);
            g.counters.evicted_models += done.len() as u64;
            g.counters.evicted_bytes += done.iter().map(|(_, b)| b).sum::<u64>();
            let freed: u64 = done.iter().map(|(_, b)| b).sum();
            g.counters.cache_bytes = plan.total.saturating_sub(freed);
            g.counters.cache_free_bytes = hf_cache::mount::space(&hub).map(|(f, _)| f).unwrap_or(free);
            g.gc_last = Some(serde_json::json!({
                "at": unix_now(),
                "dry_run": gc.dry_run,
                "would_evict": plan.evict,
                "evicted": done.iter().map(|(r, _)| r).collect::<Vec<_>>(),
                "reaches_target": plan.reaches_target,
                "kept": plan.models.iter().filter_map(|m| m.keep.as_ref().map(|k| (m.repo.clone(), k.to_string()))).collect::<BTreeMap<_, _>>(),
            }));
            if gc.target_free.is_some() || gc.max_size.is_some() {
                g.counters.gc_target_reachable = Some(plan.reaches_target);
            }
            if !plan.reaches_target {
                tracing::warn!("gc cannot reach its target: the rest is pinned, in use or wanted");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tracing::debug!(reason = %e, "gc skipped"),
        Err(e) => tracing::warn!(error = %e, "gc failed"),
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

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let hub = Hub::from_env()?;
    std::fs::create_dir_all(cfg.hub_dir())
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", cfg.hub_dir().display()))?;
    let shared: SharedRef = Arc::default();
    lock(&shared).started = Some(Instant::now());
    tokio::spawn(probe_loop(cfg.clone(), shared.clone()));
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, hf_home = %cfg.hf_home.display(), models = cfg.models.len(), "aimodel-agent running");
    tokio::spawn(serve_http(listener, cfg.clone(), shared.clone()));

    let (tx, mut rx) = watch::channel(BTreeSet::new());
    // Without a Nomad source the sender is kept, silent: `rx.changed()` then never fires.
    let _silent = match cfg.nomad.clone() {
        Some(n) => {
            let status = Arc::new(Mutex::new(NomadStatus::default()));
            lock(&shared).nomad = Some(status.clone());
            tokio::spawn(crate::nomad::watch(n, tx, status));
            None
        }
        None => Some(tx),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let pass = async {
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
                let handle = running.spawn(keep_warm(cfg.clone(), hub.clone(), spec, shared.clone()));
                in_flight.insert(key, handle);
            }
            if gc_task.as_ref().is_none_or(|t| t.is_finished()) && (gc_due || gc_last.elapsed() >= cfg.interval.0) {
                let protected: Vec<String> = wanted.keys().map(|(r, _)| r.clone()).collect();
                let (c, sh) = (cfg.clone(), shared.clone());
                gc_task = Some(tokio::task::spawn_blocking(move || gc_pass(&c, protected, &sh)));
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
    };
    tokio::select! {
        _ = pass => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_pins_become_shared_pins_and_go_with_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().display().to_string();
        let parse = |models: &str| {
            AgentConfig::parse(&format!("hf_home = \"{home}\"\nmodels = [{models}]"), std::path::Path::new("t.hcl"))
                .unwrap()
        };
        let cfg = parse("{ repo = \"o/pinned\", pin = true }, { repo = \"o/free\" }");
        let state = hf_cache::state::StateDir::for_hub(&cfg.hub_dir());
        // Another node pinned something this manifest does not know.
        state.pin("o/theirs", "other:manifest").unwrap();
        sync_pins(&cfg);
        let mut pins: Vec<(String, String)> = state.pins().into_iter().map(|p| (p.repo, p.by)).collect();
        pins.sort();
        assert_eq!(
            pins,
            [
                ("o/pinned".to_string(), format!("{}:manifest", node_name())),
                ("o/theirs".into(), "other:manifest".into())
            ]
        );
        // This node's manifest stops pinning it: its own pin goes, the other node's stays.
        sync_pins(&parse("{ repo = \"o/pinned\" }"));
        assert_eq!(state.pins().into_iter().map(|p| p.repo).collect::<Vec<_>>(), ["o/theirs"]);
    }

    #[test]
    fn health_names_each_reason_and_gives_nomad_a_grace_period() {
        let mut g = Shared { started: Some(Instant::now()), ..Shared::default() };
        assert!(health(&g).is_empty());
        g.cache_error = Some("/c/aimodel: Not a directory".into());
        assert_eq!(health(&g), ["the cache is not writable: /c/aimodel: Not a directory"]);
        g.cache_error = None;

        // Nomad failing, but it answered 10 s ago: within the grace period.
        let status = Arc::new(Mutex::new(NomadStatus {
            last_error: Some("connection refused".into()),
            last_ok: Some(unix_now() - 10),
            health_grace_secs: 60,
            ..NomadStatus::default()
        }));
        g.nomad = Some(status.clone());
        assert!(health(&g).is_empty());
        status.lock().unwrap().last_ok = Some(unix_now() - 300);
        let why = health(&g);
        assert!(
            why.len() == 1
                && why[0].starts_with("nomad has not answered for ")
                && why[0].ends_with("connection refused"),
            "{why:?}"
        );
        status.lock().unwrap().last_error = None;
        assert!(health(&g).is_empty());

        // Every recent prewarm failed → unhealthy; one success among them → healthy.
        g.recent.extend([false, false]);
        assert!(health(&g)[0].starts_with("the last 2 prewarms failed"), "{:?}", health(&g));
        g.recent.push_back(true);
        assert!(health(&g).is_empty());
    }
}
