//! The reference tables in the docs match the schemas the plugin reports.

use std::path::PathBuf;

use aimodel_driver::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
use aimodel_driver::schema::to_spec;
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
        for row in
            aimodel_driver::schema::doc_rows(PLUGIN_SCHEMA).iter().chain(&aimodel_driver::schema::doc_rows(TASK_SCHEMA))
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
