//! Errors of the driver core. The adapter (`nomad::status`) turns them into
//! gRPC statuses with Nomad's RecoverableError detail.

use crate::config::ConfigError;
use crate::runtime::RuntimeError;
use crate::types::StateError;

/// Errors of the driver core. Which of them Nomad may retry is decided in
/// one place, [`DriverError::is_recoverable`].
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid plugin config: {0}")]
    PluginConfig(#[source] ConfigError),
    #[error("invalid task config: {0}")]
    TaskConfig(#[source] ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("task {id} not found")]
    TaskNotFound { id: String },
    /// The model is not (yet) complete in the cache: retry once it is warmed.
    #[error("{message}")]
    ModelIncomplete { message: String },
    /// The cache could not be read now (a hung or failing mount).
    #[error("hf cache {path}: {reason}")]
    CacheUnavailable { path: String, reason: String },
    /// `prewarm = true` and the fetch failed (the hub may answer later).
    #[error("prewarm of {model} failed: {reason}")]
    PrewarmFailed { model: String, reason: String },
    /// `prewarm = true` but there is no agent to run: retrying cannot help.
    #[error("prewarm = true but aimodel-agent was not found (beside the plugin, on PATH, or AIMODEL_AGENT_BIN)")]
    AgentMissing,
    /// The agent binary exists but cannot be run.
    #[error("cannot run {path}: {source}")]
    AgentSpawn {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("task {id} is already running")]
    TaskExists { id: String },
    #[error("starting a container of {image}: {source}")]
    StartFailed {
        image: String,
        #[source]
        source: RuntimeError,
    },
    #[error("the plugin is shutting down")]
    ShuttingDown,
    #[error("task {id} did not stop even after SIGKILL")]
    StopTimeout { id: String },
    #[error("task {id} is still running; destroy it with force or stop it first")]
    StillRunning { id: String },
    #[error("cannot recover the task: {0}")]
    BadHandle(#[source] StateError),
    #[error("cannot recover task {id}: its container {container} no longer exists")]
    ContainerGone { id: String, container: String },
    #[error("invalid signal {signal:?} (use a name such as SIGHUP or SIGUSR1)")]
    BadSignal { signal: String },
    #[error("{message}")]
    BadRequest { message: String },
    #[error("exec did not finish within {timeout:?}")]
    ExecTimeout { timeout: std::time::Duration },
}

impl DriverError {
    /// Whether Nomad should restart the task and try again (Nomad's
    /// RecoverableError): the engine or the cache may come back, a model may be
    /// warmed meanwhile. Configuration and a missing agent are final.
    pub fn is_recoverable(&self) -> bool {
        match self {
            DriverError::Runtime(r) => r.is_recoverable(),
            DriverError::ModelIncomplete { .. }
            | DriverError::CacheUnavailable { .. }
            | DriverError::PrewarmFailed { .. } => true,
            _ => false,
        }
    }
}
