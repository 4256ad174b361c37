//! StartTask: the cache gate, the plan, the GPU check, the image, create and
//! start, then tracking (log relay, exit watcher, readiness).

use std::time::SystemTime;

use crate::config::TaskConfig;
use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan::{self, NodeFacts, Plan};
use crate::runtime::{GpuRequest, RuntimeError};
use crate::types::{DriverState, NomadTask, Started};

impl Driver {
    /// StartTask: plan, pull, create, start, relay logs, watch exit and readiness.
    pub async fn start_task(&self, task: NomadTask, cfg: TaskConfig) -> Result<Started, DriverError> {
        if self.tasks().get(&task.id).is_some() {
            return Err(DriverError::TaskExists { id: task.id.clone() });
        }
        let id = task.id.clone();
        // A start can take long (a prewarm, a big pull): keep the in-use marker
        // fresh until the task is tracked and the regular refresh takes over.
        let keys = crate::driver::cache::in_use_keys(&cfg);
        let refresher = (!keys.is_empty()).then(|| {
            let (cache, tid, node) = (self.config().hf_cache.clone(), task.id.clone(), task.node_name.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(crate::driver::IN_USE_REFRESH).await;
                    let (c, t, n, k) = (cache.clone(), tid.clone(), node.clone(), keys.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        crate::driver::cache::mark_in_use(&c, &t, &n, &k, "", false)
                    })
                    .await;
                }
            })
        });
        let r = self.start_task_inner(task, cfg).await;
        if let Some(h) = refresher {
            h.abort();
        }
        if r.is_err() {
            let cache = self.config().hf_cache.clone();
            let _ = tokio::task::spawn_blocking(move || crate::driver::cache::clear_in_use(&cache, &id)).await;
        }
        r
    }

    async fn start_task_inner(&self, task: NomadTask, cfg: TaskConfig) -> Result<Started, DriverError> {
        let plugin = self.config();
        let facts = self.cache_gate(&task, &cfg).await?;
        let plan = plan::plan(&cfg, &task, &plugin, &facts).map_err(DriverError::TaskConfig)?;
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
            Err(RuntimeError::Conflict { .. }) => {
                // A container of a previous attempt with the same name: replace it.
                rt.remove(&plan.spec.name, true).await?;
                rt.create(&plan.spec).await?
            }
            Err(e) => return Err(e.into()),
        };
        if let Err(source) = rt.start(&id).await {
            let _ = rt.remove(&id, true).await;
            return Err(DriverError::StartFailed { image: plan.spec.image.clone(), source });
        }
        let started_at = SystemTime::now();
        let relay_state = self.relay_state_path(&task);
        let state = DriverState {
            container_id: id.clone(),
            container_name: plan.spec.name.clone(),
            image: plan.spec.image.clone(),
            engine: cfg.engine,
            model: cfg.model.clone(),
            models: facts.ollama_models.clone(),
            revision: Some(facts.resolved_revision.clone().unwrap_or_else(|| cfg.revision.clone())),
            started_at_ns: started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .try_into()
                .unwrap_or(u64::MAX),
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
            let (handle, driver, readiness) = (entry.clone(), self.clone(), cfg.readiness.clone());
            let (preload, keep) = (facts.ollama_models.clone(), super::ollama::KeepAlive::for_task(&handle.task));
            tokio::spawn(async move {
                let ready = handle.await_ready(&driver, &url, readiness.interval.0, readiness.timeout.0).await;
                if ready && !preload.is_empty() {
                    handle.preload_ollama(driver, url, preload, keep, readiness.timeout.0).await;
                }
            });
        }
        Ok(Started { state: entry.state.clone(), port_map: plan.port_map })
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
}
