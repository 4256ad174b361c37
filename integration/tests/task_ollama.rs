//! `engine = "ollama"` tasks and the shared Ollama store, against the real
//! Docker engine and a real registry (Debian's `docker-registry`) serving
//! Ollama-layout models: StartTask is refused while a model is incomplete,
//! naming the fix; after the agent's prewarm the container sees the store
//! read-only at `OLLAMA_MODELS` with `OLLAMA_NOPRUNE=1`, the driver's preload
//! reaches the server and loads the model from it; the model is marked in use
//! and advertised warm; `prewarm = true` fetches a missing model itself.

use std::time::Duration;

use aimodel_integration::ollamareg::{OllamaRegistry, MODEL, PARAMS, TEMPLATE};
use aimodel_integration::support::{agent_ok, binary, standin_image};
use aimodel_integration::task::{free_port, TaskBuilder};
use aimodel_integration::tasksim::*;
use aimodel_proto::drivers::StartTaskRequest;
use aimodel_proto::structs::attribute::Value as A;
use tonic::Code;

fn weights(n: usize, seed: u8) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend((0..n).map(|i| u8::try_from(i % 256).unwrap().wrapping_mul(31).wrapping_add(seed)));
    v
}

#[tokio::test]
async fn ollama_models_are_gated_mounted_read_only_and_preloaded() {
    let Some(reg) = OllamaRegistry::start() else { return };
    reg.push_model(
        "library/tiny",
        "1b",
        &[(MODEL, &weights(64 << 10, 1)), (TEMPLATE, b"{{ .Prompt }}"), (PARAMS, b"{}")],
    );
    reg.push_model("library/other", "2b", &[(MODEL, &weights(32 << 10, 2)), (TEMPLATE, b"{{ .Prompt }}")]);
    let endpoint = reg.endpoint();
    let Some(mut sim) =
        Sim::start_with("fingerprint_period = \"300ms\"", &[("AIMODEL_OLLAMA_REGISTRY", endpoint.as_str())]).await
    else {
        return;
    };
    let home = sim.cache.path().to_path_buf();
    let image = standin_image().unwrap();
    let cfg = format!("engine = \"ollama\"\nimage = \"{image}\"\nport = \"http\"\nmodels = [\"tiny:1b\"]\n");
    let b = TaskBuilder::new("ollama", &cfg).port("http", free_port(), 0);
    let t = sim.prepare(&b);

    // Not in the store: refused as recoverable, with the command that fixes it.
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "Nomad retries while it warms");
    assert!(err.message().contains("tiny:1b: no manifest at"), "{}", err.message());
    assert!(
        err.message().contains(&format!("Fix: aimodel-agent --hf-home {} prewarm ollama://tiny:1b", home.display())),
        "{}",
        err.message()
    );

    // The operator runs the fix.
    let out = std::process::Command::new(binary("aimodel-agent").unwrap())
        .arg("--hf-home")
        .arg(&home)
        .args(["prewarm", "ollama://tiny:1b"])
        .env("AIMODEL_OLLAMA_REGISTRY", &endpoint)
        .env_remove("OLLAMA_MODELS")
        .output()
        .unwrap();
    agent_ok(&out);
    // A blob that goes missing later is found by the gate, not by the server.
    let store = home.join("ollama");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifests/registry.ollama.ai/library/tiny/1b")).unwrap())
            .unwrap();
    let layer = store.join("blobs").join(manifest["layers"][1]["digest"].as_str().unwrap().replace(':', "-"));
    let kept = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &kept[..kept.len() - 1]).unwrap();
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("bytes, the manifest lists"), "{}", err.message());
    std::fs::write(&layer, &kept).unwrap();

    let handle = sim.start_prepared(&t).await;
    let id = t.config.id.clone();
    let ev = sim.live.wait_event(&id, ", complete in the store", Duration::from_secs(5)).await.unwrap();
    assert!(ev.message.starts_with("ollama model tiny:1b is sha256:"), "{}", ev.message);
    let ev = sim.live.wait_event(&id, "model tiny:1b loaded after", Duration::from_secs(30)).await.unwrap();
    assert!(ev.message.ends_with(" s"), "{}", ev.message);

    // What the server saw: the store read-only, pruning off, the preload request.
    let text = t
        .stdout
        .clone()
        .unwrap()
        .wait_for(Duration::from_secs(10), |s| s.contains("loaded model tiny:1b"))
        .await
        .unwrap();
    assert!(text.contains("ollama store /root/.ollama/models: writable=false noprune=1"), "{text}");
    assert!(text.contains("loaded model tiny:1b: 4 blobs"), "{text}");
    assert!(text.contains("\"keep_alive\":-1"), "{text}");
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    let mounts = docker_out(&["inspect", "-f", "{{json .Mounts}}", &state.container_id]);
    let mounts: serde_json::Value = serde_json::from_str(mounts.trim()).unwrap();
    let m =
        mounts.as_array().unwrap().iter().find(|m| m["Destination"] == "/root/.ollama/models").expect("store mount");
    assert_eq!(m["RW"], false, "{m}");
    assert_eq!(m["Source"], store.display().to_string(), "{m}");

    // In use for every agent's gc, warm for the scheduler.
    let hub = home.join("hub");
    let markers = hf_cache::state::StateDir::for_hub(&hub).in_use(Duration::from_secs(600));
    assert!(markers.iter().any(|(u, _, live)| *live && u.uses("ollama/tiny:1b") && u.task == id), "{markers:?}");
    let warm = "driver.aimodel.warm.ollama/tiny:1b";
    let f = sim.live.fingerprint_where(Duration::from_secs(10), |f| f.attributes.contains_key(warm)).await.unwrap();
    assert!(matches!(f.attributes[warm].value.clone(), Some(A::StringVal(s)) if s.starts_with("sha256:")));

    sim.destroy(&id).await;
    let markers = hf_cache::state::StateDir::for_hub(&hub).in_use(Duration::from_secs(600));
    assert!(!markers.iter().any(|(u, _, _)| u.task == id), "{markers:?}");

    // prewarm = true: the driver has the agent fetch what is missing, from the
    // plugin's registry, then starts.
    let cfg = format!(
        "engine = \"ollama\"\nimage = \"{image}\"\nport = \"http\"\nmodel = \"other:2b\"\nmodels = [\"tiny:1b\"]\nprewarm = true\n"
    );
    let b = TaskBuilder::new("ollama2", &cfg).port("http", free_port(), 0);
    let (t, _) = sim.start_task(&b).await;
    sim.live.wait_event(&t.config.id, "prewarm = true: fetching", Duration::from_secs(5)).await.unwrap();
    sim.live.wait_event(&t.config.id, "model other:2b loaded after", Duration::from_secs(30)).await.unwrap();
    sim.live.wait_event(&t.config.id, "model tiny:1b loaded after", Duration::from_secs(30)).await.unwrap();
    assert!(store.join("manifests/registry.ollama.ai/library/other/2b").is_file());
    sim.destroy(&t.config.id).await;
}
