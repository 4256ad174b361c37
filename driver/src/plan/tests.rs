use super::*;
use crate::config::TASK_SCHEMA;
use crate::nomad::cty::{encode, Value};
use crate::nomad::decode::task_config as decode_task_config;
use crate::nomad::hclspec::default_value;
use crate::runtime::PortBinding;
use crate::types::{NetworkMode, NomadDevice, NomadMount, NomadPort};

fn cfg(pairs: &[(&str, Value)]) -> TaskConfig {
    let Value::Map(mut m) = default_value(TASK_SCHEMA, false) else { unreachable!() };
    for (k, v) in pairs {
        m.insert((*k).to_string(), v.clone());
    }
    decode_task_config(&encode(&Value::Map(m))).unwrap()
}

fn task() -> NomadTask {
    NomadTask {
        id: "a1/llm/1234abcd".into(),
        name: "llm".into(),
        alloc_id: "a1".into(),
        job_name: "job".into(),
        node_name: "node-1".into(),
        alloc_dir: "/nomad/alloc/a1".into(),
        memory_mb: 1024,
        cpu_shares: 500,
        ports: vec![NomadPort { label: "http".into(), value: 23456, to: 8000, host_ip: "10.0.0.5".into() }],
        env: BTreeMap::from([("NOMAD_TASK_NAME".into(), "llm".into())]),
        ..Default::default()
    }
}

fn vllm() -> Vec<(&'static str, Value)> {
    vec![("engine", Value::str("vllm")), ("model", Value::str("org/m")), ("port", Value::str("http"))]
}

#[test]
fn vllm_command_line_and_docker_bridge_like_the_docker_driver() {
    let p = plan(&cfg(&vllm()), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap();
    let cmd = p.spec.cmd.clone().unwrap();
    assert_eq!(
        cmd,
        [
            "--model",
            "org/m",
            "--revision",
            "main",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--served-model-name",
            "org/m"
        ]
    );
    assert_eq!(p.spec.entrypoint, None);
    assert_eq!(p.spec.image, "vllm/vllm-openai:latest");
    // No group network: Docker's bridge, the port published only on the address
    // Nomad picked, host port → `to`, and the server listening on `to`.
    assert_eq!(p.spec.network_mode, "bridge");
    assert_eq!(p.spec.ports, [PortBinding { container_port: 8000, host_ip: "10.0.0.5".into(), host_port: 23456 }]);
    assert_eq!(p.port_map["http"], 23456);
    assert_eq!(p.spec.memory_bytes, Some(1024 << 20));
    assert_eq!(p.spec.cpu_shares, Some(500));
    assert!(p.spec.env.contains(&"HF_HUB_OFFLINE=1".to_string()));
    assert!(p.spec.env.contains(&"HF_HOME=/root/.cache/huggingface".to_string()));
    assert!(p.spec.env.contains(&"HF_HUB_CACHE=/root/.cache/huggingface/hub".to_string()));
    assert!(p.spec.binds.contains(&"/nomad/alloc/a1/alloc:/alloc".to_string()));
    assert!(p.spec.binds.contains(&"/nomad/alloc/a1/llm/secrets:/secrets".to_string()));
    assert!(p.spec.binds.contains(&"/mnt/hf-cache:/root/.cache/huggingface:ro".to_string()));
    assert!(p.spec.env.contains(&"HF_MODULES_CACHE=/local/.hf/modules".to_string()));
    assert!(p.spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()), "no GPU assigned: none visible");
    assert_eq!(p.spec.labels[LABEL_TASK_ID], "a1/llm/1234abcd");
    assert_eq!(p.spec.labels[LABEL_MANAGED], "true");
    assert_eq!(p.spec.name, "llm-a1-1234abcd");
}

#[test]
fn host_network_is_an_operator_opt_in() {
    let mut c = vllm();
    c.push(("network_mode", Value::str("host")));
    let e = plan(&cfg(&c), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("network_mode"));
    assert!(e.to_string().contains("allow_host_network"), "{e}");
    let plugin = PluginConfig { allow_host_network: true, ..PluginConfig::default() };
    let p = plan(&cfg(&c), &task(), &plugin, &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.network_mode, "host");
    assert!(p.spec.ports.is_empty());
    let cmd = p.spec.cmd.unwrap();
    assert!(cmd.windows(2).any(|w| w == ["--port", "23456"]));
    assert!(cmd.windows(2).any(|w| w == ["--host", "10.0.0.5"]), "binds the address Nomad picked: {cmd:?}");
    let mut grouped = task();
    grouped.network_mode = NetworkMode::Group;
    assert_eq!(plan(&cfg(&c), &grouped, &plugin, &NodeFacts::default()).unwrap_err().field(), Some("network_mode"));
    let mut none = vllm();
    none.push(("network_mode", Value::str("none")));
    let p = plan(&cfg(&none), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!((p.spec.network_mode.as_str(), p.spec.ports.len(), p.readiness_url), ("none", 0, None));
}

#[test]
fn only_the_tasks_own_ports_are_published() {
    let mut t = task();
    t.ports.push(NomadPort { label: "metrics".into(), value: 23457, to: 0, host_ip: String::new() });
    t.ports.push(NomadPort { label: "sibling".into(), value: 23458, to: 0, host_ip: String::new() });
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.ports.iter().map(|b| b.host_port).collect::<Vec<_>>(), [23456]);
    let mut c = vllm();
    c.push(("ports", Value::List(vec![Value::str("metrics")])));
    let p = plan(&cfg(&c), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.ports.iter().map(|b| b.host_port).collect::<Vec<_>>(), [23456, 23457]);
    c.push(("ports", Value::List(vec![Value::str("nope")])));
    assert_eq!(plan(&cfg(&c), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap_err().field(), Some("ports"));
}

#[test]
fn env_keys_and_ipc_cannot_reach_around_the_rules() {
    // `NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu` = "all" would become a second
    // NVIDIA_VISIBLE_DEVICES entry after ours.
    let mut t = task();
    t.env.insert("NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu".into(), "all".into());
    assert_eq!(
        plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap_err().field(),
        Some("env")
    );
    let mut t = task();
    t.env.insert("DOCKER_RESOURCE_GPU".into(), "GPU-x".into());
    let e = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert!(e.to_string().contains("gpu.allow_unscheduled"), "{e}");
    for (mode, ok) in
        [("private", true), ("shareable", true), ("none", true), ("host", false), ("container:other", false)]
    {
        let mut c = vllm();
        c.push(("ipc_mode", Value::str(mode)));
        let r = plan(&cfg(&c), &task(), &PluginConfig::default(), &NodeFacts::default());
        assert_eq!(r.is_ok(), ok, "{mode}");
    }
    let mut c = vllm();
    c.push(("ipc_mode", Value::str("host")));
    let plugin = PluginConfig { allow_host_ipc: true, ..PluginConfig::default() };
    assert_eq!(plan(&cfg(&c), &task(), &plugin, &NodeFacts::default()).unwrap().spec.ipc_mode.as_deref(), Some("host"));
}

#[test]
fn shm_size_beyond_what_docker_takes_is_a_config_error() {
    let mut c = vllm();
    c.push(("shm_size", Value::str("16g")));
    let p = plan(&cfg(&c), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.shm_size, Some(16 << 30));
    // 10^19 bytes fits a u64 but not Docker's int64: refused, not wrapped negative.
    let mut c = vllm();
    c.push(("shm_size", Value::str("10000000tb")));
    let e = plan(&cfg(&c), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("shm_size"), "{e}");
}

#[test]
fn group_network_publishes_the_tasks_ports() {
    let mut t = task();
    t.network_mode = NetworkMode::Group;
    t.ports.push(NomadPort { label: "metrics".into(), value: 23457, to: 0, host_ip: String::new() });
    let mut c = vllm();
    c.push(("ports", Value::List(vec![Value::str("metrics")])));
    let p = plan(&cfg(&c), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.network_mode, "bridge");
    assert_eq!(
        p.spec.ports,
        [
            PortBinding { container_port: 8000, host_ip: "10.0.0.5".into(), host_port: 23456 },
            PortBinding { container_port: 23457, host_ip: String::new(), host_port: 23457 },
        ]
    );
    assert!(p.spec.cmd.unwrap().windows(2).any(|w| w == ["--port", "8000"]));
}

#[test]
fn tensor_parallel_follows_the_assigned_gpus() {
    let mut t = task();
    t.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), "GPU-a,GPU-b".into());
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert!(p.spec.cmd.clone().unwrap().windows(2).any(|w| w == ["--tensor-parallel-size", "2"]));
    assert_eq!(p.spec.gpus, Some(GpuRequest::Uuids(vec!["GPU-a".into(), "GPU-b".into()])));
    let mut plugin = PluginConfig::default();
    plugin.gpu.device_request = DeviceRequestKind::Cdi;
    let p = plan(&cfg(&vllm()), &t, &plugin, &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.gpus, Some(GpuRequest::Cdi(vec!["nvidia.com/gpu=GPU-a".into(), "nvidia.com/gpu=GPU-b".into()])));
    assert!(p.spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b".to_string()));
    let mut with_count = vllm();
    with_count.push(("gpus", Value::str("all")));
    let mut allowed = PluginConfig::default();
    allowed.gpu.allow_unscheduled = true;
    let p = plan(&cfg(&with_count), &task(), &allowed, &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.gpus, Some(GpuRequest::Count(-1)));
}

#[test]
fn gpus_nomad_did_not_assign_need_the_operator() {
    let mut with_count = vllm();
    with_count.push(("gpus", Value::str("all")));
    let e = plan(&cfg(&with_count), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("gpus"));
    assert!(e.to_string().contains("gpu.allow_unscheduled"), "{e}");

    // The task's own env cannot widen what Nomad assigned, nor add GPUs when none were.
    let mut t = task();
    t.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
    let e = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("env"));
    assert!(e.to_string().contains("gpu.allow_unscheduled"), "{e}");
    t.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), "GPU-a".into());
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert!(p.spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=GPU-a".to_string()), "{:?}", p.spec.env);
    assert!(!p.spec.env.iter().any(|e| e == "NVIDIA_VISIBLE_DEVICES=all"));
    let mut allowed = PluginConfig::default();
    allowed.gpu.allow_unscheduled = true;
    t.device_env.clear();
    let p = plan(&cfg(&vllm()), &t, &allowed, &NodeFacts::default()).unwrap();
    assert!(p.spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=all".to_string()));
    t.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "none".into());
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert!(p.spec.env.contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()));
}

#[test]
fn volumes_stay_in_the_allocation_unless_the_operator_allows_host_paths() {
    let t = task();
    let plugin = PluginConfig::default();
    for bad in ["/:/host", "/var/run/docker.sock:/var/run/docker.sock", "../../other-alloc:/x", "/nomad/alloc/a2:/x"] {
        let e = task_volume(bad, &t, &plugin).unwrap_err();
        assert_eq!(e.field(), Some("volumes"), "{bad}");
        assert!(e.to_string().contains("volumes.enabled"), "{e}");
    }
    // Relative paths are under the task directory (never a Docker named volume).
    assert_eq!(task_volume("data:/data", &t, &plugin).unwrap(), "/nomad/alloc/a1/llm/data:/data");
    assert_eq!(task_volume("../alloc/x:/x:ro", &t, &plugin).unwrap(), "/nomad/alloc/a1/alloc/x:/x:ro");
    assert_eq!(task_volume("/nomad/alloc/a1/alloc/y:/y", &t, &plugin).unwrap(), "/nomad/alloc/a1/alloc/y:/y");
    let mut open = PluginConfig::default();
    open.volumes.enabled = true;
    assert_eq!(task_volume("/srv/models/:/models:ro", &t, &open).unwrap(), "/srv/models:/models:ro");
    assert_eq!(task_volume("data:/data", &t, &open).unwrap(), "/nomad/alloc/a1/llm/data:/data");
    // Through plan: a refused volume refuses the task.
    let mut c = vllm();
    c.push(("volumes", Value::List(vec![Value::str("/:/host")])));
    assert_eq!(plan(&cfg(&c), &t, &plugin, &NodeFacts::default()).unwrap_err().field(), Some("volumes"));
}

#[test]
fn a_symlink_in_the_task_directory_does_not_lead_out() {
    let d = tempfile::tempdir().unwrap();
    let alloc = d.path().join("alloc-1");
    std::fs::create_dir_all(alloc.join("llm")).unwrap();
    std::os::unix::fs::symlink("/etc", alloc.join("llm/escape")).unwrap();
    std::fs::create_dir(alloc.join("llm/inside")).unwrap();
    let t = NomadTask { alloc_dir: alloc.display().to_string(), name: "llm".into(), ..task() };
    let plugin = PluginConfig::default();
    let e = task_volume("escape:/x", &t, &plugin).unwrap_err();
    assert!(e.to_string().contains("volumes.enabled"), "{e}");
    // A path that does not exist yet, through a link that does: Docker would
    // create it outside (MkdirAll follows the link).
    assert!(task_volume("escape/not-yet/deeper:/x", &t, &plugin).is_err());
    std::fs::create_dir_all(alloc.join("alloc")).unwrap();
    std::os::unix::fs::symlink("/root", alloc.join("alloc/l")).unwrap();
    assert!(task_volume("../alloc/l/.ssh:/x", &t, &plugin).is_err());
    // Inside, existing or not, the bind names the resolved path.
    let real = std::fs::canonicalize(&alloc).unwrap();
    assert_eq!(task_volume("inside:/x", &t, &plugin).unwrap(), format!("{}/llm/inside:/x", real.display()));
    assert_eq!(
        task_volume("inside/new/dir:/x:ro", &t, &plugin).unwrap(),
        format!("{}/llm/inside/new/dir:/x:ro", real.display())
    );
}

#[test]
fn the_cache_is_read_only_unless_an_online_task_is_allowed_to_write() {
    let t = task();
    let bind = |p: &Plan| p.spec.binds.iter().find(|b| b.starts_with("/mnt/hf-cache:")).cloned().unwrap();
    let mut online = vllm();
    online.push(("offline", Value::Bool(false)));
    let p = plan(&cfg(&online), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(bind(&p), "/mnt/hf-cache:/root/.cache/huggingface:ro");
    let mut writable = PluginConfig::default();
    writable.hf_cache.allow_write = true;
    let p = plan(&cfg(&online), &t, &writable, &NodeFacts::default()).unwrap();
    assert_eq!(bind(&p), "/mnt/hf-cache:/root/.cache/huggingface");
    assert!(!p.spec.env.iter().any(|e| e.starts_with("HF_MODULES_CACHE=")));
    let p = plan(&cfg(&vllm()), &t, &writable, &NodeFacts::default()).unwrap();
    assert_eq!(bind(&p), "/mnt/hf-cache:/root/.cache/huggingface:ro", "offline tasks never write");
}

#[test]
fn every_engine_builds_its_command() {
    type Case<'a> = (Vec<(&'a str, Value)>, Option<Vec<&'a str>>, Vec<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec![("engine", Value::str("sglang")), ("model", Value::str("org/m")), ("port", Value::str("http"))],
            Some(vec!["python3", "-m", "sglang.launch_server"]),
            vec![
                "--model-path",
                "org/m",
                "--revision",
                "main",
                "--host",
                "0.0.0.0",
                "--port",
                "23456",
                "--served-model-name",
                "org/m",
            ],
            Some("/health"),
        ),
        (
            vec![
                ("engine", Value::str("sglang-router")),
                ("port", Value::str("http")),
                ("args", Value::List(vec![Value::str("--worker-urls"), Value::str("http://w:1")])),
            ],
            Some(vec!["python3", "-m", "sglang_router.launch_router"]),
            vec!["--host", "0.0.0.0", "--port", "23456", "--worker-urls", "http://w:1"],
            Some("/health"),
        ),
        (
            vec![("engine", Value::str("ollama")), ("port", Value::str("http"))],
            None,
            vec!["serve"],
            Some("/api/version"),
        ),
        (
            vec![("engine", Value::str("tgi")), ("model", Value::str("org/m")), ("port", Value::str("http"))],
            None,
            vec!["--model-id", "org/m", "--revision", "main", "--hostname", "0.0.0.0", "--port", "23456"],
            Some("/health"),
        ),
        (
            vec![("engine", Value::str("ray")), ("port", Value::str("http"))],
            None,
            vec!["ray", "start", "--block", "--dashboard-host=0.0.0.0", "--dashboard-port=23456"],
            None,
        ),
        (
            vec![
                ("engine", Value::str("custom")),
                ("image", Value::str("my/server:1")),
                ("command", Value::str("/bin/serve")),
                ("args", Value::List(vec![Value::str("-v")])),
                ("port", Value::str("http")),
                ("readiness", Value::object([("path", Value::str("/ready"))])),
            ],
            None,
            vec!["/bin/serve", "-v"],
            Some("/ready"),
        ),
    ];
    let mut t = task();
    t.ports[0].to = 0;
    t.ports[0].host_ip = String::new();
    for (pairs, entry, cmd, ready) in cases {
        let c = cfg(&pairs);
        let p = plan(&c, &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
        let name = c.engine.as_str();
        assert_eq!(p.spec.entrypoint, entry.map(|e| e.iter().map(|s| s.to_string()).collect()), "{name}");
        assert_eq!(p.spec.cmd.unwrap(), cmd, "{name}");
        assert_eq!(p.readiness_url, ready.map(|r| format!("http://127.0.0.1:23456{r}")), "{name}");
    }
}

#[test]
fn load_strategy_auto_is_eager_on_nfs() {
    let facts = NodeFacts { cache_on_nfs: true, resolved_revision: Some("abc123".into()), ..NodeFacts::default() };
    let p = plan(&cfg(&vllm()), &task(), &PluginConfig::default(), &facts).unwrap();
    let cmd = p.spec.cmd.unwrap();
    assert!(cmd.windows(2).any(|w| w == ["--safetensors-load-strategy", "eager"]));
    assert!(cmd.windows(2).any(|w| w == ["--revision", "abc123"]));
    let mut sg = vec![("engine", Value::str("sglang")), ("model", Value::str("org/m"))];
    let p = plan(&cfg(&sg), &task(), &PluginConfig::default(), &facts).unwrap();
    assert!(p.spec.cmd.unwrap().contains(&"--weight-loader-disable-mmap".to_string()));
    sg.push(("load_strategy", Value::str("none")));
    let p = plan(&cfg(&sg), &task(), &PluginConfig::default(), &facts).unwrap();
    assert!(p.load_flags.is_empty());
    let p = plan(&cfg(&vllm()), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert!(p.load_flags.is_empty());
}

#[test]
fn bad_inputs_name_the_field() {
    let mut bad_port = vllm();
    bad_port[2] = ("port", Value::str("grpc"));
    let e = plan(&cfg(&bad_port), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("port"));
    assert!(e.to_string().contains("grpc"));
    let mut privileged = vllm();
    privileged.push(("privileged", Value::Bool(true)));
    let e = plan(&cfg(&privileged), &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert_eq!(e.field(), Some("privileged"));
}

#[test]
fn memory_max_becomes_the_limit_and_memory_the_reservation() {
    let mut t = task();
    t.memory_max_mb = 4096;
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.memory_bytes, Some(4096 << 20));
    assert_eq!(p.spec.memory_reservation_bytes, Some(1024 << 20));
}

#[test]
fn the_group_namespace_of_a_docker_task_is_joined_without_publishing() {
    let mut t = task();
    t.network_mode = NetworkMode::Group;
    t.network_path = "/var/run/docker/netns/abc".into();
    t.network_labels.insert(DOCKER_SANDBOX_LABEL.into(), "pausecontainer".into());
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!(p.spec.network_mode, "container:pausecontainer");
    assert!(p.spec.ports.is_empty(), "Nomad maps the group's ports; we publish none");
    assert!(p.spec.cmd.unwrap().windows(2).any(|w| w == ["--port", "8000"]), "the server listens on `to`");
    // A namespace Nomad made by itself cannot be joined by Docker: refused, never a network of our own.
    t.network_labels.clear();
    let e = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap_err();
    assert!(e.to_string().contains("not created by a docker task"), "{e}");
    let none = NomadTask { network_mode: NetworkMode::None, ..task() };
    let p = plan(&cfg(&vllm()), &none, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!((p.spec.network_mode.as_str(), p.spec.ports.len()), ("none", 0));
}

#[test]
fn resources_mounts_devices_and_logs_follow_the_docker_driver() {
    let mib = 1 << 20;
    let unlimited = NomadTask { memory_mb: 1024, memory_max_mb: -1, ..task() };
    let p = plan(&cfg(&vllm()), &unlimited, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!((p.spec.memory_bytes, p.spec.memory_reservation_bytes), (None, Some(1024 * mib)));
    let burst = NomadTask { memory_mb: 1024, memory_max_mb: 2048, ..task() };
    let p = plan(&cfg(&vllm()), &burst, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert_eq!((p.spec.memory_bytes, p.spec.memory_reservation_bytes), (Some(2048 * mib), Some(1024 * mib)));

    let mut t = task();
    t.mounts = vec![
        NomadMount {
            host_path: "/h1".into(),
            task_path: "/t1".into(),
            readonly: true,
            propagation: "host-to-task".into(),
        },
        NomadMount {
            host_path: "/h2".into(),
            task_path: "/t2".into(),
            readonly: false,
            propagation: "bidirectional".into(),
        },
        NomadMount { host_path: "/h3".into(), task_path: "/t3".into(), readonly: false, propagation: String::new() },
    ];
    t.devices =
        vec![NomadDevice { host_path: "/dev/kfd".into(), task_path: "/dev/kfd".into(), permissions: String::new() }];
    let p = plan(&cfg(&vllm()), &t, &PluginConfig::default(), &NodeFacts::default()).unwrap();
    for b in ["/h1:/t1:ro,rslave", "/h2:/t2:rshared", "/h3:/t3", "/nomad/alloc/a1/alloc/logs:/alloc/logs:ro"] {
        assert!(p.spec.binds.contains(&b.to_string()), "{b} in {:?}", p.spec.binds);
    }
    assert_eq!(p.spec.devices[0].container_path, "/dev/kfd");
    assert_eq!(p.spec.devices[0].permissions, "rwm");
    assert_eq!((p.spec.log_max_size.as_deref(), p.spec.log_max_files), (Some("2m"), 2));
}

#[test]
fn llamacpp_loads_the_chosen_gguf_from_the_cache_mount() {
    let c = cfg(&[
        ("engine", Value::str("llamacpp")),
        ("model", Value::str("org/m-GGUF")),
        ("gguf_file", Value::str("*Q4_K_M.gguf")),
        ("args", Value::List(vec![Value::str("-c"), Value::str("4096"), Value::str("-np"), Value::str("2")])),
    ]);
    let file = "models--org--m-GGUF/snapshots/abc/m-Q4_K_M.gguf".to_string();
    let facts = NodeFacts { model_file: Some(file), ..NodeFacts::default() };
    let p = plan(&c, &task(), &PluginConfig::default(), &facts).unwrap();
    let m = "/root/.cache/huggingface/hub/models--org--m-GGUF/snapshots/abc/m-Q4_K_M.gguf";
    let want = ["-m", m, "--host", "0.0.0.0", "--port", "8080", "-ngl", "0", "-c", "4096", "-np", "2"];
    assert_eq!(p.spec.cmd.clone().unwrap(), want);
    assert_eq!(p.spec.image, "ghcr.io/ggml-org/llama.cpp:server");
    let mut t = task();
    t.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), "GPU-1".into());
    let p = plan(&c, &t, &PluginConfig::default(), &facts).unwrap();
    assert_eq!(p.spec.cmd.unwrap()[6..8], ["-ngl", "999"]);
    // Without the gate's choice there is no file to load.
    assert!(plan(&c, &task(), &PluginConfig::default(), &NodeFacts::default()).is_err());
    // gguf_file is for llamacpp only, and stays inside the repo.
    let decodes = |pairs: &[(&str, Value)]| {
        let Value::Map(mut m) = default_value(TASK_SCHEMA, false) else { unreachable!() };
        m.extend(pairs.iter().map(|(k, v)| ((*k).to_string(), v.clone())));
        decode_task_config(&encode(&Value::Map(m))).is_ok()
    };
    let mut other = vllm();
    other.push(("gguf_file", Value::str("x.gguf")));
    assert!(!decodes(&other));
    let gguf = |f: &str| {
        decodes(&[("engine", Value::str("llamacpp")), ("model", Value::str("org/m")), ("gguf_file", Value::str(f))])
    };
    assert!(gguf("sub/*.gguf") && !gguf("../x.gguf") && !gguf("/x.gguf"));
}

#[test]
fn ollama_sees_the_shared_store_read_only_and_never_prunes_it() {
    let c = cfg(&[
        ("engine", Value::str("ollama")),
        ("port", Value::str("http")),
        ("models", Value::List(vec![Value::str("llama3.2:3b"), Value::str("codellama:7b")])),
    ]);
    let names: Vec<String> = c.ollama_models().unwrap().iter().map(|n| n.short()).collect();
    assert_eq!(names, ["llama3.2:3b", "codellama:7b"]);
    let facts =
        NodeFacts { ollama_store: Some("/mnt/hf-cache/ollama".into()), ollama_models: names, ..NodeFacts::default() };
    let p = plan(&c, &task(), &PluginConfig::default(), &facts).unwrap();
    assert!(p.spec.binds.contains(&format!("/mnt/hf-cache/ollama:{OLLAMA_MODELS}:ro")), "{:?}", p.spec.binds);
    assert!(p.spec.env.contains(&format!("OLLAMA_MODELS={OLLAMA_MODELS}")), "{:?}", p.spec.env);
    assert!(p.spec.env.contains(&"OLLAMA_NOPRUNE=1".to_string()), "{:?}", p.spec.env);
    // No store on the node: nothing mounted, nothing set.
    let p = plan(&c, &task(), &PluginConfig::default(), &NodeFacts::default()).unwrap();
    assert!(!p.spec.binds.iter().any(|b| b.contains(OLLAMA_MODELS)));
    assert!(!p.spec.env.iter().any(|e| e.starts_with("OLLAMA_MODELS=")));
    // Another engine never gets the store.
    let p = plan(&cfg(&vllm()), &task(), &PluginConfig::default(), &facts).unwrap();
    assert!(!p.spec.binds.iter().any(|b| b.contains(OLLAMA_MODELS)));
}

#[test]
fn a_writable_cache_keeps_the_shared_ollama_store_read_only() {
    let mut online = vllm();
    online.push(("offline", Value::Bool(false)));
    let facts = NodeFacts {
        readonly_overlays: vec![("/mnt/hf-cache/ollama".into(), "/root/.cache/huggingface/ollama".into())],
        ..NodeFacts::default()
    };
    let mut plugin = PluginConfig::default();
    plugin.hf_cache.allow_write = true;
    let p = plan(&cfg(&online), &task(), &plugin, &facts).unwrap();
    assert!(p.spec.binds.contains(&"/mnt/hf-cache:/root/.cache/huggingface".to_string()), "{:?}", p.spec.binds);
    assert!(p.spec.binds.contains(&"/mnt/hf-cache/ollama:/root/.cache/huggingface/ollama:ro".to_string()));
    // Read-only cache: no overlay needed.
    let p = plan(&cfg(&vllm()), &task(), &plugin, &facts).unwrap();
    assert!(!p.spec.binds.iter().any(|b| b.contains("/ollama")), "{:?}", p.spec.binds);
}
