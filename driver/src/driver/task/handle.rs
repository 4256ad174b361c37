//! A tracked task and the background loops it owns: the exit watcher, the
//! cpuset follower and the log-relay supervisor (readiness is in `readiness`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::driver::Driver;
use crate::logrelay;
use crate::types::ExitResult;

use super::TaskHandle;

/// How often a running container's cgroup OOM counter is read (an OOM kill of
/// the container's main process is also in Docker's own state; the counter
/// catches kills of other processes while the container runs on).
const OOM_POLL: Duration = Duration::from_secs(1);
/// How often the relay supervisor looks for the task's relay.
const RELAY_CHECK: Duration = Duration::from_secs(1);

impl TaskHandle {
    /// Waits for the container to stop, watching the cgroup's OOM counter while it
    /// runs (the cgroup disappears with the container), then publishes the result.
    pub(super) async fn watch_exit(self: Arc<Self>, driver: Driver, tx: watch::Sender<Option<ExitResult>>) {
        let rt = driver.runtime();
        let id = self.state.container_id.clone();
        // The one counter file this host has for the container, found once.
        let files: Vec<PathBuf> =
            crate::runtime::cgroup::oom_files(&id).into_iter().filter(|f| f.exists()).take(1).collect();
        let mut oom_kills = crate::runtime::cgroup::read_oom_kills(&files).unwrap_or(0);
        let mut wait = Box::pin(rt.wait(&id));
        let waited = loop {
            tokio::select! {
                r = &mut wait => break r,
                _ = tokio::time::sleep(OOM_POLL) => {
                    if let Some(n) = crate::runtime::cgroup::read_oom_kills(&files) {
                        oom_kills = oom_kills.max(n);
                    }
                }
                _ = self.cancel.cancelled() => return,
            }
        };
        if let Some(n) = crate::runtime::cgroup::read_oom_kills(&files) {
            oom_kills = oom_kills.max(n);
        }
        let result = match waited {
            Err(e) => ExitResult { exit_code: -1, err: Some(e.to_string()), ..Default::default() },
            Ok(()) => match rt.inspect(&id).await {
                Ok(Some(s)) => {
                    // Docker reports an int; clamp (never wrap) so a failure cannot read as 0.
                    let code = i32::try_from(s.exit_code).unwrap_or(if s.exit_code < 0 { i32::MIN } else { i32::MAX });
                    ExitResult {
                        exit_code: code,
                        signal: if (129..=192).contains(&code) { code - 128 } else { 0 },
                        oom_killed: s.oom_killed || oom_kills > 0,
                        err: Some(s.error).filter(|e| !e.is_empty()),
                    }
                }
                Ok(None) => {
                    ExitResult { exit_code: -1, err: Some("container was removed".into()), ..Default::default() }
                }
                Err(e) => ExitResult { exit_code: -1, err: Some(e.to_string()), ..Default::default() },
            },
        };
        *self.completed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
        tracing::info!(task_id = %self.task.id, exit_code = result.exit_code, oom = result.oom_killed, "task exited");
        let _ = tx.send(Some(result));
    }

    /// A task on Nomad's shared cores: its container's cpuset follows the cores
    /// Nomad leaves to the shared partition (`drivers/docker/cpuset.go`).
    pub(super) async fn follow_cpuset(self: Arc<Self>, driver: Driver) {
        let nomad_cgroup = PathBuf::from(&self.task.cpuset_cgroup);
        let mut previous: Option<String> = None;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(crate::runtime::cgroup::CPUSET_SYNC) => {}
            }
            if self.exit_result().is_some() {
                return;
            }
            let Some(files) = driver.cgroup_of(&self).await else { continue };
            if let Some(v) = crate::runtime::cgroup::sync_cpuset(&nomad_cgroup, &files, previous.as_deref()) {
                tracing::debug!(task_id = %self.task.id, cpus = %v.trim(), "cpuset follows Nomad's shared cores");
                previous = Some(v);
            }
        }
    }

    /// Keeps a log relay alive for a running task: if the relay dies (killed, OOM),
    /// a new one resumes from the position file. It stops once the container has
    /// exited and no relay is left (the last one delivered everything and left).
    pub(super) async fn supervise_relay(self: Arc<Self>, driver: Driver) {
        let container = self.state.container_id.clone();
        // The relay we last saw: checking that one process costs one read, where a
        // scan of /proc costs one per process of the node, every second, per task.
        let mut known = Some(self.state.relay_pid).filter(|p| *p > 0);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
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
                tracing::warn!(task_id = %self.task.id, "log relay is gone, starting a new one");
            }
            match driver.spawn_relay(&self.state) {
                Ok(mut child) if running => {
                    tokio::spawn(async move {
                        let _ = child.wait().await;
                    });
                }
                Ok(mut child) => {
                    let _ = child.wait().await;
                    return;
                }
                Err(e) => tracing::error!(task_id = %self.task.id, error = %e, "cannot restart the log relay"),
            }
        }
    }
}
