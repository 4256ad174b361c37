//! The task core, in Nomad's vocabulary: the driver (configuration, engine
//! handle, event bus, lifetime), fingerprinting, the cache gate, GPUs and the
//! tasks. The adapter (`nomad`) calls into it; it knows nothing of tonic or
//! protobuf.

pub mod cache;
pub mod error;
mod fingerprint;
pub mod gpu;
mod images;
pub mod task;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::PluginConfig;
use crate::driver::error::DriverError;
use crate::driver::gpu::{GpuMonitor, GpuProbe, NvmlProbe};
use crate::driver::task::TaskStore;
use crate::runtime::{ContainerRuntime, DockerRuntime};
use crate::types::TaskEvent;

/// The name jobs use in `driver = "..."`.
pub const PLUGIN_NAME: &str = "aimodel";
/// The Nomad plugin API version we speak (`drivers.ApiVersion010`).
pub const PLUGIN_API_VERSION: &str = "0.1.0";
/// This plugin's version.
pub const PLUGIN_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Task events buffered for slow TaskEvents readers.
const EVENT_BUFFER: usize = 1024;
/// How often the in-use markers of running tasks are rewritten; the agents' gc
/// honours a marker for ten times this (`in_use_ttl`).
pub(crate) const IN_USE_REFRESH: Duration = Duration::from_secs(60);

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

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("endpoint", &self.config().endpoint).finish_non_exhaustive()
    }
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

    /// SetConfig: apply a decoded, validated configuration. Nomad calls this twice without
    /// `nomad_config` in a throwaway validation process and once with it in the
    /// long-lived process; applying the same config again is harmless.
    pub fn set_config(&self, cfg: PluginConfig, from_long_lived_client: bool) -> Result<(), DriverError> {
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
        let probe = match tokio::time::timeout(crate::driver::gpu::PROBE_TIMEOUT, load).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(crate::driver::gpu::GpuError::Probe(e.to_string())),
            Err(_) => Err(crate::driver::gpu::GpuError::Timeout(crate::driver::gpu::PROBE_TIMEOUT)),
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

    /// Subscribes to task events.
    pub fn subscribe_events(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    /// Publishes a task event to every TaskEvents stream.
    pub fn emit(&self, event: TaskEvent) {
        let _ = self.events.send(event);
    }
}
