//! Running the `driver = "aimodel"` tasks of a Nomad jobspec through the
//! simulator: variables, the task's config/env/resources and the group's
//! ports, as a Nomad client would hand them to the driver.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use hcl::eval::{Context as EvalContext, Evaluate};
use hcl::{Block, Body};
use sha2::{Digest, Sha256};

use aimodel_driver::nomad::cty::{self, Value};
use aimodel_proto::hclspec::Spec;

use crate::hcl_eval::eval_body;
use crate::task::{free_port, PreparedTask, TaskBuilder};

/// One aimodel task found in a jobspec.
#[derive(Debug, Clone)]
pub struct JobTask {
    pub job: String,
    pub group: String,
    pub name: String,
    pub config: Body,
    pub env: BTreeMap<String, String>,
    pub memory_mb: i64,
    pub cpu: i64,
    /// Port labels of the group's `network` block.
    pub ports: Vec<String>,
    pub bridge: bool,
}

fn blocks<'a>(body: &'a Body, name: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier.as_str() == name)
}

fn label(b: &Block) -> String {
    b.labels.first().map(|l| l.as_str().to_string()).unwrap_or_default()
}

/// The evaluation context of a jobspec: `var.<name>` from variable defaults,
/// overridden by `vars`, and `local.<name>` from `locals` blocks.
pub fn eval_context(body: &Body, vars: &BTreeMap<String, String>) -> Result<EvalContext<'static>> {
    let mut values = hcl::Map::new();
    let empty = EvalContext::new();
    for v in blocks(body, "variable") {
        let name = label(v);
        if let Some(d) = v.body.attributes().find(|a| a.key.as_str() == "default") {
            values.insert(name.clone(), d.expr.evaluate(&empty).map_err(|e| anyhow::anyhow!("variable {name}: {e}"))?);
        }
    }
    for (k, v) in vars {
        values.insert(k.clone(), hcl::Value::String(v.clone()));
    }
    let mut ctx = EvalContext::new();
    ctx.declare_var("var", hcl::Value::Object(values));
    // `locals { … }`: evaluated with the variables (not with each other).
    let mut locals = hcl::Map::new();
    for l in blocks(body, "locals") {
        for a in l.body.attributes() {
            let v = a.expr.evaluate(&ctx).map_err(|e| anyhow::anyhow!("local.{}: {e}", a.key.as_str()))?;
            locals.insert(a.key.as_str().to_string(), v);
        }
    }
    ctx.declare_var("local", hcl::Value::Object(locals));
    Ok(ctx)
}

/// Every `driver = "aimodel"` task of a jobspec.
pub fn aimodel_tasks(body: &Body, ctx: &EvalContext) -> Result<Vec<JobTask>> {
    let mut out = Vec::new();
    for job in blocks(body, "job") {
        for group in blocks(&job.body, "group") {
            let network = blocks(&group.body, "network").next();
            let ports: Vec<String> = network.map(|n| blocks(&n.body, "port").map(label).collect()).unwrap_or_default();
            let bridge = network.is_some_and(|n| {
                n.body
                    .attributes()
                    .any(|a| a.key.as_str() == "mode" && a.expr.evaluate(ctx).ok() == Some("bridge".into()))
            });
            for task in blocks(&group.body, "task") {
                let driver = task.body.attributes().find(|a| a.key.as_str() == "driver");
                let driver = driver.map(|a| a.expr.evaluate(ctx)).transpose()?;
                if driver != Some(hcl::Value::from("aimodel")) {
                    continue;
                }
                let config = blocks(&task.body, "config").next().map(|b| b.body.clone()).unwrap_or_default();
                let mut env = BTreeMap::new();
                for e in blocks(&task.body, "env") {
                    for a in e.body.attributes() {
                        let v = crate::hcl_eval::evaluate_lenient(&a.expr, ctx)
                            .map_err(|err| anyhow::anyhow!("env {}: {err}", a.key))?;
                        env.insert(a.key.to_string(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                    }
                }
                let (mut memory_mb, mut cpu) = (300, 100);
                for r in blocks(&task.body, "resources") {
                    for a in r.body.attributes() {
                        let v = crate::hcl_eval::evaluate_lenient(&a.expr, ctx)?.as_i64().unwrap_or(0);
                        match a.key.as_str() {
                            "memory" => memory_mb = v,
                            "cpu" => cpu = v,
                            _ => {}
                        }
                    }
                }
                out.push(JobTask {
                    job: label(job),
                    group: label(group),
                    name: label(task),
                    config,
                    env,
                    memory_mb,
                    cpu,
                    ports: ports.clone(),
                    bridge,
                });
            }
        }
    }
    Ok(out)
}

impl JobTask {
    /// The driver config as Nomad would encode it; `image` replaced when given.
    pub fn encoded_config(&self, schema: &Spec, ctx: &EvalContext, image: Option<&str>) -> Result<Vec<u8>> {
        let mut value = eval_body(schema, &self.config, ctx).with_context(|| format!("task {}", self.name))?;
        if let (Some(img), Value::Map(m)) = (image, &mut value) {
            m.insert("image".into(), Value::str(img));
        }
        Ok(cty::encode(&value))
    }

    /// A TaskConfig for this task, ports assigned like Nomad's allocator would.
    pub fn prepare(
        &self,
        schema: &Spec,
        ctx: &EvalContext,
        image: Option<&str>,
        data_dir: &Path,
    ) -> Result<PreparedTask> {
        let mut b = TaskBuilder::new(&self.name, "");
        b.job = self.job.clone();
        b.group = self.group.clone();
        b.memory_mb = self.memory_mb;
        b.cpu_shares = self.cpu;
        b.group_network = self.bridge;
        for p in &self.ports {
            let port = free_port();
            b = b.port(p, port, if self.bridge { port } else { 0 });
        }
        for (k, v) in &self.env {
            b = b.env(k, v);
        }
        let mut prepared = b.build(&placeholder_schema(), data_dir)?;
        prepared.config.msgpack_driver_config = self.encoded_config(schema, ctx, image)?;
        Ok(prepared)
    }
}

/// An empty object spec: `TaskBuilder::build` then gets the real config separately.
fn placeholder_schema() -> Spec {
    use aimodel_proto::hclspec::{spec::Block as S, Object};
    Spec { block: Some(S::Object(Object { attributes: Default::default() })) }
}

/// The tiny demo model: plain files and the bytes of its LFS `model.safetensors`.
pub fn tiny_model_files() -> (Vec<(String, Vec<u8>)>, Vec<u8>) {
    (
        vec![
            ("config.json".into(), br#"{"architectures":["TinyChat"],"hidden_size":8,"vocab_size":16}"#.to_vec()),
            ("tokenizer.json".into(), br#"{"model":{"vocab":{"hello":0,"world":1}}}"#.to_vec()),
        ],
        (0..4096u32).map(|i| (i % 251) as u8).collect(),
    )
}

/// Writes a tiny model into an HF hub cache in huggingface_hub's layout with
/// `hf_cache::publish` (blobs, relative snapshot links, trees listing, `refs/main`).
/// The demo's stand-in for what `aimodel-agent prewarm` will do.
pub fn seed_tiny_model(hub: &Path, repo: &str) -> Result<String> {
    use hf_cache::publish::{publish_snapshot, NewFile};
    if !repo.contains('/') {
        bail!("repo must be org/name");
    }
    let files = vec![
        NewFile {
            path: "config.json".into(),
            bytes: br#"{"architectures":["TinyChat"],"hidden_size":8,"vocab_size":16}"#.to_vec(),
            lfs: false,
        },
        NewFile {
            path: "tokenizer.json".into(),
            bytes: br#"{"model":{"vocab":{"hello":0,"world":1}}}"#.to_vec(),
            lfs: false,
        },
        NewFile { path: "model.safetensors".into(), bytes: (0..4096u32).map(|i| (i % 251) as u8).collect(), lfs: true },
    ];
    let mut h = Sha256::new();
    for f in &files {
        h.update(f.path.as_bytes());
        h.update(&f.bytes);
    }
    let commit: String = format!("{:x}", h.finalize())[..40].to_string();
    publish_snapshot(hub, &hf_cache::RepoId::model(repo), &commit, "main", &files)?;
    Ok(commit)
}

/// Writes a tiny Ollama model into a store in Ollama's layout (blobs named by
/// their sha256, the manifest last), as `aimodel-agent prewarm ollama://…`
/// leaves it. Returns the manifest's digest.
pub fn seed_tiny_ollama_model(store: &Path, name: &str) -> Result<String> {
    let name = hf_cache::ollama::ModelName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let hex = |b: &[u8]| format!("{:x}", Sha256::digest(b));
    let mut weights = b"GGUF".to_vec();
    weights.extend((0..4096u32).map(|i| (i % 251) as u8));
    let blobs: Vec<(&str, Vec<u8>)> = vec![
        (
            "application/vnd.docker.container.image.v1+json",
            br#"{"model_format":"gguf","model_family":"tiny"}"#.to_vec(),
        ),
        (hf_cache::ollama::MEDIA_TYPE_MODEL, weights),
        ("application/vnd.ollama.image.template", b"{{ .Prompt }}".to_vec()),
    ];
    std::fs::create_dir_all(store.join("blobs"))?;
    let mut entries = Vec::new();
    for (media, bytes) in &blobs {
        let digest = hex(bytes);
        std::fs::write(store.join("blobs").join(format!("sha256-{digest}")), bytes)?;
        entries
            .push(serde_json::json!({"mediaType": media, "digest": format!("sha256:{digest}"), "size": bytes.len()}));
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": hf_cache::ollama::MEDIA_TYPE_MANIFEST,
        "config": entries[0],
        "layers": entries[1..],
    }))?;
    let path = hf_cache::ollama::Store::new(store).manifest_path(&name);
    std::fs::create_dir_all(path.parent().context("manifest path")?)?;
    std::fs::write(&path, &manifest)?;
    Ok(format!("sha256:{}", hex(&manifest)))
}

/// Seeds what a task needs to pass the driver's gate: its HF model into `hf_home/hub`,
/// or, for `engine = "ollama"`, each of its models into `hf_home/ollama`. Returns
/// `model@commit` lines for the log.
pub fn seed_task_models(hf_home: &Path, cfg: &aimodel_driver::config::TaskConfig) -> Result<Vec<String>> {
    if cfg.engine == aimodel_driver::config::Engine::Ollama {
        let store = hf_cache::ollama::default_store(hf_home);
        let names = cfg.ollama_models().map_err(|e| anyhow::anyhow!("{e}"))?;
        return names.iter().map(|n| Ok(format!("{n}@{}", seed_tiny_ollama_model(&store, &n.short())?))).collect();
    }
    match &cfg.model {
        Some(model) => Ok(vec![format!("{model}@{}", seed_tiny_model(&hf_home.join("hub"), model)?)]),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_aimodel_tasks_and_variables() {
        let text = r#"
variable "model" { default = "org/m" }
job "j" {
  group "g" {
    network {
      mode = "bridge"
      port "http" {}
    }
    task "a" {
      driver = "aimodel"
      config {
        engine = "vllm"
        model  = var.model
      }
      env { X = "1" }
      resources { memory = 512 }
    }
    task "b" {
      driver = "docker"
    }
  }
}
"#;
        let body: Body = hcl::parse(text).unwrap();
        let ctx = eval_context(&body, &BTreeMap::new()).unwrap();
        let tasks = aimodel_tasks(&body, &ctx).unwrap();
        assert_eq!(tasks.len(), 1);
        let t = &tasks[0];
        assert_eq!((t.job.as_str(), t.group.as_str(), t.name.as_str()), ("j", "g", "a"));
        assert_eq!(t.ports, ["http"]);
        assert!(t.bridge);
        assert_eq!(t.memory_mb, 512);
        assert_eq!(t.env["X"], "1");
        let schema = aimodel_driver::nomad::hclspec::to_spec(aimodel_driver::config::TASK_SCHEMA);
        let cfg = aimodel_driver::nomad::decode::task_config(&t.encoded_config(&schema, &ctx, Some("img:1")).unwrap())
            .unwrap();
        assert_eq!(cfg.model.as_deref(), Some("org/m"));
        assert_eq!(cfg.image.as_deref(), Some("img:1"));
        let over = eval_context(&body, &BTreeMap::from([("model".into(), "x/y".into())])).unwrap();
        let cfg = aimodel_driver::nomad::decode::task_config(&t.encoded_config(&schema, &over, None).unwrap()).unwrap();
        assert_eq!(cfg.model.as_deref(), Some("x/y"));
    }

    #[test]
    fn seeded_model_has_the_hub_layout() {
        let dir = tempfile::tempdir().unwrap();
        let commit = seed_tiny_model(dir.path(), "org/tiny").unwrap();
        let repo = dir.path().join("models--org--tiny");
        assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), commit);
        let cfg = repo.join("snapshots").join(&commit).join("config.json");
        assert!(std::fs::read_link(&cfg).unwrap().starts_with("../../blobs/"));
        assert!(std::fs::read_to_string(cfg).unwrap().contains("TinyChat"));
    }
}
