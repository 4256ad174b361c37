//! A hostile tenant that can write the shared cache: every trick it has
//! against the root processes reading the cache (the driver's fingerprint and
//! completeness gate, the agent's gc and prewarm) is refused.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::check::{check, Finding, Mode};
use crate::gc::{self, GcLock, Policy};
use crate::layout::{RepoId, RepoPaths};
use crate::publish::{entry_for, link_file, publish_snapshot, write_ref, NewFile};
use crate::state::{InUse, StateDir, WarmRecord};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn files() -> Vec<NewFile> {
    vec![
        NewFile { path: "config.json".into(), bytes: b"{\"a\":1}".to_vec(), lfs: false },
        NewFile { path: "model.safetensors".into(), bytes: vec![7u8; 5000], lfs: true },
        NewFile { path: "sub/tokenizer.json".into(), bytes: b"{}".to_vec(), lfs: false },
    ]
}

fn seed(hub: &Path, repo: &str) -> RepoPaths {
    let id = RepoId::model(repo);
    publish_snapshot(hub, &id, COMMIT, "main", &files()).unwrap();
    RepoPaths::new(hub, &id)
}

fn kinds(hub: &Path, repo: &str, mode: Mode) -> Vec<&'static str> {
    check(hub, &RepoId::model(repo), "main", mode).findings.iter().map(Finding::kind).collect()
}

fn warm(repo: &str) -> WarmRecord {
    WarmRecord {
        repo: repo.into(),
        revision: "main".into(),
        commit: COMMIT.into(),
        bytes: 1,
        verified_at: 1,
        node: "n".into(),
    }
}

fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap()
}

#[test]
fn a_warm_record_linked_to_dev_zero_is_skipped_not_read() {
    let d = tempfile::tempdir().unwrap();
    let s = StateDir::for_hub(&d.path().join("hub"));
    s.write_warm(&warm("o/good")).unwrap();
    let dir = s.root().join("warm");
    // Reading this one would never end (the plugin reached 9.6 GB RSS).
    symlink("/dev/zero", dir.join("o--zero@main.json"));
    symlink("/etc/passwd", dir.join("o--host@main.json"));
    nix::unistd::mkfifo(&dir.join("o--fifo@main.json"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Oversized, though valid JSON.
    let mut big = serde_json::to_vec(&warm("o/big")).unwrap();
    big.truncate(big.len() - 1);
    big.extend(std::iter::repeat_n(b' ', 70 << 10));
    big.push(b'}');
    std::fs::write(dir.join("o--big@main.json"), &big).unwrap();
    assert!(serde_json::from_slice::<WarmRecord>(&big).is_ok(), "the fixture is valid JSON");
    let seen: Vec<String> = s.warm().into_iter().map(|r| r.repo).collect();
    assert_eq!(seen, ["o/good"]);
    // The same for in-use markers and shared pins.
    s.mark_in_use(&InUse {
        repo: "o/m".into(),
        commit: COMMIT.into(),
        node: "n".into(),
        task: "t".into(),
        also: vec![],
    })
    .unwrap();
    symlink("/dev/zero", s.root().join("in-use/zero.json"));
    assert_eq!(s.in_use(Duration::from_secs(60)).len(), 1);
    s.pin("o/pinned", "n:cli").unwrap();
    symlink("/dev/zero", s.root().join("pins/o--zero.json"));
    assert_eq!(s.pins().into_iter().map(|p| p.repo).collect::<Vec<_>>(), ["o/pinned"]);
}

#[test]
fn symlinked_state_directories_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let s = StateDir::for_hub(&d.path().join("hub"));
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    // Records the tenant wants us to believe, and a place it wants us to write.
    std::fs::write(elsewhere.join("o--fake@main.json"), serde_json::to_vec(&warm("o/fake")).unwrap()).unwrap();
    std::fs::create_dir_all(s.root()).unwrap();
    symlink(&elsewhere, s.root().join("warm"));
    symlink(&elsewhere, s.root().join("in-use"));
    assert!(s.warm().is_empty());
    let e = s.write_warm(&warm("o/m")).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    let u = InUse { repo: "o/m".into(), commit: COMMIT.into(), node: "n".into(), task: "t".into(), also: vec![] };
    assert!(s.mark_in_use(&u).is_err());
    assert!(s.in_use(Duration::from_secs(60)).is_empty());
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 1, "nothing written through the link");
    // The root itself as a link.
    let d2 = tempfile::tempdir().unwrap();
    let s2 = StateDir::for_hub(&d2.path().join("hub"));
    symlink(s.root(), s2.root());
    assert!(s2.warm().is_empty() && s2.write_warm(&warm("o/m")).is_err());
}

fn gc_all(hub: &Path, pinned: &[&str]) -> Vec<String> {
    let policy = Policy {
        max_size: Some(0),
        pinned: pinned.iter().map(|s| s.to_string()).collect(),
        in_use_ttl: Duration::from_secs(60),
        ..Policy::default()
    };
    gc::run(hub, &policy).unwrap().1.into_iter().map(|(r, _)| r).collect()
}

#[test]
fn trash_linked_to_a_sentinel_leaves_the_sentinel_alone() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    seed(&hub, "o/cold");
    let sentinel = d.path().join("sentinel");
    std::fs::create_dir_all(sentinel.join("inner")).unwrap();
    std::fs::write(sentinel.join("inner/keep"), b"x").unwrap();
    let s = StateDir::for_hub(&hub);
    std::fs::create_dir_all(s.root()).unwrap();
    symlink(&sentinel, s.trash());
    assert_eq!(gc_all(&hub, &[]), ["o/cold"]);
    assert!(sentinel.join("inner/keep").exists(), "gc deleted through the trash link");
    assert!(std::fs::symlink_metadata(s.trash()).unwrap().is_dir(), "a real trash replaces the link");
    // A link left inside the trash is unlinked, its target kept.
    symlink(&sentinel, s.trash().join("models--o--x.abc"));
    assert!(gc::empty_trash(&hub).unwrap().is_empty());
    assert!(sentinel.join("inner/keep").exists());
    // A tree too deep to remove is left (and named), the rest goes.
    let mut deep = s.trash().join("models--o--deep.1");
    for _ in 0..140 {
        deep = deep.join("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(s.trash().join("models--o--ok.2/x")).unwrap();
    let left = gc::empty_trash(&hub).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, "models--o--deep.1");
    assert!(left[0].1.to_string().contains("nested too deep"), "{}", left[0].1);
    assert!(!s.trash().join("models--o--ok.2").exists());
    std::fs::remove_dir_all(s.trash().join("models--o--deep.1")).unwrap();
    assert_eq!(std::fs::read_dir(s.trash()).unwrap().count(), 0);
}

#[test]
fn trash_linked_to_the_cache_root_keeps_pinned_models() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let pinned = seed(&hub, "o/pinned");
    seed(&hub, "o/cold");
    let s = StateDir::for_hub(&hub);
    // Pinned by another node's manifest: only the shared pin says so.
    s.pin("o/pinned", "other-node:manifest").unwrap();
    assert!(s.root().is_dir());
    symlink("..", s.trash());
    assert_eq!(gc_all(&hub, &[]), ["o/cold"]);
    assert!(check(&hub, &RepoId::model("o/pinned"), "main", Mode::Deep).is_complete());
    assert!(pinned.root.is_dir());
    assert!(s.root().join("pins/o--pinned.json").exists());
    s.unpin("o/pinned").unwrap();
    assert_eq!(gc_all(&hub, &[]), ["o/pinned"]);
}

#[test]
fn a_snapshot_link_to_a_host_file_is_a_finding_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let p = seed(&hub, "o/m");
    let host = d.path().join("host-secret");
    std::fs::write(&host, b"{\"a\":1}").unwrap();
    let link = p.snapshot(COMMIT).join("config.json");
    std::fs::remove_file(&link).unwrap();
    symlink(&host, &link);
    for mode in [Mode::Quick, Mode::Deep] {
        assert_eq!(kinds(&hub, "o/m", mode), ["bad link"]);
    }
    // Climbing out with a relative link that ends in a blob-like name.
    std::fs::remove_file(&link).unwrap();
    symlink(format!("../../../../x/blobs/{}", entry_for(b"{\"a\":1}", false).etag()), &link);
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["bad link"]);
    // A directory of the snapshot replaced by a link to the host.
    std::fs::remove_file(&link).unwrap();
    symlink(format!("../../blobs/{}", entry_for(b"{\"a\":1}", false).etag()), &link);
    assert!(check(&hub, &RepoId::model("o/m"), "main", Mode::Quick).is_complete());
    std::fs::remove_dir_all(p.snapshot(COMMIT).join("sub")).unwrap();
    symlink(d.path(), p.snapshot(COMMIT).join("sub"));
    assert!(kinds(&hub, "o/m", Mode::Quick).contains(&"bad link"));
}

#[test]
fn a_blob_linked_out_of_the_cache_is_a_finding() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let p = seed(&hub, "o/m");
    let lfs = entry_for(&[7u8; 5000], true);
    let host = d.path().join("host-file");
    std::fs::write(&host, vec![7u8; 5000]).unwrap();
    std::fs::remove_file(p.blob(lfs.etag())).unwrap();
    symlink(&host, p.blob(lfs.etag()));
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["bad link"]);
    assert_eq!(kinds(&hub, "o/m", Mode::Deep), ["bad link"]);
    // A link that looks like the shared store but is not.
    std::fs::remove_file(p.blob(lfs.etag())).unwrap();
    symlink("../../blobs/../../host-file", p.blob(lfs.etag()));
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["bad link"]);
    // The blobs directory itself as a link.
    std::fs::remove_file(p.blob(lfs.etag())).unwrap();
    std::fs::rename(p.blobs(), d.path().join("moved")).unwrap();
    symlink(d.path().join("moved"), p.blobs());
    assert!(kinds(&hub, "o/m", Mode::Quick).iter().all(|k| *k == "bad link"));
}

#[test]
fn oversized_refs_and_listings_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let p = seed(&hub, "o/m");
    // A ref padded to 100 KiB: never read whole.
    std::fs::write(p.refs("main"), format!("{COMMIT}{}", " ".repeat(100 << 10))).unwrap();
    assert!(!check(&hub, &RepoId::model("o/m"), "main", Mode::Quick).is_complete());
    symlink("/dev/zero", p.refs("zero"));
    let r = check(&hub, &RepoId::model("o/m"), "zero", Mode::Quick);
    assert_eq!(r.findings.iter().map(Finding::kind).collect::<Vec<_>>(), ["bad link"]);
    write_ref(&p, "main", COMMIT).unwrap();
    // A listing linked to /dev/zero is no listing (the record still is one).
    std::fs::remove_file(p.tree(COMMIT)).unwrap();
    symlink("/dev/zero", p.tree(COMMIT));
    let r = check(&hub, &RepoId::model("o/m"), "main", Mode::Quick);
    assert!(r.is_complete() && r.recorded, "{:?}", r.findings);
    std::fs::remove_file(p.completion(COMMIT)).unwrap();
    symlink("/dev/zero", p.completion(COMMIT));
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["unverifiable"]);
}

#[test]
fn a_kill_between_links_or_a_subset_without_a_record_is_incomplete() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let id = RepoId::model("o/partial");
    let p = RepoPaths::new(&hub, &id);
    // Blobs and the first link only, then the ref (as a crash-unsafe writer would).
    for f in files() {
        let e = entry_for(&f.bytes, f.lfs);
        crate::publish::write_atomic(&p.blob(e.etag()), &f.bytes).unwrap();
    }
    link_file(&p, COMMIT, "config.json", entry_for(b"{\"a\":1}", false).etag()).unwrap();
    write_ref(&p, "main", COMMIT).unwrap();
    let r = check(&hub, &id, "main", Mode::Quick);
    assert!(!r.is_complete());
    assert_eq!(r.findings, [Finding::Unverifiable { commit: COMMIT.into() }]);
    // The commit-pinned form too.
    assert!(!check(&hub, &id, COMMIT, Mode::Deep).is_complete());
}

#[test]
fn unsafe_etags_and_paths_are_never_linked() {
    let d = tempfile::tempdir().unwrap();
    let p = RepoPaths::new(d.path(), &RepoId::model("o/m"));
    for etag in ["../../../../etc/passwd", "ABCDEF0123456789abcdef0123456789abcdef01", "abc"] {
        let e = link_file(&p, COMMIT, "f", etag).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{etag}");
    }
    let good = "a".repeat(64);
    for path in ["../escape", "/abs", "a/../../b"] {
        assert!(link_file(&p, COMMIT, path, &good).is_err(), "{path}");
    }
    // A snapshot directory planted as a link is refused, not written through.
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(p.snapshot(COMMIT)).unwrap();
    symlink(&outside, p.snapshot(COMMIT).join("sub"));
    assert!(link_file(&p, COMMIT, "sub/x", &good).is_err());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let files = [NewFile { path: "../../x".into(), bytes: b"x".to_vec(), lfs: false }];
    assert!(publish_snapshot(d.path(), &RepoId::model("o/m"), COMMIT, "main", &files).is_err());
}

#[test]
fn an_overwritten_blob_is_modified() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let p = seed(&hub, "o/m");
    let lfs = entry_for(&[7u8; 5000], true);
    let before = std::fs::metadata(p.blob(lfs.etag())).unwrap().modified().unwrap();
    // Same size, poisoned in place, mtime put back: only the ctime tells.
    let f = std::fs::OpenOptions::new().write(true).open(p.blob(lfs.etag())).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"poison", 0).unwrap();
    f.set_modified(before).unwrap();
    drop(f);
    let r = check(&hub, &RepoId::model("o/m"), "main", Mode::Quick);
    assert_eq!(r.findings, [Finding::Modified { path: "model.safetensors".into() }]);
    assert!(r.findings[0].to_string().contains("verify --deep"));
    assert_eq!(kinds(&hub, "o/m", Mode::Deep), ["corrupt"]);
    // A prewarm (publish) hashes it before recording, and refuses the poison.
    let e = publish_snapshot(&hub, &RepoId::model("o/m"), COMMIT, "main", &files()).unwrap_err();
    assert!(e.to_string().contains("hashes to"), "{e}");
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["modified"]);
}

#[test]
fn a_stale_partial_beside_a_good_blob_does_not_block() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    let p = seed(&hub, "o/m");
    let lfs = entry_for(&[7u8; 5000], true);
    let partial = p.blobs().join(format!("{}.deadbeef.incomplete", lfs.etag()));
    std::fs::write(&partial, b"x").unwrap();
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["leftover partial"], "a fresh one is a download in progress");
    let old = SystemTime::now() - crate::check::PARTIAL_FRESH - Duration::from_secs(60);
    std::fs::File::options().write(true).open(&partial).unwrap().set_modified(old).unwrap();
    assert!(check(&hub, &RepoId::model("o/m"), "main", Mode::Quick).is_complete());
    // With its blob gone it blocks again, however old.
    std::fs::remove_file(p.blob(lfs.etag())).unwrap();
    assert_eq!(kinds(&hub, "o/m", Mode::Quick), ["leftover partial", "dangling"]);
}

#[test]
fn two_gcs_race_for_the_heartbeat_lock() {
    let d = tempfile::tempdir().unwrap();
    let hub = d.path().join("hub");
    seed(&hub, "o/m");
    let s = StateDir::for_hub(&hub);
    let lock = s.root().join("gc.lock");
    let beat = Duration::from_millis(20);
    let policy = Policy { max_size: Some(0), in_use_ttl: Duration::from_secs(60), ..Policy::default() };
    // A live holder (its content changes every heartbeat) is never taken over.
    let held = GcLock::take(&s, beat, Duration::from_secs(10)).unwrap().expect("free");
    assert!(held.held());
    let e = gc::run_with_lock(&hub, &policy, beat, Duration::from_secs(10)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    assert!(held.held());
    drop(held);
    assert!(!lock.exists(), "released by its holder");
    // A dead holder's lock (content never changes) is taken over.
    std::fs::write(&lock, "dead-node 1 0000 7\n").unwrap();
    let (_, done) = gc::run_with_lock(&hub, &policy, beat, Duration::from_millis(300)).unwrap();
    assert_eq!(done.len(), 1);
    assert!(!lock.exists());
    // A holder whose lock was taken over knows it, and its release leaves the new holder's lock alone.
    let slow = GcLock::take(&s, Duration::from_secs(3600), Duration::from_secs(10)).unwrap().expect("free");
    assert!(slow.held());
    std::fs::write(&lock, "other 2 ffff 1\n").unwrap();
    assert!(!slow.held(), "the token is no longer ours");
    drop(slow);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "other 2 ffff 1\n");
    // Two gcs at once: each either ran or was told another holds the lock; none is left behind.
    std::fs::remove_file(&lock).unwrap();
    seed(&hub, "o/m2");
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (h, p) = (hub.clone(), policy.clone());
            std::thread::spawn(move || gc::run_with_lock(&h, &p, beat, Duration::from_secs(10)).map(|_| ()))
        })
        .collect();
    let outcomes: Vec<_> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(outcomes.iter().any(Result::is_ok), "{outcomes:?}");
    for r in &outcomes {
        if let Err(e) = r {
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        }
    }
    assert!(!lock.exists());
}
