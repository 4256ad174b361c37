//! WaitTask, StopTask, SignalTask and DestroyTask.

use std::time::Duration;

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan;
use crate::types::ExitResult;

use super::TaskHandle;

/// How long StopTask waits after SIGKILL for the container to be gone.
const KILL_WAIT: Duration = Duration::from_secs(30);

impl Driver {
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

    /// SignalTask with a name such as `SIGHUP` (or `HUP`).
    pub async fn signal_task(&self, id: &str, signal: &str) -> Result<(), DriverError> {
        let entry = self.entry(id)?;
        let signal = normalize_signal(signal)?;
        self.runtime().kill(&entry.state.container_id, &signal).await?;
        Ok(())
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
        if !entry.state.in_use_keys().is_empty() {
            let (cache, tid) = (self.config().hf_cache.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || crate::driver::cache::clear_in_use(&cache, &tid)).await;
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
        let listed = rt.list_labelled(plan::LABEL_TASK_ID, id).await?;
        for c in listed {
            if c.labels.get(plan::LABEL_MANAGED).map(String::as_str) != Some("true") {
                continue;
            }
            let container = c.id;
            rt.remove(&container, true).await?;
            tracing::info!(task_id = %id, container = %container, "removed the container of an untracked task");
        }
        let (cache, tid) = (self.config().hf_cache.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || crate::driver::cache::clear_in_use(&cache, &tid)).await;
        Ok(())
    }
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

async fn wait_exit(entry: &TaskHandle, timeout: Duration) -> bool {
    let mut rx = entry.exit.clone();
    tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await.is_ok_and(|r| r.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_normalised() {
        assert_eq!(normalize_signal("SIGHUP").unwrap(), "SIGHUP");
        assert_eq!(normalize_signal("hup").unwrap(), "SIGHUP");
        assert_eq!(normalize_signal("9").unwrap(), "SIGKILL");
        assert!(normalize_signal("SIGBOGUS").is_err());
        assert!(normalize_signal("").is_err());
    }
}
