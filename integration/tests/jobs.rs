//! Every file in jobs/ parses; every aimodel task config goes through the same
//! path as StartTask (schema → cty-msgpack → typed config); variables and port
//! labels are consistent; and each stack's tasks run through the simulator
//! against Docker with the engine image swapped for the local stand-in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use aimodel_driver::config::{decode_plugin_config, decode_task_config, PLUGIN_SCHEMA, TASK_SCHEMA};
use aimodel_driver::engine::LABEL_ALLOC_ID;
use aimodel_driver::schema::to_spec;
use aimodel_integration::hcl_eval::plugin_stanza;
use aimodel_integration::jobrun::{aimodel_tasks, eval_context, seed_tiny_model};
use aimodel_integration::sequence::{self, encode_config};
use aimodel_integration::support::{
    binary, http_body, remove_containers_with_label, require_docker, standin_image, DRIVER_BIN, STANDIN_IMAGE,
};
use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};

fn jobs_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../jobs"))
}

fn files() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(jobs_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "hcl"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
        .collect();
    out.sort();
    out
}

/// Every jobspec (not the volume specs).
fn all_jobs() -> Vec<(String, String)> {
    files().into_iter().filter(|(n, _)| n.ends_with(".nomad.hcl") && !n.contains("volume")).collect()
}

/// The model-serving stacks (every jobspec but the node agent's).
fn job_files() -> Vec<(String, String)> {
    all_jobs().into_iter().filter(|(n, _)| n != AGENT_JOB).collect()
}

const AGENT_JOB: &str = "aimodel-agent.nomad.hcl";

#[test]
fn every_file_parses() {
    let all = files();
    assert!(
        all.len() >= 8,
        "expected the stacks, volumes and client config, got {:?}",
        all.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (name, text) in &all {
        hcl::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn declared_variables_cover_every_use() {
    for (name, text) in all_jobs() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let declared: BTreeSet<String> = body
            .blocks()
            .filter(|b| b.identifier.as_str() == "variable")
            .filter_map(|b| b.labels.first().map(|l| l.as_str().to_string()))
            .collect();
        let mut used = BTreeSet::new();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("var.") {
            let tail = &rest[i + 4..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            used.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
        let missing: Vec<_> = used.difference(&declared).collect();
        assert!(missing.is_empty(), "{name}: variables used but not declared: {missing:?}");
        for v in ["region", "datacenters"] {
            assert!(declared.contains(v), "{name}: no variable {v:?}");
        }
    }
}

#[test]
fn every_aimodel_task_config_decodes_like_start_task() {
    let schema = to_spec(TASK_SCHEMA);
    let mut engines = BTreeSet::new();
    for (name, text) in job_files() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        let tasks = aimodel_tasks(&body, &ctx).unwrap();
        assert!(!tasks.is_empty(), "{name} has no aimodel task");
        for t in tasks {
            let bytes = t.encoded_config(&schema, &ctx, None).unwrap_or_else(|e| panic!("{name}/{}: {e:#}", t.name));
            let cfg = decode_task_config(&bytes).unwrap_or_else(|e| panic!("{name}/{}: {e}", t.name));
            if let Some(port) = &cfg.port {
                assert!(
                    t.ports.contains(port),
                    "{name}/{}: port {port:?} is not in the group network {:?}",
                    t.name,
                    t.ports
                );
            }
            engines.insert(cfg.engine.as_str());
        }
    }
    for e in ["vllm", "sglang", "sglang-router", "ollama", "ray"] {
        assert!(engines.contains(e), "no jobspec runs engine {e}");
    }
}

#[test]
fn the_client_configuration_is_valid_plugin_config() {
    let text = std::fs::read_to_string(jobs_dir().join("client.hcl")).unwrap();
    let (_, body) = plugin_stanza(&text, DRIVER_BIN).unwrap().expect("a plugin \"nomad-driver-aimodel\" block");
    let bytes = encode_config(&to_spec(PLUGIN_SCHEMA), &body).unwrap();
    let cfg = decode_plugin_config(&bytes).unwrap();
    assert_eq!(cfg.hf_cache.host_path, "/mnt/hf-cache");
}

/// The flags each engine's command line must carry, as the stand-in echoes them.
fn expected(engine: &str) -> &'static [&'static str] {
    match engine {
        "vllm" => &["--model ", "--served-model-name ", "--host 0.0.0.0", "--port "],
        "sglang" => &["-m sglang.launch_server", "--model-path ", "--port "],
        "sglang-router" => &["-m sglang_router.launch_router", "--worker-urls ${WORKER_URLS}"],
        "ollama" => &["serve"],
        "ray" => &["start --block", "--dashboard-host=0.0.0.0"],
        _ => &[],
    }
}

#[tokio::test]
async fn every_stack_runs_through_the_simulator() {
    if !require_docker() {
        return;
    }
    standin_image().unwrap();
    let (tmp, data, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let hcl = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    allow_host_network = true\n    hf_cache {{ host_path = \"{}\" }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
        cache.path().display()
    );
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &[("TMPDIR", tmp.path().to_str().unwrap())])
        .await
        .unwrap()
        .live;
    let task_schema = to_spec(TASK_SCHEMA);
    let mut ran = 0;
    for (name, text) in job_files() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        for t in aimodel_tasks(&body, &ctx).unwrap() {
            let cfg = decode_task_config(&t.encoded_config(&task_schema, &ctx, None).unwrap()).unwrap();
            if let Some(model) = &cfg.model {
                seed_tiny_model(&cache.path().join("hub"), model).unwrap();
            }
            let prepared = t.prepare(&live.task_schema, &ctx, Some(STANDIN_IMAGE), data.path()).unwrap();
            let id = prepared.config.id.clone();
            live.process
                .driver()
                .start_task(StartTaskRequest { task: Some(prepared.config.clone()) })
                .await
                .unwrap_or_else(|e| panic!("{name}/{}: {e:?}", t.name));
            let out = prepared.stdout.clone().unwrap();
            let text = out
                .wait_for(Duration::from_secs(20), |s| s.contains("standin starting"))
                .await
                .unwrap_or_else(|e| panic!("{name}/{}: {e}", t.name));
            let line = text.lines().find(|l| l.contains("standin starting")).unwrap();
            for flag in expected(cfg.engine.as_str()) {
                assert!(
                    line.contains(flag),
                    "{name}/{} ({}): {flag:?} missing from {line:?}",
                    t.name,
                    cfg.engine.as_str()
                );
            }
            if let Some(model) = &cfg.model {
                assert!(line.contains(model.as_str()), "{name}/{}: model not on the command line: {line}", t.name);
            }
            live.process.driver().destroy_task(DestroyTaskRequest { task_id: id, force: true }).await.unwrap();
            remove_containers_with_label(LABEL_ALLOC_ID, &prepared.config.alloc_id);
            ran += 1;
        }
    }
    assert!(ran >= 8, "ran {ran} tasks");
    live.kill().await.unwrap();
}

fn block<'a>(body: &'a hcl::Body, name: &str) -> Vec<&'a hcl::Block> {
    body.blocks().filter(|b| b.identifier.as_str() == name).collect()
}

fn attr_str(body: &hcl::Body, key: &str, ctx: &hcl::eval::Context) -> Option<String> {
    use hcl::eval::Evaluate;
    body.attributes().find(|a| a.key.as_str() == key).and_then(|a| match a.expr.evaluate(ctx).ok()? {
        hcl::Value::String(s) => Some(s),
        v => Some(v.to_string()),
    })
}

/// The node-agent system job: its manifest template renders (as Nomad would,
/// for the `env` lookups it uses) into a configuration the agent accepts, and
/// the agent run with it serves `/health` on the job's metrics port and
/// prewarms the manifest's models (from a local hub), with the cache at the
/// volume mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_agent_job_renders_a_manifest_the_agent_runs() {
    let text = std::fs::read_to_string(jobs_dir().join(AGENT_JOB)).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
    let job = &block(&body, "job")[0].body;
    assert_eq!(attr_str(job, "type", &ctx).as_deref(), Some("system"));
    let group = &block(job, "group")[0].body;
    let network = &block(group, "network")[0].body;
    let port = block(network, "port").into_iter().find(|p| p.labels[0].as_str() == "metrics").expect("a metrics port");
    let static_port = attr_str(&port.body, "static", &ctx).unwrap();
    let service = &block(group, "service")[0].body;
    assert_eq!(attr_str(service, "port", &ctx).as_deref(), Some("metrics"));
    assert_eq!(attr_str(&block(service, "check")[0].body, "path", &ctx).as_deref(), Some("/health"));
    let task = &block(group, "task")[0].body;
    let mount = &block(task, "volume_mount")[0].body;
    let vol = attr_str(mount, "volume", &ctx).unwrap();
    assert!(block(group, "volume").iter().any(|v| v.labels[0].as_str() == vol), "volume {vol} is declared");
    let cache_mount = attr_str(mount, "destination", &ctx).unwrap();
    let templates = block(task, "template");
    let manifest = templates
        .iter()
        .find(|t| attr_str(&t.body, "destination", &ctx).as_deref() == Some("local/agent.hcl"))
        .expect("the manifest template");
    let args = block(task, "config")[0].body.attributes().find(|a| a.key.as_str() == "args").unwrap().expr.to_string();
    assert!(args.contains("local/agent.hcl"), "the agent reads the rendered manifest: {args}");
    let secrets = templates.iter().find(|t| attr_str(&t.body, "env", &ctx).as_deref() == Some("true")).unwrap();
    assert!(attr_str(&secrets.body, "destination", &ctx).unwrap().starts_with("secrets/"));

    // Render: HCL interpolation (variables) first, then the consul-template `env` lookups.
    let hub_server = aimodel_integration::faulthub::FaultHub::start(vec![7u8; 300_000]).await.unwrap();
    // Nomad through the task API socket with the workload identity: no token in the job.
    assert!(block(task, "identity").iter().any(|i| attr_str(&i.body, "env", &ctx).as_deref() == Some("true")));
    let secrets_data = attr_str(&secrets.body, "data", &ctx).unwrap();
    assert!(!secrets_data.contains("NOMAD_TOKEN"), "no stored Nomad token: {secrets_data}");
    let home = tempfile::tempdir().unwrap();
    let secrets_dir = home.path().join("secrets");
    std::fs::create_dir(&secrets_dir).unwrap();
    let nomad = aimodel_integration::nomadapi::NomadApi::start_unix(&secrets_dir.join("api.sock")).await.unwrap();
    let rendered =
        attr_str(&manifest.body, "data", &ctx).unwrap().replace("{{ env \"NOMAD_PORT_metrics\" }}", &static_port);
    assert!(!rendered.contains("{{") && !rendered.contains("${"), "unrendered: {rendered}");
    assert!(rendered.contains(&format!("hf_home  = \"{cache_mount}\"")), "the cache is the volume mount: {rendered}");
    // The test's stand-in for the mount and for the wildcard listener.
    let rendered = rendered
        .replace(&format!("\"{cache_mount}\""), &format!("\"{}\"", home.path().display()))
        .replace("0.0.0.0:", "127.0.0.1:");
    let cfg = home.path().join("agent.hcl");
    std::fs::write(&cfg, &rendered).unwrap();
    let agent = binary("aimodel-agent").unwrap();
    let check = std::process::Command::new(&agent).args(["run", "--check", "--config"]).arg(&cfg).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let listed = String::from_utf8_lossy(&check.stdout);
    assert!(listed.contains("mistralai/Mistral-7B-Instruct-v0.3@main (pinned)"), "{listed}");

    let mut child = tokio::process::Command::new(&agent)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("HF_ENDPOINT", hub_server.endpoint())
        .env_remove("NOMAD_ADDR")
        .env("NOMAD_SECRETS_DIR", &secrets_dir)
        .env("NOMAD_TOKEN", "workload-identity")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let port: u16 = static_port.parse().unwrap();
    loop {
        let st = http_body(port, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&st).unwrap_or_default();
        let warm = v["models"].as_array().map(|m| m.iter().filter(|m| m["state"] == "warm").count()).unwrap_or(0);
        if warm == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "manifest models not warm: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(http_body(port, "/metrics").await.contains("aimodel_agent_model_warm"));
    assert!(nomad.seen().iter().any(|s| s.path.starts_with("/v1/jobs")), "the agent watches the Nomad API");
    assert!(nomad.seen().iter().all(|s| s.token.as_deref() == Some("workload-identity")));
    let _ = child.kill().await;
}

/// Every `constraint`/`affinity` on a `driver.aimodel.*` attribute names one
/// the plugin's fingerprint can report (after HCL evaluation, so escapes such
/// as `$${attr.driver.aimodel.warm.${var.model}}` are checked as Nomad sees them).
#[test]
fn placement_rules_name_attributes_the_driver_reports() {
    fn walk(body: &hcl::Body, ctx: &hcl::eval::Context, out: &mut Vec<String>) {
        for b in body.blocks() {
            if matches!(b.identifier.as_str(), "constraint" | "affinity") {
                if let Some(a) = attr_str(&b.body, "attribute", ctx) {
                    out.push(a);
                }
            }
            walk(&b.body, ctx, out);
        }
    }
    let known = |key: &str| {
        let k = key.trim_start_matches("${attr.driver.aimodel.").trim_end_matches('}');
        k.starts_with("hf_cache.")
            || k.starts_with("nvidia.")
            || k.starts_with("docker.")
            || k == "version"
            || k.strip_prefix("gpu.").is_some()
            || k.strip_prefix("warm.").is_some_and(|repo| repo.split('/').count() == 2 && !repo.contains('$'))
    };
    let mut seen = 0;
    for (name, text) in all_jobs() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        let mut attrs = Vec::new();
        walk(&body, &ctx, &mut attrs);
        for a in attrs.iter().filter(|a| a.starts_with("${attr.driver.aimodel.")) {
            assert!(known(a), "{name}: {a} is not an attribute the driver reports");
            seen += 1;
        }
        if name == "vllm.nomad.hcl" {
            assert!(
                attrs.contains(&"${attr.driver.aimodel.warm.mistralai/Mistral-7B-Instruct-v0.3}".to_string()),
                "{attrs:?}"
            );
        }
    }
    assert!(seen > 0);
}
