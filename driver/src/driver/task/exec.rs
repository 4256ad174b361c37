//! ExecTask, one-shot and interactive.

use std::time::Duration;

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::runtime::ExecOutput;

impl Driver {
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

    /// The container id of a tracked task (for interactive exec).
    pub fn container_of(&self, id: &str) -> Result<String, DriverError> {
        Ok(self.entry(id)?.state.container_id.clone())
    }
}
