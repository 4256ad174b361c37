//! `aimodel-agent run --config FILE`: keeps every wanted model (the manifest,
//! plus the models of Nomad's `driver = "aimodel"` tasks) warm in the shared
//! cache, records warm models for the driver's fingerprint, evicts cold ones
//! above the disk watermark, and serves `/health`, `/status` and `/metrics`.
//!
//! `scheduler` decides what to prewarm when, `gc` keeps pins and the
//! watermark, `status` holds health and the `/status` document, `metrics` the
//! Prometheus page, `http` the listener.

mod gc;
mod http;
mod metrics;
mod scheduler;
mod status;
mod warm;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::hub::{Hub, HubError};
use crate::nomad::NomadStatus;
use crate::prewarm::Progress;

pub use metrics::metrics_text;
pub use status::{health, status_json};

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
    /// The image pull-ahead's status (`images { ... }`).
    pub images: Option<Arc<Mutex<crate::images::ImagesStatus>>>,
    pub gc_last: Option<serde_json::Value>,
    /// Why the last write probe of the cache failed (`None`: writable, or not probed yet).
    pub cache_error: Option<String>,
    /// The last prewarm outcomes (true: the model ended complete), newest last.
    pub recent: std::collections::VecDeque<bool>,
    pub started: Option<Instant>,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where models come from: the hub and the Ollama registry (or mirror).
#[derive(Debug, Clone)]
pub struct Sources {
    pub hub: Hub,
    pub registry: crate::ollama::Registry,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Registry(#[from] crate::ollama::RegistryError),
    #[error("cannot create {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot install the signal handler: {0}")]
    Signal(std::io::Error),
}

/// Reads this node (`images.node_id`) from the Nomad API the job watch uses.
fn node_reader(nomad: &crate::config::NomadConfig, images: &crate::images::ImagesConfig) -> crate::images::FetchNode {
    let address = crate::config::resolve_address(nomad.address.as_deref(), &crate::env::Environment::default());
    let client = Arc::new(crate::nomad::Client::new(&address, nomad.token.clone().filter(|t| !t.is_empty())));
    let id = hf_cache::layout::percent_encode(images.node_id.as_deref().unwrap_or_default(), b"-_.");
    Box::new(move || {
        let (client, path) = (client.clone(), format!("/v1/node/{id}"));
        Box::pin(async move { client.get(&path, Duration::from_secs(30)).await.map(|(v, _)| v) })
    })
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: AgentConfig, hub: Hub) -> Result<(), DaemonError> {
    let sources = Sources { hub, registry: crate::ollama::Registry::new(cfg.ollama_registry.as_deref())? };
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(cfg.hub_dir())
        .map_err(|source| DaemonError::CreateDir { path: cfg.hub_dir().display().to_string(), source })?;
    let shared: SharedRef = Arc::default();
    lock(&shared).started = Some(Instant::now());
    tokio::spawn(status::run_probe(cfg.clone(), shared.clone()));
    let listen_err = |source| DaemonError::Listen { addr: cfg.listen.clone(), source };
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await.map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    tracing::info!(listen = %addr, hf_home = %cfg.hf_home.display(), models = cfg.models.len(), "aimodel-agent running");
    tokio::spawn(http::run_http(listener, cfg.clone(), shared.clone()));

    let (tx, rx) = watch::channel(BTreeSet::new());
    // `None` until the first pass over the jobs: nothing is released before.
    let (images_tx, images_rx) = watch::channel(None);
    // Without a Nomad source the sender is kept, silent: `rx.changed()` then never fires.
    let _silent = match cfg.nomad.clone() {
        Some(n) => {
            let status = Arc::new(Mutex::new(NomadStatus::default()));
            lock(&shared).nomad = Some(status.clone());
            if let Some(images) = cfg.images.clone() {
                let st = Arc::new(Mutex::new(crate::images::ImagesStatus::default()));
                lock(&shared).images = Some(st.clone());
                tokio::spawn(crate::images::run(images.clone(), node_reader(&n, &images), images_rx, st));
            }
            tokio::spawn(crate::nomad::watch(n, tx, images_tx, status));
            None
        }
        None => Some(tx),
    };
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(DaemonError::Signal)?;
    tokio::select! {
        _ = scheduler::run_scheduler(cfg.clone(), sources, shared.clone(), rx) => {}
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}
