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
    (0..200_000u32).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 7) & 0xff).unwrap()).collect()
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

fn blob_etag() -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(content()))
}

fn blobs(cache: &Path, repo: &str) -> std::path::PathBuf {
    cache.join(RepoId::model(repo).folder_name()).join("blobs")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn stale_partials_beside_a_present_blob_are_removed_live_ones_kept() {
    let hub = FaultHub::start(content()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let repo = "plain/stale-partials";
    let (ok, out, err) = prewarm(cache.path(), &hub, repo, None).await;
    assert!(ok, "{out}\n{err}");
    let dir = blobs(cache.path(), repo);
    let etag = blob_etag();
    // A crashed download of the same blob left its partial and range record.
    std::fs::write(dir.join(format!("{etag}.0123abcd.incomplete")), b"partial").unwrap();
    std::fs::write(dir.join(format!("{etag}.0123abcd.incomplete.parts")), b"ranges 1 2\n").unwrap();
    assert!(!published(cache.path(), repo), "a partial must make the model incomplete");
    let (ok, out, err) = prewarm(cache.path(), &hub, repo, None).await;
    assert!(ok, "{out}\n{err}");
    assert!(published(cache.path(), repo), "the stale partial was left: {:?}", names(&dir));
    assert_eq!(names(&dir), vec![etag.clone()]);
    // A partial of the holder the lease names now is not touched.
    std::fs::write(dir.join(format!("{etag}.lease")), "aimodel-lease 1\ntoken cafe\nholder other 1\nbeat 1\n").unwrap();
    std::fs::write(dir.join(format!("{etag}.cafe.incomplete")), b"live").unwrap();
    let (ok, out, err) = prewarm(cache.path(), &hub, repo, None).await;
    assert!(ok, "{out}\n{err}");
    assert!(dir.join(format!("{etag}.cafe.incomplete")).exists(), "a live holder's partial was removed");
}

/// The pid a lease file names (`holder <host> <pid>`).
fn lease_pid(lease: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(lease).ok()?;
    text.lines().find_map(|l| l.strip_prefix("holder "))?.split_whitespace().last()?.parse().ok()
}

/// Polls `f` every 10 ms; panics with `what` after 60 s (a bound against hanging, not a timing check).
async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..6000 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for {what}");
}

#[tokio::test]
async fn a_holder_paused_past_stale_after_yields_and_nobody_fails() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    // 4 MiB served at about 3 MiB/s: the first holder is paused mid-file.
    let big: Vec<u8> =
        (0..4u32 << 20).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 11) & 0xff).unwrap()).collect();
    let hub = FaultHub::start(big.clone()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let repo = "slow/model";
    let run = || {
        let mut c = tokio::process::Command::new(binary(AGENT).unwrap());
        c.arg("--cache")
            .arg(cache.path())
            .args(["prewarm", repo, "--heartbeat", "100ms", "--stale-after", "1s", "--stall-timeout", "30s"])
            .env("HF_ENDPOINT", hub.endpoint())
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c.spawn().unwrap()
    };
    let (a, b) = (run(), run());
    let pids = [i32::try_from(a.id().unwrap()).unwrap(), i32::try_from(b.id().unwrap()).unwrap()];
    let etag = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&big))
    };
    let dir = blobs(cache.path(), repo);
    let lease = dir.join(format!("{etag}.lease"));
    // The holder has started writing its partial.
    let holder = wait_for("the first holder's download", || {
        let pid = lease_pid(&lease)?;
        let started = std::fs::read_dir(&dir).ok()?.flatten().any(|e| {
            e.file_name().to_string_lossy().ends_with(".incomplete") && e.metadata().is_ok_and(|m| m.len() > 0)
        });
        (started && pids.contains(&pid)).then_some(pid)
    })
    .await;
    kill(Pid::from_raw(holder), Signal::SIGSTOP).unwrap();
    // The other agent judges the lease stale and takes it over.
    let taker = wait_for("the takeover", || lease_pid(&lease).filter(|p| *p != holder)).await;
    assert!(pids.contains(&taker));
    kill(Pid::from_raw(holder), Signal::SIGCONT).unwrap();
    let (a, b) = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        (a.wait_with_output().await.unwrap(), b.wait_with_output().await.unwrap())
    })
    .await
    .expect("both agents end");
    for out in [&a, &b] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let served = hub.log.lock().unwrap().body_bytes.get(repo).copied().unwrap_or(0);
    assert!(served <= 2 * big.len() as u64, "the blob was served {served} bytes for {} (more than twice)", big.len());
    assert!(published(cache.path(), repo), "not complete after both agents succeeded");
    assert_eq!(names(&dir), vec![etag], "partials or leases left behind");
}

#[tokio::test]
async fn a_killed_download_is_resumed_by_the_next_holder() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let big: Vec<u8> =
        (0..4u32 << 20).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap()).collect();
    let hub = FaultHub::start(big.clone()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let repo = "slow/resumed";
    let run = || {
        let mut c = tokio::process::Command::new(binary(AGENT).unwrap());
        c.arg("--cache")
            .arg(cache.path())
            .args(["prewarm", repo, "--heartbeat", "100ms", "--stale-after", "1s"])
            .env("HF_ENDPOINT", hub.endpoint())
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    };
    let first = run().spawn().unwrap();
    let dir = blobs(cache.path(), repo);
    let kept = wait_for("a quarter of the file on disk", || {
        let n = std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .max()?;
        (n >= big.len() as u64 / 4).then_some(n)
    })
    .await;
    kill(Pid::from_raw(i32::try_from(first.id().unwrap()).unwrap()), Signal::SIGKILL).unwrap();
    let _ = first.wait_with_output().await;
    // The lease is left behind: the next run takes it over as stale and adopts the partial.
    let out = run().output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let starts: Vec<usize> =
        hub.log.lock().unwrap().starts.iter().filter(|(r, _)| r == repo).map(|(_, f)| *f).collect();
    assert_eq!(starts.len(), 2, "one download per run: {starts:?}");
    assert!(starts[1] as u64 >= kept, "the second run started at {}; {kept} bytes were on disk", starts[1]);
    assert!(published(cache.path(), repo));
    assert_eq!(names(&dir), vec![blob_etag_of(&big)]);
}

fn blob_etag_of(b: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(b))
}
