//! The agent pulls engine images ahead (issue 15), end to end against the real
//! Docker engine, a registry that wants credentials, the real plugin (through
//! the Nomad-client simulator) and a stand-in Nomad API: a registered job's
//! image, and the engine default the plugin publishes as a node attribute, are
//! pulled with the agent's credentials before any StartTask; StartTask then
//! pulls nothing; a job that opts out, or asks for GPUs the node lacks, is not
//! pulled for; the images go once the task is destroyed, the job is gone and
//! the delay has passed.

use std::process::Stdio;
use std::time::{Duration, Instant};

use aimodel_integration::imagereg::{image_present, AuthRegistry, USER};
use aimodel_integration::nomadapi::NomadApi;
use aimodel_integration::support::{agent_status, http_body, wait_agent_status};
use aimodel_integration::task::{free_port, TaskBuilder};
use aimodel_integration::tasksim::*;

/// Holder containers the agent keeps for `image` (label `com.aimodel.hold.ref`).
fn holders(image: &str) -> Vec<String> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=com.aimodel.hold.ref={image}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

/// Whatever happens, no holder or pushed image is left behind.
struct Cleanup(Vec<String>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for image in &self.0 {
            for h in holders(image) {
                let _ = std::process::Command::new("docker").args(["rm", "-f", &h]).output();
            }
            let _ = std::process::Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

struct FakeHolder(String);
impl Drop for FakeHolder {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn job(id: &str, tasks: serde_json::Value, meta: Option<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({
        "ID": id, "Name": id, "Type": "service", "Datacenters": ["dc1"], "Meta": meta,
        "TaskGroups": [{"Name": "g", "Tasks": tasks}]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_pulls_a_jobs_images_ahead_and_they_go_with_the_job() {
    let Some(reg) = AuthRegistry::start().await else { return };
    let own = reg.push_image("aimodel/own");
    let default = reg.push_image("aimodel/vllm");
    let opted = reg.push_image("aimodel/opted");
    let heavy = reg.push_image("aimodel/heavy");
    // An image loaded on the node by hand (not the agent's to remove), and a
    // container that only pretends to be a holder (labels anyone can set).
    let tag = |n: &str| format!("aimodel-ahead-test:{n}-{}", aimodel_integration::task::random_hex(4));
    let (local, victim) = (tag("local"), tag("victim"));
    let standin = aimodel_integration::support::standin_image().unwrap();
    for t in [&local, &victim] {
        assert!(std::process::Command::new("docker").args(["tag", &standin, t]).status().unwrap().success());
    }
    let fake = format!("fake-hold-{}", aimodel_integration::task::random_hex(4));
    let key_of = aimodel_driver::runtime::registry::canonical(&victim);
    let created = std::process::Command::new("docker")
        .args(["create", "--name", &fake, "--label", "com.aimodel.hold=true"])
        .args(["--label", &format!("com.aimodel.hold.image={key_of}"), "--label"])
        .args([&format!("com.aimodel.hold.ref={victim}"), "--label", "com.aimodel.hold.pulled=true", &victim, "x"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let _cleanup =
        Cleanup(vec![own.clone(), default.clone(), opted.clone(), heavy.clone(), local.clone(), victim.clone()]);
    let _fake = FakeHolder(fake.clone());
    let plugin = format!(
        "fingerprint_period = \"300ms\"\ngc {{\n  image = true\n  image_delay = \"1s\"\n}}\nimages {{\n  vllm = \"{default}\"\n}}"
    );
    let Some(mut sim) = Sim::start_with(&plugin, &[]).await else { return };
    // The node as Nomad shows it once the client applied the plugin's fingerprint.
    let attr = "driver.aimodel.image.vllm";
    sim.live.fingerprint_where(Duration::from_secs(10), |f| f.attributes.contains_key(attr)).await.unwrap();
    let nomad = NomadApi::start().await.unwrap();
    nomad.set_node(sim.live.node_json("node-1", "dc1"));
    assert_eq!(sim.live.node_json("node-1", "dc1")["Attributes"][attr], default.as_str());

    let custom = |name: &str, image: &str| serde_json::json!({"Name": name, "Driver": "aimodel", "Config": {"engine": "custom", "image": image}});
    nomad.register(
        "default",
        job(
            "ahead",
            serde_json::json!([
                custom("server", &own),
                custom("local", &local),
                {"Name": "llm", "Driver": "aimodel", "Config": {"engine": "vllm", "model": "org/m"}}
            ]),
            None,
        ),
    );
    nomad.register(
        "default",
        job("optout", serde_json::json!([custom("t", &opted)]), Some(serde_json::json!({"aimodel.prepull": "false"}))),
    );
    let mut big = custom("t", &heavy);
    big["Resources"] = serde_json::json!({"Devices": [{"Name": "nvidia/gpu", "Count": 2}]});
    nomad.register("default", job("gpu-heavy", serde_json::json!([big]), None));

    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = home.path().join("agent.hcl");
    std::fs::write(
        &cfg_path,
        format!(
            r#"hf_home = "{home}"
listen = "127.0.0.1:{port}"
interval = "1h"
nomad {{
  address = "{nomad}"
  wait    = "5s"
}}
images {{
  min_free     = "1MB"
  data_root    = "{home}"
  remove_delay = "2s"
  check_every  = "1s"
  auth {{
    server_address = "{registry}"
    username       = "{USER}"
    password       = "{password}"
  }}
}}
"#,
            home = home.path().display(),
            nomad = nomad.address(),
            registry = reg.host(),
            password = reg.password,
        ),
    )
    .unwrap();
    let log = home.path().join("agent.log");
    let mut agent = tokio::process::Command::new(aimodel_integration::support::binary("aimodel-agent").unwrap())
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("AIMODEL_NODE_ID", "node-1")
        .env("AIMODEL_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Both images of the job are pulled (the registry refuses pulls without the
    // agent's credentials) and held, before any StartTask.
    let key = |i: &str| aimodel_driver::runtime::registry::canonical(i);
    wait_agent_status(port, Duration::from_secs(60), "both images present", |st| {
        [&own, &default].iter().all(|i| st["images"]["images"][key(i)]["state"] == "present")
    })
    .await;
    assert!(image_present(&own) && image_present(&default));
    assert_eq!(holders(&own).len(), 1, "one holder keeps the image");
    wait_agent_status(port, Duration::from_secs(20), "the local image held", |st| {
        st["images"]["images"][key(&local)]["state"] == "present"
    })
    .await;
    assert_eq!(holders(&local).len(), 1);
    let st = agent_status(port).await;
    assert_eq!(st["images"]["images"][key(&own)]["tasks"], serde_json::json!(["default/ahead/g/server"]));
    assert!(st["images"]["images"][key(&own)]["bytes_total"].as_u64().unwrap() > 0, "{st:#}");
    let skipped = st["images"]["skipped"].to_string();
    assert!(skipped.contains("opts out") && skipped.contains("asks for 2 GPUs, this node has 0"), "{skipped}");
    assert!(!image_present(&opted) && !image_present(&heavy), "images the policy does not want were pulled");
    let metrics = http_body(port, "/metrics").await;
    assert!(metrics.contains("aimodel_agent_image_pulls_total{result=\"ok\"} 2"), "{metrics}");
    assert!(metrics.contains("aimodel_agent_images{state=\"present\"} 3"), "{metrics}");

    // StartTask pulls nothing: the task has no credentials, so a pull would fail.
    let (t, _) =
        sim.start_task(&TaskBuilder::new("server", &format!("engine = \"custom\"\nimage = \"{own}\"\n"))).await;
    let msgs = sim.live.event_messages(&t.config.id);
    assert!(msgs.iter().any(|m| m == &format!("Image {own} is on this node: not pulled")), "{msgs:?}");
    assert!(!msgs.iter().any(|m| m.starts_with("Downloading image")), "{msgs:?}");

    // The task goes; the job still wants the image: gc.image leaves it (its holder).
    sim.destroy(&t.config.id).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(image_present(&own), "an image a registered job wants was removed");

    // The job goes: after the delay both images and their holders are gone.
    nomad.stop("ahead");
    let deadline = Instant::now() + Duration::from_secs(30);
    while image_present(&own) || image_present(&default) || !holders(&own).is_empty() || !holders(&local).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the images of a stopped job were not removed: {:#}",
            agent_status(port).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = agent_status(port).await;
    assert_eq!(st["images"]["removed"], 2, "{st:#}");
    assert!(image_present(&local), "an image the agent did not pull was removed");
    assert!(image_present(&victim), "a container with holder labels made the agent remove an image");
    assert_eq!(holders(&victim).len(), 1, "a container that is not a holder was removed");
    let _ = agent.kill().await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("pulling ahead"), "{logged}");
    assert!(!logged.contains(&reg.password), "the registry password was logged");
    assert!(!st.to_string().contains(&reg.password), "the registry password is in /status");
}
