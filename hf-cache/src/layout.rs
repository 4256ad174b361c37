//! huggingface_hub's cache layout (`file_download.py`, `_tree_cache.py`,
//! `utils/_shared_blobs.py`):
//!
//! ```text
//! <hub>/models--org--name/refs/<rev>              commit hash, no trailing newline
//! <hub>/models--org--name/snapshots/<commit>/<f>  relative symlink ../../blobs/<etag>
//! <hub>/models--org--name/blobs/<etag>            sha256 (LFS) or git sha1; may itself link
//!                                                 into the shared store <hub>/blobs/<2hex>/<xet>
//! <hub>/models--org--name/blobs/<etag>.<uuid>.incomplete   a download in progress
//! <hub>/models--org--name/trees/<commit>.json     the commit's file listing
//! <hub>/models--org--name/.no_exist/<commit>/<f>  files known not to exist
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What kind of repo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RepoType {
    Model,
    Dataset,
    Space,
}

impl RepoType {
    fn prefix(self) -> &'static str {
        match self {
            RepoType::Model => "models",
            RepoType::Dataset => "datasets",
            RepoType::Space => "spaces",
        }
    }
}

/// A repo on the hub: type and `org/name` id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoId {
    pub kind: RepoType,
    pub id: String,
}

impl RepoId {
    /// A model repo.
    pub fn model(id: &str) -> Self {
        RepoId { kind: RepoType::Model, id: id.to_string() }
    }

    /// `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("{}--{}", self.kind.prefix(), self.id.replace('/', "--"))
    }

    /// Parses a folder name back (`models--org--name` → model `org/name`).
    pub fn from_folder_name(name: &str) -> Option<Self> {
        let (prefix, rest) = name.split_once("--")?;
        let kind = match prefix {
            "models" => RepoType::Model,
            "datasets" => RepoType::Dataset,
            "spaces" => RepoType::Space,
            _ => return None,
        };
        Some(RepoId { kind, id: rest.replace("--", "/") })
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RepoType::Model => f.write_str(&self.id),
            k => write!(f, "{}/{}", k.prefix(), self.id),
        }
    }
}

/// A model repo id as the hub allows it (huggingface_hub's `validate_repo_id`):
/// `org/name` or a bare legacy `name`; each part 1–96 of ASCII letters, digits,
/// `-`, `_` and `.`, not starting or ending with `-` or `.`, without `--` (the
/// cache's folder separator) or `..`. The one parser the driver and the agent use.
pub fn is_repo_id(id: &str) -> bool {
    let ok = |p: &str| {
        (1..=96).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    match id.split_once('/') {
        Some((org, name)) => ok(org) && ok(name),
        None => ok(id),
    }
}

/// The message for an id [`is_repo_id`] refuses.
pub const REPO_ID_RULE: &str =
    "is not a HuggingFace repo id (org/name or name: letters, digits, `-_.`; no `--`, `..` or leading/trailing `-.`)";

/// True for a full 40-hex commit hash.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// True for a blob name: exactly 40 (git sha1) or 64 (sha256) lowercase hex
/// digits. Anything else could name a path outside `blobs/`.
pub fn is_blob_name(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A file path of a snapshot that stays inside it: relative, `/`-separated,
/// no empty, `.` or `..` component, no backslash or control character.
pub fn is_safe_file_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 4096
        && !p.starts_with('/')
        && !p.chars().any(|c| c.is_control() || c == '\\')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Percent-encodes every byte of `s` but ASCII letters, digits and `keep`.
pub fn percent_encode(s: &str, keep: &[u8]) -> String {
    s.bytes()
        .map(
            |b| {
                if b.is_ascii_alphanumeric() || keep.contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            },
        )
        .collect()
}

/// A revision that is safe as a path under `refs/`: a branch, tag or commit,
/// or `refs/pr/N`-style names — no empty, `.` or `..` component, not absolute,
/// no backslash, whitespace or control character. Anything else could name a
/// file outside the repo.
pub fn is_safe_revision(rev: &str) -> bool {
    !rev.is_empty()
        && rev.len() <= 255
        && !rev.starts_with('/')
        && !rev.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        && rev.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Paths of one repo in a hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPaths {
    pub root: PathBuf,
}

impl RepoPaths {
    /// The repo's folder under `hub`.
    pub fn new(hub: &Path, repo: &RepoId) -> Self {
        RepoPaths { root: hub.join(repo.folder_name()) }
    }

    pub fn refs(&self, rev: &str) -> PathBuf {
        self.root.join("refs").join(rev)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.blobs().join(etag)
    }

    pub fn tree(&self, commit: &str) -> PathBuf {
        self.root.join("trees").join(format!("{commit}.json"))
    }

    pub fn no_exist(&self, commit: &str) -> PathBuf {
        self.root.join(".no_exist").join(commit)
    }

    /// Our own files inside the repo folder (huggingface_hub ignores it).
    pub fn aimodel(&self) -> PathBuf {
        self.root.join(".aimodel")
    }

    /// The completion record of `commit`: written last by a publish, it lists
    /// every file published (see [`CompletionRecord`]).
    pub fn completion(&self, commit: &str) -> PathBuf {
        self.aimodel().join("complete").join(format!("{commit}.json"))
    }

    pub fn locks(&self) -> PathBuf {
        self.root.join(".locks")
    }

    /// The relative link a snapshot file points at: `../../blobs/<etag>`, one
    /// more `..` per directory level of `path`.
    pub fn link_target(path: &str, etag: &str) -> PathBuf {
        let depth = path.matches('/').count();
        let mut t = PathBuf::new();
        for _ in 0..depth + 2 {
            t.push("..");
        }
        t.join("blobs").join(etag)
    }
}

/// One file of a commit, as huggingface_hub's tree cache records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub size: u64,
    /// Git blob id (sha1 of `blob <len>\0<content>`).
    pub blob_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lfs_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lfs_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xet_hash: Option<String>,
}

impl TreeEntry {
    /// The blob's name in `blobs/`: the sha256 for LFS files, else the git blob id.
    pub fn etag(&self) -> &str {
        self.lfs_sha256.as_deref().unwrap_or(&self.blob_id)
    }

    /// The size of the file's content.
    pub fn content_size(&self) -> u64 {
        self.lfs_size.unwrap_or(self.size)
    }
}

/// `trees/<commit>.json` (format_version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFile {
    pub format_version: u32,
    pub files: BTreeMap<String, TreeEntry>,
}

impl TreeFile {
    /// The listing in huggingface_hub's format (`json.dump(indent=1)`, sorted paths).
    pub fn new(files: BTreeMap<String, TreeEntry>) -> Self {
        TreeFile { format_version: 1, files }
    }

    /// Serialises like huggingface_hub.
    pub fn to_json(&self) -> String {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        let _ = self.serialize(&mut ser);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// One file of a completion record: its tree entry and the change time
/// (`st_ctime`) of its blob when the record was written. A tenant can reset a
/// blob's mtime, never its ctime: a blob whose ctime is later was written since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFile {
    #[serde(flatten)]
    pub entry: TreeEntry,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

/// `<repo>/.aimodel/complete/<commit>.json`: what a publish (the agent's
/// prewarm, [`crate::publish::publish_snapshot`]) put in the snapshot, written
/// after the blobs, the links and the trees listing, before the ref.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionRecord {
    pub format_version: u32,
    pub commit: String,
    /// True when include/exclude patterns chose a subset of the commit's files.
    pub filtered: bool,
    pub files: BTreeMap<String, RecordedFile>,
    /// Unix seconds.
    pub written_at: u64,
    pub node: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_revisions_become_paths() {
        for ok in ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567", "release-2024_x"] {
            assert!(is_safe_revision(ok), "{ok}");
        }
        for bad in ["", "..", "refs/../../etc/x", "/etc/passwd", "a//b", "a/./b", "a b", "a\\b", "x\n", "refs/"] {
            assert!(!is_safe_revision(bad), "{bad:?}");
        }
        let d = std::env::temp_dir().join("never-written");
        let paths = RepoPaths::new(&d, &RepoId::model("o/m"));
        let err = crate::publish::write_ref(&paths, "../../../../x", &"a".repeat(40)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(!d.exists());
    }

    #[test]
    fn folder_names_round_trip() {
        let r = RepoId::model("mistralai/Mistral-7B-v0.1");
        assert_eq!(r.folder_name(), "models--mistralai--Mistral-7B-v0.1");
        assert_eq!(RepoId::from_folder_name("models--mistralai--Mistral-7B-v0.1"), Some(r));
        assert_eq!(RepoId::from_folder_name("datasets--a--b").unwrap().kind, RepoType::Dataset);
        assert_eq!(RepoId::from_folder_name("blobs"), None);
        assert_eq!(RepoId::model("gpt2").folder_name(), "models--gpt2");
    }

    #[test]
    fn link_targets_climb_per_directory() {
        assert_eq!(RepoPaths::link_target("config.json", "abc"), PathBuf::from("../../blobs/abc"));
        assert_eq!(RepoPaths::link_target("onnx/model.onnx", "abc"), PathBuf::from("../../../blobs/abc"));
    }

    #[test]
    fn blob_names_and_file_paths() {
        assert!(is_blob_name(&"a".repeat(40)) && is_blob_name(&"0".repeat(64)));
        for bad in ["", "../../../etc/passwd", &"A".repeat(40), &"a".repeat(41), &"g".repeat(64), "x/y"] {
            assert!(!is_blob_name(bad), "{bad}");
        }
        assert!(is_safe_file_path("a/b.json") && is_safe_file_path("config.json"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\\b", "./a"] {
            assert!(!is_safe_file_path(bad), "{bad}");
        }
    }

    #[test]
    fn repo_ids_follow_the_hubs_rules() {
        for ok in ["gpt2", "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-0.5B", "a_b/c.d", "o/m"] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "o/",
            "/m",
            "a/b/c",
            "../x",
            "o/..",
            "a--b/c",
            "a/b--c",
            ".hidden/x",
            "x/y-",
            "o/m m",
            "o/m\n",
            "o\\m",
            "ö/m",
            &"x".repeat(97),
        ] {
            assert!(!is_repo_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn commits_are_40_lowercase_hex() {
        assert!(is_commit(&"a".repeat(40)));
        assert!(!is_commit(&"A".repeat(40)));
        assert!(!is_commit("main"));
    }

    #[test]
    fn tree_entries_name_their_blob() {
        let lfs = TreeEntry {
            size: 134,
            blob_id: "b".into(),
            lfs_sha256: Some("s".into()),
            lfs_size: Some(9),
            xet_hash: None,
        };
        assert_eq!((lfs.etag(), lfs.content_size()), ("s", 9));
        let small = TreeEntry { size: 5, blob_id: "b".into(), lfs_sha256: None, lfs_size: None, xet_hash: None };
        assert_eq!((small.etag(), small.content_size()), ("b", 5));
        let t = TreeFile::new(BTreeMap::from([("a".into(), small)]));
        assert!(t.to_json().starts_with("{\n \"format_version\": 1,"));
    }
}
