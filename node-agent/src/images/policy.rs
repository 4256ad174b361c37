//! Which images this node pulls ahead: the documented policy, a pure function
//! of the jobs' tasks and this node as Nomad reports it.
//!
//! A node *keeps* a task's image ([`image_for`]) when:
//! - the job does not opt out (`meta { "aimodel.prepull" = "false" }` on the job, group or task);
//! - the node is in one of the job's datacenters and in its node pool;
//! - the image is known: the task's own `image`, else the default this node's
//!   plugin publishes for the engine (`driver.aimodel.image.<engine>`).
//!
//! and *pulls* it ([`decide`]) when moreover:
//! - the node's `aimodel` driver is detected and healthy;
//! - the node has at least the NVIDIA GPUs the task asks for (`device "nvidia/gpu"`).
//!
//! Driver health and GPU health come and go (an NFS hiccup, a GPU fault): they
//! gate new pulls, never the release of an image a registered job wants.

use std::collections::BTreeMap;

use crate::jobs::TaskImage;

/// What the policy reads of this node (Nomad's node JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    pub datacenter: String,
    pub node_pool: String,
    pub driver_healthy: bool,
    /// `driver.aimodel.*` attributes (the driver's fingerprint).
    pub attributes: BTreeMap<String, String>,
    /// Healthy NVIDIA GPUs.
    pub gpus: u64,
}

/// Reads a node from `GET /v1/node/<id>`.
pub fn node_view(node: &serde_json::Value) -> NodeView {
    let driver = node.get("Drivers").and_then(|d| d.get("aimodel"));
    let flag = |k: &str| driver.and_then(|d| d.get(k)).and_then(serde_json::Value::as_bool).unwrap_or(false);
    let mut attributes = BTreeMap::new();
    // The client copies driver attributes into the node's own (client/node_updater.go).
    for source in [node.get("Attributes"), driver.and_then(|d| d.get("Attributes"))].into_iter().flatten() {
        if let Some(map) = source.as_object() {
            for (k, v) in map.iter().filter(|(k, _)| k.starts_with("driver.aimodel.")) {
                if let Some(v) = v.as_str() {
                    attributes.insert(k.clone(), v.to_string());
                }
            }
        }
    }
    let devices = node.get("NodeResources").and_then(|r| r.get("Devices")).and_then(|d| d.as_array());
    let gpus = devices
        .map(|ds| {
            ds.iter()
                .filter(|d| d.get("Vendor").and_then(|v| v.as_str()) == Some("nvidia"))
                .filter(|d| d.get("Type").and_then(|v| v.as_str()) == Some("gpu"))
                .flat_map(|d| d.get("Instances").and_then(|i| i.as_array()).cloned().unwrap_or_default())
                .filter(|i| i.get("Healthy").and_then(serde_json::Value::as_bool).unwrap_or(false))
                .count() as u64
        })
        .unwrap_or(0);
    NodeView {
        datacenter: node.get("Datacenter").and_then(|d| d.as_str()).unwrap_or_default().to_string(),
        node_pool: node.get("NodePool").and_then(|d| d.as_str()).unwrap_or_default().to_string(),
        driver_healthy: flag("Detected") && flag("Healthy"),
        attributes,
        gpus,
    }
}

/// `*` matches any run of characters (Nomad's datacenter globs).
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(&pattern.chars().collect::<Vec<_>>(), &text.chars().collect::<Vec<_>>())
}

/// The image this node keeps for `task` (a registered job wants it here), or why not.
pub fn image_for(task: &TaskImage, node: &NodeView) -> Result<String, String> {
    if task.opted_out {
        return Err(format!("{}: the job opts out (meta {} = \"false\")", task.task, crate::jobs::PREPULL_META));
    }
    if !task.datacenters.is_empty() && !task.datacenters.iter().any(|d| glob(d, &node.datacenter)) {
        return Err(format!("{}: not in the job's datacenters {:?}", task.task, task.datacenters));
    }
    let pool = task.node_pool.as_str();
    if !pool.is_empty() && pool != "all" && !node.node_pool.is_empty() && pool != node.node_pool {
        return Err(format!("{}: the job's node pool is {pool:?}, this node's {:?}", task.task, node.node_pool));
    }
    if let Some(image) = &task.image {
        return Ok(image.clone());
    }
    node.attributes
        .get(&format!("driver.aimodel.image.{}", task.engine))
        .filter(|i| !i.trim().is_empty())
        .cloned()
        .ok_or_else(|| {
            format!("{}: no image, and this node's driver has no default for engine {:?}", task.task, task.engine)
        })
}

/// The image this node pulls for `task` now, or why it does not.
pub fn decide(task: &TaskImage, node: &NodeView) -> Result<String, String> {
    let image = image_for(task, node)?;
    if !node.driver_healthy {
        return Err(format!("{}: the aimodel driver is not healthy on this node", task.task));
    }
    if task.gpus > node.gpus {
        return Err(format!("{}: asks for {} GPUs, this node has {}", task.task, task.gpus, node.gpus));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> serde_json::Value {
        serde_json::json!({
            "ID": "n1", "Datacenter": "gpu-east",
            "Attributes": {"driver.aimodel.image.vllm": "vllm/vllm-openai:v1", "kernel.name": "linux"},
            "Drivers": {"aimodel": {"Detected": true, "Healthy": true, "Attributes": {"driver.aimodel.version": "0.1"}}},
            "NodeResources": {"Devices": [
                {"Vendor": "nvidia", "Type": "gpu", "Name": "A100", "Instances": [
                    {"ID": "GPU-1", "Healthy": true}, {"ID": "GPU-2", "Healthy": false}]}
            ]}
        })
    }

    fn task(image: Option<&str>, gpus: u64) -> TaskImage {
        TaskImage {
            task: "default/j/g/t".into(),
            image: image.map(String::from),
            engine: "vllm".into(),
            gpus,
            datacenters: vec!["gpu-*".into()],
            node_pool: String::new(),
            opted_out: false,
        }
    }

    #[test]
    fn the_policy_reads_the_node_as_nomad_reports_it() {
        let n = node_view(&node());
        assert_eq!((n.datacenter.as_str(), n.driver_healthy, n.gpus), ("gpu-east", true, 1));
        assert_eq!(n.attributes.len(), 2, "{:?}", n.attributes);
        assert_eq!(decide(&task(None, 1), &n).unwrap(), "vllm/vllm-openai:v1");
        assert_eq!(decide(&task(Some("r.example/own:2"), 0), &n).unwrap(), "r.example/own:2");
        assert!(decide(&task(None, 2), &n).unwrap_err().contains("asks for 2 GPUs, this node has 1"));
        let elsewhere = TaskImage { datacenters: vec!["dc1".into()], ..task(None, 0) };
        assert!(decide(&elsewhere, &n).unwrap_err().contains("datacenters"));
        let out = TaskImage { opted_out: true, ..task(None, 0) };
        assert!(decide(&out, &n).unwrap_err().contains("opts out"));
        let tgi = TaskImage { engine: "tgi".into(), ..task(None, 0) };
        assert!(decide(&tgi, &n).unwrap_err().contains("no default for engine \"tgi\""));
        let mut sick = node();
        sick["Drivers"]["aimodel"]["Healthy"] = false.into();
        assert!(decide(&task(None, 0), &node_view(&sick)).unwrap_err().contains("not healthy"));
        assert!(image_for(&task(None, 0), &node_view(&sick)).is_ok(), "health gates pulls, not keeping");
        assert!(glob("*", "x") && glob("a*c", "abbc") && !glob("a*c", "abd") && glob("dc1", "dc1"));
        assert!(glob("é*", "été") && !glob("a", "é"), "any characters, no byte slicing");
        let pooled = TaskImage { node_pool: "gpu".into(), ..task(None, 0) };
        let mut in_pool = node();
        in_pool["NodePool"] = "default".into();
        assert!(decide(&pooled, &node_view(&in_pool)).unwrap_err().contains("node pool"));
        let any = TaskImage { node_pool: "all".into(), ..task(None, 0) };
        assert!(decide(&any, &node_view(&in_pool)).is_ok());
    }
}
