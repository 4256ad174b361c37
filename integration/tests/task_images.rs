//! Images against the real Docker engine and a local registry: pulls with
//! scoped credentials, and `gc.image` removing what no task uses.

use std::time::{Duration, Instant};

use aimodel_integration::imagereg::AuthRegistry;
use aimodel_integration::support::standin_image;
use aimodel_integration::task::TaskBuilder;
use aimodel_proto::drivers::StartTaskRequest;
use tonic::Code;

use aimodel_integration::tasksim::*;

/// A local registry (Debian's `docker-registry`, distribution 2.x) on a port of
/// our own, with htpasswd authentication, serving an image built here:
/// without credentials the pull is refused; with the task's `auth` block
/// StartTask pulls it for real (a layer the engine does not have), with pull
/// events, and runs it, and the password appears in no plugin log line; a
/// tag the registry does not have is a clear, non-recoverable error.
#[tokio::test]
async fn images_are_pulled_from_a_registry() {
    let Some(reg) = AuthRegistry::start().await else { return };
    let Some(mut sim) = Sim::start().await else { return };
    let (port, password) = (reg.port, reg.password.clone());
    // An image with a layer of its own (so the pull really downloads), pushed, then removed locally.
    let tag = reg.push_image("aimodel/pulled");
    let cfg = format!("engine = \"custom\"\nimage = \"{tag}\"\n");
    let b = TaskBuilder::new("anonymous", &cfg);
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains(&tag), "{}", err.message());
    assert!(
        err.message().contains("no basic auth credentials") || err.message().contains("unauthorized"),
        "{}",
        err.message()
    );
    let cfg = format!(
        "engine = \"custom\"\nimage = \"{tag}\"\nauth {{\n  username = \"puller\"\n  password = \"{password}\"\n  server_address = \"127.0.0.1:{port}\"\n}}\n"
    );
    let b = TaskBuilder::new("pulled", &cfg);
    let (t, handle) = sim.start_task(&b).await;
    let msgs = sim.live.event_messages(&t.config.id);
    assert!(msgs.iter().any(|m| m == &format!("Downloading image {tag}")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m == &format!("Downloaded image {tag}")), "{msgs:?}");
    let state = aimodel_driver::types::DriverState::decode(&handle.driver_state).unwrap();
    assert_eq!(state.image, tag);
    let out = t.stdout.clone().unwrap();
    out.wait_for(Duration::from_secs(10), |s| s.contains("standin starting")).await.unwrap();
    sim.destroy(&t.config.id).await;

    let missing = format!("127.0.0.1:{port}/aimodel/pulled:nope");
    let b = TaskBuilder::new(
        "missing",
        &format!("engine = \"custom\"\nimage = \"{missing}\"\nauth {{\n  username = \"puller\"\n  password = \"{password}\"\n}}\n"),
    );
    let t = sim.prepare(&b);
    let err =
        sim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(err.message().contains("not found") && err.message().contains(&missing), "{}", err.message());
    // No RecoverableError detail: Nomad's client treats the error as final (no restart loop).
    assert_ne!(aimodel_driver::nomad::status::recoverable_detail(&err), Some(true), "{err:?}");
    assert_eq!(err.code(), Code::NotFound);

    let logged = sim.live.process.stderr.lock().unwrap().clone();
    assert!(!logged.is_empty());
    assert!(logged.iter().all(|l| !l.contains(&password)), "the registry password was logged");

    // The plugin's own credentials go to the registry they name, and to no other
    // (the same registry spelled `localhost` is another host to Docker's auth).
    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag]).output();
    let plugin_auth = format!(
        "auth {{\n  username = \"puller\"\n  password = \"{password}\"\n  server_address = \"127.0.0.1:{port}\"\n}}"
    );
    let mut psim = Sim::start_with(&plugin_auth, &[]).await.unwrap();
    let (t, _) =
        psim.start_task(&TaskBuilder::new("plugin-auth", &format!("engine = \"custom\"\nimage = \"{tag}\"\n"))).await;
    psim.destroy(&t.config.id).await;
    let other = tag.replacen("127.0.0.1", "localhost", 1);
    let t = psim.prepare(&TaskBuilder::new("other-registry", &format!("engine = \"custom\"\nimage = \"{other}\"\n")));
    let err =
        psim.live.process.driver().start_task(StartTaskRequest { task: Some(t.config.clone()) }).await.unwrap_err();
    assert!(
        err.message().contains("no basic auth credentials") || err.message().contains("unauthorized"),
        "the plugin's credentials reached another registry: {}",
        err.message()
    );
    let logged = psim.live.process.stderr.lock().unwrap().clone();
    assert!(logged.iter().all(|l| !l.contains(&password)), "the registry password was logged");

    let _ = std::process::Command::new("docker").args(["rmi", "-f", &tag, &other]).output();
}

/// `gc { image = true }`: an image no task uses any more is removed after
/// `image_delay`; one a running task still uses is kept.
#[tokio::test]
async fn unused_images_are_removed_after_the_delay() {
    let Some(mut sim) = Sim::start_with("gc {\n  image = true\n  image_delay = \"1s\"\n}", &[]).await else {
        return;
    };
    let tag = |n: &str| format!("aimodel-gc-test:{n}-{}", aimodel_integration::task::random_hex(4));
    let (gone, kept) = (tag("gone"), tag("kept"));
    for t in [&gone, &kept] {
        let out = std::process::Command::new("docker").args(["tag", &standin_image().unwrap(), t]).output().unwrap();
        assert!(out.status.success());
    }
    let present =
        |t: &str| std::process::Command::new("docker").args(["image", "inspect", t]).output().unwrap().status.success();
    let sleeper = |image: &str| {
        format!("engine = \"custom\"\nimage = \"{image}\"\nentrypoint = [\"/bin/sleep\"]\nargs = [\"600\"]\n")
    };
    let (a, _) = sim.start_task(&TaskBuilder::new("a", &sleeper(&gone))).await;
    let (b1, _) = sim.start_task(&TaskBuilder::new("b1", &sleeper(&kept))).await;
    let (b2, _) = sim.start_task(&TaskBuilder::new("b2", &sleeper(&kept))).await;
    sim.destroy(&a.config.id).await;
    sim.destroy(&b1.config.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while present(&gone) {
        assert!(Instant::now() < deadline, "the unused image {gone} was not removed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // b2 still runs on `kept`: well past the delay it is still there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(present(&kept), "an image a running task uses was removed");
    assert!(present(&standin_image().unwrap()), "another tag of the same image was removed");
    sim.destroy(&b2.config.id).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while present(&kept) {
        assert!(Instant::now() < deadline, "the image {kept} was not removed once unused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
