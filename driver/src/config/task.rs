//! The task configuration: `config { ... }` of a `driver = "aimodel"` task.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::auth::{RegistryAuth, AUTH_SCHEMA};
use super::units::{Bytes, Dur};
use super::ConfigError;
use crate::config::schema::{attr, block, required, Field};
pub use crate::engines::{Engine, LoadStrategy};

/// The task configuration schema, reported by `TaskConfigSchema`.
pub const TASK_SCHEMA: &[Field] = &[
    required(
        "engine",
        "string",
        "Model server: `vllm`, `sglang`, `sglang-router`, `ollama`, `tgi`, `ray`, `llamacpp` or `custom`.",
    ),
    attr("image", "string", None, "Container image; defaults to the plugin's `images` entry for the engine."),
    attr(
        "pull",
        "string",
        Some(r#""missing""#),
        "`missing`: pull only when the image is not on the node (what the agent pulled ahead is used); `always`: pull on every start (keeps tags like `latest` current).",
    ),
    attr(
        "model",
        "string",
        None,
        "HuggingFace repo id (`org/name`); required for vllm, sglang, tgi and llamacpp. Engine `ollama`: an Ollama model name (`llama3.2:3b`), served from the shared store.",
    ),
    attr(
        "models",
        "list(string)",
        None,
        "Engine `ollama`: more Ollama model names (`[\"llama3.2:3b\", \"codellama:7b\"]`); each must be complete in the shared store, and is loaded once the server answers.",
    ),
    attr(
        "gguf_file",
        "string",
        None,
        "Engine `llamacpp`: the GGUF file of `model` to serve, a path in the repo or a pattern (`*Q4_K_M.gguf`); exactly one file of the snapshot must match. Defaults to `*.gguf`.",
    ),
    attr(
        "revision",
        "string",
        Some(r#""main""#),
        "Branch, tag or commit of the model; pinned to a commit when the task starts.",
    ),
    attr("served_model_name", "string", None, "Name the server answers to in the OpenAI API; defaults to `model`."),
    attr("port", "string", None, "Label of the Nomad port the server listens on (`network { port \"http\" {} }`)."),
    attr(
        "ports",
        "list(string)",
        None,
        "More port labels to publish besides `port` (as the docker driver's `ports`); other ports of the group are not published.",
    ),
    attr("args", "list(string)", None, "Extra arguments appended to the engine's command line."),
    attr("command", "string", None, "Command to run (engine `custom`; overrides the image's command)."),
    attr("entrypoint", "list(string)", None, "Entrypoint override."),
    attr(
        "gpus",
        "string",
        None,
        "GPUs outside Nomad's scheduling, a count or `\"all\"`; needs the plugin's `gpu.allow_unscheduled` (use a `device \"nvidia/gpu\"` block instead).",
    ),
    attr("shm_size", "string", None, "Size of `/dev/shm`, e.g. `\"16g\"`."),
    attr(
        "ipc_mode",
        "string",
        None,
        "Docker IPC mode: `private`, `shareable`, `none`, or `host` (needs the plugin's `allow_host_ipc`; `shm_size` is the usual alternative).",
    ),
    attr("load_format", "string", None, "Engine weight format (vLLM `--load-format`)."),
    attr(
        "load_strategy",
        "string",
        Some(r#""auto""#),
        "`auto` (eager loading when the cache is on NFS), `eager`, `mmap` or `none`.",
    ),
    attr("offline", "bool", Some("true"), "Run with `HF_HUB_OFFLINE=1`; the model must be complete in the cache."),
    attr(
        "prewarm",
        "bool",
        Some("false"),
        "Fetch a missing model before starting, with `aimodel-agent prewarm` (beside the plugin or on PATH) from the client's `HF_ENDPOINT`, with the task's `HF_TOKEN`.",
    ),
    attr("privileged", "bool", Some("false"), "Run privileged (needs the plugin's `allow_privileged`)."),
    attr(
        "volumes",
        "list(string)",
        None,
        "Extra bind mounts, `host:container[:ro]`; a relative host path is under the task directory, and host paths outside the allocation need the plugin's `volumes.enabled`.",
    ),
    attr(
        "network_mode",
        "string",
        None,
        "`bridge` (the default: Docker's bridge, Nomad's ports published), `none`, or `host` (needs the plugin's `allow_host_network`).",
    ),
    attr("labels", "map(string)", None, "Extra container labels."),
    block("readiness", READINESS_SCHEMA, "Readiness probe of the model server."),
    block("auth", AUTH_SCHEMA, "Registry credentials for this task's image."),
];

const READINESS_SCHEMA: &[Field] = &[
    attr("path", "string", None, "HTTP path polled after start; defaults to the engine's health path."),
    attr("interval", "string", Some(r#""2s""#), "Time between readiness polls."),
    attr(
        "timeout",
        "string",
        Some(r#""30m""#),
        "How long to wait for readiness before reporting the server as not ready.",
    ),
];

/// When StartTask pulls the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when it is not on the node.
    #[default]
    Missing,
    /// On every start.
    Always,
}

/// The GPUs a task asks for in its own config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuCount {
    All,
    Count(u32),
}

/// The decoded task configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub engine: Engine,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub pull: PullPolicy,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_revision")]
    pub revision: String,
    #[serde(default)]
    pub gguf_file: Option<String>,
    #[serde(default)]
    pub served_model_name: Option<String>,
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub gpus: Option<String>,
    #[serde(default)]
    pub shm_size: Option<Bytes>,
    #[serde(default)]
    pub ipc_mode: Option<String>,
    #[serde(default)]
    pub load_format: Option<String>,
    #[serde(default)]
    pub load_strategy: LoadStrategy,
    #[serde(default = "yes")]
    pub offline: bool,
    #[serde(default)]
    pub prewarm: bool,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub volumes: Vec<String>,
    #[serde(default)]
    pub network_mode: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub readiness: Readiness,
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
}

fn default_revision() -> String {
    "main".into()
}

fn yes() -> bool {
    true
}

/// `readiness { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Readiness {
    pub path: Option<String>,
    pub interval: Dur,
    pub timeout: Dur,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness { path: None, interval: Dur(Duration::from_secs(2)), timeout: Dur(Duration::from_secs(1800)) }
    }
}

impl TaskConfig {
    /// Cross-field checks; the error names the attribute.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| Err(ConfigError::Invalid { field: field.into(), message });
        match (&self.model, self.engine.needs_model()) {
            (None, true) => return invalid("model", format!("is required for engine {:?}", self.engine.as_str())),
            (Some(m), _) if !valid_repo_id(m) && self.engine != Engine::Ollama => {
                return invalid("model", format!("{m:?} {}", hf_cache::layout::REPO_ID_RULE))
            }
            _ => {}
        }
        if self.engine == Engine::Ollama {
            self.ollama_models()?;
        } else if !self.models.is_empty() {
            return invalid("models", "is only for engine \"ollama\" (other engines serve one `model`)".into());
        }
        if !hf_cache::layout::is_safe_revision(&self.revision)
            || self.revision.contains('/') && !self.revision.starts_with("refs/")
        {
            return invalid("revision", format!("{:?} is not a branch, tag or commit", self.revision));
        }
        if let Some(g) = &self.gguf_file {
            if self.engine != Engine::Llamacpp {
                return invalid("gguf_file", "is only for engine \"llamacpp\"".into());
            }
            if g.is_empty() || g.starts_with('/') || g.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return invalid("gguf_file", format!("{g:?} is not a file name or pattern inside the model's repo"));
            }
        }
        if self.engine == Engine::Custom && self.image.is_none() {
            return invalid("image", "is required for engine \"custom\"".into());
        }
        if let Some(img) = &self.image {
            if img.trim().is_empty() || img.contains(char::is_whitespace) {
                return invalid("image", format!("{img:?} is not an image reference"));
            }
        }
        if let Some(port) = &self.port {
            if port.is_empty() || !port.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return invalid("port", format!("{port:?} is not a port label"));
            }
        }
        if let Some(g) = &self.gpus {
            parse_gpus(g)?;
        }
        for v in &self.volumes {
            let parts: Vec<&str> = v.split(':').collect();
            let ok = matches!(parts.len(), 2 | 3)
                && parts[1].starts_with('/')
                && !parts[0].is_empty()
                && (parts.len() == 2 || matches!(parts[2], "ro" | "rw"));
            if !ok {
                return invalid(
                    "volumes",
                    format!("{v:?} is not host:container[:ro|rw] with an absolute container path"),
                );
            }
        }
        if let Some(k) = self.labels.keys().find(|k| k.starts_with("com.aimodel.")) {
            return invalid("labels", format!("{k:?}: labels under com.aimodel. are the driver's and the agent's own"));
        }
        if let Some(m) = &self.network_mode {
            if !matches!(m.as_str(), "bridge" | "host" | "none") {
                return invalid("network_mode", format!("{m:?} is not bridge, host or none"));
            }
        }
        if self.readiness.interval.0.is_zero() {
            return invalid("readiness.interval", "must be greater than zero".into());
        }
        if let Some(p) = &self.readiness.path {
            if !p.starts_with('/') {
                return invalid("readiness.path", format!("{p:?} must start with /"));
            }
        }
        Ok(())
    }

    /// Engine `ollama`: `model` then `models`, parsed as Ollama names, each
    /// once; the error names the attribute and the value.
    pub fn ollama_models(&self) -> Result<Vec<hf_cache::ollama::ModelName>, ConfigError> {
        let mut out: Vec<hf_cache::ollama::ModelName> = Vec::new();
        let named = self.model.iter().map(|m| ("model", m)).chain(self.models.iter().map(|m| ("models", m)));
        for (field, text) in named {
            let name = hf_cache::ollama::ModelName::parse(text)
                .map_err(|e| ConfigError::Invalid { field: field.into(), message: e.to_string() })?;
            if !out.iter().any(|n| n.canonical() == name.canonical()) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The GGUF file name or pattern (`llamacpp`): `gguf_file`, else `*.gguf`.
    pub fn gguf_pattern(&self) -> &str {
        self.gguf_file.as_deref().unwrap_or("*.gguf")
    }

    /// The requested GPU count, when the task config sets `gpus`.
    pub fn gpu_count(&self) -> Option<GpuCount> {
        self.gpus.as_deref().and_then(|g| parse_gpus(g).ok())
    }
}

fn parse_gpus(g: &str) -> Result<GpuCount, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { field: "gpus".into(), message };
    if g.eq_ignore_ascii_case("all") {
        return Ok(GpuCount::All);
    }
    match g.trim().parse::<i64>() {
        Ok(n) if n > 0 && n <= 1024 => Ok(GpuCount::Count(u32::try_from(n).unwrap_or(1024))),
        Ok(n) => Err(invalid(format!("must be a positive count or \"all\", found {n}"))),
        Err(_) => Err(invalid(format!("must be a count or \"all\", found {g:?}"))),
    }
}

/// `org/name` (or a bare `name`) as the hub allows ([`hf_cache::layout::is_repo_id`]).
pub fn valid_repo_id(id: &str) -> bool {
    hf_cache::layout::is_repo_id(id)
}
