//! From (task config, Nomad task, plugin config) to the container to create:
//! a pure function, unit-tested per engine without Docker.

mod network;

use network::{network, Net};
use std::collections::BTreeMap;

use crate::config::{
    ConfigError, DeviceRequestKind, GpuCount, LoadStrategy, PluginConfig, TaskConfig, VisibleDevicesFrom,
};
use crate::engines::Launch;
use crate::runtime::{ContainerSpec, GpuRequest};
use crate::types::NomadTask;

/// Label marking containers this driver manages.
pub const LABEL_MANAGED: &str = "com.aimodel.managed";
/// Label holding the Nomad task id.
pub const LABEL_TASK_ID: &str = "com.aimodel.task_id";
/// Label holding the allocation id.
pub const LABEL_ALLOC_ID: &str = "com.aimodel.alloc_id";
/// The isolation-spec label naming the docker container that holds a group's network namespace.
pub const DOCKER_SANDBOX_LABEL: &str = "docker_sandbox_container_id";
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
    /// The one file the engine loads (llama.cpp's GGUF), relative to the hub
    /// cache (`models--org--name/snapshots/<commit>/<file>`), as the gate chose it.
    pub model_file: Option<String>,
    /// Engine `ollama`: the shared store on the host, when there is one (the
    /// gate found the directory); mounted read-only at [`OLLAMA_MODELS`].
    pub ollama_store: Option<String>,
    /// Engine `ollama`: the models the gate found complete (short names).
    pub ollama_models: Vec<String>,
    /// Directories inside a writable cache mount that stay read-only (host
    /// path, container path): the shared Ollama store, which only the agent writes.
    pub readonly_overlays: Vec<(String, String)>,
}

/// Where an `ollama` task sees the shared store (`OLLAMA_MODELS`): Ollama's
/// own default for root, so a stock image finds it even without the variable.
pub const OLLAMA_MODELS: &str = "/root/.ollama/models";

fn err(field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message }
}

/// The image for a task: its own, else the plugin's default for the engine.
pub fn image_for(cfg: &TaskConfig, plugin: &PluginConfig) -> Result<String, ConfigError> {
    if let Some(i) = &cfg.image {
        return Ok(i.clone());
    }
    let spec = cfg.engine.spec();
    match spec.image_key.and_then(|k| plugin.images.get(k)) {
        Some(image) => Ok(image.to_string()),
        None => Err(err("image", format!("is required for engine {:?}", spec.name))),
    }
}

/// The GPUs Nomad assigned to the task (`NVIDIA_VISIBLE_DEVICES` of its device
/// reservation, `client/allocrunner/taskrunner/device_hook.go`), in order.
pub fn assigned_gpus(task: &NomadTask) -> Vec<String> {
    task.device_env
        .get("NVIDIA_VISIBLE_DEVICES")
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "none" && *s != "void")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Which GPUs the container gets: the ones Nomad assigned, or, only when the
/// operator allows GPUs outside Nomad's scheduling (`gpu.allow_unscheduled`),
/// the task's own `gpus`.
pub fn gpu_request(
    cfg: &TaskConfig,
    task: &NomadTask,
    plugin: &PluginConfig,
) -> Result<Option<GpuRequest>, ConfigError> {
    let uuids = assigned_gpus(task);
    if !uuids.is_empty() && plugin.gpu.visible_devices_from == VisibleDevicesFrom::Nomad {
        return Ok(Some(match plugin.gpu.device_request {
            DeviceRequestKind::Docker => GpuRequest::Uuids(uuids),
            DeviceRequestKind::Cdi => GpuRequest::Cdi(uuids.iter().map(|u| format!("nvidia.com/gpu={u}")).collect()),
        }));
    }
    let Some(count) = cfg.gpu_count() else { return Ok(None) };
    if !plugin.gpu.allow_unscheduled {
        return Err(err(
            "gpus",
            "takes GPUs Nomad did not assign; ask for them with a `device \"nvidia/gpu\"` block in the task's resources \
             (or let the operator set gpu.allow_unscheduled = true in the plugin configuration)"
                .into(),
        ));
    }
    Ok(Some(match count {
        GpuCount::All => GpuRequest::Count(-1),
        GpuCount::Count(n) => GpuRequest::Count(i64::from(n)),
    }))
}

/// Splits `host:container[:mode]` and places the host side: a relative path
/// under the task directory, `.`/`..` resolved. Without `volumes.enabled` the
/// host path must stay inside the allocation directory, also after following
/// symlinks that exist now (`drivers/docker/driver.go` `containerBinds`, plus
/// the symlink check the docker driver lacks).
pub fn task_volume(spec: &str, task: &NomadTask, plugin: &PluginConfig) -> Result<String, ConfigError> {
    use std::path::{Component, Path, PathBuf};
    let parts: Vec<&str> = spec.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        [s, d] => (*s, *d, None),
        [s, d, m] => (*s, *d, Some(*m)),
        _ => return Err(err("volumes", format!("{spec:?} is not host:container[:ro|rw]"))),
    };
    let task_dir = Path::new(&task.alloc_dir).join(&task.name);
    if !src.starts_with('/') && task.alloc_dir.is_empty() {
        return Err(err(
            "volumes",
            format!("{spec:?}: a relative host path needs the task directory, and Nomad gave none"),
        ));
    }
    let joined = if src.starts_with('/') { PathBuf::from(src) } else { task_dir.join(src) };
    let mut clean = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::Normal(n) => clean.push(n),
            _ => {}
        }
    }
    if !plugin.volumes.enabled {
        let alloc = Path::new(&task.alloc_dir);
        let refuse = || {
            err(
                "volumes",
                format!(
                    "{spec:?}: host paths outside the allocation directory are not allowed \
                     (the plugin's volumes.enabled is false); use a Nomad host volume with volume_mount instead"
                ),
            )
        };
        if task.alloc_dir.is_empty() || !clean.starts_with(alloc) {
            return Err(refuse());
        }
        // A symlink a task (or a prestart sibling) made in the allocation must not
        // lead out of it: resolve the part of the path that exists now, check it,
        // and bind the resolved path, so Docker neither follows a link of ours
        // nor creates the missing part through one.
        if let Ok(real_alloc) = std::fs::canonicalize(alloc) {
            let (mut existing, mut rest) = (clean.clone(), Vec::new());
            let real = loop {
                match std::fs::canonicalize(&existing) {
                    Ok(r) => break r,
                    Err(_) => match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
                        (Some(name), Some(parent)) => {
                            rest.push(name);
                            existing = parent.to_path_buf();
                        }
                        _ => return Err(refuse()),
                    },
                }
            };
            if !real.starts_with(&real_alloc) {
                return Err(refuse());
            }
            clean = rest.into_iter().rev().fold(real, |p, n| p.join(n));
        }
    }
    let mut bind = format!("{}:{dst}", clean.display());
    if let Some(m) = mode {
        bind.push(':');
        bind.push_str(m);
    }
    Ok(bind)
}

fn gpu_count(req: &Option<GpuRequest>) -> Option<usize> {
    match req {
        Some(GpuRequest::Uuids(v)) | Some(GpuRequest::Cdi(v)) => Some(v.len()),
        Some(GpuRequest::Count(n)) if *n > 0 => Some(usize::try_from(*n).unwrap_or(usize::MAX)),
        _ => None,
    }
}

/// The flags `load_strategy` adds for the engine (eager reads suit NFS; mmap
/// suits local disks).
pub fn load_flags(cfg: &TaskConfig, facts: &NodeFacts) -> Vec<String> {
    let strategy = match cfg.load_strategy {
        LoadStrategy::Auto if facts.cache_on_nfs => LoadStrategy::Eager,
        s => s,
    };
    (cfg.engine.spec().load_flags)(strategy).iter().map(|s| s.to_string()).collect()
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect()
}

/// Builds the container for a task.
pub fn plan(cfg: &TaskConfig, task: &NomadTask, plugin: &PluginConfig, facts: &NodeFacts) -> Result<Plan, ConfigError> {
    match cfg.ipc_mode.as_deref() {
        None | Some("" | "private" | "shareable" | "none") => {}
        Some("host") if plugin.allow_host_ipc => {}
        Some("host") => {
            return Err(err(
                "ipc_mode",
                "\"host\" shares the node's IPC namespace and /dev/shm; use shm_size (or let the operator set allow_host_ipc = true)"
                    .into(),
            ))
        }
        Some(m) => {
            return Err(err("ipc_mode", format!("{m:?}: only private, shareable, none (or host, with allow_host_ipc)")))
        }
    }
    if cfg.privileged && !plugin.allow_privileged {
        return Err(err("privileged", "is not allowed by the plugin configuration (allow_privileged = false)".into()));
    }
    let image = image_for(cfg, plugin)?;
    let engine = cfg.engine.spec();
    let (default_port, health_path) = (engine.port, engine.health_path);
    let Net { mode: network_mode, bindings: ports, inside: port, host, port_map, bind } =
        network(cfg, task, plugin, default_port)?;
    let gpus = gpu_request(cfg, task, plugin)?;
    let flags = load_flags(cfg, facts);
    let revision = facts.resolved_revision.clone().unwrap_or_else(|| cfg.revision.clone());
    let model = cfg.model.clone().unwrap_or_default();
    let served = cfg.served_model_name.clone().unwrap_or_else(|| model.clone());
    let p = port.to_string();
    let tp = gpu_count(&gpus).filter(|n| *n > 1).map(|n| n.to_string());
    let hf = &plugin.hf_cache;
    let model_file = match (&facts.model_file, cfg.engine) {
        (Some(f), _) => Some(format!("{}/hub/{f}", hf.container_path.trim_end_matches('/'))),
        (None, crate::engines::Engine::Llamacpp) => {
            return Err(err("gguf_file", "names no file of the model in the cache (the cache gate chose none)".into()))
        }
        (None, _) => None,
    };
    let launch = Launch {
        model: &model,
        revision: &revision,
        served_name: &served,
        bind: &bind,
        port: &p,
        tensor_parallel: tp.as_deref(),
        load_format: cfg.load_format.as_deref(),
        port_named: cfg.port.is_some(),
        gpus: gpu_count(&gpus).unwrap_or(usize::from(gpus.is_some())),
        model_file: model_file.as_deref(),
    };
    let (mut entrypoint, mut cmd) = (engine.argv)(&launch);
    cmd.extend(flags.iter().cloned());
    if let Some(command) = &cfg.command {
        cmd = vec![command.clone()];
    }
    cmd.extend(cfg.args.iter().cloned());
    if !cfg.entrypoint.is_empty() {
        entrypoint = Some(cfg.entrypoint.clone());
    }

    if let Some(bad) = task.env.keys().find(|k| k.is_empty() || k.contains(['=', '\0'])) {
        return Err(err("env", format!("{bad:?} is not an environment variable name")));
    }
    if !plugin.gpu.allow_unscheduled {
        // The NVIDIA runtime hook also takes devices from swarm resource variables.
        if let Some(k) = task.env.keys().find(|k| k.starts_with("DOCKER_RESOURCE_")) {
            return Err(err(
                "env",
                format!(
                    "{k} can name GPUs Nomad did not assign (or let the operator set gpu.allow_unscheduled = true)"
                ),
            ));
        }
    }
    let mut env: BTreeMap<String, String> = task.env.clone();
    // The GPUs Nomad assigned, or none: a task's own NVIDIA_VISIBLE_DEVICES
    // (e.g. "all", read by the NVIDIA runtime hook) would reach unscheduled GPUs.
    let task_gpu_env = env.remove("NVIDIA_VISIBLE_DEVICES");
    match (&gpus, task_gpu_env) {
        (Some(GpuRequest::Uuids(ids)), _) => {
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), ids.join(","));
        }
        (Some(GpuRequest::Cdi(_)), _) => {
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), assigned_gpus(task).join(","));
        }
        (Some(GpuRequest::Count(_)), _) => {}
        (None, Some(v)) if plugin.gpu.allow_unscheduled => {
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), v);
        }
        (None, Some(v)) if matches!(v.trim(), "" | "void" | "none") => {
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
        }
        (None, Some(_)) => {
            return Err(err(
                "env",
                "NVIDIA_VISIBLE_DEVICES takes GPUs Nomad did not assign; use a `device \"nvidia/gpu\"` block \
                 (or let the operator set gpu.allow_unscheduled = true in the plugin configuration)"
                    .into(),
            ))
        }
        (None, None) => {
            env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
        }
    }
    let cache_writable = !cfg.offline && hf.allow_write;
    env.insert("HF_HOME".into(), hf.container_path.clone());
    env.insert("HF_HUB_CACHE".into(), format!("{}/hub", hf.container_path.trim_end_matches('/')));
    if !cache_writable {
        // What libraries write under HF_HOME goes to the task's own directory:
        // the shared cache is read-only for tasks.
        let scratch = if task.alloc_dir.is_empty() { "/tmp/aimodel-hf" } else { "/local/.hf" };
        for (k, sub) in [
            ("HF_MODULES_CACHE", "modules"),
            ("HF_ASSETS_CACHE", "assets"),
            ("HF_XET_CACHE", "xet"),
            ("HF_DATASETS_CACHE", "datasets"),
        ] {
            env.insert(k.into(), format!("{scratch}/{sub}"));
        }
    }
    if cfg.offline {
        env.insert("HF_HUB_OFFLINE".into(), "1".into());
        env.insert("TRANSFORMERS_OFFLINE".into(), "1".into());
    }
    if let Some(var) = engine.listen_env {
        env.insert(var.into(), format!("{bind}:{port}"));
    }
    let ollama_store = facts.ollama_store.as_ref().filter(|_| cfg.engine == crate::engines::Engine::Ollama);
    if ollama_store.is_some() {
        // The shared store, read-only; a starting server must not prune blobs
        // no manifest names yet (another node is pulling them).
        env.insert("OLLAMA_MODELS".into(), OLLAMA_MODELS.into());
        env.insert("OLLAMA_NOPRUNE".into(), "1".into());
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
        // Nomad's log files of every task of the allocation: readable, never writable.
        binds.push(format!("{a}/alloc/logs:/alloc/logs:ro"));
        binds.push(format!("{a}/{}/local:/local", task.name));
        binds.push(format!("{a}/{}/secrets:/secrets", task.name));
    }
    binds.push(format!("{}:{}{}", hf.host_path, hf.container_path, if cache_writable { "" } else { ":ro" }));
    if let Some(store) = ollama_store {
        binds.push(format!("{store}:{OLLAMA_MODELS}:ro"));
    }
    if cache_writable {
        for (host, inside) in &facts.readonly_overlays {
            binds.push(format!("{host}:{inside}:ro"));
        }
    }
    for m in &task.mounts {
        // As the docker driver maps Nomad's propagation modes.
        let mut opts: Vec<&str> = Vec::new();
        if m.readonly {
            opts.push("ro");
        }
        match m.propagation.as_str() {
            "host-to-task" => opts.push("rslave"),
            "bidirectional" => opts.push("rshared"),
            "private" => opts.push("rprivate"),
            _ => {}
        }
        let opts = if opts.is_empty() { String::new() } else { format!(":{}", opts.join(",")) };
        binds.push(format!("{}:{}{opts}", m.host_path, m.task_path));
    }
    for v in &cfg.volumes {
        binds.push(task_volume(v, task, plugin)?);
    }

    let mib = 1024 * 1024;
    // As `drivers/docker` memoryLimits: memory_max above memory is the hard limit
    // and memory the reservation. memory_max = -1 (Nomad 2.x: no limit) is the
    // reservation alone, per the conformance issue and shared/nomad-wire.md §9; the
    // older memoryLimits we could read would make memory the hard limit there.
    let (memory_bytes, memory_reservation_bytes) = match (task.memory_mb, task.memory_max_mb) {
        (m, -1) if m > 0 => (None, Some(m * mib)),
        (m, max) if max > m && m > 0 => (Some(max * mib), Some(m * mib)),
        (m, _) if m > 0 => (Some(m * mib), None),
        _ => (None, None),
    };
    let shm_size = match cfg.shm_size {
        Some(b) => Some(
            i64::try_from(b.0).map_err(|_| err("shm_size", format!("{} bytes is more than Docker accepts", b.0)))?,
        ),
        None => None,
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
        shm_size,
        ipc_mode: cfg.ipc_mode.clone(),
        privileged: cfg.privileged,
        gpus,
        dns: task.dns_servers.clone(),
        dns_search: task.dns_searches.clone(),
        dns_options: task.dns_options.clone(),
        devices: task
            .devices
            .iter()
            .map(|d| crate::runtime::DeviceMapping {
                host_path: d.host_path.clone(),
                container_path: d.task_path.clone(),
                permissions: if d.permissions.is_empty() { "rwm".into() } else { d.permissions.clone() },
            })
            .collect(),
        log_max_size: Some(plugin.container_logs.max_size.clone()).filter(|s| !s.is_empty()),
        log_max_files: plugin.container_logs.max_files,
    };
    Ok(Plan { spec, readiness_url, port_map, load_flags: flags })
}

#[cfg(test)]
mod tests;
