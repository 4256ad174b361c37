//! `aimodel-agent prewarm`: one model into the cache, with progress.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use hf_cache::units::{human_bytes, human_rate};

use super::{split, PrewarmArgs};
use crate::env::Environment;
use crate::hub::Hub;
use crate::prewarm::{prewarm, record_if_warm, FetchOptions, Options, Progress};

/// Prewarms `a.model` into `dir` (the hub cache).
pub(super) async fn run(a: PrewarmArgs, dir: PathBuf, env: &Environment) -> Result<ExitCode> {
    let PrewarmArgs {
        model,
        include,
        exclude,
        concurrency,
        heartbeat,
        stale_after,
        stall_timeout,
        ranges,
        range_min,
        range_size,
        deadline,
    } = a;
    if heartbeat.checked_mul(3).is_none_or(|h| stale_after < h) {
        anyhow::bail!("--stale-after must be at least three --heartbeat periods, or live leases get taken over");
    }
    let fetch = FetchOptions { heartbeat, stale_after, stall: stall_timeout, ranges, range_min, range_size };
    let (repo, rev) = split(&model);
    let hub = Hub::from_env(env)?;
    let o = Options { hub_dir: dir.clone(), include, exclude, concurrency, fetch, deadline };
    let progress = Arc::new(Progress::default());
    let ticker = tokio::spawn(show_progress(model.clone(), progress.clone()));
    let r = prewarm(&hub, &repo, &rev, &o, progress).await;
    ticker.abort();
    let _ = ticker.await;
    let s = r.with_context(|| format!("prewarm {model}"))?;
    let (d, rp, rv) = (dir.clone(), repo.clone(), rev.clone());
    let (_, record_err) = tokio::task::spawn_blocking(move || record_if_warm(&d, &rp, &rv)).await?;
    if let Some(e) = record_err {
        eprintln!("aimodel-agent: could not record {model} as warm for the driver: {e}");
    }
    for path in &s.repaired {
        println!("{repo}@{rev}: {path}: the cached blob was corrupt; downloaded again");
    }
    println!(
        "{repo}@{rev} = {}: {} files, {}, {} downloaded in {:.1} s ({})",
        s.commit,
        s.files,
        human_bytes(s.bytes),
        human_bytes(s.downloaded),
        s.elapsed.as_secs_f64(),
        human_rate(s.downloaded, s.elapsed)
    );
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal; a line every five seconds otherwise (logs).
pub(super) async fn show_progress(label: String, p: Arc<Progress>) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label);
        loop {
            bar.set_length(p.bytes_total.load(Ordering::SeqCst));
            bar.set_position(p.bytes_done.load(Ordering::SeqCst));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (done, total) = (p.bytes_done.load(Ordering::SeqCst), p.bytes_total.load(Ordering::SeqCst));
            let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 0.0 };
            eprintln!("{label}: {}/{} ({pct:.0}%)", human_bytes(done), human_bytes(total));
        }
    }
}
