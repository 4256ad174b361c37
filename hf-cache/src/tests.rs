use std::path::Path;

use crate::check::{check, Finding, Mode};
use crate::layout::{RepoId, RepoPaths};
use crate::publish::{entry_for, publish_snapshot, NewFile};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn seed(hub: &Path) -> RepoId {
    let repo = RepoId::model("org/tiny");
    let files = vec![
        NewFile { path: "config.json".into(), bytes: b"{\"a\":1}".to_vec(), lfs: false },
        NewFile { path: "model.safetensors".into(), bytes: vec![7u8; 5000], lfs: true },
        NewFile { path: "sub/dir/tokenizer.json".into(), bytes: b"{}".to_vec(), lfs: false },
    ];
    publish_snapshot(hub, &repo, COMMIT, "main", &files).unwrap();
    repo
}

fn kinds(hub: &Path, repo: &RepoId, mode: Mode) -> Vec<&'static str> {
    check(hub, repo, "main", mode).findings.iter().map(Finding::kind).collect()
}

#[test]
fn a_published_snapshot_is_complete_in_both_modes() {
    let d = tempfile::tempdir().unwrap();
    let repo = seed(d.path());
    for mode in [Mode::Quick, Mode::Deep] {
        let r = check(d.path(), &repo, "main", mode);
        assert!(r.is_complete(), "{:?}", r.findings);
        assert!(r.verifiable);
        assert_eq!(r.commit.as_deref(), Some(COMMIT));
        assert_eq!(r.total_bytes(), 7 + 5000 + 2);
    }
    // A commit hash works as a revision too.
    assert!(check(d.path(), &repo, COMMIT, Mode::Quick).is_complete());
}

#[test]
fn each_corruption_is_named() {
    let d = tempfile::tempdir().unwrap();
    let repo = seed(d.path());
    let paths = RepoPaths::new(d.path(), &repo);
    let lfs = entry_for(&[7u8; 5000], true);
    let small = entry_for(b"{\"a\":1}", false);

    std::fs::write(paths.blob(lfs.etag()), vec![7u8; 10]).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["wrong size"]);
    std::fs::write(paths.blob(lfs.etag()), vec![8u8; 5000]).unwrap();
    // Quick mode reads no content, but the blob changed after the record: modified.
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["modified"]);
    assert_eq!(kinds(d.path(), &repo, Mode::Deep), ["corrupt"]);
    std::fs::remove_file(paths.blob(lfs.etag())).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["dangling"]);
    std::fs::write(paths.blob(lfs.etag()), vec![7u8; 5000]).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["modified"], "rewritten since the record");
    assert_eq!(kinds(d.path(), &repo, Mode::Deep), Vec::<&str>::new(), "deep mode hashes it instead");
    // Publishing again re-hashes the changed blob before recording it.
    seed(d.path());
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), Vec::<&str>::new());

    std::fs::write(paths.blobs().join(format!("{}.1a2b3c4d.incomplete", small.etag())), b"{").unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["leftover partial"]);
    std::fs::remove_file(paths.blobs().join(format!("{}.1a2b3c4d.incomplete", small.etag()))).unwrap();

    std::fs::remove_file(paths.snapshot(COMMIT).join("sub/dir/tokenizer.json")).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["missing"]);
    // Without trees/<commit>.json the completion record still notices it.
    std::fs::remove_file(paths.tree(COMMIT)).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["missing"]);
    // With neither, nothing could notice it: unverifiable, hence not complete.
    std::fs::remove_file(paths.completion(COMMIT)).unwrap();
    let r = check(d.path(), &repo, "main", Mode::Quick);
    assert!(!r.verifiable && !r.recorded && !r.is_complete());
    assert_eq!(r.findings, [Finding::Unverifiable { commit: COMMIT.into() }]);
    assert!(r.findings[0].to_string().contains("aimodel-agent prewarm"), "{}", r.findings[0]);

    std::fs::write(paths.refs("main"), format!("{COMMIT}\n")).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["ref malformed"]);
    assert_eq!(kinds(d.path(), &repo, Mode::Quick).len(), 1);
    assert_eq!(check(d.path(), &repo, "v2", Mode::Quick).findings[0].kind(), "ref missing");
    assert_eq!(check(d.path(), &RepoId::model("org/other"), "main", Mode::Quick).findings, [Finding::RepoMissing]);
}

#[test]
fn shared_store_blobs_are_followed() {
    // huggingface_hub 2.x: repo blobs may be links into <hub>/blobs/<2hex>/<xet>.
    let d = tempfile::tempdir().unwrap();
    let repo = seed(d.path());
    let paths = RepoPaths::new(d.path(), &repo);
    let lfs = entry_for(&[7u8; 5000], true);
    let xet = "ab".repeat(32);
    let store = d.path().join("blobs").join(&xet[..2]);
    std::fs::create_dir_all(&store).unwrap();
    std::fs::rename(paths.blob(lfs.etag()), store.join(&xet)).unwrap();
    std::os::unix::fs::symlink(format!("../../blobs/{}/{xet}", &xet[..2]), paths.blob(lfs.etag())).unwrap();
    assert!(check(d.path(), &repo, "main", Mode::Deep).is_complete());
    std::fs::remove_file(store.join(&xet)).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["dangling"]);
}

#[test]
fn listing_problems_are_named() {
    let d = tempfile::tempdir().unwrap();
    let repo = seed(d.path());
    let paths = RepoPaths::new(d.path(), &repo);
    // A file in the snapshot that the commit's listing does not know.
    let extra = entry_for(b"{\"a\":1}", false);
    std::os::unix::fs::symlink(
        RepoPaths::link_target("extra.json", extra.etag()),
        paths.snapshot(COMMIT).join("extra.json"),
    )
    .unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["unexpected file"]);
    // The trees listing knows fewer files than the record: the record wins for
    // what must be there, the listing still names strays.
    let tree = std::fs::read_to_string(paths.tree(COMMIT)).unwrap();
    let mut t: crate::layout::TreeFile = serde_json::from_str(&tree).unwrap();
    t.files.remove("config.json");
    std::fs::write(paths.tree(COMMIT), t.to_json()).unwrap();
    assert_eq!(kinds(d.path(), &repo, Mode::Quick), ["unexpected file"]);
    std::fs::remove_file(paths.snapshot(COMMIT).join("extra.json")).unwrap();
    assert!(check(d.path(), &repo, "main", Mode::Quick).is_complete());
}
