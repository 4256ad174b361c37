//! Nomad's start sequence for an external driver (nomad-wire.md §2.2): a
//! fingerprint process, a validation process, then the long-lived process with
//! its Fingerprint and TaskEvents streams.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hcl::eval::Context as EvalContext;
use tokio::task::JoinHandle;

use aimodel_driver::nomad::cty;
use aimodel_proto::base::{
    ConfigSchemaRequest, NomadConfig, NomadDriverConfig, PluginInfoRequest, PluginInfoResponse, PluginType,
    SetConfigRequest,
};
use aimodel_proto::drivers::{
    CapabilitiesRequest, DriverCapabilities, DriverTaskEvent, FingerprintRequest, FingerprintResponse, InitRequest,
    TaskConfigSchemaRequest, TaskEventsRequest,
};
use aimodel_proto::hclspec::Spec;

use crate::hcl_eval::{eval_body, plugin_stanza};
use crate::plugin::{Launch, PluginProcess};

/// The API version Nomad supports (`drivers.ApiVersion010`).
pub const NOMAD_API_VERSION: &str = "v0.1.0";
/// The client's plugin port range, sent in `NomadDriverConfig`.
pub const CLIENT_MIN_PORT: u32 = 14000;
/// Upper end of the client's plugin port range.
pub const CLIENT_MAX_PORT: u32 = 14512;

/// One fingerprint received on the stream, with its arrival time.
#[derive(Debug, Clone)]
pub struct Received<T> {
    pub at: Instant,
    pub msg: T,
}

/// What a stream has delivered so far, and whether it is still open.
#[derive(Debug, Clone)]
pub struct StreamLog<T> {
    pub items: Vec<Received<T>>,
    pub ended: Option<String>,
}

impl<T> Default for StreamLog<T> {
    fn default() -> Self {
        StreamLog { items: Vec::new(), ended: None }
    }
}

/// The long-lived plugin as the Nomad client holds it after start-up.
#[derive(Debug)]
pub struct LiveDriver {
    pub process: PluginProcess,
    pub info: PluginInfoResponse,
    pub task_schema: Spec,
    pub capabilities: DriverCapabilities,
    pub msgpack_config: Vec<u8>,
    /// How the process was launched (to launch a replacement).
    pub launch: Launch,
    /// When the Fingerprint stream was opened.
    pub fingerprint_opened: Instant,
    pub fingerprints: Arc<Mutex<StreamLog<FingerprintResponse>>>,
    pub events: Arc<Mutex<StreamLog<DriverTaskEvent>>>,
    streams: Vec<JoinHandle<()>>,
}

impl LiveDriver {
    /// Waits until at least `n` fingerprints have arrived.
    pub async fn wait_fingerprints(&self, n: usize, within: Duration) -> Result<Vec<Received<FingerprintResponse>>> {
        let deadline = Instant::now() + within;
        loop {
            {
                let log = self.fingerprints.lock().unwrap();
                if log.items.len() >= n {
                    return Ok(log.items.clone());
                }
                if let Some(e) = &log.ended {
                    bail!("fingerprint stream ended after {} messages: {e}", log.items.len());
                }
            }
            if Instant::now() >= deadline {
                bail!("fewer than {n} fingerprints within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The latest fingerprint that satisfies `pred`, waiting up to `within` for one.
    pub async fn fingerprint_where(
        &self,
        within: Duration,
        pred: impl Fn(&FingerprintResponse) -> bool,
    ) -> Result<FingerprintResponse> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(f) = self.fingerprints.lock().unwrap().items.iter().rev().find(|f| pred(&f.msg)) {
                return Ok(f.msg.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no such fingerprint within {within:?}; the last: {:?}",
                    self.fingerprints.lock().unwrap().items.last().map(|f| &f.msg)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node as the Nomad client builds it from the fingerprints so far
    /// (`client/node_updater.go` `applyNodeUpdatesFromDriver`): every attribute sent is
    /// written into the node, a key sent as `""` is deleted, keys not sent are
    /// kept. Returns the attributes and how many fingerprints changed them
    /// (each change is a node update the servers see, and re-evaluate the node's jobs for).
    pub fn node_view(&self) -> (BTreeMap<String, aimodel_proto::structs::Attribute>, usize) {
        use aimodel_proto::structs::attribute::Value as A;
        let mut node = BTreeMap::new();
        let mut updates = 0;
        for f in &self.fingerprints.lock().unwrap().items {
            let before = node.clone();
            for (k, v) in &f.msg.attributes {
                if matches!(&v.value, Some(A::StringVal(s)) if s.is_empty()) {
                    node.remove(k);
                } else {
                    node.insert(k.clone(), v.clone());
                }
            }
            if node != before {
                updates += 1;
            }
        }
        (node, updates)
    }

    /// The node as Nomad's API shows it (`GET /v1/node/<id>`) once the client
    /// has applied these fingerprints: the driver's attributes in the node's
    /// `Attributes` and in `Drivers.aimodel` with its health
    /// (`client/node_updater.go`, `nomad/structs` `DriverInfo`). Attribute values
    /// are strings there. No devices (no GPU here).
    pub fn node_json(&self, id: &str, datacenter: &str) -> serde_json::Value {
        use aimodel_proto::drivers::fingerprint_response::HealthState;
        use aimodel_proto::structs::attribute::Value as A;
        let (attrs, _) = self.node_view();
        let text: serde_json::Map<String, serde_json::Value> = attrs
            .iter()
            .filter_map(|(k, v)| {
                let s = match v.value.as_ref()? {
                    A::StringVal(s) => s.clone(),
                    A::BoolVal(b) => b.to_string(),
                    A::IntVal(i) => i.to_string(),
                    A::FloatVal(f) => f.to_string(),
                };
                Some((k.clone(), serde_json::Value::String(s)))
            })
            .collect();
        let health = self.last_fingerprint().and_then(|f| HealthState::try_from(f.health).ok());
        serde_json::json!({
            "ID": id, "Name": id, "Datacenter": datacenter, "Status": "ready",
            "Attributes": text.clone(),
            "Drivers": {"aimodel": {
                "Attributes": text,
                "Detected": health.is_some_and(|h| h != HealthState::Undetected),
                "Healthy": health == Some(HealthState::Healthy),
                "HealthDescription": self.last_fingerprint().map(|f| f.health_description).unwrap_or_default(),
            }},
            "NodeResources": {"Devices": []},
        })
    }

    /// What the client does with a task's stored handle when it restarts
    /// (`client/allocrunner/taskrunner/task_runner.go` `restoreHandle`):
    /// RecoverTask; when that fails, DestroyTask with force, so nothing of the
    /// old task survives, after which the task is started again. Returns
    /// whether the task was recovered.
    pub async fn restore_handle(&self, handle: aimodel_proto::drivers::TaskHandle) -> Result<bool> {
        use aimodel_proto::drivers::{DestroyTaskRequest, RecoverTaskRequest};
        let id = handle.config.as_ref().map(|c| c.id.clone()).unwrap_or_default();
        match self.process.driver().recover_task(RecoverTaskRequest { task_id: id.clone(), handle: Some(handle) }).await
        {
            Ok(_) => Ok(true),
            Err(_) => {
                self.process.driver().destroy_task(DestroyTaskRequest { task_id: id, force: true }).await?;
                Ok(false)
            }
        }
    }

    /// The latest fingerprint, if any.
    pub fn last_fingerprint(&self) -> Option<FingerprintResponse> {
        self.fingerprints.lock().unwrap().items.last().map(|f| f.msg.clone())
    }

    /// Waits for a task event of `task_id` whose message contains `needle`.
    pub async fn wait_event(&self, task_id: &str, needle: &str, within: Duration) -> Result<DriverTaskEvent> {
        let deadline = Instant::now() + within;
        loop {
            {
                let log = self.events.lock().unwrap();
                if let Some(e) = log.items.iter().find(|e| e.msg.task_id == task_id && e.msg.message.contains(needle)) {
                    return Ok(e.msg.clone());
                }
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> =
                    self.events.lock().unwrap().items.iter().map(|e| e.msg.message.clone()).collect();
                bail!("no event containing {needle:?} for {task_id} within {within:?}; events: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// All event messages for a task so far.
    pub fn event_messages(&self, task_id: &str) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .items
            .iter()
            .filter(|e| e.msg.task_id == task_id)
            .map(|e| e.msg.message.clone())
            .collect()
    }

    /// Kills the process hard (`kill -9`), as a crash would; streams end.
    pub async fn crash(mut self) -> Result<()> {
        self.process.child.kill().await?;
        let _ = self.process.child.wait().await;
        for s in self.streams {
            s.abort();
        }
        Ok(())
    }

    /// Nomad's `Kill()` of the long-lived process.
    pub async fn kill(self) -> Result<(bool, Duration)> {
        let r = self.process.kill().await;
        for s in self.streams {
            s.abort();
        }
        r
    }
}

/// Everything the start sequence observed.
#[derive(Debug)]
pub struct StartReport {
    pub fingerprint_process: ProcessReport,
    pub validation_process: ProcessReport,
    pub live: LiveDriver,
}

/// How a throwaway process went.
#[derive(Debug, Clone)]
pub struct ProcessReport {
    pub handshake_after: Duration,
    pub exited_gracefully: bool,
    pub stderr: Vec<String>,
    pub extra_stdout: Vec<String>,
}

/// Checks PluginInfo the way Nomad's loader does.
pub fn check_plugin_info(info: &PluginInfoResponse) -> Result<()> {
    ensure!(info.r#type == PluginType::Driver as i32, "plugin type {} is not DRIVER", info.r#type);
    ensure!(!info.name.is_empty(), "plugin has no name");
    ensure!(
        parse_go_version(&info.plugin_version).is_some(),
        "plugin_version {:?} is not a version",
        info.plugin_version
    );
    let want = parse_go_version(NOMAD_API_VERSION);
    ensure!(
        info.plugin_api_versions.iter().any(|v| parse_go_version(v) == want),
        "no plugin API version in common with Nomad ({:?} vs {NOMAD_API_VERSION})",
        info.plugin_api_versions
    );
    Ok(())
}

/// hashicorp/go-version segments, padded to three (`v0.1` == `0.1.0`).
fn parse_go_version(v: &str) -> Option<Vec<u64>> {
    let core = v.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut segs: Vec<u64> = core.split('.').map(|s| s.parse().ok()).collect::<Option<_>>()?;
    if segs.is_empty() || segs.len() > 3 {
        return None;
    }
    segs.resize(3, 0);
    Some(segs)
}

/// Encodes a plugin `config { ... }` body as Nomad would for `spec`.
pub fn encode_config(spec: &Spec, body: &hcl::Body) -> Result<Vec<u8>> {
    let value = eval_body(spec, body, &EvalContext::new())?;
    Ok(cty::encode(&value))
}

/// Runs the whole start sequence for `binary` with the client configuration text.
pub async fn start(binary: &Path, client_hcl: &str, launch_env: &[(&str, &str)]) -> Result<StartReport> {
    let name = binary.file_name().and_then(|n| n.to_str()).context("binary has no file name")?;
    let (args, body) = plugin_stanza(client_hcl, name)?
        .with_context(|| format!("plugin not referenced in the agent configuration file, loading skipped: {name}"))?;
    let mut launch = Launch::nomad(binary);
    launch.args = args;
    for (k, v) in launch_env {
        launch = launch.env(k, Some(v));
    }

    // 1. Fingerprint process: PluginInfo, ConfigSchema, Kill.
    let p = PluginProcess::launch(&launch).await?;
    let info = p.base().plugin_info(PluginInfoRequest {}).await?.into_inner();
    check_plugin_info(&info)?;
    let schema = p.base().config_schema(ConfigSchemaRequest {}).await?.into_inner().spec;
    let fingerprint_process = finish(p).await?;
    let api_version = info.plugin_api_versions[0].clone();

    // 2. Validation process: SetConfig twice without nomad_config, Kill.
    let msgpack_config = match &schema {
        Some(spec) => encode_config(spec, &body)?,
        None if body.attributes().count() + body.blocks().count() > 0 => {
            bail!("configuration not allowed but config passed")
        }
        None => Vec::new(),
    };
    let p = PluginProcess::launch(&launch).await?;
    for _ in 0..2 {
        p.base()
            .set_config(SetConfigRequest {
                msgpack_config: msgpack_config.clone(),
                nomad_config: None,
                plugin_api_version: api_version.clone(),
            })
            .await
            .context("validation SetConfig")?;
    }
    let validation_process = finish(p).await?;

    // 3. Long-lived process.
    let live = long_lived(&launch, msgpack_config, &api_version).await?;
    Ok(StartReport { fingerprint_process, validation_process, live })
}

/// Step 3 alone: what Nomad does when it (re)dispenses the driver, e.g. after
/// the plugin died: a new process, SetConfig with nomad_config, Init, the
/// Fingerprint and TaskEvents streams, TaskConfigSchema and Capabilities.
pub async fn long_lived(launch: &Launch, msgpack_config: Vec<u8>, api_version: &str) -> Result<LiveDriver> {
    let process = PluginProcess::launch(launch).await?;
    let info = process.base().plugin_info(PluginInfoRequest {}).await?.into_inner();
    process
        .base()
        .set_config(SetConfigRequest {
            msgpack_config: msgpack_config.clone(),
            nomad_config: Some(NomadConfig {
                driver: Some(NomadDriverConfig {
                    client_max_port: CLIENT_MAX_PORT,
                    client_min_port: CLIENT_MIN_PORT,
                    topology: None,
                }),
            }),
            plugin_api_version: api_version.to_string(),
        })
        .await
        .context("SetConfig")?;
    match process.driver().init(InitRequest {}).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        Err(s) => bail!("Init failed: {s}"),
    }
    let fingerprint_opened = Instant::now();
    let fingerprints = Arc::new(Mutex::new(StreamLog::default()));
    let events = Arc::new(Mutex::new(StreamLog::default()));
    let fp_stream = process.driver().fingerprint(FingerprintRequest {}).await?.into_inner();
    let ev_stream = process.driver().task_events(TaskEventsRequest {}).await?.into_inner();
    let streams =
        vec![tokio::spawn(pump(fp_stream, fingerprints.clone())), tokio::spawn(pump(ev_stream, events.clone()))];
    let task_schema = process
        .driver()
        .task_config_schema(TaskConfigSchemaRequest {})
        .await?
        .into_inner()
        .spec
        .context("nil spec from TaskConfigSchema")?;
    let capabilities = process
        .driver()
        .capabilities(CapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities
        .context("nil capabilities")?;
    Ok(LiveDriver {
        process,
        info,
        task_schema,
        capabilities,
        msgpack_config,
        launch: launch.clone(),
        fingerprint_opened,
        fingerprints,
        events,
        streams,
    })
}

async fn finish(p: PluginProcess) -> Result<ProcessReport> {
    let stderr = p.stderr.clone();
    let extra = p.extra_stdout.clone();
    let handshake_after = p.handshake_after;
    let (exited_gracefully, _) = p.kill().await?;
    let stderr = stderr.lock().unwrap().clone();
    let extra_stdout = extra.lock().unwrap().clone();
    Ok(ProcessReport { handshake_after, exited_gracefully, stderr, extra_stdout })
}

async fn pump<T>(mut stream: tonic::Streaming<T>, log: Arc<Mutex<StreamLog<T>>>) {
    loop {
        match stream.message().await {
            Ok(Some(msg)) => log.lock().unwrap().items.push(Received { at: Instant::now(), msg }),
            Ok(None) => {
                log.lock().unwrap().ended = Some("EOF".into());
                return;
            }
            Err(e) => {
                log.lock().unwrap().ended = Some(e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_version_equality() {
        assert_eq!(parse_go_version("0.1.0"), parse_go_version("v0.1.0"));
        assert_eq!(parse_go_version("0.1"), parse_go_version("v0.1.0"));
        assert!(parse_go_version("banana").is_none());
        let mut info = PluginInfoResponse {
            r#type: PluginType::Driver as i32,
            plugin_api_versions: vec!["0.1.0".into()],
            plugin_version: "0.1.0".into(),
            name: "aimodel".into(),
        };
        assert!(check_plugin_info(&info).is_ok());
        info.plugin_api_versions = vec!["0.2.0".into()];
        assert!(check_plugin_info(&info).is_err());
        info.plugin_api_versions = vec!["0.1.0".into()];
        info.r#type = PluginType::Unknown as i32;
        assert!(check_plugin_info(&info).is_err());
    }
}
