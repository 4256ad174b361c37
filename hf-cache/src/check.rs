//! Is `repo@revision` complete in the cache? Quick mode reads metadata only;
//! deep mode also hashes every blob (sha256 for LFS files, git sha1 otherwise).
//!
//! A snapshot is checked against a listing: `trees/<commit>.json` (written by
//! huggingface_hub and by us) and/or our completion record
//! (`.aimodel/complete/<commit>.json`, see [`crate::publish`]). With neither
//! it is not complete ([`Finding::Unverifiable`]): a partial snapshot would
//! otherwise pass. Nothing is followed out of the repo: every snapshot entry
//! must be a link `../../blobs/<etag>` to a regular file in the repo's
//! `blobs/`, or to one in the shared store `<hub>/blobs/<2hex>/<name>`;
//! directories are opened without following links; listings are read with
//! `O_NOFOLLOW` and a size cap. With a completion record, a blob whose ctime
//! is later than recorded is [`Finding::Modified`] (quick mode; deep mode
//! hashes it instead).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::layout::{is_blob_name, is_commit, RepoId, RepoPaths, TreeEntry, TreeFile};
use crate::safefs;

pub use crate::blob::{git_blob_sha1, sha256_file};
pub(crate) use crate::blob::{hash_blob, open_blob, read_repo_file, refused, BlobError};

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
    /// A snapshot entry (or its blob, or a directory on the way) is not a link
    /// into the repo's `blobs/` (or the shared store): never followed.
    BadLink { path: String, target: String },
    /// The blob changed (its ctime) after the completion record was written:
    /// a write into the cache since; only a deep check can clear it.
    Modified { path: String },
    /// Neither `trees/<commit>.json` nor a completion record: the snapshot
    /// cannot be told complete (a file that never arrived is not noticed).
    Unverifiable { commit: String },
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
            Finding::HashMismatch { .. } => "corrupt",
            Finding::Partial { .. } => "leftover partial",
            Finding::Unexpected { .. } => "unexpected file",
            Finding::BadLink { .. } => "bad link",
            Finding::Modified { .. } => "modified",
            Finding::Unverifiable { .. } => "unverifiable",
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
                write!(f, "{path}: corrupt: content hashes to {actual}, expected {expected}")
            }
            Finding::Partial { path, file } => write!(f, "{path}: partial download {file} left behind"),
            Finding::Unexpected { path } => write!(f, "{path}: not in the commit's listing"),
            Finding::BadLink { path, target } => {
                write!(f, "{path}: points at {target}, not at a blob of this repo (refused, not followed)")
            }
            Finding::Modified { path } => write!(
                f,
                "{path}: its blob was modified after the model was recorded complete \
                 (run aimodel-agent verify --deep, then aimodel-agent prewarm)"
            ),
            Finding::Unverifiable { commit } => write!(
                f,
                "snapshots/{commit} has no trees/{commit}.json and no completion record, so its completeness \
                 cannot be verified (run aimodel-agent prewarm to check and record it)"
            ),
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
    /// True when the snapshot was checked against a listing (`trees/<commit>.json`
    /// or a completion record); false comes with [`Finding::Unverifiable`].
    pub verifiable: bool,
    /// True when a completion record of the commit was found (blob ctimes checked).
    pub recorded: bool,
    pub findings: Vec<Finding>,
}

impl Report {
    /// Complete: resolved, listed, and nothing wrong.
    pub fn is_complete(&self) -> bool {
        self.commit.is_some() && self.verifiable && self.findings.is_empty()
    }

    /// Total bytes of the commit's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// How recent a `*.incomplete` partial must be to count as a download in
/// progress when its blob is there and sound (older ones are strays; the
/// agent's prewarm removes them).
pub const PARTIAL_FRESH: Duration = Duration::from_secs(600);

/// Resolves a revision: a cached commit as is, else `refs/<rev>`.
pub fn resolve(paths: &RepoPaths, rev: &str) -> Result<String, Finding> {
    if !crate::layout::is_safe_revision(rev) {
        return Err(Finding::RefMissing { rev: rev.to_string() });
    }
    if is_commit(rev) && paths.snapshot(rev).is_dir() {
        return Ok(rev.to_string());
    }
    match read_repo_file(paths, &Path::new("refs").join(rev), safefs::STATE_CAP) {
        Ok(bytes) => {
            let content = String::from_utf8_lossy(&bytes).into_owned();
            if is_commit(&content) {
                Ok(content)
            } else {
                Err(Finding::RefMalformed { rev: rev.to_string(), content: content.chars().take(100).collect() })
            }
        }
        Err(e) if refused(&e) => Err(Finding::BadLink { path: format!("refs/{rev}"), target: e.to_string() }),
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
        recorded: false,
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
    let snap = safefs::open_dir(&paths.root)
        .and_then(|root| safefs::open_dir_path_at(&root, &Path::new("snapshots").join(&commit)));
    let snap = match snap {
        Ok(d) => d,
        Err(e) if refused(&e) => {
            report.findings.push(Finding::BadLink { path: format!("snapshots/{commit}"), target: e.to_string() });
            return report;
        }
        Err(_) => {
            report.findings.push(Finding::SnapshotMissing { commit });
            return report;
        }
    };
    let tree = read_tree(&paths, &commit);
    let record = crate::publish::read_completion(&paths, &commit);
    report.recorded = record.is_some();
    report.verifiable = tree.is_some() || record.is_some();
    if !report.verifiable {
        report.findings.push(Finding::Unverifiable { commit: commit.clone() });
    }
    let ctx = Ctx { hub, paths: &paths, snap, partials: partial_downloads(&paths), mode, now: SystemTime::now() };

    // What the snapshot must hold: the record's files (with their blobs'
    // ctimes), and the trees listing's unless the record is of a subset.
    let mut expected: BTreeMap<String, (TreeEntry, Option<(i64, i64)>)> = BTreeMap::new();
    if let Some(r) = &record {
        for (p, f) in &r.files {
            expected.insert(p.clone(), (f.entry.clone(), Some((f.ctime, f.ctime_nsec))));
        }
    }
    if let Some(t) = &tree {
        if record.as_ref().is_none_or(|r| !r.filtered) {
            for (p, e) in &t.files {
                expected.entry(p.clone()).or_insert((e.clone(), None));
            }
        }
    }
    for (path, (entry, ctime)) in &expected {
        report.files.insert(path.clone(), entry.content_size());
        check_file(&ctx, path, Some(entry), *ctime, &mut report.findings);
    }
    // A file no listing knows: unexpected where the listing is the whole
    // commit; never followed out of the repo in any case.
    let strict = tree.is_some() || record.as_ref().is_some_and(|r| !r.filtered);
    for path in walk(&ctx.snap) {
        if expected.contains_key(&path) {
            continue;
        }
        let mut found = Vec::new();
        let size = check_file(&ctx, &path, None, None, &mut found);
        if !report.verifiable {
            report.files.insert(path.clone(), size.unwrap_or(0));
            report.findings.extend(found);
        } else {
            if strict && !tree.as_ref().is_some_and(|t| t.files.contains_key(&path)) {
                report.findings.push(Finding::Unexpected { path: path.clone() });
            }
            report.findings.extend(found.into_iter().filter(|f| matches!(f, Finding::BadLink { .. })));
        }
    }
    report
}

fn read_tree(paths: &RepoPaths, commit: &str) -> Option<TreeFile> {
    let bytes = read_repo_file(paths, &Path::new("trees").join(format!("{commit}.json")), safefs::LISTING_CAP).ok()?;
    let tree: TreeFile = serde_json::from_slice(&bytes).ok()?;
    (tree.format_version == 1).then_some(tree)
}

/// `blobs/<etag>.<anything>.incomplete` (and the older `blobs/<etag>.incomplete`) with their mtimes.
fn partial_downloads(paths: &RepoPaths) -> Vec<(String, SystemTime)> {
    let Ok(blobs) = safefs::open_dir(&paths.root).and_then(|r| safefs::open_dir_at(&r, OsStr::new("blobs"))) else {
        return Vec::new();
    };
    safefs::list_dir(&blobs)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            let n = e.name_str()?.to_string();
            let st = e.stat?;
            let mtime = SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(st.st_mtime).unwrap_or(0))
                + Duration::from_nanos(u64::try_from(st.st_mtime_nsec).unwrap_or(0));
            n.ends_with(".incomplete").then_some((n, mtime))
        })
        .collect()
}

struct Ctx<'a> {
    hub: &'a Path,
    paths: &'a RepoPaths,
    snap: OwnedFd,
    partials: Vec<(String, SystemTime)>,
    mode: Mode,
    now: SystemTime,
}

/// Checks one snapshot entry; returns the size of its blob when it resolved.
fn check_file(
    ctx: &Ctx<'_>,
    path: &str,
    entry: Option<&TreeEntry>,
    recorded_ctime: Option<(i64, i64)>,
    findings: &mut Vec<Finding>,
) -> Option<u64> {
    let bad = |target: String| Finding::BadLink { path: path.to_string(), target };
    if !crate::layout::is_safe_file_path(path) {
        findings.push(bad("a path outside the snapshot".into()));
        return None;
    }
    // The link: every directory on the way real, the entry a link to blobs/<name>.
    let rel = Path::new(path);
    let name = rel.file_name().unwrap_or_default();
    let dir = match safefs::open_dir_path_at(&ctx.snap, rel.parent().unwrap_or(Path::new(""))) {
        Ok(d) => d,
        Err(e) if refused(&e) => {
            findings.push(bad(e.to_string()));
            return None;
        }
        Err(_) => {
            findings.push(Finding::Missing { path: path.to_string() });
            return None;
        }
    };
    let Ok(st) = safefs::stat_at(&dir, name) else {
        findings.push(Finding::Missing { path: path.to_string() });
        return None;
    };
    if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
        != nix::sys::stat::SFlag::S_IFLNK
    {
        findings.push(bad("a file that is not a link into blobs/".into()));
        return None;
    }
    let target = nix::fcntl::readlinkat(&dir, name).map(PathBuf::from).unwrap_or_default();
    let linked = target.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    if !is_blob_name(&linked) || target != RepoPaths::link_target(path, &linked) {
        findings.push(bad(target.display().to_string()));
        return None;
    }
    if let Some(e) = entry {
        if linked != e.etag() {
            findings.push(bad(format!("{} (the listing says blobs/{})", target.display(), e.etag())));
            return None;
        }
    }
    let etag = linked;
    let blob = open_blob(ctx.hub, ctx.paths, &etag);
    // st_size is never negative for a regular file; a negative one matches no listing.
    let size = blob.as_ref().ok().and_then(|b| u64::try_from(b.stat.st_size).ok());
    let size_ok = size.is_some() && entry.is_none_or(|e| size == Some(e.content_size()));
    let modified = match (&blob, recorded_ctime) {
        (Ok(b), Some(rc)) => (b.stat.st_ctime, b.stat.st_ctime_nsec) > rc,
        _ => false,
    };
    // A partial beside a sound blob is a stray once it is old; fresh, or with
    // the blob absent or wrong, it is a download in progress (or a failed one).
    let sound = size_ok && !modified;
    if let Some((p, _)) = ctx.partials.iter().find(|(p, mtime)| {
        p.starts_with(&format!("{etag}."))
            && (!sound || ctx.now.duration_since(*mtime).unwrap_or_default() < PARTIAL_FRESH)
    }) {
        findings.push(Finding::Partial { path: path.to_string(), file: p.clone() });
    }
    let blob = match blob {
        Ok(b) => b,
        Err(BlobError::Outside(t)) => {
            findings.push(bad(t));
            return None;
        }
        Err(_) => {
            findings.push(Finding::Dangling { path: path.to_string() });
            return None;
        }
    };
    let size = u64::try_from(blob.stat.st_size).unwrap_or(0);
    if let Some(e) = entry {
        if size != e.content_size() {
            findings.push(Finding::WrongSize { path: path.to_string(), expected: e.content_size(), actual: size });
            return Some(size);
        }
    }
    if ctx.mode == Mode::Deep {
        let lfs = entry.map_or(etag.len() == 64, |e| e.lfs_sha256.is_some());
        match hash_blob(&blob, lfs) {
            Ok(actual) if actual == etag => {}
            Ok(actual) => {
                findings.push(Finding::HashMismatch { path: path.to_string(), expected: etag.clone(), actual })
            }
            Err(_) => findings.push(Finding::Dangling { path: path.to_string() }),
        }
    } else if modified {
        findings.push(Finding::Modified { path: path.to_string() });
    }
    Some(size)
}

/// Every entry below the open snapshot directory that is not a directory, as
/// `/`-separated relative paths (links are entries, never followed).
fn walk(snap: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(top) = safefs::open_dir_at(snap, OsStr::new(".")) else { return out };
    let mut stack: Vec<(OwnedFd, String, usize)> = vec![(top, String::new(), 0)];
    let mut seen = BTreeSet::new();
    while let Some((dir, rel, depth)) = stack.pop() {
        for e in safefs::list_dir(&dir).unwrap_or_default() {
            let Some(n) = e.name_str() else { continue };
            let p = if rel.is_empty() { n.to_string() } else { format!("{rel}/{n}") };
            if e.is_dir() {
                if depth < 64 {
                    if let Ok(sub) = safefs::open_dir_at(&dir, &e.name) {
                        stack.push((sub, p, depth + 1));
                    }
                }
            } else if seen.insert(p.clone()) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}
