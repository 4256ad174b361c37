//! The container engine behind a trait: Docker ([`docker`]), and a scripted
//! fake for unit tests of the task core (`fake`). The Docker implementation
//! talks to the Docker Engine API through bollard, the only module that does.

pub mod cgroup;
mod docker;
#[cfg(test)]
pub mod fake;
pub mod registry;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::io::AsyncWrite;

pub use docker::DockerRuntime;

use crate::config::RegistryAuth;

/// What the engine says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub version: String,
    pub api_version: String,
}

/// Errors talking to the container engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("docker daemon unreachable at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("docker daemon at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("invalid docker endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("image {image:?} not found: {reason}")]
    ImageNotFound { image: String, reason: String },
    #[error("pulling {image}: no progress for {idle:?} (pull_activity_timeout)")]
    PullStalled { image: String, idle: Duration },
    #[error("pulling {image}: {reason}")]
    Pull { image: String, reason: String },
    #[error("container {id} not found")]
    NotFound { id: String },
    #[error("a container named {name} exists already: {reason}")]
    Conflict { name: String, reason: String },
    #[error("docker {op} failed: {reason}")]
    Api { op: &'static str, reason: String },
}

impl RuntimeError {
    /// Whether retrying later can help (the engine may come back, a pull may go through).
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            RuntimeError::Unreachable { .. }
                | RuntimeError::Timeout { .. }
                | RuntimeError::PullStalled { .. }
                | RuntimeError::Pull { .. }
        )
    }
}

/// A published port: host `host_ip:host_port` → container `container_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortBinding {
    pub container_port: u16,
    pub host_ip: String,
    pub host_port: u16,
}

/// GPUs for a container, as a Docker DeviceRequest or CDI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    /// `--gpus device=<uuid>,...`: driver nvidia, exact device ids, capabilities [["gpu"]].
    Uuids(Vec<String>),
    /// `--gpus all` / `--gpus N`.
    Count(i64),
    /// CDI device names (`nvidia.com/gpu=<uuid>`).
    Cdi(Vec<String>),
}

/// Everything needed to create a container; built by the pure `plan::plan`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub user: Option<String>,
    pub binds: Vec<String>,
    pub ports: Vec<PortBinding>,
    pub network_mode: String,
    pub memory_bytes: Option<i64>,
    pub memory_reservation_bytes: Option<i64>,
    pub cpu_shares: Option<i64>,
    pub cpuset_cpus: Option<String>,
    pub shm_size: Option<i64>,
    pub ipc_mode: Option<String>,
    pub privileged: bool,
    pub gpus: Option<GpuRequest>,
    pub dns: Vec<String>,
    pub dns_search: Vec<String>,
    pub dns_options: Vec<String>,
    /// Device-plugin devices.
    pub devices: Vec<DeviceMapping>,
    /// json-file log rotation (`max-size`), as the docker driver's default.
    pub log_max_size: Option<String>,
    /// json-file log files kept (`max-file`).
    pub log_max_files: u32,
}

/// A host device in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMapping {
    pub host_path: String,
    pub container_path: String,
    pub permissions: String,
}

/// A container's state as inspected.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerState {
    pub running: bool,
    pub exit_code: i64,
    pub oom_killed: bool,
    pub pid: i64,
    pub error: String,
    pub status: String,
    /// The container's stop signal (the image's `STOPSIGNAL`), if it has one.
    pub stop_signal: Option<String>,
}

/// Pull progress, summed over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PullProgress {
    pub layers: usize,
    pub layers_done: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Which output stream a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One log record with Docker's timestamp (unix seconds, nanoseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub stream: LogStream,
    pub ts: (i64, u32),
    pub bytes: Vec<u8>,
}

/// One resource sample.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    /// Cumulative CPU time of the container, all cores.
    pub cpu_total_ns: u64,
    /// Cumulative CPU time of the host, all cores (Docker's `system_cpu_usage`).
    pub system_cpu_ns: u64,
    pub online_cpus: u32,
    pub cpu_user_ns: u64,
    pub cpu_kernel_ns: u64,
    pub throttled_periods: u64,
    pub throttled_time_ns: u64,
    pub mem_usage: u64,
    pub mem_max: u64,
    pub mem_rss: u64,
    pub mem_cache: u64,
    pub mem_swap: u64,
}

/// A container found by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    /// The container's name, without Docker's leading `/`.
    pub name: String,
    /// Docker's state: `created`, `running`, `exited`, …
    pub state: String,
    pub labels: BTreeMap<String, String>,
    /// Creation time, unix seconds.
    pub created: i64,
}

/// Output of a finished exec.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i64,
}

/// A running interactive exec.
pub struct ExecSession {
    pub id: String,
    pub output: BoxStream<'static, Result<(LogStream, Vec<u8>), RuntimeError>>,
    pub input: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The container engine as the driver core sees it.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// The endpoint, for messages.
    fn endpoint(&self) -> &str;
    /// Checks the engine answers and reports its version.
    async fn info(&self, timeout: Duration) -> Result<RuntimeInfo, RuntimeError>;
    /// Whether the image is present locally.
    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError>;
    /// Pulls an image, reporting progress; fails after `activity_timeout` without progress.
    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        activity_timeout: Duration,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), RuntimeError>;
    /// Removes an image (not forced); `Ok(false)` when it is absent or a container still uses it.
    async fn remove_image(&self, image: &str) -> Result<bool, RuntimeError>;
    /// Creates a container and returns its id.
    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Starts a created container.
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Inspects a container; `Ok(None)` when it does not exist.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError>;
    /// Blocks until the container is not running.
    async fn wait(&self, id: &str) -> Result<(), RuntimeError>;
    /// Sends a signal (`SIGTERM`, `SIGKILL`, …).
    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError>;
    /// Removes a container (and its anonymous volumes); missing is fine.
    async fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError>;
    /// Streams logs with timestamps, from `since_secs` (0: from the start).
    async fn logs(
        &self,
        id: &str,
        since_secs: i64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError>;
    /// The last `lines` lines of a finished or running container's log (Docker's `tail`).
    async fn log_tail(
        &self,
        id: &str,
        lines: usize,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError>;
    /// One resource sample.
    async fn stats(&self, id: &str) -> Result<Stats, RuntimeError>;
    /// Runs a command to completion inside the container.
    async fn exec(&self, id: &str, cmd: &[String]) -> Result<ExecOutput, RuntimeError>;
    /// Starts an interactive command inside the container.
    async fn exec_interactive(&self, id: &str, cmd: &[String], tty: bool) -> Result<ExecSession, RuntimeError>;
    /// Resizes an interactive exec's terminal.
    async fn exec_resize(&self, exec_id: &str, height: u16, width: u16) -> Result<(), RuntimeError>;
    /// Exit code of a finished exec (`None` while running).
    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError>;
    /// Containers carrying `label=value`, with their labels.
    async fn list_labelled(&self, label: &str, value: &str) -> Result<Vec<Listed>, RuntimeError>;
}
