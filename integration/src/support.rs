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
    let dir = profile_dir()?;
    let built = BUILT.get_or_init(|| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--workspace", "--bins", "--quiet"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        bail!("{e}");
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} was not built", p.display());
    }
    Ok(p)
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
