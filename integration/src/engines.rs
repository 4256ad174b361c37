//! Real engines for tests, the demo and benchmarks: the images scripts/images
//! builds once per machine (llama.cpp's `llama-server`, SGLang's router), the
//! tiny random-weight GGUF model, published on a local hub and prewarmed into
//! an HF cache by the real agent, and engine containers run by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::statichub::{describe, StaticHub};
use crate::support::binary;

/// scripts/images/versions.env: the versions the images are built from, and their tags.
pub const VERSIONS: &str = include_str!("../../scripts/images/versions.env");

fn scripts_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/images"))
}

/// A `KEY=value` of versions.env.
pub fn version(key: &str) -> Result<&'static str> {
    VERSIONS
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .with_context(|| format!("{key} is not in scripts/images/versions.env"))
}

/// An engine image built here (there is no registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineImage {
    /// llama.cpp's `llama-server` (CPU), entrypoint `llama-server`.
    LlamaServer,
    /// SGLang's router, entrypoint `python3 -m sglang_router.launch_router`.
    SglangRouter,
}

impl EngineImage {
    fn script(self) -> &'static str {
        match self {
            EngineImage::LlamaServer => "llama-server",
            EngineImage::SglangRouter => "sglang-router",
        }
    }

    /// The image tag (from versions.env).
    pub fn tag(self) -> Result<&'static str> {
        version(match self {
            EngineImage::LlamaServer => "LLAMA_SERVER_IMAGE",
            EngineImage::SglangRouter => "SGLANG_ROUTER_IMAGE",
        })
    }
}

/// The image's tag, built by its script once per process (a no-op when the tag
/// exists: the scripts cache everything per machine; scripts/test builds them first).
pub fn engine_image(which: EngineImage) -> Result<String> {
    static BUILT: [OnceLock<Result<String, String>>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = &BUILT[which as usize];
    let r = slot.get_or_init(|| run_script(which.script(), &[]).map_err(|e| format!("{e:#}")));
    match r {
        Ok(tag) => Ok(tag.clone()),
        Err(e) => bail!("{e}"),
    }
}

/// Runs scripts/images/<name>; returns the last line of its stdout.
fn run_script(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(scripts_dir().join(name))
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running scripts/images/{name}"))?;
    if !out.status.success() {
        bail!("scripts/images/{name} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string())
}

/// The tiny model's repo id on the local hub.
pub const TINY_REPO: &str = "aimodel/tiny-llama-GGUF";
/// Its GGUF files and their weight types; the first is the one served by default.
pub const TINY_GGUF_FILES: [(&str, &str); 2] = [("tiny-llama-F16.gguf", "f16"), ("tiny-llama-Q8_0.gguf", "q8_0")];
/// The seed of its random weights.
pub const TINY_SEED: u64 = 17;

/// Writes the tiny llama model as GGUF (scripts/images/tiny-gguf: random
/// weights from `seed`, the vocabulary of llama.cpp's ggml-vocab-llama-spm.gguf).
pub fn write_tiny_gguf(out: &Path, seed: u64, weight_type: &str) -> Result<()> {
    let out_s = out.to_str().context("non-UTF-8 path")?;
    run_script("tiny-gguf", &[out_s, "--seed", &seed.to_string(), "--type", weight_type])?;
    Ok(())
}

/// A random-weight llama GGUF of another shape (`extra`: `--embd N --layers N
/// --ff N`), e.g. the ~1 GB model of the cold-start bench.
pub fn write_gguf(out: &Path, seed: &str, weight_type: &str, extra: &[&str]) -> Result<()> {
    let out_s = out.to_str().context("non-UTF-8 path")?;
    run_script("tiny-gguf", &[&[out_s, "--seed", seed, "--type", weight_type][..], extra].concat())?;
    Ok(())
}

/// The tiny model repo's files, written into `dir`: every GGUF of
/// [`TINY_GGUF_FILES`] and a README; (path in the repo, file on disk).
pub fn write_tiny_repo(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for (name, weight_type) in TINY_GGUF_FILES {
        let p = dir.join(name);
        write_tiny_gguf(&p, TINY_SEED, weight_type)?;
        files.push((name.to_string(), p));
    }
    let readme = dir.join("README.md");
    std::fs::write(&readme, "# tiny-llama-GGUF\n\nRandom weights, llama.cpp's llama-spm vocabulary. For tests.\n")?;
    files.push(("README.md".to_string(), readme));
    Ok(files)
}

/// A model as it sits in an HF cache after prewarm.
#[derive(Debug, Clone)]
pub struct CachedModel {
    pub repo: String,
    pub commit: String,
}

impl CachedModel {
    /// `models--org--name/snapshots/<commit>/<file>`, relative to the hub cache
    /// (`HF_HOME/hub`): the same below the host path and the container's mount.
    pub fn snapshot_file(&self, file: &str) -> String {
        format!("models--{}/snapshots/{}/{file}", self.repo.replace('/', "--"), self.commit)
    }
}

/// Serves `files` as one commit on a local hub (ours: any repo name answers),
/// GGUF files as LFS; the commit is derived from the files' hashes.
pub async fn serve_repo(files: &[(String, PathBuf)]) -> Result<StaticHub> {
    let described = describe(files, 1 << 20)?;
    let mut h = Sha256::new();
    for f in &described {
        h.update(f.path.as_bytes());
        h.update(f.etag.as_bytes());
    }
    let commit = format!("{:x}", h.finalize())[..40].to_string();
    Ok(StaticHub::start("127.0.0.1:0", &commit, described).await?)
}

/// `aimodel-agent --hf-home <hf_home> prewarm <repo>` from `endpoint`; the
/// commit `refs/main` names afterwards.
pub async fn prewarm(hf_home: &Path, endpoint: &str, repo: &str) -> Result<CachedModel> {
    let out = tokio::process::Command::new(binary("aimodel-agent")?)
        .arg("--hf-home")
        .arg(hf_home)
        .args(["prewarm", repo])
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .await?;
    if !out.status.success() {
        bail!("aimodel-agent prewarm {repo} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let refs = hf_home.join("hub").join(format!("models--{}", repo.replace('/', "--"))).join("refs/main");
    let commit = std::fs::read_to_string(&refs).with_context(|| format!("reading {}", refs.display()))?;
    Ok(CachedModel { repo: repo.to_string(), commit })
}

/// The tiny GGUF model published on a local hub and prewarmed by the agent into
/// the HF cache at `hf_home` (`hf_home/hub/models--aimodel--tiny-llama-GGUF`).
pub async fn prewarm_tiny_model(hf_home: &Path) -> Result<CachedModel> {
    let src = tempfile::tempdir()?;
    let files = write_tiny_repo(src.path())?;
    let hub = serve_repo(&files).await?;
    let model = prewarm(hf_home, &hub.endpoint(), TINY_REPO).await?;
    if model.commit != hub.commit {
        bail!("prewarmed {} but the hub serves {}", model.commit, hub.commit);
    }
    Ok(model)
}

/// Where the cache is mounted in engine containers (the driver's default `HF_HOME`).
pub const CONTAINER_HF_HOME: &str = "/root/.cache/huggingface";

/// llama-server's arguments for a GGUF file at `model_path` (in the container),
/// listening on `port`: small context, one slot, two threads, no web UI.
pub fn llama_server_args(model_path: &str, port: u16) -> Vec<String> {
    let p = port.to_string();
    let mut args: Vec<String> =
        ["-m", model_path, "--host", "0.0.0.0", "--port", &p, "-ngl", "0"].iter().map(|s| s.to_string()).collect();
    args.extend(LLAMA_TASK_ARGS.iter().map(|s| s.to_string()));
    args
}

/// What follows the `llamacpp` engine's own command line (`-m … --host … --port … -ngl 0`)
/// in tests, the demo and the bench: small context, one slot, two threads, no web UI.
pub const LLAMA_TASK_ARGS: [&str; 7] = ["-c", "512", "-np", "1", "-t", "2", "--no-webui"];

/// The plugin, started through the simulator's sequence as a Nomad client
/// would, with its HF cache at `hf_home` and `images.llamacpp = image`.
pub async fn start_plugin_for_llama(hf_home: &Path, image: &str, tmp: &Path) -> Result<crate::sequence::LiveDriver> {
    let hcl = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    hf_cache {{ host_path = \"{}\" }}\n    images {{ llamacpp = \"{image}\" }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
        hf_home.display()
    );
    let tmp = tmp.to_str().context("non-UTF-8 path")?;
    Ok(crate::sequence::start(&binary(crate::support::DRIVER_BIN)?, &hcl, &[("TMPDIR", tmp)]).await?.live)
}

/// A `llamacpp` task on the tiny model serving `gguf_file` (a name or a
/// pattern) on 127.0.0.1:`port`, with [`LLAMA_TASK_ARGS`].
pub fn llamacpp_task(name: &str, gguf_file: &str, port: u16) -> crate::task::TaskBuilder {
    let args: Vec<String> = LLAMA_TASK_ARGS.iter().map(|a| format!("{a:?}")).collect();
    let cfg = format!(
        "engine = \"llamacpp\"\nmodel = \"{TINY_REPO}\"\ngguf_file = \"{gguf_file}\"\nport = \"http\"\nargs = [{}]\nreadiness {{\n  interval = \"100ms\"\n}}\n",
        args.join(", ")
    );
    crate::task::TaskBuilder::new(name, &cfg).port("http", port, 8080)
}

/// StartTask of a `llamacpp` task through `live` (the plugin of
/// [`start_plugin_for_llama`]), then the same requests as
/// [`time_docker_run_to_first_token`]: the bench's driver half. The task is
/// destroyed after; `FirstToken::docker_run` is when StartTask returned.
pub async fn time_start_task_to_first_token(
    live: &crate::sequence::LiveDriver,
    data_dir: &Path,
    gguf_file: &str,
) -> Result<FirstToken> {
    use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};
    let port = crate::task::free_port();
    let t = llamacpp_task("llm", gguf_file, port).build(&live.task_schema, data_dir)?;
    let started = Instant::now();
    live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await?;
    let docker_run = started.elapsed();
    let timed = async {
        crate::openai::wait_ok(port, "/health", Duration::from_secs(120)).await?;
        let healthy = started.elapsed();
        let (text, _) = crate::openai::first_streamed_token(port, "Say hello.").await?;
        Ok::<_, anyhow::Error>(FirstToken { docker_run, healthy, first_token: started.elapsed(), text })
    }
    .await;
    let destroy = DestroyTaskRequest { task_id: t.config.id.clone(), force: true };
    live.process.driver().destroy_task(destroy).await?;
    timed
}

/// Label of the containers started here (removed on drop; scripts/test checks none is left).
pub const TEST_LABEL: &str = "com.aimodel.test";

/// A container started with `docker run -d`, force-removed on drop.
#[derive(Debug)]
pub struct Container {
    pub name: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.name]).output();
    }
}

impl Container {
    /// `docker run -d` of `image` with `args`; `docker_opts` go before the image.
    pub fn run(image: &str, docker_opts: &[String], args: &[String]) -> Result<Container> {
        let name = format!("aimodel-engine-{}", crate::task::random_hex(6));
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &name, "--label", &format!("{TEST_LABEL}=engines")])
            .args(docker_opts)
            .arg(image)
            .args(args)
            .output()?;
        let c = Container { name };
        if !out.status.success() {
            bail!("docker run {image} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(c)
    }

    /// The container's address on Docker's bridge network.
    pub fn ip(&self) -> Result<String> {
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &self.name])
            .output()?;
        let ip = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if ip.is_empty() {
            bail!("{} has no address", self.name);
        }
        Ok(ip)
    }

    /// stdout and stderr so far.
    pub fn logs(&self) -> String {
        Command::new("docker")
            .args(["logs", &self.name])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }
}

/// `docker run` of the llama-server image on a GGUF file of the cache at
/// `hf_home` (mounted read-only at [`CONTAINER_HF_HOME`]), published on
/// 127.0.0.1:`host_port`; the path is relative to the hub cache. `extra`
/// arguments follow [`llama_server_args`].
pub fn run_llama_server(
    image: &str,
    hf_home: &Path,
    snapshot_file: &str,
    host_port: u16,
    extra: &[&str],
) -> Result<Container> {
    let inside = 8080;
    let opts = vec![
        "-p".to_string(),
        format!("127.0.0.1:{host_port}:{inside}"),
        "-v".to_string(),
        format!("{}:{CONTAINER_HF_HOME}:ro", hf_home.display()),
    ];
    let model = format!("{CONTAINER_HF_HOME}/hub/{snapshot_file}");
    let mut args = llama_server_args(&model, inside);
    args.extend(extra.iter().map(|a| a.to_string()));
    Container::run(image, &opts, &args)
}

/// The phases of one `docker run` of llama-server up to its first token, each
/// measured from just before `docker run`.
#[derive(Debug, Clone)]
pub struct FirstToken {
    /// `docker run -d` returned (the container is started).
    pub docker_run: Duration,
    /// `/health` answered 200 (the model is loaded).
    pub healthy: Duration,
    /// The first streamed token of a chat completion arrived.
    pub first_token: Duration,
    pub text: String,
}

/// `docker run` of the llama-server image on a GGUF file of the cache (the
/// path relative to the hub cache), then a streamed chat request as soon as
/// `/health` answers: the benchmark's by-hand half. The container is removed after.
pub async fn time_docker_run_to_first_token(image: &str, hf_home: &Path, snapshot_file: &str) -> Result<FirstToken> {
    let port = crate::task::free_port();
    let started = Instant::now();
    let server = run_llama_server(image, hf_home, snapshot_file, port, &[])?;
    let docker_run = started.elapsed();
    if let Err(e) = crate::openai::wait_ok(port, "/health", Duration::from_secs(120)).await {
        bail!("{e}\n{}", server.logs());
    }
    let healthy = started.elapsed();
    let (text, _) = crate::openai::first_streamed_token(port, "Say hello.").await?;
    let first_token = started.elapsed();
    Ok(FirstToken { docker_run, healthy, first_token, text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_name_the_image_tags() {
        let llama = version("LLAMA_CPP_PYTHON_VERSION").unwrap();
        assert!(EngineImage::LlamaServer.tag().unwrap().contains(&format!(":{llama}")));
        let router = version("SGLANG_ROUTER_VERSION").unwrap();
        assert!(EngineImage::SglangRouter.tag().unwrap().contains(&format!(":{router}")));
        assert!(version("NOPE").is_err());
    }

    #[test]
    fn snapshot_paths_follow_the_hub_layout() {
        let m = CachedModel { repo: "org/name".into(), commit: "c".repeat(40) };
        assert_eq!(m.snapshot_file("a.gguf"), format!("models--org--name/snapshots/{}/a.gguf", "c".repeat(40)));
        let args = llama_server_args("/m.gguf", 8080);
        assert_eq!(&args[..6], ["-m", "/m.gguf", "--host", "0.0.0.0", "--port", "8080"]);
    }
}
