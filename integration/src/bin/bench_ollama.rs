//! Prewarm throughput of an Ollama model from a local registry (Debian's
//! `docker-registry`) against `curl` of the same blobs, side by side:
//! `cargo run -p aimodel-integration --bin bench_ollama -- [SIZE_MIB] [ROUNDS]`
//! (set `AIMODEL_BIN_DIR=target/release` after `cargo build --release -p aimodel-agent`
//! to time the release agent). Prints Markdown rows for docs/benchmarks.md.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use aimodel_integration::ollamareg::{OllamaRegistry, MODEL, PARAMS, TEMPLATE};
use aimodel_integration::support::binary;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `cmd` until its exit, plus `sync` (the data is on disk).
fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Command::new("sync").status()?;
    Ok(t.elapsed().as_secs_f64())
}

fn fresh(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Command::new("sync").status()?;
    Ok(())
}

/// `n` bytes that do not compress (xorshift), fast to make.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size_mib: usize = args.first().and_then(|n| n.parse().ok()).unwrap_or(1024);
    let rounds: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(3);
    let reg = OllamaRegistry::start().context("no /usr/bin/docker-registry (apt-get install docker-registry)")?;
    let mut weights = b"GGUF".to_vec();
    weights.extend(noise((size_mib << 20) - 4));
    let manifest = reg.push_model(
        "library/bench",
        "1g",
        &[(MODEL, &weights), (TEMPLATE, b"{{ .Prompt }}"), (PARAMS, br#"{"temperature":0.1}"#)],
    );
    drop(weights);
    let m: serde_json::Value = serde_json::from_slice(&manifest)?;
    let digests: Vec<(String, u64)> = m["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .chain([&m["config"]])
        .map(|l| (l["digest"].as_str().unwrap_or_default().to_string(), l["size"].as_u64().unwrap_or(0)))
        .collect();
    let total: u64 = digests.iter().map(|(_, s)| s).sum();
    let agent = binary("aimodel-agent")?;
    let work = tempfile::Builder::new().prefix("ollama-bench").tempdir_in(".")?;
    let dest = work.path().join("dest");
    let agent_cmd = |extra: &[&str]| {
        let mut c = Command::new(&agent);
        c.arg("--hf-home")
            .arg(&dest)
            .args(["prewarm", "ollama://bench:1g"])
            .args(extra)
            .env("AIMODEL_OLLAMA_REGISTRY", reg.endpoint());
        c
    };
    let curl_cmd = || {
        let mut c = Command::new("curl");
        c.arg("-sSf");
        for (i, (d, _)) in digests.iter().enumerate() {
            c.arg(format!("{}/v2/library/bench/blobs/{d}", reg.endpoint()))
                .arg("-o")
                .arg(dest.join(format!("blob-{i}")));
        }
        c
    };
    // Warm the registry's files into the page cache once.
    fresh(&dest)?;
    timed(&mut curl_cmd())?;
    let names =
        ["aimodel-agent prewarm (4 ranges)", "aimodel-agent prewarm (1 stream per blob)", "curl (the same blobs)"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in 0..names.len() {
            let i = (k + round) % names.len(); // rotate the order every round
            fresh(&dest)?;
            let secs = match i {
                0 => timed(&mut agent_cmd(&[]))?,
                1 => timed(&mut agent_cmd(&["--ranges", "1"]))?,
                _ => timed(&mut curl_cmd())?,
            };
            times[i].push(secs);
        }
    }
    let med: Vec<f64> = times.iter().map(|v| median(v.clone())).collect();
    println!("| tool ({} MiB model, {} blobs) | median of {rounds} | MB/s |", total >> 20, digests.len());
    println!("|---|---|---|");
    for (n, m) in names.iter().zip(&med) {
        println!("| {n} | {m:.2} s | {:.0} |", total as f64 / 1e6 / m);
    }
    println!("| agent (4 ranges) vs curl (goal ≥ 0.9×) | {:.2}× |", med[2] / med[0]);
    println!("| agent (1 stream) vs curl | {:.2}× |", med[2] / med[1]);
    Ok(())
}
