//! Writing a snapshot into the cache in huggingface_hub's layout, in the order
//! that keeps readers safe: blobs (temp name, fsync, rename) → snapshot links →
//! `trees/<commit>.json` → the completion record
//! `.aimodel/complete/<commit>.json` → `refs/<rev>` last, without a trailing
//! newline.
//!
//! Why this order: the check calls a snapshot complete only against a listing
//! (the trees file or the completion record), so a reader that resolves a ref
//! finds the record already there, and a reader of a commit-pinned revision
//! (no ref) sees no record, hence "unverifiable" (not complete), until every
//! link exists. A kill between two links, or a publish of a subset
//! (include/exclude, no trees file), leaves no record: not complete.
//!
//! Every write goes through real directories only (a symlink planted in the
//! cache is refused, never followed), under random temp names.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::SystemTime;

use sha1::Digest as _;

use crate::layout::{is_commit, CompletionRecord, RecordedFile, RepoId, RepoPaths, TreeEntry, TreeFile};
use crate::safefs;

/// One file to publish.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub path: String,
    pub bytes: Vec<u8>,
    /// Stored through LFS on the hub (blob named by sha256).
    pub lfs: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The tree entry the hub would list for these bytes.
pub fn entry_for(bytes: &[u8], lfs: bool) -> TreeEntry {
    let mut git = sha1::Sha1::new();
    git.update(format!("blob {}\0", bytes.len()).as_bytes());
    git.update(bytes);
    let blob_id = hex(&git.finalize());
    if lfs {
        TreeEntry {
            size: bytes.len() as u64,
            blob_id,
            lfs_sha256: Some(hex(&sha2::Sha256::digest(bytes))),
            lfs_size: Some(bytes.len() as u64),
            xet_hash: None,
        }
    } else {
        TreeEntry { size: bytes.len() as u64, blob_id, lfs_sha256: None, lfs_size: None, xet_hash: None }
    }
}

/// Writes `bytes` to a random temp name beside `path` (unique across nodes),
/// fsyncs, renames, fsyncs the directory. The directory holding `path` must
/// not be a symlink (its parents may: they are the operator's).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("no file name"))?;
    let fd = safefs::ensure_dir(dir)?;
    safefs::write_atomic_at(&fd, name, bytes)
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Opens (creating) `rel` below the repo folder, one real directory at a time:
/// a symlink planted anywhere on the way is refused, never followed.
fn repo_dir(paths: &RepoPaths, rel: &Path) -> std::io::Result<OwnedFd> {
    let mut fd = safefs::ensure_dir(&paths.root)?;
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => fd = safefs::ensure_dir_at(&fd, n)?,
            _ => return Err(invalid(format!("{}: not a plain relative path", rel.display()))),
        }
    }
    Ok(fd)
}

/// Writes `rel` (a path below the repo folder) atomically, through real directories only.
fn write_in_repo(paths: &RepoPaths, rel: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = rel.file_name().ok_or_else(|| invalid(format!("{}: no file name", rel.display())))?;
    let dir = repo_dir(paths, rel.parent().unwrap_or(Path::new("")))?;
    safefs::write_atomic_at(&dir, name, bytes)
}

/// Links `snapshots/<commit>/<path>` to its blob (relative, like
/// huggingface_hub). `etag` must be a blob name (40 or 64 lowercase hex) and
/// `path` must stay inside the snapshot; no directory on the way may be a
/// symlink.
pub fn link_file(paths: &RepoPaths, commit: &str, path: &str, etag: &str) -> std::io::Result<()> {
    if !crate::layout::is_blob_name(etag) {
        return Err(invalid(format!("{path}: etag {etag:?} is not a blob name (40 or 64 lowercase hex)")));
    }
    if !is_commit(commit) || !crate::layout::is_safe_file_path(path) {
        return Err(invalid(format!("{commit}/{path}: not a snapshot path")));
    }
    let rel = Path::new("snapshots").join(commit).join(path);
    let name = rel.file_name().ok_or_else(|| invalid(format!("{path}: no file name")))?.to_os_string();
    let dir = repo_dir(paths, rel.parent().unwrap_or(Path::new("")))?;
    let target = RepoPaths::link_target(path, etag);
    if nix::fcntl::readlinkat(&dir, name.as_os_str()).is_ok_and(|t| Path::new(&t) == target) {
        return Ok(());
    }
    // Replace atomically: a reader never sees the link missing.
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(&name);
    tmp.push(format!(".aimodel-{}.tmp", safefs::random_hex(8)));
    nix::unistd::symlinkat(&target, &dir, tmp.as_os_str()).map_err(std::io::Error::from)?;
    if let Err(e) = nix::fcntl::renameat(&dir, tmp.as_os_str(), &dir, name.as_os_str()) {
        let _ = nix::unistd::unlinkat(&dir, tmp.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e.into());
    }
    Ok(())
}

/// Writes `trees/<commit>.json`.
pub fn write_tree(paths: &RepoPaths, commit: &str, listing: BTreeMap<String, TreeEntry>) -> std::io::Result<()> {
    if !is_commit(commit) {
        return Err(invalid(format!("{commit:?} is not a commit")));
    }
    write_in_repo(
        paths,
        &Path::new("trees").join(format!("{commit}.json")),
        TreeFile::new(listing).to_json().as_bytes(),
    )
}

/// Points `refs/<rev>` at `commit`, without a trailing newline.
pub fn write_ref(paths: &RepoPaths, rev: &str, commit: &str) -> std::io::Result<()> {
    if !crate::layout::is_safe_revision(rev) {
        return Err(invalid(format!("unsafe revision {rev:?}")));
    }
    if !is_commit(commit) {
        return Err(invalid(format!("{commit:?} is not a commit")));
    }
    write_in_repo(paths, &Path::new("refs").join(rev), commit.as_bytes())
}

/// Reads the completion record of `commit`, if there is a valid one.
pub fn read_completion(paths: &RepoPaths, commit: &str) -> Option<CompletionRecord> {
    let rel = Path::new(".aimodel/complete").join(format!("{commit}.json"));
    let bytes = crate::blob::read_repo_file(paths, &rel, safefs::LISTING_CAP).ok()?;
    let rec: CompletionRecord = serde_json::from_slice(&bytes).ok()?;
    (rec.format_version == 1 && rec.commit == commit).then_some(rec)
}

/// Writes the completion record of `commit`: the files published (path → tree
/// entry) with the change time of each blob now. Call it after the blobs, the
/// links and the trees listing, before the ref.
///
/// A blob is recorded only when it can be vouched for: changed since
/// `trusted_since` (this publish wrote it, verified), or recorded before and
/// unchanged since; any other (a blob found present, e.g. from huggingface_hub
/// or a tenant) is hashed against its name first. An existing record of the
/// commit is merged (its files still unchanged are kept). Nothing is written
/// when the record would not change.
pub fn record_completion(
    paths: &RepoPaths,
    commit: &str,
    listing: &BTreeMap<String, TreeEntry>,
    filtered: bool,
    trusted_since: SystemTime,
) -> std::io::Result<CompletionRecord> {
    record_completion_hashed(paths, commit, listing, filtered, trusted_since, &BTreeMap::new())
}

/// A blob already in place at its listed size, as a prewarm finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresentBlob {
    /// The commit's completion record vouches for it: same blob, unchanged since recorded.
    Recorded,
    /// Hashed now and sound; `ctime` as it was then (see [`record_completion_hashed`]).
    Sound { ctime: (i64, i64) },
    /// Its content does not hash to its name: it must be fetched again.
    Corrupt { actual: String },
}

/// Decides whether a present blob of `path` can be kept: vouched for by
/// `record` (the commit's completion record), else hashed now.
pub fn check_present_blob(
    paths: &RepoPaths,
    record: Option<&CompletionRecord>,
    path: &str,
    entry: &TreeEntry,
) -> std::io::Result<PresentBlob> {
    let hub = paths.root.parent().unwrap_or(Path::new("."));
    let b = crate::blob::open_blob(hub, paths, entry.etag())
        .map_err(|e| std::io::Error::other(format!("{path}: blob {}: {e}", entry.etag())))?;
    let ctime = (b.stat.st_ctime, b.stat.st_ctime_nsec);
    let recorded = record
        .and_then(|r| r.files.get(path))
        .is_some_and(|f| f.entry.etag() == entry.etag() && ctime <= (f.ctime, f.ctime_nsec));
    if recorded {
        return Ok(PresentBlob::Recorded);
    }
    let actual = crate::blob::hash_blob(&b, entry.lfs_sha256.is_some())?;
    if actual != entry.etag() {
        return Ok(PresentBlob::Corrupt { actual });
    }
    Ok(PresentBlob::Sound { ctime })
}

/// [`record_completion`], trusting the blobs in `hashed` (etag → the ctime
/// they had when [`check_present_blob`] hashed them) while that ctime is unchanged.
pub fn record_completion_hashed(
    paths: &RepoPaths,
    commit: &str,
    listing: &BTreeMap<String, TreeEntry>,
    filtered: bool,
    trusted_since: SystemTime,
    hashed: &BTreeMap<String, (i64, i64)>,
) -> std::io::Result<CompletionRecord> {
    if !is_commit(commit) {
        return Err(invalid(format!("{commit:?} is not a commit")));
    }
    let hub = paths.root.parent().unwrap_or(Path::new("."));
    let old = read_completion(paths, commit);
    // Blob ctimes come from the file server's clock: move `trusted_since` onto it.
    let nanos = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH).map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX)).unwrap_or(0)
    };
    let skew = fs_clock(paths).map(|(fs, local)| fs - nanos(local)).unwrap_or(0);
    // Plus a second: file times come from a coarse clock (a few ms behind), so a
    // blob changed just before the prewarm started must not pass for one it
    // wrote; what it wrote in its first second is hashed again (cost, never trust).
    let since_ns = nanos(trusted_since) + skew + 1_000_000_000;
    // Out of i64 range (an absurd clock) vouches for nothing: every blob is hashed again.
    let since =
        match (i64::try_from(since_ns.div_euclid(1_000_000_000)), i64::try_from(since_ns.rem_euclid(1_000_000_000))) {
            (Ok(secs), Ok(ns)) => (secs, ns),
            _ => (i64::MAX, i64::MAX),
        };
    let mut files = BTreeMap::new();
    if let Some(old) = &old {
        for (path, f) in &old.files {
            if listing.contains_key(path) {
                continue;
            }
            if let Ok(b) = crate::blob::open_blob(hub, paths, f.entry.etag()) {
                if (b.stat.st_ctime, b.stat.st_ctime_nsec) <= (f.ctime, f.ctime_nsec) {
                    files.insert(path.clone(), f.clone());
                }
            }
        }
    }
    for (path, entry) in listing {
        if !crate::layout::is_safe_file_path(path) {
            return Err(invalid(format!("{path:?} is not a snapshot path")));
        }
        let b = crate::blob::open_blob(hub, paths, entry.etag())
            .map_err(|e| std::io::Error::other(format!("{path}: blob {}: {e}", entry.etag())))?;
        if u64::try_from(b.stat.st_size).ok() != Some(entry.content_size()) {
            return Err(std::io::Error::other(format!(
                "{path}: blob {} has {} bytes, the listing says {}",
                entry.etag(),
                b.stat.st_size,
                entry.content_size()
            )));
        }
        let ctime = (b.stat.st_ctime, b.stat.st_ctime_nsec);
        let vouched = ctime >= since
            || hashed.get(entry.etag()) == Some(&ctime)
            || old
                .as_ref()
                .and_then(|o| o.files.get(path))
                .is_some_and(|f| f.entry.etag() == entry.etag() && ctime <= (f.ctime, f.ctime_nsec));
        if !vouched {
            let actual = crate::blob::hash_blob(&b, entry.lfs_sha256.is_some())?;
            if actual != entry.etag() {
                return Err(std::io::Error::other(format!(
                    "{path}: blob {} hashes to {actual}: not recorded (remove the blob and prewarm again)",
                    entry.etag()
                )));
            }
        }
        files.insert(path.clone(), RecordedFile { entry: entry.clone(), ctime: ctime.0, ctime_nsec: ctime.1 });
    }
    let filtered = filtered && old.as_ref().is_none_or(|o| o.filtered);
    let rec = CompletionRecord {
        format_version: 1,
        commit: commit.to_string(),
        filtered,
        files,
        written_at: crate::state::unix_now(),
        node: crate::state::node_name(),
    };
    if old.as_ref().is_some_and(|o| o.files == rec.files && o.filtered == rec.filtered) {
        return Ok(old.unwrap_or(rec));
    }
    let bytes = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
    write_in_repo(paths, &Path::new(".aimodel/complete").join(format!("{commit}.json")), &bytes)?;
    Ok(rec)
}

/// The file server's clock now (the ctime of a file created for the purpose,
/// in nanoseconds) and the local clock read at the same moment.
fn fs_clock(paths: &RepoPaths) -> Option<(i128, SystemTime)> {
    use nix::fcntl::OFlag;
    let dir = repo_dir(paths, Path::new(".aimodel")).ok()?;
    let name = format!(".clock.{}", safefs::random_hex(8));
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(&dir, name.as_str(), flags, nix::sys::stat::Mode::from_bits_truncate(0o600)).ok()?;
    let st = nix::sys::stat::fstat(&fd).ok();
    let local = SystemTime::now();
    let _ = nix::unistd::unlinkat(&dir, name.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
    st.map(|s| (i128::from(s.st_ctime) * 1_000_000_000 + i128::from(s.st_ctime_nsec), local))
}

/// Publishes `files` as `commit` of `repo` and points `refs/<rev>` at it:
/// blobs, links, trees listing, completion record, ref.
pub fn publish_snapshot(hub: &Path, repo: &RepoId, commit: &str, rev: &str, files: &[NewFile]) -> std::io::Result<()> {
    let started = SystemTime::now();
    let paths = RepoPaths::new(hub, repo);
    let mut listing = BTreeMap::new();
    for f in files {
        let entry = entry_for(&f.bytes, f.lfs);
        let blob = paths.blob(entry.etag());
        if std::fs::symlink_metadata(&blob).is_err() {
            write_in_repo(&paths, &Path::new("blobs").join(entry.etag()), &f.bytes)?;
        }
        listing.insert(f.path.clone(), entry);
    }
    for (path, entry) in &listing {
        link_file(&paths, commit, path, entry.etag())?;
    }
    write_tree(&paths, commit, listing.clone())?;
    record_completion(&paths, commit, &listing, false, started)?;
    write_ref(&paths, rev, commit)
}
