//! TaskStats against the real Docker engine: CPU percentages as the docker
//! driver reports them, and cgroup counters.

use std::time::Duration;

use aimodel_integration::support::{require_docker, standin_image};
use aimodel_integration::task::TaskBuilder;
use aimodel_proto::drivers::TaskStatsRequest;

use aimodel_integration::tasksim::*;

/// TaskStats as Nomad reads them (`drivers/docker/util/stats_posix.go`): CPU
/// figures are percentages, not cumulative times; a container spinning one
/// core shows about 100 %; user mode dominates; memory comes from the cgroup.
#[tokio::test]
async fn cpu_stats_are_percentages_like_the_docker_drivers() {
    let Some(mut sim) = Sim::start().await else { return };
    let cfg = custom("entrypoint = [\"/bin/sh\", \"-c\", \"while :; do :; done\"]");
    let (t, _) = sim.start_task(&TaskBuilder::new("spinner", &cfg)).await;
    let req = TaskStatsRequest {
        task_id: t.config.id.clone(),
        collection_interval: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
    };
    let mut stats = sim.live.process.driver().task_stats(req).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let s = tokio::time::timeout(Duration::from_secs(10), stats.message()).await.unwrap().unwrap().unwrap();
        seen.push(s.stats.unwrap().agg_resource_usage.unwrap());
    }
    drop(stats);
    sim.destroy(&t.config.id).await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let last = seen.last().unwrap();
    let cpu = last.cpu.clone().unwrap();
    // Bounded by the cores (cumulative milliseconds of a spinning process would
    // pass that within seconds); well above zero even when other tests share the CPU.
    assert!(cpu.percent > 5.0 && cpu.percent <= 100.0 * cores + 5.0, "one spinning core: {cpu:?}");
    // User time is tick-accounted and total time exact (cgroup v1), so their ratio
    // can pass 1 a little; cumulative milliseconds would be in the thousands.
    assert!(cpu.user_mode > cpu.system_mode && cpu.user_mode <= 150.0 * cores, "{cpu:?}");
    assert!(cpu.system_mode >= 0.0, "{cpu:?}");
    assert!(cpu.total_ticks > 0.0, "{cpu:?}");
    assert!(last.memory.clone().unwrap().usage > 0);
}

#[test]
fn the_cgroup_counters_of_a_spinning_container_are_read() {
    if !require_docker() {
        return;
    }
    let image = standin_image().unwrap();
    let id = docker_out(&[
        "run",
        "-d",
        "--label",
        "com.aimodel.test=cgroup",
        "--entrypoint",
        "/bin/sh",
        &image,
        "-c",
        "while :; do :; done",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let pid: i64 = docker_out(&["inspect", "-f", "{{.State.Pid}}", &id]).parse().unwrap();
    let files = aimodel_driver::runtime::cgroup::locate(pid, std::path::Path::new("/sys/fs/cgroup"))
        .expect("the container's cgroup");
    let ours = aimodel_driver::runtime::cgroup::sample(&files).expect("readable counters");
    let _ = std::process::Command::new("docker").args(["rm", "-f", &id]).output();
    // Two seconds of one spinning core.
    assert!(ours.cpu_total_ns > 1_000_000_000, "{ours:?}");
    assert!(ours.cpu_user_ns > ours.cpu_kernel_ns, "{ours:?}");
    assert!(ours.mem_usage > 0 && ours.system_cpu_ns > ours.cpu_total_ns, "{ours:?}");
}
