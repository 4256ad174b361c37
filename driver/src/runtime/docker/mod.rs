//! [`ContainerRuntime`] over the Docker Engine API (bollard).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ExecConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, ResizeExecOptions, StatsOptions, WaitContainerOptions,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{
    ContainerRuntime, ContainerSpec, ContainerState, ExecOutput, ExecSession, Listed, LogRecord, LogStream,
    PullProgress, RuntimeError, RuntimeInfo, Stats,
};
use crate::config::RegistryAuth;

mod spec;

use spec::{credentials, host_config, split_image, split_timestamp};

/// Client-side request timeout for ordinary calls (streams are not bounded by it).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// Docker Engine API over bollard.
pub struct DockerRuntime {
    endpoint: String,
    docker: tokio::sync::Mutex<Option<Docker>>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl DockerRuntime {
    /// Connects lazily: a bad or absent daemon is reported by the first call.
    pub fn new(endpoint: &str) -> Self {
        DockerRuntime { endpoint: endpoint.into(), docker: tokio::sync::Mutex::new(None) }
    }

    /// The client, connecting (and negotiating the API version: engines as old
    /// as 20.10 speak 1.41) on first use and again after a failure.
    async fn client(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let endpoint = self.endpoint.as_str();
        let unreachable =
            |e: BollardError| RuntimeError::Unreachable { endpoint: endpoint.into(), reason: e.to_string() };
        let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION).map_err(unreachable)?
        } else if let Some(addr) = endpoint.strip_prefix("tcp://") {
            Docker::connect_with_http(&format!("http://{addr}"), REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
                .map_err(unreachable)?
        } else if endpoint.starts_with("http://") {
            Docker::connect_with_http(endpoint, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION).map_err(unreachable)?
        } else {
            return Err(RuntimeError::BadEndpoint {
                endpoint: endpoint.into(),
                reason: "only unix://, tcp:// and http:// endpoints are supported".into(),
            });
        };
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    async fn forget_client(&self) {
        *self.docker.lock().await = None;
    }

    fn api(&self, op: &'static str) -> impl Fn(BollardError) -> RuntimeError + '_ {
        move |e| match e {
            BollardError::DockerResponseServerError { status_code: 404, message } => {
                RuntimeError::NotFound { id: message }
            }
            BollardError::HyperResponseError { .. } | BollardError::IOError { .. } => {
                RuntimeError::Unreachable { endpoint: self.endpoint.clone(), reason: e.to_string() }
            }
            e => RuntimeError::Api { op, reason: e.to_string() },
        }
    }
}
#[async_trait::async_trait]
impl ContainerRuntime for DockerRuntime {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn info(&self, timeout: Duration) -> Result<RuntimeInfo, RuntimeError> {
        let call = async {
            let docker = self.client().await?;
            docker
                .version()
                .await
                .map_err(|e| RuntimeError::Unreachable { endpoint: self.endpoint.clone(), reason: e.to_string() })
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(RuntimeError::Timeout { endpoint: self.endpoint.clone(), timeout }),
            Ok(Err(e)) => {
                self.forget_client().await;
                Err(e)
            }
            Ok(Ok(v)) => Ok(RuntimeInfo {
                version: v.version.unwrap_or_default(),
                api_version: v.api_version.unwrap_or_default(),
            }),
        }
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.client().await?.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(e) => Err(self.api("inspect image")(e)),
        }
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        activity_timeout: Duration,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let (from_image, tag) = split_image(image);
        let options = CreateImageOptions { from_image: Some(from_image), tag: Some(tag), ..Default::default() };
        let mut stream = docker.create_image(Some(options), None, credentials(auth));
        let mut layers: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
        loop {
            // The pull is bounded by activity, never by wall-clock time.
            let next = match tokio::time::timeout(activity_timeout, stream.next()).await {
                Err(_) => return Err(RuntimeError::PullStalled { image: image.into(), idle: activity_timeout }),
                Ok(None) => return Ok(()),
                Ok(Some(item)) => item,
            };
            let info = next.map_err(|e| match e {
                BollardError::DockerResponseServerError { status_code: 404, message } => {
                    RuntimeError::ImageNotFound { image: image.into(), reason: message }
                }
                BollardError::DockerResponseServerError { message, .. }
                    if message.contains("not found") || message.contains("does not exist") =>
                {
                    RuntimeError::ImageNotFound { image: image.into(), reason: message }
                }
                e => RuntimeError::Pull { image: image.into(), reason: e.to_string() },
            })?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Pull { image: image.into(), reason: err });
            }
            if let Some(id) = info.id {
                let entry = layers.entry(id).or_default();
                if let Some(d) = info.progress_detail {
                    entry.0 = u64::try_from(d.current.unwrap_or(0)).unwrap_or(0);
                    entry.1 = entry.1.max(u64::try_from(d.total.unwrap_or(0)).unwrap_or(0));
                }
                if matches!(info.status.as_deref(), Some("Pull complete" | "Already exists")) {
                    entry.2 = true;
                    entry.0 = entry.1;
                }
            }
            progress(PullProgress {
                layers: layers.len(),
                layers_done: layers.values().filter(|l| l.2).count(),
                bytes_done: layers.values().map(|l| l.0).sum(),
                bytes_total: layers.values().map(|l| l.1).sum(),
            });
        }
    }

    async fn remove_image(&self, image: &str) -> Result<bool, RuntimeError> {
        let options = RemoveImageOptions { force: false, noprune: false, ..Default::default() };
        match self.client().await?.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(true),
            Err(BollardError::DockerResponseServerError { status_code: 404 | 409, .. }) => Ok(false),
            Err(e) => Err(self.api("remove image")(e)),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let docker = self.client().await?;
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: spec.entrypoint.clone(),
            cmd: spec.cmd.clone(),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            user: spec.user.clone(),
            exposed_ports: Some(
                spec.ports
                    .iter()
                    .flat_map(|p| ["tcp", "udp"].map(|proto| format!("{}/{proto}", p.container_port)))
                    .collect(),
            )
            .filter(|v: &Vec<String>| !v.is_empty()),
            host_config: Some(host_config(spec)),
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        let created = docker.create_container(Some(options), body).await.map_err(|e| match e {
            BollardError::DockerResponseServerError { status_code: 404, message } => {
                RuntimeError::ImageNotFound { image: spec.image.clone(), reason: message }
            }
            // The name is taken (a container of an earlier attempt).
            BollardError::DockerResponseServerError { status_code: 409, message } => {
                RuntimeError::Conflict { name: spec.name.clone(), reason: message }
            }
            e => self.api("create")(e),
        })?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.client().await?.start_container(id, None).await.map_err(self.api("start"))
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError> {
        match self.client().await?.inspect_container(id, None).await {
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.api("inspect")(e)),
            Ok(c) => {
                let stop_signal = c.config.as_ref().and_then(|cfg| cfg.stop_signal.clone()).filter(|s| !s.is_empty());
                let s = c.state.unwrap_or_default();
                Ok(Some(ContainerState {
                    running: s.running.unwrap_or(false),
                    exit_code: s.exit_code.unwrap_or(0),
                    oom_killed: s.oom_killed.unwrap_or(false),
                    pid: s.pid.unwrap_or(0),
                    error: s.error.unwrap_or_default(),
                    status: s.status.map(|st| st.to_string()).unwrap_or_default(),
                    stop_signal,
                }))
            }
        }
    }

    async fn wait(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let options = WaitContainerOptions { condition: "not-running".into() };
        let mut s = docker.wait_container(id, Some(options));
        while let Some(item) = s.next().await {
            match item {
                Ok(_) => {}
                // A non-zero exit is reported as an error by bollard; it still means "exited".
                Err(BollardError::DockerContainerWaitError { .. }) => {}
                Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
                Err(e) => return Err(self.api("wait")(e)),
            }
        }
        Ok(())
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let options = KillContainerOptions { signal: signal.into() };
        match self.client().await?.kill_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            // 409: not running any more, which is what we wanted.
            Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(self.api("kill")(e)),
        }
    }

    async fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions { force, v: true, ..Default::default() };
        match self.client().await?.remove_container(id, Some(options)).await {
            Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // 409 "removal already in progress" is as good as removed.
            Err(BollardError::DockerResponseServerError { status_code: 409, message })
                if message.contains("in progress") =>
            {
                Ok(())
            }
            Err(e) => Err(self.api("remove")(e)),
        }
    }

    async fn logs(
        &self,
        id: &str,
        since_secs: i64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError> {
        let id = id.to_string();
        let endpoint = self.endpoint.clone();
        let docker = self.client().await?;
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            timestamps: true,
            since: i32::try_from(since_secs).unwrap_or(0),
            ..Default::default()
        };
        let stream = docker
            .logs(&id, Some(options))
            .map(move |item| {
                let out = item.map_err(|e| RuntimeError::Api { op: "logs", reason: format!("{e} ({endpoint})") })?;
                let (stream, bytes) = match out {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => (LogStream::Stdout, message),
                    LogOutput::StdErr { message } => (LogStream::Stderr, message),
                    LogOutput::StdIn { message } => (LogStream::Stdout, message),
                };
                Ok(split_timestamp(stream, &bytes))
            })
            .boxed();
        Ok(stream)
    }

    async fn log_tail(
        &self,
        id: &str,
        lines: usize,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError> {
        let docker = self.client().await?;
        let endpoint = self.endpoint.clone();
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            timestamps: false,
            tail: lines.to_string(),
            ..Default::default()
        };
        Ok(docker
            .logs(id, Some(options))
            .map(move |item| {
                let out = item.map_err(|e| RuntimeError::Api { op: "logs", reason: format!("{e} ({endpoint})") })?;
                let (stream, bytes) = match out {
                    LogOutput::StdErr { message } => (LogStream::Stderr, message),
                    LogOutput::StdOut { message } | LogOutput::Console { message } | LogOutput::StdIn { message } => {
                        (LogStream::Stdout, message)
                    }
                };
                Ok(LogRecord { stream, ts: (0, 0), bytes: bytes.to_vec() })
            })
            .boxed())
    }

    async fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        let docker = self.client().await?;
        // one_shot: a single sample without Docker's one-second precpu wait; the
        // caller computes rates from consecutive samples.
        let options = StatsOptions { stream: false, one_shot: true };
        let s = docker
            .stats(id, Some(options))
            .next()
            .await
            .ok_or_else(|| RuntimeError::Api { op: "stats", reason: "no sample".into() })?
            .map_err(self.api("stats"))?;
        let cpu = s.cpu_stats.unwrap_or_default();
        let usage = cpu.cpu_usage.clone().unwrap_or_default();
        let throttling = cpu.throttling_data.unwrap_or_default();
        let mem = s.memory_stats.unwrap_or_default();
        let detail = mem.stats.unwrap_or_default();
        let get = |k: &str| detail.get(k).copied().unwrap_or(0);
        // cgroup v1 reports rss/cache, v2 anon/file.
        let rss = get("rss").max(get("anon"));
        let cache = get("cache").max(get("file"));
        Ok(Stats {
            cpu_total_ns: usage.total_usage.unwrap_or(0),
            system_cpu_ns: cpu.system_cpu_usage.unwrap_or(0),
            online_cpus: cpu.online_cpus.unwrap_or(1).max(1),
            cpu_user_ns: usage.usage_in_usermode.unwrap_or(0),
            cpu_kernel_ns: usage.usage_in_kernelmode.unwrap_or(0),
            throttled_periods: throttling.throttled_periods.unwrap_or(0),
            throttled_time_ns: throttling.throttled_time.unwrap_or(0),
            mem_usage: mem.usage.unwrap_or(0),
            mem_max: mem.max_usage.unwrap_or(0),
            mem_rss: rss,
            mem_cache: cache,
            mem_swap: get("swap"),
        })
    }

    async fn exec(&self, id: &str, cmd: &[String]) -> Result<ExecOutput, RuntimeError> {
        let session = self.exec_interactive(id, cmd, false).await?;
        let mut out = ExecOutput::default();
        let ExecSession { id: exec_id, mut output, input } = session;
        drop(input);
        while let Some(chunk) = output.next().await {
            match chunk? {
                (LogStream::Stdout, b) => out.stdout.extend(b),
                (LogStream::Stderr, b) => out.stderr.extend(b),
            }
        }
        out.exit_code = self.exec_exit_code(&exec_id).await?.unwrap_or(-1);
        Ok(out)
    }

    async fn exec_interactive(&self, id: &str, cmd: &[String], tty: bool) -> Result<ExecSession, RuntimeError> {
        let docker = self.client().await?;
        let config = ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            cmd: Some(cmd.to_vec()),
            ..Default::default()
        };
        let created = docker.create_exec(id, config).await.map_err(self.api("exec create"))?;
        let options = StartExecOptions { detach: false, tty, ..Default::default() };
        match docker.start_exec(&created.id, Some(options)).await.map_err(self.api("exec start"))? {
            StartExecResults::Attached { output, input } => Ok(ExecSession {
                id: created.id,
                output: output
                    .map(|item| {
                        item.map(|o| match o {
                            LogOutput::StdErr { message } => (LogStream::Stderr, message.to_vec()),
                            LogOutput::StdOut { message }
                            | LogOutput::Console { message }
                            | LogOutput::StdIn { message } => (LogStream::Stdout, message.to_vec()),
                        })
                        .map_err(|e| RuntimeError::Api { op: "exec output", reason: e.to_string() })
                    })
                    .boxed(),
                input,
            }),
            StartExecResults::Detached => {
                Err(RuntimeError::Api { op: "exec start", reason: "exec started detached".into() })
            }
        }
    }

    async fn exec_resize(&self, exec_id: &str, height: u16, width: u16) -> Result<(), RuntimeError> {
        let options = ResizeExecOptions { h: i32::from(height), w: i32::from(width) };
        self.client().await?.resize_exec(exec_id, options).await.map_err(self.api("exec resize"))
    }

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
        let r = self.client().await?.inspect_exec(exec_id).await.map_err(self.api("exec inspect"))?;
        Ok(if r.running.unwrap_or(false) { None } else { r.exit_code })
    }

    async fn list_labelled(&self, label: &str, value: &str) -> Result<Vec<Listed>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{label}={value}")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let list = self.client().await?.list_containers(Some(options)).await.map_err(self.api("list"))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let name = c.names.as_ref().and_then(|n| n.first()).map(|n| n.trim_start_matches('/').to_string());
                Some(Listed {
                    id: c.id?,
                    name: name.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    created: c.created.unwrap_or(0),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::GpuRequest;

    #[test]
    fn image_references_split_into_name_and_tag() {
        assert_eq!(split_image("busybox"), ("busybox".into(), "latest".into()));
        assert_eq!(split_image("vllm/vllm-openai:v0.6"), ("vllm/vllm-openai".into(), "v0.6".into()));
        assert_eq!(split_image("registry:5000/x/y"), ("registry:5000/x/y".into(), "latest".into()));
        assert_eq!(split_image("registry:5000/x/y:1"), ("registry:5000/x/y".into(), "1".into()));
        assert_eq!(split_image("x@sha256:abc"), ("x".into(), "sha256:abc".into()));
    }

    #[test]
    fn gpu_requests_become_exact_device_requests() {
        let spec = |g: GpuRequest| {
            host_config(&ContainerSpec { gpus: Some(g), ..Default::default() }).device_requests.unwrap()
        };
        let uuids = spec(GpuRequest::Uuids(vec!["GPU-a".into(), "GPU-b".into()]));
        assert_eq!(uuids.len(), 1);
        assert_eq!(uuids[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(uuids[0].device_ids, Some(vec!["GPU-a".to_string(), "GPU-b".to_string()]));
        assert_eq!(uuids[0].capabilities, Some(vec![vec!["gpu".to_string()]]));
        assert_eq!(uuids[0].count, None, "exact devices, never a count");
        let all = spec(GpuRequest::Count(-1));
        assert_eq!((all[0].count, all[0].device_ids.clone()), (Some(-1), None));
        let cdi = spec(GpuRequest::Cdi(vec!["nvidia.com/gpu=GPU-a".into()]));
        assert_eq!(cdi[0].driver.as_deref(), Some("cdi"));
        assert_eq!(cdi[0].device_ids, Some(vec!["nvidia.com/gpu=GPU-a".to_string()]));
        let none = host_config(&ContainerSpec::default());
        assert!(none.device_requests.is_none() && none.runtime.is_none(), "no runtime switch, no request");
    }

    #[test]
    fn log_timestamps_are_split_off() {
        let r = split_timestamp(LogStream::Stdout, b"2026-01-02T03:04:05.000000001Z line 1\n");
        assert_eq!(r.ts, (1_767_323_045, 1));
        assert_eq!(r.bytes, b"line 1\n");
        let r = split_timestamp(LogStream::Stderr, b"no timestamp here");
        assert_eq!(r.ts, (0, 0));
    }
}
