//! RecoverTask and InspectTask.

use std::sync::Arc;

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::types::{DriverState, NomadTask};

use super::TaskHandle;

impl Driver {
    /// RecoverTask: reattach from the stored handle alone (idempotent).
    pub async fn recover_task(&self, task: NomadTask, driver_state: &[u8]) -> Result<(), DriverError> {
        if self.tasks().get(&task.id).is_some() {
            return Ok(());
        }
        let state = DriverState::decode(driver_state).map_err(DriverError::BadHandle)?;
        let rt = self.runtime();
        if rt.inspect(&state.container_id).await?.is_none() {
            return Err(DriverError::ContainerGone { id: task.id.clone(), container: state.container_id.clone() });
        }
        let started_at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(state.started_at_ns);
        self.image_ref(&state.image);
        let keys = state.in_use_keys();
        if !keys.is_empty() {
            // The marker may have aged while the plugin was down: renew it now,
            // not at the next refresh round.
            let (c, id, node, commit) = (
                self.config().hf_cache.clone(),
                task.id.clone(),
                task.node_name.clone(),
                state.revision.clone().unwrap_or_default(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                crate::driver::cache::mark_in_use(&c, &id, &node, &keys, &commit, false)
            })
            .await;
        }
        let entry = self.track(task, state, started_at, false).await;
        tracing::info!(task_id = %entry.task.id, container = %entry.state.container_id, "task recovered");
        Ok(())
    }

    /// InspectTask.
    pub fn inspect_task(&self, id: &str) -> Result<Arc<TaskHandle>, DriverError> {
        self.entry(id)
    }
}
