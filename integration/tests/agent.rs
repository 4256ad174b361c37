//! aimodel-agent against olah, a real hub-protocol server (PyPI): what it
//! prewarms is complete for us and loads offline in huggingface_hub; a second
//! run fetches nothing; agents sharing one cache fetch every byte once.

use std::path::Path;
use std::process::Command;

use aimodel_integration::support::agent_ok as ok;
use aimodel_integration::support::{binary, hf_python, run_python};
use hf_cache::{check, Mode, RepoId};

const AGENT: &str = "aimodel-agent";

fn agent(cache: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut c = Command::new(binary(AGENT).unwrap());
    c.arg("--cache").arg(cache).args(args).env("HF_ENDPOINT", endpoint).env_remove("HF_TOKEN");
    c
}

fn weights() -> Vec<u8> {
    (0..3_000_000u32).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 11) & 0xff).unwrap()).collect()
}

/// "… 2.9 MiB downloaded …" from the summary line, in MB (1e6 bytes).
fn downloaded_mb(summary: &str) -> f64 {
    summary
        .split(", ")
        .find_map(|p| p.split_once(" downloaded").map(|(n, _)| n.to_string()))
        .and_then(|n| hf_cache::units::parse_bytes(&n).ok())
        .map(|b| b as f64 / 1e6)
        .unwrap_or(-1.0)
}

#[test]
fn prewarmed_models_load_offline_and_are_fetched_once() {
    let Some(py) = hf_python() else { return };
    let w = weights();
    let olah = aimodel_integration::olah::start(&py, &w);
    let cache = tempfile::tempdir().unwrap();

    let out = ok(&agent(cache.path(), &olah.endpoint(), &["prewarm", "org/served"]).output().unwrap());
    assert!(out.contains("org/served@main = "), "{out}");
    assert!(downloaded_mb(&out) >= 3.0, "{out}");
    let r = check(cache.path(), &RepoId::model("org/served"), "main", Mode::Deep);
    assert!(r.is_complete() && r.verifiable, "{:?}", r.findings);

    // huggingface_hub loads it offline.
    let code = "import sys\nfrom huggingface_hub import snapshot_download, try_to_load_from_cache\np = snapshot_download('org/served', cache_dir=sys.argv[1], local_files_only=True)\nprint(p)\nprint(try_to_load_from_cache('org/served', 'model.safetensors', cache_dir=sys.argv[1]))";
    let loaded = run_python(&py, code, &[cache.path().to_str().unwrap()]).unwrap();
    assert!(loaded.lines().nth(1).is_some_and(|l| l.ends_with("model.safetensors")), "{loaded}");
    let verify = ok(&agent(cache.path(), &olah.endpoint(), &["verify", "org/served", "--deep"]).output().unwrap());
    assert!(verify.contains("complete"), "{verify}");

    // Nothing already published is fetched again.
    let again = ok(&agent(cache.path(), &olah.endpoint(), &["prewarm", "org/served"]).output().unwrap());
    assert_eq!(downloaded_mb(&again), 0.0, "{again}");
    let status = ok(&agent(cache.path(), &olah.endpoint(), &["status"]).output().unwrap());
    assert!(status.contains("org/served@main") && status.contains("complete"), "{status}");
}

#[test]
fn four_agents_on_one_cache_fetch_each_byte_once() {
    let Some(py) = hf_python() else { return };
    let w = weights();
    let olah = aimodel_integration::olah::start(&py, &w);
    let cache = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            agent(cache.path(), &olah.endpoint(), &["prewarm", "org/served"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<String> = children.into_iter().map(|c| ok(&c.wait_with_output().unwrap())).collect();
    let total: f64 = outs.iter().map(|o| downloaded_mb(o)).sum();
    // Counted at the agents (olah keeps no count): the model is ~3.0 MB; every agent succeeded.
    assert!((2.9..3.2).contains(&total), "downloaded {total} MB in all: {outs:?}");
    let r = check(cache.path(), &RepoId::model("org/served"), "main", Mode::Deep);
    assert!(r.is_complete(), "{:?}", r.findings);
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("models--org--served/blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".lease") || n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_missing_repo_is_a_clear_error() {
    let Some(py) = hf_python() else { return };
    let olah = aimodel_integration::olah::start(&py, b"x");
    let cache = tempfile::tempdir().unwrap();
    let out = agent(cache.path(), &olah.endpoint(), &["prewarm", "org/nope"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("org/nope") && err.contains("not found"), "{err}");
    assert!(!cache.path().join("models--org--nope/refs").exists(), "nothing may be published");
}

/// Every file visible in a snapshot resolves to a whole blob, and a ref only
/// exists for a complete snapshot: what a reader could see after a crash.
fn assert_nothing_partial_visible(cache: &Path) {
    let repo = cache.join("models--org--served");
    let r = check(cache, &RepoId::model("org/served"), "main", Mode::Quick);
    if repo.join("refs/main").exists() {
        assert!(r.is_complete(), "a ref points at an incomplete snapshot: {:?}", r.findings);
    }
    for snap in std::fs::read_dir(repo.join("snapshots")).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(snap.path()).unwrap().flatten() {
            let meta = std::fs::metadata(f.path());
            assert!(meta.is_ok(), "{} is visible but dangling", f.path().display());
        }
    }
}

#[test]
fn kill_9_at_random_points_never_exposes_a_partial_model() {
    let Some(py) = hf_python() else { return };
    let w: Vec<u8> =
        (0..24_000_000u32).map(|i| u8::try_from((i.wrapping_mul(2_246_822_519) >> 9) & 0xff).unwrap()).collect();
    let olah = aimodel_integration::olah::start(&py, &w);
    let cache = tempfile::tempdir().unwrap();
    let args = ["prewarm", "org/served", "--heartbeat", "200ms", "--stale-after", "1s"];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = std::time::Duration::from_millis(50 + seed % 1500);
        let mut child = agent(cache.path(), &olah.endpoint(), &args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        assert_nothing_partial_visible(cache.path());
        let _ = round;
    }
    // What was published before the final run is not fetched again.
    let blobs = cache.path().join("models--org--served/blobs");
    let published: u64 = std::fs::read_dir(&blobs)
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().contains('.'))
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    let out = ok(&agent(cache.path(), &olah.endpoint(), &args).output().unwrap());
    let total_mb = (w.len() + 200) as f64 / 1e6;
    let fetched = downloaded_mb(&out);
    assert!(
        fetched <= total_mb - published as f64 / 1e6 + 0.11,
        "fetched {fetched} MB though {published} bytes were already published: {out}"
    );
    let r = check(cache.path(), &RepoId::model("org/served"), "main", Mode::Deep);
    assert!(r.is_complete(), "{:?}", r.findings);
    assert_nothing_partial_visible(cache.path());
}

/// Parallel byte ranges against a hub that serves them (ours, static): each
/// byte once, verified, loadable in huggingface_hub; a kill -9 mid-download
/// resumes with the ranges already on disk (counted at the server); and
/// huggingface_hub's own download from the same server is complete for us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_downloads_are_verified_and_resume_after_kill_9() {
    use aimodel_integration::statichub::{describe, write_model, StaticHub};
    use std::sync::atomic::Ordering;
    let Some(py) = hf_python() else { return };
    let src = tempfile::tempdir().unwrap();
    let files = write_model(src.path(), &[40 << 20, 3 << 20]).unwrap();
    let hub = StaticHub::start("127.0.0.1:0", &"ab".repeat(20), describe(&files, 1 << 20).unwrap()).await.unwrap();
    let total = hub.total();
    let range_args = ["--ranges", "4", "--range-min", "8MiB", "--range-size", "2MiB"];

    let cache = tempfile::tempdir().unwrap();
    let (c, e, a) = (cache.path().to_path_buf(), hub.endpoint(), [&["prewarm", "org/big"][..], &range_args].concat());
    let out = ok(&tokio::task::spawn_blocking(move || agent(&c, &e, &a).output().unwrap()).await.unwrap());
    assert!(hub.ranges.load(Ordering::SeqCst) >= 20, "ranges were used: {}", hub.ranges.load(Ordering::SeqCst));
    assert_eq!(hub.served.load(Ordering::SeqCst), total, "each byte served once: {out}");
    let r = check(cache.path(), &RepoId::model("org/big"), "main", Mode::Deep);
    assert!(r.is_complete() && r.verifiable, "{:?}", r.findings);
    let code = "import sys\nfrom huggingface_hub import snapshot_download\nprint(snapshot_download('org/big', cache_dir=sys.argv[1], local_files_only=True))";
    run_python(&py, code, &[cache.path().to_str().unwrap()]).unwrap();

    // kill -9 once some ranges are recorded; the next run fetches only the rest.
    let cache = tempfile::tempdir().unwrap();
    hub.served.store(0, Ordering::SeqCst);
    hub.pause_per_mib_us.store(40_000, Ordering::SeqCst);
    let slow = [&["prewarm", "org/big"][..], &range_args].concat();
    let mut child = agent(cache.path(), &hub.endpoint(), &slow)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let blobs = cache.path().join("models--org--big/blobs");
    let recorded = |min: usize| -> usize {
        std::fs::read_dir(&blobs)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".parts"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.parse::<u64>().is_ok())
                    .count()
            })
            .find(|&n| n >= min)
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while recorded(3) < 3 {
        assert!(std::time::Instant::now() < deadline, "no ranges recorded");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = recorded(0) as u64 * (2 << 20);
    assert!(!cache.path().join("models--org--big/refs/main").exists(), "nothing published by the killed run");
    hub.pause_per_mib_us.store(0, Ordering::SeqCst);
    let before = hub.served.load(Ordering::SeqCst);
    let args = [&slow[..], &["--heartbeat", "200ms", "--stale-after", "1s"]].concat();
    let (c, e) = (cache.path().to_path_buf(), hub.endpoint());
    let out = tokio::task::spawn_blocking(move || agent(&c, &e, &args).output().unwrap()).await.unwrap();
    ok(&out);
    let second = hub.served.load(Ordering::SeqCst) - before;
    assert!(second <= total - kept, "the second run fetched {second} bytes; {kept} of {total} were on disk");
    let r = check(cache.path(), &RepoId::model("org/big"), "main", Mode::Deep);
    assert!(r.is_complete(), "{:?}", r.findings);

    // huggingface_hub itself downloads from this server completely (the benchmark relies on it).
    let theirs = tempfile::tempdir().unwrap();
    let code = "import sys\nfrom huggingface_hub import snapshot_download\nprint(snapshot_download('org/big', cache_dir=sys.argv[1]))";
    let mut c = std::process::Command::new(&py);
    c.arg("-c").arg(code).arg(theirs.path()).env("HF_ENDPOINT", hub.endpoint()).env("HF_HUB_DISABLE_XET", "1");
    let o = tokio::task::spawn_blocking(move || c.output().unwrap()).await.unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = check(theirs.path(), &RepoId::model("org/big"), "main", Mode::Deep);
    assert!(r.is_complete(), "{:?}", r.findings);
}
