//! Locating (and if needed building) the workspace binaries for tests.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// The driver binary's file name; Nomad matches `plugin "<name>"` on it.
pub const DRIVER_BIN: &str = "nomad-driver-aimodel";

/// The target profile directory of the running executable (`target/debug`).
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("executable has no directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, built once per process with the same command
/// `.ci/run` uses (`cargo build --workspace --bins`), so it is a no-op there.
/// `AIMODEL_BIN_DIR` points elsewhere (e.g. a release build for benchmarks).
pub fn binary(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("AIMODEL_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if !p.exists() {
            bail!("{} does not exist (AIMODEL_BIN_DIR)", p.display());
        }
        return Ok(p);
    }
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = cargo_build_once(&BUILT, &["--workspace", "--bins"])?;
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} was not built", p.display());
    }
    Ok(p)
}

/// Runs `cargo build --quiet <args>` (with `--release` when running from a
/// release build) once per process and `slot`; returns the profile directory.
fn cargo_build_once(slot: &'static OnceLock<Result<(), String>>, args: &[&str]) -> Result<PathBuf> {
    let dir = profile_dir()?;
    let built = slot.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet"]).args(args);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        match cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build {args:?} failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    Ok(dir)
}

/// Whether the Docker engine answers on its default socket. With `CI=true` an
/// unreachable engine is a failure, never a skip.
pub fn require_docker() -> bool {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    let ok = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Docker is unreachable at {socket} and CI=true: Docker tests must not be skipped");
        }
        eprintln!("SKIP: Docker is unreachable at {socket} (set CI=true to make this a failure)");
    }
    ok
}

/// Tag of the local stand-in image (no registry: built here, removed by scripts/test).
/// The demo builds its own tag (`AIMODEL_STANDIN_TAG`) so it never removes the tests' image.
pub const STANDIN_IMAGE: &str = "aimodel-standin:test";

fn standin_tag() -> String {
    std::env::var("AIMODEL_STANDIN_TAG").unwrap_or_else(|_| STANDIN_IMAGE.to_string())
}

/// Builds the stand-in image once per process (static binary + busybox,
/// `FROM scratch`); a no-op when the tag exists.
pub fn standin_image() -> Result<String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| build_standin().map_err(|e| format!("{e:#}")));
    if let Err(e) = r {
        bail!("{e}");
    }
    Ok(standin_tag())
}

fn build_standin() -> Result<()> {
    let tag = standin_tag();
    let exists = Command::new("docker").args(["image", "inspect", &tag]).output()?;
    if exists.status.success() && std::env::var_os("AIMODEL_REBUILD_STANDIN").is_none() {
        return Ok(());
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let target = "x86_64-unknown-linux-gnu";
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--release", "-p", "aimodel-standin", "--target", target])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(&root)
        .status()?;
    if !status.success() {
        bail!("building the static stand-in failed");
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].iter().map(PathBuf::from).find(|p| p.exists());
    let busybox = busybox.context("busybox not found: install Debian's busybox-static (scripts/test does)")?;
    let ctx = tempfile::tempdir()?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    std::fs::copy(target_dir.join(format!("{target}/release/aimodel-standin")), ctx.path().join("standin"))?;
    std::fs::copy(&busybox, ctx.path().join("busybox"))?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         COPY standin /bin/standin\n\
         RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/usr/bin\", \"/tmp\"]\n\
         RUN [\"/bin/busybox\", \"ln\", \"-s\", \"/bin/standin\", \"/usr/bin/python3\"]\n\
         RUN [\"/bin/busybox\", \"ln\", \"-s\", \"/bin/standin\", \"/usr/bin/ray\"]\n\
         LABEL com.aimodel.test=standin\n\
         ENTRYPOINT [\"/bin/standin\"]\n",
    )?;
    let out = Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()?;
    if !out.status.success() {
        bail!("docker build of the stand-in failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Ids of containers carrying `label=value` (for leak checks and clean-up).
pub fn containers_with_label(label: &str, value: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label={label}={value}")])
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

/// Force-removes containers carrying `label=value`.
pub fn remove_containers_with_label(label: &str, value: &str) {
    let ids = containers_with_label(label, value);
    if !ids.is_empty() {
        let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
    }
}

/// The body of `GET path` on 127.0.0.1:`port`; empty when nothing answers
/// (for polling a server that is still starting).
pub async fn http_body(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return String::new() };
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// A Python with huggingface_hub installed: `AIMODEL_PYTHON`, else the venv
/// scripts/test creates at `target/pyenv`. With `CI=true` its absence fails.
pub fn hf_python() -> Option<PathBuf> {
    let candidate = std::env::var_os("AIMODEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/pyenv/bin/python")));
    let ok = Command::new(&candidate).args(["-c", "import huggingface_hub"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(candidate);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("no Python with huggingface_hub at {} and CI=true (scripts/test creates it)", candidate.display());
    }
    eprintln!("SKIP: no Python with huggingface_hub at {} (run scripts/test once)", candidate.display());
    None
}

/// Runs a Python snippet with arguments; returns stdout, failing on a non-zero exit.
pub fn run_python(python: &std::path::Path, code: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(python).arg("-c").arg(code).args(args).env("HF_HUB_OFFLINE", "1").output()?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The fake `libnvidia-ml.so` (built once per process; `cargo build -p fake-nvml`).
pub fn fake_nvml() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = cargo_build_once(&BUILT, &["-p", "fake-nvml"])?;
    Ok(dir.join("libnvidia_ml.so"))
}

/// The stdout of an agent command that must have succeeded; on failure the
/// assertion shows both streams.
pub fn agent_ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "agent failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The agent's `/status` document on `port` (`null` while it does not answer).
pub async fn agent_status(port: u16) -> serde_json::Value {
    serde_json::from_str(&http_body(port, "/status").await).unwrap_or_default()
}

/// Polls the agent's `/status` until `pred` holds; fails naming `what` and the last document.
pub async fn wait_agent_status(
    port: u16,
    within: std::time::Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let st = agent_status(port).await;
        if pred(&st) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} within {within:?}; /status: {st:#}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
