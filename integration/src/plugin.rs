//! Launching a plugin binary the way Nomad's go-plugin client does, and talking
//! to it over the socket it announces (nomad-wire.md §1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStderr, Command};
use tonic::transport::{Channel, Endpoint};

use aimodel_proto::base::base_plugin_client::BasePluginClient;
use aimodel_proto::drivers::driver_client::DriverClient;
use aimodel_proto::goplugin::grpc_controller_client::GrpcControllerClient;

/// Nomad's magic cookie, as go-plugin's client sets it.
pub const COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
/// The cookie value.
pub const COOKIE_VALUE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// go-plugin's client waits this long for the handshake line.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After GRPCController.Shutdown the host waits this long before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// A parsed go-plugin handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub core_version: u32,
    pub app_version: u32,
    pub network: String,
    pub address: String,
    pub protocol: String,
}

/// Parses a handshake line with go-plugin's client rules (`client.go`).
pub fn parse_handshake(line: &str) -> Result<Handshake> {
    let parts: Vec<&str> = line.trim().split('|').collect();
    if parts.len() < 4 {
        bail!("Unrecognized remote plugin message: {line:?}");
    }
    let core_version: u32 = parts[0].parse().context("core protocol version")?;
    if core_version != 1 {
        bail!("incompatible core API version with plugin: {core_version}");
    }
    let app_version: u32 = parts[1].parse().context("app protocol version")?;
    let network = parts[2].to_string();
    if network != "unix" && network != "tcp" {
        bail!("unknown address type: {network}");
    }
    let protocol = parts.get(4).map_or("netrpc", |p| *p).to_string();
    if protocol != "grpc" {
        bail!("plugin speaks {protocol}, Nomad only allows grpc");
    }
    Ok(Handshake { core_version, app_version, network, address: parts[3].to_string(), protocol })
}

/// How to launch a plugin.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Environment added on top of the inherited one; `None` removes a variable.
    pub env: Vec<(String, Option<String>)>,
}

impl Launch {
    /// Nomad's launch of `binary`: inherited env plus go-plugin's variables.
    pub fn nomad(binary: &Path) -> Self {
        let env = [
            (COOKIE_KEY, COOKIE_VALUE),
            ("PLUGIN_MIN_PORT", "10000"),
            ("PLUGIN_MAX_PORT", "25000"),
            ("PLUGIN_PROTOCOL_VERSIONS", "2"),
        ];
        Launch {
            binary: binary.to_path_buf(),
            args: Vec::new(),
            env: env.iter().map(|(k, v)| ((*k).to_string(), Some((*v).to_string()))).collect(),
        }
    }

    /// Sets (or with `None` removes) one environment variable.
    pub fn env(mut self, key: &str, value: Option<&str>) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.map(str::to_string)));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // The host's own go-plugin variables never leak into the child.
        for k in [COOKIE_KEY, "PLUGIN_PROTOCOL_VERSIONS", "PLUGIN_UNIX_SOCKET_DIR"] {
            cmd.env_remove(k);
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.kill_on_drop(true);
        cmd
    }
}

/// A running plugin process, its handshake, its captured output and a channel.
#[derive(Debug)]
pub struct PluginProcess {
    pub child: Child,
    pub handshake: Handshake,
    pub handshake_line: String,
    /// Time from spawn to the handshake line.
    pub handshake_after: Duration,
    /// stderr lines, in order.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// stdout lines after the handshake (there must be none).
    pub extra_stdout: Arc<Mutex<Vec<String>>>,
    pub channel: Channel,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
}

/// Result of running a binary that is expected to refuse to start.
#[derive(Debug)]
pub struct Refusal {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PluginProcess {
    /// Spawns the plugin, reads its handshake (within [`START_TIMEOUT`]) and connects.
    pub async fn launch(launch: &Launch) -> Result<Self> {
        let started = Instant::now();
        let mut child = launch.command().spawn().with_context(|| format!("spawning {}", launch.binary.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr_pipe = child.stderr.take().context("no stderr")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_task = Some(tokio::spawn(collect_stderr(stderr_pipe, stderr.clone())));

        let mut lines = BufReader::new(stdout).lines();
        let first = match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Err(_) => bail!("timeout while waiting for plugin to start"),
            Ok(Err(e)) => bail!("reading the plugin's stdout: {e}"),
            Ok(Ok(None)) => {
                let status = child.wait().await?;
                bail!("plugin exited before we could connect ({status}); stderr: {:?}", stderr.lock().unwrap())
            }
            Ok(Ok(Some(l))) => l,
        };
        let handshake_after = started.elapsed();
        let handshake = parse_handshake(&first)?;
        // Like go-plugin, keep draining stdout; we record what arrives so tests can
        // assert that nothing does.
        let extra_stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = extra_stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        let channel = connect(&handshake).await?;
        Ok(PluginProcess {
            child,
            handshake,
            handshake_line: first,
            handshake_after,
            stderr,
            extra_stdout,
            channel,
            stderr_task,
        })
    }

    /// Runs the binary and expects it to exit without a handshake.
    pub async fn refuse(launch: &Launch) -> Result<Refusal> {
        let out = tokio::time::timeout(Duration::from_secs(10), launch.command().output()).await??;
        Ok(Refusal {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        })
    }

    /// The BasePlugin client.
    pub fn base(&self) -> BasePluginClient<Channel> {
        BasePluginClient::new(self.channel.clone()).max_decoding_message_size(i32::MAX as usize)
    }

    /// The Driver client.
    pub fn driver(&self) -> DriverClient<Channel> {
        DriverClient::new(self.channel.clone()).max_decoding_message_size(i32::MAX as usize)
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0))
    }

    /// The socket path from the handshake.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(&self.handshake.address)
    }

    /// Sends a signal to the plugin process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid(), sig).context("signalling the plugin")
    }

    /// Stops reading stderr and closes our end of the pipe, as a dead Nomad would.
    pub fn close_stderr(&mut self) {
        if let Some(t) = self.stderr_task.take() {
            t.abort();
        }
    }

    /// go-plugin's `Client.Kill()`: GRPCController.Shutdown, wait up to 2 s,
    /// then SIGKILL. Returns whether the process left on its own, and how long it took.
    pub async fn kill(mut self) -> Result<(bool, Duration)> {
        let started = Instant::now();
        let asked = GrpcControllerClient::new(self.channel.clone()).shutdown(aimodel_proto::goplugin::Empty {}).await;
        if asked.is_ok() {
            if let Ok(status) = tokio::time::timeout(KILL_GRACE, self.child.wait()).await {
                status?;
                return Ok((true, started.elapsed()));
            }
        }
        self.child.kill().await?;
        Ok((false, started.elapsed()))
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(within, self.child.wait()).await.context("plugin did not exit in time")??)
    }

    /// Resident set size of the plugin process in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

async fn collect_stderr(pipe: ChildStderr, sink: Arc<Mutex<Vec<String>>>) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        sink.lock().unwrap().push(l);
    }
}

/// Connects like go-plugin: authority "unused", a context dialer to the socket.
pub async fn connect(h: &Handshake) -> Result<Channel> {
    if h.network != "unix" {
        bail!("only unix sockets are used on Linux, got {}", h.network);
    }
    let path = PathBuf::from(&h.address);
    let channel = Endpoint::from_static("http://unused")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .context("connecting to the plugin socket")?;
    Ok(channel)
}

/// Checks one stderr line the way go-plugin's host parses it (`log_entry.go`):
/// a JSON object with string `@level` and `@message`, and `@timestamp` in the
/// layout `2006-01-02T15:04:05.000000Z07:00`.
pub fn check_hclog_line(line: &str) -> Result<HashMap<String, serde_json::Value>> {
    let v: HashMap<String, serde_json::Value> =
        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    for key in ["@level", "@message", "@timestamp"] {
        if !v.get(key).is_some_and(serde_json::Value::is_string) {
            bail!("{key} is missing or not a string in {line}");
        }
    }
    let level = v["@level"].as_str().unwrap_or_default();
    if !["trace", "debug", "info", "warn", "error"].contains(&level) {
        bail!("unknown level {level:?}");
    }
    let ts = v["@timestamp"].as_str().unwrap_or_default();
    if !valid_timestamp(ts) {
        bail!("timestamp {ts:?} is not in the layout 2006-01-02T15:04:05.000000Z07:00");
    }
    Ok(v)
}

fn valid_timestamp(ts: &str) -> bool {
    let b = ts.as_bytes();
    if b.len() < 27 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let zone = &ts[26..];
    digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..26)
        && (zone == "Z"
            || (zone.len() == 6 && (zone.starts_with('+') || zone.starts_with('-')) && zone.as_bytes()[3] == b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_rules() {
        let h = parse_handshake("1|2|unix|/tmp/plugin123|grpc|\n").unwrap();
        assert_eq!(h.address, "/tmp/plugin123");
        assert!(parse_handshake("1|2|unix|/tmp/p|grpc").is_ok());
        assert!(parse_handshake("1|2|unix").is_err());
        assert!(parse_handshake("1|2|unix|/tmp/p").is_err(), "netrpc is refused");
        assert!(parse_handshake("2|2|unix|/tmp/p|grpc").is_err());
        assert!(parse_handshake("1|2|udp|/tmp/p|grpc").is_err());
    }

    #[test]
    fn timestamp_layout() {
        assert!(valid_timestamp("2026-01-02T03:04:05.123456Z"));
        assert!(valid_timestamp("2026-01-02T03:04:05.123456+02:00"));
        assert!(!valid_timestamp("2026-01-02T03:04:05.123Z"));
        assert!(!valid_timestamp("2026-01-02T03:04:05.1234567Z"));
    }
}
