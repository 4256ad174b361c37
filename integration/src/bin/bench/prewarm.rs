//! The HF cache benches: checking a cache (`cache`), and prewarming a model
//! from a local hub with the agent against huggingface_hub and curl
//! (`prewarm`, `prewarm-netem`).

use std::time::Duration;

use aimodel_integration::support::binary;
use anyhow::{bail, Result};

use super::median;

/// Quick validation against huggingface_hub's scan_cache_dir, deep
/// verification against `openssl dgst -sha256`, side by side in one run.
pub(crate) fn cache(python: &str) -> Result<()> {
    use hf_cache::publish::{publish_snapshot, NewFile};
    use hf_cache::{check, Mode, RepoId};
    use std::time::Instant;

    let dir = tempfile::tempdir()?;
    let hub = dir.path().join("hub");
    let mut repos = Vec::new();
    for r in 0..20u32 {
        let repo = RepoId::model(&format!("bench/model-{r}"));
        let files: Vec<NewFile> = (0..10u32)
            .map(|f| NewFile {
                path: if f == 0 { "model.safetensors".into() } else { format!("part/file-{f}.json") },
                bytes: (0..if f == 0 { 65536 } else { 1024 })
                    .map(|i: u32| u8::try_from((i ^ r ^ f) & 0xff).unwrap())
                    .collect(),
                lfs: f == 0,
            })
            .collect();
        publish_snapshot(&hub, &repo, &format!("{:040x}", r + 1), "main", &files)?;
        repos.push(repo);
    }
    let runs = 21;
    let mut ours = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        for repo in &repos {
            assert!(check(&hub, repo, "main", Mode::Quick).is_complete());
        }
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let code = "import sys, time, statistics\nfrom huggingface_hub import scan_cache_dir\nts=[]\nfor _ in range(21):\n    t=time.perf_counter(); info=scan_cache_dir(sys.argv[1]); ts.append((time.perf_counter()-t)*1000)\nassert len(info.repos)==20 and not info.warnings\nprint(statistics.median(ts))";
    let t = Instant::now();
    let out = std::process::Command::new(python).args(["-c", code]).arg(&hub).output()?;
    let with_start = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!("python: {}", String::from_utf8_lossy(&out.stderr));
    }
    let theirs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let mo = median(ours);
    println!("| quick check of 20 snapshots / 200 files, ours (median of {runs}) | {mo:.2} ms |");
    println!("| huggingface_hub `scan_cache_dir` on the same cache, in-process (median of {runs}) | {theirs:.2} ms |");
    println!("| ratio scan_cache_dir / ours (target ≥ 10×) | {:.1}× |", theirs / mo);
    println!("| (one python process running the 21 scans, including interpreter start-up) | {with_start:.0} ms |");

    // Deep: 4 blobs of 256 MiB.
    let blobs: Vec<std::path::PathBuf> = (0..4u64).map(|i| dir.path().join(format!("blob{i}"))).collect();
    for (i, b) in blobs.iter().enumerate() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i as u64;
        let data: Vec<u8> = (0..(256usize << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(b, data)?;
    }
    let gib = 1.0f64;
    let openssl = || -> Result<f64> {
        let t = Instant::now();
        let out = std::process::Command::new("openssl").args(["dgst", "-sha256"]).args(&blobs).output()?;
        if !out.status.success() {
            bail!("openssl failed");
        }
        Ok(t.elapsed().as_secs_f64())
    };
    openssl()?; // warm the page cache
    let (mut one, mut two, mut ossl) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        ossl.push(openssl()?);
        let t = Instant::now();
        for b in &blobs {
            hf_cache::check::sha256_file(b)?;
        }
        one.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::thread::scope(|s| {
            for pair in blobs.chunks(2) {
                s.spawn(move || pair.iter().for_each(|b| drop(hf_cache::check::sha256_file(b))));
            }
        });
        two.push(t.elapsed().as_secs_f64());
    }
    let (o, a, b) = (median(ossl), median(one), median(two));
    println!("| deep sha256, ours, one core (4 × 256 MiB, median of 3) | {:.0} MB/s |", gib * 1073.741824 / a);
    println!("| `openssl dgst -sha256` on the same blobs (one process) | {:.0} MB/s |", gib * 1073.741824 / o);
    println!("| ratio ours / openssl, one core (target ≥ 0.9) | {:.2} |", o / a);
    println!("| deep sha256, ours, two threads | {:.0} MB/s |", gib * 1073.741824 / b);
    Ok(())
}

/// Times `cmd` until its exit, plus `sync` (the data is on disk).
pub(crate) fn timed(cmd: &mut std::process::Command) -> Result<f64> {
    let t = std::time::Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    std::process::Command::new("sync").status()?;
    Ok(t.elapsed().as_secs_f64())
}

pub(crate) fn fresh(dir: &std::path::Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    std::process::Command::new("sync").status()?;
    Ok(())
}

pub(crate) struct Tools {
    agent: std::path::PathBuf,
    python: String,
    endpoint: String,
    urls: Vec<(String, String)>,
}

impl Tools {
    fn agent(&self, dest: &std::path::Path, extra: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.agent);
        c.arg("--cache").arg(dest).args(["prewarm", "org/bench"]).args(extra).env("HF_ENDPOINT", &self.endpoint);
        c
    }

    fn hf(&self, dest: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new(&self.python);
        c.args(["-c", "import sys\nfrom huggingface_hub import snapshot_download\nsnapshot_download('org/bench', cache_dir=sys.argv[1])"])
            .arg(dest)
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HUB_DISABLE_XET", "1")
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("HF_HUB_DISABLE_TELEMETRY", "1");
        c
    }

    fn curl(&self, dest: &std::path::Path) -> std::process::Command {
        let mut c = std::process::Command::new("curl");
        c.arg("-sSf");
        for (name, url) in &self.urls {
            c.arg(url).arg("-o").arg(dest.join(name));
        }
        c
    }
}

pub(crate) async fn serve_model(
    dir: &std::path::Path,
    sizes: &[u64],
) -> Result<aimodel_integration::statichub::StaticHub> {
    use aimodel_integration::statichub::{describe, write_model, StaticHub};
    let files = write_model(dir, sizes)?;
    let described = describe(&files, 1 << 20)?; // also reads every byte once: the page cache is warm
    Ok(StaticHub::start("127.0.0.1:0", &"be".repeat(20), described).await?)
}

pub(crate) fn tools_for(hub: &aimodel_integration::statichub::StaticHub, python: &str) -> Result<Tools> {
    let endpoint = hub.endpoint();
    let urls = hub
        .files
        .iter()
        .map(|f| (f.path.clone(), format!("{endpoint}/org/bench/resolve/{}/{}", hub.commit, f.path)))
        .collect();
    Ok(Tools { agent: binary("aimodel-agent")?, python: python.into(), endpoint, urls })
}

/// The agent vs huggingface_hub vs curl on one ~2 GB model from our static hub,
/// side by side, each timed to its exit plus `sync`; then four agents at once.
pub(crate) async fn prewarm_bench(python: &str, rounds: usize) -> Result<()> {
    use std::sync::atomic::Ordering;
    let work = tempfile::Builder::new().prefix("prewarm-bench").tempdir_in(".")?;
    let src = work.path().join("src");
    std::fs::create_dir_all(&src)?;
    let hub = serve_model(&src, &[1 << 30, 900 << 20]).await?;
    let t = tools_for(&hub, python)?;
    let dest = work.path().join("dest");
    let names = ["agent (4 ranges)", "agent (1 stream per file)", "huggingface_hub snapshot_download", "curl"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in 0..names.len() {
            let i = (k + round) % names.len(); // rotate the order every round
            fresh(&dest)?;
            let secs = match i {
                0 => timed(&mut t.agent(&dest, &[]))?,
                1 => timed(&mut t.agent(&dest, &["--ranges", "1"]))?,
                2 => timed(&mut t.hf(&dest))?,
                _ => timed(&mut t.curl(&dest))?,
            };
            times[i].push(secs);
        }
    }
    let total = hub.total() as f64;
    println!("| tool | median of {rounds} | MB/s |");
    println!("|---|---|---|");
    let med: Vec<f64> = times.iter().map(|v| median(v.clone())).collect();
    for (n, m) in names.iter().zip(&med) {
        println!("| {n} | {m:.2} s | {:.0} |", total / 1e6 / m);
    }
    println!("| speed vs curl (target ≥ 0.9×) | {:.2}× |", med[3] / med[0]);
    println!("| speed vs huggingface_hub (target ≥ 1.4×) | {:.2}× |", med[2] / med[0]);

    // Four agents on one cache at once: bytes served.
    fresh(&dest)?;
    hub.served.store(0, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let children: Vec<_> = (0..4)
        .map(|_| t.agent(&dest, &[]).stdout(std::process::Stdio::null()).spawn())
        .collect::<std::io::Result<_>>()?;
    for mut c in children {
        if !c.wait()?.success() {
            bail!("an agent failed");
        }
    }
    println!(
        "| four agents at once on one cache: bytes served / model size (target 1.0×) | {:.3}× in {:.2} s |",
        hub.served.load(Ordering::SeqCst) as f64 / total,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One 512 MiB model over a link with 20 ms of delay each way: one stream per
/// file vs parallel ranges vs curl. With `netem` the delay is `tc netem` on the
/// loopback of a network namespace of our own (`unshare -n`); without it, our
/// delay relay (see `delayproxy`) with a 4 MiB window per connection.
pub(crate) async fn prewarm_netem(python: &str, rounds: usize, netem: bool) -> Result<()> {
    if netem {
        let s = std::process::Command::new("sh")
            .args(["-c", "ip link set lo up && tc qdisc add dev lo root netem delay 20ms limit 100000"])
            .status()?;
        if !s.success() {
            std::process::exit(3);
        }
    }
    let work = tempfile::Builder::new().prefix("prewarm-netem").tempdir_in(".")?;
    let src = work.path().join("src");
    std::fs::create_dir_all(&src)?;
    let hub = serve_model(&src, &[512 << 20]).await?;
    let mut t = tools_for(&hub, python)?;
    let link = if netem {
        "tc netem delay 20ms on the loopback of a private network namespace".to_string()
    } else {
        let window = 4 << 20;
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", hub.port).parse()?;
        let proxy =
            aimodel_integration::delayproxy::DelayProxy::start(upstream, Duration::from_millis(20), window).await?;
        let via = format!("http://127.0.0.1:{}", proxy.port);
        for (_, u) in t.urls.iter_mut() {
            *u = u.replace(&t.endpoint, &via);
        }
        t.endpoint = via;
        "no netem in this kernel (CONFIG_NET_SCH_NETEM is not set): our delay relay, 20 ms each way, 4 MiB window per connection".to_string()
    };
    let dest = work.path().join("dest");
    let names = ["agent, 1 stream per file", "agent, 4 ranges", "agent, 8 ranges", "curl"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        for k in 0..names.len() {
            let i = (k + round) % names.len();
            fresh(&dest)?;
            let secs = match i {
                0 => timed(&mut t.agent(&dest, &["--ranges", "1"]))?,
                1 => timed(&mut t.agent(&dest, &["--ranges", "4"]))?,
                2 => timed(&mut t.agent(&dest, &["--ranges", "8"]))?,
                _ => timed(&mut t.curl(&dest))?,
            };
            times[i].push(secs);
        }
    }
    let _ = python;
    println!("link: {link}");
    if netem {
        let ping = std::process::Command::new("sh").args(["-c", "ping -c 3 -q 127.0.0.1 | tail -1"]).output();
        if let Ok(p) = ping {
            println!("loopback round trip inside the namespace: {}", String::from_utf8_lossy(&p.stdout).trim());
        }
    }
    let total = hub.total() as f64;
    println!("| 512 MiB model, 20 ms delay each way | median of {rounds} | MB/s |");
    println!("|---|---|---|");
    for (n, v) in names.iter().zip(&times) {
        let m = median(v.clone());
        println!("| {n} | {m:.2} s | {:.0} |", total / 1e6 / m);
    }
    Ok(())
}
