//! Real engines, built here from Debian's packages and PyPI (scripts/images):
//! llama.cpp's `llama-server` serves the tiny random-weight GGUF model from an
//! HF cache the agent prewarmed, and SGLang's real router, started from
//! jobs/sglang-gateway.nomad.hcl through the simulator, routes to two workers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aimodel_driver::config::TASK_SCHEMA;
use aimodel_driver::nomad::decode::task_config as decode_task_config;
use aimodel_driver::nomad::hclspec::to_spec;
use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::engines::{
    engine_image, llamacpp_task, prewarm_tiny_model, run_llama_server, start_plugin_for_llama,
    time_docker_run_to_first_token, time_start_task_to_first_token, write_tiny_gguf, Container, EngineImage,
    CONTAINER_HF_HOME, TINY_GGUF_FILES,
};
use aimodel_integration::jobrun::{aimodel_tasks, eval_context, seed_tiny_model};
use aimodel_integration::openai::{self, chat_body};
use aimodel_integration::sequence;
use aimodel_integration::support::{binary, remove_containers_with_label, require_docker, standin_image, DRIVER_BIN};
use aimodel_integration::task::{free_port, PreparedTask};
use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};

/// A `llamacpp` task started through the plugin (the simulator's sequence, as
/// a Nomad client does) on the tiny model the agent prewarmed: the gate picks
/// the one file `gguf_file` matches, llama-server loads it from the cache
/// mount and generates the tokens of a chat completion. A pattern matching two
/// files is a configuration error; a truncated blob or a missing file of the
/// snapshot is refused as recoverable, with the command that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llamacpp_task_through_the_plugin_serves_the_gguf_file_the_gate_chose() {
    use aimodel_driver::nomad::status::recoverable_detail;
    if !require_docker() {
        return;
    }
    let image = engine_image(EngineImage::LlamaServer).unwrap();
    let (hf_home, tmp, data) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = prewarm_tiny_model(hf_home.path()).await.unwrap();
    let live = start_plugin_for_llama(hf_home.path(), &image, tmp.path()).await.unwrap();
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for a in &self.0 {
                remove_containers_with_label(LABEL_ALLOC_ID, a);
            }
        }
    }
    let mut cleanup = Cleanup(Vec::new());
    let mut start = |name: &str, gguf: &str, port: u16| {
        let t = llamacpp_task(name, gguf, port).build(&live.task_schema, data.path()).unwrap();
        cleanup.0.push(t.config.alloc_id.clone());
        let d = live.process.driver();
        async move {
            let mut d = d;
            let r = d.start_task(StartTaskRequest { task: Some(t.config.clone()) }).await;
            (t, r)
        }
    };

    // The second file, by pattern: the first would do by accident.
    let (served, _) = TINY_GGUF_FILES[1];
    let port = free_port();
    let (t, r) = start("llm", "*Q8_0.gguf", port).await;
    r.unwrap();
    let log = || t.stderr.as_ref().map(|o| o.text()).unwrap_or_default();
    if let Err(e) = live.wait_event(&t.config.id, "model server ready", Duration::from_secs(120)).await {
        panic!("{e}\n{}", log());
    }
    let answer = openai::post(port, "/v1/chat/completions", &chat_body("Say hello.", 12)).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v = answer.json().unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0 && !text.is_empty(), "no tokens: {v}");
    let props = openai::get(port, "/props").await.unwrap().json().unwrap();
    let path = format!("{CONTAINER_HF_HOME}/hub/{}", model.snapshot_file(served));
    assert_eq!(props["model_path"], path.as_str(), "{props}");
    let events = live.event_messages(&t.config.id).join("\n");
    assert!(events.contains(&format!("; loading {}", model.snapshot_file(served))), "{events}");
    // The tokens came from llama-server's own generation, as its log says.
    assert!(log().contains(served), "llama-server's log does not name {served}:\n{}", log());
    live.process.driver().destroy_task(DestroyTaskRequest { task_id: t.config.id.clone(), force: true }).await.unwrap();

    // Two files match: a configuration error naming them, nothing created.
    let (t, r) = start("ambiguous", "*.gguf", free_port()).await;
    let err = r.unwrap_err();
    assert_eq!(recoverable_detail(&err), None, "{err:?}");
    assert!(err.message().contains("gguf_file") && err.message().contains("matches 2 files"), "{}", err.message());
    assert!(container_of(&t.config.alloc_id).is_empty());

    // A truncated blob, then a missing file: the model is not complete.
    let hub = hf_home.path().join("hub");
    let blob = std::fs::canonicalize(hub.join(model.snapshot_file(TINY_GGUF_FILES[0].0))).unwrap();
    let len = std::fs::metadata(&blob).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&blob).unwrap().set_len(len / 2).unwrap();
    std::fs::remove_file(hub.join(model.snapshot_file(served))).unwrap();
    for (name, file) in [("short", TINY_GGUF_FILES[0].0), ("missing", served)] {
        let (t, r) = start(name, file, free_port()).await;
        let err = r.unwrap_err();
        assert_eq!(recoverable_detail(&err), Some(true), "Nomad must retry once the cache is fixed: {err:?}");
        let m = err.message();
        assert!(m.contains("is not complete") && m.contains(file), "{m}");
        assert!(m.contains(&format!("Fix: aimodel-agent --hf-home {} prewarm", hf_home.path().display())), "{m}");
        assert!(container_of(&t.config.alloc_id).is_empty(), "{name}: a container was created");
    }
    drop(cleanup);
    live.kill().await.unwrap();
}

/// The bench's two halves work: StartTask through the driver and `docker run`
/// by hand, each to the first streamed token of the same llama-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_task_and_docker_run_both_reach_a_first_token() {
    if !require_docker() {
        return;
    }
    let image = engine_image(EngineImage::LlamaServer).unwrap();
    let (hf_home, tmp, data) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let model = prewarm_tiny_model(hf_home.path()).await.unwrap();
    let live = start_plugin_for_llama(hf_home.path(), &image, tmp.path()).await.unwrap();
    let t = time_start_task_to_first_token(&live, data.path(), TINY_GGUF_FILES[0].0).await.unwrap();
    assert!(!t.text.is_empty() && t.docker_run <= t.healthy && t.healthy <= t.first_token, "{t:?}");
    let d = time_docker_run_to_first_token(&image, hf_home.path(), &model.snapshot_file(TINY_GGUF_FILES[0].0))
        .await
        .unwrap();
    assert!(!d.text.is_empty(), "{d:?}");
    live.kill().await.unwrap();
}

#[test]
fn the_tiny_gguf_is_deterministic_and_a_few_megabytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"), dir.path().join("c.gguf"));
    write_tiny_gguf(&a, 17, "f16").unwrap();
    write_tiny_gguf(&b, 17, "f16").unwrap();
    write_tiny_gguf(&c, 18, "f16").unwrap();
    let (a, b, c) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap(), std::fs::read(c).unwrap());
    assert_eq!(&a[..4], b"GGUF");
    assert!(a == b, "the same seed wrote different bytes");
    assert!(a != c, "another seed wrote the same bytes");
    assert!((1 << 20..8 << 20).contains(&a.len()), "{} bytes", a.len());
    // The real vocabulary is in it (SentencePiece pieces of llama's vocabulary).
    let piece = "▁hello".as_bytes();
    assert!(a.windows(piece.len()).any(|w| w == piece), "no llama vocabulary");
}

/// llama-server in its image, on the GGUF file inside the cache snapshot the
/// agent wrote (mounted read-only like the driver mounts the HF cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_server_answers_from_the_prewarmed_cache() {
    if !require_docker() {
        return;
    }
    let image = engine_image(EngineImage::LlamaServer).unwrap();
    let hf_home = tempfile::tempdir().unwrap();
    let model = prewarm_tiny_model(hf_home.path()).await.unwrap();
    let file = model.snapshot_file(TINY_GGUF_FILES[0].0);
    assert!(std::fs::symlink_metadata(hf_home.path().join("hub").join(&file)).unwrap().is_symlink());

    let port = free_port();
    let server = run_llama_server(&image, hf_home.path(), &file, port, &[]).unwrap();
    if let Err(e) = openai::wait_ok(port, "/health", Duration::from_secs(120)).await {
        panic!("{e}\n{}", server.logs());
    }
    let health = openai::get(port, "/health").await.unwrap().json().unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    let answer = openai::post(port, "/v1/chat/completions", &chat_body("Say hello.", 12)).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let v = answer.json().unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0 && !text.is_empty(), "no tokens generated: {v}");

    // /props names the model file, at its path inside the cache snapshot.
    let props = openai::get(port, "/props").await.unwrap().json().unwrap();
    let path = format!("{CONTAINER_HF_HOME}/hub/{file}");
    assert_eq!(props["model_path"], path.as_str(), "{props}");
    drop(server);

    // The benchmark's measurement (docker run → first streamed token) works on it.
    let t = time_docker_run_to_first_token(&image, hf_home.path(), &file).await.unwrap();
    assert!(!t.text.is_empty() && t.healthy <= t.first_token, "{t:?}");
}

/// Requests counted on a worker's side: the stand-in prints one line per request.
fn chats_seen(worker: &PreparedTask) -> usize {
    let out = worker.stdout.as_ref().map(|o| o.text()).unwrap_or_default();
    out.lines().filter(|l| l.contains("request POST /v1/chat/completions")).count()
}

fn container_of(alloc_id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label={LABEL_ALLOC_ID}={alloc_id}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn container_ip(id: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn task_port(t: &PreparedTask) -> u16 {
    let r = t.config.resources.as_ref().unwrap();
    u16::try_from(r.ports[0].value).unwrap()
}

/// jobs/sglang-gateway.nomad.hcl through the simulator: two workers (the
/// stand-in speaking SGLang's worker endpoints) and the real router
/// (sglang-router from PyPI), whose command line comes from the job's script
/// with the worker URLs its template would render. Requests reach both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sglang_gateway_job_routes_through_the_real_router_to_both_workers() {
    if !require_docker() {
        return;
    }
    let standin = standin_image().unwrap();
    let router_image = engine_image(EngineImage::SglangRouter).unwrap();
    let (tmp, data, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hcl = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    hf_cache {{ host_path = \"{}\" }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
        cache.path().display()
    );
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &[("TMPDIR", tmp.path().to_str().unwrap())])
        .await
        .unwrap()
        .live;
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../jobs/sglang-gateway.nomad.hcl")).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    // Round robin: the default cache_aware keeps similar requests on one worker.
    let vars = BTreeMap::from([("router_policy".to_string(), "round_robin".to_string())]);
    let ctx = eval_context(&body, &vars).unwrap();
    let tasks = aimodel_tasks(&body, &ctx).unwrap();
    let worker = tasks.iter().find(|t| t.group == "workers").unwrap();
    let router = tasks.iter().find(|t| t.group == "router").unwrap();

    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for a in &self.0 {
                remove_containers_with_label(LABEL_ALLOC_ID, a);
            }
        }
    }
    let mut cleanup = Cleanup(Vec::new());
    let start = |t: PreparedTask| {
        let d = live.process.driver();
        async move {
            let mut d = d;
            d.start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap();
            t
        }
    };

    // Two workers (the group's count), the model seeded in the cache as the driver requires.
    let cfg = decode_task_config(&worker.encoded_config(&to_spec(TASK_SCHEMA), &ctx, None).unwrap()).unwrap();
    seed_tiny_model(&cache.path().join("hub"), cfg.model.as_deref().unwrap()).unwrap();
    let mut workers = Vec::new();
    let mut urls = String::new();
    for _ in 0..2 {
        let t = worker.prepare(&live.task_schema, &ctx, Some(&standin), data.path()).unwrap();
        cleanup.0.push(t.config.alloc_id.clone());
        let t = start(t).await;
        live.wait_event(&t.config.id, "model server ready", Duration::from_secs(60)).await.unwrap();
        // What the template renders from Consul; on Docker's bridge the worker is
        // reached at its container address and the port it listens on.
        let ip = container_ip(&container_of(&t.config.alloc_id));
        urls.push_str(&format!("http://{ip}:{}\n", task_port(&t)));
        workers.push(t);
    }

    let r = router.prepare(&live.task_schema, &ctx, Some(&router_image), data.path()).unwrap();
    cleanup.0.push(r.config.alloc_id.clone());
    std::fs::write(Path::new(&r.config.alloc_dir).join(&router.name).join("local/workers.txt"), &urls).unwrap();
    let r = start(r).await;
    let router_log = || r.stdout.as_ref().map(|o| o.text()).unwrap_or_default() + &r.stderr.as_ref().unwrap().text();
    if let Err(e) = live.wait_event(&r.config.id, "model server ready", Duration::from_secs(120)).await {
        panic!("{e}\n{}", router_log());
    }
    let port = task_port(&r);

    // Both URLs were separate arguments: the router registered two healthy workers.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let listed = loop {
        let v = openai::get(port, "/workers").await.ok().and_then(|r| r.json().ok()).unwrap_or_default();
        let healthy = v["workers"].as_array().map_or(0, |w| w.iter().filter(|w| w["is_healthy"] == true).count());
        if healthy == 2 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed["total"], 2, "{listed}\n{}", router_log());
    // The model id comes from the workers' /model_info and /server_info.
    assert_eq!(listed["workers"][0]["model_id"], cfg.model.as_deref().unwrap(), "{listed}");

    let sent = 6;
    for i in 0..sent {
        let a = openai::post(port, "/v1/chat/completions", &chat_body(&format!("question {i}"), 8)).await.unwrap();
        assert_eq!(a.status, 200, "{}\n{}", a.body, router_log());
        let content = a.json().unwrap()["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
        assert!(content.starts_with("Hello from"), "{content}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let seen: Vec<usize> = workers.iter().map(chats_seen).collect();
        if seen.iter().sum::<usize>() == sent || std::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen.iter().sum::<usize>(), sent, "{seen:?}");
    assert!(seen.iter().all(|n| *n > 0), "a worker got no request: {seen:?}");

    for t in workers.iter().chain([&r]) {
        live.process
            .driver()
            .destroy_task(DestroyTaskRequest { task_id: t.config.id.clone(), force: true })
            .await
            .unwrap();
    }
    drop(cleanup);
    live.kill().await.unwrap();
}

/// The real router in front of two real llama-servers (one on each GGUF file of
/// the tiny model): each worker generates tokens for some of the requests, as
/// its own metrics count and the answers' `model` (the worker's file) show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_router_spreads_chats_over_two_llama_servers() {
    if !require_docker() {
        return;
    }
    let llama = engine_image(EngineImage::LlamaServer).unwrap();
    let router_image = engine_image(EngineImage::SglangRouter).unwrap();
    let hf_home = tempfile::tempdir().unwrap();
    let model = prewarm_tiny_model(hf_home.path()).await.unwrap();
    let mut workers = Vec::new();
    for (file, _) in TINY_GGUF_FILES {
        let port = free_port();
        let c = run_llama_server(&llama, hf_home.path(), &model.snapshot_file(file), port, &["--metrics"]).unwrap();
        if let Err(e) = openai::wait_ok(port, "/health", Duration::from_secs(120)).await {
            panic!("{e}\n{}", c.logs());
        }
        workers.push((c, port, format!("{CONTAINER_HF_HOME}/hub/{}", model.snapshot_file(file))));
    }
    let port = free_port();
    let mut args: Vec<String> = ["--host", "0.0.0.0", "--port", "30000", "--policy", "round_robin", "--worker-urls"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (c, _, _) in &workers {
        args.push(format!("http://{}:8080", c.ip().unwrap()));
    }
    let router = Container::run(&router_image, &["-p".into(), format!("127.0.0.1:{port}:30000")], &args).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let v = openai::get(port, "/workers").await.ok().and_then(|r| r.json().ok()).unwrap_or_default();
        if v["workers"].as_array().is_some_and(|w| w.iter().filter(|w| w["is_healthy"] == true).count() == 2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "workers not registered: {v}\n{}", router.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut answered_by = std::collections::BTreeSet::new();
    for i in 0..4 {
        let a =
            openai::post(port, "/v1/chat/completions", &chat_body(&format!("Tell me about {i}."), 6)).await.unwrap();
        assert_eq!(a.status, 200, "{}\n{}", a.body, router.logs());
        let v = a.json().unwrap();
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
        answered_by.insert(v["model"].as_str().unwrap_or_default().to_string());
    }
    let files: std::collections::BTreeSet<String> = workers.iter().map(|w| w.2.clone()).collect();
    assert_eq!(answered_by, files, "answers did not come from both workers");
    for (c, p, _) in &workers {
        let metrics = openai::get(*p, "/metrics").await.unwrap().body;
        let predicted = metrics
            .lines()
            .find_map(|l| l.strip_prefix("llamacpp:tokens_predicted_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(predicted > 0.0, "{} generated nothing:\n{metrics}", c.name);
    }
}
