//! TaskStats: one usage sample from the cgroup files (or Docker), with the
//! rates and ticks Nomad wants.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan;
use crate::runtime::Stats;
use crate::types::TaskUsage;

use super::TaskHandle;

impl Driver {
    /// The TaskStats stream: a sample every `interval` (the first one, taken
    /// now, gives the base of the CPU rate and an error for an unknown task);
    /// it ends when the task is gone (Nomad re-calls after an interval), at
    /// shutdown, or when the receiver is dropped.
    pub async fn stats_stream(
        &self,
        id: &str,
        interval: Duration,
    ) -> Result<tokio::sync::mpsc::Receiver<TaskUsage>, DriverError> {
        let first = self.task_usage(id, None).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (driver, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            let stop = driver.shutdown_token();
            let mut prev = first;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                match driver.task_usage(&id, Some(&prev)).await {
                    Ok(u) => {
                        if tx.send(u.clone()).await.is_err() {
                            return;
                        }
                        prev = u;
                    }
                    Err(e) => {
                        tracing::debug!(task_id = %id, error = %e, "stats stream ends");
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// The task's cgroup files, found once from its container's init process;
    /// `None` when there is no readable cgroup (e.g. a remote engine).
    pub(crate) async fn cgroup_of(&self, entry: &TaskHandle) -> Option<crate::runtime::cgroup::CgroupFiles> {
        if let Some(found) = entry.cgroup.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return found;
        }
        let pid = self.runtime().inspect(&entry.state.container_id).await.ok().flatten().map_or(0, |s| s.pid);
        let found = crate::runtime::cgroup::locate(pid, Path::new("/sys/fs/cgroup"))
            .filter(|f| crate::runtime::cgroup::sample(f).is_some());
        *entry.cgroup.lock().unwrap_or_else(|p| p.into_inner()) = Some(found.clone());
        found
    }

    /// One usage sample; `prev` gives the CPU rate.
    pub async fn task_usage(&self, id: &str, prev: Option<&TaskUsage>) -> Result<TaskUsage, DriverError> {
        let entry = self.entry(id)?;
        let from_cgroup = if stats_from_docker() { None } else { self.cgroup_of(&entry).await };
        let raw = match from_cgroup {
            Some(files) => match crate::runtime::cgroup::sample(&files) {
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
            let assigned = plan::assigned_gpus(&entry.task);
            if !assigned.is_empty() {
                let pids = crate::runtime::cgroup::container_pids(&entry.state.container_id);
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
}
