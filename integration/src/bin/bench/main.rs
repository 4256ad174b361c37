//! Benchmarks that need the real binaries: `cargo run --release -p aimodel-integration --bin bench -- <name>`.
//! Results go to stdout as Markdown rows for docs/benchmarks.md.

use std::time::Duration;

use anyhow::{bail, Result};

use aimodel_integration::plugin::{Launch, PluginProcess};
use aimodel_integration::sequence;
use aimodel_integration::support::{binary, DRIVER_BIN};
use aimodel_proto::base::PluginInfoRequest;

mod coldstart;
mod engines;
mod prewarm;

use engines::{engine_first_token, llamacpp_first_token, prewarm_tiny};
use prewarm::{cache, prewarm_bench, prewarm_netem};

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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

/// CPU time (user + system) of a process in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the comm field.
    (ticks(11) + ticks(12)) / 100.0
}

async fn lifecycle(runs: usize, tasks: usize) -> Result<()> {
    use aimodel_integration::support::{remove_containers_with_label, standin_image};
    use aimodel_integration::task::TaskBuilder;
    use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};
    use std::time::Instant;

    let image = standin_image()?;
    let image = image.as_str();
    let bin = binary(DRIVER_BIN)?;
    let (tmp, data, cache) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let client = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    hf_cache {{ host_path = \"{}\" }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
        cache.path().display()
    );
    let report = sequence::start(&bin, &client, &[("TMPDIR", tmp.path().to_str().unwrap_or("/tmp"))]).await?;
    let live = report.live;
    let mut d = live.process.driver();
    let cfg = format!("engine = \"custom\"\nimage = \"{image}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"3600\"]\n");
    let alloc_label = aimodel_driver::plan::LABEL_ALLOC_ID;

    // 1. StartTask vs `docker run -d`, alternating, same image and command.
    let (mut ours, mut docker) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let b = TaskBuilder::new(&format!("bench{i}"), &cfg);
        let t = b.build(&live.task_schema, data.path())?;
        let started = Instant::now();
        d.start_task(StartTaskRequest { task: Some(t.config.clone()) }).await?;
        ours.push(started.elapsed().as_secs_f64() * 1000.0);
        d.destroy_task(DestroyTaskRequest { task_id: t.config.id.clone(), force: true }).await?;

        let name = format!("aimodel-bench-{}", aimodel_integration::task::random_hex(4));
        let started = Instant::now();
        let out = std::process::Command::new("docker")
            .args([
                "run",
                "-d",
                "--name",
                &name,
                "--label",
                &format!("{alloc_label}=bench"),
                "--entrypoint",
                "/bin/sleep",
                image,
                "3600",
            ])
            .output()?;
        docker.push(started.elapsed().as_secs_f64() * 1000.0);
        if !out.status.success() {
            bail!("docker run failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::process::Command::new("docker").args(["rm", "-f", &name]).output()?;
    }
    let (mo, md) = (median(ours.clone()), median(docker.clone()));
    println!("| StartTask → running, release plugin (median of {runs}) | {mo:.0} ms |");
    println!("| `docker run -d` of the same image and command (median of {runs}) | {md:.0} ms |");
    println!("| ratio StartTask / docker run | {:.2}× |", mo / md);

    // 2. RSS with N running tasks, and 3. the CPU cost of TaskStats.
    let mut ids = Vec::new();
    for i in 0..tasks {
        let b = TaskBuilder::new(&format!("many{i}"), &cfg);
        let t = b.build(&live.task_schema, data.path())?;
        d.start_task(StartTaskRequest { task: Some(t.config.clone()) }).await?;
        ids.push((t.config.id.clone(), b.alloc_id.clone()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "| plugin RSS with {tasks} running tasks | {:.1} MiB |",
        live.process.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    let pid = live.process.pid().as_raw();
    let window = Duration::from_secs(20);
    let cpu_before = cpu_seconds(pid);
    let streams = open_stats_streams(&mut d, &ids).await?;
    tokio::time::sleep(window).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    for s in &streams {
        s.abort();
    }
    println!(
        "| plugin CPU for TaskStats, {tasks} tasks at 1 s for {}s | {:.2} ms per task per second ({:.2}% of one core in all) |",
        window.as_secs(),
        cpu * 1000.0 / (tasks as f64 * window.as_secs_f64()),
        cpu / window.as_secs_f64() * 100.0
    );
    for (id, alloc) in &ids {
        d.destroy_task(DestroyTaskRequest { task_id: id.clone(), force: true }).await?;
        remove_containers_with_label(alloc_label, alloc);
    }
    remove_containers_with_label(alloc_label, "bench");
    live.kill().await?;
    Ok(())
}

/// A TaskStats stream at Nomad's 1 s interval for each task, read to the end.
async fn open_stats_streams(
    d: &mut aimodel_proto::drivers::driver_client::DriverClient<tonic::transport::Channel>,
    ids: &[(String, String)],
) -> Result<Vec<tokio::task::JoinHandle<u64>>> {
    let mut streams = Vec::new();
    for (id, _) in ids {
        let req = aimodel_proto::drivers::TaskStatsRequest {
            task_id: id.clone(),
            collection_interval: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        };
        let mut s = d.task_stats(req).await?.into_inner();
        streams.push(tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(Some(_)) = s.message().await {
                n += 1;
            }
            n
        }));
    }
    Ok(streams)
}

/// The CPU that TaskStats costs, with the counters read from each task's cgroup
/// (the default) and from Docker's stats API (`AIMODEL_STATS_SOURCE=docker`),
/// side by side in one run: the plugin's and dockerd's CPU per task per second
/// that the stats streams add over the same tasks without them.
async fn stats_bench(tasks: usize, secs: u64) -> Result<()> {
    use aimodel_integration::support::{remove_containers_with_label, standin_image};
    use aimodel_integration::task::TaskBuilder;
    use aimodel_proto::drivers::{DestroyTaskRequest, StartTaskRequest};

    let image = standin_image()?;
    let bin = binary(DRIVER_BIN)?;
    let dockerd = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "dockerd"));
    let alloc_label = aimodel_driver::plan::LABEL_ALLOC_ID;
    let cfg = format!("engine = \"custom\"\nimage = \"{image}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"3600\"]\n");
    for (name, source) in [("cgroup files", None), ("Docker stats API", Some("docker"))] {
        let (tmp, data, cache) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
        let client = format!(
            "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    hf_cache {{ host_path = \"{}\" }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
            cache.path().display()
        );
        let mut env = vec![("TMPDIR", tmp.path().to_str().unwrap_or("/tmp"))];
        if let Some(s) = source {
            env.push(("AIMODEL_STATS_SOURCE", s));
        }
        let live = sequence::start(&bin, &client, &env).await?.live;
        let mut d = live.process.driver();
        let mut ids = Vec::new();
        for i in 0..tasks {
            let b = TaskBuilder::new(&format!("stats{i}"), &cfg);
            let t = b.build(&live.task_schema, data.path())?;
            d.start_task(StartTaskRequest { task: Some(t.config.clone()) }).await?;
            ids.push((t.config.id.clone(), b.alloc_id.clone()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The same tasks without stats streams: what running them costs anyway
        // (exit and OOM watch, log relay supervision).
        let pid = live.process.pid().as_raw();
        let (idle_plugin, idle_dockerd) = (cpu_seconds(pid), dockerd.map_or(0.0, cpu_seconds));
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let idle_plugin = cpu_seconds(pid) - idle_plugin;
        let idle_dockerd = dockerd.map_or(0.0, cpu_seconds) - idle_dockerd;
        let streams = open_stats_streams(&mut d, &ids).await?;
        // Past the streams' first samples (the cgroup lookup happens once per task).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (plugin_before, dockerd_before) = (cpu_seconds(pid), dockerd.map_or(0.0, cpu_seconds));
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let plugin = cpu_seconds(pid) - plugin_before;
        let docker = dockerd.map_or(0.0, cpu_seconds) - dockerd_before;
        for s in &streams {
            s.abort();
        }
        let per = |cpu: f64| cpu * 1000.0 / (tasks as f64 * secs as f64);
        println!(
            "| TaskStats from {name}, {tasks} tasks at 1 s, {secs} s | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            per(plugin - idle_plugin),
            per(docker - idle_dockerd),
            per(idle_plugin),
            per(plugin),
        );
        for (id, alloc) in &ids {
            d.destroy_task(DestroyTaskRequest { task_id: id.clone(), force: true }).await?;
            remove_containers_with_label(alloc_label, alloc);
        }
        live.kill().await?;
    }
    Ok(())
}

/// Node updates an idle node sends while other nodes write the shared cache:
/// the plugin fingerprints every second for `secs` seconds while a writer
/// appends to a file in the cache (a download on another node); every change
/// of the merged node attributes (as the client merges them) would re-register
/// the node and re-evaluate its jobs.
async fn attributes_bench(secs: u64) -> Result<()> {
    let bin = binary(DRIVER_BIN)?;
    let (tmp, cache) = (tempfile::tempdir()?, tempfile::tempdir()?);
    std::fs::create_dir_all(cache.path().join("hub"))?;
    let client = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    fingerprint_period = \"1s\"\n    hf_cache {{\n      host_path = \"{}\"\n      min_free = \"1MB\"\n    }}\n    gpu {{ enabled = false }}\n  }}\n}}\n",
        cache.path().display()
    );
    let live = sequence::start(&bin, &client, &[("TMPDIR", tmp.path().to_str().unwrap_or("/tmp"))]).await?.live;
    live.wait_fingerprints(2, Duration::from_secs(10)).await?;
    let (_, before) = live.node_view();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (path, s2) = (cache.path().join("hub/another-node.incomplete"), stop.clone());
    let writer = std::thread::spawn(move || -> std::io::Result<u64> {
        use std::io::Write;
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![1u8; 1 << 20];
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::SeqCst) {
            f.write_all(&chunk)?;
            f.sync_data()?;
            n += 1;
            if n % 256 == 0 {
                f.set_len(0)?; // keep the disk from filling
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(n)
    });
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let fingerprints = live.fingerprints.lock().unwrap_or_else(|p| p.into_inner()).items.len();
    let (_, after) = live.node_view();
    let changes = after - before;
    println!(
        "| node attribute changes while {written} MiB were written into the cache, {secs} s, {fingerprints} fingerprints | {changes} | {:.0} per hour |",
        changes as f64 * 3600.0 / secs as f64
    );
    live.kill().await?;
    Ok(())
}

fn eight_gpus() -> serde_json::Value {
    let gpus: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"name": "NVIDIA H100 80GB HBM3", "uuid": format!("GPU-{i:08x}-0000-0000-0000-000000000000"),
            "memory_mib": 81559, "cc": [9, 0], "pci_bus_id": format!("00000000:{:02x}:00.0", i + 7)}))
        .collect();
    serde_json::json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": gpus})
}

/// Fingerprint cost with 8 (fake) GPUs, in a child process that has FAKE_NVML_CONFIG set,
/// and how the Fingerprint stream flows while NVML hangs.
async fn gpu() -> Result<()> {
    use aimodel_integration::support::fake_nvml;
    use std::time::Instant;
    let lib = fake_nvml()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("nvml.json");
    std::fs::write(&cfg, eight_gpus().to_string())?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["gpu-inner", lib.to_str().unwrap_or_default()])
        .env("FAKE_NVML_CONFIG", &cfg)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("gpu-inner: {}", String::from_utf8_lossy(&out.stderr));
    }

    // The stream while NVML hangs (20 s in nvmlDeviceGetCount_v2 from the second probe on).
    let hcl = format!(
        "plugin \"nomad-driver-aimodel\" {{\n  config {{\n    fingerprint_period = \"500ms\"\n    hf_cache {{ host_path = \"{}\" }}\n    gpu {{ nvml_library = \"{}\" }}\n  }}\n}}\n",
        dir.path().display(),
        lib.display()
    );
    let env =
        [("TMPDIR", dir.path().to_str().unwrap_or("/tmp")), ("FAKE_NVML_CONFIG", cfg.to_str().unwrap_or_default())];
    let live = sequence::start(&binary(DRIVER_BIN)?, &hcl, &env).await?.live;
    live.wait_fingerprints(1, Duration::from_secs(5)).await?;
    let mut hang = eight_gpus();
    hang["hang"] = serde_json::json!(["nvmlDeviceGetCount_v2"]);
    hang["hang_ms"] = serde_json::json!(20_000);
    std::fs::write(&cfg, hang.to_string())?;
    let start = Instant::now();
    let before = live.fingerprints.lock().map(|l| l.items.len()).unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let items: Vec<Instant> =
        live.fingerprints.lock().map(|l| l.items[before..].iter().map(|r| r.at).collect()).unwrap_or_default();
    let mut gaps: Vec<f64> = items.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0).collect();
    if let Some(first) = items.first() {
        gaps.push((*first - start).as_secs_f64() * 1000.0);
    }
    let max_gap = gaps.iter().cloned().fold(0.0, f64::max);
    println!(
        "| fingerprints during a 20 s NVML hang (period 500 ms), first 10 s | {} messages, longest gap {max_gap:.0} ms |",
        items.len()
    );
    live.kill().await?;
    Ok(())
}

fn gpu_inner(lib: &str) -> Result<()> {
    use aimodel_driver::driver::gpu::{GpuMonitor, GpuProbe, NvmlProbe};
    use std::sync::Arc;
    use std::time::Instant;
    let probe: Arc<dyn GpuProbe> = Arc::new(NvmlProbe::load(lib).map_err(anyhow::Error::msg)?);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let monitor = GpuMonitor::new(Ok(probe.clone()));
    let runs = 200;
    let mut per = Vec::new();
    rt.block_on(async {
        for _ in 0..runs {
            let t = Instant::now();
            let st = monitor.status().await;
            per.push(t.elapsed().as_secs_f64() * 1e6);
            assert_eq!(st.attributes.len(), 3 + 8 * 7);
        }
    });
    let mut raw = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        probe.snapshot().map_err(anyhow::Error::msg)?;
        raw.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("| GPU part of one fingerprint, 8 GPUs, through nvml-wrapper and the fake library (median of {runs}) | {:.0} µs |", median(per));
    println!("| of which the NVML snapshot alone (about 70 NVML calls, median of {runs}) | {:.0} µs |", median(raw));
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.first().map(String::as_str) {
        Some("startup") => rt.block_on(startup(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(30))),
        Some("lifecycle") => rt.block_on(lifecycle(
            args.get(1).and_then(|n| n.parse().ok()).unwrap_or(15),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(20),
        )),
        Some("gpu") => rt.block_on(gpu()),
        Some("coldstart") => rt.block_on(coldstart::coldstart(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(300))),
        Some("attributes") => rt.block_on(attributes_bench(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(120))),
        Some("stats") => rt.block_on(stats_bench(
            args.get(1).and_then(|n| n.parse().ok()).unwrap_or(20),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(20),
        )),
        Some("engine-first-token") => {
            rt.block_on(engine_first_token(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(5)))
        }
        Some("llamacpp-first-token") => {
            rt.block_on(llamacpp_first_token(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(5)))
        }
        Some("prewarm-tiny") => rt.block_on(prewarm_tiny(args.get(1).map_or("", String::as_str))),
        Some("gpu-inner") => gpu_inner(args.get(1).map_or("", String::as_str)),
        Some("cache") => cache(args.get(1).map_or("target/pyenv/bin/python", String::as_str)),
        Some("prewarm") => rt.block_on(prewarm_bench(
            args.get(1).map_or("target/pyenv/bin/python", String::as_str),
            args.get(2).and_then(|n| n.parse().ok()).unwrap_or(3),
        )),
        Some("prewarm-netem") => {
            // Re-run inside a network namespace of our own, where netem may change loopback.
            if std::env::var_os("AIMODEL_IN_NETNS").is_none() {
                let me = std::env::current_exe()?;
                let s = std::process::Command::new("unshare")
                    .arg("-n")
                    .arg(me)
                    .args(&args)
                    .env("AIMODEL_IN_NETNS", "1")
                    .status()?;
                if s.code() != Some(3) {
                    if !s.success() {
                        bail!("prewarm-netem failed inside the namespace");
                    }
                    return Ok(());
                }
            }
            rt.block_on(prewarm_netem(
                args.get(1).map_or("target/pyenv/bin/python", String::as_str),
                args.get(2).and_then(|n| n.parse().ok()).unwrap_or(3),
                std::env::var_os("AIMODEL_IN_NETNS").is_some(),
            ))
        }
        _ => bail!("usage: bench startup [RUNS] | bench lifecycle [RUNS] [TASKS] | bench stats [TASKS] [SECONDS] | bench attributes [SECONDS] | bench cache [PYTHON] | bench gpu | bench prewarm [PYTHON] [ROUNDS] | bench prewarm-netem [PYTHON] [ROUNDS] | bench engine-first-token [RUNS] | bench llamacpp-first-token [RUNS] | bench prewarm-tiny HF_HOME | bench coldstart [IMAGE_MIB]"),
    }
}
