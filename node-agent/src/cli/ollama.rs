//! `ollama://` models on the command line: `prewarm`, `verify`, and their `status` rows.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};

use hf_cache::ollama::{ModelName, Store};
use hf_cache::state::StateDir;
use hf_cache::units::{human_bytes, human_rate};

use super::prewarm::show_progress;
use super::PrewarmArgs;
use super::Row;
use crate::fetch::{FetchOptions, Progress};
use crate::ollama::{pull, record_if_warm, PullOptions, Registry};

/// Pulls `a.model` (`ollama://…`) into `store`; records it as warm in the state beside `hub_dir`.
pub(super) async fn prewarm(a: PrewarmArgs, hub_dir: &Path, store: PathBuf, mirror: Option<&str>) -> Result<ExitCode> {
    if !(a.include.is_empty() && a.exclude.is_empty()) {
        anyhow::bail!("--include and --exclude do not apply to Ollama models (a model is all its layers)");
    }
    if a.heartbeat.checked_mul(3).is_none_or(|h| a.stale_after < h) {
        anyhow::bail!("--stale-after must be at least three --heartbeat periods, or live leases get taken over");
    }
    let name = ModelName::parse(&a.model)?;
    let registry = Registry::new(mirror)?;
    let fetch = FetchOptions {
        heartbeat: a.heartbeat,
        stale_after: a.stale_after,
        stall: a.stall_timeout,
        ranges: a.ranges,
        range_min: a.range_min,
        range_size: a.range_size,
    };
    let o = PullOptions { store: store.clone(), concurrency: a.concurrency, fetch, deadline: a.deadline };
    let progress = Arc::new(Progress::default());
    let label = format!("ollama://{name}");
    let ticker = tokio::spawn(show_progress(label.clone(), progress.clone()));
    let r = pull(&registry, &name, &o, progress).await;
    ticker.abort();
    let _ = ticker.await;
    let s = r.with_context(|| format!("prewarm {label}"))?;
    let (h, st, n) = (hub_dir.to_path_buf(), store.clone(), name.clone());
    let (_, record_err) = tokio::task::spawn_blocking(move || record_if_warm(&h, &st, &n)).await?;
    if let Some(e) = record_err {
        eprintln!("aimodel-agent: could not record {label} as warm for the driver: {e}");
    }
    println!(
        "{label} = {}: {} blobs, {}, {} downloaded in {:.1} s ({}) into {}",
        s.manifest_digest,
        s.blobs,
        human_bytes(s.bytes),
        human_bytes(s.downloaded),
        s.elapsed.as_secs_f64(),
        human_rate(s.downloaded, s.elapsed),
        store.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks an Ollama model in `store`; exit 3 when it is not complete (or corrupt with `--deep`).
pub(super) fn verify(store: &Path, model: &str, deep: bool, json: bool) -> Result<ExitCode> {
    let name = ModelName::parse(model)?;
    let s = Store::new(store);
    let c = if deep { s.verify_deep(&name) } else { s.check(&name) };
    let corrupt = c.problems.iter().any(|p| matches!(p, hf_cache::ollama::Problem::HashMismatch { .. }));
    let state = match (c.is_complete(), corrupt) {
        (true, _) => "complete",
        (false, true) => "corrupt",
        (false, false) => "incomplete",
    };
    let code = if c.is_complete() { ExitCode::SUCCESS } else { ExitCode::from(3) };
    if json {
        let v = serde_json::json!({
            "model": format!("ollama://{name}"),
            "manifest": s.manifest_path(&name),
            "manifest_digest": c.manifest_digest,
            "state": state,
            "deep": deep,
            "blobs": c.manifest.as_ref().map_or(0, |m| m.blobs().len()),
            "bytes": c.bytes(),
            "problems": c.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    for p in &c.problems {
        println!("  {p}");
    }
    let shown = match state {
        "complete" => "complete",
        "corrupt" => "CORRUPT (remove the corrupt blobs and run aimodel-agent prewarm again)",
        _ => "INCOMPLETE (run aimodel-agent prewarm)",
    };
    println!(
        "ollama://{name}: {shown} ({} blobs, {}, {})",
        c.manifest.as_ref().map_or(0, |m| m.blobs().len()),
        human_bytes(c.bytes()),
        s.manifest_path(&name).display()
    );
    Ok(code)
}

/// The `status` rows of every model in the store.
pub(super) fn status_rows(store: &Path, state: &StateDir, pinned: &dyn Fn(&str) -> bool) -> Vec<Row> {
    let s = Store::new(store);
    s.models()
        .into_iter()
        .map(|name| {
            let c = s.check(&name);
            let key = hf_cache::ollama::state_key(&name);
            Row {
                model: format!("ollama://{name}"),
                repo: format!("ollama://{}", name.short()),
                revision: name.tag.clone(),
                commit: c.manifest_digest.clone(),
                bytes: c.bytes(),
                complete: c.is_complete(),
                used: state.last_used(&key),
                pinned: pinned(&key),
            }
        })
        .collect()
}
