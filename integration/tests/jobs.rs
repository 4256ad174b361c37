//! Every file in jobs/ parses; every aimodel task config goes through the same
//! path as StartTask (schema → cty-msgpack → typed config); variables and port
//! labels are consistent; and each stack's tasks run through the simulator
//! against Docker with the engine image swapped for the local stand-in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aimodel_driver::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
use aimodel_driver::nomad::decode::{plugin_config as decode_plugin_config, task_config as decode_task_config};
use aimodel_driver::nomad::hclspec::to_spec;
use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::hcl_eval::plugin_stanza;
use aimodel_integration::jobrun::{aimodel_tasks, eval_context, seed_task_models};
use aimodel_integration::pluginhcl::PluginHcl;
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
        "sglang-router" => &[
            "-m sglang_router.launch_router",
            "--host 0.0.0.0 --port ",
            "--worker-urls http://10.0.0.1:20001 http://10.0.0.2:20002",
        ],
        "ollama" => &["serve"],
        // On the node's network the dashboard binds the address Nomad picked for its port.
        "ray" => &["start --block", "--dashboard-host="],
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
    let hcl = PluginHcl::new(cache.path()).with("allow_host_network = true").render();
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &[("TMPDIR", tmp.path().to_str().unwrap())])
        .await
        .unwrap()
        .live;
    let task_schema = to_spec(TASK_SCHEMA);
    let mut ran = 0;
    // Whatever happens (a failed assertion included), no container is left behind.
    struct Cleanup(std::cell::RefCell<Vec<String>>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for a in self.0.borrow().iter() {
                remove_containers_with_label(LABEL_ALLOC_ID, a);
            }
        }
    }
    let cleanup = Cleanup(Default::default());
    for (name, text) in job_files() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        for t in aimodel_tasks(&body, &ctx).unwrap() {
            let cfg = decode_task_config(&t.encoded_config(&task_schema, &ctx, None).unwrap()).unwrap();
            seed_task_models(cache.path(), &cfg).unwrap();
            let prepared = t.prepare(&live.task_schema, &ctx, Some(STANDIN_IMAGE), data.path()).unwrap();
            cleanup.0.borrow_mut().push(prepared.config.alloc_id.clone());
            let id = prepared.config.id.clone();
            if cfg.engine.as_str() == "sglang-router" {
                // What the job's template renders from Consul (two registered workers).
                let local = Path::new(&prepared.config.alloc_dir).join(&t.name).join("local");
                std::fs::write(local.join("workers.txt"), "http://10.0.0.1:20001\nhttp://10.0.0.2:20002\n").unwrap();
            }
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
    // The job gives the agent its node ID (`${node.unique.id}`) for the image pull-ahead.
    let env_block = block(task, "env");
    let node_env = env_block.first().and_then(|e| e.body.attributes().find(|a| a.key.as_str() == "AIMODEL_NODE_ID"));
    assert!(node_env.is_some_and(|a| a.expr.to_string().contains("node.unique.id")), "AIMODEL_NODE_ID from the node");
    let check = std::process::Command::new(&agent)
        .args(["run", "--check", "--config"])
        .arg(&cfg)
        .env("AIMODEL_NODE_ID", "node-1")
        .output()
        .unwrap();
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
        .env("AIMODEL_NODE_ID", "node-1")
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

/// Drivers a Nomad client has built in (enabled without a plugin block; raw_exec is not).
const BUILTIN_DRIVERS: &[&str] = &["docker", "exec", "java", "qemu"];

/// What the client configuration declares: host volumes, plugins (by file name).
fn client_declares() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(jobs_dir().join("client.hcl")).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    let volumes = block(&body, "client")
        .iter()
        .flat_map(|c| block(&c.body, "host_volume"))
        .filter_map(|v| v.labels.first().map(|l| l.as_str().to_string()))
        .collect();
    let plugins =
        block(&body, "plugin").iter().filter_map(|p| p.labels.first().map(|l| l.as_str().to_string())).collect();
    (volumes, plugins)
}

#[test]
fn the_client_configuration_declares_every_volume_device_and_driver_the_jobs_need() {
    let (volumes, plugins) = client_declares();
    let mut needs = Vec::new();
    for (name, text) in all_jobs() {
        let body: hcl::Body = hcl::parse(&text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        for job in block(&body, "job") {
            for group in block(&job.body, "group") {
                for v in block(&group.body, "volume") {
                    if attr_str(&v.body, "type", &ctx).as_deref() == Some("host") {
                        let src = attr_str(&v.body, "source", &ctx).expect("a host volume's source");
                        needs.push((name.clone(), format!("host_volume {src}")));
                        assert!(volumes.contains(&src), "{name}: host volume {src:?} is not declared in client.hcl");
                    }
                }
                for task in block(&group.body, "task") {
                    let driver = attr_str(&task.body, "driver", &ctx).expect("a task's driver");
                    needs.push((name.clone(), format!("driver {driver}")));
                    assert!(
                        BUILTIN_DRIVERS.contains(&driver.as_str())
                            || plugins.contains(&format!("nomad-driver-{driver}")),
                        "{name}: driver {driver:?} has no plugin block in client.hcl"
                    );
                    for res in block(&task.body, "resources") {
                        for dev in block(&res.body, "device") {
                            let d = dev.labels.first().map(|l| l.as_str().to_string()).unwrap_or_default();
                            needs.push((name.clone(), format!("device {d}")));
                            // `vendor/type[/model]`: the NVIDIA device plugin provides nvidia/gpu.
                            let vendor = d.split('/').next().unwrap_or_default();
                            assert!(
                                vendor == "nvidia" && plugins.contains("nomad-device-nvidia"),
                                "{name}: device {d:?} needs a device plugin block in client.hcl"
                            );
                        }
                    }
                }
            }
        }
    }
    for want in ["host_volume hf-cache", "device nvidia/gpu", "driver aimodel", "driver exec"] {
        assert!(needs.iter().any(|(_, n)| n == want), "no job needs {want}: {needs:?}");
    }
}

#[test]
fn the_node_agent_job_runs_as_the_cache_owner_from_a_path_inside_the_exec_chroot() {
    let text = std::fs::read_to_string(jobs_dir().join(AGENT_JOB)).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
    let job = block(&body, "job")[0];
    let task = block(&block(&job.body, "group")[0].body, "task")[0];
    assert_eq!(attr_str(&task.body, "driver", &ctx).as_deref(), Some("exec"));
    assert_eq!(attr_str(&task.body, "user", &ctx).as_deref(), Some("aimodel"), "the cache owner, not root");
    let command = attr_str(&block(&task.body, "config")[0].body, "command", &ctx).unwrap();
    assert!(command.starts_with("/usr/"), "{command}: outside the exec driver's default chroot_env");
    assert!(!block(&task.body, "identity").is_empty(), "the task API socket needs the workload identity");
    // The client keeps Nomad's default user.denylist (root): no exec job may run as root.
    let client = std::fs::read_to_string(jobs_dir().join("client.hcl")).unwrap();
    let cbody: hcl::Body = hcl::parse(&client).unwrap();
    let options = block(&cbody, "client")[0].body.attributes().find(|a| a.key.as_str() == "options");
    let denied =
        options.and_then(|o| match hcl::eval::Evaluate::evaluate(&o.expr, &hcl::eval::Context::new()).ok()? {
            hcl::Value::Object(o) => o.get("user.denylist").and_then(|v| v.as_str().map(str::to_string)),
            _ => None,
        });
    assert!(denied.as_deref().is_none_or(|d| d.split(',').any(|u| u.trim() == "root")), "{denied:?}");
}

/// The router's entrypoint script, run by /bin/sh with a stand-in `python3`
/// that prints its arguments one per line.
fn run_router_script(workers: Option<&str>) -> std::process::Child {
    let text = std::fs::read_to_string(jobs_dir().join("sglang-gateway.nomad.hcl")).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
    let job = block(&body, "job")[0];
    let router = block(&job.body, "group").into_iter().find(|g| g.labels[0].as_str() == "router").unwrap();
    let task = block(&router.body, "task")[0];
    let config = &block(&task.body, "config")[0].body;
    let entrypoint = {
        use hcl::eval::Evaluate;
        let e = config.attributes().find(|a| a.key.as_str() == "entrypoint").unwrap();
        match e.expr.evaluate(&ctx).unwrap() {
            hcl::Value::Array(v) => v.into_iter().map(|x| x.as_str().unwrap().to_string()).collect::<Vec<_>>(),
            v => panic!("entrypoint {v:?}"),
        }
    };
    assert_eq!(&entrypoint[..2], ["/bin/sh", "-c"]);
    let dir = tempfile::tempdir().unwrap().keep();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("python3"), "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\n").unwrap();
    std::fs::set_permissions(bin.join("python3"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    if let Some(w) = workers {
        std::fs::write(dir.join("workers.txt"), w).unwrap();
    }
    std::process::Command::new(&entrypoint[0])
        .args(&entrypoint[1..])
        // What the driver appends for engine = "sglang-router" (driver/src/engine.rs).
        .args(["--host", "0.0.0.0", "--port", "30000"])
        .env("NOMAD_TASK_DIR", &dir)
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_sglang_router_gets_each_worker_as_its_own_argument_and_waits_for_the_first() {
    // Two workers as the template renders them (one URL per line, a trailing newline).
    let out = run_router_script(Some("http://10.0.0.1:20001\nhttp://10.0.0.2:20002\n")).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let args: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        args,
        [
            "-m",
            "sglang_router.launch_router",
            "--host",
            "0.0.0.0",
            "--port",
            "30000",
            "--worker-urls",
            "http://10.0.0.1:20001",
            "http://10.0.0.2:20002"
        ]
    );
    // No worker yet (the template renders only a newline): it waits, and starts nothing.
    let mut child = run_router_script(Some("\n"));
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("no sglang-worker registered"), "{line}");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.stdout.is_empty(), "the router started without workers: {}", String::from_utf8_lossy(&out.stdout));
}

/// Every template string (`"…${…}…"`, heredocs) of a body parses, as Nomad's
/// jobspec parser would require (`${attr.a/b}` is a division, not a name).
fn templates_parse(body: &hcl::Body) -> Result<(), String> {
    fn expr(e: &hcl::Expression) -> Result<(), String> {
        match e {
            hcl::Expression::TemplateExpr(t) => {
                let tpl = hcl::Template::from_expr(t).map_err(|e| format!("{t}: {e}"))?;
                for el in tpl.elements() {
                    let hcl::template::Element::Interpolation(i) = el else { continue };
                    // Nomad keeps `${attr.…}` (node, meta, device) for the scheduler only
                    // when it is a plain name; `a/b` inside it is a division of unknowns.
                    let plain = matches!(i.expr, hcl::Expression::Traversal(_) | hcl::Expression::Variable(_));
                    let text = i.expr.to_string();
                    let runtime = ["attr.", "node.", "meta.", "device."].iter().any(|r| text.contains(r));
                    if runtime && !plain {
                        return Err(format!("{t}: ${{{text}}} is not a plain attribute name (escape it as $${{…}})"));
                    }
                }
                Ok(())
            }
            hcl::Expression::Array(v) => v.iter().try_for_each(expr),
            hcl::Expression::Object(o) => o.values().try_for_each(expr),
            _ => Ok(()),
        }
    }
    for s in body.iter() {
        match s {
            hcl::Structure::Attribute(a) => expr(&a.expr)?,
            hcl::Structure::Block(b) => templates_parse(&b.body)?,
        }
    }
    Ok(())
}

/// Every ```hcl block of the docs parses as HCL (as a jobspec or client configuration).
#[test]
fn every_hcl_block_in_the_docs_parses() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut files = vec![root.join("README.md")];
    files.extend(
        std::fs::read_dir(root.join("docs"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "md")),
    );
    // The check catches an unescaped `/` inside `${attr…}`, and passes the jobspecs' escaped form.
    let bad = hcl::parse("attribute = \"${attr.driver.aimodel.warm.mistralai/Mistral-7B-Instruct-v0.3}\"").unwrap();
    assert!(templates_parse(&bad).is_err());
    let good = hcl::parse("attribute = \"$${attr.driver.aimodel.warm.mistralai/Mistral-7B-Instruct-v0.3}\"").unwrap();
    assert_eq!(templates_parse(&good), Ok(()));
    let mut blocks = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut code: Option<Vec<&str>> = None;
        for line in text.lines() {
            match (&mut code, line.trim()) {
                (None, "```hcl") => code = Some(Vec::new()),
                (Some(c), "```") => {
                    let c = c.join("\n");
                    let body = hcl::parse(&c)
                        .unwrap_or_else(|e| panic!("{}: a ```hcl block does not parse: {e}\n{c}", f.display()));
                    if let Err(e) = templates_parse(&body) {
                        panic!("{}: a string of a ```hcl block does not parse: {e}\n{c}", f.display());
                    }
                    blocks += 1;
                    code = None;
                }
                (Some(c), _) => c.push(line),
                (None, _) => {}
            }
        }
        assert!(code.is_none(), "{}: an unterminated ```hcl block", f.display());
    }
    assert!(blocks >= 3, "found only {blocks} hcl blocks");
}

/// install.md's build and install commands name the workspace's packages and put
/// the binaries where `jobs/client.hcl` (plugin_dir) and the agent's system job
/// (its exec command) look for them.
#[test]
fn the_install_commands_match_the_packages_client_config_and_agent_job() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let install = std::fs::read_to_string(root.join("docs/install.md")).unwrap();
    let sh = install.split("```sh").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let package = |dir: &str| {
        let toml = std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
        toml.lines().find_map(|l| l.strip_prefix("name = ")).unwrap().trim_matches('"').to_string()
    };
    for p in [package("driver"), package("node-agent")] {
        assert!(sh.contains(&format!("-p {p}")), "install.md does not build {p}:\n{sh}");
    }
    let client: hcl::Body = hcl::parse(&std::fs::read_to_string(jobs_dir().join("client.hcl")).unwrap()).unwrap();
    let plugin_dir = attr_str(&client, "plugin_dir", &hcl::eval::Context::new()).unwrap();
    assert!(
        sh.contains(&format!("target/release/{} {plugin_dir}/", package("driver"))),
        "the plugin is not installed into {plugin_dir}:\n{sh}"
    );
    let text = std::fs::read_to_string(jobs_dir().join(AGENT_JOB)).unwrap();
    let body: hcl::Body = hcl::parse(&text).unwrap();
    let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
    let job = block(&body, "job")[0];
    let task = block(&block(&job.body, "group")[0].body, "task")[0];
    let command = attr_str(&block(&task.body, "config")[0].body, "command", &ctx).unwrap();
    let dir = Path::new(&command).parent().unwrap().display().to_string();
    assert!(
        sh.contains(&format!("target/release/aimodel-agent {dir}/")),
        "the agent is not installed where the system job runs it ({command}):\n{sh}"
    );
}
