//! Blobs of the cache: opening one without following anything out of the
//! cache, and hashing (sha256, git's blob sha1).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::stat::FileStat;
use sha1::Digest as _;

use crate::layout::{is_blob_name, RepoPaths};
use crate::safefs;

/// A blob opened for checking: the directory holding it, its name, its `lstat`
/// (a regular file: never a link once resolved).
pub(crate) struct Blob {
    pub dir: OwnedFd,
    pub name: OsString,
    pub stat: FileStat,
}

/// Why a blob could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobError {
    /// `blobs/<etag>` does not exist.
    Missing,
    /// A link into the shared store whose target does not exist.
    Dangling,
    /// Something that is not a regular file of the repo's `blobs/` or of the shared store.
    Outside(String),
}

impl fmt::Display for BlobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobError::Missing => f.write_str("missing"),
            BlobError::Dangling => f.write_str("a dangling link into the shared store"),
            BlobError::Outside(t) => write!(f, "points at {t}, outside the cache's blobs (refused)"),
        }
    }
}

/// Opens `blobs/<etag>` of the repo: a regular file there, or a link
/// `../../blobs/<2hex>/<name>` to a regular file of the shared store
/// `<hub>/blobs/` (huggingface_hub 2.x). Nothing else is followed.
pub(crate) fn open_blob(hub: &Path, paths: &RepoPaths, etag: &str) -> Result<Blob, BlobError> {
    use std::os::unix::ffi::OsStrExt;
    if !is_blob_name(etag) {
        return Err(BlobError::Outside(format!("blobs/{etag}")));
    }
    let open = |e: std::io::Error| if refused(&e) { BlobError::Outside(e.to_string()) } else { BlobError::Missing };
    let root = safefs::open_dir(&paths.root).map_err(open)?;
    let blobs = safefs::open_dir_at(&root, OsStr::new("blobs")).map_err(open)?;
    let st = safefs::stat_at(&blobs, OsStr::new(etag)).map_err(|_| BlobError::Missing)?;
    let kind = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
    if kind == nix::sys::stat::SFlag::S_IFREG {
        return Ok(Blob { dir: blobs, name: etag.into(), stat: st });
    }
    if kind != nix::sys::stat::SFlag::S_IFLNK {
        return Err(BlobError::Outside(format!("blobs/{etag}, not a regular file")));
    }
    let target = nix::fcntl::readlinkat(&blobs, etag).map_err(|_| BlobError::Missing)?;
    let shown = || BlobError::Outside(format!("blobs/{etag} -> {}", Path::new(&target).display()));
    let parts: Vec<&[u8]> = target.as_bytes().split(|b| *b == b'/').collect();
    let [b"..", b"..", b"blobs", prefix, name] = parts.as_slice() else { return Err(shown()) };
    let name = std::str::from_utf8(name).map_err(|_| shown())?;
    if name.len() < 2 || !name.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(shown());
    }
    if name.len() > 128 || *prefix != &name.as_bytes()[..2] {
        return Err(shown());
    }
    let hub_fd = nix::fcntl::open(
        hub,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|_| BlobError::Missing)?;
    let store = safefs::open_dir_at(&hub_fd, OsStr::new("blobs"))
        .and_then(|s| safefs::open_dir_at(&s, OsStr::from_bytes(prefix)))
        .map_err(|e| if refused(&e) { shown() } else { BlobError::Dangling })?;
    let st = safefs::stat_at(&store, OsStr::new(name)).map_err(|_| BlobError::Dangling)?;
    if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
        != nix::sys::stat::SFlag::S_IFREG
    {
        return Err(shown());
    }
    Ok(Blob { dir: store, name: name.into(), stat: st })
}

/// Hashes an opened blob: sha256 (LFS) or git's blob sha1.
pub(crate) fn hash_blob(b: &Blob, lfs: bool) -> std::io::Result<String> {
    let (mut f, st) = safefs::open_regular_at(&b.dir, &b.name)?;
    if lfs {
        hash_file(sha2::Sha256::new(), &mut f)
    } else {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", st.st_size).as_bytes());
        hash_file(h, &mut f)
    }
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn refused(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

/// Reads `rel` below the repo folder through real directories only (no
/// symlink anywhere below the repo folder), capped at `cap` bytes.
pub(crate) fn read_repo_file(paths: &RepoPaths, rel: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let root = safefs::open_dir(&paths.root)?;
    let name = rel.file_name().ok_or_else(|| std::io::Error::other("no file name"))?;
    let dir = safefs::open_dir_path_at(&root, rel.parent().unwrap_or(Path::new("")))?;
    safefs::read_capped_at(&dir, name, cap)
}
