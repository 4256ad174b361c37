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
