//! What Nomad jobs want of a node, read from Nomad's job JSON: the models of
//! every `driver = "aimodel"` task (prewarmed into the shared cache) and the
//! image each such task will run (pulled ahead by the agent, `crate::images`).

use std::collections::BTreeSet;

use serde::Serialize;

/// A model and revision some job wants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Wanted {
    pub repo: String,
    pub revision: String,
}

/// The models of the `driver = "aimodel"` tasks of one job (Nomad's job JSON).
pub fn models_of_job(job: &serde_json::Value) -> Vec<Wanted> {
    let mut out = BTreeSet::new();
    let groups = job.get("TaskGroups").and_then(|g| g.as_array()).cloned().unwrap_or_default();
    for g in groups {
        for t in g.get("Tasks").and_then(|t| t.as_array()).cloned().unwrap_or_default() {
            if t.get("Driver").and_then(|d| d.as_str()) != Some("aimodel") {
                continue;
            }
            let cfg = t.get("Config").cloned().unwrap_or_default();
            let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_string);
            if s("engine").as_deref() == Some("ollama") {
                // `model = "llama3.2:3b"` and/or `models = ["llama3.2:3b", "codellama:7b"]`.
                let listed = cfg.get("models").and_then(|v| v.as_array()).cloned().unwrap_or_default();
                let names = s("model").into_iter().chain(listed.iter().filter_map(|v| v.as_str().map(str::to_string)));
                for name in names.filter(|n| !n.contains("${")) {
                    if let Ok(n) = hf_cache::ollama::ModelName::parse(&name) {
                        out.insert(Wanted {
                            repo: format!("{}{}", hf_cache::ollama::SCHEME, n.short()),
                            revision: n.tag,
                        });
                    }
                }
                continue;
            }
            let Some(repo) = s("model") else { continue };
            let revision = s("revision").unwrap_or_else(|| "main".into());
            // Runtime interpolation (`${NOMAD_META_model}`) is only known on the client.
            if repo.contains("${")
                || !hf_cache::layout::is_safe_revision(&revision)
                || !hf_cache::layout::is_repo_id(&repo)
            {
                continue;
            }
            out.insert(Wanted { repo, revision });
        }
    }
    out.into_iter().collect()
}

/// The image a `driver = "aimodel"` task will run, with what the node policy
/// needs to decide whether this node pulls it ahead.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct TaskImage {
    /// `namespace/job/group/task`.
    pub task: String,
    /// The task's own `image`, when it names one without runtime interpolation.
    pub image: Option<String>,
    /// The task's `engine` (its default image is the node's `driver.aimodel.image.<engine>`).
    pub engine: String,
    /// NVIDIA GPUs the task asks for (`device "nvidia/gpu" { count = N }`).
    pub gpus: u64,
    /// The job's datacenters (globs allowed, as Nomad allows them).
    pub datacenters: Vec<String>,
    /// The job's node pool (`""` when Nomad sent none; `all` matches every node).
    pub node_pool: String,
    /// `meta { "aimodel.prepull" = "false" }` on the job, group or task.
    pub opted_out: bool,
}

/// What the Nomad job watch tells the image pull-ahead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageWants {
    /// The images of the aimodel tasks of every job read so far.
    pub tasks: Vec<TaskImage>,
    /// Every listed job was read in the last pass (only then may an image no
    /// task lists be released: a failed read must not look like a removed job).
    pub complete: bool,
}

/// The meta key a job, group or task sets to `"false"` to opt out of image pull-ahead.
pub const PREPULL_META: &str = "aimodel.prepull";

/// The image of each `driver = "aimodel"` task of one job (Nomad's job JSON).
pub fn images_of_job(namespace: &str, job: &serde_json::Value) -> Vec<TaskImage> {
    let opt_out = |v: &serde_json::Value| {
        v.get("Meta").and_then(|m| m.get(PREPULL_META)).and_then(|x| x.as_str()).is_some_and(|x| x == "false")
    };
    let arr = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_array()).cloned().unwrap_or_default();
    let text = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    let datacenters: Vec<String> =
        arr(job, "Datacenters").iter().filter_map(|d| d.as_str().map(String::from)).collect();
    let mut out = Vec::new();
    for g in arr(job, "TaskGroups") {
        for t in arr(&g, "Tasks") {
            if t.get("Driver").and_then(|d| d.as_str()) != Some("aimodel") {
                continue;
            }
            let cfg = t.get("Config").cloned().unwrap_or_default();
            let image = cfg.get("image").and_then(|v| v.as_str()).filter(|i| !i.contains("${") && !i.trim().is_empty());
            let gpus = t
                .get("Resources")
                .map(|r| arr(r, "Devices"))
                .unwrap_or_default()
                .iter()
                // `gpu`, `nvidia/gpu`, or a model of it (`nvidia/gpu/Tesla T4`).
                .filter(|d| {
                    d.get("Name").and_then(|n| n.as_str()).is_some_and(|n| n == "gpu" || n.starts_with("nvidia/gpu"))
                })
                .filter_map(|d| d.get("Count").and_then(serde_json::Value::as_u64))
                .sum();
            out.push(TaskImage {
                task: format!("{namespace}/{}/{}/{}", text(job, "ID"), text(&g, "Name"), text(&t, "Name")),
                image: image.map(String::from),
                engine: cfg.get("engine").and_then(|v| v.as_str()).unwrap_or_default().to_string(),
                gpus,
                datacenters: datacenters.clone(),
                node_pool: text(job, "NodePool"),
                opted_out: opt_out(job) || opt_out(&g) || opt_out(&t),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_of_aimodel_tasks_only() {
        let job = serde_json::json!({
            "ID": "llm",
            "TaskGroups": [
                {"Tasks": [
                    {"Driver": "aimodel", "Config": {"engine": "vllm", "model": "org/a", "revision": "v1"}},
                    {"Driver": "aimodel", "Config": {"engine": "sglang", "model": "org/b"}},
                    {"Driver": "aimodel", "Config": {"engine": "ollama", "model": "llama3"}},
                    {"Driver": "aimodel", "Config": {"engine": "ollama", "models": ["llama3.2:3b", "../x", "${NOMAD_META_m}"]}},
                    {"Driver": "docker", "Config": {"model": "org/c"}},
                    {"Driver": "aimodel", "Config": {"engine": "vllm", "model": "${NOMAD_META_model}"}}
                ]},
                {"Tasks": [{"Driver": "aimodel", "Config": {"model": "org/a", "revision": "v1"}}]}
            ]
        });
        let w = models_of_job(&job);
        assert_eq!(
            w,
            [
                Wanted { repo: "ollama://llama3.2:3b".into(), revision: "3b".into() },
                Wanted { repo: "ollama://llama3:latest".into(), revision: "latest".into() },
                Wanted { repo: "org/a".into(), revision: "v1".into() },
                Wanted { repo: "org/b".into(), revision: "main".into() }
            ]
        );
        assert!(models_of_job(&serde_json::json!({})).is_empty());
    }

    #[test]
    fn images_of_aimodel_tasks_with_what_the_policy_needs() {
        let job = serde_json::json!({
            "ID": "llm", "Datacenters": ["dc1", "gpu-*"],
            "TaskGroups": [
                {"Name": "g", "Tasks": [
                    {"Name": "a", "Driver": "aimodel", "Config": {"engine": "vllm", "model": "org/a"},
                     "Resources": {"Devices": [{"Name": "nvidia/gpu", "Count": 1}, {"Name": "nvidia/gpu/Tesla T4", "Count": 1}]}},
                    {"Name": "b", "Driver": "aimodel", "Config": {"engine": "custom", "image": "r.example/x:1"},
                     "Meta": {"aimodel.prepull": "false"}},
                    {"Name": "c", "Driver": "aimodel", "Config": {"engine": "custom", "image": "${NOMAD_META_img}"}},
                    {"Name": "d", "Driver": "docker", "Config": {"image": "busybox"}}
                ]}
            ]
        });
        let got = images_of_job("default", &job);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].task, "default/llm/g/a");
        assert_eq!((got[0].image.as_deref(), got[0].engine.as_str(), got[0].gpus), (None, "vllm", 2));
        assert_eq!(got[0].datacenters, ["dc1", "gpu-*"]);
        assert!(!got[0].opted_out && got[1].opted_out);
        assert_eq!(got[1].image.as_deref(), Some("r.example/x:1"));
        assert_eq!(got[2].image, None, "runtime interpolation is only known on the client");
    }
}
