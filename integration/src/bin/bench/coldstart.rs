//! The cold-start bench (issue 15): a llama-server image of a few hundred MB in
//! a local registry (with credentials), a ~1 GB GGUF model on a local hub, a
//! job registered with a stand-in Nomad API, and a cold node (image not in
//! Docker, model not in the cache). Scenarios, side by side in one run:
//! (a) no agent: StartTask pulls the image and fetches the model itself (`prewarm = true`);
//! (b) the agent prewarms the model only;
//! (c) the agent prewarms the model and pulls the image;
//! (d) a second node on the same shared cache, with the agent (image only).
//! In (b)–(d) the node stays idle after registration until the agent is done,
//! then the task is placed (StartTask). Phases come from the driver's events
//! and the agent's `/status`; "load alone" is `docker run` of the same image
//! and arguments with everything local, to `/health`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use aimodel_integration::engines::{engine_image, serve_repo, EngineImage, LLAMA_TASK_ARGS};
use aimodel_integration::imagereg::{image_present, AuthRegistry, USER};
use aimodel_integration::nomadapi::NomadApi;
use aimodel_integration::sequence::{self, LiveDriver};
use aimodel_integration::support::{agent_status, binary, DRIVER_BIN};
use aimodel_integration::task::{free_port, TaskBuilder};
use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};

const REPO: &str = "aimodel/cold-llama-GGUF";
const FILE: &str = "cold-llama-F16.gguf";

/// What one scenario measured (seconds; `None`: the phase did not happen).
#[derive(Debug, Default)]
struct Phases {
    pull: Option<f64>,
    download: Option<f64>,
    /// StartTask returned → `/health` answers 200.
    load: f64,
    /// StartTask called → `/health` 200: what Nomad sees once it places the task.
    cold_start: f64,
    /// Registration → `/health` 200 (with an idle wait in between for b–d).
    from_registration: f64,
}

struct Setup {
    reg: AuthRegistry,
    image: String,
    hub_endpoint: String,
    _hub: aimodel_integration::statichub::StaticHub,
    model_bytes: u64,
}

fn docker(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!("docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The node forgets the image (and the agent's holder of it).
fn cold_image(image: &str) -> Result<()> {
    let held = docker(&["ps", "-aq", "--filter", &format!("label=com.aimodel.hold.ref={image}")])?;
    for id in held.split_whitespace() {
        docker(&["rm", "-f", id])?;
    }
    if image_present(image) {
        docker(&["rmi", "-f", image])?;
    }
    Ok(())
}

async fn setup(image_mib: usize, dir: &Path) -> Result<Setup> {
    let reg = AuthRegistry::start().await.context("no docker-registry (apt-get install docker-registry)")?;
    let base = engine_image(EngineImage::LlamaServer)?;
    eprintln!("== image: {base} plus a {image_mib} MiB layer of its own, pushed to {}", reg.host());
    let image = reg.push_image_with("aimodel/cold-llama-server", &base, image_mib << 20);
    eprintln!("== model: a ~1 GB random llama GGUF (f16, embd 1536, 16 layers)");
    let gguf = dir.join(FILE);
    let seed = "5";
    aimodel_integration::engines::write_gguf(
        &gguf,
        seed,
        "f16",
        &["--embd", "1536", "--layers", "16", "--ff", "4096"],
    )?;
    let model_bytes = std::fs::metadata(&gguf)?.len();
    let hub = serve_repo(&[(FILE.to_string(), gguf)]).await?;
    Ok(Setup { reg, image, hub_endpoint: hub.endpoint(), _hub: hub, model_bytes })
}

async fn plugin(s: &Setup, hf_home: &Path, tmp: &Path) -> Result<LiveDriver> {
    let hcl = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    fingerprint_period = \"1s\"\n    hf_cache {{\n      host_path = \"{}\"\n      min_free = \"1MB\"\n    }}\n    images {{ llamacpp = \"{}\" }}\n    gpu {{ enabled = false }}\n    auth {{\n      server_address = \"{}\"\n      username = \"{USER}\"\n      password = \"{}\"\n    }}\n  }}\n}}\n",
        hf_home.display(),
        s.image,
        s.reg.host(),
        s.reg.password
    );
    let env = [("TMPDIR", tmp.to_str().unwrap_or("/tmp")), ("HF_ENDPOINT", s.hub_endpoint.as_str())];
    Ok(sequence::start(&binary(DRIVER_BIN)?, &hcl, &env).await?.live)
}

fn task(port: u16, prewarm: bool) -> TaskBuilder {
    let args: Vec<String> = LLAMA_TASK_ARGS.iter().map(|a| format!("{a:?}")).collect();
    let cfg = format!(
        "engine = \"llamacpp\"\nmodel = \"{REPO}\"\ngguf_file = \"{FILE}\"\nport = \"http\"\nprewarm = {prewarm}\nargs = [{}]\nreadiness {{\n  interval = \"100ms\"\n}}\n",
        args.join(", ")
    );
    TaskBuilder::new("llm", &cfg).port("http", port, 8080)
}

fn job(image: &str) -> serde_json::Value {
    serde_json::json!({
        "ID": "cold", "Name": "cold", "Type": "service", "Datacenters": ["dc1"],
        "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "llm", "Driver": "aimodel",
            "Config": {"engine": "llamacpp", "model": REPO, "gguf_file": FILE, "image": image}}]}]
    })
}

/// When the first event of `task` containing `needle` arrived.
fn event_at(live: &LiveDriver, task: &str, needle: &str) -> Option<Instant> {
    live.events
        .lock()
        .ok()?
        .items
        .iter()
        .find(|e| e.msg.task_id == task && e.msg.message.contains(needle))
        .map(|e| e.at)
}

/// StartTask of the llama task, then `/health`; the task is destroyed after.
async fn place(live: &LiveDriver, data: &Path, prewarm: bool, registered: Instant) -> Result<Phases> {
    let port = free_port();
    let t = task(port, prewarm).build(&live.task_schema, data)?;
    let id = t.config.id.clone();
    let called = Instant::now();
    live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await?;
    let returned = Instant::now();
    let ok = aimodel_integration::openai::wait_ok(port, "/health", Duration::from_secs(600)).await;
    let ready = Instant::now();
    let span = |a: &str, b: &str| match (event_at(live, &id, a), event_at(live, &id, b)) {
        (Some(x), Some(y)) => Some(y.duration_since(x).as_secs_f64()),
        _ => None,
    };
    let phases = Phases {
        pull: span("Downloading image", "Downloaded image"),
        download: span("prewarm = true: fetching", ": prewarmed,"),
        load: ready.duration_since(returned).as_secs_f64(),
        cold_start: ready.duration_since(called).as_secs_f64(),
        from_registration: ready.duration_since(registered).as_secs_f64(),
    };
    live.process.driver().destroy_task(DestroyTaskRequest { task_id: id, force: true }).await?;
    ok?;
    Ok(phases)
}

/// An agent daemon on `hf_home` watching `nomad`, with or without pull-ahead.
fn agent(s: &Setup, hf_home: &Path, nomad: &NomadApi, images: bool, port: u16) -> Result<tokio::process::Child> {
    let mut cfg = format!(
        "hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninterval = \"1h\"\nnomad {{\n  address = \"{}\"\n  wait = \"5s\"\n}}\n",
        hf_home.display(),
        nomad.address()
    );
    if images {
        cfg.push_str(&format!(
            "images {{\n  min_free = \"1MB\"\n  data_root = \"{}\"\n  check_every = \"1s\"\n  auth {{\n    server_address = \"{}\"\n    username = \"{USER}\"\n    password = \"{}\"\n  }}\n}}\n",
            hf_home.display(),
            s.reg.host(),
            s.reg.password
        ));
    }
    let path = hf_home.join(format!("agent-{port}.hcl"));
    std::fs::write(&path, cfg)?;
    Ok(tokio::process::Command::new(binary("aimodel-agent")?)
        .args(["run", "--config"])
        .arg(&path)
        .env("HF_ENDPOINT", &s.hub_endpoint)
        .env("AIMODEL_NODE_ID", "node-1")
        .env_remove("HF_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

/// Waits until the agent on `port` has the model warm (and the image present
/// when `image` is given); returns (model warm at, image present at).
async fn agent_done(port: u16, image: Option<&str>) -> Result<(Instant, Option<Instant>)> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    let key = image.map(aimodel_driver::runtime::registry::canonical);
    let (mut warm, mut pulled) = (None, None);
    loop {
        let st = agent_status(port).await;
        let model_warm =
            st["models"].as_array().is_some_and(|m| m.iter().any(|m| m["repo"] == REPO && m["state"] == "warm"));
        if model_warm && warm.is_none() {
            warm = Some(Instant::now());
        }
        if let Some(k) = &key {
            if st["images"]["images"][k]["state"] == "present" && pulled.is_none() {
                pulled = Some(Instant::now());
            }
        }
        if let Some(w) = warm {
            if key.is_none() || pulled.is_some() {
                return Ok((w, pulled));
            }
        }
        if Instant::now() > deadline {
            bail!("the agent did not finish: {st:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One scenario with the agent: register, let the agent work on an idle node, then place.
async fn with_agent(s: &Setup, hf_home: &Path, images: bool) -> Result<Phases> {
    let (tmp, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let live = plugin(s, hf_home, tmp.path()).await?;
    live.fingerprint_where(Duration::from_secs(10), |f| f.attributes.contains_key("driver.aimodel.image.llamacpp"))
        .await?;
    let nomad = NomadApi::start().await?;
    nomad.set_node(live.node_json("node-1", "dc1"));
    let port = free_port();
    let mut child = agent(s, hf_home, &nomad, images, port)?;
    aimodel_integration::openai::wait_ok(port, "/health", Duration::from_secs(30)).await?;
    let registered = Instant::now();
    nomad.register("default", job(&s.image));
    let (warm, pulled) = agent_done(port, images.then_some(s.image.as_str())).await?;
    let mut p = place(&live, data.path(), false, registered).await?;
    p.download = Some(warm.duration_since(registered).as_secs_f64());
    if let Some(at) = pulled {
        p.pull = Some(at.duration_since(registered).as_secs_f64());
    }
    let _ = child.kill().await;
    Ok(p)
}

/// `bench coldstart [IMAGE_MIB]`.
pub(crate) async fn coldstart(image_mib: usize) -> Result<()> {
    let work = tempfile::tempdir()?;
    let s = setup(image_mib, work.path()).await?;
    let home = |n: &str| -> Result<std::path::PathBuf> {
        let p = work.path().join(n);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    };

    eprintln!("== (a) no agent: StartTask pulls and fetches (prewarm = true)");
    cold_image(&s.image)?;
    let (tmp, data) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let a_home = home("a")?;
    let live = plugin(&s, &a_home, tmp.path()).await?;
    let a = place(&live, data.path(), true, Instant::now()).await?;
    drop(live);

    eprintln!("== (b) the agent prewarms the model only");
    cold_image(&s.image)?;
    let b = with_agent(&s, &home("b")?, false).await?;

    eprintln!("== (c) the agent prewarms the model and pulls the image");
    cold_image(&s.image)?;
    let c_home = home("c")?;
    let c = with_agent(&s, &c_home, true).await?;

    eprintln!("== (d) a second node on the same shared cache, with the agent");
    cold_image(&s.image)?;
    let d = with_agent(&s, &c_home, true).await?;

    eprintln!("== load alone: docker run of the same image and arguments, everything local");
    let commit = std::fs::read_to_string(c_home.join(format!("hub/models--{}/refs/main", REPO.replace('/', "--"))))?;
    let file = format!("models--{}/snapshots/{commit}/{FILE}", REPO.replace('/', "--"));
    let mut alone = Vec::new();
    for _ in 0..3 {
        let t = aimodel_integration::engines::time_docker_run_to_first_token(&s.image, &c_home, &file).await?;
        alone.push(t.healthy.as_secs_f64());
    }
    let load_alone = super::median(alone);
    cold_image(&s.image)?;

    let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.1} s"));
    println!(
        "image: {image_mib} MiB layer over {}; model: {:.2} GB",
        engine_image(EngineImage::LlamaServer)?,
        s.model_bytes as f64 / 1e9
    );
    println!("| scenario | image pull | model download | StartTask → ready (load) | cold start (placed → ready) | registration → ready |");
    println!("|---|---|---|---|---|---|");
    for (name, p) in [
        ("(a) agent off (StartTask pulls, `prewarm = true` fetches)", &a),
        ("(b) agent: model only", &b),
        ("(c) agent: model and image", &c),
        ("(d) second node, same cache, agent", &d),
    ] {
        println!(
            "| {name} | {} | {} | {:.1} s | {:.1} s | {:.1} s |",
            f(p.pull),
            f(p.download),
            p.load,
            p.cold_start,
            p.from_registration
        );
    }
    println!("| load alone: `docker run` → `/health`, everything local (median of 3) | | | | {load_alone:.1} s | |");
    println!();
    println!("| ratio | value |");
    println!("|---|---|");
    println!("| (c) cold start / load alone (goal ≤ 1.2×) | {:.2}× |", c.cold_start / load_alone);
    println!("| (d) cold start / load alone | {:.2}× |", d.cold_start / load_alone);
    println!("| (b) cold start / load alone | {:.2}× |", b.cold_start / load_alone);
    println!("| (a) cold start / load alone | {:.2}× |", a.cold_start / load_alone);
    println!("| (a) cold start / (c) cold start | {:.2}× |", a.cold_start / c.cold_start);
    Ok(())
}
