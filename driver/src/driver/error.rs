//! Errors of the driver core. The adapter (`nomad::status`) turns them into
//! gRPC statuses with Nomad's RecoverableError detail.

use crate::config::ConfigError;
use crate::runtime::RuntimeError;

/// Errors of the driver core.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid plugin config: {0}")]
    PluginConfig(ConfigError),
    #[error("invalid task config: {0}")]
    TaskConfig(ConfigError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("task {id} not found")]
    TaskNotFound { id: String },
    #[error("{message}")]
    ModelIncomplete { message: String },
    #[error("{message}")]
    Cache { message: String },
    #[error("task {id} is already running")]
    TaskExists { id: String },
    #[error("starting a container of {image}: {reason}")]
    StartFailed { image: String, reason: String },
    #[error("the plugin is shutting down")]
    ShuttingDown,
    #[error("task {id} did not stop even after SIGKILL")]
    StopTimeout { id: String },
    #[error("task {id} is still running; destroy it with force or stop it first")]
    StillRunning { id: String },
    #[error("cannot recover the task: {reason}")]
    BadHandle { reason: String },
    #[error("cannot recover task {id}: its container {container} no longer exists")]
    ContainerGone { id: String, container: String },
    #[error("invalid signal {signal:?} (use a name such as SIGHUP or SIGUSR1)")]
    BadSignal { signal: String },
    #[error("{message}")]
    BadRequest { message: String },
    #[error("exec did not finish within {timeout:?}")]
    ExecTimeout { timeout: std::time::Duration },
    #[error("{what} is not implemented yet")]
    NotImplemented { what: &'static str },
}
