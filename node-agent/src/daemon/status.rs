//! Health (why the agent cannot do its job), the cache write probe and the
//! `/status` document.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hf_cache::state::{node_name, unix_now};

use super::{lock, Shared, SharedRef, PROBE_EVERY};
use crate::config::AgentConfig;

/// Why the agent cannot do its job now (empty: healthy): the cache is not
/// writable, Nomad (when configured) has not answered for `nomad.health_grace`, or
/// every recent prewarm failed.
pub fn health(g: &Shared) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(e) = &g.cache_error {
        why.push(format!("the cache is not writable: {e}"));
    }
    if let Some(n) = &g.nomad {
        let n = n.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &n.last_error {
            let since_ok = n.last_ok.map(|t| Duration::from_secs(unix_now().saturating_sub(t)));
            let since_start = g.started.map(|t| t.elapsed()).unwrap_or_default();
            if since_ok.unwrap_or(since_start) >= Duration::from_secs(n.health_grace_secs) {
                let d = since_ok.unwrap_or(since_start).as_secs();
                why.push(format!("nomad has not answered for {d}s: {e}"));
            }
        }
    }
    if !g.recent.is_empty() && g.recent.iter().all(|ok| !ok) {
        let last = g
            .models
            .values()
            .filter(|m| m.state == "failed")
            .find_map(|m| m.last_error.as_ref().map(|e| format!("{}@{}: {e}", m.repo, m.revision)));
        why.push(format!(
            "the last {} prewarms failed{}",
            g.recent.len(),
            last.map(|l| format!(" ({l})")).unwrap_or_default()
        ));
    }
    why
}

/// Bytes fetched from the hub since the start: finished prewarms plus running ones.
pub(super) fn downloaded_total(g: &Shared) -> u64 {
    let live: u64 =
        g.models.values().filter_map(|m| m.progress.as_ref()).map(|p| p.downloaded.load(Ordering::SeqCst)).sum();
    g.counters.downloaded_bytes + live
}

/// Tries to create and remove a file in the state directory and in the hub
/// cache directory: the agent's two places of writing.
fn probe_cache(hub_dir: &std::path::Path) -> std::io::Result<()> {
    let name = format!(".health-probe-{}-{}", std::process::id(), hf_cache::safefs::random_hex(4));
    let state = hf_cache::state::StateDir::for_hub(hub_dir);
    let root =
        state.open_root().map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", state.root().display())))?;
    hf_cache::safefs::write_atomic_at(&root, std::ffi::OsStr::new(&name), b"ok")
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", state.root().display())))?;
    let _ = hf_cache::safefs::remove_at(&root, std::ffi::OsStr::new(&name));
    let p = hub_dir.join(&name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", hub_dir.display())))?;
    std::fs::remove_file(&p)
}

/// Probes the cache every `PROBE_EVERY` (a hung mount counts as not writable).
pub(super) async fn run_probe(cfg: Arc<AgentConfig>, shared: SharedRef) {
    loop {
        let hub = cfg.hub_dir();
        let r =
            tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || probe_cache(&hub))).await;
        let err = match r {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e.to_string()),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("a write probe did not finish within 10s (a hung mount?)".to_string()),
        };
        {
            let mut g = lock(&shared);
            if err.is_some() && g.cache_error.is_none() {
                tracing::warn!(error = err.as_deref().unwrap_or_default(), "the cache is not writable");
            } else if err.is_none() && g.cache_error.is_some() {
                tracing::info!("the cache is writable again");
            }
            g.cache_error = err;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// The `/status` document.
pub fn status_json(cfg: &AgentConfig, s: &SharedRef) -> serde_json::Value {
    let g = lock(s);
    let models: Vec<serde_json::Value> = g
        .models
        .values()
        .map(|m| {
            let mut m = m.clone();
            if let Some(p) = &m.progress {
                m.bytes_done = p.bytes_done.load(Ordering::SeqCst);
                m.bytes_total = p.bytes_total.load(Ordering::SeqCst);
            }
            serde_json::to_value(m).unwrap_or_default()
        })
        .collect();
    let reasons = health(&g);
    let mut counters = serde_json::to_value(&g.counters).unwrap_or_default();
    // The same number as /metrics: finished prewarms plus running ones.
    counters["downloaded_bytes"] = downloaded_total(&g).into();
    serde_json::json!({
        "node": node_name(),
        "hf_home": cfg.hf_home,
        "health": { "ok": reasons.is_empty(), "reasons": reasons },
        "models": models,
        "counters": counters,
        "nomad": g.nomad.as_ref().map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        "images": g.images.as_ref().map(|i| i.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        "gc": g.gc_last,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::nomad::NomadStatus;

    #[test]
    fn health_names_each_reason_and_gives_nomad_a_grace_period() {
        let mut g = Shared { started: Some(Instant::now()), ..Shared::default() };
        assert!(health(&g).is_empty());
        g.cache_error = Some("/c/aimodel: Not a directory".into());
        assert_eq!(health(&g), ["the cache is not writable: /c/aimodel: Not a directory"]);
        g.cache_error = None;

        // Nomad failing, but it answered 10 s ago: within the grace period.
        let status = Arc::new(Mutex::new(NomadStatus {
            last_error: Some("connection refused".into()),
            last_ok: Some(unix_now() - 10),
            health_grace_secs: 60,
            ..NomadStatus::default()
        }));
        g.nomad = Some(status.clone());
        assert!(health(&g).is_empty());
        status.lock().unwrap().last_ok = Some(unix_now() - 300);
        let why = health(&g);
        assert!(
            why.len() == 1
                && why[0].starts_with("nomad has not answered for ")
                && why[0].ends_with("connection refused"),
            "{why:?}"
        );
        status.lock().unwrap().last_error = None;
        assert!(health(&g).is_empty());

        // Every recent prewarm failed → unhealthy; one success among them → healthy.
        g.recent.extend([false, false]);
        assert!(health(&g)[0].starts_with("the last 2 prewarms failed"), "{:?}", health(&g));
        g.recent.push_back(true);
        assert!(health(&g).is_empty());
    }
}
