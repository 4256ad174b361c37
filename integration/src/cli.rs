//! The `nomad-sim` command line.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use aimodel_proto::drivers::fingerprint_response::HealthState;
use aimodel_proto::structs::attribute::Value as AttrValue;

use crate::hcl_eval::plugin_stanza;
use crate::sequence;

/// Run Nomad task-driver plugins the way a Nomad client does, without Nomad.
#[derive(Debug, Parser)]
#[command(name = "nomad-sim", version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Discover plugins in a plugin_dir, run Nomad's start sequence for each one the
    /// client configuration references, print what the client would record, stop.
    Start {
        /// The client's plugin_dir.
        #[arg(long)]
        plugin_dir: PathBuf,
        /// A Nomad client configuration file with `plugin "<binary>" { config { ... } }`.
        #[arg(long)]
        config: PathBuf,
        /// Keep the long-lived process and its streams open this long before stopping.
        #[arg(long, default_value = "0")]
        watch_secs: u64,
    },
    /// Start the plugin like `start`, then run every `driver = "aimodel"` task of a
    /// jobspec, wait until its model server is ready, ask it one chat question,
    /// print the answer and the task events, and stop everything.
    Run {
        #[arg(long)]
        plugin_dir: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// The jobspec.
        #[arg(long)]
        job: PathBuf,
        /// Replace every task's image (e.g. the local stand-in: there is no registry here).
        #[arg(long)]
        image: Option<String>,
        /// `name=value` for the jobspec's variables.
        #[arg(long = "var")]
        vars: Vec<String>,
        /// Write a tiny model for the task's `model` into this HF hub cache first (an `ollama` task's
        /// models into the Ollama store beside it, `../ollama`).
        #[arg(long)]
        seed_hub: Option<PathBuf>,
        /// The question to ask.
        #[arg(long, default_value = "Say hello.")]
        ask: String,
    },
    /// Serve a tiny model from a local hub-protocol server (olah, offline) until killed;
    /// prints `HF_ENDPOINT=<url>` once it answers.
    HubServer {
        /// The repo id to serve.
        #[arg(long)]
        repo: String,
        /// A Python with olah installed.
        #[arg(long, default_value = "target/pyenv/bin/python")]
        python: PathBuf,
    },
    /// Build the local model-server stand-in image (no registry needed).
    StandinImage,
    /// Check the configuration reference tables in the docs against the schemas
    /// (with --write, regenerate them).
    Docs {
        #[arg(long)]
        write: bool,
    },
}

/// Runs the command.
pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Cmd::Start { plugin_dir, config, watch_secs } => {
            start(plugin_dir, config, Duration::from_secs(watch_secs)).await
        }
        Cmd::Run { plugin_dir, config, job, image, vars, seed_hub, ask } => {
            run_job(RunArgs { plugin_dir, config, job, image, vars, seed_hub, ask }).await
        }
        Cmd::HubServer { repo, python } => {
            let (files, weights) = crate::jobrun::tiny_model_files();
            let plain: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
            // Not canonicalised: the venv's python is a symlink, and olah-cli sits beside the link.
            let python = std::path::absolute(&python)?;
            anyhow::ensure!(python.exists(), "{} does not exist (scripts/demo creates it)", python.display());
            let server = crate::olah::start_repo(&python, &repo, &plain, &weights);
            println!("HF_ENDPOINT={}", server.endpoint());
            use std::io::Write;
            std::io::stdout().flush()?;
            // Stop olah on SIGINT or SIGTERM (the demo's `kill`): dropping the guard kills it.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            drop(server);
            Ok(())
        }
        Cmd::StandinImage => {
            println!("{}", crate::support::standin_image()?);
            Ok(())
        }
        Cmd::Docs { write } => {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let stale = crate::docs::check(&root, write)?;
            match (stale.is_empty(), write) {
                (true, _) => println!("configuration tables are up to date"),
                (false, true) => println!("rewrote {}", stale.join(", ")),
                (false, false) => {
                    bail!("stale configuration tables in {}; run `nomad-sim docs --write`", stale.join(", "))
                }
            }
            Ok(())
        }
    }
}

/// Nomad's plugin_dir scan: executable regular files are candidates; those the
/// client configuration does not reference are skipped (Nomad ≥ 1.7).
pub fn discover(plugin_dir: &PathBuf, client_hcl: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(plugin_dir).with_context(|| format!("reading {}", plugin_dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let name = entry.file_name().to_string_lossy().to_string();
        if meta.is_dir() || meta.permissions().mode() & 0o111 == 0 {
            eprintln!("skipping {name}: not an executable file");
            continue;
        }
        if plugin_stanza(client_hcl, &name)?.is_none() {
            eprintln!("plugin not referenced in the agent configuration file, loading skipped: {name}");
            continue;
        }
        found.push(entry.path());
    }
    found.sort();
    Ok(found)
}

async fn start(plugin_dir: PathBuf, config: PathBuf, watch: Duration) -> Result<()> {
    let client_hcl = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    let plugins = discover(&plugin_dir, &client_hcl)?;
    if plugins.is_empty() {
        bail!("no plugin in {} is referenced by {}", plugin_dir.display(), config.display());
    }
    for binary in plugins {
        let report = sequence::start(&binary, &client_hcl, &[]).await?;
        let live = &report.live;
        println!("plugin {} (driver {:?}, version {})", binary.display(), live.info.name, live.info.plugin_version);
        println!("  handshake: {}", live.process.handshake_line);
        println!(
            "  fingerprint process: handshake after {:?}, stopped gracefully: {}",
            report.fingerprint_process.handshake_after, report.fingerprint_process.exited_gracefully
        );
        println!("  validation process: stopped gracefully: {}", report.validation_process.exited_gracefully);
        println!("  capabilities: {:?}", live.capabilities);
        let fps = live.wait_fingerprints(1, Duration::from_secs(5)).await?;
        print_fingerprint(&fps[0].msg);
        if !watch.is_zero() {
            tokio::time::sleep(watch).await;
            for ev in &live.events.lock().unwrap().items {
                println!("  event {}: {}", ev.msg.task_id, ev.msg.message);
            }
        }
        let (graceful, took) = report.live.kill().await?;
        println!("  stopped (graceful: {graceful}, {took:?})");
    }
    Ok(())
}

/// Prints a fingerprint as `nomad node status -verbose` would list it.
pub fn print_fingerprint(fp: &aimodel_proto::drivers::FingerprintResponse) {
    let health = HealthState::try_from(fp.health).map_or("?".to_string(), |h| h.as_str_name().to_string());
    println!("  health: {health} ({})", fp.health_description);
    let mut attrs: Vec<_> = fp.attributes.iter().collect();
    attrs.sort_by_key(|(k, _)| k.as_str());
    for (k, a) in attrs {
        let v = match &a.value {
            Some(AttrValue::StringVal(s)) => s.clone(),
            Some(AttrValue::BoolVal(b)) => b.to_string(),
            Some(AttrValue::IntVal(i)) => i.to_string(),
            Some(AttrValue::FloatVal(f)) => f.to_string(),
            None => String::new(),
        };
        println!("    {k} = {v}{}", a.unit);
    }
}

struct RunArgs {
    plugin_dir: PathBuf,
    config: PathBuf,
    job: PathBuf,
    image: Option<String>,
    vars: Vec<String>,
    seed_hub: Option<PathBuf>,
    ask: String,
}

async fn run_job(a: RunArgs) -> Result<()> {
    use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest, StopTaskRequest, WaitTaskRequest};
    let client_hcl = std::fs::read_to_string(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
    let job_text = std::fs::read_to_string(&a.job).with_context(|| format!("reading {}", a.job.display()))?;
    let vars = a
        .vars
        .iter()
        .map(|v| v.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).context("--var wants name=value"))
        .collect::<Result<_>>()?;
    let job_body: hcl::Body = hcl::parse(&job_text).context("parsing the jobspec")?;
    let ctx = crate::jobrun::eval_context(&job_body, &vars)?;
    let tasks = crate::jobrun::aimodel_tasks(&job_body, &ctx)?;
    if tasks.is_empty() {
        bail!("{} has no driver = \"aimodel\" task", a.job.display());
    }
    let binary = discover(&a.plugin_dir, &client_hcl)?.into_iter().next().context("no plugin to run")?;
    println!("== starting the plugin as a Nomad client does");
    let report = sequence::start(&binary, &client_hcl, &[]).await?;
    let live = report.live;
    let fps = live.wait_fingerprints(1, Duration::from_secs(5)).await?;
    print_fingerprint(&fps[0].msg);
    let data = tempfile::tempdir()?;
    let mut result = Ok(());
    for t in &tasks {
        let prepared = t.prepare(&live.task_schema, &ctx, a.image.as_deref(), data.path())?;
        if let Some(hub) = &a.seed_hub {
            let cfg = aimodel_driver::nomad::decode::task_config(&prepared.config.msgpack_driver_config)?;
            // `--seed-hub` is HF_HOME/hub; Ollama models go to the store beside it.
            let home = hub.parent().unwrap_or(hub);
            for seeded in crate::jobrun::seed_task_models(home, &cfg)? {
                println!("== seeded {seeded} into {}", home.display());
            }
        }
        let id = prepared.config.id.clone();
        println!("== StartTask {} ({id})", t.name);
        let resp = live.process.driver().start_task(StartTaskRequest { task: Some(prepared.config.clone()) }).await?;
        let _ = resp;
        // The host ports Nomad gave the task (the driver reports no address of its own).
        let ports: std::collections::BTreeMap<String, i32> = prepared
            .config
            .resources
            .as_ref()
            .map(|r| r.ports.iter().map(|p| (p.label.clone(), p.value)).collect())
            .unwrap_or_default();
        let ready = live.wait_event(&id, "model server ready", Duration::from_secs(120)).await;
        for m in live.event_messages(&id) {
            println!("  event: {m}");
        }
        result = match (ready, ports.values().next()) {
            (Ok(_), Some(port)) => {
                let answer = match u16::try_from(*port) {
                    Ok(port) => chat(port, &a.ask).await,
                    Err(_) => Err(anyhow::anyhow!("Nomad gave the task port {port}, which is not a TCP port")),
                };
                match &answer {
                    Ok(text) => println!("== answer from 127.0.0.1:{port}/v1/chat/completions:\n{text}"),
                    Err(e) => println!("!! no answer: {e:#}"),
                }
                answer.map(|_| ())
            }
            (Ok(_), None) => Ok(()),
            (Err(e), _) => Err(e),
        };
        if let Some(out) = &prepared.stdout {
            println!("== task stdout (through the log FIFO):\n{}", out.text().trim_end());
        }
        let mut d = live.process.driver();
        let timeout = Some(prost_types::Duration { seconds: 5, nanos: 0 });
        d.stop_task(StopTaskRequest { task_id: id.clone(), timeout, signal: String::new() }).await?;
        let exit = d.wait_task(WaitTaskRequest { task_id: id.clone() }).await?.into_inner();
        println!("== stopped: {:?}", exit.result.unwrap_or_default());
        d.destroy_task(DestroyTaskRequest { task_id: id, force: true }).await?;
    }
    let (graceful, took) = live.kill().await?;
    println!("== plugin stopped (graceful: {graceful}, {took:?})");
    result
}

/// Asks an OpenAI-style server one question; returns the assistant's text.
async fn chat(port: u16, question: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({"model": "any", "messages": [{"role": "user", "content": question}]}).to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let json = resp.split_once("\r\n\r\n").map(|(_, b)| b).context("no HTTP body")?;
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| format!("not JSON: {json}"))?;
    v["choices"][0]["message"]["content"].as_str().map(str::to_string).context("no choices[0].message.content")
}
