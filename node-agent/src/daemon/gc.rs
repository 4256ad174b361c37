//! Shared pins of the manifest and the watermark gc pass.

use std::collections::BTreeMap;

use hf_cache::state::{node_name, unix_now};

use super::{lock, SharedRef};
use crate::config::AgentConfig;

/// Keeps the shared pins (`aimodel/pins/`) in line with this node's manifest:
/// every `pin = true` model pinned (every node's gc honours it); a pin this
/// node's manifest wrote for a model it no longer pins removed.
fn sync_pins(cfg: &AgentConfig) {
    let state = hf_cache::state::StateDir::for_hub(&cfg.hub_dir());
    let me = format!("{}:manifest", node_name());
    let wanted = cfg.pinned();
    let have = state.pins();
    for repo in &wanted {
        if !have.iter().any(|p| &p.repo == repo) {
            if let Err(e) = state.pin(repo, &me) {
                tracing::warn!(repo = %repo, error = %e, "could not write the shared pin");
            }
        }
    }
    for p in have.iter().filter(|p| p.by == me && !wanted.contains(&p.repo)) {
        if let Err(e) = state.unpin(&p.repo) {
            tracing::warn!(repo = %p.repo, error = %e, "could not remove the shared pin");
        }
    }
}

pub(super) fn gc_pass(cfg: &AgentConfig, protected: Vec<String>, shared: &SharedRef) {
    sync_pins(cfg);
    let hub = cfg.hub_dir();
    let Ok(free) = hf_cache::mount::space(&hub).map(|(f, _)| f) else { return };
    let policy_base = hf_cache::gc::Policy {
        pinned: cfg.pinned(),
        protected,
        in_use_ttl: cfg.gc.as_ref().map(|g| g.in_use_ttl.0).unwrap_or(crate::config::default_in_use_ttl().0),
        lease_fresh: cfg.stale_after.0,
        ollama_store: Some(cfg.ollama_store()),
        ..Default::default()
    };
    let Some(gc) = &cfg.gc else {
        if let Ok(inv) = hf_cache::gc::inventory(&hub, &policy_base) {
            let mut g = lock(shared);
            g.counters.cache_bytes = inv.iter().map(|m| m.bytes).sum();
            g.counters.cache_free_bytes = free;
        }
        return;
    };
    let policy = hf_cache::gc::Policy {
        target_free: gc.target_free.map(|b| b.0),
        max_size: gc.max_size.map(|b| b.0),
        ..policy_base
    };
    let outcome = if gc.dry_run {
        hf_cache::gc::plan(&hub, &policy).map(|p| (p, Vec::new()))
    } else {
        hf_cache::gc::run(&hub, &policy)
    };
    match outcome {
        Ok((plan, done)) => {
            for (repo, bytes) in &done {
                tracing::info!(repo = %repo, bytes, "evicted");
            }
            let mut g = lock(shared);
            g.counters.evicted_models += done.len() as u64;
            g.counters.evicted_bytes += done.iter().map(|(_, b)| b).sum::<u64>();
            let freed: u64 = done.iter().map(|(_, b)| b).sum();
            g.counters.cache_bytes = plan.total.saturating_sub(freed);
            g.counters.cache_free_bytes = hf_cache::mount::space(&hub).map(|(f, _)| f).unwrap_or(free);
            g.gc_last = Some(serde_json::json!({
                "at": unix_now(),
                "dry_run": gc.dry_run,
                "would_evict": plan.evict,
                "evicted": done.iter().map(|(r, _)| r).collect::<Vec<_>>(),
                "reaches_target": plan.reaches_target,
                "kept": plan.models.iter().filter_map(|m| m.keep.as_ref().map(|k| (m.repo.clone(), k.to_string()))).collect::<BTreeMap<_, _>>(),
            }));
            if gc.target_free.is_some() || gc.max_size.is_some() {
                g.counters.gc_target_reachable = Some(plan.reaches_target);
            }
            if !plan.reaches_target {
                tracing::warn!("gc cannot reach its target: the rest is pinned, in use or wanted");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => tracing::debug!(reason = %e, "gc skipped"),
        Err(e) => tracing::warn!(error = %e, "gc failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_pins_become_shared_pins_and_go_with_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().display().to_string();
        let parse = |models: &str| {
            AgentConfig::parse(&format!("hf_home = \"{home}\"\nmodels = [{models}]"), std::path::Path::new("t.hcl"))
                .unwrap()
        };
        let cfg = parse("{ repo = \"o/pinned\", pin = true }, { repo = \"o/free\" }");
        let state = hf_cache::state::StateDir::for_hub(&cfg.hub_dir());
        // Another node pinned something this manifest does not know.
        state.pin("o/theirs", "other:manifest").unwrap();
        sync_pins(&cfg);
        let mut pins: Vec<(String, String)> = state.pins().into_iter().map(|p| (p.repo, p.by)).collect();
        pins.sort();
        assert_eq!(
            pins,
            [
                ("o/pinned".to_string(), format!("{}:manifest", node_name())),
                ("o/theirs".into(), "other:manifest".into())
            ]
        );
        // This node's manifest stops pinning it: its own pin goes, the other node's stays.
        sync_pins(&parse("{ repo = \"o/pinned\" }"));
        assert_eq!(state.pins().into_iter().map(|p| p.repo).collect::<Vec<_>>(), ["o/theirs"]);
    }
}
