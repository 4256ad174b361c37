//! Tasks and the shared HF cache against the real Docker engine: the
//! completeness gate, in-use markers that keep gc away, and `prewarm = true`.

use std::time::Duration;

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::support::{binary, containers_with_label};
use aimodel_integration::task::{free_port, TaskBuilder};
use aimodel_proto::drivers::StartTaskRequest;
use tonic::Code;

use aimodel_integration::tasksim::*;

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
    let hub = sim.cache.path().join("hub");
    let commit = aimodel_integration::jobrun::seed_tiny_model(&hub, "org/gated").unwrap();
    let snap = hub.join(format!("models--org--gated/snapshots/{commit}"));
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("model.safetensors: missing"), "{}", err.message());

    // Complete: starts, with the revision pinned to the commit.
    aimodel_integration::jobrun::seed_tiny_model(&hub, "org/gated").unwrap();
    // The same TaskConfig (and its FIFO readers) again, as Nomad's restart would.
    let handle = sim.start_prepared(&t).await;
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
    let hub = sim.cache.path().join("hub");
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
        nix::unistd::chown(sim.cache.path(), Some(u), Some(g)).unwrap();
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
    let hubdir = sim.cache.path().join("hub");
    assert!(
        hf_cache::check(&hubdir, &hf_cache::RepoId::model("org/fetched"), "main", hf_cache::Mode::Deep).is_complete()
    );
    if let Some(uid) = owner {
        // Written as the cache's owner, so that owner's agent can resume, replace and collect it.
        use std::os::unix::fs::MetadataExt;
        let repo = hubdir.join("models--org--fetched");
        for e in [hubdir.clone(), repo.clone(), repo.join("blobs"), sim.cache.path().join("aimodel")] {
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
