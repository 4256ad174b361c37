//! Writing a snapshot into the cache in huggingface_hub's layout, in the order
//! that keeps readers safe: blobs (temp name, fsync, rename) → snapshot links →
//! `trees/<commit>.json` → `refs/<rev>` last, without a trailing newline.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use sha1::Digest as _;

use crate::layout::{RepoId, RepoPaths, TreeEntry, TreeFile};

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

/// Writes `bytes` to a unique temp name beside `path`, fsyncs, renames, fsyncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Links `snapshots/<commit>/<path>` to its blob (relative, like huggingface_hub).
pub fn link_file(paths: &RepoPaths, commit: &str, path: &str, etag: &str) -> std::io::Result<()> {
    let link = paths.snapshot(commit).join(path);
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let target = RepoPaths::link_target(path, etag);
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    // Replace atomically: a reader never sees the link missing.
    let tmp = link.with_extension(format!("aimodel-{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)?;
    std::fs::rename(&tmp, &link)
}

/// Writes `trees/<commit>.json`.
pub fn write_tree(paths: &RepoPaths, commit: &str, listing: BTreeMap<String, TreeEntry>) -> std::io::Result<()> {
    write_atomic(&paths.tree(commit), TreeFile::new(listing).to_json().as_bytes())
}

/// Points `refs/<rev>` at `commit`, without a trailing newline.
pub fn write_ref(paths: &RepoPaths, rev: &str, commit: &str) -> std::io::Result<()> {
    if !crate::layout::is_safe_revision(rev) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("unsafe revision {rev:?}")));
    }
    write_atomic(&paths.refs(rev), commit.as_bytes())
}

/// Publishes `files` as `commit` of `repo` and points `refs/<rev>` at it.
pub fn publish_snapshot(hub: &Path, repo: &RepoId, commit: &str, rev: &str, files: &[NewFile]) -> std::io::Result<()> {
    let paths = RepoPaths::new(hub, repo);
    let mut listing = BTreeMap::new();
    for f in files {
        let entry = entry_for(&f.bytes, f.lfs);
        let blob = paths.blob(entry.etag());
        if !blob.exists() {
            write_atomic(&blob, &f.bytes)?;
        }
        listing.insert(f.path.clone(), entry);
    }
    let snap = paths.snapshot(commit);
    for (path, entry) in &listing {
        let link = snap.join(path);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(RepoPaths::link_target(path, entry.etag()), &link)?;
    }
    write_atomic(&paths.tree(commit), TreeFile::new(listing).to_json().as_bytes())?;
    write_atomic(&paths.refs(rev), commit.as_bytes())
}
