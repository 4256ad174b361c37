//! Is `repo@revision` complete in the cache? Quick mode reads metadata only;
//! deep mode also hashes every blob (sha256 for LFS files, git sha1 otherwise).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha1::Digest as _;

use crate::layout::{is_commit, RepoId, RepoPaths, TreeEntry, TreeFile};

/// How thoroughly to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Links, sizes, refs, partial files.
    Quick,
    /// Quick, plus the hash of every blob against its name.
    Deep,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The repo has no folder in the cache.
    RepoMissing,
    /// `refs/<rev>` does not exist (and the revision is not a cached commit).
    RefMissing { rev: String },
    /// `refs/<rev>` is not exactly a 40-hex commit (e.g. a trailing newline).
    RefMalformed { rev: String, content: String },
    /// `snapshots/<commit>` does not exist.
    SnapshotMissing { commit: String },
    /// A file of the commit is not in the snapshot.
    Missing { path: String },
    /// A snapshot link (or a blob link into the shared store) points nowhere.
    Dangling { path: String },
    /// The blob's size differs from the commit's listing.
    WrongSize { path: String, expected: u64, actual: u64 },
    /// The blob's content does not hash to its name.
    HashMismatch { path: String, expected: String, actual: String },
    /// A download left `blobs/<etag>.*.incomplete` behind for a blob of this commit.
    Partial { path: String, file: String },
    /// The snapshot holds a file the listing does not know.
    Unexpected { path: String },
}

impl Finding {
    /// Short name of the kind of finding.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::RepoMissing => "repo missing",
            Finding::RefMissing { .. } => "ref missing",
            Finding::RefMalformed { .. } => "ref malformed",
            Finding::SnapshotMissing { .. } => "snapshot missing",
            Finding::Missing { .. } => "missing",
            Finding::Dangling { .. } => "dangling",
            Finding::WrongSize { .. } => "wrong size",
            Finding::HashMismatch { .. } => "hash mismatch",
            Finding::Partial { .. } => "leftover partial",
            Finding::Unexpected { .. } => "unexpected file",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::RepoMissing => write!(f, "the repo is not in the cache"),
            Finding::RefMissing { rev } => write!(f, "refs/{rev} is missing"),
            Finding::RefMalformed { rev, content } => write!(f, "refs/{rev} holds {content:?}, not a commit hash"),
            Finding::SnapshotMissing { commit } => write!(f, "snapshots/{commit} is missing"),
            Finding::Missing { path } => write!(f, "{path}: missing"),
            Finding::Dangling { path } => write!(f, "{path}: dangling link"),
            Finding::WrongSize { path, expected, actual } => {
                write!(f, "{path}: {actual} bytes, expected {expected}")
            }
            Finding::HashMismatch { path, expected, actual } => {
                write!(f, "{path}: content hashes to {actual}, expected {expected}")
            }
            Finding::Partial { path, file } => write!(f, "{path}: partial download {file} left behind"),
            Finding::Unexpected { path } => write!(f, "{path}: not in the commit's listing"),
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub repo: RepoId,
    pub revision: String,
    /// The commit the revision resolved to, when it did.
    pub commit: Option<String>,
    /// Files checked (path → size).
    pub files: BTreeMap<String, u64>,
    /// False when there is no `trees/<commit>.json`: the snapshot itself was the
    /// listing, so a file that never arrived cannot be noticed.
    pub verifiable: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Complete: resolved, listed, and nothing wrong.
    pub fn is_complete(&self) -> bool {
        self.commit.is_some() && self.findings.is_empty()
    }

    /// Total bytes of the commit's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// Resolves a revision: a cached commit as is, else `refs/<rev>`.
pub fn resolve(paths: &RepoPaths, rev: &str) -> Result<String, Finding> {
    if !crate::layout::is_safe_revision(rev) {
        return Err(Finding::RefMissing { rev: rev.to_string() });
    }
    if is_commit(rev) && paths.snapshot(rev).is_dir() {
        return Ok(rev.to_string());
    }
    match std::fs::read_to_string(paths.refs(rev)) {
        Ok(content) if is_commit(&content) => Ok(content),
        Ok(content) => Err(Finding::RefMalformed { rev: rev.to_string(), content }),
        Err(_) if is_commit(rev) => Err(Finding::SnapshotMissing { commit: rev.to_string() }),
        Err(_) => Err(Finding::RefMissing { rev: rev.to_string() }),
    }
}

/// Checks `repo@rev` under the hub cache directory `hub`.
pub fn check(hub: &Path, repo: &RepoId, rev: &str, mode: Mode) -> Report {
    let paths = RepoPaths::new(hub, repo);
    let mut report = Report {
        repo: repo.clone(),
        revision: rev.to_string(),
        commit: None,
        files: BTreeMap::new(),
        verifiable: false,
        findings: Vec::new(),
    };
    let commit = match resolve(&paths, rev) {
        Ok(c) => c,
        // Only on failure is it worth a syscall to tell which.
        Err(_) if !paths.root.is_dir() => {
            report.findings.push(Finding::RepoMissing);
            return report;
        }
        Err(f) => {
            report.findings.push(f);
            return report;
        }
    };
    report.commit = Some(commit.clone());
    let snapshot = paths.snapshot(&commit);
    let dir = match std::fs::File::open(&snapshot) {
        Ok(d) => d,
        Err(_) => {
            report.findings.push(Finding::SnapshotMissing { commit });
            return report;
        }
    };
    let listing = read_tree(&paths, &commit);
    report.verifiable = listing.is_some();
    let partials = partial_downloads(&paths);
    match listing {
        Some(tree) => {
            for (path, entry) in &tree.files {
                report.files.insert(path.clone(), entry.content_size());
                check_file(&snapshot, &dir, path, Some(entry), &partials, mode, &mut report.findings);
            }
            for path in walk(&snapshot) {
                if !tree.files.contains_key(&path) {
                    report.findings.push(Finding::Unexpected { path });
                }
            }
        }
        None => {
            for path in walk(&snapshot) {
                let size = std::fs::metadata(snapshot.join(&path)).map(|m| m.len()).unwrap_or(0);
                report.files.insert(path.clone(), size);
                check_file(&snapshot, &dir, &path, None, &partials, mode, &mut report.findings);
            }
        }
    }
    report
}

fn read_tree(paths: &RepoPaths, commit: &str) -> Option<TreeFile> {
    let text = std::fs::read_to_string(paths.tree(commit)).ok()?;
    let tree: TreeFile = serde_json::from_str(&text).ok()?;
    (tree.format_version == 1).then_some(tree)
}

/// `blobs/<etag>.<anything>.incomplete` (and the older `blobs/<etag>.incomplete`).
fn partial_downloads(paths: &RepoPaths) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(paths.blobs()) else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".incomplete"))
        .collect()
}

/// The size of `path` below the open snapshot directory, following links;
/// `Err(true)` when the link itself exists (dangling), `Err(false)` when missing.
/// Stat relative to the directory's fd spares the kernel re-walking the prefix.
fn size_at(dir: &std::fs::File, path: &str) -> Result<u64, bool> {
    use nix::fcntl::AtFlags;
    match nix::sys::stat::fstatat(dir, path, AtFlags::empty()) {
        Ok(st) => Ok(st.st_size as u64),
        Err(_) => Err(nix::sys::stat::fstatat(dir, path, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()),
    }
}

fn check_file(
    snapshot: &Path,
    dir: &std::fs::File,
    path: &str,
    entry: Option<&TreeEntry>,
    partials: &[String],
    mode: Mode,
    findings: &mut Vec<Finding>,
) {
    let link = snapshot.join(path);
    let etag = entry.map(|e| e.etag().to_string()).or_else(|| {
        std::fs::read_link(&link).ok().and_then(|t| t.file_name().and_then(|n| n.to_str()).map(str::to_string))
    });
    if let Some(etag) = &etag {
        if let Some(p) = partials.iter().find(|p| p.starts_with(&format!("{etag}."))) {
            findings.push(Finding::Partial { path: path.to_string(), file: p.clone() });
        }
    }
    // Following every link: snapshot → repo blob → shared store.
    let size = match size_at(dir, path) {
        Ok(n) => n,
        Err(false) => {
            findings.push(Finding::Missing { path: path.to_string() });
            return;
        }
        Err(true) => {
            findings.push(Finding::Dangling { path: path.to_string() });
            return;
        }
    };
    if let Some(e) = entry {
        if size != e.content_size() {
            findings.push(Finding::WrongSize { path: path.to_string(), expected: e.content_size(), actual: size });
            return;
        }
    }
    if mode == Mode::Deep {
        let expected = etag.unwrap_or_default();
        let lfs = entry.map_or(expected.len() == 64, |e| e.lfs_sha256.is_some());
        let actual = if lfs { sha256_file(&link) } else { git_blob_sha1(&link) };
        match actual {
            Ok(actual) if actual == expected => {}
            Ok(actual) => findings.push(Finding::HashMismatch { path: path.to_string(), expected, actual }),
            Err(_) => findings.push(Finding::Dangling { path: path.to_string() }),
        }
    }
}

/// Every file below `dir`, as `/`-separated relative paths (links not followed into dirs).
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(dir.join(&rel)) else { continue };
        for e in rd.flatten() {
            let p = rel.join(e.file_name());
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p.to_string_lossy().replace('\\', "/")),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

const HASH_BUF: usize = 1 << 20;

/// Feeds a file's content to `h` in large reads.
fn hash_file<D: sha1::Digest>(mut h: D, f: &mut std::fs::File) -> std::io::Result<String> {
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    hash_file(sha2::Sha256::new(), &mut std::fs::File::open(path)?)
}

/// Git's blob id: sha1 of `blob <len>\0` followed by the content.
pub fn git_blob_sha1(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", f.metadata()?.len()).as_bytes());
    hash_file(h, &mut f)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
