//! `aimodel-agent gc`, `pin` and `unpin`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use hf_cache::gc;
use hf_cache::state::StateDir;
use hf_cache::units::human_bytes;

use super::inspect::ago;
use super::{state_key_arg, GcArgs};

/// Evicts least-recently-used models until the target holds.
pub(super) async fn gc(a: GcArgs, dir: PathBuf, store: PathBuf, pinned: Vec<String>) -> Result<ExitCode> {
    let GcArgs { target_free, max_size, pin, in_use_ttl, dry_run, json } = a;
    let pin = pin.iter().map(|r| state_key_arg(r)).collect::<Result<Vec<_>>>()?;
    for r in &pin {
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
        ollama_store: Some(store),
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

/// Pins `repo` for every node's gc.
pub(super) fn pin(dir: &Path, repo: &str) -> Result<ExitCode> {
    let key = state_key_arg(repo)?;
    let state = StateDir::for_hub(dir);
    state.pin(&key, &format!("{}:cli", hf_cache::state::node_name())).with_context(|| format!("pinning {repo}"))?;
    println!("{repo}: pinned for every node's gc ({})", state.root().join("pins").display());
    Ok(ExitCode::SUCCESS)
}

/// Removes the shared pin of `repo`.
pub(super) fn unpin(dir: &Path, repo: &str, pinned: &[String]) -> Result<ExitCode> {
    let key = state_key_arg(repo)?;
    StateDir::for_hub(dir).unpin(&key).with_context(|| format!("unpinning {repo}"))?;
    if pinned.contains(&key) {
        println!("{repo}: shared pin removed, but --config pins it (pin = true): its daemon pins it again");
    } else {
        println!("{repo}: unpinned");
    }
    Ok(ExitCode::SUCCESS)
}
