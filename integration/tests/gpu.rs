//! GPUs through the real nvml-wrapper path, with the project's fake
//! `libnvidia-ml.so` (no GPU here). A real-GPU smoke test runs with AIMODEL_IT_GPU=1.

use std::path::Path;
use std::time::{Duration, Instant};

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence::{self, LiveDriver};
use aimodel_integration::support::{
    binary, fake_nvml, remove_containers_with_label, require_docker, standin_image, DRIVER_BIN, STANDIN_IMAGE,
};
use aimodel_integration::task::TaskBuilder;
use aimodel_proto::drivers::fingerprint_response::HealthState;
use aimodel_proto::drivers::{DestroyTaskRequest, FingerprintResponse, StartTaskRequest, TaskStatsRequest};
use aimodel_proto::structs::attribute::Value as A;
use serde_json::json;
use tonic::Code;

fn gpu(i: usize, name: &str, mem: u64) -> serde_json::Value {
    json!({"name": name, "uuid": format!("GPU-{i:08x}-0000-0000-0000-000000000000"), "memory_mib": mem,
           "cc": [8, 0], "pci_bus_id": format!("00000000:{:02x}:00.0", i + 7), "util": [37, 12]})
}

fn uuid(i: usize) -> String {
    format!("GPU-{i:08x}-0000-0000-0000-000000000000")
}

/// Removes the containers of an allocation when dropped (also when a test panics).
struct AllocGuard(String);

impl Drop for AllocGuard {
    fn drop(&mut self) {
        remove_containers_with_label(LABEL_ALLOC_ID, &self.0);
    }
}

struct GpuSim {
    live: LiveDriver,
    cfg: tempfile::NamedTempFile,
    _tmp: tempfile::TempDir,
    _cache: tempfile::TempDir,
}

impl GpuSim {
    async fn start(config: serde_json::Value, library: Option<&Path>, extra: &str) -> GpuSim {
        let lib = fake_nvml().unwrap();
        let lib = library.unwrap_or(&lib);
        let cfg = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(cfg.path(), config.to_string()).unwrap();
        let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let nvml = format!("nvml_library = \"{}\"", lib.display());
        let hcl = PluginHcl::new(cache.path()).with("fingerprint_period = \"300ms\"").gpu(&[&nvml, extra]).render();
        let env = [("TMPDIR", tmp.path().to_str().unwrap()), ("FAKE_NVML_CONFIG", cfg.path().to_str().unwrap())];
        let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap().live;
        GpuSim { live, cfg, _tmp: tmp, _cache: cache }
    }

    fn rewrite(&self, config: &serde_json::Value) {
        std::fs::write(self.cfg.path(), config.to_string()).unwrap();
    }

    /// The latest fingerprint that satisfies `pred`.
    async fn fingerprint_where(
        &self,
        within: Duration,
        pred: impl Fn(&FingerprintResponse) -> bool,
    ) -> FingerprintResponse {
        self.live.fingerprint_where(within, pred).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

fn attr(f: &FingerprintResponse, k: &str) -> Option<A> {
    f.attributes.get(k).and_then(|a| a.value.clone())
}

fn s(v: &str) -> Option<A> {
    Some(A::StringVal(v.into()))
}

#[tokio::test]
async fn fingerprint_table() {
    let eight: Vec<serde_json::Value> = (0..8)
        .map(|i| if i < 4 { gpu(i, "NVIDIA H100 80GB HBM3", 81559) } else { gpu(i, "NVIDIA A10", 23028) })
        .collect();
    let mut mig = gpu(0, "NVIDIA A100-SXM4-40GB", 40960);
    mig["mig"] = json!(true);
    mig["mig_devices"] = json!([
        {"uuid": "MIG-11111111-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "memory_mib": 19968},
        {"uuid": "MIG-22222222-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "memory_mib": 19968}
    ]);
    type Check = fn(&FingerprintResponse);
    let cases: Vec<(&str, serde_json::Value, Check)> = vec![
        ("no GPUs", json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": []}), |f| {
            assert_eq!(attr(f, "driver.aimodel.gpu.count"), Some(A::IntVal(0)));
            assert_eq!(attr(f, "driver.aimodel.nvidia.driver_version"), s("550.54.15"));
        }),
        (
            "one GPU",
            json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": [gpu(0, "NVIDIA L4", 23034)]}),
            |f| {
                assert_eq!(attr(f, "driver.aimodel.gpu.count"), Some(A::IntVal(1)));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.name"), s("NVIDIA L4"));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.uuid"), s(&uuid(0)));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.memory_mib"), Some(A::IntVal(23034)));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.compute_capability"), s("8.0"));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.pci_bus_id"), s("00000000:07:00.0"));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.mig"), Some(A::BoolVal(false)));
                assert_eq!(attr(f, "driver.aimodel.nvidia.cuda_driver_version"), s("12.4"));
                assert_eq!(f.health, HealthState::Healthy as i32, "{}", f.health_description);
            },
        ),
        ("eight mixed GPUs", json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": eight}), |f| {
            assert_eq!(attr(f, "driver.aimodel.gpu.count"), Some(A::IntVal(8)));
            assert_eq!(attr(f, "driver.aimodel.gpu.3.name"), s("NVIDIA H100 80GB HBM3"));
            assert_eq!(attr(f, "driver.aimodel.gpu.7.name"), s("NVIDIA A10"));
            assert_eq!(attr(f, "driver.aimodel.gpu.7.uuid"), s(&uuid(7)));
        }),
        ("MIG", json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": [mig]}), |f| {
            assert_eq!(attr(f, "driver.aimodel.gpu.0.mig"), Some(A::BoolVal(true)));
            assert_eq!(attr(f, "driver.aimodel.gpu.0.mig.1.uuid"), s("MIG-22222222-0000-0000-0000-000000000000"));
            assert_eq!(attr(f, "driver.aimodel.gpu.0.mig.0.memory_mib"), Some(A::IntVal(19968)));
        }),
        ("NVML init failure", json!({"init_error": 9, "gpus": [gpu(0, "NVIDIA L4", 23034)]}), |f| {
            assert_eq!(attr(f, "driver.aimodel.gpu.count"), Some(A::IntVal(0)));
            assert!(f.health_description.contains("no GPUs: NVML unavailable"), "{}", f.health_description);
        }),
        (
            "missing symbols",
            json!({"missing": ["nvmlDeviceGetMigMode", "nvmlDeviceGetRetiredPagesPendingStatus"], "gpus": [gpu(0, "NVIDIA L4", 23034)]}),
            |f| {
                assert_eq!(attr(f, "driver.aimodel.gpu.0.mig"), Some(A::BoolVal(false)));
                assert_eq!(attr(f, "driver.aimodel.gpu.0.healthy"), Some(A::BoolVal(true)));
            },
        ),
        (
            "device count missing",
            json!({"missing": ["nvmlDeviceGetCount_v2"], "gpus": [gpu(0, "NVIDIA L4", 23034)]}),
            |f| {
                assert!(f.health_description.contains("NVML device count"), "{}", f.health_description);
            },
        ),
    ];
    for (name, config, check) in cases {
        let sim = GpuSim::start(config, None, "").await;
        let fps = sim.live.wait_fingerprints(1, Duration::from_secs(3)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let f = &fps[0].msg;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(f)));
        sim.live.kill().await.unwrap();
        if let Err(e) = r {
            panic!("case {name:?} failed: {e:?}\n{f:?}");
        }
    }
}

#[tokio::test]
async fn no_library_means_zero_gpus_and_stays_healthy_unless_required() {
    require_docker();
    let missing = Path::new("/nonexistent/libnvidia-ml.so.1");
    let sim = GpuSim::start(json!({}), Some(missing), "").await;
    let f = sim.live.wait_fingerprints(1, Duration::from_secs(3)).await.unwrap()[0].msg.clone();
    assert_eq!(attr(&f, "driver.aimodel.gpu.count"), Some(A::IntVal(0)));
    assert!(f.health_description.contains("/nonexistent/libnvidia-ml.so.1"), "{}", f.health_description);
    sim.live.kill().await.unwrap();
    let sim = GpuSim::start(json!({}), Some(missing), "required = true").await;
    let f = sim.live.wait_fingerprints(1, Duration::from_secs(3)).await.unwrap()[0].msg.clone();
    assert_eq!(f.health, HealthState::Unhealthy as i32);
    assert!(f.health_description.contains("gpu.required"), "{}", f.health_description);
    sim.live.kill().await.unwrap();
}

#[tokio::test]
async fn changes_are_resent_and_a_hung_nvml_does_not_stall_the_stream() {
    let mut config =
        json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": [gpu(0, "NVIDIA L4", 23034)]});
    let sim = GpuSim::start(config.clone(), None, "").await;
    sim.fingerprint_where(Duration::from_secs(3), |f| {
        attr(f, "driver.aimodel.gpu.0.memory_mib") == Some(A::IntVal(23034))
    })
    .await;
    config["driver_version"] = json!("555.42.02");
    sim.rewrite(&config);
    sim.fingerprint_where(Duration::from_secs(3), |f| {
        attr(f, "driver.aimodel.nvidia.driver_version") == s("555.42.02")
    })
    .await;

    // NVML hangs: fingerprints keep coming, the last known GPUs stay, the hang is described.
    config["hang"] = json!(["nvmlDeviceGetCount_v2"]);
    config["hang_ms"] = json!(20_000);
    sim.rewrite(&config);
    let hung_at = Instant::now();
    let f = sim.fingerprint_where(Duration::from_secs(8), |f| f.health_description.contains("NVML")).await;
    assert!(
        f.health_description.contains("did not answer") || f.health_description.contains("still hung"),
        "{}",
        f.health_description
    );
    assert_eq!(attr(&f, "driver.aimodel.gpu.0.uuid"), s(&uuid(0)));
    let before = sim.live.fingerprints.lock().unwrap().items.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sim.live.fingerprints.lock().unwrap().items.len();
    assert!(after > before, "the stream stalled while NVML hung ({:?} in)", hung_at.elapsed());
    sim.live.kill().await.unwrap();
}

#[tokio::test]
async fn fatal_xid_marks_the_gpu_and_its_tasks_then_recovers() {
    if !require_docker() {
        return;
    }
    standin_image().unwrap();
    let mut config = json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": [gpu(0, "NVIDIA L4", 23034), gpu(1, "NVIDIA L4", 23034)]});
    // visible_devices_from = "config": Nomad's device env names the GPU (so the task is
    // affected) but no DeviceRequest is made, since this Docker has no NVIDIA runtime.
    let sim =
        GpuSim::start(config.clone(), None, "visible_devices_from = \"config\"\n      allow_unscheduled = true").await;
    sim.fingerprint_where(Duration::from_secs(3), |f| attr(f, "driver.aimodel.gpu.count") == Some(A::IntVal(2))).await;
    let data = tempfile::tempdir().unwrap();
    let mut b = TaskBuilder::new(
        "gpu-user",
        &format!("engine = \"custom\"\nimage = \"{STANDIN_IMAGE}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\n"),
    );
    b.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), uuid(1));
    let _guard = AllocGuard(b.alloc_id.clone());
    let t = b.build(&sim.live.task_schema, data.path()).unwrap();
    sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap();

    // An application XID is ignored; a fatal one is not.
    config["events"] = json!([{"gpu": 1, "kind": "xid", "data": 13}, {"gpu": 1, "kind": "xid", "data": 79}]);
    config["gpus"][1]["lost"] = json!(true);
    sim.rewrite(&config);
    let ev = sim.live.wait_event(&t.config.id, "failed: XID 79", Duration::from_secs(5)).await.unwrap();
    assert_eq!(ev.annotations.get("gpu"), Some(&uuid(1)));
    assert!(!sim.live.event_messages(&t.config.id).iter().any(|m| m.contains("XID 13")));
    let f = sim
        .fingerprint_where(Duration::from_secs(5), |f| {
            attr(f, "driver.aimodel.gpu.1.healthy") == Some(A::BoolVal(false))
        })
        .await;
    assert!(f.health_description.contains(&uuid(1)), "{}", f.health_description);
    assert_eq!(attr(&f, "driver.aimodel.gpu.0.healthy"), Some(A::BoolVal(true)));

    // NVML reports the GPU usable again: health recovers without a restart.
    config["gpus"][1]["lost"] = json!(false);
    sim.rewrite(&config);
    let f = sim
        .fingerprint_where(Duration::from_secs(5), |f| {
            attr(f, "driver.aimodel.gpu.1.healthy") == Some(A::BoolVal(true))
        })
        .await;
    assert!(!f.health_description.contains("XID"), "{}", f.health_description);

    // Per-task GPU stats come from NVML's process list, matched to the container's pids.
    let state_pid = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label={LABEL_ALLOC_ID}={}", b.alloc_id)])
        .output()
        .unwrap();
    let cid = String::from_utf8_lossy(&state_pid.stdout).trim().to_string();
    let pid = std::process::Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", &cid]).output().unwrap();
    let pid: u32 = String::from_utf8_lossy(&pid.stdout).trim().parse().unwrap();
    config["gpus"][1]["processes"] = json!([{"pid": pid, "used_mib": 2048}, {"pid": 1, "used_mib": 999}]);
    sim.rewrite(&config);
    let req = TaskStatsRequest {
        task_id: t.config.id.clone(),
        collection_interval: Some(prost_types::Duration { seconds: 0, nanos: 300_000_000 }),
    };
    let mut stats = sim.live.process.driver().task_stats(req).await.unwrap().into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(10), stats.message()).await.unwrap().unwrap().unwrap();
    let by = msg.stats.unwrap().resource_usage_by_pid;
    let g = by.get(&format!("gpu:{}", uuid(1))).unwrap_or_else(|| panic!("no GPU entry in {by:?}"));
    assert_eq!(g.memory.as_ref().unwrap().usage, 2048 << 20, "only the task's own processes count");
    assert_eq!(g.cpu.as_ref().unwrap().percent, 37.0);
    drop(stats);
    sim.live
        .process
        .driver()
        .destroy_task(DestroyTaskRequest { task_id: t.config.id.clone(), force: true })
        .await
        .unwrap();
    remove_containers_with_label(LABEL_ALLOC_ID, &b.alloc_id);
    sim.live.kill().await.unwrap();
}

#[tokio::test]
async fn gpu_tasks_never_run_silently_without_gpus() {
    if !require_docker() {
        return;
    }
    standin_image().unwrap();
    let config = json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": [gpu(0, "NVIDIA L4", 23034)]});
    let sim = GpuSim::start(config, None, "").await;
    sim.fingerprint_where(Duration::from_secs(3), |f| attr(f, "driver.aimodel.gpu.count") == Some(A::IntVal(1))).await;
    let data = tempfile::tempdir().unwrap();
    let cfg =
        format!("engine = \"custom\"\nimage = \"{STANDIN_IMAGE}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\n");

    // A GPU this node does not have is refused before anything is created.
    let mut b = TaskBuilder::new("ghost-gpu", &cfg);
    b.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), "GPU-deadbeef-0000-0000-0000-000000000000".into());
    let t = b.build(&sim.live.task_schema, data.path()).unwrap();
    let err = sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("not on this node"), "{}", err.message());

    // A real GPU by exact UUID: this engine has no NVIDIA runtime, so Docker refuses the
    // DeviceRequest and the start fails with its reason, leaving nothing running.
    let mut b = TaskBuilder::new("gpu-task", &cfg);
    b.device_env.insert("NVIDIA_VISIBLE_DEVICES".into(), uuid(0));
    let _guard = AllocGuard(b.alloc_id.clone());
    let t = b.build(&sim.live.task_schema, data.path()).unwrap();
    let err = sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config) }).await.unwrap_err();
    assert!(err.message().contains("nvidia") || err.message().contains("device"), "{}", err.message());
    assert!(aimodel_integration::support::containers_with_label(LABEL_ALLOC_ID, &b.alloc_id).is_empty());
    sim.live.kill().await.unwrap();
}

/// On a machine with a real GPU: `AIMODEL_IT_GPU=1` runs the real NVML through the plugin.
#[tokio::test]
async fn real_gpu_smoke() {
    if std::env::var("AIMODEL_IT_GPU").as_deref() != Ok("1") {
        eprintln!("SKIP: set AIMODEL_IT_GPU=1 on a machine with an NVIDIA GPU to run this");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hcl = "plugin \"nomad-driver-aimodel\" {\n  config {\n    gpu { required = true }\n  }\n}\n";
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), hcl, &[("TMPDIR", tmp.path().to_str().unwrap())])
        .await
        .unwrap()
        .live;
    let f = live.wait_fingerprints(1, Duration::from_secs(5)).await.unwrap()[0].msg.clone();
    assert!(matches!(attr(&f, "driver.aimodel.gpu.count"), Some(A::IntVal(n)) if n > 0), "{f:?}");
    assert!(attr(&f, "driver.aimodel.gpu.0.uuid").is_some());
    live.kill().await.unwrap();
}
