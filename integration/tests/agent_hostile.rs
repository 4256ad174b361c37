//! aimodel-agent against a hostile hub (security issue #11): every attack ends
//! in a clear error, without a panic, without a file outside the cache, without
//! publishing anything, and the token goes only to the endpoint's host.

use std::path::Path;

use aimodel_integration::hostilehub::{HostileHub, CASES};
use aimodel_integration::support::binary;
use hf_cache::RepoId;

const AGENT: &str = "aimodel-agent";
const TOKEN: &str = "hf_hostile_secret_token";

struct Run {
    ok: bool,
    code: Option<i32>,
    out: String,
    err: String,
}

async fn agent(cache: &Path, endpoint: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(binary(AGENT).unwrap())
        .arg("--cache")
        .arg(cache)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path().display().to_string());
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_under(&e.path()));
        }
    }
    out
}

#[tokio::test]
async fn every_attack_ends_in_a_clear_error() {
    // Up to / (`..` stops there), then down to <tmp>/sentinel: like `../../../../etc/cron.d/x`.
    let tmp = tempfile::tempdir().unwrap();
    let (cache, sentinel) = (tmp.path().join("cache"), tmp.path().join("sentinel"));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&sentinel).unwrap();
    let escape = format!("{}{}", "../".repeat(40), sentinel.display().to_string().trim_start_matches('/'));
    let hub = HostileHub::start(&escape).await.unwrap();
    // Every case is checked; the failures are reported together.
    let mut problems = Vec::new();
    for (repo, needle) in CASES {
        let r = agent(&cache, &hub.endpoint(), &["prewarm", repo, "--stall-timeout", "5s"]).await;
        let dir = cache.join(RepoId::model(repo).folder_name());
        let partials: Vec<_> =
            files_under(&dir.join("blobs")).into_iter().filter(|f| f.contains(".incomplete")).collect();
        for (bad, what) in [
            (!files_under(&sentinel).is_empty(), format!("wrote outside the cache: {:?}", files_under(&sentinel))),
            (r.err.contains("panicked"), "panicked".into()),
            (r.ok, "succeeded".into()),
            (!(r.err.contains(needle) && r.err.contains(repo)), format!("no {needle:?} and repo in the error")),
            (r.err.contains(TOKEN) || r.out.contains(TOKEN), "printed the token".into()),
            (dir.join("refs/main").exists(), "published a ref".into()),
            (dir.join("snapshots").exists(), "published a snapshot".into()),
            // No partial file is left of a body that overran its listed size.
            (!partials.is_empty(), format!("left {partials:?}")),
        ] {
            if bad {
                problems.push(format!("{repo}: {what}\n  stderr: {}", r.err.trim()));
            }
        }
        let _ = std::fs::remove_dir_all(&sentinel).and_then(|_| std::fs::create_dir_all(&sentinel));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let log = hub.log.lock().unwrap();
    assert!(log.hub_auth.iter().any(|a| a == &format!("Bearer {TOKEN}")), "the hub must get the token");
    // The cross-host next page is refused before it is fetched: the second host saw nobody, hence no token.
    assert!(log.second_host_auth.iter().all(|a| a.is_empty()), "the token leaked: {:?}", log.second_host_auth);
    assert!(log.second_host_auth.is_empty(), "the next page on another host was fetched");
    // The refused listings never reached a download.
    for repo in
        ["hostile/traversal", "hostile/traversal-lfs", "hostile/hostfile", "hostile/hugesize", "hostile/oversum"]
    {
        assert_eq!(log.body_bytes.get(repo), None, "{repo}: downloaded although the listing is refused");
    }
    // Endless pagination was cut at the cap.
    let pages = log.hits.iter().filter(|(p, _)| p.contains("hostile/endlesspages/tree/")).count();
    assert!((1000..=1001).contains(&pages), "{pages} pages requested");
}

#[tokio::test]
async fn a_listing_that_never_ends_hits_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = HostileHub::start("../../../sentinel").await.unwrap();
    let r = agent(tmp.path(), &hub.endpoint(), &["prewarm", "hostile/trickle", "--deadline", "2s"]).await;
    assert!(!r.ok);
    assert!(!r.err.contains("panicked"), "{}", r.err);
    assert!(r.err.contains("hostile/trickle: not finished within the deadline of 2s"), "{}", r.err);
}

#[tokio::test]
async fn absurd_option_values_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, value, needle) in [
        ("--concurrency", "18446744073709551615", "from 1 to 64"),
        ("--concurrency", "0", "from 1 to 64"),
        ("--ranges", "100000", "from 1 to 64"),
        ("--heartbeat", "99999999999999s", "duration"),
        ("--heartbeat", "1h", "between"),
        ("--stale-after", "1000000h", "between"),
        ("--stall-timeout", "0s", "positive"),
        ("--deadline", "0", "positive"),
        ("--deadline", "100000h", "between"),
        ("--range-size", "1B", "between 1MiB and 4GiB"),
        ("--range-size", "1", "has no unit"),
    ] {
        let r = agent(tmp.path(), "http://127.0.0.1:9", &["prewarm", "a/b", flag, value]).await;
        assert_eq!(r.code, Some(2), "{flag} {value}: {}", r.err);
        assert!(!r.err.contains("panicked"), "{flag} {value}: {}", r.err);
        assert!(r.err.contains(flag) && r.err.contains(needle), "{flag} {value}: {}", r.err);
    }
    // Both bounds fine, but together they would let live leases be taken over.
    let r =
        agent(tmp.path(), "http://127.0.0.1:9", &["prewarm", "a/b", "--heartbeat", "10m", "--stale-after", "1m"]).await;
    assert!(!r.ok && r.err.contains("--stale-after must be at least three --heartbeat"), "{}", r.err);
}
