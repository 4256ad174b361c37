//! The task lifecycle against the real Docker engine, driven the way a Nomad
//! client drives it, with the local stand-in image (there is no registry).

use std::time::{Duration, Instant};

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence::{self};
use aimodel_integration::support::{binary, containers_with_label, remove_containers_with_label, DRIVER_BIN};
use aimodel_integration::task::{free_port, stored_handle, TaskBuilder};
use aimodel_proto::drivers::{
    exec_task_streaming_request::Setup, ExecTaskRequest, ExecTaskStreamingIoOperation, ExecTaskStreamingRequest,
    InspectTaskRequest, RecoverTaskRequest, SignalTaskRequest, StartTaskRequest, StopTaskRequest, TaskState,
    TaskStatsRequest, WaitTaskRequest,
};
use tonic::Code;

use aimodel_integration::tasksim::*;

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
        timeout: timeout.map(|ms| prost_types::Duration {
            seconds: i64::try_from(ms / 1000).unwrap(),
            nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap(),
        }),
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
