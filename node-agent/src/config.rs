//! The daemon's configuration file (HCL, usually rendered by a Nomad
//! `template` stanza): the cache, the HTTP listener, the manifest of models,
//! the optional Nomad API source, and the disk watermark for gc.
//!
//! ```hcl
//! hf_home  = "/mnt/hf-cache"
//! listen   = "0.0.0.0:9464"
//! interval = "5m"
//!
//! models = [
//!   { repo = "mistralai/Mistral-7B-Instruct-v0.3", include = ["*.safetensors", "*.json"], pin = true },
//!   { repo = "Qwen/Qwen2.5-0.5B-Instruct", revision = "main" },
//!   { repo = "ollama://llama3.2:3b", pin = true },
//! ]
//!
//! nomad {
//!   address   = "http://127.0.0.1:4646"
//!   namespace = "*"
//! }
//!
//! gc {
//!   target_free = "200GiB"
//! }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use hf_cache::units::{Bytes, Dur};

use crate::env::Environment;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `HF_HOME` of the shared cache; models go to `<hf_home>/hub`.
    pub hf_home: PathBuf,
    /// Address of the HTTP endpoints (`/health`, `/status`, `/metrics`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// When set, `/status` (which names every job and model) answers only
    /// requests with `Authorization: Bearer <status_token>`. Never logged.
    #[serde(default)]
    pub status_token: Option<Secret>,
    /// How often every wanted model is re-checked against the hub and the disk.
    #[serde(default = "default_interval")]
    pub interval: Dur,
    /// Files downloaded at once per model.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Parallel byte ranges per large LFS file (1: one stream per file).
    #[serde(default = "default_ranges")]
    pub ranges: usize,
    /// Files at least this large are fetched in ranges.
    #[serde(default = "default_range_min")]
    pub range_min: Bytes,
    /// Models prewarmed at once.
    #[serde(default = "default_models_at_once")]
    pub models_at_once: usize,
    /// A download that sees no bytes for this long is retried.
    #[serde(default = "default_stall")]
    pub stall_timeout: Dur,
    /// How often a held blob lease is renewed.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Dur,
    /// How long an unchanged lease of another agent is respected.
    #[serde(default = "default_stale")]
    pub stale_after: Dur,
    /// The manifest.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// The Ollama store (`OLLAMA_MODELS`); default `$OLLAMA_MODELS`, else `<hf_home>/ollama`.
    #[serde(default)]
    pub ollama_models: Option<PathBuf>,
    /// The registry (or mirror) Ollama models come from; default
    /// `$AIMODEL_OLLAMA_REGISTRY`, else each model's own host (`https://registry.ollama.ai`).
    #[serde(default)]
    pub ollama_registry: Option<String>,
    pub nomad: Option<NomadConfig>,
    pub gc: Option<GcConfig>,
    /// Pull the engine images of Nomad's `aimodel` tasks ahead (needs `nomad`).
    pub images: Option<crate::images::ImagesConfig>,
}

/// One manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `org/name`, or `ollama://<name>[:<tag>]` for an Ollama model.
    pub repo: String,
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Only files matching one of these globs (huggingface_hub's `allow_patterns`).
    #[serde(default, alias = "allow_patterns")]
    pub include: Vec<String>,
    /// No file matching one of these globs (`ignore_patterns`).
    #[serde(default, alias = "ignore_patterns")]
    pub exclude: Vec<String>,
    /// Never evicted by gc.
    #[serde(default)]
    pub pin: bool,
}

/// `nomad { ... }`: prewarm the model of every `driver = "aimodel"` task.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NomadConfig {
    /// Default `$NOMAD_ADDR`, else `http://127.0.0.1:4646`.
    pub address: Option<String>,
    /// ACL token; default `$NOMAD_TOKEN`. Never logged.
    pub token: Option<String>,
    /// `*` for every namespace.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Longest wait of one blocking query.
    #[serde(default = "default_wait")]
    pub wait: Dur,
    /// Send the token over plain http to a host other than this one.
    #[serde(default)]
    pub insecure_http: bool,
    /// `/health` fails once Nomad has not answered for this long.
    #[serde(default = "default_health_grace")]
    pub health_grace: Dur,
}

fn default_health_grace() -> Dur {
    Dur(Duration::from_secs(60))
}

/// A secret from the configuration: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Debug for NomadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NomadConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("namespace", &self.namespace)
            .field("wait", &self.wait)
            .field("insecure_http", &self.insecure_http)
            .field("health_grace", &self.health_grace)
            .finish()
    }
}

/// `gc { ... }`: the disk watermark.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcConfig {
    /// Evict until the cache filesystem has this much free.
    pub target_free: Option<Bytes>,
    /// Evict until the cached models take at most this much.
    pub max_size: Option<Bytes>,
    /// An in-use marker not refreshed for this long no longer protects its
    /// model (default 1h: long enough to ride out a plugin restart or a client
    /// upgrade, during which nothing refreshes the markers).
    #[serde(default = "default_in_use_ttl")]
    pub in_use_ttl: Dur,
    /// Only report what would be evicted.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_interval() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_concurrency() -> usize {
    4
}
fn default_ranges() -> usize {
    4
}
fn default_range_min() -> Bytes {
    Bytes(128 << 20)
}
fn default_models_at_once() -> usize {
    2
}
fn default_stall() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_heartbeat() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_stale() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_revision() -> String {
    "main".into()
}
fn default_namespace() -> String {
    "*".into()
}
fn default_wait() -> Dur {
    Dur(Duration::from_secs(300))
}
/// One hour: markers are refreshed by the driver only, so a plugin restart or
/// a Nomad client upgrade must not expose a model a running container reads.
pub fn default_in_use_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}

/// A configuration error, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl AgentConfig {
    /// Parses and checks `text` (`path` is for messages), without the environment.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, &Environment::default())
    }

    /// Parses `text`, completes it from `env` (what the file leaves unset), and checks it.
    pub fn parse_with(text: &str, path: &Path, env: &Environment) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError { path: path.display().to_string(), reason };
        let mut cfg: AgentConfig = hcl::from_str(text).map_err(|e| err(e.to_string()))?;
        cfg.apply_env(env);
        for (i, m) in cfg.models.iter_mut().enumerate() {
            if m.repo.starts_with(hf_cache::ollama::SCHEME) {
                let name =
                    hf_cache::ollama::ModelName::parse(&m.repo).map_err(|e| err(format!("models[{i}].repo: {e}")))?;
                if !(m.include.is_empty() && m.exclude.is_empty()) {
                    return Err(err(format!("models[{i}]: include and exclude do not apply to Ollama models")));
                }
                // One spelling per model: the shortest name, the tag as the revision.
                m.repo = format!("{}{}", hf_cache::ollama::SCHEME, name.short());
                m.revision = name.tag;
                continue;
            }
            if !hf_cache::layout::is_repo_id(&m.repo) {
                return Err(err(format!("models[{i}].repo: {:?} {}", m.repo, hf_cache::layout::REPO_ID_RULE)));
            }
            if !hf_cache::layout::is_safe_revision(&m.revision) {
                return Err(err(format!("models[{i}].revision: {:?} is not a revision", m.revision)));
            }
        }
        for (key, d) in [("interval", cfg.interval), ("stall_timeout", cfg.stall_timeout), ("heartbeat", cfg.heartbeat)]
        {
            if d.0 < Duration::from_secs(1) && key != "heartbeat" || d.0.is_zero() {
                return Err(err(format!("{key} must be positive (and at least 1s for interval and stall_timeout)")));
            }
        }
        if cfg.heartbeat.0 > Duration::from_secs(600) || cfg.stale_after.0 > Duration::from_secs(24 * 3600) {
            return Err(err("heartbeat must be at most 10m and stale_after at most 24h".into()));
        }
        if cfg.heartbeat.0.checked_mul(3).is_none_or(|h| cfg.stale_after.0 < h) {
            return Err(err(format!(
                "stale_after ({:?}) must be at least three heartbeats ({:?}), or live leases get taken over",
                cfg.stale_after.0, cfg.heartbeat.0
            )));
        }
        if cfg.gc.as_ref().is_some_and(|g| g.in_use_ttl.0 < Duration::from_secs(180)) {
            return Err(err("gc.in_use_ttl must be at least 3m (the driver rewrites its markers every minute)".into()));
        }
        if ![cfg.concurrency, cfg.models_at_once, cfg.ranges].iter().all(|n| (1..=64).contains(n)) {
            return Err(err("concurrency, ranges and models_at_once must be from 1 to 64".into()));
        }
        if let Some(gc) = &cfg.gc {
            if gc.target_free.is_none() && gc.max_size.is_none() {
                return Err(err("gc: set target_free or max_size (or remove the gc block)".into()));
            }
        }
        crate::ollama::Registry::new(cfg.ollama_registry.as_deref())
            .map_err(|e| err(format!("ollama_registry: {e}")))?;
        cfg.listen.parse::<std::net::SocketAddr>().map_err(|e| err(format!("listen {:?}: {e}", cfg.listen)))?;
        if cfg.status_token.as_ref().is_some_and(|t| t.0.trim().is_empty()) {
            return Err(err("status_token: must not be empty (remove it to leave /status open)".into()));
        }
        for (key, d) in [("interval", cfg.interval), ("stall_timeout", cfg.stall_timeout)] {
            if d.0 > Duration::from_secs(7 * 24 * 3600) {
                return Err(err(format!("{key} = {:?} is more than a week", d.0)));
            }
        }
        if let Some(n) = &cfg.nomad {
            let address = resolve_address(n.address.as_deref(), env);
            if !["http://", "https://", "unix://"].iter().any(|p| address.starts_with(p)) {
                return Err(err(format!("nomad.address {address:?}: use http://, https:// or unix://")));
            }
            let token = n.token.as_ref().is_some_and(|t| !t.is_empty());
            if token && !n.insecure_http && !token_safe_over(&address) {
                return Err(err(format!(
                    "nomad.address {address:?}: the Nomad token would cross the network in clear text; use https://, \
                     the task API socket (unix://${{NOMAD_SECRETS_DIR}}/api.sock, the default inside a Nomad task), \
                     or set nomad.insecure_http = true"
                )));
            }
        }
        if let Some(i) = &cfg.images {
            i.check().map_err(err)?;
            if cfg.nomad.is_none() {
                return Err(err("images: needs a nomad { ... } block (the jobs say which images are wanted)".into()));
            }
            if i.node_id.as_deref().is_none_or(|n| n.trim().is_empty()) {
                return Err(err(
                    "images: node_id is required (set AIMODEL_NODE_ID = \"${node.unique.id}\" in the agent's job)"
                        .into(),
                ));
            }
        }
        Ok(cfg)
    }

    /// Reads and parses a file, completed from `env`: `status_token` may come
    /// from `$AIMODEL_STATUS_TOKEN` (so a job keeps it out of the rendered file),
    /// the Nomad address and token from `$NOMAD_ADDR`/`$NOMAD_TOKEN`.
    pub fn load(path: &Path, env: &Environment) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { path: path.display().to_string(), reason: e.to_string() })?;
        let mut cfg = Self::parse_with(&text, path, env)?;
        if cfg.status_token.is_none() {
            cfg.status_token = env.status_token.clone().map(Secret);
        }
        // A token rendered by a template often ends in a newline.
        cfg.status_token = cfg.status_token.map(|t| Secret(t.0.trim().to_string())).filter(|t| !t.0.is_empty());
        Ok(cfg)
    }

    /// Fills what the file leaves unset from the environment read at start-up.
    fn apply_env(&mut self, env: &Environment) {
        if self.ollama_models.is_none() {
            self.ollama_models = env.ollama_models.clone();
        }
        if self.ollama_registry.is_none() {
            self.ollama_registry = env.ollama_registry.clone();
        }
        if let Some(i) = &mut self.images {
            if i.node_id.is_none() {
                i.node_id = env.node_id.clone();
            }
        }
        if let Some(n) = &mut self.nomad {
            n.address = Some(resolve_address(n.address.as_deref(), env));
            if n.token.is_none() {
                n.token = env.nomad_token.clone();
            }
        }
    }

    /// `<hf_home>/hub`.
    pub fn hub_dir(&self) -> PathBuf {
        self.hf_home.join("hub")
    }

    /// The Ollama store: `ollama_models`, else `<hf_home>/ollama`.
    pub fn ollama_store(&self) -> PathBuf {
        self.ollama_models.clone().unwrap_or_else(|| hf_cache::ollama::default_store(&self.hf_home))
    }

    /// Keys pinned by the manifest (`org/name`, `ollama/<name>` for Ollama models).
    pub fn pinned(&self) -> Vec<String> {
        self.models.iter().filter(|m| m.pin).map(ModelSpec::state_key).collect()
    }
}

impl ModelSpec {
    /// The Ollama model this entry names, if it is one.
    pub fn ollama(&self) -> Option<hf_cache::ollama::ModelName> {
        self.repo.strip_prefix(hf_cache::ollama::SCHEME).and_then(|n| hf_cache::ollama::ModelName::parse(n).ok())
    }

    /// The key of the shared state records: the repo id, or `ollama/<name>`.
    pub fn state_key(&self) -> String {
        self.ollama().map_or_else(|| self.repo.clone(), |n| hf_cache::ollama::state_key(&n))
    }
}

/// Where the Nomad API is: the configured address, else `$NOMAD_ADDR`, else
/// the task API socket when running as a Nomad task, else the local agent.
pub fn resolve_address(configured: Option<&str>, env: &crate::env::Environment) -> String {
    if let Some(a) = configured.map(str::to_string).or_else(|| env.nomad_addr.clone()).filter(|a| !a.is_empty()) {
        return a.trim_end_matches('/').to_string();
    }
    if let Some(dir) = &env.nomad_secrets_dir {
        let sock = dir.join("api.sock");
        if sock.exists() {
            return format!("unix://{}", sock.display());
        }
    }
    "http://127.0.0.1:4646".into()
}

/// Whether a token may travel to `address`: over TLS, the task API socket, or
/// plain http to this machine only.
pub fn token_safe_over(address: &str) -> bool {
    if address.starts_with("https://") || address.starts_with("unix://") {
        return true;
    }
    let Some(rest) = address.strip_prefix("http://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        // `http://localhost:4646@evil.example/` goes to evil.example.
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```hcl"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let c = AgentConfig::parse(&text, Path::new("example.hcl")).unwrap();
        assert_eq!(c.hub_dir(), PathBuf::from("/mnt/hf-cache/hub"));
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.models[0].include, ["*.safetensors", "*.json"]);
        assert_eq!(c.models[1].revision, "main");
        assert_eq!((c.models[2].repo.as_str(), c.models[2].revision.as_str()), ("ollama://llama3.2:3b", "3b"));
        assert_eq!(c.pinned(), ["mistralai/Mistral-7B-Instruct-v0.3", "ollama/llama3.2:3b"]);
        assert_eq!(c.ollama_store(), PathBuf::from("/mnt/hf-cache/ollama"));
        assert_eq!(c.nomad.as_ref().unwrap().namespace, "*");
        assert_eq!(c.gc.as_ref().unwrap().target_free, Some(Bytes(200 << 30)));
        // Long enough to ride out a plugin restart or a client upgrade.
        assert_eq!(c.gc.as_ref().unwrap().in_use_ttl, Dur(Duration::from_secs(3600)));
        assert_eq!(c.interval, Dur(Duration::from_secs(300)));
    }

    #[test]
    fn bad_input_names_the_problem() {
        let p = Path::new("a.hcl");
        let e = AgentConfig::parse("hf_home = \"/c\"\nmodels = [{ repo = \"../nope\" }]", p).unwrap_err();
        assert!(e.to_string().contains("models[0].repo"), "{e}");
        let e = AgentConfig::parse("hf_home = \"/c\"\nmodelz = []", p).unwrap_err();
        assert!(e.to_string().contains("modelz"), "{e}");
        let e = AgentConfig::parse("hf_home = \"/c\"\ngc {\n dry_run = true\n}", p).unwrap_err();
        assert!(e.to_string().contains("target_free"), "{e}");
        let e = AgentConfig::parse("hf_home = \"/c\"\ninterval = \"soon\"", p).unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        let e = AgentConfig::parse("hf_home = \"/c\"\ninterval = \"0\"", p).unwrap_err();
        assert!(e.to_string().contains("interval must be positive"), "{e}");
        let e = AgentConfig::parse("hf_home = \"/c\"\nheartbeat = \"20s\"", p).unwrap_err();
        assert!(e.to_string().contains("stale_after"), "{e}");
        // Absurd values are refused, not multiplied into a panic.
        for bad in ["concurrency = 18446744073709551615", "ranges = 1000", "models_at_once = 0"] {
            let e = AgentConfig::parse(&format!("hf_home = \"/c\"\n{bad}"), p).unwrap_err();
            assert!(e.to_string().contains("from 1 to 64"), "{bad}: {e}");
        }
        for bad in ["heartbeat = \"9999999999h\"\nstale_after = \"9999999999h\"", "stale_after = \"100000h\""] {
            let e = AgentConfig::parse(&format!("hf_home = \"/c\"\n{bad}"), p).unwrap_err();
            assert!(e.to_string().contains("at most"), "{bad}: {e}");
        }
        let e =
            AgentConfig::parse("hf_home = \"/c\"\ngc {\n max_size = \"1\"\n in_use_ttl = \"30s\"\n}", p).unwrap_err();
        assert!(e.to_string().contains("in_use_ttl"), "{e}");
        let c = AgentConfig::parse(
            "hf_home = \"/c\"\nmodels = [{ repo = \"a/b\", allow_patterns = [\"*.json\"] }]\nnomad {\n token = \"s3cret\"\n}",
            p,
        )
        .unwrap();
        assert_eq!(c.models[0].include, ["*.json"]);
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    /// The agent table in docs/configuration.md lists exactly the keys the parser accepts
    /// (serde names every accepted key when it refuses an unknown one).
    #[test]
    fn the_documented_keys_are_the_accepted_keys() {
        let err = AgentConfig::parse("hf_home = \"/c\"\nno_such_key = 1", Path::new("x")).unwrap_err().to_string();
        let expected = err.split("expected one of").nth(1).unwrap_or_else(|| panic!("{err}"));
        let mut accepted: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let docs = include_str!("../../docs/configuration.md");
        let section = docs.split("## Agent configuration").nth(1).expect("an agent section");
        let mut documented: Vec<&str> =
            section.lines().filter_map(|l| l.strip_prefix("| `")).filter_map(|l| l.split('`').next()).collect();
        accepted.sort_unstable();
        documented.sort_unstable();
        assert_eq!(documented, accepted, "docs/configuration.md#agent-configuration is out of date");
    }
}
