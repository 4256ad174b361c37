//! The plugin's attributes as the Nomad client merges them into the node
//! (`client/node_updater.go`): a key that goes away must be sent as `""` (the
//! only way a node attribute is deleted), and attributes must not change while
//! other nodes write the shared cache (each change re-registers the node and
//! makes the servers evaluate its jobs).

use std::time::Duration;

use aimodel_integration::pluginhcl::PluginHcl;
use aimodel_integration::sequence;
use aimodel_integration::support::{binary, DRIVER_BIN};
use aimodel_proto::structs::attribute::Value as A;
use hf_cache::state::{StateDir, WarmRecord};

const WARM: &str = "driver.aimodel.warm.org/evicted";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_warm_model_is_deleted_from_the_node_and_a_busy_cache_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let hub = home.path().join("hub");
    let commit = aimodel_integration::jobrun::seed_tiny_model(&hub, "org/evicted").unwrap();
    let state = StateDir::for_hub(&hub);
    state
        .write_warm(&WarmRecord {
            repo: "org/evicted".into(),
            revision: "main".into(),
            commit: commit.clone(),
            bytes: 1,
            verified_at: hf_cache::state::unix_now(),
            node: "n1".into(),
        })
        .unwrap();
    let hcl =
        PluginHcl::new(home.path()).with("fingerprint_period = \"200ms\"").hf_cache("min_free = \"1MB\"").render();
    let live = sequence::start(&binary(DRIVER_BIN).unwrap(), &hcl, &[]).await.unwrap().live;
    live.fingerprint_where(Duration::from_secs(10), |f| f.attributes.contains_key(WARM)).await.unwrap();
    let (node, _) = live.node_view();
    assert_eq!(node[WARM].value, Some(A::StringVal(commit.clone())));

    // Another node writes 100 MB into the shared cache (a download in progress):
    // the node this plugin fingerprints does not change.
    let settled = live.fingerprints.lock().unwrap().items.len();
    let (before, updates_before) = live.node_view();
    let big = home.path().join("hub").join("another-node-download.incomplete");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..100 {
            f.write_all(&chunk).unwrap();
            f.sync_data().unwrap();
        }
    }
    live.wait_fingerprints(settled + 8, Duration::from_secs(20)).await.unwrap();
    let (after, updates_after) = live.node_view();
    assert_eq!(after, before, "attributes changed while the shared cache was written");
    assert_eq!(updates_after, updates_before, "node updates while nothing changed on this node");
    std::fs::remove_file(&big).unwrap();

    // The model is evicted (its warm record and snapshot go): the key is sent as
    // "" once, and the node no longer has it.
    state.remove_warm("org/evicted").unwrap();
    std::fs::remove_dir_all(hub.join("models--org--evicted")).unwrap();
    live.fingerprint_where(
        Duration::from_secs(10),
        |f| matches!(f.attributes.get(WARM).and_then(|a| a.value.clone()), Some(A::StringVal(s)) if s.is_empty()),
    )
    .await
    .unwrap();
    let n = live.fingerprints.lock().unwrap().items.len();
    live.wait_fingerprints(n + 3, Duration::from_secs(10)).await.unwrap();
    let (node, _) = live.node_view();
    assert!(!node.contains_key(WARM), "the evicted model still attracts placements: {:?}", node.get(WARM));
    let deletions = live
        .fingerprints
        .lock()
        .unwrap()
        .items
        .iter()
        .filter(|f| {
            f.msg.attributes.contains_key(WARM)
                && matches!(f.msg.attributes[WARM].value.clone(), Some(A::StringVal(s)) if s.is_empty())
        })
        .count();
    assert_eq!(deletions, 1, "\"\" is sent once, not on every round");
    live.kill().await.unwrap();
}
