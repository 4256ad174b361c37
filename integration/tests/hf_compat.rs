//! Cross-checks with the real huggingface_hub (PyPI): what we publish it loads
//! offline, and what it calls broken we call broken, with the right finding.

use std::path::Path;

use aimodel_integration::support::{hf_python, run_python};
use hf_cache::layout::RepoPaths;
use hf_cache::publish::{entry_for, publish_snapshot, NewFile};
use hf_cache::{check, Mode, RepoId};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

const LOAD: &str = r#"
import sys, json
from huggingface_hub import snapshot_download
p = snapshot_download(sys.argv[2], cache_dir=sys.argv[1], local_files_only=True)
print(p)
"#;

const TRY: &str = r#"
import sys
from huggingface_hub import try_to_load_from_cache
r = try_to_load_from_cache(sys.argv[2], sys.argv[3], cache_dir=sys.argv[1])
print(r if isinstance(r, str) else "NOT_CACHED")
"#;

const SCAN: &str = r#"
import sys, json
from huggingface_hub import scan_cache_dir
info = scan_cache_dir(sys.argv[1])
print(json.dumps({
  "warnings": [str(w) for w in info.warnings],
  "repos": {r.repo_id: {"size": r.size_on_disk, "revisions": {v.commit_hash: sorted(f.file_name for f in v.files) for v in r.revisions}} for r in info.repos},
}))
"#;

fn files() -> Vec<NewFile> {
    vec![
        NewFile { path: "config.json".into(), bytes: br#"{"model_type":"tiny"}"#.to_vec(), lfs: false },
        NewFile {
            path: "model.safetensors".into(),
            bytes: (0..100_000u32).map(|i| (i % 253) as u8).collect(),
            lfs: true,
        },
        NewFile { path: "tokenizer/vocab.json".into(), bytes: br#"{"a":0}"#.to_vec(), lfs: false },
    ]
}

fn hub_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn what_we_publish_loads_offline_in_huggingface_hub() {
    let Some(py) = hf_python() else { return };
    let d = tempfile::tempdir().unwrap();
    let repo = RepoId::model("org/tiny");
    publish_snapshot(d.path(), &repo, COMMIT, "main", &files()).unwrap();
    assert!(check(d.path(), &repo, "main", Mode::Deep).is_complete());

    let path = run_python(&py, LOAD, &[hub_str(d.path()), "org/tiny"]).unwrap();
    assert!(path.trim().ends_with(&format!("snapshots/{COMMIT}")), "{path}");
    for f in ["config.json", "model.safetensors", "tokenizer/vocab.json"] {
        let got = run_python(&py, TRY, &[hub_str(d.path()), "org/tiny", f]).unwrap();
        assert!(got.trim().ends_with(f), "{f}: {got}");
    }
    let scan: serde_json::Value = serde_json::from_str(&run_python(&py, SCAN, &[hub_str(d.path())]).unwrap()).unwrap();
    assert_eq!(scan["warnings"].as_array().unwrap().len(), 0, "{scan}");
    let revs = &scan["repos"]["org/tiny"]["revisions"][COMMIT];
    assert_eq!(revs.as_array().unwrap().len(), 3, "{scan}");
}

#[test]
fn both_readers_reject_the_same_corruptions() {
    let Some(py) = hf_python() else { return };
    let repo = RepoId::model("org/tiny");
    let lfs = entry_for(&files()[1].bytes, true);
    type Corrupt = fn(&RepoPaths, &str);
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "trailing newline in a ref",
            |p, _| std::fs::write(p.refs("main"), format!("{COMMIT}\n")).unwrap(),
            "ref malformed",
        ),
        (
            "deleted snapshot file",
            |p, _| std::fs::remove_file(p.snapshot(COMMIT).join("tokenizer/vocab.json")).unwrap(),
            "missing",
        ),
        ("deleted blob", |p, etag| std::fs::remove_file(p.blob(etag)).unwrap(), "dangling"),
    ];
    for (what, corrupt, kind) in cases {
        let d = tempfile::tempdir().unwrap();
        publish_snapshot(d.path(), &repo, COMMIT, "main", &files()).unwrap();
        let paths = RepoPaths::new(d.path(), &repo);
        corrupt(&paths, lfs.etag());
        let r = check(d.path(), &repo, "main", Mode::Quick);
        assert!(!r.is_complete(), "{what}: we call it complete");
        assert!(r.findings.iter().any(|f| f.kind() == kind), "{what}: findings {:?}", r.findings);
        let theirs = run_python(&py, LOAD, &[hub_str(d.path()), "org/tiny"]);
        let theirs_ok = match &theirs {
            Ok(p) => {
                Path::new(p.trim()).join("model.safetensors").exists()
                    && Path::new(p.trim()).join("tokenizer/vocab.json").exists()
            }
            Err(_) => false,
        };
        assert!(!theirs_ok, "{what}: huggingface_hub loaded it: {theirs:?}");
    }
    // Sizes: huggingface_hub checks them only on download; we catch a truncated blob.
    let d = tempfile::tempdir().unwrap();
    publish_snapshot(d.path(), &repo, COMMIT, "main", &files()).unwrap();
    std::fs::write(RepoPaths::new(d.path(), &repo).blob(lfs.etag()), b"short").unwrap();
    let r = check(d.path(), &repo, "main", Mode::Quick);
    assert_eq!(r.findings.iter().map(|f| f.kind()).collect::<Vec<_>>(), ["wrong size"]);
}

#[test]
fn what_huggingface_hub_downloads_from_a_hub_server_is_complete_for_us() {
    let Some(py) = hf_python() else { return };
    let weights: Vec<u8> =
        (0..300_000u32).map(|i| u8::try_from((i.wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap()).collect();
    let olah = aimodel_integration::olah::start(&py, &weights);
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&py)
        .args(["-c", "import sys; from huggingface_hub import snapshot_download; print(snapshot_download('org/served', cache_dir=sys.argv[1]))"])
        .arg(cache.path())
        .env("HF_ENDPOINT", olah.endpoint())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(out.status.success(), "download failed: {}", String::from_utf8_lossy(&out.stderr));
    let repo = RepoId::model("org/served");
    let r = check(cache.path(), &repo, "main", Mode::Deep);
    assert!(r.is_complete(), "{:?}", r.findings);
    assert!(r.verifiable, "huggingface_hub writes trees/<commit>.json");
    assert_eq!(r.files.get("model.safetensors"), Some(&(weights.len() as u64)));
    // A leftover partial download of a needed blob makes it incomplete.
    let lfs = entry_for(&weights, true);
    let paths = RepoPaths::new(cache.path(), &repo);
    std::fs::write(paths.blobs().join(format!("{}.deadbeef.incomplete", lfs.etag())), b"x").unwrap();
    let r = check(cache.path(), &repo, "main", Mode::Quick);
    assert_eq!(r.findings.iter().map(|f| f.kind()).collect::<Vec<_>>(), ["leftover partial"]);
}
