//! The command line: `prewarm`, `verify`, `status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use hf_cache::{check, Mode, RepoId};

use crate::hub::Hub;
use crate::prewarm::{prewarm, Options, Progress};

/// Prewarm, verify and inspect models in the shared HuggingFace cache.
#[derive(Debug, Parser)]
#[command(name = "aimodel-agent", version)]
pub struct Args {
    /// The hub cache directory; default `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else ~/.cache/huggingface/hub.
    #[arg(long, global = true)]
    pub cache: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Download REPO[@REV] into the cache (every blob once across nodes), verified.
    Prewarm {
        /// `org/name` or `org/name@revision`.
        model: String,
        #[arg(long)]
        include: Vec<String>,
        #[arg(long)]
        exclude: Vec<String>,
        /// Files downloaded at once.
        #[arg(long, default_value = "4")]
        concurrency: usize,
        /// How often a held blob lease is renewed.
        #[arg(long, default_value = "5s", value_parser = parse_secs)]
        heartbeat: Duration,
        /// How long an unchanged lease of another agent is respected before it is taken over.
        #[arg(long, default_value = "30s", value_parser = parse_secs)]
        stale_after: Duration,
        /// A download that sees no bytes for this long is retried.
        #[arg(long, default_value = "60s", value_parser = parse_secs)]
        stall_timeout: Duration,
    },
    /// Check REPO[@REV] in the cache; `--deep` hashes every blob.
    Verify {
        model: String,
        #[arg(long)]
        deep: bool,
    },
    /// Every cached model: commit, size, complete or not.
    Status,
}

/// `30s`, `500ms`, `2m` or plain seconds.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.trim().len()));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration {s:?} (use ms, s or m)")),
    };
    if secs <= 0.0 {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn hub_dir(arg: &Option<PathBuf>) -> PathBuf {
    arg.clone()
        .or_else(|| std::env::var_os("HF_HUB_CACHE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/huggingface/hub"))
}

fn split(model: &str) -> (String, String) {
    match model.split_once('@') {
        Some((r, v)) => (r.to_string(), v.to_string()),
        None => (model.to_string(), "main".to_string()),
    }
}

/// Runs a command; the exit code says whether the model is usable.
pub async fn run(args: Args) -> Result<ExitCode> {
    let dir = hub_dir(&args.cache);
    match args.command {
        Cmd::Prewarm { model, include, exclude, concurrency, heartbeat, stale_after, stall_timeout } => {
            let (repo, rev) = split(&model);
            let hub = Hub::from_env()?;
            let mut o = Options::new(dir.clone());
            o.include = include;
            o.exclude = exclude;
            o.concurrency = concurrency;
            o.heartbeat = heartbeat;
            o.stale_after = stale_after;
            o.stall = stall_timeout;
            let progress = Arc::new(Progress::default());
            let p = progress.clone();
            let label = model.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let (done, total) = (p.bytes_done.load(Ordering::SeqCst), p.bytes_total.load(Ordering::SeqCst));
                    let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 0.0 };
                    eprintln!("{label}: {:.1}/{:.1} MB ({pct:.0}%)", done as f64 / 1e6, total as f64 / 1e6);
                }
            });
            let r = prewarm(&hub, &repo, &rev, &o, progress).await;
            ticker.abort();
            let s = r.with_context(|| format!("prewarm {model}"))?;
            let secs = s.elapsed.as_secs_f64().max(1e-9);
            println!(
                "{repo}@{rev} = {}: {} files, {:.1} MB, {:.1} MB downloaded in {:.1} s ({:.1} MB/s)",
                s.commit,
                s.files,
                s.bytes as f64 / 1e6,
                s.downloaded as f64 / 1e6,
                secs,
                s.downloaded as f64 / 1e6 / secs
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { model, deep } => {
            let (repo, rev) = split(&model);
            let r = check(&dir, &RepoId::model(&repo), &rev, if deep { Mode::Deep } else { Mode::Quick });
            for f in &r.findings {
                println!("  {f}");
            }
            let state = if r.is_complete() { "complete" } else { "INCOMPLETE" };
            println!(
                "{repo}@{rev}: {state} ({} files, {:.1} MB{})",
                r.files.len(),
                r.total_bytes() as f64 / 1e6,
                if r.verifiable { "" } else { ", no trees listing: unverifiable" }
            );
            Ok(if r.is_complete() { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        Cmd::Status => {
            let mut rows = Vec::new();
            for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let Some(repo) = RepoId::from_folder_name(&name) else { continue };
                let refs = std::fs::read_dir(e.path().join("refs"))
                    .map(|rd| rd.flatten().map(|r| r.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
                    .unwrap_or_default();
                for rev in refs {
                    let r = check(&dir, &repo, &rev, Mode::Quick);
                    rows.push(format!(
                        "{repo}@{rev}  {}  {:.1} MB  {}",
                        r.commit.as_deref().unwrap_or("-"),
                        r.total_bytes() as f64 / 1e6,
                        if r.is_complete() { "complete" } else { "incomplete" }
                    ));
                }
            }
            rows.sort();
            for r in rows {
                println!("{r}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
