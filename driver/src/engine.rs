//! From (task config, Nomad task, plugin config) to the container to create:
//! a pure function, unit-tested per engine without Docker.

use std::collections::BTreeMap;

use crate::config::{
    ConfigError, DeviceRequestKind, Engine, GpuCount, LoadStrategy, PluginConfig, TaskConfig, VisibleDevicesFrom,
};
use crate::runtime::{ContainerSpec, GpuRequest, PortBinding};
use crate::task::{NetworkMode, NomadTask};

/// Label marking containers this driver manages.
pub const LABEL_MANAGED: &str = "com.aimodel.managed";
/// Label holding the Nomad task id.
pub const LABEL_TASK_ID: &str = "com.aimodel.task_id";
/// Label holding the allocation id.
pub const LABEL_ALLOC_ID: &str = "com.aimodel.alloc_id";
/// Label holding the node name (containers of other clients are never touched).
pub const LABEL_NODE: &str = "com.aimodel.node";

/// What to create, and how to tell when it is ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub spec: ContainerSpec,
    /// `http://host:port/path` polled after start, if the engine has one.
    pub readiness_url: Option<String>,
    /// Port label → host port, for Nomad's `network_override`.
    pub port_map: BTreeMap<String, u16>,
    /// The flags chosen by `load_strategy`, announced as an event.
    pub load_flags: Vec<String>,
}

/// Facts the plan depends on that come from the node, not from configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeFacts {
    /// The HF cache sits on NFS (drives `load_strategy = "auto"`).
    pub cache_on_nfs: bool,
    /// The commit `revision` resolved to, when the cache knows it.
    pub resolved_revision: Option<String>,
    /// Bytes of the model's files in the cache, when known.
    pub model_bytes: Option<u64>,
}

fn err(field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message }
}

/// The engine's default container port and readiness path.
pub fn engine_defaults(engine: Engine) -> (u16, Option<&'static str>) {
    match engine {
        Engine::Vllm => (8000, Some("/health")),
        Engine::Sglang => (30000, Some("/health")),
        Engine::SglangRouter => (30000, Some("/health")),
        Engine::Ollama => (11434, Some("/api/version")),
        Engine::Tgi => (80, Some("/health")),
        Engine::Ray => (8265, None),
        Engine::Custom => (8080, None),
    }
}

/// The image for a task: its own, else the plugin's default for the engine.
pub fn image_for(cfg: &TaskConfig, plugin: &PluginConfig) -> Result<String, ConfigError> {
    if let Some(i) = &cfg.image {
        return Ok(i.clone());
    }
    let images = &plugin.images;
    Ok(match cfg.engine {
        Engine::Vllm => images.vllm.clone(),
        Engine::Sglang => images.sglang.clone(),
        Engine::SglangRouter => images.sglang_router.clone(),
        Engine::Ollama => images.ollama.clone(),
        Engine::Tgi => images.tgi.clone(),
        Engine::Ray => images.ray.clone(),
        Engine::Custom => return Err(err("image", "is required for engine \"custom\"".into())),
    })
}

/// Which GPUs the container gets, from Nomad's device env or the task's `gpus`.
pub fn gpu_request(cfg: &TaskConfig, task: &NomadTask, plugin: &PluginConfig) -> Option<GpuRequest> {
    let from_nomad = task
        .device_env
        .get("NVIDIA_VISIBLE_DEVICES")
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "none").map(String::from).collect())
        .filter(|v: &Vec<String>| !v.is_empty());
    if let (Some(uuids), VisibleDevicesFrom::Nomad) = (from_nomad, plugin.gpu.visible_devices_from) {
        return Some(match plugin.gpu.device_request {
            DeviceRequestKind::Docker => GpuRequest::Uuids(uuids),
            DeviceRequestKind::Cdi => GpuRequest::Cdi(uuids.iter().map(|u| format!("nvidia.com/gpu={u}")).collect()),
        });
    }
    match cfg.gpu_count()? {
        GpuCount::All => Some(GpuRequest::Count(-1)),
        GpuCount::Count(n) => Some(GpuRequest::Count(i64::from(n))),
    }
}

fn gpu_count(req: &Option<GpuRequest>) -> Option<usize> {
    match req {
        Some(GpuRequest::Uuids(v)) | Some(GpuRequest::Cdi(v)) => Some(v.len()),
        Some(GpuRequest::Count(n)) if *n > 0 => Some(*n as usize),
        _ => None,
    }
}

/// The flags `load_strategy` adds for the engine (eager reads suit NFS; mmap
/// suits local disks).
pub fn load_flags(cfg: &TaskConfig, facts: &NodeFacts) -> Vec<String> {
    let strategy = match cfg.load_strategy {
        LoadStrategy::Auto if facts.cache_on_nfs => LoadStrategy::Eager,
        LoadStrategy::Auto => return Vec::new(),
        s => s,
    };
    let flags: &[&str] = match (cfg.engine, strategy) {
        (Engine::Vllm, LoadStrategy::Eager) => &["--safetensors-load-strategy", "eager"],
        (Engine::Vllm, LoadStrategy::Mmap) => &["--safetensors-load-strategy", "lazy"],
        (Engine::Sglang, LoadStrategy::Eager) => &["--weight-loader-disable-mmap"],
        _ => &[],
    };
    flags.iter().map(|s| s.to_string()).collect()
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect()
}

/// The network a container gets.
struct Net {
    mode: String,
    bindings: Vec<PortBinding>,
    /// The port the server listens on inside the container.
    inside: u16,
    /// Where the host reaches it (ip, port).
    host: Option<(String, u16)>,
    port_map: BTreeMap<String, u16>,
}

/// Resolves the network: which ports to publish, which port the server listens
/// on inside the container, and the host port Nomad assigned to it.
fn network(cfg: &TaskConfig, task: &NomadTask, default_port: u16) -> Result<Net, ConfigError> {
    let port_map: BTreeMap<String, u16> = task.ports.iter().map(|p| (p.label.clone(), p.value)).collect();
    let chosen = match &cfg.port {
        Some(label) => Some(task.ports.iter().find(|p| &p.label == label).ok_or_else(|| {
            let known: Vec<&str> = task.ports.iter().map(|p| p.label.as_str()).collect();
            err("port", format!("no port labelled {label:?} in the group's network block (known: {known:?})"))
        })?),
        None => None,
    };
    match task.network_mode {
        NetworkMode::Group => {
            let bindings = task
                .ports
                .iter()
                .map(|p| PortBinding {
                    container_port: if p.to > 0 { p.to } else { p.value },
                    host_ip: p.host_ip.clone(),
                    host_port: p.value,
                })
                .collect();
            let (inside, host) = match chosen {
                Some(p) => {
                    let ip = if p.host_ip.is_empty() || p.host_ip == "0.0.0.0" { "127.0.0.1" } else { &p.host_ip };
                    (if p.to > 0 { p.to } else { p.value }, Some((ip.to_string(), p.value)))
                }
                None => (default_port, None),
            };
            Ok(Net { mode: "bridge".into(), bindings, inside, host, port_map })
        }
        NetworkMode::Host => {
            let (inside, host) = match chosen {
                Some(p) => (p.value, Some(("127.0.0.1".to_string(), p.value))),
                None => (default_port, Some(("127.0.0.1".to_string(), default_port))),
            };
            Ok(Net { mode: "host".into(), bindings: Vec::new(), inside, host, port_map })
        }
    }
}

/// Builds the container for a task.
pub fn plan(cfg: &TaskConfig, task: &NomadTask, plugin: &PluginConfig, facts: &NodeFacts) -> Result<Plan, ConfigError> {
    if cfg.privileged && !plugin.allow_privileged {
        return Err(err("privileged", "is not allowed by the plugin configuration (allow_privileged = false)".into()));
    }
    let image = image_for(cfg, plugin)?;
    let (default_port, health_path) = engine_defaults(cfg.engine);
    let Net { mode: network_mode, bindings: ports, inside: port, host, port_map } = network(cfg, task, default_port)?;
    let gpus = gpu_request(cfg, task, plugin);
    let flags = load_flags(cfg, facts);
    let revision = facts.resolved_revision.clone().unwrap_or_else(|| cfg.revision.clone());
    let model = cfg.model.clone().unwrap_or_default();
    let served = cfg.served_model_name.clone().unwrap_or_else(|| model.clone());
    let p = port.to_string();
    let tp = gpu_count(&gpus).filter(|n| *n > 1).map(|n| n.to_string());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let (mut entrypoint, mut cmd): (Option<Vec<String>>, Vec<String>) = match cfg.engine {
        Engine::Vllm => {
            let mut c = s(&["--model", &model, "--revision", &revision, "--host", "0.0.0.0", "--port", &p]);
            c.extend(s(&["--served-model-name", &served]));
            if let Some(n) = &tp {
                c.extend(s(&["--tensor-parallel-size", n]));
            }
            if let Some(f) = &cfg.load_format {
                c.extend(s(&["--load-format", f]));
            }
            (None, c)
        }
        Engine::Sglang => {
            let mut c = s(&["--model-path", &model, "--revision", &revision, "--host", "0.0.0.0", "--port", &p]);
            c.extend(s(&["--served-model-name", &served]));
            if let Some(n) = &tp {
                c.extend(s(&["--tp-size", n]));
            }
            if let Some(f) = &cfg.load_format {
                c.extend(s(&["--load-format", f]));
            }
            (Some(s(&["python3", "-m", "sglang.launch_server"])), c)
        }
        Engine::SglangRouter => {
            (Some(s(&["python3", "-m", "sglang_router.launch_router"])), s(&["--host", "0.0.0.0", "--port", &p]))
        }
        Engine::Ollama => (None, s(&["serve"])),
        Engine::Tgi => {
            let mut c = s(&["--model-id", &model, "--revision", &revision, "--hostname", "0.0.0.0", "--port", &p]);
            if let Some(n) = &tp {
                c.extend(s(&["--num-shard", n]));
            }
            (None, c)
        }
        Engine::Ray => {
            let mut c = s(&["ray", "start", "--block", "--dashboard-host=0.0.0.0"]);
            if cfg.port.is_some() {
                c.push(format!("--dashboard-port={p}"));
            }
            (None, c)
        }
        Engine::Custom => (None, Vec::new()),
    };
    cmd.extend(flags.iter().cloned());
    if let Some(command) = &cfg.command {
        cmd = vec![command.clone()];
    }
    cmd.extend(cfg.args.iter().cloned());
    if !cfg.entrypoint.is_empty() {
        entrypoint = Some(cfg.entrypoint.clone());
    }

    let mut env: BTreeMap<String, String> = task.env.clone();
    let hf = &plugin.hf_cache;
    env.insert("HF_HOME".into(), hf.container_path.clone());
    env.insert("HF_HUB_CACHE".into(), format!("{}/hub", hf.container_path.trim_end_matches('/')));
    if cfg.offline {
        env.insert("HF_HUB_OFFLINE".into(), "1".into());
        env.insert("TRANSFORMERS_OFFLINE".into(), "1".into());
    }
    if cfg.engine == Engine::Ollama {
        env.insert("OLLAMA_HOST".into(), format!("0.0.0.0:{port}"));
    }
    env.insert("AIMODEL_PORT".into(), p.clone());
    if !model.is_empty() {
        env.insert("AIMODEL_MODEL".into(), model.clone());
        env.insert("AIMODEL_REVISION".into(), revision.clone());
    }

    let mut labels: BTreeMap<String, String> = plugin.extra_labels.clone();
    labels.extend(cfg.labels.clone());
    for (k, v) in [
        (LABEL_MANAGED, "true".to_string()),
        (LABEL_TASK_ID, task.id.clone()),
        (LABEL_ALLOC_ID, task.alloc_id.clone()),
        (LABEL_NODE, task.node_name.clone()),
        ("com.aimodel.task_name", task.name.clone()),
        ("com.aimodel.job_name", task.job_name.clone()),
        ("com.aimodel.namespace", task.namespace.clone()),
        ("com.aimodel.engine", cfg.engine.as_str().to_string()),
    ] {
        labels.insert(k.to_string(), v);
    }

    let mut binds = Vec::new();
    if !task.alloc_dir.is_empty() {
        let a = task.alloc_dir.trim_end_matches('/');
        binds.push(format!("{a}/alloc:/alloc"));
        binds.push(format!("{a}/{}/local:/local", task.name));
        binds.push(format!("{a}/{}/secrets:/secrets", task.name));
    }
    binds.push(format!("{}:{}", hf.host_path, hf.container_path));
    for m in &task.mounts {
        binds.push(format!("{}:{}{}", m.host_path, m.task_path, if m.readonly { ":ro" } else { "" }));
    }
    binds.extend(cfg.volumes.iter().cloned());

    let mib = 1024 * 1024;
    let (memory_bytes, memory_reservation_bytes) = match (task.memory_mb, task.memory_max_mb) {
        (m, max) if max > m && m > 0 => (Some(max * mib), Some(m * mib)),
        (m, _) if m > 0 => (Some(m * mib), None),
        _ => (None, None),
    };
    let readiness_path = cfg.readiness.path.clone().or(health_path.map(str::to_string));
    let readiness_url = match (readiness_path, host) {
        (Some(path), Some((ip, port))) => Some(format!("http://{ip}:{port}{path}")),
        _ => None,
    };
    let spec = ContainerSpec {
        name: sanitize(&format!("{}-{}-{}", task.name, task.alloc_id, task.run_suffix())),
        image,
        entrypoint,
        cmd: Some(cmd).filter(|c| !c.is_empty()),
        env: env.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
        labels,
        user: Some(task.user.clone()).filter(|u| !u.is_empty()),
        binds,
        ports,
        network_mode,
        memory_bytes,
        memory_reservation_bytes,
        cpu_shares: Some(task.cpu_shares).filter(|c| *c > 0),
        cpuset_cpus: Some(task.cpuset_cpus.clone()).filter(|c| !c.is_empty()),
        shm_size: cfg.shm_size.map(|b| b.0 as i64),
        ipc_mode: cfg.ipc_mode.clone(),
        privileged: cfg.privileged,
        gpus,
        dns: task.dns_servers.clone(),
        dns_search: task.dns_searches.clone(),
        dns_options: task.dns_options.clone(),
    };
    Ok(Plan { spec, readiness_url, port_map, load_flags: flags })
}

#[cfg(test)]
mod tests;
