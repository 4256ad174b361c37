//! The plugin binary launched exactly as a Nomad client launches it.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use aimodel_driver::config::PLUGIN_SCHEMA;
use aimodel_driver::nomad::cty::{encode, Value};
use aimodel_driver::nomad::hclspec::default_value;
use aimodel_integration::plugin::{check_hclog_line, Launch, PluginProcess, COOKIE_KEY};
use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence;
use aimodel_integration::support::{binary, require_docker, DRIVER_BIN};
use aimodel_proto::base::{PluginInfoRequest, SetConfigRequest};
use aimodel_proto::drivers::fingerprint_response::HealthState;
use aimodel_proto::drivers::{FingerprintRequest, TaskEventsRequest};
use nix::sys::signal::Signal;

fn launch(tmp: &tempfile::TempDir) -> Launch {
    Launch::nomad(&binary(DRIVER_BIN).unwrap())
        .env("TMPDIR", Some(tmp.path().to_str().unwrap()))
        .env("AIMODEL_LOG", Some("debug"))
}

fn entries(dir: &tempfile::TempDir) -> Vec<String> {
    std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect()
}

fn client_hcl(extra: &str) -> String {
    let cache = std::env::temp_dir().join("aimodel-protocol-test-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let plugin =
        PluginHcl::new(&cache).with("fingerprint_period = \"300ms\"").with(extra).hf_cache("min_free = \"1MiB\"");
    format!("plugin_dir = \"/opt/nomad/plugins\"\n{plugin}")
}

#[tokio::test]
async fn handshake_is_the_only_stdout_line_and_stderr_is_hclog() {
    let tmp = tempfile::tempdir().unwrap();
    let p = PluginProcess::launch(&launch(&tmp)).await.unwrap();
    assert_eq!(p.handshake.app_version, 2);
    assert_eq!(p.handshake.network, "unix");
    assert!(p.handshake_line.ends_with("|grpc|"), "{}", p.handshake_line);
    let socket = p.socket();
    assert_eq!(socket.parent().unwrap(), tmp.path());
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let info = p.base().plugin_info(PluginInfoRequest {}).await.unwrap().into_inner();
    sequence::check_plugin_info(&info).unwrap();
    assert_eq!(info.name, "aimodel");
    assert_eq!(info.plugin_api_versions, ["0.1.0"]);

    let stderr = p.stderr.clone();
    let stdout = p.extra_stdout.clone();
    let (graceful, took) = p.kill().await.unwrap();
    assert!(graceful, "plugin did not stop within 2s of Shutdown ({took:?})");
    assert!(!socket.exists(), "socket left behind");
    assert!(stdout.lock().unwrap().is_empty(), "extra stdout: {:?}", stdout.lock().unwrap());
    let lines = stderr.lock().unwrap().clone();
    assert!(lines.len() >= 2, "expected log lines, got {lines:?}");
    for l in &lines {
        check_hclog_line(l).unwrap();
    }
}

#[tokio::test]
async fn missing_or_wrong_cookie_is_refused() {
    for cookie in [None, Some("wrong")] {
        let tmp = tempfile::tempdir().unwrap();
        let r = PluginProcess::refuse(&launch(&tmp).env(COOKIE_KEY, cookie)).await.unwrap();
        assert_eq!(r.code, Some(1), "{r:?}");
        assert!(r.stdout.is_empty(), "stdout: {}", r.stdout);
        assert!(r.stderr.contains("plugin"), "stderr: {}", r.stderr);
        assert!(entries(&tmp).is_empty(), "left behind: {:?}", entries(&tmp));
    }
}

#[tokio::test]
async fn protocol_version_2_is_required() {
    let tmp = tempfile::tempdir().unwrap();
    let r = PluginProcess::refuse(&launch(&tmp).env("PLUGIN_PROTOCOL_VERSIONS", Some("1"))).await.unwrap();
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("PLUGIN_PROTOCOL_VERSIONS"), "{}", r.stderr);
    assert!(entries(&tmp).is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let p = PluginProcess::launch(&launch(&tmp).env("PLUGIN_PROTOCOL_VERSIONS", Some("1,2"))).await.unwrap();
    p.kill().await.unwrap();
}

#[tokio::test]
async fn socket_goes_to_plugin_unix_socket_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = PluginProcess::launch(&launch(&tmp).env("PLUGIN_UNIX_SOCKET_DIR", Some(dir.path().to_str().unwrap())))
        .await
        .unwrap();
    assert_eq!(p.socket().parent().unwrap(), dir.path());
    p.kill().await.unwrap();
    assert!(entries(&dir).is_empty());
}

#[tokio::test]
async fn full_start_sequence() {
    let docker = require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let env = [("TMPDIR", tmp.path().to_str().unwrap())];
    let report = sequence::start(&binary(DRIVER_BIN).unwrap(), &client_hcl(""), &env).await.unwrap();
    assert!(report.fingerprint_process.exited_gracefully);
    assert!(report.validation_process.exited_gracefully);
    for l in report.validation_process.stderr.iter().chain(&report.fingerprint_process.stderr) {
        check_hclog_line(l).unwrap();
    }
    let live = report.live;
    assert_eq!(live.info.name, "aimodel");
    assert!(live.capabilities.send_signals && live.capabilities.exec);

    let first = live.wait_fingerprints(1, Duration::from_secs(1)).await.expect("first fingerprint within 1s");
    let fp = &first[0].msg;
    assert!(first[0].at.duration_since(live.fingerprint_opened) < Duration::from_secs(1));
    assert!(fp.attributes.contains_key("driver.aimodel"));
    assert!(fp.attributes.contains_key("driver.aimodel.version"));
    if docker {
        assert_eq!(fp.health, HealthState::Healthy as i32, "{}", fp.health_description);
        assert!(fp.attributes.contains_key("driver.aimodel.docker.version"));
    }

    // Periodic messages at the configured 300ms period.
    let all = live.wait_fingerprints(4, Duration::from_secs(5)).await.unwrap();
    for pair in all.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(gap >= Duration::from_millis(200), "fingerprints {gap:?} apart with a 300ms period");
    }
    let socket = live.process.socket();
    let (graceful, took) = live.kill().await.unwrap();
    assert!(graceful && took < Duration::from_secs(2), "graceful={graceful} took={took:?}");
    assert!(!socket.exists());
}

#[tokio::test]
async fn unreachable_docker_is_undetected_with_the_endpoint_named() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("TMPDIR", tmp.path().to_str().unwrap())];
    let hcl = client_hcl(r#"endpoint = "unix:///nonexistent/docker.sock""#);
    let report = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap();
    let fps = report.live.wait_fingerprints(1, Duration::from_secs(1)).await.unwrap();
    let fp = &fps[0].msg;
    // Never reached: the driver is undetected on this node, as the docker driver reports it.
    assert_eq!(fp.health, HealthState::Undetected as i32);
    assert!(
        fp.health_description.contains("docker daemon unreachable at unix:///nonexistent/docker.sock"),
        "{}",
        fp.health_description
    );
    report.live.kill().await.unwrap();
}

fn with(pairs: &[(&str, Value)]) -> Vec<u8> {
    let Value::Map(mut m) = default_value(PLUGIN_SCHEMA, false) else { unreachable!() };
    for (k, v) in pairs {
        m.insert((*k).to_string(), v.clone());
    }
    encode(&Value::Map(m))
}

#[tokio::test]
async fn bad_set_config_is_invalid_argument_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let p = PluginProcess::launch(&launch(&tmp)).await.unwrap();
    let mut unknown = with(&[]);
    // Replace the value of `allow_privileged` (false, 0xc2) by the unknown extension.
    let key = b"\xb0allow_privileged";
    let at = unknown.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    assert_eq!(unknown[at], 0xc2);
    unknown.splice(at..=at, [0xd4, 0x00, 0x00]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong type", with(&[("allow_privileged", Value::List(vec![]))]), "allow_privileged"),
        (
            "wrong type in block",
            with(&[("gpu", Value::object([("enabled", Value::str("yes please"))]))]),
            "gpu.enabled",
        ),
        ("negative size", with(&[("hf_cache", Value::object([("min_free", Value::int(-5))]))]), "hf_cache.min_free"),
        ("negative duration", with(&[("fingerprint_period", Value::str("-30s"))]), "fingerprint_period"),
        (
            "unknown enum value",
            with(&[("gpu", Value::object([("visible_devices_from", Value::str("magic"))]))]),
            "gpu.visible_devices_from",
        ),
        ("unknown attribute", with(&[("dockr_endpoint", Value::str("x"))]), "dockr_endpoint"),
        ("garbage bytes", vec![0xc1, 0xff, 0x00, 0x13], "msgpack"),
        ("unknown value", unknown, "allow_privileged"),
    ];
    for (what, bytes, field) in cases {
        let err = p
            .base()
            .set_config(SetConfigRequest {
                msgpack_config: bytes,
                nomad_config: None,
                plugin_api_version: "0.1.0".into(),
            })
            .await
            .expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(field), "{what}: {:?} does not name {field}", err.message());
        // Still serving.
        p.base().plugin_info(PluginInfoRequest {}).await.unwrap();
    }
    p.base()
        .set_config(SetConfigRequest {
            msgpack_config: with(&[]),
            nomad_config: None,
            plugin_api_version: "0.1.0".into(),
        })
        .await
        .unwrap();
    p.kill().await.unwrap();
}

#[tokio::test]
async fn sigint_is_ignored_and_sigterm_exits_zero_with_streams_open() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = PluginProcess::launch(&launch(&tmp)).await.unwrap();
    let mut fp = p.driver().fingerprint(FingerprintRequest {}).await.unwrap().into_inner();
    let _events = p.driver().task_events(TaskEventsRequest {}).await.unwrap().into_inner();
    fp.message().await.unwrap().unwrap();

    p.signal(Signal::SIGINT).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.base().plugin_info(PluginInfoRequest {}).await.expect("still serving after SIGINT");
    assert!(p.child.try_wait().unwrap().is_none(), "SIGINT killed the plugin");

    let socket = p.socket();
    let sent = Instant::now();
    p.signal(Signal::SIGTERM).unwrap();
    let status = p.wait_exit(Duration::from_secs(3)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(sent.elapsed() < Duration::from_secs(2), "took {:?}", sent.elapsed());
    assert!(!socket.exists());
}

#[tokio::test]
async fn closed_stderr_does_not_kill_the_plugin() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = PluginProcess::launch(&launch(&tmp)).await.unwrap();
    p.close_stderr();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Each SetConfig logs a line (EPIPE now), and failures log at error level.
    for _ in 0..20 {
        let _ = p
            .base()
            .set_config(SetConfigRequest {
                msgpack_config: with(&[]),
                nomad_config: None,
                plugin_api_version: "0.1.0".into(),
            })
            .await;
        let _ = p
            .base()
            .set_config(SetConfigRequest {
                msgpack_config: vec![0xc1],
                nomad_config: None,
                plugin_api_version: "0.1.0".into(),
            })
            .await;
    }
    p.base().plugin_info(PluginInfoRequest {}).await.expect("alive after EPIPE");
    assert!(p.child.try_wait().unwrap().is_none());
    let (graceful, _) = p.kill().await.unwrap();
    assert!(graceful);
}

#[tokio::test]
async fn reattach_keeps_the_configuration_without_set_config() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("TMPDIR", tmp.path().to_str().unwrap())];
    let hcl = client_hcl(r#"endpoint = "unix:///nonexistent/reattach.sock""#);
    let report = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap();
    let mut live = report.live;
    live.wait_fingerprints(1, Duration::from_secs(1)).await.unwrap();

    // The client "crashes": its connection goes away, the plugin stays. The next
    // client reconnects to the saved address with no handshake and no SetConfig.
    let handshake = live.process.handshake.clone();
    live.process.channel = aimodel_integration::plugin::connect(&handshake).await.unwrap();
    let info = live.process.base().plugin_info(PluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "aimodel");
    let mut fp = live.process.driver().fingerprint(FingerprintRequest {}).await.unwrap().into_inner();
    let msg = fp.message().await.unwrap().unwrap();
    assert!(msg.health_description.contains("/nonexistent/reattach.sock"), "config lost: {}", msg.health_description);
    live.kill().await.unwrap();
}

#[tokio::test]
async fn the_fingerprint_reports_the_cache_mount_and_its_health() {
    let docker = require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mountinfo = tmp.path().join("mountinfo");
    let run = |fstype: &'static str, opts: &'static str| {
        let mountinfo = mountinfo.clone();
        let (tmp, cache) = (tmp.path().to_path_buf(), cache.path().to_path_buf());
        async move {
            std::fs::write(
                &mountinfo,
                format!(
                    "22 1 259:2 / / rw,relatime - ext4 /dev/root rw\n101 22 0:52 / {} rw,relatime - {fstype} nas:/hf {opts}\n",
                    cache.display()
                ),
            )
            .unwrap();
            let hcl = PluginHcl::new(&cache)
                .hf_cache("require_nfs = true")
                .hf_cache("min_free = \"1MiB\"")
                .default_gpu()
                .render();
            let env = [("TMPDIR", tmp.to_str().unwrap()), ("AIMODEL_MOUNTINFO", mountinfo.to_str().unwrap())];
            let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &env).await.unwrap().live;
            let fp = live.wait_fingerprints(1, Duration::from_secs(2)).await.unwrap()[0].msg.clone();
            live.kill().await.unwrap();
            fp
        }
    };
    let string_attr = |fp: &aimodel_proto::drivers::FingerprintResponse, k: &str| match fp
        .attributes
        .get(k)
        .and_then(|a| a.value.clone())
    {
        Some(aimodel_proto::structs::attribute::Value::StringVal(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    let nfs = run("nfs4", "rw,vers=4.2,hard,nolock").await;
    assert_eq!(string_attr(&nfs, "driver.aimodel.hf_cache.fstype"), "nfs4");
    assert_eq!(string_attr(&nfs, "driver.aimodel.hf_cache.nfs.version"), "4.2");
    assert_eq!(string_attr(&nfs, "driver.aimodel.hf_cache.path"), cache.path().display().to_string());
    if docker {
        assert_eq!(nfs.health, HealthState::Healthy as i32, "{}", nfs.health_description);
    }
    let local = run("ext4", "rw").await;
    assert_eq!(local.health, HealthState::Unhealthy as i32);
    assert!(local.health_description.contains("not NFS"), "{}", local.health_description);
}
