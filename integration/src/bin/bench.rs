//! Benchmarks that need the real binaries: `cargo run --release -p aimodel-integration --bin bench -- <name>`.
//! Results go to stdout as Markdown rows for docs/benchmarks.md.

use std::time::Duration;

use anyhow::{bail, Result};

use aimodel_integration::plugin::{Launch, PluginProcess};
use aimodel_integration::sequence;
use aimodel_integration::support::{binary, DRIVER_BIN};
use aimodel_proto::base::PluginInfoRequest;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn startup(runs: usize) -> Result<()> {
    let bin = binary(DRIVER_BIN)?;
    let tmp = tempfile::tempdir()?;
    let launch = Launch::nomad(&bin).env("TMPDIR", tmp.path().to_str());
    let mut handshake = Vec::new();
    let mut idle_rss = Vec::new();
    for _ in 0..runs {
        let p = PluginProcess::launch(&launch).await?;
        handshake.push(p.handshake_after.as_secs_f64() * 1000.0);
        p.base().plugin_info(PluginInfoRequest {}).await?;
        idle_rss.push(p.rss_kib().unwrap_or(0) as f64);
        p.kill().await?;
    }
    let client = "plugin \"nomad-driver-aimodel\" {\n  config {\n    gpu { enabled = false }\n  }\n}\n";
    let mut seq_rss = Vec::new();
    for _ in 0..runs.min(10) {
        let report = sequence::start(&bin, client, &[("TMPDIR", tmp.path().to_str().unwrap_or("/tmp"))]).await?;
        report.live.wait_fingerprints(1, Duration::from_secs(5)).await?;
        seq_rss.push(report.live.process.rss_kib().unwrap_or(0) as f64);
        report.live.kill().await?;
    }
    println!("| exec to handshake line (median of {runs}) | {:.1} ms |", median(handshake));
    println!("| RSS after handshake + PluginInfo (median of {runs}) | {:.1} MiB |", median(idle_rss) / 1024.0);
    println!(
        "| RSS of the long-lived process after the start sequence, streams open (median of {}) | {:.1} MiB |",
        seq_rss.len(),
        median(seq_rss) / 1024.0
    );
    let size = std::fs::metadata(&bin)?.len();
    println!("| binary size | {:.1} MiB |", size as f64 / (1024.0 * 1024.0));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("startup") => rt.block_on(startup(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(30))),
        _ => bail!("usage: bench startup [RUNS]"),
    }
}
