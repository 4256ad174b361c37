//! The environment variables the agent honours, read once at start-up (in
//! `main`) and passed down; nothing else in the crate reads the environment.

use std::path::PathBuf;

/// What the process environment says.
#[derive(Clone, Default)]
pub struct Environment {
    /// `HF_ENDPOINT` (default https://huggingface.co).
    pub hf_endpoint: Option<String>,
    /// `HF_TOKEN`: sent to the hub's own host only. Never logged.
    pub hf_token: Option<String>,
    /// `HF_HUB_CACHE`.
    pub hf_hub_cache: Option<PathBuf>,
    /// `HF_HOME`.
    pub hf_home: Option<PathBuf>,
    /// `HOME` (for the default cache).
    pub home: Option<PathBuf>,
    /// `NOMAD_ADDR`.
    pub nomad_addr: Option<String>,
    /// `NOMAD_SECRETS_DIR` (inside a Nomad task: the task API socket is there).
    pub nomad_secrets_dir: Option<PathBuf>,
    /// `NOMAD_TOKEN`. Never logged.
    pub nomad_token: Option<String>,
    /// `AIMODEL_STATUS_TOKEN`. Never logged.
    pub status_token: Option<String>,
    /// `AIMODEL_LOG`: the log filter.
    pub log: Option<String>,
    /// `AIMODEL_LOG_FORMAT`: `json` or text.
    pub log_format: Option<String>,
    /// `OLLAMA_MODELS`: the Ollama store (default `<HF_HOME>/ollama`).
    pub ollama_models: Option<PathBuf>,
    /// `AIMODEL_OLLAMA_REGISTRY`: the registry (or mirror) Ollama models come from.
    pub ollama_registry: Option<String>,
    /// `AIMODEL_NODE_ID`: this node's Nomad node ID (`${node.unique.id}` in the agent's job).
    pub node_id: Option<String>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Environment")
            .field("hf_endpoint", &self.hf_endpoint)
            .field("hf_token", &redact(&self.hf_token))
            .field("hf_hub_cache", &self.hf_hub_cache)
            .field("hf_home", &self.hf_home)
            .field("nomad_addr", &self.nomad_addr)
            .field("nomad_token", &redact(&self.nomad_token))
            .field("status_token", &redact(&self.status_token))
            .field("ollama_models", &self.ollama_models)
            .field("ollama_registry", &self.ollama_registry)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Environment {
    /// Reads the process environment (empty values count as unset).
    pub fn from_process() -> Self {
        let s = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let p = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        Environment {
            hf_endpoint: s("HF_ENDPOINT"),
            hf_token: s("HF_TOKEN"),
            hf_hub_cache: p("HF_HUB_CACHE"),
            hf_home: p("HF_HOME"),
            home: p("HOME"),
            nomad_addr: s("NOMAD_ADDR"),
            nomad_secrets_dir: p("NOMAD_SECRETS_DIR"),
            nomad_token: s("NOMAD_TOKEN"),
            status_token: s("AIMODEL_STATUS_TOKEN"),
            log: s("AIMODEL_LOG"),
            log_format: s("AIMODEL_LOG_FORMAT"),
            ollama_models: p("OLLAMA_MODELS"),
            ollama_registry: s("AIMODEL_OLLAMA_REGISTRY"),
            node_id: s("AIMODEL_NODE_ID"),
        }
    }
}
