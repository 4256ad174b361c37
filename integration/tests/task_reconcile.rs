//! Containers no task owns (orphans, dangling containers) against the real
//! Docker engine.

use std::time::{Duration, Instant};

use aimodel_driver::plan::LABEL_ALLOC_ID;
use aimodel_integration::support::containers_with_label;
use aimodel_integration::task::TaskBuilder;

use aimodel_integration::tasksim::*;

async fn orphans(gc: &str, removed: bool) {
    let Some(mut sim) =
        Sim::start_with(&format!("fingerprint_period = \"300ms\"\n{gc}"), &[("AIMODEL_ORPHAN_GRACE", "0s")]).await
    else {
        return;
    };
    // A node name of its own: containers of the other tests (running at the
    // same time under other plugin processes) would be orphans here otherwise.
    let node = format!("sim-node-orphans-{}", aimodel_integration::task::random_hex(4));
    let mut b = TaskBuilder::new("anchor", &custom("entrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]"));
    b.node_name = node.clone();
    let (t, _) = sim.start_task(&b).await;
    let marker = aimodel_integration::task::alloc_id();
    sim.allocs.push(marker.clone());
    let create = |node: &str| {
        let out = std::process::Command::new("docker")
            .args(["create", "--label", "com.aimodel.managed=true", "--label"])
            .arg(format!("com.aimodel.node={node}"))
            .args(["--label", "com.aimodel.task_id=ghost/task/00000000", "--label"])
            .arg(format!("{LABEL_ALLOC_ID}={marker}"))
            .arg(aimodel_integration::support::STANDIN_IMAGE)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    create(&node);
    create("another-client");
    if removed {
        let deadline = Instant::now() + Duration::from_secs(15);
        while containers_with_label(LABEL_ALLOC_ID, &marker).len() != 1 {
            assert!(Instant::now() < deadline, "the dangling container of this node was not removed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{index .Config.Labels \"com.aimodel.node\"}}"])
            .args(containers_with_label(LABEL_ALLOC_ID, &marker))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&left.stdout).trim(),
            "another-client",
            "another client's container was removed"
        );
        assert_eq!(
            containers_with_label(aimodel_driver::plan::LABEL_TASK_ID, &t.config.id).len(),
            1,
            "a tracked task's container was removed"
        );
        sim.destroy(&t.config.id).await;
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fps = sim.live.fingerprints.lock().unwrap().items.clone();
        let n = fps.last().and_then(|f| f.msg.attributes.get("driver.aimodel.orphans").cloned());
        if let Some(aimodel_proto::structs::Attribute {
            value: Some(aimodel_proto::structs::attribute::Value::IntVal(n)),
            ..
        }) = n
        {
            if n == 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "orphan count never became 1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(containers_with_label(LABEL_ALLOC_ID, &marker).len(), 2, "orphans must not be touched");
    sim.destroy(&t.config.id).await;
}

#[tokio::test]
async fn orphans_are_reported_and_left_alone() {
    orphans("gc {\n  dangling_containers {\n    dry_run = true\n  }\n}", false).await;
}

/// As the docker driver's reconciler: a dangling container of this node (no
/// task owns it) is removed after the creation grace; another client's is not.
#[tokio::test]
async fn dangling_containers_of_this_node_are_removed() {
    orphans("gc {\n  dangling_containers {\n    creation_grace = \"0s\"\n  }\n}", true).await;
}
