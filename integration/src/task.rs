//! Tasks the way a Nomad client prepares them: a TaskConfig with an id
//! `<alloc>/<task>/<8 hex>`, an allocation directory tree, real log FIFOs read
//! the way logmon reads them (one copy until the first EOF, never reopened),
//! and the driver config encoded from HCL against the plugin's task schema.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hcl::eval::Context as EvalContext;
use nix::sys::stat::Mode;

use aimodel_driver::nomad::cty;
use aimodel_proto::drivers::{
    self as pb, network_isolation_spec::NetworkIsolationMode, AllocatedCpuResources, AllocatedMemoryResources,
    AllocatedTaskResources, LinuxResources, NetworkIsolationSpec, PortMapping, Resources,
};
use aimodel_proto::hclspec::Spec;

use crate::hcl_eval::eval_body;

/// Random hex from the kernel (ids only; no crypto needed).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A Nomad-style allocation id (UUID layout).
pub fn alloc_id() -> String {
    let h = random_hex(16);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A free TCP port on 127.0.0.1 (what Nomad's port allocator would hand out).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// Reads one FIFO like Nomad's logmon: a single copy until EOF.
#[derive(Debug, Clone)]
pub struct LogmonReader {
    pub path: PathBuf,
    buf: Arc<Mutex<Vec<u8>>>,
    eof: Arc<AtomicBool>,
}

impl LogmonReader {
    fn start(path: PathBuf) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicBool::new(false));
        let (b, e, p) = (buf.clone(), eof.clone(), path.clone());
        std::thread::spawn(move || {
            // Blocks until a writer opens, like logmon's open of the FIFO.
            if let Ok(mut f) = File::open(&p) {
                let mut chunk = [0u8; 16384];
                while let Ok(n) = f.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            }
            e.store(true, Ordering::SeqCst);
        });
        LogmonReader { path, buf, eof }
    }

    /// Everything received so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    /// Whether the reader saw EOF (and, like logmon, stopped for good).
    pub fn at_eof(&self) -> bool {
        self.eof.load(Ordering::SeqCst)
    }

    /// Waits until `pred(text)` holds.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let t = self.text();
            if pred(&t) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                anyhow::bail!("log condition not met within {within:?}; got {} bytes: {:?}", t.len(), tail(&t));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn tail(t: &str) -> &str {
    let start = t.len().saturating_sub(400);
    let start = (start..t.len()).find(|i| t.is_char_boundary(*i)).unwrap_or(t.len());
    &t[start..]
}

/// A task to start, described the way a jobspec would.
#[derive(Debug, Clone)]
pub struct TaskBuilder {
    pub name: String,
    pub job: String,
    pub group: String,
    pub alloc_id: String,
    /// The body of the task's `config { ... }` block, in HCL.
    pub config_hcl: String,
    pub memory_mb: i64,
    pub memory_max_mb: i64,
    pub cpu_shares: i64,
    /// Group ports: (label, host port, mapped port).
    pub ports: Vec<(String, u16, u16)>,
    pub group_network: bool,
    pub env: HashMap<String, String>,
    pub device_env: HashMap<String, String>,
    pub logs_disabled: bool,
    /// The Nomad node name (containers are labelled with it).
    pub node_name: String,
    /// The group's network as Nomad's network hook hands it over (overrides `group_network`).
    pub isolation: Option<NetworkIsolationSpec>,
    /// Device-plugin devices (`TaskConfig.devices`).
    pub devices: Vec<pb::Device>,
    /// The host address Nomad picked for the ports (`host_network`).
    pub port_ip: String,
    /// What Nomad's volume hook mounts (host volumes, CSI volumes): `TaskConfig.mounts`
    /// (`client/allocrunner/taskrunner/volume_hook.go`).
    pub mounts: Vec<pb::Mount>,
}

impl TaskBuilder {
    /// A task named `name` with the given config body.
    pub fn new(name: &str, config_hcl: &str) -> Self {
        TaskBuilder {
            name: name.into(),
            job: "sim-job".into(),
            group: "sim-group".into(),
            alloc_id: alloc_id(),
            config_hcl: config_hcl.into(),
            memory_mb: 256,
            memory_max_mb: 0,
            cpu_shares: 100,
            ports: Vec::new(),
            group_network: false,
            env: HashMap::new(),
            device_env: HashMap::new(),
            logs_disabled: false,
            node_name: "sim-node".into(),
            isolation: None,
            devices: Vec::new(),
            port_ip: "127.0.0.1".into(),
            mounts: Vec::new(),
        }
    }

    /// Adds a group port.
    pub fn port(mut self, label: &str, value: u16, to: u16) -> Self {
        self.ports.push((label.into(), value, to));
        self
    }

    /// Adds a task environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }

    /// Builds the TaskConfig, the allocation directory under `data_dir` and the FIFO readers.
    pub fn build(&self, schema: &Spec, data_dir: &Path) -> Result<PreparedTask> {
        let body: hcl::Body = hcl::parse(&self.config_hcl).context("parsing the task config")?;
        let value = eval_body(schema, &body, &EvalContext::new())?;
        let alloc_dir = data_dir.join("alloc").join(&self.alloc_id);
        for d in ["alloc/logs", "alloc/tmp", "alloc/data"] {
            std::fs::create_dir_all(alloc_dir.join(d))?;
        }
        for d in ["local", "secrets", "tmp"] {
            std::fs::create_dir_all(alloc_dir.join(&self.name).join(d))?;
        }
        let (stdout_path, stderr_path, stdout, stderr) = if self.logs_disabled {
            ("/dev/null".into(), "/dev/null".into(), None, None)
        } else {
            let logs = alloc_dir.join("alloc/logs");
            let out = logs.join(format!(".{}.stdout.fifo", self.name));
            let err = logs.join(format!(".{}.stderr.fifo", self.name));
            for p in [&out, &err] {
                if !p.exists() {
                    nix::unistd::mkfifo(p, Mode::from_bits_truncate(0o600))?;
                }
            }
            let (ro, re) = (LogmonReader::start(out.clone()), LogmonReader::start(err.clone()));
            (out, err, Some(ro), Some(re))
        };
        let mut env: HashMap<String, String> = [
            ("NOMAD_ALLOC_ID", self.alloc_id.as_str()),
            ("NOMAD_TASK_NAME", self.name.as_str()),
            ("NOMAD_GROUP_NAME", self.group.as_str()),
            ("NOMAD_JOB_NAME", self.job.as_str()),
            ("NOMAD_ALLOC_DIR", "/alloc"),
            ("NOMAD_TASK_DIR", "/local"),
            ("NOMAD_SECRETS_DIR", "/secrets"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
        for (label, value, to) in &self.ports {
            env.insert(format!("NOMAD_PORT_{label}"), if *to > 0 { to } else { value }.to_string());
            env.insert(format!("NOMAD_HOST_PORT_{label}"), value.to_string());
            env.insert(format!("NOMAD_ADDR_{label}"), format!("{}:{value}", self.port_ip));
            env.insert(format!("NOMAD_IP_{label}"), self.port_ip.clone());
        }
        env.extend(self.env.clone());
        let config = pb::TaskConfig {
            id: format!("{}/{}/{}", self.alloc_id, self.name, random_hex(4)),
            name: self.name.clone(),
            msgpack_driver_config: cty::encode(&value),
            env,
            device_env: self.device_env.clone(),
            resources: Some(Resources {
                allocated_resources: Some(AllocatedTaskResources {
                    cpu: Some(AllocatedCpuResources { cpu_shares: self.cpu_shares }),
                    memory: Some(AllocatedMemoryResources {
                        memory_mb: self.memory_mb,
                        memory_max_mb: self.memory_max_mb,
                    }),
                    networks: Vec::new(),
                }),
                linux_resources: Some(LinuxResources {
                    cpu_shares: self.cpu_shares,
                    memory_limit_bytes: self.memory_mb * 1024 * 1024,
                    ..Default::default()
                }),
                ports: self
                    .ports
                    .iter()
                    .map(|(label, value, to)| PortMapping {
                        label: label.clone(),
                        value: i32::from(*value),
                        to: i32::from(*to),
                        host_ip: self.port_ip.clone(),
                    })
                    .collect(),
            }),
            alloc_dir: alloc_dir.display().to_string(),
            stdout_path: stdout_path.display().to_string(),
            stderr_path: stderr_path.display().to_string(),
            task_group_name: self.group.clone(),
            job_name: self.job.clone(),
            job_id: self.job.clone(),
            alloc_id: self.alloc_id.clone(),
            namespace: "default".into(),
            node_name: self.node_name.clone(),
            node_id: "00000000-0000-0000-0000-000000000001".into(),
            network_isolation_spec: self.isolation.clone().or_else(|| {
                self.group_network
                    .then(|| NetworkIsolationSpec { mode: NetworkIsolationMode::Group as i32, ..Default::default() })
            }),
            devices: self.devices.clone(),
            mounts: self.mounts.clone(),
            ..Default::default()
        };
        Ok(PreparedTask { config, alloc_dir, stdout, stderr })
    }
}

/// A TaskConfig ready for StartTask, with its log readers.
#[derive(Debug)]
pub struct PreparedTask {
    pub config: pb::TaskConfig,
    pub alloc_dir: PathBuf,
    pub stdout: Option<LogmonReader>,
    pub stderr: Option<LogmonReader>,
}

/// The handle as Nomad persists it: go-msgpack drops the raw driver config.
pub fn stored_handle(h: &pb::TaskHandle) -> pb::TaskHandle {
    let mut stored = h.clone();
    if let Some(c) = stored.config.as_mut() {
        c.msgpack_driver_config.clear();
    }
    stored
}
