//! What a job can and cannot reach on its node, against the real Docker
//! engine: host paths, GPUs, the cache, networks, devices, memory and logs.

use std::time::{Duration, Instant};

use aimodel_integration::support::standin_image;
use aimodel_integration::task::{free_port, TaskBuilder};
use aimodel_proto::drivers::{ExecTaskRequest, StartTaskRequest, StopTaskRequest};

use aimodel_integration::tasksim::*;

/// What a job author may not do to the node, through the real plugin and
/// Docker: host-path volumes, GPUs Nomad did not assign (by `gpus` or by the
/// task's own `NVIDIA_VISIBLE_DEVICES`) are refused with the option that would
/// allow each; a task that starts sees no GPU and cannot write the shared cache.
#[tokio::test]
async fn job_authors_get_no_host_paths_no_unassigned_gpus_and_a_read_only_cache() {
    let Some(mut sim) = Sim::start().await else { return };
    let refused = [
        ("host-root", custom("volumes = [\"/:/host\"]"), "volumes.enabled"),
        ("docker-sock", custom("volumes = [\"/var/run/docker.sock:/var/run/docker.sock\"]"), "volumes.enabled"),
        ("escape", custom("volumes = [\"../../../../../etc:/x\"]"), "volumes.enabled"),
        ("all-gpus", custom("gpus = \"all\""), "gpu.allow_unscheduled"),
    ];
    for (name, cfg, option) in refused {
        let t = sim.prepare(&TaskBuilder::new(name, &cfg));
        let err =
            sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
        assert!(err.message().contains(option), "{name}: {}", err.message());
        assert_ne!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "{name}: a refusal is final");
    }
    let t = sim.prepare(&TaskBuilder::new("env-gpus", &custom("")).env("NVIDIA_VISIBLE_DEVICES", "all"));
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("gpu.allow_unscheduled"), "{}", err.message());

    // Inside the allocation is fine; the cache is there but read-only.
    let cfg = custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\nvolumes = [\"scratch:/scratch\"]");
    let (t, _) = sim.start_task(&TaskBuilder::new("tenant", &cfg)).await;
    let id = t.config.id.clone();
    let d = sim.live.process.driver();
    let run = |cmd: &str| ExecTaskRequest {
        task_id: id.clone(),
        command: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        timeout: None,
    };
    let r = d.clone().exec_task(run("echo poison > /root/.cache/huggingface/poison")).await.unwrap().into_inner();
    assert_ne!(r.result.unwrap().exit_code, 0, "a task wrote the shared cache");
    assert!(!sim.cache.path().join("poison").exists());
    let r = d.clone().exec_task(run("echo $NVIDIA_VISIBLE_DEVICES; touch /scratch/ok")).await.unwrap().into_inner();
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "void");
    assert_eq!(r.result.unwrap().exit_code, 0);
    sim.destroy(&id).await;
}

/// What Nomad hands the driver, as the docker driver uses it: a group network
/// namespace created by a docker task (its container named in the isolation
/// spec's label) is joined and nothing is published; `memory_max = -1` is a
/// reservation only; device-plugin devices reach the container; Docker logs
/// rotate (json-file, 2m × 2); without a kill_signal the image's STOPSIGNAL is sent.
#[tokio::test]
async fn group_namespace_memory_devices_logs_and_stop_signal_reach_docker() {
    use aimodel_proto::drivers::{network_isolation_spec::NetworkIsolationMode, Device, NetworkIsolationSpec};
    let Some(mut sim) = Sim::start().await else { return };
    let image = standin_image().unwrap();
    // The group's sandbox, as the docker driver's pause container would hold it.
    let sandbox =
        docker_out(&["run", "-d", "--label", "com.aimodel.test=sandbox", "--entrypoint", "/bin/sleep", &image, "600"]);
    let mut b = TaskBuilder::new(
        "grouped",
        &custom("port = \"http\"\nreadiness {\n  path = \"/health\"\n  interval = \"200ms\"\n}\n"),
    )
    .port("http", free_port(), 8000);
    b.isolation = Some(NetworkIsolationSpec {
        mode: NetworkIsolationMode::Group as i32,
        path: format!("/var/run/docker/netns/{}", &sandbox[..12]),
        labels: [("docker_sandbox_container_id".to_string(), sandbox.clone())].into(),
        ..Default::default()
    });
    b.memory_max_mb = -1;
    // The volume hook's mounts: a read-only host volume (a CSI volume arrives the same way).
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("weights"), "w").unwrap();
    b.mounts = vec![aimodel_proto::drivers::Mount {
        task_path: "/volume".into(),
        host_path: volume.path().display().to_string(),
        readonly: true,
        propagation_mode: "private".into(),
        ..Default::default()
    }];
    b.devices = vec![Device {
        task_path: "/dev/aimodel-null".into(),
        host_path: "/dev/null".into(),
        cgroup_permissions: "rwm".into(),
    }];
    let (t, handle) = sim.start_task(&b).await;
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    let c = state.container_id.as_str();
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", c]), format!("container:{sandbox}"));
    assert_eq!(docker_out(&["inspect", "-f", "{{len .HostConfig.PortBindings}}", c]), "0", "nothing published");
    // The server answers on localhost inside the group's namespace (where Envoy would reach it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("docker")
            .args(["exec", &sandbox, "wget", "-qO-", "http://127.0.0.1:8000/health"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the server is not reachable in the group namespace");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.Memory}}", c]), "0", "memory_max = -1: no hard limit");
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.MemoryReservation}}", c]), (256u64 << 20).to_string());
    assert_eq!(docker_out(&["inspect", "-f", "{{.HostConfig.LogConfig.Type}} {{index .HostConfig.LogConfig.Config \"max-size\"}} {{index .HostConfig.LogConfig.Config \"max-file\"}}", c]), "json-file 2m 2");
    docker_out(&["exec", c, "test", "-c", "/dev/aimodel-null"]);
    docker_out(&["exec", c, "test", "-f", "/volume/weights"]);
    let write = std::process::Command::new("docker").args(["exec", c, "touch", "/volume/poison"]).output().unwrap();
    assert!(!write.status.success() && !volume.path().join("poison").exists(), "a read-only volume was written");
    sim.destroy(&t.config.id).await;
    let _ = std::process::Command::new("docker").args(["rm", "-f", &sandbox]).output();

    // STOPSIGNAL: an image that stops on SIGUSR1 only.
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(ctx.path().join("Dockerfile"), format!("FROM {image}\nSTOPSIGNAL SIGUSR1\n")).unwrap();
    let tag = format!("aimodel-stopsignal:{}", aimodel_integration::task::random_hex(4));
    docker_out(&["build", "-q", "-t", &tag, ctx.path().to_str().unwrap()]);
    let cfg = format!(
        "engine = \"custom\"\nimage = \"{tag}\"\nentrypoint = [\"/bin/sh\", \"-c\", \"trap 'echo got-usr1; exit 0' USR1; trap '' TERM; echo armed; while true; do sleep 0.2; done\"]\n"
    );
    let (t, _) = sim.start_task(&TaskBuilder::new("stopsignal", &cfg)).await;
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("armed")).await.unwrap();
    sim.live
        .process
        .driver()
        .stop_task(StopTaskRequest {
            task_id: t.config.id.clone(),
            timeout: Some(prost_types::Duration { seconds: 20, nanos: 0 }),
            signal: String::new(),
        })
        .await
        .unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("got-usr1")).await.unwrap();
    assert_eq!(sim.wait(&t.config.id).await.exit_code, 0, "stopped by its STOPSIGNAL, not killed");
    sim.destroy(&t.config.id).await;
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag]).output();
}

/// The seed's jobs: no group network, `port "http" { to = 8000 host_network = … }`
/// and a server started on `${NOMAD_PORT_http}`. As with the docker driver, the
/// server listens on `to` inside the container and is reachable on the address
/// Nomad picked for the port, and on no other address of the host.
#[tokio::test]
async fn a_port_is_reachable_on_its_host_network_address_only() {
    let Some(mut sim) = Sim::start().await else { return };
    let value = free_port();
    let cfg = custom(
        "port = \"http\"\nentrypoint = [\"/bin/sh\", \"-c\", \"exec /bin/standin --port $NOMAD_PORT_http\"]\nreadiness {\n  path = \"/health\"\n  interval = \"200ms\"\n}",
    );
    let mut b = TaskBuilder::new("lan", &cfg).port("http", value, 8000);
    b.port_ip = "127.0.0.2".into();
    let (t, _) = sim.start_task(&b).await;
    sim.live.wait_event(&t.config.id, "model server ready after", Duration::from_secs(20)).await.unwrap();
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("listening on 0.0.0.0:8000")).await.unwrap();
    let reach = |ip: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect((ip, value)).await else { return String::new() };
        let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n").await;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        body
    };
    assert!(reach("127.0.0.2").await.starts_with("HTTP/1."), "not reachable on the address Nomad picked");
    assert_eq!(reach("127.0.0.1").await, "", "reachable on another address of the host");
    sim.destroy(&t.config.id).await;
}
