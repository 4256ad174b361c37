//! The task lifecycle in protocol order: StartTask, WaitTask, StopTask,
//! DestroyTask, RecoverTask, InspectTask, SignalTask, ExecTask, TaskStats.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{decode_task_config, TaskConfig};
use crate::driver::{Driver, TaskEvent};
use crate::engine::{self, NodeFacts, Plan};
use crate::error::DriverError;
use crate::logrelay::{self, RelayArgs};
use crate::readiness;
use crate::runtime::{ContainerRuntime, ExecOutput, GpuRequest, PullProgress, RuntimeError, Stats};
use crate::task::{DriverState, NomadTask};

/// How often a running container's cgroup OOM counter is read (an OOM kill of
/// the container's main process is also in Docker's own state; the counter
/// catches kills of other processes while the container runs on).
const OOM_POLL: Duration = Duration::from_secs(1);
/// How long StopTask waits after SIGKILL for the container to be gone.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// How often the relay supervisor looks for the task's relay.
const RELAY_CHECK: Duration = Duration::from_secs(1);
/// Log lines quoted in the event when a server dies while starting.
const LAST_LINES: usize = 10;
/// Bytes of those lines kept at most.
const LAST_BYTES: usize = 8 << 10;

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitResult {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    pub err: Option<String>,
}

/// A task this plugin instance tracks.
pub struct TaskEntry {
    pub task: NomadTask,
    pub state: DriverState,
    pub started_at: SystemTime,
    pub completed_at: Mutex<Option<SystemTime>>,
    exit: watch::Receiver<Option<ExitResult>>,
    /// Our own write ends of the log FIFOs, so logmon never sees EOF between relays.
    fifo_fds: Mutex<Vec<OwnedFd>>,
    cancel: CancellationToken,
    /// Where its counters are (`None` inside: not looked up yet).
    cgroup: Mutex<Option<Option<crate::cgroup::CgroupFiles>>>,
}

impl TaskEntry {
    /// The exit result, if the task has exited.
    pub fn exit_result(&self) -> Option<ExitResult> {
        self.exit.borrow().clone()
    }
}

/// The tasks tracked by this plugin process.
#[derive(Default, Clone)]
pub struct TaskStore {
    tasks: Arc<Mutex<HashMap<String, Arc<TaskEntry>>>>,
}

impl TaskStore {
    fn get(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn insert(&self, id: String, e: Arc<TaskEntry>) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(id, e);
    }

    fn remove(&self, id: &str) -> Option<Arc<TaskEntry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(id)
    }

    /// The Nomad node name tasks were started on, once a task has been seen.
    pub fn node_name(&self) -> Option<String> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.values().map(|e| e.task.node_name.clone()).find(|n| !n.is_empty())
    }

    /// The Nomad task of a tracked id.
    pub fn task(&self, id: &str) -> Option<NomadTask> {
        self.get(id).map(|e| e.task.clone())
    }

    /// Ids of tracked tasks.
    pub fn ids(&self) -> Vec<String> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }
}

/// What StartTask returns to Nomad.
pub struct Started {
    pub state: DriverState,
    pub port_map: BTreeMap<String, u16>,
}

/// A StatsSample with the rates Nomad wants.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskUsage {
    pub at: Option<SystemTime>,
    pub cpu_percent: f64,
    pub cpu_user_ms: f64,
    pub cpu_system_ms: f64,
    pub total_ticks: f64,
    pub raw: Stats,
    /// GPU uuid → (memory used by the task's processes, GPU utilisation percent).
    pub gpus: BTreeMap<String, (u64, u32)>,
}

impl Driver {
    fn event(&self, task: &NomadTask, message: String, annotations: &[(&str, String)]) {
        self.emit(TaskEvent {
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            at: SystemTime::now(),
            message,
            annotations: annotations.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect(),
        });
    }

    fn entry(&self, id: &str) -> Result<Arc<TaskEntry>, DriverError> {
        self.tasks().get(id).ok_or_else(|| DriverError::TaskNotFound { id: id.into() })
    }

    /// StartTask: plan, pull, create, start, relay logs, watch exit and readiness.
    pub async fn start_task(&self, task: NomadTask) -> Result<Started, DriverError> {
        if self.tasks().get(&task.id).is_some() {
            return Err(DriverError::TaskExists { id: task.id.clone() });
        }
        let id = task.id.clone();
        // A start can take long (a prewarm, a big pull): keep the in-use marker
        // fresh until the task is tracked and the regular refresh takes over.
        let refresher = match decode_task_config(&task.driver_config) {
            Ok(cfg) if crate::cache::uses_hf_cache(&cfg) => cfg.model.clone().map(|model| {
                let (cache, tid, node) = (self.config().hf_cache.clone(), task.id.clone(), task.node_name.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(crate::driver::IN_USE_REFRESH).await;
                        let (c, t, n, m) = (cache.clone(), tid.clone(), node.clone(), model.clone());
                        let _ =
                            tokio::task::spawn_blocking(move || crate::cache::mark_in_use(&c, &t, &n, &m, "", false))
                                .await;
                    }
                })
            }),
            _ => None,
        };
        let r = self.start_task_inner(task).await;
        if let Some(h) = refresher {
            h.abort();
        }
        if r.is_err() {
            let cache = self.config().hf_cache.clone();
            let _ = tokio::task::spawn_blocking(move || crate::cache::clear_in_use(&cache, &id)).await;
        }
        r
    }

    async fn start_task_inner(&self, task: NomadTask) -> Result<Started, DriverError> {
        let cfg = decode_task_config(&task.driver_config).map_err(DriverError::TaskConfig)?;
        let plugin = self.config();
        let facts = self.cache_gate(&task, &cfg).await?;
        let plan = engine::plan(&cfg, &task, &plugin, &facts).map_err(DriverError::TaskConfig)?;
        self.image_ref(&plan.spec.image);
        let image = plan.spec.image.clone();
        let r = self.launch(task, cfg, plan, facts).await;
        if r.is_err() {
            self.image_unref(&image);
        }
        r
    }

    async fn launch(
        &self,
        task: NomadTask,
        cfg: TaskConfig,
        plan: Plan,
        facts: NodeFacts,
    ) -> Result<Started, DriverError> {
        self.check_gpus(&task, &plan, &facts).await?;
        let rt = self.runtime();
        self.ensure_image(&task, &cfg, &plan, rt.as_ref()).await?;
        if !plan.load_flags.is_empty() {
            self.event(&task, format!("load strategy: {}", plan.load_flags.join(" ")), &[]);
        }

        let id = match rt.create(&plan.spec).await {
            Ok(id) => id,
            Err(RuntimeError::Api { reason, .. })
                if reason.contains("Conflict") || reason.contains("already in use") =>
            {
                // A container of a previous attempt with the same name: replace it.
                rt.remove(&plan.spec.name, true).await?;
                rt.create(&plan.spec).await?
            }
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = rt.start(&id).await {
            let _ = rt.remove(&id, true).await;
            return Err(DriverError::StartFailed { image: plan.spec.image.clone(), reason: e.to_string() });
        }
        let started_at = SystemTime::now();
        let relay_state = self.relay_state_path(&task);
        let state = DriverState {
            container_id: id.clone(),
            container_name: plan.spec.name.clone(),
            image: plan.spec.image.clone(),
            engine: cfg.engine.as_str().into(),
            model: cfg.model.clone(),
            revision: Some(facts.resolved_revision.clone().unwrap_or_else(|| cfg.revision.clone())),
            started_at_ns: started_at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64,
            stdout_path: task.stdout_path.clone(),
            stderr_path: task.stderr_path.clone(),
            logs_disabled: task.logs_disabled() || self.config().disable_log_collection,
            relay_pid: 0,
            relay_state: relay_state.display().to_string(),
            port_map: plan.port_map.clone(),
            readiness_url: plan.readiness_url.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
        };
        let entry = self.track(task, state, started_at, true).await;
        tracing::info!(task_id = %entry.task.id, container = %id, image = %entry.state.image, "task started");
        if let Some(url) = plan.readiness_url.clone() {
            tokio::spawn(run_readiness(
                self.clone(),
                entry.clone(),
                url,
                cfg.readiness.interval.0,
                cfg.readiness.timeout.0,
            ));
        }
        Ok(Started { state: entry.state.clone(), port_map: plan.port_map })
    }

    /// The completeness gate: with `offline = true` a model must be complete in
    /// the cache before anything is created; the revision is pinned to a commit.
    async fn cache_gate(&self, task: &NomadTask, cfg: &TaskConfig) -> Result<NodeFacts, DriverError> {
        let plugin = self.config();
        let cache_cfg = plugin.hf_cache.clone();
        let on_nfs = crate::cache::on_nfs(&cache_cfg);
        let mut facts = NodeFacts { cache_on_nfs: on_nfs, resolved_revision: None, model_bytes: None };
        let (Some(model), true) = (&cfg.model, crate::cache::uses_hf_cache(cfg)) else { return Ok(facts) };
        // In use before the check: an agent's gc that reads the markers after
        // this cannot evict what the check is about to accept.
        let (c, id, node, m) = (cache_cfg.clone(), task.id.clone(), task.node_name.clone(), model.clone());
        let _ = tokio::task::spawn_blocking(move || crate::cache::mark_in_use(&c, &id, &node, &m, "", true)).await;
        let checked = check_cached(&cache_cfg, model, &cfg.revision).await?;
        if checked.complete {
            let commit = checked.commit.clone().unwrap_or_default();
            facts.resolved_revision = Some(commit.clone());
            facts.model_bytes = Some(checked.bytes);
            let (c, id, node, m, k) =
                (cache_cfg.clone(), task.id.clone(), task.node_name.clone(), model.clone(), commit.clone());
            let _ = tokio::task::spawn_blocking(move || crate::cache::mark_in_use(&c, &id, &node, &m, &k, false)).await;
            self.event(
                task,
                format!(
                    "model {model}@{} is {commit}: {} files, {:.2} GB, complete in the cache",
                    cfg.revision,
                    checked.files,
                    checked.bytes as f64 / 1e9,
                ),
                &[("commit", commit.clone())],
            );
            return Ok(facts);
        }
        let hub = crate::cache::hub_dir(&cache_cfg);
        let message = checked.failure_message(&hub);
        if cfg.prewarm {
            self.event(task, format!("{message}; prewarm = true: fetching it with aimodel-agent"), &[]);
            self.prewarm_with_agent(task, model, &cfg.revision, &hub).await?;
            let again = check_cached(&cache_cfg, model, &cfg.revision).await?;
            if again.complete {
                let commit = again.commit.clone().unwrap_or_default();
                facts.resolved_revision = Some(commit.clone());
                facts.model_bytes = Some(again.bytes);
                self.event(
                    task,
                    format!(
                        "model {model}@{} is {commit}: prewarmed, {:.2} GB",
                        cfg.revision,
                        again.bytes as f64 / 1e9
                    ),
                    &[("commit", commit)],
                );
                return Ok(facts);
            }
            return Err(DriverError::ModelIncomplete { message: again.failure_message(&hub) });
        }
        if !cfg.offline {
            // The engine may download what is missing itself.
            self.event(task, format!("{message}; offline = false, the engine will download it"), &[]);
            return Ok(facts);
        }
        self.event(task, message.clone(), &[]);
        Err(DriverError::ModelIncomplete { message })
    }

    /// GPUs Nomad assigned must exist here; a model that cannot fit their
    /// memory gets a warning event (it may still run, e.g. quantised or offloaded).
    async fn check_gpus(&self, task: &NomadTask, plan: &Plan, facts: &NodeFacts) -> Result<(), DriverError> {
        let ids = match &plan.spec.gpus {
            Some(GpuRequest::Uuids(ids)) => ids.clone(),
            Some(GpuRequest::Cdi(names)) => {
                names.iter().map(|n| n.trim_start_matches("nvidia.com/gpu=").to_string()).collect()
            }
            _ => return Ok(()),
        };
        let Some(monitor) = self.gpus().await else { return Ok(()) };
        let known = monitor.known_uuids();
        if known.is_empty() {
            return Ok(());
        }
        let unknown: Vec<&String> = ids.iter().filter(|u| !known.contains(*u)).collect();
        if !unknown.is_empty() {
            return Err(DriverError::BadRequest {
                message: format!("GPUs {unknown:?} assigned to the task are not on this node (NVML reports {known:?})"),
            });
        }
        if let Some(bytes) = facts.model_bytes {
            let memory: u64 = monitor.memory_of(&ids) << 20;
            if memory > 0 && bytes > memory {
                self.event(
                    task,
                    format!(
                        "warning: the model's weights ({:.1} GB) exceed the memory of the assigned GPUs ({:.1} GB)",
                        bytes as f64 / 1e9,
                        memory as f64 / 1e9
                    ),
                    &[],
                );
            }
        }
        Ok(())
    }

    async fn ensure_image(
        &self,
        task: &NomadTask,
        cfg: &TaskConfig,
        plan: &Plan,
        rt: &dyn ContainerRuntime,
    ) -> Result<(), DriverError> {
        let image = &plan.spec.image;
        if rt.image_present(image).await? {
            return Ok(());
        }
        let plugin = self.config();
        self.event(task, format!("Downloading image {image}"), &[("image", image.clone())]);
        let every = plugin.pull_progress_interval.0;
        let last = Mutex::new(Instant::now());
        let me = self.clone();
        let t = task.clone();
        let report = move |p: PullProgress| {
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            if l.elapsed() >= every {
                *l = Instant::now();
                me.event(
                    &t,
                    format!(
                        "Pulling image: {}/{} layers, {:.1}/{:.1} MB",
                        p.layers_done,
                        p.layers,
                        p.bytes_done as f64 / 1e6,
                        p.bytes_total as f64 / 1e6
                    ),
                    &[],
                );
            }
        };
        // The task's own credentials go with its image; the plugin's only to the
        // registry they name (never to whatever host a job author picks).
        let plugin_auth = plugin
            .auth
            .as_ref()
            .filter(|a| a.server_address.as_deref().is_some_and(|s| crate::registry::credentials_apply(s, image)));
        if cfg.auth.is_none() && plugin.auth.is_some() && plugin_auth.is_none() {
            tracing::debug!(image = %image, "the plugin's registry credentials are for another registry: pulling without");
        }
        let auth = cfg.auth.as_ref().or(plugin_auth);
        rt.pull(image, auth, plugin.pull_activity_timeout.0, &report).await?;
        self.event(task, format!("Downloaded image {image}"), &[]);
        Ok(())
    }

    fn relay_state_path(&self, task: &NomadTask) -> PathBuf {
        let dir =
            if task.alloc_dir.is_empty() { std::env::temp_dir() } else { Path::new(&task.alloc_dir).join(&task.name) };
        dir.join(format!(".aimodel-logrelay-{}.pos", task.run_suffix()))
    }

    /// Starts watchers and the log relay for a task and records it.
    async fn track(
        &self,
        task: NomadTask,
        mut state: DriverState,
        started_at: SystemTime,
        fresh: bool,
    ) -> Arc<TaskEntry> {
        let mut fds = Vec::new();
        if !state.logs_disabled {
            let running = logrelay::find_relay(&state.container_id);
            match running {
                Some(pid) if !fresh => state.relay_pid = pid,
                _ => match self.spawn_relay(&state) {
                    Ok(child) => {
                        state.relay_pid = child.id().map_or(0, |p| p as i32);
                        tokio::spawn(async move {
                            let mut child = child;
                            let _ = child.wait().await;
                        });
                    }
                    Err(e) => {
                        tracing::error!(task_id = %task.id, error = %e, "cannot start the log relay");
                        self.event(&task, format!("log relay failed to start: {e}"), &[]);
                    }
                },
            }
            for p in [&state.stdout_path, &state.stderr_path] {
                let path = PathBuf::from(p);
                if let Ok(Ok(fd)) =
                    tokio::task::spawn_blocking(move || logrelay::open_fifo_writer(&path, Duration::from_secs(5))).await
                {
                    fds.push(fd);
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let entry = Arc::new(TaskEntry {
            task,
            state,
            started_at,
            completed_at: Mutex::new(None),
            exit: rx,
            fifo_fds: Mutex::new(fds),
            cancel: CancellationToken::new(),
            cgroup: Mutex::new(None),
        });
        self.tasks().insert(entry.task.id.clone(), entry.clone());
        tokio::spawn(run_exit_watch(self.clone(), entry.clone(), tx));
        if !entry.task.cpuset_cgroup.is_empty() && entry.task.cpuset_cpus.is_empty() {
            tokio::spawn(run_cpuset_sync(self.clone(), entry.clone()));
        }
        if !entry.state.logs_disabled {
            tokio::spawn(run_relay_supervisor(self.clone(), entry.clone()));
        }
        entry
    }

    fn spawn_relay(&self, state: &DriverState) -> std::io::Result<tokio::process::Child> {
        let exe = std::env::current_exe()?;
        let args = RelayArgs {
            endpoint: self.config().endpoint.clone(),
            container: state.container_id.clone(),
            stdout: state.stdout_path.clone().into(),
            stderr: state.stderr_path.clone().into(),
            state: state.relay_state.clone().into(),
        };
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg(logrelay::SUBCOMMAND)
            .args(args.to_args())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group: a signal to the plugin's group must not reach it.
            .process_group(0);
        cmd.spawn()
    }

    /// WaitTask: blocks until the task exits.
    pub async fn wait_task(&self, id: &str) -> Result<ExitResult, DriverError> {
        let entry = self.entry(id)?;
        let mut rx = entry.exit.clone();
        let stop = self.shutdown_token();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return Ok(r);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err(DriverError::TaskNotFound { id: id.into() });
                },
                _ = stop.cancelled() => return Err(DriverError::ShuttingDown),
            }
        }
    }

    /// StopTask: the signal, then SIGKILL after `timeout`; returns once the container is gone.
    pub async fn stop_task(&self, id: &str, timeout: Duration, signal: &str) -> Result<(), DriverError> {
        let entry = self.entry(id)?;
        if entry.exit_result().is_some() {
            return Ok(());
        }
        let rt = self.runtime();
        // No kill_signal in the job: the image's STOPSIGNAL, as `docker stop` (the
        // docker driver's ContainerStop) would send, else SIGTERM.
        let signal = if signal.is_empty() {
            let own = rt.inspect(&entry.state.container_id).await.ok().flatten().and_then(|s| s.stop_signal);
            own.and_then(|s| normalize_signal(&s).ok()).unwrap_or_else(|| "SIGTERM".to_string())
        } else {
            normalize_signal(signal)?
        };
        rt.kill(&entry.state.container_id, &signal).await?;
        if wait_exit(&entry, timeout).await {
            return Ok(());
        }
        tracing::info!(task_id = %id, ?timeout, "task did not stop in time, killing");
        rt.kill(&entry.state.container_id, "SIGKILL").await?;
        if wait_exit(&entry, KILL_WAIT).await {
            Ok(())
        } else {
            Err(DriverError::StopTimeout { id: id.into() })
        }
    }

    /// `prewarm = true`: runs `aimodel-agent prewarm` (the same fetch the node
    /// agent does: leases, verification, ordered publishing) for a missing
    /// model, from the plugin's `HF_ENDPOINT` with the task's `HF_TOKEN` if it
    /// sets one, and turns its progress lines into task events.
    async fn prewarm_with_agent(
        &self,
        task: &NomadTask,
        model: &str,
        revision: &str,
        hub: &Path,
    ) -> Result<(), DriverError> {
        use tokio::io::AsyncBufReadExt;
        let bin = agent_binary().ok_or_else(|| DriverError::Cache {
            message:
                "prewarm = true but aimodel-agent was not found (beside the plugin, on PATH, or AIMODEL_AGENT_BIN)"
                    .into(),
        })?;
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--cache").arg(hub).args(["prewarm", "--", &format!("{model}@{revision}")]);
        // The hub is the operator's (the plugin's own HF_ENDPOINT), never the
        // task's: a job must not fill the shared cache from a server of its
        // choosing under a real repo's name. The task may bring its token.
        if let Some(v) = task.env.get("HF_TOKEN") {
            cmd.env("HF_TOKEN", v);
        }
        // The cache's owner writes the cache: the node agent may run as a user of
        // its own, and must be able to resume, replace and collect what this
        // prewarm leaves (the plugin itself is root).
        if nix::unistd::geteuid().is_root() {
            if let Ok(m) = std::fs::metadata(&self.config().hf_cache.host_path) {
                use std::os::unix::fs::MetadataExt;
                if m.uid() != 0 {
                    cmd.uid(m.uid()).gid(m.gid());
                }
            }
        }
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| DriverError::Cache { message: format!("{}: {e}", bin.display()) })?;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            self.event(task, format!("prewarm: {line}"), &[]);
            last = line;
        }
        let out = child.wait_with_output().await.map_err(|e| DriverError::Cache { message: e.to_string() })?;
        if !out.status.success() {
            return Err(DriverError::Cache { message: format!("prewarm of {model}@{revision} failed: {last}") });
        }
        let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
        tracing::info!(task_id = %task.id, model = %model, summary = %summary, "prewarmed");
        self.event(task, format!("prewarm: {summary}"), &[]);
        Ok(())
    }

    /// Rewrites the in-use markers of running tasks that use a cached model,
    /// so the agents' gc on every node keeps seeing them as live.
    pub async fn refresh_in_use(&self) {
        let cache = self.config().hf_cache.clone();
        let live: Vec<(String, String, String, String)> = self
            .tasks()
            .ids()
            .into_iter()
            .filter_map(|id| self.tasks().get(&id))
            .filter(|e| e.exit_result().is_none() && e.state.engine != "ollama")
            .filter_map(|e| {
                let model = e.state.model.clone()?;
                Some((e.task.id.clone(), e.task.node_name.clone(), model, e.state.revision.clone().unwrap_or_default()))
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for (id, node, model, commit) in live {
                // Touching last-used too: a model in use is the most recently used.
                crate::cache::mark_in_use(&cache, &id, &node, &model, &commit, true);
            }
        })
        .await;
    }

    /// DestroyTask: free everything; unknown ids are fine.
    pub async fn destroy_task(&self, id: &str, force: bool) -> Result<(), DriverError> {
        let Some(entry) = self.tasks().get(id) else { return self.destroy_untracked(id).await };
        if entry.exit_result().is_none() && !force {
            return Err(DriverError::StillRunning { id: id.into() });
        }
        let rt = self.runtime();
        if self.config().gc.container {
            rt.remove(&entry.state.container_id, true).await?;
        } else if entry.exit_result().is_none() {
            rt.kill(&entry.state.container_id, "SIGKILL").await?;
        }
        entry.cancel.cancel();
        entry.fifo_fds.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if entry.state.model.is_some() {
            let (cache, tid) = (self.config().hf_cache.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || crate::cache::clear_in_use(&cache, &tid)).await;
        }
        let _ = std::fs::remove_file(&entry.state.relay_state);
        if self.tasks().remove(id).is_some() {
            self.image_unref(&entry.state.image);
        }
        tracing::info!(task_id = %id, "task destroyed");
        Ok(())
    }

    /// DestroyTask of a task this process does not track. The client sends it
    /// after a failed RecoverTask, before starting the task again
    /// (`client/allocrunner/taskrunner/task_runner.go` `restoreHandle`): the
    /// container the lost handle described must go, or it keeps its GPUs and
    /// ports beside the new one. Containers are found by the task-id label.
    async fn destroy_untracked(&self, id: &str) -> Result<(), DriverError> {
        let rt = self.runtime();
        let listed = rt.list_labelled(engine::LABEL_TASK_ID, id).await?;
        for c in listed {
            if c.labels.get(engine::LABEL_MANAGED).map(String::as_str) != Some("true") {
                continue;
            }
            let container = c.id;
            rt.remove(&container, true).await?;
            tracing::info!(task_id = %id, container = %container, "removed the container of an untracked task");
        }
        let (cache, tid) = (self.config().hf_cache.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || crate::cache::clear_in_use(&cache, &tid)).await;
        Ok(())
    }

    /// RecoverTask: reattach from the stored handle alone (idempotent).
    pub async fn recover_task(&self, task: NomadTask, driver_state: &[u8]) -> Result<(), DriverError> {
        if self.tasks().get(&task.id).is_some() {
            return Ok(());
        }
        let state = DriverState::decode(driver_state).map_err(|reason| DriverError::BadHandle { reason })?;
        let rt = self.runtime();
        if rt.inspect(&state.container_id).await?.is_none() {
            return Err(DriverError::ContainerGone { id: task.id.clone(), container: state.container_id.clone() });
        }
        let started_at = crate::timefmt::from_parts(
            (state.started_at_ns / 1_000_000_000) as i64,
            (state.started_at_ns % 1_000_000_000) as u32,
        );
        self.image_ref(&state.image);
        if let Some(model) = state.model.clone().filter(|_| state.engine != "ollama") {
            // The marker may have aged while the plugin was down: renew it now,
            // not at the next refresh round.
            let (c, id, node, commit) = (
                self.config().hf_cache.clone(),
                task.id.clone(),
                task.node_name.clone(),
                state.revision.clone().unwrap_or_default(),
            );
            let _ =
                tokio::task::spawn_blocking(move || crate::cache::mark_in_use(&c, &id, &node, &model, &commit, false))
                    .await;
        }
        let entry = self.track(task, state, started_at, false).await;
        tracing::info!(task_id = %entry.task.id, container = %entry.state.container_id, "task recovered");
        Ok(())
    }

    /// InspectTask.
    pub fn inspect_task(&self, id: &str) -> Result<Arc<TaskEntry>, DriverError> {
        self.entry(id)
    }

    /// SignalTask with a name such as `SIGHUP` (or `HUP`).
    pub async fn signal_task(&self, id: &str, signal: &str) -> Result<(), DriverError> {
        let entry = self.entry(id)?;
        let signal = normalize_signal(signal)?;
        self.runtime().kill(&entry.state.container_id, &signal).await?;
        Ok(())
    }

    /// ExecTask: runs a command to completion, bounded by `timeout` (zero: none).
    pub async fn exec_task(&self, id: &str, cmd: &[String], timeout: Duration) -> Result<ExecOutput, DriverError> {
        let entry = self.entry(id)?;
        if cmd.is_empty() {
            return Err(DriverError::BadRequest { message: "exec needs a command".into() });
        }
        let rt = self.runtime();
        let call = rt.exec(&entry.state.container_id, cmd);
        if timeout.is_zero() {
            return Ok(call.await?);
        }
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(DriverError::ExecTimeout { timeout }),
        }
    }

    /// The task's cgroup files, found once from its container's init process;
    /// `None` when there is no readable cgroup (e.g. a remote engine).
    async fn cgroup_of(&self, entry: &TaskEntry) -> Option<crate::cgroup::CgroupFiles> {
        if let Some(found) = entry.cgroup.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return found;
        }
        let pid = self.runtime().inspect(&entry.state.container_id).await.ok().flatten().map_or(0, |s| s.pid);
        let found =
            crate::cgroup::locate(pid, Path::new("/sys/fs/cgroup")).filter(|f| crate::cgroup::sample(f).is_some());
        *entry.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = Some(found.clone());
        found
    }

    /// The container id of a tracked task (for interactive exec).
    pub fn container_of(&self, id: &str) -> Result<String, DriverError> {
        Ok(self.entry(id)?.state.container_id.clone())
    }

    /// One usage sample; `prev` gives the CPU rate.
    pub async fn task_usage(&self, id: &str, prev: Option<&TaskUsage>) -> Result<TaskUsage, DriverError> {
        let entry = self.entry(id)?;
        let from_cgroup = if stats_from_docker() { None } else { self.cgroup_of(&entry).await };
        let raw = match from_cgroup {
            Some(files) => match crate::cgroup::sample(&files) {
                Some(s) => s,
                None => self.runtime().stats(&entry.state.container_id).await?,
            },
            None => self.runtime().stats(&entry.state.container_id).await?,
        };
        let mut u = TaskUsage { at: Some(SystemTime::now()), raw, ..Default::default() };
        if let Some(p) = prev {
            let (cpu, sys) = cpu_percents(&p.raw, &raw);
            u.cpu_percent = cpu;
            (u.cpu_system_ms, u.cpu_user_ms) = sys;
        }
        // Nomad's ticks (MHz-scaled): percent of the node's compute, per core, as
        // the docker driver reports them. The node's compute is the task's share
        // divided by the share's fraction (`LinuxResources.percent_ticks`).
        let cores = f64::from(raw.online_cpus.max(1));
        let node_ticks = if entry.task.percent_ticks > 0.0 && entry.task.cpu_shares > 0 {
            entry.task.cpu_shares as f64 / entry.task.percent_ticks
        } else {
            cpu_mhz() * cores
        };
        u.total_ticks = u.cpu_percent / 100.0 * node_ticks / cores;
        if let Some(monitor) = self.gpus().await {
            let assigned = engine::assigned_gpus(&entry.task);
            if !assigned.is_empty() {
                let pids = container_pids(&entry.state.container_id);
                u.gpus = monitor.usage_of(&assigned, &pids).await;
            }
        }
        Ok(u)
    }
}

/// TaskStats from Docker's stats API instead of the cgroup files
/// (`AIMODEL_STATS_SOURCE=docker`, for comparisons), read once.
fn stats_from_docker() -> bool {
    static DOCKER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DOCKER.get_or_init(|| std::env::var("AIMODEL_STATS_SOURCE").as_deref() == Ok("docker"))
}

/// Nomad's CPU figures between two samples (`drivers/docker/util/stats_posix.go`):
/// the container's share of the host's CPU time times the cores, in percent;
/// kernel and user time as percentages of the container's own CPU time times the
/// cores (that is what Nomad calls system/user mode). Returns (percent, (system, user)).
pub fn cpu_percents(prev: &Stats, now: &Stats) -> (f64, (f64, f64)) {
    let cores = f64::from(now.online_cpus.max(1));
    let pct = |new: u64, old: u64, new_total: u64, old_total: u64| {
        let (n, d) = (new.saturating_sub(old), new_total.saturating_sub(old_total));
        if n == 0 || d == 0 {
            0.0
        } else {
            n as f64 / d as f64 * cores * 100.0
        }
    };
    let percent = pct(now.cpu_total_ns, prev.cpu_total_ns, now.system_cpu_ns, prev.system_cpu_ns);
    let system = pct(now.cpu_kernel_ns, prev.cpu_kernel_ns, now.cpu_total_ns, prev.cpu_total_ns);
    let user = pct(now.cpu_user_ns, prev.cpu_user_ns, now.cpu_total_ns, prev.cpu_total_ns);
    (percent, (system, user))
}

/// Accepts `SIGHUP`, `HUP`, `sighup` or a number; answers Docker's spelling.
pub fn normalize_signal(s: &str) -> Result<String, DriverError> {
    let up = s.trim().to_ascii_uppercase();
    let name = if up.starts_with("SIG") { up.clone() } else { format!("SIG{up}") };
    if let Ok(n) = up.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|sig| sig.as_str().to_string())
            .map_err(|_| DriverError::BadSignal { signal: s.into() });
    }
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig.as_str().to_string())
        .map_err(|_| DriverError::BadSignal { signal: s.into() })
}

async fn wait_exit(entry: &TaskEntry, timeout: Duration) -> bool {
    let mut rx = entry.exit.clone();
    tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await.is_ok_and(|r| r.is_ok())
}

fn cpu_mhz() -> f64 {
    static MHZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *MHZ.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("cpu MHz")).and_then(|l| l.split(':').nth(1)?.trim().parse().ok())
            })
            .unwrap_or(1000.0)
    })
}

/// Host pids of a container's processes, from its cgroup (v2 and v1 layouts).
fn container_pids(container: &str) -> std::collections::BTreeSet<u32> {
    let root = Path::new("/sys/fs/cgroup");
    [
        format!("system.slice/docker-{container}.scope"),
        format!("docker/{container}"),
        format!("pids/docker/{container}"),
        format!("memory/docker/{container}"),
        format!("cpu/docker/{container}"),
    ]
    .iter()
    .find_map(|d| std::fs::read_to_string(root.join(d).join("cgroup.procs")).ok())
    .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
    .unwrap_or_default()
}

/// The cgroup files that count OOM kills for a container (v2 and v1 layouts).
fn oom_files(container: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    vec![
        root.join(format!("system.slice/docker-{container}.scope/memory.events")),
        root.join(format!("docker/{container}/memory.events")),
        root.join(format!("memory/docker/{container}/memory.oom_control")),
        root.join(format!("memory/system.slice/docker-{container}.scope/memory.oom_control")),
    ]
}

fn read_oom_kills(files: &[PathBuf]) -> Option<u64> {
    files.iter().find_map(|f| {
        let text = std::fs::read_to_string(f).ok()?;
        text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
    })
}

/// Waits for the container to stop, watching the cgroup's OOM counter while it
/// runs (the cgroup disappears with the container), then publishes the result.
async fn run_exit_watch(driver: Driver, entry: Arc<TaskEntry>, tx: watch::Sender<Option<ExitResult>>) {
    let rt = driver.runtime();
    let id = entry.state.container_id.clone();
    // The one counter file this host has for the container, found once.
    let files: Vec<PathBuf> = oom_files(&id).into_iter().filter(|f| f.exists()).take(1).collect();
    let mut oom_kills = read_oom_kills(&files).unwrap_or(0);
    let mut wait = Box::pin(rt.wait(&id));
    let waited = loop {
        tokio::select! {
            r = &mut wait => break r,
            _ = tokio::time::sleep(OOM_POLL) => {
                if let Some(n) = read_oom_kills(&files) {
                    oom_kills = oom_kills.max(n);
                }
            }
            _ = entry.cancel.cancelled() => return,
        }
    };
    if let Some(n) = read_oom_kills(&files) {
        oom_kills = oom_kills.max(n);
    }
    let result = match waited {
        Err(e) => ExitResult { exit_code: -1, err: Some(e.to_string()), ..Default::default() },
        Ok(()) => match rt.inspect(&id).await {
            Ok(Some(s)) => {
                let code = s.exit_code as i32;
                ExitResult {
                    exit_code: code,
                    signal: if (129..=192).contains(&code) { code - 128 } else { 0 },
                    oom_killed: s.oom_killed || oom_kills > 0,
                    err: Some(s.error).filter(|e| !e.is_empty()),
                }
            }
            Ok(None) => ExitResult { exit_code: -1, err: Some("container was removed".into()), ..Default::default() },
            Err(e) => ExitResult { exit_code: -1, err: Some(e.to_string()), ..Default::default() },
        },
    };
    *entry.completed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
    tracing::info!(task_id = %entry.task.id, exit_code = result.exit_code, oom = result.oom_killed, "task exited");
    let _ = tx.send(Some(result));
}

/// A task on Nomad's shared cores: its container's cpuset follows the cores
/// Nomad leaves to the shared partition (`drivers/docker/cpuset.go`).
async fn run_cpuset_sync(driver: Driver, entry: Arc<TaskEntry>) {
    let nomad_cgroup = PathBuf::from(&entry.task.cpuset_cgroup);
    let mut previous: Option<String> = None;
    loop {
        tokio::select! {
            _ = entry.cancel.cancelled() => return,
            _ = tokio::time::sleep(crate::cgroup::CPUSET_SYNC) => {}
        }
        if entry.exit_result().is_some() {
            return;
        }
        let Some(files) = driver.cgroup_of(&entry).await else { continue };
        if let Some(v) = crate::cgroup::sync_cpuset(&nomad_cgroup, &files, previous.as_deref()) {
            tracing::debug!(task_id = %entry.task.id, cpus = %v.trim(), "cpuset follows Nomad's shared cores");
            previous = Some(v);
        }
    }
}

/// Keeps a log relay alive for a running task: if the relay dies (killed, OOM),
/// a new one resumes from the position file. It stops once the container has
/// exited and no relay is left (the last one delivered everything and left).
async fn run_relay_supervisor(driver: Driver, entry: Arc<TaskEntry>) {
    let container = entry.state.container_id.clone();
    // The relay we last saw: checking that one process costs one read, where a
    // scan of /proc costs one per process of the node, every second, per task.
    let mut known = Some(entry.state.relay_pid).filter(|p| *p > 0);
    loop {
        tokio::select! {
            _ = entry.cancel.cancelled() => return,
            _ = tokio::time::sleep(RELAY_CHECK) => {}
        }
        if known.is_some_and(|pid| logrelay::is_relay(pid, &container)) {
            continue;
        }
        known = logrelay::find_relay(&container);
        if known.is_some() {
            continue;
        }
        // No relay. A running container gets a new one that resumes from the
        // position file; a stopped one gets one last relay that delivers what is
        // left (nothing, if the previous one finished) and leaves.
        let running = match driver.runtime().inspect(&container).await {
            Ok(Some(s)) => s.running,
            _ => return,
        };
        if running {
            tracing::warn!(task_id = %entry.task.id, "log relay is gone, starting a new one");
        }
        match driver.spawn_relay(&entry.state) {
            Ok(mut child) if running => {
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
            }
            Ok(mut child) => {
                let _ = child.wait().await;
                return;
            }
            Err(e) => tracing::error!(task_id = %entry.task.id, error = %e, "cannot restart the log relay"),
        }
    }
}

/// Polls the readiness URL, emitting "waiting for model server" and "model
/// server ready after N s", or the last log lines if the server dies first.
async fn run_readiness(driver: Driver, entry: Arc<TaskEntry>, url: String, interval: Duration, timeout: Duration) {
    let started = Instant::now();
    driver.event(&entry.task, format!("waiting for model server at {url}"), &[("url", url.clone())]);
    loop {
        if let Some(exit) = entry.exit_result() {
            let tail = last_log_lines(&driver, &entry.state.container_id).await;
            driver.event(
                &entry.task,
                format!("model server exited with code {} while starting; last lines:\n{tail}", exit.exit_code),
                &[("exit_code", exit.exit_code.to_string())],
            );
            return;
        }
        if let Ok(code) = readiness::probe(&url, interval.max(Duration::from_secs(1))).await {
            if (200..300).contains(&code) {
                let secs = started.elapsed().as_secs_f64();
                driver.event(
                    &entry.task,
                    format!("model server ready after {secs:.1} s"),
                    &[("ready_after_seconds", format!("{secs:.1}"))],
                );
                return;
            }
        }
        if started.elapsed() > timeout {
            driver.event(&entry.task, format!("model server not ready after {timeout:?}"), &[]);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = entry.cancel.cancelled() => return,
        }
    }
}

/// The last lines of a container's log: Docker is asked for the tail only, and
/// at most `LAST_BYTES` are kept (a server may print one endless line).
async fn last_log_lines(driver: &Driver, container: &str) -> String {
    use futures::StreamExt;
    let Ok(mut s) = driver.runtime().log_tail(container, LAST_LINES).await else { return String::new() };
    let mut text = Vec::new();
    while let Some(Ok(rec)) = s.next().await {
        text.extend(rec.bytes);
        if text.len() > 2 * LAST_BYTES {
            text.drain(..text.len() - LAST_BYTES);
        }
    }
    if text.len() > LAST_BYTES {
        text.drain(..text.len() - LAST_BYTES);
    }
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LAST_LINES)..].join("\n")
}

/// The quick completeness check of `model@revision`, off the async threads, under the probe timeout.
async fn check_cached(
    cache: &crate::config::HfCacheConfig,
    model: &str,
    revision: &str,
) -> Result<crate::cache::ModelCheck, DriverError> {
    let (c, m, r, t) = (cache.clone(), model.to_string(), revision.to_string(), cache.probe_timeout.0);
    tokio::task::spawn_blocking(move || crate::cache::check_model(&c, &m, &r, t))
        .await
        .map_err(|e| DriverError::Cache { message: e.to_string() })?
        .map_err(|message| DriverError::Cache { message })
}

/// The agent binary: `AIMODEL_AGENT_BIN`, else beside the plugin (`plugin_dir`), else on PATH.
fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AIMODEL_AGENT_BIN") {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe().ok()?.parent()?.join("aimodel-agent");
    if beside.is_file() {
        return Some(beside);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("aimodel-agent")).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_figures_are_nomads_percentages() {
        let prev = Stats { cpu_total_ns: 1_000, system_cpu_ns: 10_000, online_cpus: 4, ..Stats::default() };
        // 1000 ns of container CPU in 4000 ns of host CPU on 4 cores: one core, 100 %;
        // 750 user / 250 kernel of that: 300 % and 100 % (Nomad's scale: times the cores).
        let now = Stats {
            cpu_total_ns: 2_000,
            cpu_user_ns: 750,
            cpu_kernel_ns: 250,
            system_cpu_ns: 14_000,
            online_cpus: 4,
            ..Stats::default()
        };
        let (percent, (system, user)) = cpu_percents(&prev, &now);
        assert!((percent - 100.0).abs() < 1e-9, "{percent}");
        assert!((user - 300.0).abs() < 1e-9 && (system - 100.0).abs() < 1e-9, "{user} {system}");
        assert_eq!(cpu_percents(&now, &now).0, 0.0, "no time passed: no division by zero");
    }

    #[test]
    fn signals_are_normalised() {
        assert_eq!(normalize_signal("SIGHUP").unwrap(), "SIGHUP");
        assert_eq!(normalize_signal("hup").unwrap(), "SIGHUP");
        assert_eq!(normalize_signal("9").unwrap(), "SIGKILL");
        assert!(normalize_signal("SIGBOGUS").is_err());
        assert!(normalize_signal("").is_err());
    }

    #[test]
    fn oom_counters_are_read_from_v1_and_v2_files() {
        let dir = std::env::temp_dir().join(format!("aimodel-oom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v2 = dir.join("memory.events");
        std::fs::write(&v2, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        let v1 = dir.join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert_eq!(read_oom_kills(&[dir.join("missing"), v2.clone()]), Some(1));
        assert_eq!(read_oom_kills(&[v1]), Some(2));
        assert_eq!(read_oom_kills(&[dir.join("missing")]), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
