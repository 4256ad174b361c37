//! aimodel-agent against our fault-injecting hub: every failure mode named in
//! the issue, each in its own repo of the same server.

use std::path::Path;

use aimodel_integration::faulthub::{FaultHub, FILE};
use aimodel_integration::support::binary;
use hf_cache::{check, Mode, RepoId};

const AGENT: &str = "aimodel-agent";

async fn prewarm(cache: &Path, hub: &FaultHub, repo: &str, token: Option<&str>) -> (bool, String, String) {
    let mut c = tokio::process::Command::new(binary(AGENT).unwrap());
    c.arg("--cache").arg(cache).args(["prewarm", repo, "--stall-timeout", "2s"]).env("HF_ENDPOINT", hub.endpoint());
    match token {
        Some(t) => c.env("HF_TOKEN", t),
        None => c.env_remove("HF_TOKEN"),
    };
    let out = c.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn content() -> Vec<u8> {
    (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect()
}

fn published(cache: &Path, repo: &str) -> bool {
    check(cache, &RepoId::model(repo), "main", Mode::Deep).is_complete()
}

#[tokio::test]
async fn errors_are_clear_and_publish_nothing() {
    let hub = FaultHub::start(content()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    for (repo, needle) in [
        ("fault/unauthorized", "not found"),
        ("fault/gated", "gated"),
        ("fault/missing", "not found"),
        ("fault/corrupt", "hashes to"),
        ("fault/othercommit", "X-Repo-Commit is 0123456789abcdef0123456789abcdef01234567"),
        ("fault/otheretag", "X-Linked-Etag is eeee"),
    ] {
        let (ok, _, err) = prewarm(cache.path(), &hub, repo, None).await;
        assert!(!ok, "{repo} succeeded");
        assert!(err.contains(needle) && err.contains(repo), "{repo}: {err}");
        let dir = cache.path().join(RepoId::model(repo).folder_name());
        assert!(!dir.join("refs/main").exists(), "{repo}: a ref was published");
        assert!(!dir.join("snapshots").exists(), "{repo}: a snapshot was published");
    }
}

#[tokio::test]
async fn transient_faults_are_retried_to_success() {
    let hub = FaultHub::start(content()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    for repo in ["fault/ratelimit", "fault/flaky", "fault/truncated", "fault/stall"] {
        let (ok, out, err) = prewarm(cache.path(), &hub, repo, None).await;
        assert!(ok, "{repo}: {out}\n{err}");
        assert!(published(cache.path(), repo), "{repo}: not complete after success");
        let hits = hub
            .log
            .lock()
            .unwrap()
            .hits
            .iter()
            .filter(|(p, _)| p.contains(repo) && p.ends_with(FILE))
            .map(|(_, n)| *n)
            .sum::<u32>();
        assert_eq!(hits, 2, "{repo}: expected one failed and one good download");
    }
}

#[tokio::test]
async fn the_token_never_follows_a_redirect_to_another_host() {
    let hub = FaultHub::start(content()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (ok, out, err) = prewarm(cache.path(), &hub, "fault/redirect", Some("hf_secret_token")).await;
    assert!(ok, "{out}\n{err}");
    assert!(published(cache.path(), "fault/redirect"));
    let log = hub.log.lock().unwrap();
    assert!(log.hub_auth.iter().any(|a| a == "Bearer hf_secret_token"), "the hub must get the token");
    assert!(!log.second_host_auth.is_empty(), "the download went to the second host");
    assert!(log.second_host_auth.iter().all(|a| a.is_empty()), "the token leaked: {:?}", log.second_host_auth);
    assert!(!out.contains("hf_secret_token") && !err.contains("hf_secret_token"), "the token was printed");
    // Each blob is served once for one agent.
    assert_eq!(log.body_bytes.get("fault/redirect"), Some(&(hub.content.len() as u64)));
}

#[tokio::test]
async fn four_agents_three_models_each_blob_served_once() {
    let hub = FaultHub::start(content()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let repos = ["plain/model-a", "plain/model-b", "plain/model-c"];
    let mut runs = Vec::new();
    for _agent in 0..4 {
        for repo in repos {
            let mut c = tokio::process::Command::new(binary(AGENT).unwrap());
            c.arg("--cache")
                .arg(cache.path())
                .args(["prewarm", repo, "--heartbeat", "200ms", "--stale-after", "5s"])
                .env("HF_ENDPOINT", hub.endpoint())
                .env_remove("HF_TOKEN");
            runs.push(c.output());
        }
    }
    for out in futures::future::join_all(runs).await {
        let out = out.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let log = hub.log.lock().unwrap();
    for repo in repos {
        assert!(published(cache.path(), repo), "{repo}");
        // Counted at the server: twelve agents, each blob sent exactly once.
        assert_eq!(log.body_bytes.get(repo), Some(&(hub.content.len() as u64)), "{repo}: {:?}", log.body_bytes);
    }
}
