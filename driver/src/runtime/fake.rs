//! A scripted container runtime for unit tests of the task core: containers
//! live in memory, every call is logged, and a test decides what the engine
//! does (a name conflict on create, a failed start, a signal the server
//! ignores, a container that exits at once or disappears). The Docker tests in
//! `integration/` prove the real engine; this one makes the core's logic cheap
//! to test.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::watch;

use super::{
    ContainerRuntime, ContainerSpec, ContainerState, ExecOutput, ExecSession, Listed, LogRecord, PullProgress,
    RuntimeError, RuntimeInfo, Stats,
};
use crate::config::RegistryAuth;

/// What the fake engine does; set by the test before (or while) it runs.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// Creates that fail with a name conflict before one succeeds.
    pub conflicts: usize,
    /// Starts fail with this error.
    pub start_error: Option<RuntimeError>,
    /// Signals the container ignores (e.g. `SIGTERM` for a server that hangs on it).
    pub ignored_signals: BTreeSet<String>,
    /// The container exits with this code as soon as it starts.
    pub exit_at_start: Option<i64>,
    /// Images that are present (all of them when empty).
    pub images: Option<BTreeSet<String>>,
}

#[derive(Debug)]
struct Container {
    name: String,
    labels: BTreeMap<String, String>,
    state: watch::Sender<ContainerState>,
}

#[derive(Debug, Default)]
struct Inner {
    script: Script,
    calls: Vec<String>,
    containers: BTreeMap<String, Container>,
    next_id: u64,
}

/// The fake engine. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    inner: Arc<Mutex<Inner>>,
}

impl FakeRuntime {
    /// A fake with `script`.
    pub fn new(script: Script) -> Self {
        let fake = FakeRuntime::default();
        fake.lock().script = script;
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self, call: String) {
        self.lock().calls.push(call);
    }

    /// Every call so far, as `op arg…`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Changes the script of a running fake.
    pub fn script(&self, edit: impl FnOnce(&mut Script)) {
        edit(&mut self.lock().script);
    }

    /// Ids of the containers that exist.
    pub fn containers(&self) -> Vec<String> {
        self.lock().containers.keys().cloned().collect()
    }

    /// Makes a container exit with `code`, as if its server stopped by itself.
    pub fn exit(&self, id: &str, code: i64) {
        if let Some(c) = self.lock().containers.get(id) {
            c.state.send_modify(|s| {
                s.running = false;
                s.exit_code = code;
            });
        }
    }

    /// Removes a container behind the driver's back.
    pub fn vanish(&self, id: &str) {
        self.lock().containers.remove(id);
    }

    fn find(&self, id_or_name: &str) -> Option<String> {
        let inner = self.lock();
        inner
            .containers
            .iter()
            .find(|(id, c)| id.as_str() == id_or_name || c.name == id_or_name)
            .map(|(id, _)| id.clone())
    }

    fn state_of(&self, id: &str) -> Result<watch::Receiver<ContainerState>, RuntimeError> {
        let key = self.find(id).ok_or_else(|| RuntimeError::NotFound { id: id.into() })?;
        Ok(self.lock().containers[&key].state.subscribe())
    }
}

fn signal_number(signal: &str) -> i64 {
    signal.parse::<nix::sys::signal::Signal>().map_or(15, |s| s as i64)
}

#[async_trait::async_trait]
impl ContainerRuntime for FakeRuntime {
    fn endpoint(&self) -> &str {
        "fake://"
    }

    async fn info(&self, _: Duration) -> Result<RuntimeInfo, RuntimeError> {
        self.log("info".into());
        Ok(RuntimeInfo { version: "fake".into(), api_version: "1.0".into() })
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.log(format!("image_present {image}"));
        Ok(self.lock().script.images.as_ref().is_none_or(|i| i.contains(image)))
    }

    async fn pull(
        &self,
        image: &str,
        _: Option<&RegistryAuth>,
        _: Duration,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), RuntimeError> {
        self.log(format!("pull {image}"));
        progress(PullProgress { layers: 1, layers_done: 1, bytes_done: 1, bytes_total: 1 });
        if let Some(images) = self.lock().script.images.as_mut() {
            images.insert(image.into());
        }
        Ok(())
    }

    async fn remove_image(&self, image: &str) -> Result<bool, RuntimeError> {
        self.log(format!("remove_image {image}"));
        Ok(true)
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.log(format!("create {}", spec.name));
        let mut inner = self.lock();
        if inner.script.conflicts > 0 || inner.containers.values().any(|c| c.name == spec.name) {
            inner.script.conflicts = inner.script.conflicts.saturating_sub(1);
            return Err(RuntimeError::Conflict { name: spec.name.clone(), reason: "name in use".into() });
        }
        inner.next_id += 1;
        let id = format!("fake{:060}", inner.next_id);
        let state = watch::channel(ContainerState { pid: 0, ..Default::default() }).0;
        inner.containers.insert(id.clone(), Container { name: spec.name.clone(), labels: spec.labels.clone(), state });
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.log(format!("start {id}"));
        let (error, exit) = {
            let inner = self.lock();
            (inner.script.start_error.clone(), inner.script.exit_at_start)
        };
        if let Some(e) = error {
            return Err(e);
        }
        let key = self.find(id).ok_or_else(|| RuntimeError::NotFound { id: id.into() })?;
        let inner = self.lock();
        inner.containers[&key].state.send_modify(|s| {
            s.running = exit.is_none();
            s.exit_code = exit.unwrap_or(0);
            s.status = if exit.is_some() { "exited" } else { "running" }.into();
        });
        Ok(())
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError> {
        self.log(format!("inspect {id}"));
        Ok(self.state_of(id).ok().map(|rx| rx.borrow().clone()))
    }

    async fn wait(&self, id: &str) -> Result<(), RuntimeError> {
        let mut rx = self.state_of(id)?;
        // Waits until the container has run and stopped, or is removed.
        let _ = rx.wait_for(|s| !s.running && !s.status.is_empty()).await;
        Ok(())
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.log(format!("kill {id} {signal}"));
        let ignored = self.lock().script.ignored_signals.contains(signal);
        let key = self.find(id).ok_or_else(|| RuntimeError::NotFound { id: id.into() })?;
        if !ignored {
            let inner = self.lock();
            inner.containers[&key].state.send_modify(|s| {
                if s.running {
                    s.running = false;
                    s.exit_code = 128 + signal_number(signal);
                }
            });
        }
        Ok(())
    }

    async fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        self.log(format!("remove {id} force={force}"));
        if let Some(key) = self.find(id) {
            let removed = self.lock().containers.remove(&key);
            // A waiter sees the container gone as stopped.
            if let Some(c) = removed {
                c.state.send_modify(|s| {
                    s.running = false;
                    s.status = "removed".into();
                });
            }
        }
        Ok(())
    }

    async fn logs(
        &self,
        _: &str,
        _: i64,
        _: bool,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError> {
        Ok(futures::stream::empty().boxed())
    }

    async fn log_tail(
        &self,
        id: &str,
        _: usize,
    ) -> Result<BoxStream<'static, Result<LogRecord, RuntimeError>>, RuntimeError> {
        self.log(format!("log_tail {id}"));
        let line = LogRecord { stream: super::LogStream::Stderr, ts: (0, 0), bytes: b"fake: bad weights\n".to_vec() };
        Ok(futures::stream::iter([Ok(line)]).boxed())
    }

    async fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        self.state_of(id)?;
        Ok(Stats { online_cpus: 1, ..Default::default() })
    }

    async fn exec(&self, id: &str, cmd: &[String]) -> Result<ExecOutput, RuntimeError> {
        self.log(format!("exec {id} {}", cmd.join(" ")));
        Ok(ExecOutput { stdout: cmd.join(" ").into_bytes(), stderr: Vec::new(), exit_code: 0 })
    }

    async fn exec_interactive(&self, id: &str, _: &[String], _: bool) -> Result<ExecSession, RuntimeError> {
        Err(RuntimeError::Api { op: "exec", reason: format!("the fake has no interactive exec ({id})") })
    }

    async fn exec_resize(&self, _: &str, _: u16, _: u16) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn exec_exit_code(&self, _: &str) -> Result<Option<i64>, RuntimeError> {
        Ok(Some(0))
    }

    async fn list_labelled(&self, label: &str, value: &str) -> Result<Vec<Listed>, RuntimeError> {
        self.log(format!("list {label}={value}"));
        let inner = self.lock();
        Ok(inner
            .containers
            .iter()
            .filter(|(_, c)| c.labels.get(label).map(String::as_str) == Some(value))
            .map(|(id, c)| Listed {
                id: id.clone(),
                name: id.clone(),
                state: "running".into(),
                labels: c.labels.clone(),
                created: 0,
            })
            .collect())
    }
}
