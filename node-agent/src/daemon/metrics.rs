//! The `/metrics` page.

use super::status::{downloaded_total, health};
use super::{lock, SharedRef};
use crate::config::AgentConfig;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `/metrics` page (Prometheus text format 0.0.4).
pub fn metrics_text(cfg: &AgentConfig, s: &SharedRef) -> String {
    let g = lock(s);
    let in_flight = g.models.values().filter(|m| m.state == "downloading").count();
    let downloaded = downloaded_total(&g);
    let healthy = health(&g).is_empty();
    let nomad = g.nomad.as_ref().map(|n| n.lock().unwrap_or_else(|p| p.into_inner()).clone());
    let c = &g.counters;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "aimodel_agent_downloaded_bytes_total",
        "counter",
        "Bytes fetched from the hub by this agent.",
        vec![(String::new(), downloaded)],
    );
    metric(
        "aimodel_agent_downloads_in_flight",
        "gauge",
        "Models being prewarmed now.",
        vec![(String::new(), in_flight as u64)],
    );
    metric("aimodel_agent_failures_total", "counter", "Prewarms that failed.", vec![(String::new(), c.failures)]);
    metric(
        "aimodel_agent_cache_bytes",
        "gauge",
        "Bytes of the models in the cache.",
        vec![(String::new(), c.cache_bytes)],
    );
    metric(
        "aimodel_agent_cache_free_bytes",
        "gauge",
        "Free bytes of the cache filesystem.",
        vec![(String::new(), c.cache_free_bytes)],
    );
    metric(
        "aimodel_agent_evicted_bytes_total",
        "counter",
        "Bytes freed by gc.",
        vec![(String::new(), c.evicted_bytes)],
    );
    metric(
        "aimodel_agent_evicted_models_total",
        "counter",
        "Models evicted by gc.",
        vec![(String::new(), c.evicted_models)],
    );
    let warm = g
        .models
        .values()
        .map(|m| {
            (
                format!("{{repo=\"{}\",revision=\"{}\"}}", label(&m.repo), label(&m.revision)),
                u64::from(m.state == "warm"),
            )
        })
        .collect();
    metric("aimodel_agent_model_warm", "gauge", "1 when the model is complete in the cache.", warm);
    let labels = |key: &str| {
        let (repo, rev) = key.split_once('@').unwrap_or((key, ""));
        format!("{{repo=\"{}\",revision=\"{}\"}}", label(repo), label(rev))
    };
    metric(
        "aimodel_agent_model_failures_total",
        "counter",
        "Failed prewarms of one model since the agent started.",
        c.model_failures.iter().map(|(k, v)| (labels(k), *v)).collect(),
    );
    metric(
        "aimodel_agent_model_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the model's last check that found it complete.",
        g.models
            .values()
            .filter_map(|m| m.last_ok.map(|t| (labels(&format!("{}@{}", m.repo, m.revision)), t)))
            .collect(),
    );
    metric(
        "aimodel_agent_gc_target_reachable",
        "gauge",
        "1 when the last gc pass could reach its target (absent before a gc with a target ran).",
        c.gc_target_reachable.map(|r| vec![(String::new(), u64::from(r))]).unwrap_or_default(),
    );
    if let Some(gc) = &cfg.gc {
        let mut targets = Vec::new();
        if let Some(t) = gc.target_free {
            targets.push(("{kind=\"target_free\"}".to_string(), t.0));
        }
        if let Some(t) = gc.max_size {
            targets.push(("{kind=\"max_size\"}".to_string(), t.0));
        }
        metric("aimodel_agent_gc_target_bytes", "gauge", "The gc watermarks of the configuration.", targets);
    }
    if let Some(n) = nomad {
        metric(
            "aimodel_agent_nomad_errors_total",
            "counter",
            "Failed Nomad job list or job reads.",
            vec![(String::new(), n.errors)],
        );
    }
    if let Some(i) = g.images.as_ref().map(|i| i.lock().unwrap_or_else(|p| p.into_inner()).clone()) {
        let states = ["pending", "pulling", "present", "paused", "failed"];
        let count = |st: &str| i.images.values().filter(|m| m.state == st).count() as u64;
        metric(
            "aimodel_agent_images",
            "gauge",
            "Engine images this node wants, by state.",
            states.iter().map(|st| (format!("{{state=\"{st}\"}}"), count(st))).collect(),
        );
        metric(
            "aimodel_agent_image_pulls_total",
            "counter",
            "Image pulls ahead, by result.",
            vec![("{result=\"ok\"}".into(), i.pulls_ok), ("{result=\"failed\"}".into(), i.pulls_failed)],
        );
        metric(
            "aimodel_agent_image_pulled_bytes_total",
            "counter",
            "Bytes of images pulled ahead by finished pulls.",
            vec![(String::new(), i.pulled_bytes)],
        );
        metric(
            "aimodel_agent_images_removed_total",
            "counter",
            "Images pulled ahead and removed once no job wanted them.",
            vec![(String::new(), i.removed)],
        );
        metric(
            "aimodel_agent_image_guard_active",
            "gauge",
            "1 while the disk guard holds pulls back.",
            vec![(String::new(), u64::from(i.guard.is_some()))],
        );
    }
    metric(
        "aimodel_agent_cache_writable",
        "gauge",
        "1 when the last write probe of the cache succeeded.",
        vec![(String::new(), u64::from(g.cache_error.is_none()))],
    );
    metric("aimodel_agent_healthy", "gauge", "1 when /health answers 200.", vec![(String::new(), u64::from(healthy))]);
    out
}
