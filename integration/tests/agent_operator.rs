//! What an operator relies on in the daemon: a model whose job is removed is
//! abandoned (its downloads stop, the byte counter never goes down), and
//! `/health` says when the agent cannot do its job.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aimodel_integration::faulthub::FaultHub;
use aimodel_integration::nomadapi::NomadApi;
use aimodel_integration::support::{binary, http_body};
use aimodel_integration::task::free_port;
use hf_cache::{check, Mode, RepoId};

/// The status line and body of `GET path`.
async fn http_get(port: u16, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (String::new(), String::new());
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

fn aimodel_job(id: &str, model: &str) -> serde_json::Value {
    serde_json::json!({
        "ID": id, "Name": id, "Type": "service",
        "TaskGroups": [{"Name": "g", "Tasks": [
            {"Name": "server", "Driver": "aimodel", "Config": {"engine": "vllm", "model": model, "port": "http"}}
        ]}]
    })
}

fn spawn_agent(cfg: &Path, endpoint: &str, log: &Path, format: &str) -> tokio::process::Child {
    tokio::process::Command::new(binary("aimodel-agent").unwrap())
        .env("AIMODEL_LOG_FORMAT", format)
        .args(["run", "--config"])
        .arg(cfg)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .env("AIMODEL_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// One sample of the downloaded-bytes counter.
async fn sample(port: u16, samples: &mut Vec<u64>) {
    let m = http_body(port, "/metrics").await;
    if let Some(v) = metric(&m, "aimodel_agent_downloaded_bytes_total") {
        samples.push(v);
    }
}

async fn until(within: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !pred() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_job_is_removed_is_abandoned_and_its_downloads_stop() {
    // 40 MB from a hub that sends 64 KiB every 20 ms: about 12 s for the whole file.
    let content: Vec<u8> =
        (0..40_000_000u32).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap()).collect();
    let hub_server = FaultHub::start(content.clone()).await.unwrap();
    let nomad = NomadApi::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = home.path().join("agent.hcl");
    std::fs::write(
        &cfg,
        format!(
            "hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninterval = \"1h\"\nnomad {{\n  address = \"{}\"\n  wait = \"20s\"\n}}\n",
            home.path().display(),
            nomad.address()
        ),
    )
    .unwrap();
    let log = home.path().join("agent.log");
    let _agent = spawn_agent(&cfg, &hub_server.endpoint(), &log, "text");
    let served = || hub_server.log.lock().unwrap().body_bytes.get("slow/big").copied().unwrap_or(0);
    let mut samples: Vec<u64> = Vec::new();

    nomad.register("default", aimodel_job("big", "slow/big"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sample(port, &mut samples).await;
        if samples.last().is_some_and(|&v| v >= 2 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "no bytes flowed; log:\n{}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served() > 0);

    nomad.stop("big");
    until(Duration::from_secs(30), "the abandonment logged", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("abandoning slow/big: no longer wanted")
    })
    .await;
    // Let what was in flight drain, then the served bytes must stand still.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sample(port, &mut samples).await;
    let first = served();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sample(port, &mut samples).await;
    let second = served();
    assert_eq!(first, second, "the hub still serves an abandoned model's download");
    assert!(second < content.len() as u64, "the download was not stopped: {second} bytes served");
    assert!(
        !check(&home.path().join("hub"), &RepoId::model("slow/big"), "main", Mode::Quick).is_complete(),
        "an abandoned model was published"
    );
    for _ in 0..5 {
        sample(port, &mut samples).await;
    }
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "the downloaded-bytes counter went down: {samples:?}");
    assert!(samples.last().is_some_and(|&v| v >= 2 << 20), "the abandoned bytes were dropped: {samples:?}");
}

fn write_config(home: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let cfg = home.join("agent.hcl");
    std::fs::write(
        &cfg,
        format!("hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninterval = \"1h\"\n{extra}", home.display()),
    )
    .unwrap();
    cfg
}

async fn wait_health(port: u16, within: Duration, want: &str, log: &Path) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(port, "/health").await;
        if status.contains(want) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/health not {want} within {within:?}: {status} {body}\nlog:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_while_the_cache_is_not_writable_and_recovers() {
    let hub_server = FaultHub::start(vec![1, 2, 3]).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    // The agent's state directory is a regular file: nothing can be written there (root included).
    let state = home.path().join("aimodel");
    std::fs::write(&state, b"not a directory").unwrap();
    let port = free_port();
    let cfg = write_config(home.path(), port, "");
    let log = home.path().join("agent.log");
    let _agent = spawn_agent(&cfg, &hub_server.endpoint(), &log, "text");

    let body = wait_health(port, Duration::from_secs(30), "503", &log).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "unhealthy", "{body}");
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("the cache is not writable") && reasons.contains("aimodel"), "{body}");
    let m = http_body(port, "/metrics").await;
    assert_eq!(metric(&m, "aimodel_agent_cache_writable"), Some(0), "{m}");
    assert_eq!(metric(&m, "aimodel_agent_healthy"), Some(0), "{m}");
    let st: serde_json::Value = serde_json::from_str(&http_body(port, "/status").await).unwrap();
    assert_eq!(st["health"]["ok"], false, "{st:#}");

    // Fixed: the next probe finds it writable.
    std::fs::remove_file(&state).unwrap();
    let body = wait_health(port, Duration::from_secs(30), "200", &log).await;
    assert_eq!(body.trim(), "{\"status\":\"ok\"}");
    let m = http_body(port, "/metrics").await;
    assert_eq!(metric(&m, "aimodel_agent_cache_writable"), Some(1), "{m}");
    assert_eq!(metric(&m, "aimodel_agent_healthy"), Some(1), "{m}");
    let st: serde_json::Value = serde_json::from_str(&http_body(port, "/status").await).unwrap();
    assert_eq!(st["health"]["ok"], true, "{st:#}");
    // stderr is a file, not a terminal: no colours; AIMODEL_LOG=debug shows our
    // modules, not HTTP/2 frames.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("the cache is not writable") && logged.contains("aimodel_agent"), "{logged}");
    assert!(!logged.contains('\u{1b}'), "ANSI escapes in a non-terminal log:\n{logged}");
    assert!(!logged.lines().any(|l| l.contains(" h2::") || l.contains(" hyper")), "{logged}");
}

/// Nomad configured and not answering (nothing listens at its address): once
/// `nomad.health_grace` has passed, `/health` fails and says so; the metric of
/// the watch's errors counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_while_nomad_does_not_answer() {
    let hub_server = FaultHub::start(vec![1, 2, 3]).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let (port, nomad_port) = (free_port(), free_port());
    let cfg = write_config(
        home.path(),
        port,
        &format!("nomad {{\n  address = \"http://127.0.0.1:{nomad_port}\"\n  health_grace = \"2s\"\n}}\n"),
    );
    let log = home.path().join("agent.log");
    let _agent = spawn_agent(&cfg, &hub_server.endpoint(), &log, "text");
    let body = wait_health(port, Duration::from_secs(30), "503", &log).await;
    assert!(body.contains("nomad has not answered") && body.contains(&nomad_port.to_string()), "{body}");
    let m = http_body(port, "/metrics").await;
    assert!(m.lines().any(|l| l.starts_with("aimodel_agent_nomad_errors_total") && !l.ends_with(" 0")), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_when_every_recent_prewarm_failed_and_metrics_say_which() {
    // A hub that is not there: every prewarm fails.
    let closed = free_port();
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(home.path(), port, "models = [{ repo = \"org/m\" }]\n");
    let log = home.path().join("agent.log");
    let _agent = spawn_agent(&cfg, &format!("http://127.0.0.1:{closed}"), &log, "json");

    let body = wait_health(port, Duration::from_secs(60), "503", &log).await;
    assert!(body.contains("prewarms failed") && body.contains("org/m@main"), "{body}");
    let m = http_body(port, "/metrics").await;
    let failures = m
        .lines()
        .find_map(|l| l.strip_prefix("aimodel_agent_model_failures_total{repo=\"org/m\",revision=\"main\"} "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(failures.is_some_and(|f| f >= 1), "{m}");
    assert!(!m.contains("aimodel_agent_model_last_success_timestamp_seconds{"), "{m}");
    let st: serde_json::Value = serde_json::from_str(&http_body(port, "/status").await).unwrap();
    assert_eq!(st["health"]["ok"], false, "{st:#}");
    // /status and /metrics agree on the counters.
    assert!(st["counters"]["model_failures"]["org/m@main"].as_u64().is_some_and(|f| f >= 1), "{st:#}");
    assert_eq!(
        st["counters"]["downloaded_bytes"].as_u64(),
        metric(&m, "aimodel_agent_downloaded_bytes_total"),
        "{st:#}\n{m}"
    );
    // AIMODEL_LOG_FORMAT=json: every line is one JSON object.
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = logged
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|v| v["message"] == "prewarm failed" && v["repo"] == "org/m"), "{logged}");
}
