//! The command line: `prewarm`, `verify`, `status`, `gc`, `pin`, `unpin` and `run` (the daemon).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use hf_cache::gc;
use hf_cache::state::StateDir;
use hf_cache::units::human_bytes;
use hf_cache::{check, Mode, RepoId};

use crate::config::AgentConfig;

use crate::hub::Hub;
use crate::prewarm::{prewarm, record_if_warm, Options, Progress};

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
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Download REPO[@REV] into the cache (every blob once across nodes), verified.
    Prewarm {
        /// `org/name` or `org/name@revision` (a branch, tag or 40-hex commit; default `main`).
        model: String,
        /// Only files matching this glob (`*` crosses `/`); repeatable. Without it, every file.
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Leave out files matching this glob; repeatable.
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Files downloaded at once (1 to 64).
        #[arg(long, default_value = "4", value_parser = parse_count)]
        concurrency: usize,
        /// How often a held blob lease is renewed (10ms to 10m).
        #[arg(long, default_value = "5s", value_parser = parse_heartbeat)]
        heartbeat: Duration,
        /// How long an unchanged lease of another agent is respected before it is taken over (up to 24h).
        #[arg(long, default_value = "30s", value_parser = parse_stale_after)]
        stale_after: Duration,
        /// A download that sees no bytes for this long is retried (1s to 1h).
        #[arg(long, default_value = "60s", value_parser = parse_stall)]
        stall_timeout: Duration,
        /// Parallel byte ranges per large LFS file (1: one stream per file; up to 64).
        #[arg(long, default_value = "4", value_parser = parse_count)]
        ranges: usize,
        /// Files at least this large are fetched in ranges.
        #[arg(long, default_value = "128MiB", value_parser = parse_size)]
        range_min: u64,
        /// Size of one range (1MiB to 4GiB).
        #[arg(long, default_value = "32MiB", value_parser = parse_range_size)]
        range_size: u64,
        /// The whole prewarm (listing, waiting for other agents, downloads) must end within this (1s to 30d).
        #[arg(long, default_value = "24h", value_parser = parse_deadline)]
        deadline: Duration,
    },
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
    Gc {
        /// Evict until the cache filesystem has this much free (`200GiB`).
        #[arg(long, value_parser = parse_size, required_unless_present = "max_size")]
        target_free: Option<u64>,
        /// Evict until the cached models take at most this much (`1TiB`).
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// Also keep this repo (repeatable), and pin it for every node's gc from
        /// now on (a shared pin, like `aimodel-agent pin`; not with --dry-run).
        /// Pins of `--config` and every shared pin are kept anyway.
        #[arg(long)]
        pin: Vec<String>,
        /// An in-use marker older than this no longer protects its model.
        #[arg(long, default_value = "1h", value_parser = parse_secs)]
        in_use_ttl: Duration,
        /// Show what would be evicted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
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

/// A size with a unit (`200GiB`, `512MB`); a bare number other than 0 is refused
/// (`--target-free 10` is far more likely to mean 10 GiB than 10 bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t != "0" && !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{s:?} has no unit: write e.g. \"{t}GiB\" (binary) or \"{t}GB\" (decimal)"));
    }
    hf_cache::units::parse_bytes(s)
}

/// `30s`, `500ms`, `2m`, `1h` or plain seconds; positive.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = hf_cache::units::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

/// Bounds of a duration option, checked before anything multiplies it.
fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < min || d > max {
        return Err(format!("duration {s:?} must be between {min:?} and {max:?}"));
    }
    Ok(d)
}

fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(10), Duration::from_secs(600))
}

fn parse_stale_after(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(30), Duration::from_secs(24 * 3600))
}

fn parse_stall(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_secs(1), Duration::from_secs(3600))
}

fn parse_deadline(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600))
}

/// Concurrency and ranges: 1 to 64.
fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("{s:?} must be a whole number from 1 to 64")),
    }
}

fn parse_range_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !(1 << 20..=4 << 30).contains(&n) {
        return Err(format!("{s:?} must be between 1MiB and 4GiB"));
    }
    Ok(n)
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

fn hub_dir(args: &Args, cfg: Option<&AgentConfig>) -> Result<PathBuf> {
    if let Some(c) = &args.cache {
        check_cache_arg(c)?;
    }
    Ok(args
        .cache
        .clone()
        .or_else(|| args.hf_home.as_ref().map(|h| h.join("hub")))
        .or_else(|| cfg.map(AgentConfig::hub_dir))
        .or_else(|| std::env::var_os("HF_HUB_CACHE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/huggingface/hub")))
}

/// A repo id as the hub allows it, nothing that could name another path.
fn check_repo_id(repo: &str) -> Result<()> {
    if !hf_cache::layout::is_repo_id(repo) {
        anyhow::bail!("{repo:?} {}", hf_cache::layout::REPO_ID_RULE);
    }
    Ok(())
}

fn split(model: &str) -> (String, String) {
    match model.split_once('@') {
        Some((r, v)) => (r.to_string(), v.to_string()),
        None => (model.to_string(), "main".to_string()),
    }
}

/// Runs a command; the exit code says whether the model is usable.
pub async fn run(args: Args) -> Result<ExitCode> {
    let cfg = match &args.config {
        Some(p) => Some(AgentConfig::load(p)?),
        None => None,
    };
    if matches!(args.command, Cmd::Run { .. }) && (args.cache.is_some() || args.hf_home.is_some()) {
        anyhow::bail!(
            "run takes the cache from the configuration's hf_home (--config); it does not use --cache or --hf-home"
        );
    }
    let dir = hub_dir(&args, cfg.as_ref())?;
    let pinned = cfg.as_ref().map(AgentConfig::pinned).unwrap_or_default();
    match args.command {
        Cmd::Prewarm {
            model,
            include,
            exclude,
            concurrency,
            heartbeat,
            stale_after,
            stall_timeout,
            ranges,
            range_min,
            range_size,
            deadline,
        } => {
            let (repo, rev) = split(&model);
            let hub = Hub::from_env()?;
            let mut o = Options::new(dir.clone());
            o.include = include;
            o.exclude = exclude;
            o.concurrency = concurrency;
            o.heartbeat = heartbeat;
            o.stale_after = stale_after;
            o.stall = stall_timeout;
            o.deadline = deadline;
            if heartbeat.checked_mul(3).is_none_or(|h| stale_after < h) {
                anyhow::bail!(
                    "--stale-after must be at least three --heartbeat periods, or live leases get taken over"
                );
            }
            o.ranges = ranges;
            o.range_min = range_min;
            o.range_size = range_size;
            let progress = Arc::new(Progress::default());
            let ticker = tokio::spawn(show_progress(model.clone(), progress.clone()));
            let r = prewarm(&hub, &repo, &rev, &o, progress).await;
            ticker.abort();
            let _ = ticker.await;
            let s = r.with_context(|| format!("prewarm {model}"))?;
            let (d, rp, rv) = (dir.clone(), repo.clone(), rev.clone());
            let (_, record_err) = tokio::task::spawn_blocking(move || record_if_warm(&d, &rp, &rv)).await?;
            if let Some(e) = record_err {
                eprintln!("aimodel-agent: could not record {model} as warm for the driver: {e}");
            }
            for path in &s.repaired {
                println!("{repo}@{rev}: {path}: the cached blob was corrupt; downloaded again");
            }
            let secs = s.elapsed.as_secs_f64().max(1e-9);
            println!(
                "{repo}@{rev} = {}: {} files, {}, {} downloaded in {:.1} s ({}/s)",
                s.commit,
                s.files,
                human_bytes(s.bytes),
                human_bytes(s.downloaded),
                secs,
                human_bytes((s.downloaded as f64 / secs) as u64)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { model, deep, json } => {
            let (repo, rev) = split(&model);
            check_repo_id(&repo)?;
            if !hf_cache::layout::is_safe_revision(&rev) {
                anyhow::bail!("{rev:?} is not a revision (a branch, tag or commit)");
            }
            let r = check(&dir, &RepoId::model(&repo), &rev, if deep { Mode::Deep } else { Mode::Quick });
            let corrupt = r.findings.iter().any(|f| matches!(f, hf_cache::Finding::HashMismatch { .. }));
            let state = match (r.is_complete(), corrupt) {
                (true, _) => "complete",
                (false, true) => "corrupt",
                (false, false) => "incomplete",
            };
            let code = if r.is_complete() { ExitCode::SUCCESS } else { ExitCode::from(3) };
            if json {
                let v = serde_json::json!({
                    "repo": repo,
                    "revision": rev,
                    "commit": r.commit,
                    "state": state,
                    "deep": deep,
                    "files": r.files.len(),
                    "bytes": r.total_bytes(),
                    "verifiable": r.verifiable,
                    "findings": r.findings.iter().map(|f| serde_json::json!({"kind": f.kind(), "text": f.to_string()})).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(code);
            }
            for f in &r.findings {
                println!("  {f}");
            }
            let shown = match state {
                "complete" => "complete",
                "corrupt" => "CORRUPT (run aimodel-agent prewarm to fetch the corrupt files again)",
                _ => "INCOMPLETE",
            };
            println!(
                "{repo}@{rev}: {shown} ({} files, {}{})",
                r.files.len(),
                human_bytes(r.total_bytes()),
                if r.verifiable || r.commit.is_none() {
                    ""
                } else {
                    ", no trees listing and no completion record: unverifiable, run aimodel-agent prewarm"
                }
            );
            Ok(code)
        }
        Cmd::Status { json } => {
            let state = StateDir::for_hub(&dir);
            let shared: Vec<String> = state.pins().into_iter().map(|p| p.repo).collect();
            let mut rows = Vec::new();
            for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(repo) = RepoId::from_folder_name(&name) else { continue };
                let refs = std::fs::read_dir(e.path().join("refs"))
                    .map(|rd| rd.flatten().map(|r| r.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
                    .unwrap_or_default();
                let used = state.last_used(&repo.id);
                let pinned = pinned.contains(&repo.id) || shared.contains(&repo.id);
                for rev in refs {
                    let r = check(&dir, &repo, &rev, Mode::Quick);
                    rows.push((repo.id.clone(), rev, r, used, pinned));
                }
            }
            rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            if json {
                let unix = |t: std::time::SystemTime| {
                    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
                };
                let models: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(repo, rev, r, used, pinned)| {
                        serde_json::json!({
                            "repo": repo,
                            "revision": rev,
                            "commit": r.commit,
                            "bytes": r.total_bytes(),
                            "complete": r.is_complete(),
                            "last_used": used.map(unix),
                            "pinned": pinned,
                        })
                    })
                    .collect();
                let v = serde_json::json!({ "cache": dir, "models": models });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("cache {}", dir.display());
            if rows.is_empty() {
                println!("empty cache: no models");
                return Ok(ExitCode::SUCCESS);
            }
            let width = rows.iter().map(|(repo, rev, ..)| repo.len() + rev.len() + 1).max().unwrap_or(0).max(5);
            println!(
                "{:<width$}  {:<40}  {:>10}  {:<10}  {:<12}  PINNED",
                "MODEL", "COMMIT", "SIZE", "STATE", "LAST USED"
            );
            for (repo, rev, r, used, pin) in rows {
                println!(
                    "{:<width$}  {:<40}  {:>10}  {:<10}  {:<12}  {}",
                    format!("{repo}@{rev}"),
                    r.commit.as_deref().unwrap_or("-"),
                    human_bytes(r.total_bytes()),
                    if r.is_complete() { "complete" } else { "incomplete" },
                    used.map(|t| format!("{} ago", ago(t))).unwrap_or_else(|| "never".into()),
                    if pin { "pinned" } else { "" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc { target_free, max_size, pin, in_use_ttl, dry_run, json } => {
            for r in &pin {
                check_repo_id(r)?;
                if !dry_run {
                    StateDir::for_hub(&dir)
                        .pin(r, &format!("{}:cli", hf_cache::state::node_name()))
                        .with_context(|| format!("pinning {r}"))?;
                }
            }
            let policy = gc::Policy {
                target_free,
                max_size,
                pinned: pinned.into_iter().chain(pin).collect(),
                protected: Vec::new(),
                in_use_ttl,
                lease_fresh: Duration::from_secs(30),
            };
            let d = dir.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                if dry_run {
                    gc::plan(&d, &policy).map(|p| (p, Vec::new()))
                } else {
                    gc::run(&d, &policy)
                }
            })
            .await?;
            let (plan, done) = match outcome {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let msg = format!("{e}: another agent is collecting this cache; nothing done");
                    if json {
                        println!("{}", serde_json::json!({ "cache": dir, "busy": true, "error": msg }));
                    } else {
                        println!("{msg}");
                    }
                    return Ok(ExitCode::from(5));
                }
                r => r.with_context(|| format!("gc of {}", dir.display()))?,
            };
            let freed: u64 = done.iter().map(|(_, b)| b).sum();
            let code = if plan.reaches_target { ExitCode::SUCCESS } else { ExitCode::from(4) };
            if json {
                let models: Vec<serde_json::Value> = plan
                    .models
                    .iter()
                    .map(|m| {
                        let evicted = done.iter().any(|(r, _)| r == &m.repo);
                        serde_json::json!({
                            "repo": m.repo,
                            "bytes": m.bytes,
                            "last_used": m.last_used.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default(),
                            "keep": m.keep.as_ref().map(ToString::to_string),
                            "would_evict": plan.evict.contains(&m.repo),
                            "evicted": evicted,
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "cache": dir,
                    "dry_run": dry_run,
                    "total_bytes": plan.total,
                    "free_bytes": plan.free,
                    "models": models,
                    "evicted": done.iter().map(|(r, _)| r).collect::<Vec<_>>(),
                    "freed_bytes": freed,
                    "reaches_target": plan.reaches_target,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(code);
            }
            println!(
                "cache {}: {} in {} models, {} free",
                dir.display(),
                human_bytes(plan.total),
                plan.models.len(),
                human_bytes(plan.free)
            );
            for m in &plan.models {
                let verdict = match (&m.keep, plan.evict.contains(&m.repo)) {
                    (Some(k), _) => format!("keep ({k})"),
                    (None, true) if dry_run => "would evict".to_string(),
                    (None, true) => {
                        if done.iter().any(|(r, _)| r == &m.repo) {
                            "evicted".to_string()
                        } else {
                            "kept (target reached)".to_string()
                        }
                    }
                    (None, false) => "keep".to_string(),
                };
                println!("  {:<50} {:>10}  used {} ago  {verdict}", m.repo, human_bytes(m.bytes), ago(m.last_used));
            }
            if dry_run {
                println!("dry run: would evict {} models", plan.evict.len());
            } else {
                println!("evicted {} models, freed {}", done.len(), human_bytes(freed));
            }
            if !plan.reaches_target {
                println!("target not reachable: the remaining models are pinned, in use or being downloaded");
                return Ok(ExitCode::from(4));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pin { repo } => {
            check_repo_id(&repo)?;
            let state = StateDir::for_hub(&dir);
            state
                .pin(&repo, &format!("{}:cli", hf_cache::state::node_name()))
                .with_context(|| format!("pinning {repo}"))?;
            println!("{repo}: pinned for every node's gc ({})", state.root().join("pins").display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Unpin { repo } => {
            check_repo_id(&repo)?;
            StateDir::for_hub(&dir).unpin(&repo).with_context(|| format!("unpinning {repo}"))?;
            if pinned.contains(&repo) {
                println!("{repo}: shared pin removed, but --config pins it (pin = true): its daemon pins it again");
            } else {
                println!("{repo}: unpinned");
            }
            Ok(ExitCode::SUCCESS)
        }
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
            crate::logging::init();
            crate::daemon::run(cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `3m`, `2h`, `5d`: how long ago.
fn ago(t: std::time::SystemTime) -> String {
    let s = std::time::SystemTime::now().duration_since(t).unwrap_or_default().as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A progress bar on a terminal; a line every five seconds otherwise (logs).
async fn show_progress(label: String, p: Arc<Progress>) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label);
        loop {
            bar.set_length(p.bytes_total.load(Ordering::SeqCst));
            bar.set_position(p.bytes_done.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (done, total) = (p.bytes_done.load(Ordering::SeqCst), p.bytes_total.load(Ordering::SeqCst));
            let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 0.0 };
            eprintln!("{label}: {}/{} ({pct:.0}%)", human_bytes(done), human_bytes(total));
        }
    }
}
