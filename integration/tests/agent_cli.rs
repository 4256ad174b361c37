//! The agent's command line as an operator scripts it: `--json` outputs,
//! the status header and empty-cache line, help for every flag, argument
//! checks (repo ids, sizes with units, HF_ENDPOINT) and the one notion of the
//! cache (`--hf-home` is HF_HOME, `--cache` is HF_HOME/hub and refuses HF_HOME).

use std::path::Path;
use std::process::Output;

use aimodel_integration::support::binary;
use hf_cache::publish::{publish_snapshot, NewFile};
use hf_cache::RepoId;

const COMMIT: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

fn agent(args: &[&str]) -> Output {
    std::process::Command::new(binary("aimodel-agent").unwrap())
        .args(args)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

fn seed(hub: &Path, repo: &str) {
    let files = vec![
        NewFile { path: "config.json".into(), bytes: b"{}".to_vec(), lfs: false },
        NewFile { path: "model.safetensors".into(), bytes: vec![7u8; 300_000], lfs: true },
    ];
    publish_snapshot(hub, &RepoId::model(repo), COMMIT, "main", &files).unwrap();
}

#[test]
fn status_verify_and_gc_speak_json_and_status_says_when_the_cache_is_empty() {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let h = hub.to_str().unwrap();

    let out = agent(&["--cache", h, "status"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(&format!("cache {h}\n")) && said.contains("empty cache"), "{said}");
    let v = json(&agent(&["--cache", h, "status", "--json"]));
    assert_eq!(v["models"], serde_json::json!([]), "{v}");

    seed(&hub, "org/m");
    let out = agent(&["--cache", h, "status"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("MODEL") && said.contains("SIZE") && said.contains("org/m@main"), "{said}");
    assert!(said.contains("293.0 KiB") && !said.contains(" MB"), "binary units: {said}");
    let v = json(&agent(&["--cache", h, "status", "--json"]));
    assert_eq!(v["models"][0]["repo"], "org/m", "{v}");
    assert_eq!(v["models"][0]["commit"], COMMIT, "{v}");
    assert_eq!(v["models"][0]["complete"], true, "{v}");
    assert_eq!(v["models"][0]["bytes"], 300_002, "{v}");

    let out = agent(&["--cache", h, "verify", "org/m", "--deep", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    assert_eq!(
        (v["state"].as_str(), v["files"].as_u64(), v["deep"].as_bool()),
        (Some("complete"), Some(2), Some(true))
    );
    let out = agent(&["--cache", h, "verify", "org/absent", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["state"], "incomplete", "{v}");
    assert_eq!(v["findings"][0]["kind"], "repo missing", "{v}");

    let out = agent(&["--cache", h, "gc", "--max-size", "0", "--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["models"][0]["repo"], "org/m", "{v}");
    assert_eq!(v["models"][0]["would_evict"], true, "{v}");
    assert_eq!(v["evicted"], serde_json::json!([]), "{v}");
    assert!(hub.join("models--org--m").exists(), "a dry run evicted");
}

#[test]
fn arguments_are_checked_with_reasons() {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let h = hub.to_str().unwrap();
    // verify validates the repo id as prewarm does.
    for bad in ["org--x/m", "a/b/c", "../x", "org/m@bad rev"] {
        let out = agent(&["--cache", h, "verify", bad]);
        assert!(!out.status.success(), "{bad}: {}", text(&out));
        assert!(text(&out).contains("not a"), "{bad}: {}", text(&out));
    }
    // A size without a unit is refused, saying how to write it.
    let out = agent(&["--cache", h, "gc", "--target-free", "10"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("has no unit") && text(&out).contains("10GiB"), "{}", text(&out));
    // A bad HF_ENDPOINT says why.
    let out = std::process::Command::new(binary("aimodel-agent").unwrap())
        .args(["--cache", h, "prewarm", "org/m"])
        .env("HF_ENDPOINT", "huggingface.co")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("HF_ENDPOINT \"huggingface.co\" is not usable"), "{}", text(&out));
}

#[test]
fn every_flag_has_help() {
    for sub in ["", "prewarm", "verify", "status", "gc", "pin", "unpin", "run"] {
        let out = agent(&[sub, "-h"].into_iter().filter(|a| !a.is_empty()).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in help.lines().filter(|l| l.trim_start().starts_with('-') || l.starts_with("  <")) {
            let described = line.trim().split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
            assert!(described, "{sub}: no help for {line:?}\n{help}");
        }
    }
}

#[test]
fn hf_home_and_cache_are_one_notion_of_the_cache() {
    let home = tempfile::tempdir().unwrap();
    seed(&home.path().join("hub"), "org/m");
    let hh = home.path().to_str().unwrap();
    // HF_HOME given as --cache: refused, naming both options.
    let out = agent(&["--cache", hh, "status"]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("looks like HF_HOME") && said.contains("--hf-home") && said.contains("/hub"), "{said}");
    let out = agent(&["--cache", hh, "verify", "org/m"]);
    assert!(!out.status.success() && text(&out).contains("--hf-home"), "{}", text(&out));
    // --hf-home is HF_HOME.
    let out = agent(&["--hf-home", hh, "verify", "org/m"]);
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&agent(&["--hf-home", hh, "status", "--json"]));
    assert_eq!(v["models"][0]["repo"], "org/m", "{v}");
    // Both at once: refused by the parser.
    let out = agent(&["--hf-home", hh, "--cache", hh, "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // run does not silently ignore a cache option.
    let cfg = home.path().join("agent.hcl");
    std::fs::write(&cfg, format!("hf_home = \"{hh}\"\n")).unwrap();
    let out = agent(&["--config", cfg.to_str().unwrap(), "--cache", "/elsewhere", "run", "--check"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("does not use --cache"), "{}", text(&out));
}
