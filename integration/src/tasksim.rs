//! The simulated Nomad client the task tests share: one plugin process with
//! its own data and cache dirs, Nomad's StartTask/WaitTask/DestroyTask calls,
//! and the containers of its allocations removed when it is dropped.

use std::time::Duration;

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest, TaskHandle, TaskState, WaitTaskRequest};

use crate::pluginhcl::PluginHcl;
use crate::sequence::{self, LiveDriver};
use crate::support::{binary, remove_containers_with_label, require_docker, standin_image, DRIVER_BIN};
use crate::task::{PreparedTask, TaskBuilder};

/// One simulated Nomad client with its own data dir and HF cache dir.
#[derive(Debug)]
pub struct Sim {
    pub live: LiveDriver,
    pub data: tempfile::TempDir,
    pub cache: tempfile::TempDir,
    _tmp: tempfile::TempDir,
    pub allocs: Vec<String>,
}

impl Sim {
    pub async fn start() -> Option<Sim> {
        Self::start_with("", &[]).await
    }

    pub async fn start_with(extra_config: &str, extra_env: &[(&str, &str)]) -> Option<Sim> {
        if !require_docker() {
            return None;
        }
        standin_image().unwrap();
        let (data, cache, tmp) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let hcl = PluginHcl::new(cache.path()).with("pull_activity_timeout = \"20s\"").with(extra_config).render();
        let mut env = vec![("TMPDIR", tmp.path().to_str().unwrap()), ("AIMODEL_LOG", "debug")];
        env.extend_from_slice(extra_env);
        let report = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap();
        Some(Sim { live: report.live, data, cache, _tmp: tmp, allocs: Vec::new() })
    }

    pub fn prepare(&mut self, b: &TaskBuilder) -> PreparedTask {
        self.allocs.push(b.alloc_id.clone());
        b.build(&self.live.task_schema, self.data.path()).unwrap()
    }

    pub async fn start_task(&mut self, b: &TaskBuilder) -> (PreparedTask, TaskHandle) {
        let t = self.prepare(b);
        let handle = self.start_prepared(&t).await;
        (t, handle)
    }

    /// StartTask of a prepared task (again, as Nomad's restart sends the same
    /// config), checking the answer as the client reads it.
    pub async fn start_prepared(&self, t: &PreparedTask) -> TaskHandle {
        let resp = self
            .live
            .process
            .driver()
            .start_task(StartTaskRequest { task: Some(t.config.clone()) })
            .await
            .unwrap_or_else(|e| panic!("StartTask failed: {e:?}"))
            .into_inner();
        // Nomad uses a network override for the task's port env and service
        // addresses (`client/serviceregistration/address.go`): only with an address.
        assert!(
            resp.network_override.as_ref().is_none_or(|n| !n.addr.is_empty()),
            "a network override without a driver address: {:?}",
            resp.network_override
        );
        let handle = resp.handle.expect("StartTask must return a handle");
        assert_eq!(handle.config.as_ref().expect("handle.config must be set").id, t.config.id);
        assert_eq!(handle.state, TaskState::Running as i32);
        handle
    }

    pub async fn wait(&self, id: &str) -> aimodel_proto::drivers::ExitResult {
        let mut d = self.live.process.driver();
        let r = d.wait_task(WaitTaskRequest { task_id: id.into() });
        tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("WaitTask hung")
            .unwrap()
            .into_inner()
            .result
            .unwrap()
    }

    pub async fn destroy(&self, id: &str) {
        self.live.process.driver().destroy_task(DestroyTaskRequest { task_id: id.into(), force: true }).await.unwrap();
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for a in &self.allocs {
            remove_containers_with_label(LABEL_ALLOC_ID, a);
        }
    }
}

pub fn custom(extra: &str) -> String {
    format!("engine = \"custom\"\nimage = \"{}\"\n{extra}\n", crate::support::STANDIN_IMAGE)
}

/// Reads an exec stream to its end: stdout bytes and the exit result.
pub async fn drain_exec(
    resp: &mut tonic::Streaming<aimodel_proto::drivers::ExecTaskStreamingResponse>,
) -> (Vec<u8>, Option<aimodel_proto::drivers::ExitResult>) {
    let (mut got, mut exited) = (Vec::new(), None);
    while let Some(m) = tokio::time::timeout(Duration::from_secs(20), resp.message()).await.unwrap().unwrap() {
        if let Some(o) = m.stdout {
            got.extend(o.data);
        }
        if m.exited {
            exited = m.result;
        }
    }
    (got, exited)
}

pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub fn docker_out(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).env("DOCKER_BUILDKIT", "0").output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
