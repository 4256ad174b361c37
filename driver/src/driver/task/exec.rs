//! ExecTask, one-shot and interactive.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use tokio::io::AsyncWrite;

use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::runtime::{ContainerRuntime, ExecOutput, LogStream, RuntimeError};

/// An interactive exec (`nomad alloc exec`): write stdin, read output, resize
/// the terminal, then ask for the exit code.
pub struct ExecSession {
    runtime: Arc<dyn ContainerRuntime>,
    id: String,
    /// The command's stdin; shut it down to close it.
    pub stdin: Pin<Box<dyn AsyncWrite + Send>>,
    /// The command's stdout and stderr, in order.
    pub output: BoxStream<'static, Result<(LogStream, Vec<u8>), RuntimeError>>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A handle for resizing and for the exit code, usable while `stdin` and
/// `output` are moved elsewhere.
#[derive(Clone)]
pub struct ExecControl {
    runtime: Arc<dyn ContainerRuntime>,
    id: String,
}

impl std::fmt::Debug for ExecControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecControl").field("id", &self.id).finish_non_exhaustive()
    }
}

impl ExecSession {
    /// Splits off the control handle.
    pub fn control(&self) -> ExecControl {
        ExecControl { runtime: self.runtime.clone(), id: self.id.clone() }
    }
}

impl ExecControl {
    /// A new terminal size (clamped to what a terminal can be).
    pub async fn resize(&self, height: i32, width: i32) {
        let clamp = |v: i32| u16::try_from(v.clamp(1, 65535)).unwrap_or(u16::MAX);
        let _ = self.runtime.exec_resize(&self.id, clamp(height), clamp(width)).await;
    }

    /// The exit code once the command has ended; it may lag its output by a
    /// moment, so this waits up to a second for it (-1 if it never comes).
    pub async fn exit_code(&self) -> i64 {
        for _ in 0..50 {
            if let Ok(Some(code)) = self.runtime.exec_exit_code(&self.id).await {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        -1
    }
}

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

    /// Starts an interactive exec in the task's container.
    pub async fn exec_interactive(&self, id: &str, cmd: &[String], tty: bool) -> Result<ExecSession, DriverError> {
        if cmd.is_empty() {
            return Err(DriverError::BadRequest { message: "exec needs a command".into() });
        }
        let container = self.entry(id)?.state.container_id.clone();
        let runtime = self.runtime();
        let session = runtime.exec_interactive(&container, cmd, tty).await?;
        Ok(ExecSession { runtime, id: session.id, stdin: session.input, output: session.output })
    }
}
