//! The agent as a daemon (`aimodel-agent run --config`), end to end: the
//! manifest's models and the models of Nomad jobs (blocking queries against a
//! stand-in Nomad API) are prewarmed from a hub, reported on `/status` and
//! `/metrics`, recorded for the driver, whose fingerprint (the real plugin)
//! then advertises `driver.aimodel.warm.<repo>`; cold models are evicted;
//! SIGTERM stops it cleanly.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aimodel_integration::faulthub::{FaultHub, COMMIT};
use aimodel_integration::nomadapi::NomadApi;
use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence;
use aimodel_integration::support::{agent_status, binary, http_body, wait_agent_status, DRIVER_BIN};
use aimodel_integration::task::free_port;
use aimodel_proto::drivers::FingerprintResponse;
use aimodel_proto::structs::attribute::Value as A;
use hf_cache::state::StateDir;
use hf_cache::{check, Mode, RepoId};

fn model<'a>(st: &'a serde_json::Value, repo: &str) -> Option<&'a serde_json::Value> {
    st["models"].as_array()?.iter().find(|m| m["repo"] == repo)
}

fn warm(f: &FingerprintResponse, repo: &str) -> Option<String> {
    match f.attributes.get(&format!("driver.aimodel.warm.{repo}")).and_then(|a| a.value.clone()) {
        Some(A::StringVal(s)) => Some(s),
        _ => None,
    }
}

fn aimodel_job(id: &str, model: &str) -> serde_json::Value {
    serde_json::json!({
        "ID": id, "Name": id, "Type": "service",
        "TaskGroups": [{"Name": "g", "Tasks": [
            {"Name": "server", "Driver": "aimodel", "Config": {"engine": "vllm", "model": model, "port": "http"}},
            {"Name": "sidecar", "Driver": "docker", "Config": {"image": "busybox", "model": "org/not-ours"}}
        ]}]
    })
}

fn complete(hub: &Path, repo: &str) -> bool {
    check(hub, &RepoId::model(repo), "main", Mode::Quick).is_complete()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_manifest_and_nomad_models_warm_for_the_driver() {
    let content: Vec<u8> =
        (0..1_500_000u32).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap()).collect();
    let hub_server = FaultHub::start(content.clone()).await.unwrap();
    let nomad = NomadApi::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    // A cold model nobody wants: the watermark evicts it.
    aimodel_integration::jobrun::seed_tiny_model(&hub, "org/cold").unwrap();
    let port = free_port();
    let cfg_path = home.path().join("agent.hcl");
    std::fs::write(
        &cfg_path,
        format!(
            r#"hf_home = "{home}"
listen = "127.0.0.1:{port}"
interval = "1h"
models = [
  {{ repo = "org/pinned", pin = true }},
]
nomad {{
  address = "{nomad}"
  token   = "nomad-secret-token"
  wait    = "20s"
}}
gc {{
  max_size = "1"
}}
"#,
            home = home.path().display(),
            nomad = nomad.address()
        ),
    )
    .unwrap();
    let log = home.path().join("agent.log");
    let mut agent = tokio::process::Command::new(binary("aimodel-agent").unwrap())
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("HF_ENDPOINT", hub_server.endpoint())
        .env("HF_TOKEN", "hf-secret-token")
        .env("AIMODEL_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The manifest's model is prewarmed; the cold one is evicted.
    wait_agent_status(port, Duration::from_secs(60), "org/pinned warm", |st| {
        model(st, "org/pinned").is_some_and(|m| m["state"] == "warm")
    })
    .await;
    assert!(complete(&hub, "org/pinned"));
    let cold = hub.join("models--org--cold");
    wait_agent_status(port, Duration::from_secs(10), "org/cold evicted", |st| {
        st["counters"]["evicted_models"] == 1 && !cold.exists()
    })
    .await;
    // The gc after the pinned model's prewarm keeps it (the first ran before it existed).
    wait_agent_status(port, Duration::from_secs(10), "a gc that keeps org/pinned", |st| {
        st["gc"]["kept"]["org/pinned"] == "pinned"
    })
    .await;
    let st = agent_status(port).await;
    assert_eq!(model(&st, "org/pinned").unwrap()["commit"], COMMIT);
    assert_eq!(model(&st, "org/pinned").unwrap()["bytes_done"], content.len() as u64);

    // The driver (the real plugin, through the Nomad-client simulator) reads the warm record.
    let client_hcl = PluginHcl::new(home.path()).hf_cache("min_free = \"1MB\"").render();
    let tmp = tempfile::tempdir().unwrap();
    let report =
        sequence::start(&binary(DRIVER_BIN).unwrap(), &client_hcl, &[("TMPDIR", tmp.path().to_str().unwrap())])
            .await
            .unwrap();
    let live = report.live;
    let f = live.fingerprint_where(Duration::from_secs(15), |f| warm(f, "org/pinned").is_some()).await.unwrap();
    assert_eq!(warm(&f, "org/pinned").as_deref(), Some(COMMIT));
    assert_eq!(warm(&f, "org/fromjob"), None);

    // A job registered with Nomad: its aimodel task's model is prewarmed without polling.
    nomad.register("prod", aimodel_job("chat", "org/fromjob"));
    wait_agent_status(port, Duration::from_secs(60), "org/fromjob warm", |st| {
        model(st, "org/fromjob").is_some_and(|m| m["state"] == "warm" && m["sources"][0] == "nomad")
    })
    .await;
    assert!(complete(&hub, "org/fromjob"));
    let st = agent_status(port).await;
    assert!(model(&st, "org/not-ours").is_none(), "a docker task's config is not ours: {st:#}");
    assert_eq!(st["nomad"]["jobs"]["prod/chat"][0], "org/fromjob@main", "{st:#}");
    let f = live.fingerprint_where(Duration::from_secs(15), |f| warm(f, "org/fromjob").is_some()).await.unwrap();
    assert_eq!(warm(&f, "org/fromjob").as_deref(), Some(COMMIT));

    let metrics = http_body(port, "/metrics").await;
    assert!(metrics.contains("aimodel_agent_model_warm{repo=\"org/fromjob\",revision=\"main\"} 1"), "{metrics}");
    assert!(metrics.contains("aimodel_agent_downloads_in_flight 0"), "{metrics}");
    assert!(metrics.contains("aimodel_agent_failures_total 0"), "{metrics}");
    assert!(metrics.contains("aimodel_agent_evicted_models_total 1"), "{metrics}");
    let downloaded: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("aimodel_agent_downloaded_bytes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(downloaded, 2 * content.len() as u64, "{metrics}");
    assert_eq!(
        hub_server.log.lock().unwrap().body_bytes.values().sum::<u64>(),
        2 * content.len() as u64,
        "the hub served each model once"
    );
    assert_eq!(http_body(port, "/health").await.trim(), "{\"status\":\"ok\"}");

    // The job stops: its model is no longer wanted, so the watermark evicts it
    // and the driver stops advertising it.
    nomad.stop("chat");
    wait_agent_status(port, Duration::from_secs(20), "org/fromjob evicted", |st| {
        model(st, "org/fromjob").is_none() && st["counters"]["evicted_models"] == 2
    })
    .await;
    assert!(!hub.join("models--org--fromjob").exists());
    assert!(StateDir::for_hub(&hub).warm().iter().all(|r| r.repo != "org/fromjob"));
    live.fingerprint_where(Duration::from_secs(15), |f| {
        warm(f, "org/fromjob").is_none() && warm(f, "org/pinned").is_some()
    })
    .await
    .unwrap();
    assert!(complete(&hub, "org/pinned"), "a pinned model stays");

    // Blocking queries, not polling: every list query carries the last index
    // and the wait; a handful over the whole test; the ACL token was sent.
    let seen = nomad.seen();
    let lists: Vec<_> = seen.iter().filter(|s| s.path.starts_with("/v1/jobs")).collect();
    assert!(lists.iter().all(|s| s.path.contains("wait=20s") && s.path.contains("namespace=*")), "{lists:?}");
    assert!(lists.iter().skip(1).all(|s| !s.path.contains("index=0")), "{lists:?}");
    assert!(lists.len() <= 8, "{} list queries: polling? {lists:?}", lists.len());
    assert!(seen.iter().all(|s| s.token.as_deref() == Some("nomad-secret-token")));

    // SIGTERM: a clean exit; no lease left; no secret in the log.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await.unwrap().unwrap();
    assert!(code.success(), "{code:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("model is warm"), "{text}");
    assert!(!text.contains("secret-token"), "a token was logged: {text}");
    for e in walk(&hub) {
        assert!(!e.ends_with(".lease") && !e.ends_with(".incomplete"), "left behind: {e}");
    }
    live.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_check_validates_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.hcl");
    std::fs::write(&bad, "hf_home = \"/x\"\nmodels = [{ repo = \"no--double-dash\" }]\n").unwrap();
    let out = std::process::Command::new(binary("aimodel-agent").unwrap())
        .args(["run", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.hcl") && err.contains("models[0].repo"), "{err}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Four daemons (separate processes) on one cache directory, one three-model
/// manifest, started together: every agent reports all three warm, the hub
/// served each model's bytes exactly once (counted at the server), and deep
/// verification passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_daemons_with_one_manifest_fetch_each_blob_once() {
    let content: Vec<u8> =
        (0..2_000_000u32).map(|i| u8::try_from((i.wrapping_mul(2_246_822_519) >> 7) & 0xff).unwrap()).collect();
    let hub_server = FaultHub::start(content.clone()).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    let models = ["org/alpha", "org/beta", "org/gamma"];
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for i in 0..4 {
        let port = free_port();
        let cfg = home.path().join(format!("agent{i}.hcl"));
        let list: Vec<String> = models.iter().map(|m| format!("  {{ repo = \"{m}\" }},")).collect();
        std::fs::write(
            &cfg,
            format!(
                "hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nheartbeat = \"200ms\"\nmodels = [\n{}\n]\n",
                home.path().display(),
                list.join("\n")
            ),
        )
        .unwrap();
        agents.push(
            tokio::process::Command::new(binary("aimodel-agent").unwrap())
                .args(["run", "--config"])
                .arg(&cfg)
                .env("HF_ENDPOINT", hub_server.endpoint())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        ports.push(port);
    }
    for port in &ports {
        wait_agent_status(*port, Duration::from_secs(60), "three models warm", |st| {
            models.iter().all(|m| model(st, m).is_some_and(|s| s["state"] == "warm" && s["commit"] == COMMIT))
        })
        .await;
    }
    let served = hub_server.log.lock().unwrap().body_bytes.clone();
    for m in models {
        assert_eq!(served.get(m).copied(), Some(content.len() as u64), "{m}: {served:?}");
        let r = check(&hub, &RepoId::model(m), "main", Mode::Deep);
        assert!(r.is_complete() && r.verifiable, "{m}: {:?}", r.findings);
    }
    let mut downloaded = 0u64;
    for port in &ports {
        let metrics = http_body(*port, "/metrics").await;
        downloaded += metrics
            .lines()
            .find_map(|l| l.strip_prefix("aimodel_agent_downloaded_bytes_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap();
    }
    assert_eq!(downloaded, 3 * content.len() as u64, "the agents' own counts agree with the server's");
    for a in agents.iter_mut() {
        let _ = a.kill().await;
    }
}

/// Inside a Nomad task the agent reaches Nomad through the task API socket
/// (`${NOMAD_SECRETS_DIR}/api.sock`) with the task's workload identity, so no
/// token crosses the network; a token bound for plain http on another host is
/// refused at start. `/status` (every job and model) needs the status token
/// when one is set, and idle connections do not keep `/health` from answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_through_the_task_socket_a_guarded_status_and_health_under_pressure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let home = tempfile::tempdir().unwrap();
    let secrets = home.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let nomad = NomadApi::start_unix(&secrets.join("api.sock")).await.unwrap();
    nomad.register("default", aimodel_job("chat", "org/over-socket"));
    let port = free_port();
    let cfg_path = home.path().join("agent.hcl");
    std::fs::write(
        &cfg_path,
        format!(
            "hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninterval = \"1h\"\nstatus_token = \"status-s3cret\"\nnomad {{\n  wait = \"20s\"\n}}\n",
            home.path().display()
        ),
    )
    .unwrap();
    let log = home.path().join("agent.log");
    let mut agent = tokio::process::Command::new(binary("aimodel-agent").unwrap())
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env_remove("NOMAD_ADDR")
        .env("NOMAD_SECRETS_DIR", &secrets)
        .env("NOMAD_TOKEN", "workload-identity-jwt")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let get = |path: &'static str, auth: Option<&'static str>| async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return String::new() };
        let auth = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = get("/status", Some("status-s3cret")).await;
        if st.contains("org/over-socket") {
            break;
        }
        assert!(Instant::now() < deadline, "the job behind the task socket was not seen: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(nomad.seen().iter().all(|s| s.token.as_deref() == Some("workload-identity-jwt")));
    let anonymous = get("/status", None).await;
    assert!(anonymous.starts_with("HTTP/1.1 401") && !anonymous.contains("org/over-socket"), "{anonymous}");
    let wrong = get("/status", Some("status-s3cre")).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");

    // Idle clients that never send a request hold no slot /health needs.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let health = tokio::time::timeout(Duration::from_secs(10), get("/health", None)).await.expect("/health hung");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    drop(idle);
    let _ = agent.kill().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("status-s3cret") && !logged.contains("workload-identity-jwt"), "a secret was logged");

    // A token for another host over plain http is refused before anything is sent.
    let insecure = home.path().join("insecure.hcl");
    std::fs::write(&insecure, "hf_home = \"/x\"\nnomad {\n  address = \"http://10.1.2.3:4646\"\n  token = \"t\"\n}\n")
        .unwrap();
    let out = std::process::Command::new(binary("aimodel-agent").unwrap())
        .args(["run", "--check", "--config"])
        .arg(&insecure)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clear text") && err.contains("insecure_http"), "{err}");
}
