//! The reference tables in the docs match the schemas the plugin reports.

use std::path::PathBuf;

use aimodel_driver::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
use aimodel_driver::nomad::hclspec::to_spec;
use aimodel_integration::docs;
use aimodel_integration::plugin::{Launch, PluginProcess};
use aimodel_integration::support::{binary, DRIVER_BIN};
use aimodel_proto::base::ConfigSchemaRequest;
use aimodel_proto::drivers::TaskConfigSchemaRequest;

#[test]
fn docs_tables_are_generated_from_the_schemas() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let stale = docs::check(&root, false).unwrap();
    assert!(stale.is_empty(), "stale configuration tables in {stale:?}: run `cargo run -p aimodel-integration --bin nomad-sim -- docs --write`");
    // Every attribute of both schemas appears in the committed docs.
    for f in docs::FILES {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        for row in aimodel_driver::config::schema::doc_rows(PLUGIN_SCHEMA)
            .iter()
            .chain(&aimodel_driver::config::schema::doc_rows(TASK_SCHEMA))
        {
            assert!(text.contains(&format!("| `{}` |", row.path)), "{f} does not document {}", row.path);
        }
    }
}

#[tokio::test]
async fn the_plugin_reports_the_documented_schemas() {
    let tmp = tempfile::tempdir().unwrap();
    let p = PluginProcess::launch(&Launch::nomad(&binary(DRIVER_BIN).unwrap()).env("TMPDIR", tmp.path().to_str()))
        .await
        .unwrap();
    let plugin = p.base().config_schema(ConfigSchemaRequest {}).await.unwrap().into_inner().spec.unwrap();
    assert_eq!(plugin, to_spec(PLUGIN_SCHEMA));
    let task = p.driver().task_config_schema(TaskConfigSchemaRequest {}).await.unwrap().into_inner().spec.unwrap();
    assert_eq!(task, to_spec(TASK_SCHEMA));
    p.kill().await.unwrap();
}

/// docs/install.md's shell blocks, run where this machine allows: the install
/// block (the binaries this run built, installed into directories of the test's
/// own instead of `/opt/nomad/plugins` and `/usr/local/bin`), and the warm-up
/// block against a local hub (the cache in a temporary directory). Not run here:
/// the `useradd`/`chown` block (it changes the machine's users) and the Nomad CLI
/// block (there is no Nomad binary).
#[tokio::test]
async fn the_install_guide_commands_run_where_this_machine_allows() {
    use aimodel_integration::statichub::{describe, write_model, StaticHub};
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let install = std::fs::read_to_string(root.join("docs/install.md")).unwrap();
    let blocks: Vec<String> =
        install.split("```sh").skip(1).filter_map(|b| b.split("```").next()).map(str::to_string).collect();
    let find = |needle: &str| {
        blocks.iter().find(|b| b.contains(needle)).cloned().unwrap_or_else(|| panic!("no block with {needle}"))
    };
    let run = |script: &str, env: &[(&str, &str)]| {
        let out = std::process::Command::new("sh").arg("-ec").arg(script).envs(env.iter().copied()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{script}\n{text}");
        text
    };

    // 1. Build and install.
    let built = binary("aimodel-agent").unwrap().parent().unwrap().to_path_buf();
    let dest = tempfile::tempdir().unwrap();
    let (plugins, usrbin) = (dest.path().join("opt/nomad/plugins"), dest.path().join("usr/local/bin"));
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::create_dir_all(&usrbin).unwrap();
    let block = find("install -m 0755");
    assert!(block.contains("cargo build --release"), "{block}");
    let script: Vec<String> = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo build")) // this run has built them already
        .map(|l| {
            l.replace("target/release/", &format!("{}/", built.display()))
                .replace("/opt/nomad/plugins/", &format!("{}/", plugins.display()))
                .replace("/usr/local/bin/", &format!("{}/", usrbin.display()))
        })
        .collect();
    let path = format!("{}:{}", usrbin.display(), std::env::var("PATH").unwrap_or_default());
    let out = run(&script.join("\n"), &[("PATH", &path)]);
    assert!(out.contains("aimodel-agent"), "{out}");
    assert!(plugins.join("nomad-driver-aimodel").is_file() && usrbin.join("aimodel-agent").is_file());

    // 3. Warm a model, verify it, list the cache: against a hub of ours.
    let src = tempfile::tempdir().unwrap();
    let served = describe(&write_model(src.path(), &[200_000]).unwrap(), 100_000).unwrap();
    let hub = StaticHub::start("127.0.0.1:0", &"c".repeat(40), served).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let block = find("prewarm");
    let script = block.replace("/mnt/hf-cache", cache.path().to_str().unwrap());
    let endpoint = hub.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("sh")
            .arg("-ec")
            .arg(&script)
            .env("PATH", path)
            .env("HF_ENDPOINT", endpoint)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    })
    .await
    .unwrap();
    assert!(out.0, "{}", out.1);
    assert!(out.1.contains("mistralai/Mistral-7B-Instruct-v0.3"), "{}", out.1);
}
