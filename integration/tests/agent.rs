//! aimodel-agent against olah, a real hub-protocol server (PyPI): what it
//! prewarms is complete for us and loads offline in huggingface_hub; a second
//! run fetches nothing; agents sharing one cache fetch every byte once.

use std::path::Path;
use std::process::{Command, Output};

use aimodel_integration::support::{binary, hf_python, run_python};
use hf_cache::{check, Mode, RepoId};

const AGENT: &str = "aimodel-agent";

fn agent(cache: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut c = Command::new(binary(AGENT).unwrap());
    c.arg("--cache").arg(cache).args(args).env("HF_ENDPOINT", endpoint).env_remove("HF_TOKEN");
    c
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "agent failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn weights() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect()
}

/// "… 3.0 MB downloaded …" from the summary line.
fn downloaded_mb(summary: &str) -> f64 {
    summary
        .split(", ")
        .find(|p| p.contains("MB downloaded"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
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
