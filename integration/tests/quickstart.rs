//! The README's quick start, verbatim, from a fresh clone of the committed tree.

use std::path::PathBuf;
use std::process::Command;

use aimodel_integration::support::require_docker;

fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The commands of the README's first ```sh block under "Quick start".
fn quick_start_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme.split("## Quick start").nth(1).expect("a Quick start section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("a sh block");
    block.lines().map(|l| l.split('#').next().unwrap_or("").trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[test]
fn the_readme_has_the_two_commands_and_ci_runs_the_second() {
    let cmds = quick_start_commands();
    assert_eq!(cmds, ["./scripts/demo", "./scripts/test"]);
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).unwrap();
    assert!(ci.lines().any(|l| l.trim() == "exec ./scripts/test"), ".ci/run must run the README's test command");
}

#[test]
fn the_demo_runs_verbatim_from_a_fresh_clone() {
    if !require_docker() {
        return;
    }
    let root = repo_root();
    if !root.join(".git").exists() {
        eprintln!("SKIP: not a git checkout");
        return;
    }
    let clone = tempfile::tempdir().unwrap();
    let dest = clone.path().join("aimodel");
    let out = Command::new("git").args(["clone", "-q"]).arg(&root).arg(&dest).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let demo = &quick_start_commands()[0];
    // Share the build cache of this checkout so the clone does not rebuild every dependency.
    let target = root.join("target");
    let out =
        Command::new("bash").arg("-c").arg(demo).current_dir(&dest).env("CARGO_TARGET_DIR", &target).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "health: HEALTHY",
        "model server ready after",
        "model.safetensors (4096 bytes)",
        "prewarming aimodel-demo/tiny-chat",
        "driver.aimodel.warm.aimodel-demo/tiny-chat",
        "plugin stopped (graceful: true",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in the demo's output:\n{stdout}");
    }
}
