//! The task core against the scripted runtime (`runtime::fake`): no Docker,
//! a few seconds in all. The Docker suite in `integration/` proves the same
//! paths against the real engine.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::TaskConfig;
use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::runtime::fake::{FakeRuntime, Script};
use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::types::NomadTask;

fn driver_on(fake: &FakeRuntime) -> Driver {
    let fake = fake.clone();
    Driver::with_runtime(
        CancellationToken::new(),
        Arc::new(move |_| Arc::new(fake.clone()) as Arc<dyn ContainerRuntime>),
    )
}

fn task(id: &str) -> NomadTask {
    NomadTask {
        id: format!("alloc-1/{id}/run-1"),
        name: id.into(),
        alloc_id: "alloc-1".into(),
        node_name: "unit-node".into(),
        // Log collection off: no relay process in unit tests.
        stdout_path: "/dev/null".into(),
        stderr_path: "/dev/null".into(),
        ..Default::default()
    }
}

fn config(extra: serde_json::Value) -> TaskConfig {
    let mut v = serde_json::json!({ "engine": "custom", "image": "unit/server:1" });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    serde_json::from_value(v).expect("a valid task config")
}

fn position(calls: &[String], prefix: &str) -> usize {
    calls.iter().position(|c| c.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {calls:?}"))
}

#[tokio::test]
async fn a_name_conflict_replaces_the_old_container() {
    let fake = FakeRuntime::new(Script { conflicts: 1, ..Default::default() });
    let d = driver_on(&fake);
    let t = task("conflict");
    d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap();
    let calls = fake.calls();
    let first = position(&calls, "create ");
    let removed = position(&calls, "remove ");
    assert!(first < removed && calls[removed + 1..].iter().any(|c| c.starts_with("create ")), "{calls:?}");
    assert!(calls.last().is_some_and(|c| c.starts_with("start ")), "{calls:?}");
    assert_eq!(d.tasks().ids(), vec![t.id.clone()]);
    d.destroy_task(&t.id, true).await.unwrap();
}

#[tokio::test]
async fn a_failed_start_removes_the_container_and_tracks_nothing() {
    let fake = FakeRuntime::new(Script {
        start_error: Some(RuntimeError::Api { op: "start", reason: "no such device".into() }),
        ..Default::default()
    });
    let d = driver_on(&fake);
    let err = d.start_task(task("fails"), config(serde_json::json!({}))).await.unwrap_err();
    assert!(matches!(err, DriverError::StartFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("no such device"), "{err}");
    assert!(fake.containers().is_empty(), "the created container stays: {:?}", fake.calls());
    assert!(d.tasks().ids().is_empty());
}

#[tokio::test]
async fn stop_sends_sigkill_after_the_timeout() {
    let fake = FakeRuntime::new(Script { ignored_signals: ["SIGTERM".to_string()].into(), ..Default::default() });
    let d = driver_on(&fake);
    let t = task("stubborn");
    d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap();
    d.stop_task(&t.id, Duration::from_millis(200), "SIGTERM").await.unwrap();
    let calls = fake.calls();
    assert!(position(&calls, "kill ") < calls.iter().rposition(|c| c.ends_with("SIGKILL")).unwrap(), "{calls:?}");
    assert!(calls.iter().any(|c| c.starts_with("kill ") && c.ends_with("SIGTERM")), "{calls:?}");
    let exit = d.wait_task(&t.id).await.unwrap();
    assert_eq!(exit.exit_code, 137, "{exit:?}");
    assert_eq!(exit.signal, 9);
    d.destroy_task(&t.id, false).await.unwrap();
}

#[tokio::test]
async fn destroy_of_a_running_task_needs_force() {
    let fake = FakeRuntime::default();
    let d = driver_on(&fake);
    let t = task("running");
    d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap();
    let err = d.destroy_task(&t.id, false).await.unwrap_err();
    assert!(matches!(err, DriverError::StillRunning { .. }), "{err:?}");
    assert_eq!(fake.containers().len(), 1);
    d.destroy_task(&t.id, true).await.unwrap();
    assert!(fake.containers().is_empty());
    assert!(d.tasks().ids().is_empty());
    // Destroying again (Nomad retries) is fine.
    d.destroy_task(&t.id, true).await.unwrap();
}

#[tokio::test]
async fn recovery_reattaches_or_reports_the_container_gone() {
    let fake = FakeRuntime::default();
    let first = driver_on(&fake);
    let (a, b) = (task("kept"), task("lost"));
    let sa = first.start_task(a.clone(), config(serde_json::json!({}))).await.unwrap();
    let sb = first.start_task(b.clone(), config(serde_json::json!({}))).await.unwrap();
    // A new plugin process, as after a crash: it knows only the handles.
    let second = driver_on(&fake);
    second.recover_task(a.clone(), &sa.state.encode().unwrap()).await.unwrap();
    assert_eq!(second.tasks().ids(), vec![a.id.clone()]);
    fake.vanish(&sb.state.container_id);
    let err = second.recover_task(b.clone(), &sb.state.encode().unwrap()).await.unwrap_err();
    assert!(matches!(err, DriverError::ContainerGone { .. }), "{err:?}");
    let err = second.recover_task(b, b"\xc1 not ours").await.unwrap_err();
    assert!(matches!(err, DriverError::BadHandle(_)), "{err:?}");
    second.destroy_task(&a.id, true).await.unwrap();
}

#[tokio::test]
async fn a_server_that_dies_while_starting_is_reported_not_ready() {
    let fake = FakeRuntime::new(Script { exit_at_start: Some(3), ..Default::default() });
    let d = driver_on(&fake);
    let mut events = d.subscribe_events();
    let mut t = task("dies");
    // A port nothing listens on: the probe fails until the exit is seen.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    t.ports = vec![crate::types::NomadPort { label: "http".into(), value: free, to: 0, host_ip: "127.0.0.1".into() }];
    let cfg = config(serde_json::json!({ "port": "http", "readiness": { "path": "/health", "interval": "50ms" } }));
    d.start_task(t.clone(), cfg).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), d.wait_task(&t.id)).await.unwrap().unwrap();
    assert_eq!(exit.exit_code, 3);
    let message = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let ev = events.recv().await.unwrap();
            assert!(!ev.message.contains("ready after"), "a dead server was reported ready: {}", ev.message);
            if ev.message.contains("while starting") {
                return ev.message;
            }
        }
    })
    .await
    .expect("no event for the server that died");
    assert!(message.contains("code 3") && message.contains("fake: bad weights"), "{message}");
    d.destroy_task(&t.id, false).await.unwrap();
}

#[tokio::test]
async fn unknown_tasks_are_not_found_and_bad_signals_are_refused() {
    let fake = FakeRuntime::default();
    let d = driver_on(&fake);
    assert!(matches!(d.wait_task("nope").await, Err(DriverError::TaskNotFound { .. })));
    let t = task("signals");
    d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap();
    assert!(matches!(d.signal_task(&t.id, "SIGBOGUS").await, Err(DriverError::BadSignal { .. })));
    d.signal_task(&t.id, "hup").await.unwrap();
    assert!(fake.calls().iter().any(|c| c.starts_with("kill ") && c.ends_with("SIGHUP")));
    let err = d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap_err();
    assert!(matches!(err, DriverError::TaskExists { .. }), "{err:?}");
    d.destroy_task(&t.id, true).await.unwrap();
}

#[tokio::test]
async fn a_present_image_is_not_pulled_unless_the_task_says_always() {
    let fake = FakeRuntime::default();
    let d = driver_on(&fake);
    let mut events = d.subscribe_events();
    let t = task("present");
    d.start_task(t.clone(), config(serde_json::json!({}))).await.unwrap();
    assert!(!fake.calls().iter().any(|c| c.starts_with("pull ")), "{:?}", fake.calls());
    let ev = events.recv().await.unwrap();
    assert!(ev.message.contains("is on this node: not pulled"), "{}", ev.message);
    d.destroy_task(&t.id, true).await.unwrap();

    let t = task("always");
    d.start_task(t.clone(), config(serde_json::json!({ "pull": "always" }))).await.unwrap();
    assert!(fake.calls().iter().any(|c| c == "pull unit/server:1"), "{:?}", fake.calls());
    d.destroy_task(&t.id, true).await.unwrap();
    assert!(serde_json::from_value::<TaskConfig>(
        serde_json::json!({ "engine": "custom", "image": "i", "pull": "sometimes" })
    )
    .is_err());
}

#[tokio::test]
async fn prewarm_fetches_foreign_ollama_names_only_through_the_operators_mirror() {
    let fake = FakeRuntime::new(Script::default());
    let d = driver_on(&fake);
    let cache = tempfile::tempdir().unwrap();
    let mut plugin = crate::config::PluginConfig::default();
    plugin.hf_cache.host_path = cache.path().display().to_string();
    d.set_config(plugin, true).unwrap();
    let cfg = config(serde_json::json!({
        "engine": "ollama", "image": "unit/ollama:1", "models": ["evil.example:8443/ns/m:t"], "prewarm": true
    }));
    let err = d.start_task(task("foreign"), cfg).await.unwrap_err();
    assert!(matches!(err, DriverError::ModelIncomplete { .. }), "{err:?}");
    assert!(err.to_string().contains("only the operator's mirror"), "{err}");
    assert!(fake.calls().iter().all(|c| !c.starts_with("create ")), "{:?}", fake.calls());
}
