//! The plugin configuration: `plugin "nomad-driver-aimodel" { config { ... } }`
//! in the Nomad client's agent configuration.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::auth::{RegistryAuth, AUTH_SCHEMA};
use super::hf_cache::{HfCacheConfig, HF_CACHE_SCHEMA};
use super::units::Dur;
use super::ConfigError;
use crate::config::schema::{attr, block, Field};

/// The plugin configuration schema, reported by `ConfigSchema`.
pub const PLUGIN_SCHEMA: &[Field] = &[
    attr(
        "endpoint",
        "string",
        Some(r#""unix:///var/run/docker.sock""#),
        "Docker Engine API endpoint: `unix:///path`, `tcp://host:port` or `http://host:port`.",
    ),
    attr(
        "fingerprint_period",
        "string",
        Some(r#""30s""#),
        "How often the fingerprint (health and attributes) is re-sent.",
    ),
    attr(
        "pull_activity_timeout",
        "string",
        Some(r#""5m""#),
        "An image pull fails when no progress arrives for this long. There is no wall-clock cap.",
    ),
    attr("pull_progress_interval", "string", Some(r#""10s""#), "How often pull progress is reported as a task event."),
    attr("allow_privileged", "bool", Some("false"), "Allow tasks to set `privileged = true`."),
    attr(
        "allow_host_ipc",
        "bool",
        Some("false"),
        "Allow tasks to set `ipc_mode = \"host\"` (the node's IPC namespace and `/dev/shm`).",
    ),
    attr(
        "allow_host_network",
        "bool",
        Some("false"),
        "Allow tasks to set `network_mode = \"host\"` (the node's network: the server listens on every interface).",
    ),
    attr(
        "disable_log_collection",
        "bool",
        Some("false"),
        "Tell Nomad not to collect task logs (no logmon, no FIFOs); logs stay in `docker logs`.",
    ),
    attr("extra_labels", "map(string)", None, "Labels added to every container the driver creates."),
    block("hf_cache", HF_CACHE_SCHEMA, "The shared HuggingFace cache."),
    block("gpu", GPU_SCHEMA, "GPU discovery and assignment."),
    block("images", IMAGES_SCHEMA, "Default image per engine, used when a task sets no `image`."),
    block(
        "auth",
        AUTH_SCHEMA,
        "Registry credentials, sent only to `server_address` when a task without its own `auth` pulls from it.",
    ),
    block("volumes", VOLUMES_SCHEMA, "Host paths in a task's `volumes`."),
    block("gc", GC_SCHEMA, "What is removed when a task is destroyed."),
    block("container_logs", CONTAINER_LOGS_SCHEMA, "Rotation of the containers' Docker logs (json-file)."),
];

const CONTAINER_LOGS_SCHEMA: &[Field] = &[
    attr(
        "max_size",
        "string",
        Some(r#""2m""#),
        "Largest Docker log file of a container before rotation (the docker driver's default); `\"\"` leaves the daemon's logging alone.",
    ),
    attr("max_files", "number", Some("2"), "Docker log files kept per container."),
];

const VOLUMES_SCHEMA: &[Field] = &[attr(
    "enabled",
    "bool",
    Some("false"),
    "Allow `volumes` with host paths outside the allocation directory (as the docker driver's `volumes.enabled`).",
)];

const GPU_SCHEMA: &[Field] = &[
    attr("enabled", "bool", Some("true"), "Fingerprint GPUs through NVML and pass them to tasks."),
    attr("required", "bool", Some("false"), "Mark the driver unhealthy when no GPU is found."),
    attr("nvml_library", "string", Some(r#""libnvidia-ml.so.1""#), "Path or name of the NVML library to load."),
    attr(
        "visible_devices_from",
        "string",
        Some(r#""nomad""#),
        "`nomad`: GPUs come from Nomad's device env (`NVIDIA_VISIBLE_DEVICES`); `config`: from the task's `gpus`.",
    ),
    attr(
        "device_request",
        "string",
        Some(r#""docker""#),
        "`docker`: a DeviceRequest by UUID; `cdi`: CDI device names `nvidia.com/gpu=<uuid>`.",
    ),
    attr(
        "allow_unscheduled",
        "bool",
        Some("false"),
        "Allow tasks to take GPUs Nomad did not assign: the task's `gpus` and an `NVIDIA_VISIBLE_DEVICES` in its `env`.",
    ),
];

const IMAGES_SCHEMA: &[Field] = &[
    attr("vllm", "string", Some(r#""vllm/vllm-openai:latest""#), "Default image for `engine = \"vllm\"`."),
    attr("sglang", "string", Some(r#""lmsysorg/sglang:latest""#), "Default image for `engine = \"sglang\"`."),
    attr(
        "sglang_router",
        "string",
        Some(r#""lmsysorg/sglang:latest""#),
        "Default image for `engine = \"sglang-router\"`.",
    ),
    attr("ollama", "string", Some(r#""ollama/ollama:latest""#), "Default image for `engine = \"ollama\"`."),
    attr(
        "tgi",
        "string",
        Some(r#""ghcr.io/huggingface/text-generation-inference:latest""#),
        "Default image for `engine = \"tgi\"`.",
    ),
    attr("ray", "string", Some(r#""rayproject/ray:latest-gpu""#), "Default image for `engine = \"ray\"`."),
    attr(
        "llamacpp",
        "string",
        Some(r#""ghcr.io/ggml-org/llama.cpp:server""#),
        "Default image for `engine = \"llamacpp\"`.",
    ),
];

/// Registry credentials; shared by the plugin and task schemas.
const GC_SCHEMA: &[Field] = &[
    attr("container", "bool", Some("true"), "Remove the container when Nomad destroys the task."),
    attr("image", "bool", Some("false"), "Remove the image when no task uses it any more."),
    attr("image_delay", "string", Some(r#""3m""#), "How long an unused image is kept before removal."),
    block(
        "dangling_containers",
        DANGLING_SCHEMA,
        "Containers of this node labelled as aimodel tasks that no task owns (as the docker driver's reconciler).",
    ),
];

const DANGLING_SCHEMA: &[Field] = &[
    attr("enabled", "bool", Some("true"), "Remove dangling containers (checked at every fingerprint)."),
    attr("dry_run", "bool", Some("false"), "Only report them (log and `driver.aimodel.orphans`)."),
    attr(
        "creation_grace",
        "string",
        Some(r#""5m""#),
        "A container younger than this is never removed (its StartTask may still be answering).",
    ),
];

/// The decoded plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    pub endpoint: String,
    pub fingerprint_period: Dur,
    pub pull_activity_timeout: Dur,
    pub pull_progress_interval: Dur,
    pub allow_privileged: bool,
    pub allow_host_ipc: bool,
    pub allow_host_network: bool,
    pub disable_log_collection: bool,
    pub extra_labels: BTreeMap<String, String>,
    pub hf_cache: HfCacheConfig,
    pub gpu: GpuConfig,
    pub images: ImagesConfig,
    pub auth: Option<RegistryAuth>,
    pub volumes: VolumesConfig,
    pub gc: GcConfig,
    pub container_logs: ContainerLogsConfig,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            endpoint: "unix:///var/run/docker.sock".into(),
            fingerprint_period: Dur(Duration::from_secs(30)),
            pull_activity_timeout: Dur(Duration::from_secs(300)),
            pull_progress_interval: Dur(Duration::from_secs(10)),
            allow_privileged: false,
            allow_host_ipc: false,
            allow_host_network: false,
            disable_log_collection: false,
            extra_labels: BTreeMap::new(),
            hf_cache: HfCacheConfig::default(),
            gpu: GpuConfig::default(),
            images: ImagesConfig::default(),
            auth: None,
            volumes: VolumesConfig::default(),
            gc: GcConfig::default(),
            container_logs: ContainerLogsConfig::default(),
        }
    }
}

/// Where a task's GPUs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VisibleDevicesFrom {
    #[default]
    Nomad,
    Config,
}

/// How GPUs are requested from Docker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceRequestKind {
    #[default]
    Docker,
    Cdi,
}

/// `gpu { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    pub enabled: bool,
    pub required: bool,
    pub nvml_library: String,
    pub visible_devices_from: VisibleDevicesFrom,
    pub device_request: DeviceRequestKind,
    pub allow_unscheduled: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            required: false,
            nvml_library: "libnvidia-ml.so.1".into(),
            visible_devices_from: VisibleDevicesFrom::Nomad,
            device_request: DeviceRequestKind::Docker,
            allow_unscheduled: false,
        }
    }
}

/// `images { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    pub vllm: String,
    pub sglang: String,
    pub sglang_router: String,
    pub ollama: String,
    pub tgi: String,
    pub ray: String,
    pub llamacpp: String,
}

impl ImagesConfig {
    /// The image under `key` (an engine's `image_key`).
    pub fn get(&self, key: &str) -> Option<&str> {
        Some(match key {
            "vllm" => &self.vllm,
            "sglang" => &self.sglang,
            "sglang_router" => &self.sglang_router,
            "ollama" => &self.ollama,
            "tgi" => &self.tgi,
            "ray" => &self.ray,
            "llamacpp" => &self.llamacpp,
            _ => return None,
        })
    }
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            vllm: "vllm/vllm-openai:latest".into(),
            sglang: "lmsysorg/sglang:latest".into(),
            sglang_router: "lmsysorg/sglang:latest".into(),
            ollama: "ollama/ollama:latest".into(),
            tgi: "ghcr.io/huggingface/text-generation-inference:latest".into(),
            ray: "rayproject/ray:latest-gpu".into(),
            llamacpp: "ghcr.io/ggml-org/llama.cpp:server".into(),
        }
    }
}

/// `volumes { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct VolumesConfig {
    pub enabled: bool,
}

/// `container_logs { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerLogsConfig {
    pub max_size: String,
    pub max_files: u32,
}

impl Default for ContainerLogsConfig {
    fn default() -> Self {
        ContainerLogsConfig { max_size: "2m".into(), max_files: 2 }
    }
}

/// `gc { ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    pub container: bool,
    pub image: bool,
    pub image_delay: Dur,
    pub dangling_containers: DanglingConfig,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            container: true,
            image: false,
            image_delay: Dur(Duration::from_secs(180)),
            dangling_containers: DanglingConfig::default(),
        }
    }
}

/// `gc { dangling_containers { ... } }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DanglingConfig {
    pub enabled: bool,
    pub dry_run: bool,
    pub creation_grace: Dur,
}

impl Default for DanglingConfig {
    fn default() -> Self {
        DanglingConfig { enabled: true, dry_run: false, creation_grace: Dur(Duration::from_secs(300)) }
    }
}

impl PluginConfig {
    /// Checks what a field-by-field decode cannot: values that must be non-zero,
    /// well-formed endpoints and paths.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| Err(ConfigError::Invalid { field: field.into(), message });
        let ep = self.endpoint.as_str();
        if !["unix://", "tcp://", "http://", "https://"].iter().any(|p| ep.starts_with(p)) || ep.ends_with("://") {
            return invalid(
                "endpoint",
                format!("{ep:?} is not a Docker endpoint (use unix:///var/run/docker.sock or tcp://host:2375)"),
            );
        }
        for (field, d) in [
            ("fingerprint_period", self.fingerprint_period),
            ("pull_activity_timeout", self.pull_activity_timeout),
            ("pull_progress_interval", self.pull_progress_interval),
            ("hf_cache.probe_timeout", self.hf_cache.probe_timeout),
        ] {
            if d.0.is_zero() {
                return invalid(field, "must be greater than zero".into());
            }
        }
        for (field, path) in [
            ("hf_cache.host_path", &self.hf_cache.host_path),
            ("hf_cache.container_path", &self.hf_cache.container_path),
        ] {
            if !path.starts_with('/') {
                return invalid(field, format!("{path:?} must be an absolute path"));
            }
        }
        let store = &self.hf_cache.ollama_path;
        if !store.is_empty() && !store.starts_with('/') {
            return invalid("hf_cache.ollama_path", format!("{store:?} must be an absolute path (or \"\")"));
        }
        let size = &self.container_logs.max_size;
        let docker_size = |s: &str| {
            s.ends_with(['k', 'm', 'g']) && s.trim_end_matches(['k', 'm', 'g']).parse::<u64>().is_ok_and(|n| n > 0)
        };
        if !size.is_empty() && !docker_size(size) {
            return invalid("container_logs.max_size", format!("{size:?} is not a Docker log size such as \"2m\""));
        }
        if self.container_logs.max_files == 0 {
            return invalid("container_logs.max_files", "must be at least 1".into());
        }
        if self.gpu.visible_devices_from == VisibleDevicesFrom::Config && !self.gpu.allow_unscheduled {
            return invalid(
                "gpu.visible_devices_from",
                "\"config\" hands tasks GPUs Nomad did not schedule: it needs gpu.allow_unscheduled = true".into(),
            );
        }
        if let Some(a) = &self.auth {
            if a.server_address.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return invalid(
                    "auth.server_address",
                    "is required: the plugin's credentials are sent only to that registry".into(),
                );
            }
        }
        if self.gpu.enabled && self.gpu.nvml_library.is_empty() {
            return invalid("gpu.nvml_library", "must not be empty while gpu.enabled is true".into());
        }
        let images = &self.images;
        for (field, image) in [
            ("images.vllm", &images.vllm),
            ("images.sglang", &images.sglang),
            ("images.sglang_router", &images.sglang_router),
            ("images.ollama", &images.ollama),
            ("images.tgi", &images.tgi),
            ("images.ray", &images.ray),
            ("images.llamacpp", &images.llamacpp),
        ] {
            if image.trim().is_empty() || image.contains(char::is_whitespace) {
                return invalid(field, format!("{image:?} is not an image reference"));
            }
        }
        for key in self.extra_labels.keys() {
            if key.is_empty() || key.starts_with(super::LABEL_PREFIX) {
                return invalid(
                    "extra_labels",
                    format!("label {key:?} is empty or uses the reserved prefix {}", super::LABEL_PREFIX),
                );
            }
        }
        Ok(())
    }
}
