//! The tasks this plugin tracks, one file per operation family: `start`
//! (StartTask) with the cache `gate`, `control` (WaitTask, StopTask,
//! SignalTask, DestroyTask), `recover` (RecoverTask, InspectTask), `exec`,
//! `stats`, the `ollama` gate and preload; a [`TaskHandle`] owns its background loops (`handle`, `readiness`).

mod control;
mod exec;
mod gate;
mod handle;
mod ollama;
pub mod readiness;
mod recover;
mod start;
mod stats;
#[cfg(test)]
mod tests;

pub use control::normalize_signal;
pub use stats::cpu_percents;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::logrelay::{self, RelayArgs};
use crate::types::{DriverState, ExitResult, NomadTask, TaskEvent};

/// A task this plugin instance tracks; it owns its background loops, which
/// end with its cancellation token (DestroyTask) or the container.
pub struct TaskHandle {
    pub task: NomadTask,
    pub state: DriverState,
    pub started_at: SystemTime,
    pub completed_at: Mutex<Option<SystemTime>>,
    exit: watch::Receiver<Option<ExitResult>>,
    /// Our own write ends of the log FIFOs, so logmon never sees EOF between relays.
    fifo_fds: Mutex<Vec<OwnedFd>>,
    cancel: CancellationToken,
    /// Where its counters are (`None` inside: not looked up yet).
    cgroup: Mutex<Option<Option<crate::runtime::cgroup::CgroupFiles>>>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("task", &self.task.id).field("state", &self.state).finish_non_exhaustive()
    }
}

impl TaskHandle {
    /// The exit result, if the task has exited.
    pub fn exit_result(&self) -> Option<ExitResult> {
        self.exit.borrow().clone()
    }
}

/// The tasks tracked by this plugin process.
#[derive(Default, Clone)]
pub struct TaskStore {
    tasks: Arc<Mutex<HashMap<String, Arc<TaskHandle>>>>,
}

impl std::fmt::Debug for TaskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskStore").field("ids", &self.ids()).finish()
    }
}

impl TaskStore {
    fn get(&self, id: &str) -> Option<Arc<TaskHandle>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn insert(&self, id: String, e: Arc<TaskHandle>) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(id, e);
    }

    fn remove(&self, id: &str) -> Option<Arc<TaskHandle>> {
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

impl Driver {
    pub(crate) fn event(&self, task: &NomadTask, message: String, annotations: &[(&str, String)]) {
        self.emit(TaskEvent {
            task_id: task.id.clone(),
            alloc_id: task.alloc_id.clone(),
            task_name: task.name.clone(),
            at: SystemTime::now(),
            message,
            annotations: annotations.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect(),
        });
    }

    pub(crate) fn entry(&self, id: &str) -> Result<Arc<TaskHandle>, DriverError> {
        self.tasks().get(id).ok_or_else(|| DriverError::TaskNotFound { id: id.into() })
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
    ) -> Arc<TaskHandle> {
        let mut fds = Vec::new();
        if !state.logs_disabled {
            let running = logrelay::find_relay(&state.container_id);
            match running {
                Some(pid) if !fresh => state.relay_pid = pid,
                _ => match self.spawn_relay(&state) {
                    Ok(child) => {
                        state.relay_pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
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
        let entry = Arc::new(TaskHandle {
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
        tokio::spawn(entry.clone().watch_exit(self.clone(), tx));
        if !entry.task.cpuset_cgroup.is_empty() && entry.task.cpuset_cpus.is_empty() {
            tokio::spawn(entry.clone().follow_cpuset(self.clone()));
        }
        if !entry.state.logs_disabled {
            tokio::spawn(entry.clone().supervise_relay(self.clone()));
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
}
