//! The driver core, in Nomad's vocabulary and in protocol order. gRPC adapters
//! (`grpc`) call into it; it knows nothing of tonic or protobuf.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{decode_plugin_config, PluginConfig};
use crate::error::DriverError;
use crate::gpu::{GpuMonitor, GpuProbe, NvmlProbe};
use crate::lifecycle::TaskStore;
use crate::runtime::{ContainerRuntime, DockerRuntime};

/// The name jobs use in `driver = "..."`.
pub const PLUGIN_NAME: &str = "aimodel";
/// The Nomad plugin API version we speak (`drivers.ApiVersion010`).
pub const PLUGIN_API_VERSION: &str = "0.1.0";
/// This plugin's version.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The first fingerprint must not wait longer than this for the engine.
const FIRST_PROBE_TIMEOUT: Duration = Duration::from_millis(750);
/// Later probes may take longer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Containers of ours that no task claims are reported only after this long,
/// so that Nomad has had time to recover its tasks (`AIMODEL_ORPHAN_GRACE`
/// overrides it, e.g. `10s`).
const ORPHAN_GRACE: Duration = Duration::from_secs(120);
/// The description of a healthy driver (Nomad's drivers say "Healthy").
const HEALTHY: &str = "Healthy";
/// Task events buffered for slow TaskEvents readers.
const EVENT_BUFFER: usize = 1024;
/// How often the in-use markers of running tasks are rewritten; the agents' gc
/// honours a marker for ten times this (`in_use_ttl`).
pub(crate) const IN_USE_REFRESH: Duration = Duration::from_secs(60);

/// A node attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// Driver health as Nomad models it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Undetected,
    Unhealthy,
    Healthy,
}

/// One fingerprint: attributes and health.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub attributes: BTreeMap<String, AttrValue>,
    pub health: Health,
    pub description: String,
}

/// A task event for the TaskEvents stream.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
    pub at: SystemTime,
    pub message: String,
    pub annotations: BTreeMap<String, String>,
}

/// Builds the container runtime for an endpoint (replaced by fakes in tests).
pub type RuntimeFactory = Arc<dyn Fn(&str) -> Arc<dyn ContainerRuntime> + Send + Sync>;

/// The driver: configuration, engine handle, event bus and lifetime.
#[derive(Clone)]
pub struct Driver {
    config: watch::Sender<Arc<PluginConfig>>,
    runtime: Arc<RwLock<Arc<dyn ContainerRuntime>>>,
    factory: RuntimeFactory,
    events: broadcast::Sender<TaskEvent>,
    shutdown: CancellationToken,
    tasks: TaskStore,
    born: std::time::Instant,
    orphans: Arc<std::sync::Mutex<Vec<String>>>,
    gpu: Arc<tokio::sync::Mutex<Option<Arc<GpuMonitor>>>>,
    /// When the in-use markers of running tasks were last rewritten.
    in_use_refreshed: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Tasks (starting, running or recovered) per image, for `gc.image`.
    image_refs: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// Whether the engine has answered once.
    docker_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver {
    /// A driver talking to Docker, with default configuration until SetConfig.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self::with_runtime(
            shutdown,
            Arc::new(|endpoint: &str| Arc::new(DockerRuntime::new(endpoint)) as Arc<dyn ContainerRuntime>),
        )
    }

    /// A driver whose runtime comes from `factory`.
    pub fn with_runtime(shutdown: CancellationToken, factory: RuntimeFactory) -> Self {
        let config = Arc::new(PluginConfig::default());
        let runtime = factory(&config.endpoint);
        Driver {
            config: watch::channel(config).0,
            runtime: Arc::new(RwLock::new(runtime)),
            factory,
            events: broadcast::channel(EVENT_BUFFER).0,
            shutdown,
            tasks: TaskStore::default(),
            born: std::time::Instant::now(),
            orphans: Arc::default(),
            gpu: Arc::default(),
            in_use_refreshed: Arc::default(),
            image_refs: Arc::default(),
            docker_seen: Arc::default(),
        }
    }

    /// Counts a task using `image` (from its plan until DestroyTask).
    pub(crate) fn image_ref(&self, image: &str) {
        let key = crate::registry::canonical(image);
        *self.image_refs.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += 1;
    }

    /// A task stopped using `image`; with `gc.image` the image is removed once no
    /// task has used it for `gc.image_delay` (as the docker driver's image coordinator does).
    pub(crate) fn image_unref(&self, image: &str) {
        let key = crate::registry::canonical(image);
        {
            let mut refs = self.image_refs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = refs.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
        }
        let gc = self.config().gc.clone();
        if !gc.image {
            return;
        }
        let (me, image) = (self.clone(), image.to_string());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(gc.image_delay.0) => {}
                _ = me.shutdown.cancelled() => return,
            }
            let unused = {
                let mut refs = me.image_refs.lock().unwrap_or_else(|p| p.into_inner());
                let unused = refs.get(&key).is_none_or(|n| *n == 0);
                if unused {
                    refs.remove(&key);
                }
                unused
            };
            if !unused {
                return;
            }
            match me.runtime().remove_image(&image).await {
                Ok(true) => tracing::info!(image = %image, "removed the unused image (gc.image)"),
                Ok(false) => tracing::debug!(image = %image, "image kept: gone already or used by another container"),
                Err(e) => tracing::warn!(image = %image, error = %e, "cannot remove the unused image"),
            }
        });
    }

    /// The token cancelled when the plugin shuts down; long-lived streams end on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<PluginConfig> {
        self.config.borrow().clone()
    }

    /// Watches configuration changes (the fingerprint loop re-reads its period).
    pub fn watch_config(&self) -> watch::Receiver<Arc<PluginConfig>> {
        self.config.subscribe()
    }

    /// The tasks this process tracks.
    pub fn tasks(&self) -> &TaskStore {
        &self.tasks
    }

    /// The container runtime for the configured endpoint.
    pub fn runtime(&self) -> Arc<dyn ContainerRuntime> {
        self.runtime.read().map(|r| r.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// SetConfig: decode, validate and apply. Nomad calls this twice without
    /// `nomad_config` in a throwaway validation process and once with it in the
    /// long-lived process; applying the same config again is harmless.
    pub fn set_config(&self, msgpack: &[u8], from_long_lived_client: bool) -> Result<(), DriverError> {
        let cfg = decode_plugin_config(msgpack).map_err(DriverError::PluginConfig)?;
        if cfg.endpoint != self.config().endpoint {
            let rt = (self.factory)(&cfg.endpoint);
            match self.runtime.write() {
                Ok(mut w) => *w = rt,
                Err(p) => *p.into_inner() = rt,
            }
        }
        tracing::info!(
            endpoint = %cfg.endpoint,
            hf_cache = %cfg.hf_cache.host_path,
            fingerprint_period = ?cfg.fingerprint_period.0,
            nomad_config = from_long_lived_client,
            "plugin configured"
        );
        let gpu_changed = cfg.gpu != self.config().gpu;
        self.config.send_replace(Arc::new(cfg));
        if gpu_changed {
            if let Ok(mut g) = self.gpu.try_lock() {
                *g = None;
            }
        }
        Ok(())
    }

    /// The GPU monitor, loading NVML on first use (under a timeout: a hung
    /// library must not stall the fingerprint). `None` when GPUs are disabled.
    pub async fn gpus(&self) -> Option<Arc<GpuMonitor>> {
        let cfg = self.config().gpu.clone();
        if !cfg.enabled {
            return None;
        }
        let mut slot = self.gpu.lock().await;
        if let Some(m) = slot.as_ref() {
            return Some(m.clone());
        }
        let lib = cfg.nvml_library.clone();
        let load = tokio::task::spawn_blocking(move || NvmlProbe::load(&lib).map(|p| Arc::new(p) as Arc<dyn GpuProbe>));
        let probe = match tokio::time::timeout(crate::gpu::PROBE_TIMEOUT, load).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("NVML initialisation did not finish within {:?}", crate::gpu::PROBE_TIMEOUT)),
        };
        if let Err(e) = &probe {
            tracing::info!(error = %e, "no GPUs");
        }
        let monitor = GpuMonitor::new(probe);
        let me = self.clone();
        monitor.clone().run_events(self.shutdown.clone(), move |ev| me.gpu_fault(&ev));
        *slot = Some(monitor.clone());
        Some(monitor)
    }

    /// A fatal GPU event: logged, and an event on every task using that GPU.
    fn gpu_fault(&self, ev: &crate::gpu::GpuEvent) {
        tracing::error!(gpu = %ev.uuid, what = %ev.what, "GPU fault");
        for id in self.tasks.ids() {
            let Some(task) = self.tasks.task(&id) else { continue };
            let uses = crate::engine::assigned_gpus(&task).contains(&ev.uuid);
            if uses {
                self.emit(TaskEvent {
                    task_id: task.id.clone(),
                    alloc_id: task.alloc_id.clone(),
                    task_name: task.name.clone(),
                    at: SystemTime::now(),
                    message: format!("GPU {} failed: {}", ev.uuid, ev.what),
                    annotations: BTreeMap::from([("gpu".to_string(), ev.uuid.clone())]),
                });
            }
        }
    }

    /// One fingerprint. `first` bounds the engine probe tightly so the first
    /// message reaches Nomad at once.
    pub async fn fingerprint(&self, first: bool) -> Fingerprint {
        let timeout = if first { FIRST_PROBE_TIMEOUT } else { PROBE_TIMEOUT };
        let mut attributes = BTreeMap::new();
        attributes.insert(format!("driver.{PLUGIN_NAME}"), AttrValue::Bool(true));
        attributes.insert(format!("driver.{PLUGIN_NAME}.version"), AttrValue::Str(PLUGIN_VERSION.into()));
        let runtime = self.runtime();
        let cache_cfg = self.config().hf_cache.clone();
        let cache = tokio::task::spawn_blocking(move || crate::cache::assess(&cache_cfg)).await.unwrap_or_default();
        attributes.extend(cache.attributes.clone());
        let cache_cfg = self.config().hf_cache.clone();
        let warm = tokio::task::spawn_blocking(move || crate::cache::warm_attributes(&cache_cfg)).await;
        attributes.extend(warm.unwrap_or_default());
        let due = {
            let mut last = self.in_use_refreshed.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= IN_USE_REFRESH);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            self.refresh_in_use().await;
        }
        let mut gpu_notes = Vec::new();
        let mut gpu_required_missing = false;
        if let Some(monitor) = self.gpus().await {
            let st = monitor.status().await;
            attributes.extend(st.attributes);
            gpu_required_missing = st.none_usable && self.config().gpu.required;
            gpu_notes = st.notes;
        }
        let (mut health, mut description) = match runtime.info(timeout).await {
            Ok(info) => {
                attributes.insert(format!("driver.{PLUGIN_NAME}.docker.version"), AttrValue::Str(info.version));
                attributes.insert(format!("driver.{PLUGIN_NAME}.docker.api_version"), AttrValue::Str(info.api_version));
                if let Some(n) = self.scan_orphans(runtime.as_ref()).await {
                    attributes.insert(format!("driver.{PLUGIN_NAME}.orphans"), AttrValue::Int(n as i64));
                }
                self.docker_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                if cache.problems.is_empty() {
                    (Health::Healthy, HEALTHY.to_string())
                } else {
                    (Health::Unhealthy, cache.problems.join("; "))
                }
            }
            Err(e) => {
                let mut d = vec![e.to_string()];
                d.extend(cache.problems);
                // As the docker driver: an engine never reached is "undetected"
                // (the driver is not usable here), one that went away is unhealthy.
                let seen = self.docker_seen.load(std::sync::atomic::Ordering::SeqCst);
                (if seen { Health::Unhealthy } else { Health::Undetected }, d.join("; "))
            }
        };
        if gpu_required_missing {
            health = Health::Unhealthy;
            description = if description == HEALTHY {
                "no usable GPU and gpu.required is true".into()
            } else {
                format!("{description}; no usable GPU and gpu.required is true")
            };
        }
        if !gpu_notes.is_empty() {
            description = format!("{description}; {}", gpu_notes.join("; "));
        }
        Fingerprint { attributes, health, description }
    }

    /// Containers labelled as ours, created for this node, whose task this
    /// plugin does not track (dangling: a StartTask whose answer was lost, a
    /// plugin restart with lost state). They are reported (log line and
    /// attribute) and, as the docker driver's reconciler does
    /// (`drivers/docker/reconcile_dangling.go`), removed once older than
    /// `gc.dangling_containers.creation_grace` unless that is disabled or a dry
    /// run. Nothing is judged before the plugin has run for the orphan grace
    /// (Nomad recovers its tasks first), nor containers of other clients.
    async fn scan_orphans(&self, runtime: &dyn ContainerRuntime) -> Option<usize> {
        let grace = std::env::var("AIMODEL_ORPHAN_GRACE")
            .ok()
            .and_then(|g| crate::config::units::parse_duration(&g).ok())
            .unwrap_or(ORPHAN_GRACE);
        if self.born.elapsed() < grace {
            return None;
        }
        let node = self.tasks.node_name().or_else(|| std::fs::read_to_string("/etc/hostname").ok())?;
        let node = node.trim().to_string();
        let listed = runtime.list_labelled(crate::engine::LABEL_MANAGED, "true").await.ok()?;
        let tracked = self.tasks.ids();
        let dangling: Vec<crate::runtime::Listed> = listed
            .into_iter()
            .filter(|c| c.labels.get(crate::engine::LABEL_NODE) == Some(&node))
            .filter(|c| c.labels.get(crate::engine::LABEL_TASK_ID).is_none_or(|t| !tracked.contains(t)))
            .collect();
        let policy = self.config().gc.dangling_containers.clone();
        let now = crate::timefmt::unix_now_secs();
        let mut kept = Vec::new();
        for c in dangling {
            let task = c.labels.get(crate::engine::LABEL_TASK_ID).cloned().unwrap_or_default();
            let short = c.id[..12.min(c.id.len())].to_string();
            let old_enough = now.saturating_sub(c.created) >= policy.creation_grace.0.as_secs() as i64;
            if policy.enabled && !policy.dry_run && old_enough {
                match runtime.remove(&c.id, true).await {
                    Ok(()) => {
                        tracing::warn!(container = %short, task_id = %task, "removed a dangling container no task of this plugin owns");
                        continue;
                    }
                    Err(e) => tracing::warn!(container = %short, error = %e, "cannot remove a dangling container"),
                }
            }
            kept.push(format!("{short} ({task})"));
        }
        kept.sort();
        let mut last = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        if *last != kept && !kept.is_empty() {
            tracing::warn!(node = %node, containers = %kept.join(", "), "containers labelled as aimodel tasks of this node that Nomad no longer knows");
        }
        let n = kept.len();
        *last = kept;
        Some(n)
    }

    /// Subscribes to task events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// Publishes a task event to every TaskEvents stream.
    pub fn emit(&self, event: TaskEvent) {
        let _ = self.events.send(event);
    }
}
