//! What Nomad tells us about a task (`NomadTask`, converted from the proto
//! TaskConfig by the adapter) and what we keep to recover it (`DriverState`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A port of the allocation: Nomad's `PortMapping` (label, host port, mapped port, host ip).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NomadPort {
    pub label: String,
    pub value: u16,
    pub to: u16,
    pub host_ip: String,
}

/// A Nomad-requested bind mount (volume_mount, CSI, host volume).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NomadMount {
    pub host_path: String,
    pub task_path: String,
    pub readonly: bool,
    /// `private`, `host-to-task` or `bidirectional` (empty: private).
    pub propagation: String,
}

/// A device a device plugin reserved for the task (`client/allocrunner/taskrunner/device_hook.go`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NomadDevice {
    pub host_path: String,
    pub task_path: String,
    /// cgroup permissions, e.g. `rwm`.
    pub permissions: String,
}

/// How the task's network is set up by Nomad.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// No isolation: the host's network namespace.
    #[default]
    Host,
    /// `network { mode = "bridge" | "cni/*" }` at group level: one namespace for the group.
    Group,
    /// `network { mode = "none" }`.
    None,
}

/// The task as Nomad describes it in `StartTask`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NomadTask {
    pub id: String,
    pub name: String,
    pub alloc_id: String,
    pub job_name: String,
    pub job_id: String,
    pub namespace: String,
    pub group: String,
    pub node_name: String,
    pub user: String,
    pub alloc_dir: String,
    pub stdout_path: String,
    pub stderr_path: String,
    pub env: BTreeMap<String, String>,
    pub device_env: BTreeMap<String, String>,
    pub memory_mb: i64,
    pub memory_max_mb: i64,
    pub cpu_shares: i64,
    /// The task's share of the node's compute (`LinuxResources.percent_ticks`).
    pub percent_ticks: f64,
    pub cpuset_cpus: String,
    /// Nomad's cgroup for a task on shared cores (`LinuxResources.cpuset_cgroup`).
    pub cpuset_cgroup: String,
    pub ports: Vec<NomadPort>,
    pub mounts: Vec<NomadMount>,
    pub network_mode: NetworkMode,
    /// The group's network namespace (`NetworkIsolationSpec.path`).
    pub network_path: String,
    /// `NetworkIsolationSpec.labels` (`docker_sandbox_container_id` when a docker task created it).
    pub network_labels: BTreeMap<String, String>,
    pub devices: Vec<NomadDevice>,
    pub dns_servers: Vec<String>,
    pub dns_searches: Vec<String>,
    pub dns_options: Vec<String>,
}

impl NomadTask {
    /// The last part of the task id: Nomad makes it new on every (re)start.
    pub fn run_suffix(&self) -> &str {
        self.id.rsplit('/').next().unwrap_or_default()
    }

    /// Whether Nomad's log collection is off (`logs { disabled = true }` gives /dev/null).
    pub fn logs_disabled(&self) -> bool {
        self.stdout_path.is_empty() || self.stdout_path == "/dev/null"
    }
}

/// Version of [`DriverState`]'s layout, also the TaskHandle version.
pub const DRIVER_STATE_VERSION: i32 = 1;

/// Everything recovery needs, stored by Nomad in `TaskHandle.driver_state`
/// (Nomad drops `msgpack_driver_config` from stored handles).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriverState {
    pub container_id: String,
    pub container_name: String,
    pub image: String,
    pub engine: crate::engines::Engine,
    pub model: Option<String>,
    /// Engine `ollama`: the models it serves from the shared store (short names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    pub revision: Option<String>,
    /// Unix nanoseconds of the start.
    pub started_at_ns: u64,
    pub stdout_path: String,
    pub stderr_path: String,
    pub logs_disabled: bool,
    /// The log relay process (pid and a file it keeps its position in).
    pub relay_pid: i32,
    pub relay_state: String,
    pub port_map: BTreeMap<String, u16>,
    pub readiness_url: Option<String>,
    pub alloc_id: String,
    pub task_name: String,
}

/// A [`DriverState`] that cannot be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot encode the driver state: {0}")]
    Encode(#[source] rmp_serde::encode::Error),
    #[error("driver_state is not ours or is damaged: {0}")]
    Decode(#[source] rmp_serde::decode::Error),
}

impl DriverState {
    /// The shared-state keys of the models the task keeps in use (its in-use
    /// marker): the HF repo of an engine that reads the HF cache, or each
    /// Ollama model as `ollama/<name>`.
    pub fn in_use_keys(&self) -> Vec<String> {
        if self.engine == crate::engines::Engine::Ollama {
            return self
                .models
                .iter()
                .filter_map(|m| hf_cache::ollama::ModelName::parse(m).ok())
                .map(|n| hf_cache::ollama::state_key(&n))
                .collect();
        }
        match &self.model {
            Some(m) if self.engine.spec().uses_hf_cache => vec![m.clone()],
            _ => Vec::new(),
        }
    }

    /// msgpack (map form), as Go drivers store theirs.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        rmp_serde::to_vec_named(self).map_err(StateError::Encode)
    }

    /// Decodes what [`DriverState::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        rmp_serde::from_slice(bytes).map_err(StateError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_state_round_trips() {
        let s = DriverState {
            container_id: "abc".into(),
            container_name: "t-1".into(),
            image: "img".into(),
            engine: crate::engines::Engine::Vllm,
            model: Some("org/m".into()),
            models: vec![],
            revision: None,
            started_at_ns: 42,
            stdout_path: "/a".into(),
            stderr_path: "/b".into(),
            logs_disabled: false,
            relay_pid: 7,
            relay_state: "/s".into(),
            port_map: BTreeMap::from([("http".into(), 8000)]),
            readiness_url: None,
            alloc_id: "alloc".into(),
            task_name: "t".into(),
        };
        let bytes = s.encode().unwrap();
        assert_eq!(DriverState::decode(&bytes).unwrap(), s);
        // The engine is stored by name, as when it was a string: old handles recover.
        assert!(bytes.windows(5).any(|w| w == b"\xa4vllm"), "engine not stored as its name");
        assert!(DriverState::decode(b"\xc1garbage").is_err());
    }
}
