//! The command line: `prewarm`, `verify`, `status`, `gc`, `pin`, `unpin` and `run` (the daemon).

mod gc;
mod inspect;
mod ollama;
mod parse;
mod prewarm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::AgentConfig;
use crate::env::Environment;
use parse::{
    parse_count, parse_deadline, parse_heartbeat, parse_range_size, parse_secs, parse_size, parse_stale_after,
    parse_stall,
};

/// Prewarm, verify and inspect models in the shared HuggingFace cache.
#[derive(Debug, Parser)]
#[command(name = "aimodel-agent", version)]
pub struct Args {
    /// The hub cache directory itself (`HF_HOME/hub`, holding `models--*`); a directory that looks like
    /// HF_HOME (a `hub/` inside, no `models--*`) is refused: use --hf-home for that.
    /// Default: `--config`'s hf_home, else `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub.
    #[arg(long, global = true, value_name = "DIR", conflicts_with = "hf_home")]
    pub cache: Option<PathBuf>,
    /// The HF_HOME directory (the driver's `hf_cache.host_path`, the agent's `hf_home`); the hub cache is
    /// `DIR/hub`.
    #[arg(long, global = true, value_name = "DIR")]
    pub hf_home: Option<PathBuf>,
    /// The agent configuration (HCL): its `hf_home` is the cache unless `--cache` or `--hf-home` is given,
    /// and its pinned models are kept by `gc` and shown by `status`.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The Ollama store (`OLLAMA_MODELS`) for `ollama://` models. Default: `--config`'s ollama_models,
    /// else `$OLLAMA_MODELS`, else `ollama/` beside the hub cache (`HF_HOME/ollama`).
    #[arg(long, global = true, value_name = "DIR")]
    pub ollama_models: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Download REPO[@REV] into the cache (every blob once across nodes), verified.
    Prewarm(PrewarmArgs),
    /// Check REPO[@REV] in the cache; `--deep` hashes every blob. Exit 0 complete, 3 incomplete or corrupt.
    Verify {
        /// `org/name` or `org/name@revision` (default `main`).
        model: String,
        /// Also hash every blob against its name (reads every byte; finds corrupt blobs).
        #[arg(long)]
        deep: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every cached model: commit, size, complete or not, last use, pinned.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used models until the target holds (never pinned, in-use or downloading ones).
    Gc(GcArgs),
    /// Pin REPO (`org/name`) for every node's gc: it is never evicted until unpinned.
    Pin {
        /// `org/name`.
        repo: String,
    },
    /// Remove the shared pin of REPO (a `pin = true` manifest entry pins it again).
    Unpin {
        /// `org/name`.
        repo: String,
    },
    /// The node agent: keep the manifest's models (and Nomad's) warm, serve /health, /status, /metrics.
    Run {
        /// Only check the configuration and print what would be prewarmed.
        #[arg(long)]
        check: bool,
    },
}

/// `prewarm` options.
#[derive(Debug, clap::Args)]
pub struct PrewarmArgs {
    /// `org/name` or `org/name@revision` (a branch, tag or 40-hex commit; default `main`).
    pub model: String,
    /// Only files matching this glob (`*` crosses `/`); repeatable. Without it, every file.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Leave out files matching this glob; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Files downloaded at once (1 to 64).
    #[arg(long, default_value = "4", value_parser = parse_count)]
    pub concurrency: usize,
    /// How often a held blob lease is renewed (10ms to 10m).
    #[arg(long, default_value = "5s", value_parser = parse_heartbeat)]
    pub heartbeat: Duration,
    /// How long an unchanged lease of another agent is respected before it is taken over (up to 24h).
    #[arg(long, default_value = "30s", value_parser = parse_stale_after)]
    pub stale_after: Duration,
    /// A download that sees no bytes for this long is retried (1s to 1h).
    #[arg(long, default_value = "60s", value_parser = parse_stall)]
    pub stall_timeout: Duration,
    /// Parallel byte ranges per large LFS file (1: one stream per file; up to 64).
    #[arg(long, default_value = "4", value_parser = parse_count)]
    pub ranges: usize,
    /// Files at least this large are fetched in ranges.
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub range_min: u64,
    /// Size of one range (1MiB to 4GiB).
    #[arg(long, default_value = "32MiB", value_parser = parse_range_size)]
    pub range_size: u64,
    /// The whole prewarm (listing, waiting for other agents, downloads) must end within this (1s to 30d).
    #[arg(long, default_value = "24h", value_parser = parse_deadline)]
    pub deadline: Duration,
}

/// `gc` options.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Evict until the cache filesystem has this much free (`200GiB`).
    #[arg(long, value_parser = parse_size, required_unless_present = "max_size")]
    pub target_free: Option<u64>,
    /// Evict until the cached models take at most this much (`1TiB`).
    #[arg(long, value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// Also keep this repo (repeatable), and pin it for every node's gc from
    /// now on (a shared pin, like `aimodel-agent pin`; not with --dry-run).
    /// Pins of `--config` and every shared pin are kept anyway.
    #[arg(long)]
    pub pin: Vec<String>,
    /// An in-use marker older than this no longer protects its model.
    #[arg(long, default_value = "1h", value_parser = parse_secs)]
    pub in_use_ttl: Duration,
    /// Show what would be evicted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Refuses a `--cache DIR` that looks like HF_HOME: a `hub/` inside and no `models--*`.
fn check_cache_arg(dir: &std::path::Path) -> Result<()> {
    let has_models = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("models--")))
        .unwrap_or(false);
    if dir.join("hub").is_dir() && !has_models {
        anyhow::bail!(
            "--cache {d} looks like HF_HOME (it has hub/ and no models--* folders): --cache is the hub \
             directory (HF_HOME/hub); use --hf-home {d} (or --cache {d}/hub)",
            d = dir.display()
        );
    }
    Ok(())
}

fn hub_dir(args: &Args, cfg: Option<&AgentConfig>, env: &Environment) -> Result<PathBuf> {
    if let Some(c) = &args.cache {
        check_cache_arg(c)?;
    }
    Ok(args
        .cache
        .clone()
        .or_else(|| args.hf_home.as_ref().map(|h| h.join("hub")))
        .or_else(|| cfg.map(AgentConfig::hub_dir))
        .or_else(|| env.hf_hub_cache.clone())
        .or_else(|| env.hf_home.as_ref().map(|h| h.join("hub")))
        .unwrap_or_else(|| env.home.clone().unwrap_or_default().join(".cache/huggingface/hub")))
}

/// A repo id as the hub allows it, nothing that could name another path.
pub(crate) fn check_repo_id(repo: &str) -> Result<()> {
    if !hf_cache::layout::is_repo_id(repo) {
        anyhow::bail!("{repo:?} {}", hf_cache::layout::REPO_ID_RULE);
    }
    Ok(())
}

/// The key of the shared state records for a CLI argument: a repo id, or
/// `ollama://<name>` → `ollama/<name>`.
pub(crate) fn state_key_arg(repo: &str) -> Result<String> {
    if repo.starts_with(hf_cache::ollama::SCHEME) {
        return Ok(hf_cache::ollama::state_key(&hf_cache::ollama::ModelName::parse(repo)?));
    }
    check_repo_id(repo)?;
    Ok(repo.to_string())
}

pub(crate) fn split(model: &str) -> (String, String) {
    match model.split_once('@') {
        Some((r, v)) => (r.to_string(), v.to_string()),
        None => (model.to_string(), "main".to_string()),
    }
}

/// Runs a command; the exit code says whether the model is usable.
pub async fn run(args: Args, env: Environment) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(p) => Some(AgentConfig::load(p, &env)?),
        None => None,
    };
    if matches!(args.command, Cmd::Run { .. }) && (args.cache.is_some() || args.hf_home.is_some()) {
        anyhow::bail!(
            "run takes the cache from the configuration's hf_home (--config); it does not use --cache or --hf-home"
        );
    }
    let dir = hub_dir(&args, cfg.as_ref(), &env)?;
    let store = args
        .ollama_models
        .clone()
        .or_else(|| cfg.as_ref().map(AgentConfig::ollama_store))
        .or_else(|| env.ollama_models.clone())
        .unwrap_or_else(|| dir.parent().unwrap_or(std::path::Path::new(".")).join("ollama"));
    let registry = cfg.as_ref().and_then(|c| c.ollama_registry.clone()).or_else(|| env.ollama_registry.clone());
    let pinned = cfg.as_ref().map(AgentConfig::pinned).unwrap_or_default();
    match args.command {
        Cmd::Prewarm(a) if a.model.starts_with(hf_cache::ollama::SCHEME) => {
            ollama::prewarm(a, &dir, store, registry.as_deref()).await
        }
        Cmd::Prewarm(a) => prewarm::run(a, dir, &env).await,
        Cmd::Verify { model, deep, json } if model.starts_with(hf_cache::ollama::SCHEME) => {
            ollama::verify(&store, &model, deep, json)
        }
        Cmd::Verify { model, deep, json } => inspect::verify(&dir, &model, deep, json),
        Cmd::Status { json } => inspect::status(&dir, &store, &pinned, json),
        Cmd::Gc(a) => gc::gc(a, dir, store, pinned).await,
        Cmd::Pin { repo } => gc::pin(&dir, &repo),
        Cmd::Unpin { repo } => gc::unpin(&dir, &repo, &pinned),
        Cmd::Run { check: only_check } => {
            let Some(cfg) = cfg else { anyhow::bail!("run needs --config FILE") };
            if only_check {
                println!(
                    "configuration {} is valid; hub cache {}",
                    args.config.unwrap_or_default().display(),
                    cfg.hub_dir().display()
                );
                for m in &cfg.models {
                    println!("  {}@{}{}", m.repo, m.revision, if m.pin { " (pinned)" } else { "" });
                }
                if let Some(n) = &cfg.nomad {
                    println!("  + every driver = \"aimodel\" task of namespace {:?}", n.namespace);
                }
                return Ok(ExitCode::SUCCESS);
            }
            crate::logging::init(&env);
            let hub = crate::hub::Hub::from_env(&env)?;
            crate::daemon::run(cfg, hub).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line of `status`.
pub(crate) struct Row {
    /// `org/name@rev` or `ollama://<name>`.
    pub model: String,
    pub repo: String,
    pub revision: String,
    pub commit: Option<String>,
    pub bytes: u64,
    pub complete: bool,
    pub used: Option<std::time::SystemTime>,
    pub pinned: bool,
}
