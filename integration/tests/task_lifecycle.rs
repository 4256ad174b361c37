//! The task lifecycle against the real Docker engine, driven the way a Nomad
//! client drives it, with the local stand-in image (there is no registry).

use std::time::{Duration, Instant};

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence::{self, LiveDriver};
use aimodel_integration::support::{
    binary, containers_with_label, remove_containers_with_label, require_docker, standin_image, DRIVER_BIN,
};
use aimodel_integration::task::{free_port, stored_handle, PreparedTask, TaskBuilder};
use aimodel_proto::drivers::{
    exec_task_streaming_request::Setup, DestroyTaskRequest, ExecTaskRequest, ExecTaskStreamingIoOperation,
    ExecTaskStreamingRequest, InspectTaskRequest, RecoverTaskRequest, SignalTaskRequest, StartTaskRequest,
    StopTaskRequest, TaskHandle, TaskState, TaskStatsRequest, WaitTaskRequest,
};
use tonic::Code;

/// One simulated Nomad client with its own data dir and HF cache dir.
struct Sim {
    live: LiveDriver,
    data: tempfile::TempDir,
    _cache: tempfile::TempDir,
    _tmp: tempfile::TempDir,
    allocs: Vec<String>,
}

impl Sim {
    async fn start() -> Option<Sim> {
        Self::start_with("", &[]).await
    }

    async fn start_with(extra_config: &str, extra_env: &[(&str, &str)]) -> Option<Sim> {
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
        Some(Sim { live: report.live, data, _cache: cache, _tmp: tmp, allocs: Vec::new() })
    }

    fn prepare(&mut self, b: &TaskBuilder) -> PreparedTask {
        self.allocs.push(b.alloc_id.clone());
        b.build(&self.live.task_schema, self.data.path()).unwrap()
    }

    async fn start_task(&mut self, b: &TaskBuilder) -> (PreparedTask, TaskHandle) {
        let t = self.prepare(b);
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
        (t, handle)
    }

    async fn wait(&self, id: &str) -> aimodel_proto::drivers::ExitResult {
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

    async fn destroy(&self, id: &str) {
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

fn custom(extra: &str) -> String {
    format!("engine = \"custom\"\nimage = \"{}\"\n{extra}\n", aimodel_integration::support::STANDIN_IMAGE)
}

#[tokio::test]
async fn model_server_stand_in_runs_as_a_task() {
    let Some(mut sim) = Sim::start().await else { return };
    let port = free_port();
    let cfg = custom("port = \"http\"\nreadiness {\n  path = \"/health\"\n  interval = \"200ms\"\n}\n");
    let b = TaskBuilder::new("server", &cfg).port("http", port, 0).env("STANDIN_HEALTH_DELAY_MS", "1500");
    let (t, _handle) = sim.start_task(&b).await;
    let id = t.config.id.clone();
    sim.live.wait_event(&id, "waiting for model server", Duration::from_secs(10)).await.unwrap();
    let ready = sim.live.wait_event(&id, "model server ready after", Duration::from_secs(20)).await.unwrap();
    assert!(ready.timestamp.is_some());

    let body = http_get(port, "/v1/models").await;
    assert!(body.contains("\"object\":\"list\""), "{body}");
    let out = t.stdout.as_ref().unwrap();
    out.wait_for(Duration::from_secs(10), |t| t.contains("listening on 0.0.0.0:")).await.unwrap();
    out.wait_for(Duration::from_secs(10), |t| t.contains("request GET /v1/models")).await.unwrap();

    let inspect = sim.live.process.driver().inspect_task(InspectTaskRequest { task_id: id.clone() }).await.unwrap();
    let status = inspect.into_inner().task.unwrap();
    assert_eq!(status.state, TaskState::Running as i32);
    assert!(status.started_at.is_some() && status.completed_at.is_some());

    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest {
            task_id: id.clone(),
            timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
            signal: "SIGTERM".into(),
        })
        .await
        .unwrap();
    let exit = sim.wait(&id).await;
    assert!(!exit.oom_killed);
    sim.destroy(&id).await;
    assert!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty(), "container left behind");
    // Destroy is idempotent, for unknown ids too.
    sim.destroy(&id).await;
    sim.destroy("no/such/task").await;
}

/// Reads an exec stream to its end: stdout bytes and the exit result.
async fn drain_exec(
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

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn plugin_crash_loses_and_duplicates_no_log_line() {
    let Some(mut sim) = Sim::start().await else { return };
    let n = 2500;
    let b = TaskBuilder::new("counter", &custom(""))
        .env("STANDIN_COUNT", &n.to_string())
        .env("STANDIN_INTERVAL_MS", "2")
        .env("STANDIN_EXIT", "3");
    let (t, handle) = sim.start_task(&b).await;
    let id = t.config.id.clone();
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(20), |t| t.contains("line 200\n")).await.unwrap();

    // kill -9 the plugin mid-stream, then Nomad re-dispenses and recovers.
    let launch = sim.live.launch.clone();
    let msgpack = sim.live.msgpack_config.clone();
    let live = std::mem::replace(&mut sim.live, sequence::long_lived(&launch, msgpack.clone(), "0.1.0").await.unwrap());
    live.crash().await.unwrap();
    let stored = stored_handle(&handle);
    assert!(stored.config.as_ref().unwrap().msgpack_driver_config.is_empty());
    let recover = RecoverTaskRequest { task_id: String::new(), handle: Some(stored) };
    sim.live.process.driver().recover_task(recover.clone()).await.unwrap();
    // Idempotent.
    sim.live.process.driver().recover_task(recover).await.unwrap();

    let exit = sim.wait(&id).await;
    assert_eq!(exit.exit_code, 3);
    sim.destroy(&id).await;
    let text = out.wait_for(Duration::from_secs(30), |_| out.at_eof()).await.unwrap();
    // The stand-in's own banner line aside, only numbered lines are expected.
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("standin starting")).collect();
    let want: Vec<String> = (1..=n).map(|i| format!("line {i}")).collect();
    let missing: Vec<&String> = want.iter().filter(|w| !lines.contains(&w.as_str())).take(5).collect();
    assert!(missing.is_empty(), "lost lines, e.g. {missing:?}");
    assert_eq!(lines.len(), n, "duplicated lines: {} lines for {n}", lines.len());
    assert_eq!(lines, want.iter().map(String::as_str).collect::<Vec<_>>(), "lines out of order");
    let err = t.stderr.clone().unwrap().text();
    assert!(err.contains("progress 2500"), "stderr: {err}");
}

#[tokio::test]
async fn oom_kill_is_reported_and_sigkill_is_not() {
    let Some(mut sim) = Sim::start().await else { return };
    let mut b = TaskBuilder::new("hog", &custom("")).env("STANDIN_ALLOC_MB", "200");
    b.memory_mb = 32;
    let (t, _) = sim.start_task(&b).await;
    let exit = sim.wait(&t.config.id).await;
    assert!(exit.oom_killed, "{exit:?}");
    sim.destroy(&t.config.id).await;

    let b = TaskBuilder::new("victim", &custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]"));
    let (t, _) = sim.start_task(&b).await;
    let id = t.config.id.clone();
    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest { task_id: id.clone(), timeout: None, signal: "SIGKILL".into() })
        .await
        .unwrap();
    let exit = sim.wait(&id).await;
    assert!(!exit.oom_killed, "{exit:?}");
    assert_eq!(exit.signal, 9, "{exit:?}");
    sim.destroy(&id).await;
}

#[tokio::test]
async fn stop_honours_signal_and_timeout() {
    let Some(mut sim) = Sim::start().await else { return };
    let trap = |sig: &str, action: &str| {
        custom(&format!(
            "entrypoint = [\"/bin/sh\"]\nargs = [\"-c\", \"trap '{action}' {sig}; echo trap-$((1+1)); while true; do sleep 0.1; done\"]"
        ))
    };
    // The requested signal is the one delivered.
    let (t, _) = sim.start_task(&TaskBuilder::new("usr1", &trap("USR1", "exit 7"))).await;
    t.stdout.as_ref().unwrap().wait_for(Duration::from_secs(10), |s| s.contains("trap-2")).await.unwrap();
    let started = Instant::now();
    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest {
            task_id: t.config.id.clone(),
            timeout: Some(prost_types::Duration { seconds: 20, nanos: 0 }),
            signal: "SIGUSR1".into(),
        })
        .await
        .unwrap();
    assert_eq!(sim.wait(&t.config.id).await.exit_code, 7);
    assert!(started.elapsed() < Duration::from_secs(15), "the trap should have ended it long before the timeout");
    sim.destroy(&t.config.id).await;

    // A container that ignores SIGTERM is killed after the timeout.
    let (t, _) = sim.start_task(&TaskBuilder::new("stubborn", &trap("TERM", ""))).await;
    t.stdout.as_ref().unwrap().wait_for(Duration::from_secs(10), |s| s.contains("trap-2")).await.unwrap();
    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest {
            task_id: t.config.id.clone(),
            timeout: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            signal: "SIGTERM".into(),
        })
        .await
        .unwrap();
    let exit = sim.wait(&t.config.id).await;
    assert_eq!(exit.exit_code, 137, "{exit:?}");
    assert_eq!(exit.signal, 9);
    sim.destroy(&t.config.id).await;
}

#[tokio::test]
async fn signal_exec_and_stats() {
    let Some(mut sim) = Sim::start().await else { return };
    let cfg = custom(
        "entrypoint = [\"/bin/sh\"]\nargs = [\"-c\", \"trap 'echo got-$((0+1))' HUP; echo up-$((1+1)); while true; do sleep 0.1; done\"]",
    );
    let (t, _) = sim.start_task(&TaskBuilder::new("shell", &cfg)).await;
    let id = t.config.id.clone();
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("up-2")).await.unwrap();
    let d = sim.live.process.driver();

    d.clone().signal_task(SignalTaskRequest { task_id: id.clone(), signal: "SIGHUP".into() }).await.unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("got-1")).await.unwrap();
    let bad = d.clone().signal_task(SignalTaskRequest { task_id: id.clone(), signal: "SIGNOPE".into() }).await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);

    let exec = |cmd: &[&str], timeout: Option<u64>| ExecTaskRequest {
        task_id: id.clone(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout: timeout.map(|ms| prost_types::Duration { seconds: 0, nanos: (ms * 1_000_000) as i32 }),
    };
    let r = d.clone().exec_task(exec(&["/bin/sh", "-c", "echo out; echo err >&2; exit 4"], None)).await.unwrap();
    let r = r.into_inner();
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    assert_eq!(r.result.unwrap().exit_code, 4);
    let slow = d.clone().exec_task(exec(&["/bin/sleep", "5"], Some(300))).await.unwrap_err();
    assert_eq!(slow.code(), Code::DeadlineExceeded);

    // nomad alloc exec: setup, stdin, heartbeat, close.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let setup = Setup { task_id: id.clone(), command: vec!["/bin/cat".into()], tty: false };
    tx.send(ExecTaskStreamingRequest { setup: Some(setup), ..Default::default() }).await.unwrap();
    let mut resp =
        d.clone().exec_task_streaming(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    tx.send(ExecTaskStreamingRequest::default()).await.unwrap();
    let data = ExecTaskStreamingIoOperation { data: b"hello exec\n".to_vec(), close: false };
    tx.send(ExecTaskStreamingRequest { stdin: Some(data), ..Default::default() }).await.unwrap();
    let close = ExecTaskStreamingIoOperation { data: Vec::new(), close: true };
    tx.send(ExecTaskStreamingRequest { stdin: Some(close), ..Default::default() }).await.unwrap();
    let (got, exited) = drain_exec(&mut resp).await;
    assert_eq!(String::from_utf8_lossy(&got), "hello exec\n");
    assert_eq!(exited.expect("an exited message").exit_code, 0);

    // With a TTY (`nomad alloc exec -t`): the terminal size Nomad sends reaches the pty.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let cmd = ["/bin/sh", "-c", "read go; stty size; exit 3"].map(String::from).to_vec();
    let setup = Setup { task_id: id.clone(), command: cmd, tty: true };
    tx.send(ExecTaskStreamingRequest { setup: Some(setup), ..Default::default() }).await.unwrap();
    let mut resp =
        d.clone().exec_task_streaming(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let size = aimodel_proto::drivers::exec_task_streaming_request::TerminalSize { height: 33, width: 101 };
    tx.send(ExecTaskStreamingRequest { tty_size: Some(size), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data = ExecTaskStreamingIoOperation { data: b"go\n".to_vec(), close: false };
    tx.send(ExecTaskStreamingRequest { stdin: Some(data), ..Default::default() }).await.unwrap();
    let (got, exited) = drain_exec(&mut resp).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("33 101"), "{text:?}");
    assert_eq!(exited.expect("an exited message").exit_code, 3);
    drop(tx);

    let req = TaskStatsRequest {
        task_id: id.clone(),
        collection_interval: Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 }),
    };
    let mut stats = d.clone().task_stats(req).await.unwrap().into_inner();
    for _ in 0..2 {
        let s = tokio::time::timeout(Duration::from_secs(10), stats.message()).await.unwrap().unwrap().unwrap();
        let s = s.stats.unwrap();
        assert!(s.timestamp.is_some());
        let agg = s.agg_resource_usage.unwrap();
        assert!(agg.memory.unwrap().usage > 0);
        assert!(agg.cpu.is_some());
    }
    drop(stats);
    sim.destroy(&id).await;
}

#[tokio::test]
async fn bad_input_gives_clear_errors_and_leaves_nothing_running() {
    let Some(mut sim) = Sim::start().await else { return };
    let d = sim.live.process.driver();
    let cases: Vec<(TaskBuilder, Code, &str)> = vec![
        (TaskBuilder::new("badengine", "engine = \"llamafile\"\n"), Code::InvalidArgument, "engine"),
        (
            TaskBuilder::new("badport", &custom("port = \"grpc\"")).port("http", free_port(), 0),
            Code::InvalidArgument,
            "port",
        ),
        (
            TaskBuilder::new("noimage", "engine = \"custom\"\nimage = \"aimodel-test/does-not-exist:1\"\n"),
            Code::FailedPrecondition,
            "does-not-exist",
        ),
    ];
    for (b, code, needle) in cases {
        let t = sim.prepare(&b);
        let err = d.clone().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
        assert!(
            err.code() == code || (needle == "does-not-exist" && err.code() == Code::NotFound),
            "{}: {err:?}",
            b.name
        );
        assert!(err.message().contains(needle), "{}: {:?}", b.name, err.message());
        assert!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty(), "{} left a container", b.name);
    }
    let e = d
        .clone()
        .exec_task(ExecTaskRequest { task_id: "nope/x/1".into(), command: vec!["true".into()], timeout: None })
        .await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    let e = d.clone().wait_task(WaitTaskRequest { task_id: "nope/x/1".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // A handle whose container vanished is an error, so Nomad reschedules.
    let b = TaskBuilder::new("vanish", &custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]"));
    let (t, handle) = sim.start_task(&b).await;
    remove_containers_with_label(LABEL_ALLOC_ID, &b.alloc_id);
    sim.wait(&t.config.id).await;
    sim.destroy(&t.config.id).await;
    let err = d
        .clone()
        .recover_task(RecoverTaskRequest { task_id: String::new(), handle: Some(stored_handle(&handle)) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("no longer exists"));
}

#[tokio::test]
async fn a_dead_log_relay_is_replaced_and_resumes() {
    let Some(mut sim) = Sim::start().await else { return };
    let n = 2000;
    let b =
        TaskBuilder::new("relaykill", &custom("")).env("STANDIN_COUNT", &n.to_string()).env("STANDIN_INTERVAL_MS", "2");
    let (t, handle) = sim.start_task(&b).await;
    let id = t.config.id.clone();
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(20), |t| t.contains("line 300\n")).await.unwrap();
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    let pid = aimodel_driver::logrelay::find_relay(&state.container_id).expect("a relay runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();

    assert_eq!(sim.wait(&id).await.exit_code, 0);
    let text = out
        .wait_for(Duration::from_secs(30), |_| out.at_eof() || out.text().contains(&format!("line {n}\n")))
        .await
        .unwrap();
    sim.destroy(&id).await;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line ")).collect();
    let mut seen = std::collections::BTreeMap::new();
    for l in &lines {
        *seen.entry(*l).or_insert(0) += 1;
    }
    for i in 1..=n {
        assert!(seen.contains_key(format!("line {i}").as_str()), "line {i} lost after the relay died");
    }
    // A relay killed between writing a line and recording its position may
    // repeat that one line; nothing else may repeat.
    let repeated: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(repeated.len() <= 1 && repeated.iter().all(|(_, c)| **c == 2), "repeated: {repeated:?}");
}

#[tokio::test]
async fn orphans_are_reported_and_left_alone() {
    orphans("gc {\n  dangling_containers {\n    dry_run = true\n  }\n}", false).await;
}

/// As the docker driver's reconciler: a dangling container of this node (no
/// task owns it) is removed after the creation grace; another client's is not.
#[tokio::test]
async fn dangling_containers_of_this_node_are_removed() {
    orphans("gc {\n  dangling_containers {\n    creation_grace = \"0s\"\n  }\n}", true).await;
}

async fn orphans(gc: &str, removed: bool) {
    let Some(mut sim) =
        Sim::start_with(&format!("fingerprint_period = \"300ms\"\n{gc}"), &[("AIMODEL_ORPHAN_GRACE", "0s")]).await
    else {
        return;
    };
    // A node name of its own: containers of the other tests (running at the
    // same time under other plugin processes) would be orphans here otherwise.
    let node = format!("sim-node-orphans-{}", aimodel_integration::task::random_hex(4));
    let mut b = TaskBuilder::new("anchor", &custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]"));
    b.node_name = node.clone();
    let (t, _) = sim.start_task(&b).await;
    let marker = aimodel_integration::task::alloc_id();
    sim.allocs.push(marker.clone());
    let create = |node: &str| {
        let out = std::process::Command::new("docker")
            .args(["create", "--label", "com.aimodel.managed=true", "--label"])
            .arg(format!("com.aimodel.node={node}"))
            .args(["--label", "com.aimodel.task_id=ghost/task/00000000", "--label"])
            .arg(format!("{LABEL_ALLOC_ID}={marker}"))
            .arg(aimodel_integration::support::STANDIN_IMAGE)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    create(&node);
    create("another-client");
    if removed {
        let deadline = Instant::now() + Duration::from_secs(15);
        while containers_with_label(LABEL_ALLOC_ID, &marker).len() != 1 {
            assert!(Instant::now() < deadline, "the dangling container of this node was not removed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{index .Config.Labels \"com.aimodel.node\"}}"])
            .args(containers_with_label(LABEL_ALLOC_ID, &marker))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&left.stdout).trim(),
            "another-client",
            "another client's container was removed"
        );
        assert_eq!(
            containers_with_label(aimodel_driver::plan::LABEL_TASK_ID, &t.config.id).len(),
            1,
            "a tracked task's container was removed"
        );
        sim.destroy(&t.config.id).await;
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fps = sim.live.fingerprints.lock().unwrap().items.clone();
        let n = fps.last().and_then(|f| f.msg.attributes.get("driver.aimodel.orphans").cloned());
        if let Some(aimodel_proto::structs::Attribute {
            value: Some(aimodel_proto::structs::attribute::Value::IntVal(n)),
            ..
        }) = n
        {
            if n == 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "orphan count never became 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(containers_with_label(LABEL_ALLOC_ID, &marker).len(), 2, "orphans must not be touched");
    sim.destroy(&t.config.id).await;
}

#[tokio::test]
async fn disabled_logs_need_no_fifo_and_no_relay() {
    let Some(mut sim) = Sim::start().await else { return };
    assert!(!sim.live.capabilities.disable_log_collection, "Nomad would skip logmon for every task");
    let mut b =
        TaskBuilder::new("quiet", &custom("").replace("\n\n", "\n")).env("STANDIN_COUNT", "5").env("STANDIN_EXIT", "0");
    b.logs_disabled = true;
    let (t, handle) = sim.start_task(&b).await;
    assert_eq!(t.config.stdout_path, "/dev/null");
    assert_eq!(sim.wait(&t.config.id).await.exit_code, 0);
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    assert!(state.logs_disabled);
    assert!(aimodel_driver::logrelay::find_relay(&state.container_id).is_none());
    sim.destroy(&t.config.id).await;
}

#[tokio::test]
async fn engine_down_is_a_recoverable_start_failure() {
    let (tmp, data, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hcl =
        PluginHcl::new(cache.path()).with("endpoint = \"unix:///nonexistent/docker.sock\"").default_gpu().render();
    let env = [("TMPDIR", tmp.path().to_str().unwrap())];
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap().live;
    let b = TaskBuilder::new("nodocker", &custom(""));
    let t = b.build(&live.task_schema, data.path()).unwrap();
    let err = live.process.driver().start_task(StartTaskRequest { task: Some(t.config) }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "Nomad must retry: {err:?}");
    assert!(err.message().contains("/nonexistent/docker.sock"), "{}", err.message());
    // A bad task config is fatal: no RecoverableError detail.
    let b = TaskBuilder::new("badcfg", "engine = \"vllm\"\n");
    let t = b.build(&live.task_schema, data.path()).unwrap();
    let err = live.process.driver().start_task(StartTaskRequest { task: Some(t.config) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(aimodel_driver::nomad::status::recoverable_detail(&err), None);
    live.kill().await.unwrap();
}

#[tokio::test]
async fn incomplete_models_do_not_start_and_complete_ones_are_pinned() {
    let Some(mut sim) = Sim::start().await else { return };
    let port = free_port();
    let cfg = format!(
        "engine = \"vllm\"\nimage = \"{}\"\nmodel = \"org/gated\"\nport = \"http\"\n",
        aimodel_integration::support::STANDIN_IMAGE
    );
    let b = TaskBuilder::new("gated", &cfg).port("http", port, 0);
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        aimodel_driver::nomad::status::recoverable_detail(&err),
        Some(true),
        "Nomad must retry while the cache warms"
    );
    assert!(err.message().contains(" prewarm org/gated@main"), "{}", err.message());
    assert!(err.message().contains("Fix: aimodel-agent --hf-home "), "{}", err.message());
    assert!(err.message().contains("the repo is not in the cache"), "{}", err.message());
    assert!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty());

    // Half-written: a file of the commit is missing.
    let hub = sim._cache.path().join("hub");
    let commit = aimodel_integration::jobrun::seed_tiny_model(&hub, "org/gated").unwrap();
    let snap = hub.join(format!("models--org--gated/snapshots/{commit}"));
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("model.safetensors: missing"), "{}", err.message());

    // Complete: starts, with the revision pinned to the commit.
    aimodel_integration::jobrun::seed_tiny_model(&hub, "org/gated").unwrap();
    // The same TaskConfig (and its FIFO readers) again, as Nomad's restart would.
    let handle = sim
        .live
        .process
        .driver()
        .start_task(StartTaskRequest { task: Some(t.config.clone()) })
        .await
        .unwrap()
        .into_inner()
        .handle
        .unwrap();
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    assert_eq!(state.revision.as_deref(), Some(commit.as_str()));
    let ev = sim.live.wait_event(&t.config.id, "complete in the cache", Duration::from_secs(5)).await.unwrap();
    assert!(ev.message.contains(&commit), "{}", ev.message);
    let out = t.stdout.clone().unwrap();
    let text = out.wait_for(Duration::from_secs(10), |s| s.contains("standin starting")).await.unwrap();
    assert!(text.contains(&format!("--revision {commit}")), "{text}");
    sim.destroy(&t.config.id).await;
}

/// `aimodel-agent gc` against a cache a running task uses: the driver's in-use
/// marker (any node may run the gc) keeps the model; pinned ones stay; cold
/// ones go, least recently used first; after DestroyTask the model can go too.
#[tokio::test]
async fn gc_never_evicts_a_model_a_running_task_uses() {
    use hf_cache::state::StateDir;
    let Some(mut sim) = Sim::start().await else { return };
    let hub = sim._cache.path().join("hub");
    let mut commits = std::collections::BTreeMap::new();
    for m in ["org/running", "org/pinned", "org/cold"] {
        commits.insert(m, aimodel_integration::jobrun::seed_tiny_model(&hub, m).unwrap());
    }
    let cfg = format!(
        "engine = \"vllm\"\nimage = \"{}\"\nmodel = \"org/running\"\nport = \"http\"\n",
        aimodel_integration::support::STANDIN_IMAGE
    );
    let b = TaskBuilder::new("served", &cfg).port("http", free_port(), 0);
    let (t, _) = sim.start_task(&b).await;
    let state = StateDir::for_hub(&hub);
    let marks = state.in_use(Duration::from_secs(60));
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].0.repo, "org/running");
    assert_eq!(marks[0].0.commit, commits["org/running"]);
    assert_eq!(marks[0].0.task, t.config.id);
    assert!(state.last_used("org/running").is_some(), "StartTask notes the use");

    let gc = |extra: &[&str]| {
        let out = std::process::Command::new(binary("aimodel-agent").unwrap())
            .arg("--cache")
            .arg(&hub)
            .args(["gc", "--max-size", "0", "--pin", "org/pinned"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, dry) = gc(&["--dry-run"]);
    assert_eq!(code, Some(4), "{dry}");
    assert!(dry.contains("would evict 1 models"), "{dry}");
    assert!(hub.join("models--org--cold").exists(), "a dry run changes nothing");
    let (code, out) = gc(&[]);
    assert_eq!(code, Some(4), "pinned and in-use models keep the target out of reach: {out}");
    assert!(out.contains("in use by") && out.contains("evicted 1 models"), "{out}");
    assert!(!hub.join("models--org--cold").exists(), "{out}");
    for m in ["org/running", "org/pinned"] {
        assert!(hf_cache::check(&hub, &hf_cache::RepoId::model(m), "main", hf_cache::Mode::Quick).is_complete());
    }

    sim.destroy(&t.config.id).await;
    assert!(state.in_use(Duration::from_secs(60)).is_empty(), "DestroyTask removes the marker");
    let (_, out) = gc(&[]);
    assert!(out.contains("evicted 1 models"), "{out}");
    assert!(!hub.join("models--org--running").exists(), "{out}");
    assert!(hub.join("models--org--pinned").exists(), "{out}");
}

/// `prewarm = true`: a missing model is fetched by aimodel-agent (found beside
/// the plugin) from the client's `HF_ENDPOINT` (a task's own is ignored) with
/// the task's `HF_TOKEN`, with progress as task events, then the task starts
/// pinned to the commit; a repo the hub does not have fails with the agent's reason.
#[tokio::test]
async fn prewarm_true_fetches_a_missing_model_with_the_agent() {
    use aimodel_integration::faulthub::{FaultHub, COMMIT};
    let hub = FaultHub::start(vec![3u8; 200_000]).await.unwrap();
    let decoy = FaultHub::start(vec![9u8; 10]).await.unwrap();
    let endpoint = hub.endpoint();
    // The agent binary where any user may run it: the prewarm runs as the cache's owner.
    let bindir = tempfile::tempdir().unwrap();
    let agent = bindir.path().join("aimodel-agent");
    std::fs::copy(binary("aimodel-agent").unwrap(), &agent).unwrap();
    for p in [bindir.path(), agent.as_path()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let env = [("HF_ENDPOINT", endpoint.as_str()), ("AIMODEL_AGENT_BIN", agent.to_str().unwrap())];
    let Some(mut sim) = Sim::start_with("", &env).await else { return };
    // A cache owned by a user of its own (the node agent's), as docs/install.md sets it up.
    let owner = nix::unistd::geteuid().is_root().then_some(4242u32);
    if let Some(uid) = owner {
        let (u, g) = (nix::unistd::Uid::from_raw(uid), nix::unistd::Gid::from_raw(uid));
        nix::unistd::chown(sim._cache.path(), Some(u), Some(g)).unwrap();
    }
    let cfg = |model: &str| {
        format!(
            "engine = \"vllm\"\nimage = \"{}\"\nmodel = \"{model}\"\nport = \"http\"\nprewarm = true\n",
            aimodel_integration::support::STANDIN_IMAGE
        )
    };
    let b = TaskBuilder::new("fetched", &cfg("org/fetched"))
        .port("http", free_port(), 0)
        .env("HF_ENDPOINT", &decoy.endpoint())
        .env("HF_TOKEN", "hf-task-token");
    let (t, handle) = sim.start_task(&b).await;
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    assert_eq!(state.revision.as_deref(), Some(COMMIT));
    let msgs = sim.live.event_messages(&t.config.id);
    assert!(msgs.iter().any(|m| m.contains("fetching it with aimodel-agent")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.starts_with("prewarm: org/fetched@main = ")), "{msgs:?}");
    assert!(hub.log.lock().unwrap().hub_auth.iter().all(|a| a == "Bearer hf-task-token"));
    assert_eq!(hub.log.lock().unwrap().body_bytes["org/fetched"], 200_000);
    assert!(decoy.log.lock().unwrap().hits.is_empty(), "the task's HF_ENDPOINT must not choose the hub");
    let hubdir = sim._cache.path().join("hub");
    assert!(
        hf_cache::check(&hubdir, &hf_cache::RepoId::model("org/fetched"), "main", hf_cache::Mode::Deep).is_complete()
    );
    if let Some(uid) = owner {
        // Written as the cache's owner, so that owner's agent can resume, replace and collect it.
        use std::os::unix::fs::MetadataExt;
        let repo = hubdir.join("models--org--fetched");
        for e in [hubdir.clone(), repo.clone(), repo.join("blobs"), sim._cache.path().join("aimodel")] {
            assert_eq!(std::fs::metadata(&e).unwrap().uid(), uid, "{} is not the cache owner's", e.display());
        }
        for b in std::fs::read_dir(repo.join("blobs")).unwrap().flatten() {
            assert_eq!(b.metadata().unwrap().uid(), uid, "{:?}", b.path());
        }
    }
    sim.destroy(&t.config.id).await;

    let b = TaskBuilder::new("absent", &cfg("fault/missing"))
        .port("http", free_port(), 0)
        .env("HF_ENDPOINT", &hub.endpoint());
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(
        err.message().contains("prewarm of fault/missing@main failed") && err.message().contains("not found"),
        "{}",
        err.message()
    );
    assert!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty());
}

/// A local registry (Debian's `docker-registry`, distribution 2.x) on a port of
/// our own, with htpasswd authentication, serving an image built here:
/// without credentials the pull is refused; with the task's `auth` block
/// StartTask pulls it for real (a layer the engine does not have), with pull
/// events, and runs it, and the password appears in no plugin log line; a
/// tag the registry does not have is a clear, non-recoverable error.
#[tokio::test]
async fn images_are_pulled_from_a_registry() {
    let registry_bin = std::path::Path::new("/usr/bin/docker-registry");
    if !registry_bin.exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "docker-registry is missing (scripts/test installs it)");
        eprintln!("SKIP: no /usr/bin/docker-registry");
        return;
    }
    let Some(mut sim) = Sim::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let password = format!("pw-{}", aimodel_integration::task::random_hex(8));
    let hash = bcrypt::hash(&password, 5).unwrap();
    std::fs::write(dir.path().join("htpasswd"), format!("puller:{hash}\n")).unwrap();
    std::fs::write(
        dir.path().join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
            dir.path().join("data").display(),
            dir.path().join("htpasswd").display()
        ),
    )
    .unwrap();
    let mut registry = tokio::process::Command::new(registry_bin)
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the registry did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An image with a layer of its own (so the pull really downloads), pushed, then removed locally.
    let tag = format!("127.0.0.1:{port}/aimodel/pulled:{}", aimodel_integration::task::random_hex(4));
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("nonce"), aimodel_integration::task::random_hex(64)).unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {}\nCOPY nonce /nonce\n", standin_image().unwrap()))
        .unwrap();
    // The docker CLI's credentials go to a directory of the test's own, not ~/.docker.
    let docker_cfg = tempfile::tempdir().unwrap();
    let docker = |args: &[&str]| {
        let out = std::process::Command::new("docker")
            .args(args)
            .env("DOCKER_BUILDKIT", "0")
            .env("DOCKER_CONFIG", docker_cfg.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    docker(&["build", "-q", "-t", &tag, ctx.path().to_str().unwrap()]);
    docker(&["login", "-u", "puller", "-p", &password, &format!("127.0.0.1:{port}")]);
    docker(&["push", &tag]);
    docker(&["rmi", &tag]);

    let cfg = format!("engine = \"custom\"\nimage = \"{tag}\"\n");
    let b = TaskBuilder::new("anonymous", &cfg);
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains(&tag), "{}", err.message());
    assert!(
        err.message().contains("no basic auth credentials") || err.message().contains("unauthorized"),
        "{}",
        err.message()
    );
    let cfg = format!(
        "engine = \"custom\"\nimage = \"{tag}\"\nauth {{\n  username = \"puller\"\n  password = \"{password}\"\n  server_address = \"127.0.0.1:{port}\"\n}}\n"
    );
    let b = TaskBuilder::new("pulled", &cfg);
    let (t, handle) = sim.start_task(&b).await;
    let msgs = sim.live.event_messages(&t.config.id);
    assert!(msgs.iter().any(|m| m == &format!("Downloading image {tag}")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m == &format!("Downloaded image {tag}")), "{msgs:?}");
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    assert_eq!(state.image, tag);
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("standin starting")).await.unwrap();
    sim.destroy(&t.config.id).await;

    let missing = format!("127.0.0.1:{port}/aimodel/pulled:nope");
    let b = TaskBuilder::new(
        "missing",
        &format!("engine = \"custom\"\nimage = \"{missing}\"\nauth {{\n  username = \"puller\"\n  password = \"{password}\"\n}}\n"),
    );
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("not found") && err.message().contains(&missing), "{}", err.message());
    // No RecoverableError detail: Nomad's client treats the error as final (no restart loop).
    assert_ne!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "{err:?}");
    assert_eq!(err.code(), Code::NotFound);

    let logged = sim.live.process.stderr.lock().unwrap().clone();
    assert!(!logged.is_empty());
    assert!(logged.iter().all(|l| !l.contains(&password)), "the registry password was logged");

    // The plugin's own credentials go to the registry they name, and to no other
    // (the same registry spelled `localhost` is another host to Docker's auth).
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag]).output();
    let plugin_auth = format!(
        "auth {{\n  username = \"puller\"\n  password = \"{password}\"\n  server_address = \"127.0.0.1:{port}\"\n}}"
    );
    let mut psim = Sim::start_with(&plugin_auth, &[]).await.unwrap();
    let (t, _) =
        psim.start_task(&TaskBuilder::new("plugin-auth", &format!("engine = \"custom\"\nimage = \"{tag}\"\n"))).await;
    psim.destroy(&t.config.id).await;
    let other = tag.replacen("127.0.0.1", "localhost", 1);
    let t = psim.prepare(&TaskBuilder::new("other-registry", &format!("engine = \"custom\"\nimage = \"{other}\"\n")));
    let err =
        psim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(
        err.message().contains("no basic auth credentials") || err.message().contains("unauthorized"),
        "the plugin's credentials reached another registry: {}",
        err.message()
    );
    let logged = psim.live.process.stderr.lock().unwrap().clone();
    assert!(logged.iter().all(|l| !l.contains(&password)), "the registry password was logged");

    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag, &other]).output();
    let _ = registry.kill().await;
}

/// What a job author may not do to the node, through the real plugin and
/// Docker: host-path volumes, GPUs Nomad did not assign (by `gpus` or by the
/// task's own `NVIDIA_VISIBLE_DEVICES`) are refused with the option that would
/// allow each; a task that starts sees no GPU and cannot write the shared cache.
#[tokio::test]
async fn job_authors_get_no_host_paths_no_unassigned_gpus_and_a_read_only_cache() {
    let Some(mut sim) = Sim::start().await else { return };
    let refused = [
        ("host-root", custom("volumes = [\"/:/host\"]"), "volumes.enabled"),
        ("docker-sock", custom("volumes = [\"/var/run/docker.sock:/var/run/docker.sock\"]"), "volumes.enabled"),
        ("escape", custom("volumes = [\"../../../../../etc:/x\"]"), "volumes.enabled"),
        ("all-gpus", custom("gpus = \"all\""), "gpu.allow_unscheduled"),
    ];
    for (name, cfg, option) in refused {
        let t = sim.prepare(&TaskBuilder::new(name, &cfg));
        let err =
            sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
        assert!(err.message().contains(option), "{name}: {}", err.message());
        assert_ne!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "{name}: a refusal is final");
    }
    let t = sim.prepare(&TaskBuilder::new("env-gpus", &custom("")).env("NVIDIA_VISIBLE_DEVICES", "all"));
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("gpu.allow_unscheduled"), "{}", err.message());

    // Inside the allocation is fine; the cache is there but read-only.
    let cfg = custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\nvolumes = [\"scratch:/scratch\"]");
    let (t, _) = sim.start_task(&TaskBuilder::new("tenant", &cfg)).await;
    let id = t.config.id.clone();
    let d = sim.live.process.driver();
    let run = |cmd: &str| ExecTaskRequest {
        task_id: id.clone(),
        command: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        timeout: None,
    };
    let r = d.clone().exec_task(run("echo poison > /root/.cache/huggingface/poison")).await.unwrap().into_inner();
    assert_ne!(r.result.unwrap().exit_code, 0, "a task wrote the shared cache");
    assert!(!sim._cache.path().join("poison").exists());
    let r = d.clone().exec_task(run("echo $NVIDIA_VISIBLE_DEVICES; touch /scratch/ok")).await.unwrap().into_inner();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "void");
    assert_eq!(r.result.unwrap().exit_code, 0);
    sim.destroy(&id).await;
}

/// `gc { image = true }`: an image no task uses any more is removed after
/// `image_delay`; one a running task still uses is kept.
#[tokio::test]
async fn unused_images_are_removed_after_the_delay() {
    let Some(mut sim) = Sim::start_with("gc {\n  image = true\n  image_delay = \"1s\"\n}", &[]).await else {
        return;
    };
    let tag = |n: &str| format!("aimodel-gc-test:{n}-{}", aimodel_integration::task::random_hex(4));
    let (gone, kept) = (tag("gone"), tag("kept"));
    for t in [&gone, &kept] {
        let out = std::process::Command::new("docker").args(["tag", &standin_image().unwrap(), t]).output().unwrap();
        assert!(out.status.success());
    }
    let present =
        |t: &str| std::process::Command::new("docker").args(["image", "inspect", t]).output().unwrap().status.success();
    let sleeper = |image: &str| {
        format!("engine = \"custom\"\nimage = \"{image}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\n")
    };
    let (a, _) = sim.start_task(&TaskBuilder::new("a", &sleeper(&gone))).await;
    let (b1, _) = sim.start_task(&TaskBuilder::new("b1", &sleeper(&kept))).await;
    let (b2, _) = sim.start_task(&TaskBuilder::new("b2", &sleeper(&kept))).await;
    sim.destroy(&a.config.id).await;
    sim.destroy(&b1.config.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while present(&gone) {
        assert!(Instant::now() < deadline, "the unused image {gone} was not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // b2 still runs on `kept`: well past the delay it is still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(present(&kept), "an image a running task uses was removed");
    assert!(present(&standin_image().unwrap()), "another tag of the same image was removed");
    sim.destroy(&b2.config.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while present(&kept) {
        assert!(Instant::now() < deadline, "the image {kept} was not removed once unused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A handle that no longer decodes (an upgrade, a damaged state file) fails
/// RecoverTask; the client then destroys the task with force and starts it
/// again (`task_runner.go` `restoreHandle`). The old container must not be
/// left holding its GPUs and ports next to the new one.
#[tokio::test]
async fn a_failed_recovery_leaves_no_container_behind() {
    let Some(mut sim) = Sim::start().await else { return };
    let b = TaskBuilder::new("unrecoverable", &custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]"));
    let (_t, handle) = sim.start_task(&b).await;
    assert_eq!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).len(), 1);
    // The plugin restarts (its tracked tasks are gone) and the stored state is damaged.
    let launch = sim.live.launch.clone();
    let msgpack = sim.live.msgpack_config.clone();
    let old = std::mem::replace(&mut sim.live, sequence::long_lived(&launch, msgpack, "0.1.0").await.unwrap());
    old.crash().await.unwrap();
    let mut stored = stored_handle(&handle);
    stored.driver_state = b"not our state".to_vec();
    assert!(!sim.live.restore_handle(stored).await.unwrap(), "a damaged handle cannot be recovered");
    assert!(containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty(), "the old container was left running");
}

fn docker_out(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).env("DOCKER_BUILDKIT", "0").output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What Nomad hands the driver, as the docker driver uses it: a group network
/// namespace created by a docker task (its container named in the isolation
/// spec's label) is joined and nothing is published; `memory_max = -1` is a
/// reservation only; device-plugin devices reach the container; Docker logs
/// rotate (json-file, 2m × 2); without a kill_signal the image's STOPSIGNAL is sent.
#[tokio::test]
async fn group_namespace_memory_devices_logs_and_stop_signal_reach_docker() {
    use aimodel_proto::drivers::{network_isolation_spec::NetworkIsolationMode, Device, NetworkIsolationSpec};
    let Some(mut sim) = Sim::start().await else { return };
    let image = standin_image().unwrap();
    // The group's sandbox, as the docker driver's pause container would hold it.
    let sandbox =
        docker_out(&["run", "-d", "--label", "com.aimodel.test=sandbox", "--entrypoint", "/bin/sleep", &image, "600"]);
    let mut b = TaskBuilder::new(
        "grouped",
        &custom("port = \"http\"\nreadiness {\n  path = \"/health\"\n  interval = \"200ms\"\n}\n"),
    )
    .port("http", free_port(), 8000);
    b.isolation = Some(NetworkIsolationSpec {
        mode: NetworkIsolationMode::Group as i32,
        path: format!("/var/run/docker/netns/{}", &sandbox[..12]),
        labels: [("docker_sandbox_container_id".to_string(), sandbox.clone())].into(),
        ..Default::default()
    });
    b.memory_max_mb = -1;
    // The volume hook's mounts: a read-only host volume (a CSI volume arrives the same way).
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("weights"), "w").unwrap();
    b.mounts = vec![aimodel_proto::drivers::Mount {
        task_path: "/volume".into(),
        host_path: volume.path().display().to_string(),
        readonly: true,
        propagation_mode: "private".into(),
        ..Default::default()
    }];
    b.devices = vec![Device {
        task_path: "/dev/aimodel-null".into(),
        host_path: "/dev/null".into(),
        cgroup_permissions: "rwm".into(),
    }];
    let (t, handle) = sim.start_task(&b).await;
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    let c = state.container_id.as_str();
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", c]), format!("container:{sandbox}"));
    assert_eq!(docker_out(&["inspect", "-f", "{{len .HostConfig.PortBindings}}", c]), "0", "nothing published");
    // The server answers on localhost inside the group's namespace (where Envoy would reach it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("docker")
            .args(["exec", &sandbox, "wget", "-qO-", "http://127.0.0.1:8000/health"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the server is not reachable in the group namespace");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.Memory}}", c]), "0", "memory_max = -1: no hard limit");
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.MemoryReservation}}", c]), (256u64 << 20).to_string());
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} {{index .HostConfig.LogConfig.Config \"max-file\"}}", c]), "json-file 2m 2");
    docker_out(&["exec", c, "test", "-c", "/dev/aimodel-null"]);
    docker_out(&["exec", c, "test", "-f", "/volume/weights"]);
    let write = std::process::Command::new("docker").args(["exec", c, "touch", "/volume/poison"]).output().unwrap();
    assert!(!write.status.success() && !volume.path().join("poison").exists(), "a read-only volume was written");
    sim.destroy(&t.config.id).await;
    let _ = std::process::Command::new("docker").args(["rm", "-f", &sandbox]).output();

    // STOPSIGNAL: an image that stops on SIGUSR1 only.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {image}\nSTOPSIGNAL SIGUSR1\n")).unwrap();
    let tag = format!("aimodel-stopsignal:{}", aimodel_integration::task::random_hex(4));
    docker_out(&["build", "-q", "-t", &tag, ctx.path().to_str().unwrap()]);
    let cfg = format!(
        "engine = \"custom\"\nimage = \"{tag}\"\nentrypoint = [\"/bin/sh\", \"-c\", \"trap 'echo got-usr1; exit 0' USR1; trap '' TERM; echo armed; while true; do sleep 0.2; done\"]\n"
    );
    let (t, _) = sim.start_task(&TaskBuilder::new("stopsignal", &cfg)).await;
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("armed")).await.unwrap();
    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest {
            task_id: t.config.id.clone(),
            timeout: Some(prost_types::Duration { seconds: 20, nanos: 0 }),
            signal: String::new(),
        })
        .await
        .unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("got-usr1")).await.unwrap();
    assert_eq!(sim.wait(&t.config.id).await.exit_code, 0, "stopped by its STOPSIGNAL, not killed");
    sim.destroy(&t.config.id).await;
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag]).output();
}

/// TaskStats as Nomad reads them (`drivers/docker/util/stats_posix.go`): CPU
/// figures are percentages, not cumulative times; a container spinning one
/// core shows about 100 %; user mode dominates; memory comes from the cgroup.
#[tokio::test]
async fn cpu_stats_are_percentages_like_the_docker_drivers() {
    let Some(mut sim) = Sim::start().await else { return };
    let cfg = custom("entrypoint = [\"/bin/sh\", \"-c\", \"while :; do :; done\"]");
    let (t, _) = sim.start_task(&TaskBuilder::new("spinner", &cfg)).await;
    let req = TaskStatsRequest {
        task_id: t.config.id.clone(),
        collection_interval: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
    };
    let mut stats = sim.live.process.driver().task_stats(req).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let s = tokio::time::timeout(Duration::from_secs(10), stats.message()).await.unwrap().unwrap().unwrap();
        seen.push(s.stats.unwrap().agg_resource_usage.unwrap());
    }
    drop(stats);
    sim.destroy(&t.config.id).await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let last = seen.last().unwrap();
    let cpu = last.cpu.clone().unwrap();
    // Bounded by the cores (cumulative milliseconds of a spinning process would
    // pass that within seconds); well above zero even when other tests share the CPU.
    assert!(cpu.percent > 5.0 && cpu.percent <= 100.0 * cores + 5.0, "one spinning core: {cpu:?}");
    // User time is tick-accounted and total time exact (cgroup v1), so their ratio
    // can pass 1 a little; cumulative milliseconds would be in the thousands.
    assert!(cpu.user_mode > cpu.system_mode && cpu.user_mode <= 150.0 * cores, "{cpu:?}");
    assert!(cpu.system_mode >= 0.0, "{cpu:?}");
    assert!(cpu.total_ticks > 0.0, "{cpu:?}");
    assert!(last.memory.clone().unwrap().usage > 0);
}

#[test]
fn the_cgroup_counters_of_a_spinning_container_are_read() {
    if !require_docker() {
        return;
    }
    let image = standin_image().unwrap();
    let id = docker_out(&[
        "run",
        "-d",
        "--label",
        "com.aimodel.test=cgroup",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "while :; do :; done",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let pid: i64 = docker_out(&["inspect", "-f", "{{.State.Pid}}", &id]).parse().unwrap();
    let files = aimodel_driver::runtime::cgroup::locate(pid, std::path::Path::new("/sys/fs/cgroup"))
        .expect("the container's cgroup");
    let ours = aimodel_driver::runtime::cgroup::sample(&files).expect("readable counters");
    let _ = std::process::Command::new("docker").args(["rm", "-f", &id]).output();
    // Two seconds of one spinning core.
    assert!(ours.cpu_total_ns > 1_000_000_000, "{ours:?}");
    assert!(ours.cpu_user_ns > ours.cpu_kernel_ns, "{ours:?}");
    assert!(ours.mem_usage > 0 && ours.system_cpu_ns > ours.cpu_total_ns, "{ours:?}");
}

/// The seed's jobs: no group network, `port "http" { to = 8000 host_network = … }`
/// and a server started on `${NOMAD_PORT_http}`. As with the docker driver, the
/// server listens on `to` inside the container and is reachable on the address
/// Nomad picked for the port, and on no other address of the host.
#[tokio::test]
async fn a_port_is_reachable_on_its_host_network_address_only() {
    let Some(mut sim) = Sim::start().await else { return };
    let value = free_port();
    let cfg = custom(
        "port = \"http\"\nentrypoint = [\"/bin/sh\", \"-c\", \"exec /bin/standin --port $NOMAD_PORT_http\"]\nreadiness {\n  path = \"/health\"\n  interval = \"200ms\"\n}",
    );
    let mut b = TaskBuilder::new("lan", &cfg).port("http", value, 8000);
    b.port_ip = "127.0.0.2".into();
    let (t, _) = sim.start_task(&b).await;
    sim.live.wait_event(&t.config.id, "model server ready after", Duration::from_secs(20)).await.unwrap();
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("listening on 0.0.0.0:8000")).await.unwrap();
    let reach = |ip: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect((ip, value)).await else { return String::new() };
        let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n").await;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        body
    };
    assert!(reach("127.0.0.2").await.starts_with("HTTP/1."), "not reachable on the address Nomad picked");
    assert_eq!(reach("127.0.0.1").await, "", "reachable on another address of the host");
    sim.destroy(&t.config.id).await;
}
