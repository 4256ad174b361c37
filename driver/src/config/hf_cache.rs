//! `hf_cache { ... }` of the plugin configuration: the shared HF cache and
//! the Ollama store beside it.

use std::time::Duration;

use serde::Deserialize;

use super::units::{Bytes, Dur};
use crate::config::schema::{attr, Field};

pub(super) const HF_CACHE_SCHEMA: &[Field] = &[
    attr(
        "host_path",
        "string",
        Some(r#""/mnt/hf-cache""#),
        "Host path of the HF cache (`HF_HOME`), usually an NFS mount.",
    ),
    attr(
        "container_path",
        "string",
        Some(r#""/root/.cache/huggingface""#),
        "Where the cache is mounted in the container; `HF_HOME` points here.",
    ),
    attr("require_nfs", "bool", Some("false"), "Mark the driver unhealthy unless `host_path` is on NFS."),
    attr(
        "min_free",
        "string",
        Some(r#""10GiB""#),
        "Mark the driver unhealthy when the cache filesystem has less free space.",
    ),
    attr(
        "probe_timeout",
        "string",
        Some(r#""5s""#),
        "Time limit of every filesystem probe, so a hung NFS server cannot wedge the plugin.",
    ),
    attr(
        "allow_write",
        "bool",
        Some("false"),
        "Mount the cache read-write into tasks with `offline = false` (engines that download); otherwise every task sees it read-only.",
    ),
    attr(
        "ollama_path",
        "string",
        Some(r#""""#),
        "Host path of the shared Ollama model store (the agent's `ollama_models`); `\"\"` is `<host_path>/ollama`. Mounted read-only at `OLLAMA_MODELS` in `ollama` tasks.",
    ),
];

/// `hf_cache { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HfCacheConfig {
    pub host_path: String,
    pub container_path: String,
    pub require_nfs: bool,
    pub min_free: Bytes,
    pub probe_timeout: Dur,
    pub allow_write: bool,
    /// The Ollama store; empty: `<host_path>/ollama` ([`HfCacheConfig::ollama_store`]).
    pub ollama_path: String,
    /// Where mount facts are read: not configuration, the plugin sets it from
    /// [`EnvOverrides::mountinfo`](crate::config::EnvOverrides).
    #[serde(skip)]
    pub mountinfo: std::path::PathBuf,
}

impl Default for HfCacheConfig {
    fn default() -> Self {
        HfCacheConfig {
            host_path: "/mnt/hf-cache".into(),
            container_path: "/root/.cache/huggingface".into(),
            require_nfs: false,
            min_free: Bytes(10 << 30),
            probe_timeout: Dur(Duration::from_secs(5)),
            allow_write: false,
            ollama_path: String::new(),
            mountinfo: std::path::PathBuf::from("/proc/self/mountinfo"),
        }
    }
}

impl HfCacheConfig {
    /// The Ollama store on the host: `ollama_path`, else `<host_path>/ollama`.
    pub fn ollama_store(&self) -> std::path::PathBuf {
        if self.ollama_path.is_empty() {
            hf_cache::ollama::default_store(std::path::Path::new(&self.host_path))
        } else {
            std::path::PathBuf::from(&self.ollama_path)
        }
    }
}
