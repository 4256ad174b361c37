//! `aimodel-agent verify` and `status`.

use super::Row;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};

use hf_cache::state::StateDir;
use hf_cache::units::human_bytes;
use hf_cache::{check, Mode, RepoId};

use super::{check_repo_id, split};

/// Checks one model; exit 3 when it is not complete.
pub(super) fn verify(dir: &Path, model: &str, deep: bool, json: bool) -> Result<ExitCode> {
    let (repo, rev) = split(model);
    check_repo_id(&repo)?;
    if !hf_cache::layout::is_safe_revision(&rev) {
        anyhow::bail!("{rev:?} is not a revision (a branch, tag or commit)");
    }
    let r = check(dir, &RepoId::model(&repo), &rev, if deep { Mode::Deep } else { Mode::Quick });
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

/// Every cached model of `dir` (the hub cache) and of `store` (Ollama's).
pub(super) fn status(dir: &Path, store: &Path, pinned: &[String], json: bool) -> Result<ExitCode> {
    let state = StateDir::for_hub(dir);
    let shared: Vec<String> = state.pins().into_iter().map(|p| p.repo).collect();
    let is_pinned = |key: &str| pinned.iter().chain(&shared).any(|p| p == key);
    let mut rows = Vec::new();
    let listing = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && store.is_dir() => Vec::new(),
        r => r.with_context(|| format!("reading {}", dir.display()))?.flatten().collect(),
    };
    for e in listing {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(repo) = RepoId::from_folder_name(&name) else { continue };
        let refs = std::fs::read_dir(e.path().join("refs"))
            .map(|rd| rd.flatten().map(|r| r.file_name().to_string_lossy().to_string()).collect::<Vec<_>>())
            .unwrap_or_default();
        for rev in refs {
            let r = check(dir, &repo, &rev, Mode::Quick);
            rows.push(Row {
                model: format!("{}@{rev}", repo.id),
                repo: repo.id.clone(),
                revision: rev,
                commit: r.commit.clone(),
                bytes: r.total_bytes(),
                complete: r.is_complete(),
                used: state.last_used(&repo.id),
                pinned: is_pinned(&repo.id),
            });
        }
    }
    rows.extend(super::ollama::status_rows(store, &state, &is_pinned));
    rows.sort_by(|a, b| a.model.cmp(&b.model));
    if json {
        let unix =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let models: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "repo": r.repo,
                    "revision": r.revision,
                    "commit": r.commit,
                    "bytes": r.bytes,
                    "complete": r.complete,
                    "last_used": r.used.map(unix),
                    "pinned": r.pinned,
                })
            })
            .collect();
        let v = serde_json::json!({ "cache": dir, "ollama_store": store, "models": models });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("cache {}", dir.display());
    if rows.is_empty() {
        println!("empty cache: no models");
        return Ok(ExitCode::SUCCESS);
    }
    let width = rows.iter().map(|r| r.model.len()).max().unwrap_or(0).max(5);
    println!("{:<width$}  {:<40}  {:>10}  {:<10}  {:<12}  PINNED", "MODEL", "COMMIT", "SIZE", "STATE", "LAST USED");
    for r in rows {
        println!(
            "{:<width$}  {:<40}  {:>10}  {:<10}  {:<12}  {}",
            r.model,
            r.commit.as_deref().map(|c| c.chars().take(40).collect::<String>()).unwrap_or_else(|| "-".into()),
            human_bytes(r.bytes),
            if r.complete { "complete" } else { "incomplete" },
            r.used.map(|t| format!("{} ago", ago(t))).unwrap_or_else(|| "never".into()),
            if r.pinned { "pinned" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `3m`, `2h`, `5d`: how long ago.
pub(super) fn ago(t: std::time::SystemTime) -> String {
    let s = std::time::SystemTime::now().duration_since(t).unwrap_or_default().as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
