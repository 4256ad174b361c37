//! aimodel-agent against a cache a hostile tenant (or a crash) has tampered
//! with: an unverifiable snapshot is refused by `verify` and made startable by
//! one `prewarm`; gc never follows a planted trash link and honours the pins
//! of every node.

use std::path::Path;
use std::process::Output;

use aimodel_integration::statichub::{describe, write_model, StaticHub};
use aimodel_integration::support::binary;
use hf_cache::layout::RepoPaths;
use hf_cache::publish::{publish_snapshot, NewFile};
use hf_cache::state::StateDir;
use hf_cache::{check, Mode, RepoId};

const AGENT: &str = "aimodel-agent";
const COMMIT: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";

async fn agent(cache: &Path, endpoint: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(binary(AGENT).unwrap())
        .arg("--cache")
        .arg(cache)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN")
        .output()
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A static hub serving a small model, and the same files for publishing by hand.
async fn hub(dir: &Path) -> (StaticHub, Vec<NewFile>) {
    let files = write_model(dir, &[300_000]).unwrap();
    let served = describe(&files, 100_000).unwrap();
    let new: Vec<NewFile> = served
        .iter()
        .map(|f| NewFile { path: f.path.clone(), bytes: std::fs::read(&f.on_disk).unwrap(), lfs: f.lfs })
        .collect();
    (StaticHub::start("127.0.0.1:0", COMMIT, served).await.unwrap(), new)
}

#[tokio::test]
async fn an_unverifiable_snapshot_is_refused_until_one_prewarm_records_it() {
    let src = tempfile::tempdir().unwrap();
    let (hub, files) = hub(src.path()).await;
    let cache = tempfile::tempdir().unwrap();
    let repo = RepoId::model("org/m");
    let paths = RepoPaths::new(cache.path(), &repo);
    // Everything there, but no listing of any kind: the state a kill between
    // links (or a snapshot of unknown origin) leaves.
    publish_snapshot(cache.path(), &repo, COMMIT, "main", &files).unwrap();
    std::fs::remove_file(paths.tree(COMMIT)).unwrap();
    std::fs::remove_file(paths.completion(COMMIT)).unwrap();
    let out = agent(cache.path(), &hub.endpoint(), &["verify", "org/m"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("INCOMPLETE") && said.contains("no completion record"), "{said}");
    assert!(said.contains("aimodel-agent prewarm"), "{said}");

    // One prewarm fetches nothing (the blobs are there) and records it.
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/m"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(", 0 B downloaded"), "{}", text(&out));
    assert!(paths.completion(COMMIT).is_file());
    let out = agent(cache.path(), &hub.endpoint(), &["verify", "org/m"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(check(cache.path(), &repo, "main", Mode::Quick).recorded);

    // A subset (include) has no trees listing: its record makes it verifiable.
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/subset", "--include", "*.json"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let r = check(cache.path(), &RepoId::model("org/subset"), "main", Mode::Deep);
    assert!(r.is_complete() && r.recorded, "{:?}", r.findings);
    assert!(!r.files.is_empty() && r.files.keys().all(|k| k.ends_with(".json")), "{:?}", r.files);

    // A blob poisoned in place: quick verify refuses it, and prewarm does not launder it.
    let lfs = files.iter().find(|f| f.lfs).unwrap();
    let etag = hf_cache::publish::entry_for(&lfs.bytes, true).etag().to_string();
    let f = std::fs::OpenOptions::new().write(true).open(paths.blob(&etag)).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"poison", 10).unwrap();
    drop(f);
    let out = agent(cache.path(), &hub.endpoint(), &["verify", "org/m"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("modified after the model was recorded complete"), "{}", text(&out));
}

/// A blob corrupted in place (right size, wrong content): `verify --deep` calls
/// it corrupt, `prewarm` downloads it again, and the model verifies again.
#[tokio::test]
async fn a_corrupt_blob_is_reported_and_repaired_by_prewarm() {
    let src = tempfile::tempdir().unwrap();
    let (hub, files) = hub(src.path()).await;
    let cache = tempfile::tempdir().unwrap();
    let repo = RepoId::model("org/m");
    let paths = RepoPaths::new(cache.path(), &repo);
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/m"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let lfs = files.iter().find(|f| f.lfs).unwrap();
    let etag = hf_cache::publish::entry_for(&lfs.bytes, true).etag().to_string();
    let blob = paths.blob(&etag);
    let size = std::fs::metadata(&blob).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"poison", 10).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), size);

    let out = agent(cache.path(), &hub.endpoint(), &["verify", "--deep", "org/m"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("corrupt") && said.contains("CORRUPT"), "{said}");
    assert!(!said.contains("INCOMPLETE"), "{said}");

    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/m"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains(&format!("{}: the cached blob was corrupt; downloaded again", lfs.path)), "{said}");
    assert!(!said.contains(", 0 B downloaded"), "{said}");
    assert_eq!(std::fs::read(&blob).unwrap(), lfs.bytes, "the blob was not fetched again");
    assert!(paths.blobs().join(format!("{etag}.corrupt")).is_file(), "the corrupt blob was not set aside");

    let out = agent(cache.path(), &hub.endpoint(), &["verify", "--deep", "org/m"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("complete"), "{}", text(&out));
    // And a second prewarm has nothing to repair.
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/m"]).await;
    assert!(out.status.success() && !text(&out).contains("corrupt"), "{}", text(&out));
}

#[tokio::test]
async fn gc_never_follows_a_planted_trash_and_honours_shared_pins() {
    let src = tempfile::tempdir().unwrap();
    let (hub, files) = hub(src.path()).await;
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    for r in ["o/keep", "o/cold"] {
        publish_snapshot(&cache, &RepoId::model(r), COMMIT, "main", &files).unwrap();
    }
    let out = agent(&cache, &hub.endpoint(), &["pin", "o/keep"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let state = StateDir::for_hub(&cache);
    assert_eq!(state.pins().into_iter().map(|p| p.repo).collect::<Vec<_>>(), ["o/keep"]);
    let sentinel = home.path().join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep"), b"x").unwrap();
    std::os::unix::fs::symlink(&sentinel, state.trash()).unwrap();

    // Another node (no config, no --pin) collects everything it can.
    let out = agent(&cache, &hub.endpoint(), &["gc", "--max-size", "0"]).await;
    assert_eq!(out.status.code(), Some(4), "target unreachable: the pinned model stays\n{}", text(&out));
    assert!(text(&out).contains("keep (pinned)"), "{}", text(&out));
    assert!(sentinel.join("keep").exists(), "gc deleted through the planted trash link");
    assert!(check(&cache, &RepoId::model("o/keep"), "main", Mode::Deep).is_complete());
    assert!(!RepoPaths::new(&cache, &RepoId::model("o/cold")).root.exists());

    let out = agent(&cache, &hub.endpoint(), &["unpin", "o/keep"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let out = agent(&cache, &hub.endpoint(), &["gc", "--max-size", "0"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!RepoPaths::new(&cache, &RepoId::model("o/keep")).root.exists());
}

/// A tenant who can write the cache points a repo's `blobs/` (or the repo
/// folder itself) at a host directory: the prewarm, running as root, must not
/// download hub-chosen bytes into it.
#[tokio::test]
async fn a_linked_blobs_directory_is_refused_before_any_download() {
    let src = tempfile::tempdir().unwrap();
    let (hub, _) = hub(src.path()).await;
    let cache = tempfile::tempdir().unwrap();
    let sentinel = tempfile::tempdir().unwrap();
    let paths = RepoPaths::new(cache.path(), &RepoId::model("org/m"));
    std::fs::create_dir_all(&paths.root).unwrap();
    std::os::unix::fs::symlink(sentinel.path(), paths.blobs()).unwrap();
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/m"]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
    let other = RepoPaths::new(cache.path(), &RepoId::model("org/other"));
    std::os::unix::fs::symlink(sentinel.path(), &other.root).unwrap();
    let out = agent(cache.path(), &hub.endpoint(), &["prewarm", "org/other"]).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_dir(sentinel.path()).unwrap().count(), 0, "the agent wrote through a tenant's link");
}
