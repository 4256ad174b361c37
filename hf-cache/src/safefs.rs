//! File access that a hostile writer of the shared cache cannot turn against
//! the root processes reading it (the driver, the agent).
//!
//! A task container may be able to write the cache. Everything we read from it
//! (state records, refs, listings, completion records, pins) is opened with
//! `O_NOFOLLOW` (a symlink to `/dev/zero` or a host file is refused), with
//! `O_NONBLOCK` (a FIFO cannot hang the reader), must be a regular file
//! (`fstat` after the open), and is read through a size cap. Directories are
//! opened with `O_DIRECTORY|O_NOFOLLOW`, and deletion walks by directory file
//! descriptors, never following a link and never leaving the filesystem it
//! started on.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Cap of a state record, a ref, a pin or a lock (they are a few hundred bytes).
pub const STATE_CAP: u64 = 64 << 10;
/// Cap of a listing (`trees/<commit>.json`, a completion record).
pub const LISTING_CAP: u64 = 64 << 20;
/// How deep a tree being deleted may nest before deletion gives up.
const MAX_DEPTH: usize = 128;

fn refuse(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}: refused", path.display()))
}

fn nix_err(path: &Path, e: Errno) -> std::io::Error {
    match e {
        // O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on a non-directory: ENOTDIR.
        Errno::ELOOP => refuse(path, "a symbolic link"),
        Errno::ENOTDIR => refuse(path, "not a directory"),
        e => std::io::Error::new(std::io::Error::from(e).kind(), format!("{}: {e}", path.display())),
    }
}

const FILE_FLAGS: OFlag =
    OFlag::O_RDONLY.union(OFlag::O_NOFOLLOW).union(OFlag::O_NONBLOCK).union(OFlag::O_NOCTTY).union(OFlag::O_CLOEXEC);
const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

fn is_symlink(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
}

/// Opens `fd` as a regular file: anything else (a device, a FIFO, a socket, a
/// directory) is refused.
fn regular(fd: OwnedFd, path: &Path) -> std::io::Result<(File, FileStat)> {
    let st = nix::sys::stat::fstat(&fd).map_err(|e| nix_err(path, e))?;
    if !is_regular(&st) {
        return Err(refuse(path, "not a regular file"));
    }
    Ok((File::from(fd), st))
}

/// Opens a regular file without following a final symlink; returns it with its `fstat`.
pub fn open_regular(path: &Path) -> std::io::Result<(File, FileStat)> {
    let fd = nix::fcntl::open(path, FILE_FLAGS, Mode::empty()).map_err(|e| nix_err(path, e))?;
    regular(fd, path)
}

/// [`open_regular`] relative to an open directory (`name` may not contain a link either).
pub fn open_regular_at(dir: impl AsFd, name: &OsStr) -> std::io::Result<(File, FileStat)> {
    let fd = nix::fcntl::openat(dir, name, FILE_FLAGS, Mode::empty()).map_err(|e| nix_err(Path::new(name), e))?;
    regular(fd, Path::new(name))
}

/// Reads a whole open file, refusing one larger than `cap`.
pub fn read_file_capped(f: File, cap: u64, path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > cap {
        return Err(refuse(path, &format!("larger than {cap} bytes")));
    }
    Ok(buf)
}

/// Reads the regular file `path` (never through a final symlink), at most `cap` bytes.
pub fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let (f, _) = open_regular(path)?;
    read_file_capped(f, cap, path)
}

/// [`read_capped`] relative to an open directory.
pub fn read_capped_at(dir: impl AsFd, name: &OsStr, cap: u64) -> std::io::Result<Vec<u8>> {
    let (f, _) = open_regular_at(dir, name)?;
    read_file_capped(f, cap, Path::new(name))
}

/// Opens a directory, refusing a symlink as its final component.
pub fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    nix::fcntl::open(path, DIR_FLAGS, Mode::empty()).map_err(|e| nix_err(path, e))
}

/// Opens the directory `name` (one component) below `dir`, refusing a symlink.
pub fn open_dir_at(dir: impl AsFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    nix::fcntl::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| nix_err(Path::new(name), e))
}

/// Opens `path` below `dir` one component at a time, each a real directory.
pub fn open_dir_path_at(dir: impl AsFd, path: &Path) -> std::io::Result<OwnedFd> {
    let mut cur = open_dir_at(dir, OsStr::new("."))?;
    for c in path.components() {
        match c {
            std::path::Component::Normal(n) => cur = open_dir_at(&cur, n)?,
            std::path::Component::CurDir => {}
            _ => return Err(refuse(path, "not a plain relative path")),
        }
    }
    Ok(cur)
}

/// Creates `name` below `dir` if absent (mode 0755), then opens it as a real
/// directory. A directory root creates is given to the owner of its parent, so
/// the cache stays its owner's (the node agent may run as a user of its own
/// while the plugin, root, adds its state directories).
pub fn ensure_dir_at(dir: impl AsFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    let created = match nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(nix_err(Path::new(name), e)),
    };
    let fd = open_dir_at(&dir, name)?;
    if created && nix::unistd::geteuid().is_root() {
        let parent = nix::sys::stat::fstat(&dir).map_err(|e| nix_err(Path::new(name), e))?;
        if parent.st_uid != 0 || parent.st_gid != 0 {
            let (uid, gid) = (nix::unistd::Uid::from_raw(parent.st_uid), nix::unistd::Gid::from_raw(parent.st_gid));
            nix::unistd::fchown(&fd, Some(uid), Some(gid)).map_err(|e| nix_err(Path::new(name), e))?;
        }
    }
    Ok(fd)
}

/// Creates `path` and its parents (following the parents that exist, which
/// belong to the operator; each new one owned as [`ensure_dir_at`] says), then
/// opens it, refusing a symlink as its final component.
pub fn ensure_dir(path: &Path) -> std::io::Result<OwnedFd> {
    if std::fs::symlink_metadata(path).is_ok() {
        // There: a real directory, or refused (a symlink or a file).
        return open_dir(path);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| refuse(path, "no directory name"))?;
    let parent_fd = if parent.is_dir() {
        // An existing parent is the operator's (it may be a symlink, e.g. to the NFS mount).
        OwnedFd::from(std::fs::File::open(parent)?)
    } else {
        ensure_dir(parent)?
    };
    ensure_dir_at(&parent_fd, name)
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    /// From `fstatat(AT_SYMLINK_NOFOLLOW)`: a symlink is never followed.
    pub stat: Option<FileStat>,
}

impl DirEntry {
    pub fn is_dir(&self) -> bool {
        self.stat.as_ref().is_some_and(is_dir)
    }
    pub fn is_file(&self) -> bool {
        self.stat.as_ref().is_some_and(is_regular)
    }
    pub fn is_symlink(&self) -> bool {
        self.stat.as_ref().is_some_and(is_symlink)
    }
    pub fn name_str(&self) -> Option<&str> {
        self.name.to_str()
    }
}

/// The entries of an open directory (without `.` and `..`), sorted by name.
pub fn list_dir(dir: impl AsFd) -> std::io::Result<Vec<DirEntry>> {
    // A fresh open file description: the caller's offset is left alone.
    let mut d = nix::dir::Dir::openat(&dir, ".", DIR_FLAGS, Mode::empty()).map_err(std::io::Error::from)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(std::io::Error::from)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| {
            let stat = nix::sys::stat::fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW).ok();
            DirEntry { name, stat }
        })
        .collect())
}

/// `lstat` of `name` below `dir`.
pub fn stat_at(dir: impl AsFd, name: &OsStr) -> std::io::Result<FileStat> {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| nix_err(Path::new(name), e))
}

/// Removes `name` below `dir`: a file or a symlink is unlinked (never followed),
/// a directory is emptied by descriptor and removed. A directory on another
/// filesystem than `dir` (a mount point inside the tree) is refused, as is a
/// tree nested deeper than 128 levels.
pub fn remove_at(dir: impl AsFd, name: &OsStr) -> std::io::Result<()> {
    let dev = nix::sys::stat::fstat(&dir).map_err(std::io::Error::from)?.st_dev;
    remove_at_depth(dir.as_fd(), name, dev, 0)
}

fn remove_at_depth(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, dev: u64, depth: usize) -> std::io::Result<()> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let shown = Path::new(name);
    let st = match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(nix_err(shown, e)),
    };
    if !is_dir(&st) {
        return match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(nix_err(shown, e)),
        };
    }
    if st.st_dev != dev {
        return Err(refuse(shown, "on another filesystem"));
    }
    if depth >= MAX_DEPTH {
        return Err(refuse(shown, "nested too deep"));
    }
    let sub = open_dir_at(dir, name)?;
    // The directory opened is the one examined (not swapped for another since).
    let opened = nix::sys::stat::fstat(&sub).map_err(std::io::Error::from)?;
    if opened.st_dev != st.st_dev || opened.st_ino != st.st_ino {
        return Err(refuse(shown, "replaced while being removed"));
    }
    for e in list_dir(&sub)? {
        remove_at_depth(sub.as_fd(), &e.name, dev, depth + 1)?;
    }
    drop(sub);
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(nix_err(shown, e)),
    }
}

/// Removes `path` like [`remove_at`], relative to its parent directory (which is followed).
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| refuse(path, "no file name"))?;
    let dir = nix::fcntl::open(parent, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| nix_err(parent, e))?;
    remove_at(&dir, name)
}

/// `n` random bytes from `/dev/urandom`, hex: unique temp names across nodes.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let ok = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        // Never expected; still unique per process and call.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let s = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mix = format!("{t:x}{:x}{s:x}", std::process::id());
        return mix.chars().rev().take(n * 2).collect();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `bytes` as `name` in the open directory `dir`: a random temp name
/// (`O_EXCL|O_NOFOLLOW`), fsync, rename over `name`, fsync of the directory.
pub fn write_atomic_at(dir: impl AsFd, name: &OsStr, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", random_hex(8)));
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(&dir, tmp.as_os_str(), flags, Mode::from_bits_truncate(0o644))
        .map_err(|e| nix_err(Path::new(&tmp), e))?;
    let mut f = File::from(fd);
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    let renamed = written.and_then(|()| {
        nix::fcntl::renameat(&dir, tmp.as_os_str(), &dir, name).map_err(|e| nix_err(Path::new(name), e))
    });
    if let Err(e) = renamed {
        let _ = nix::unistd::unlinkat(&dir, tmp.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    nix::unistd::fsync(&dir).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_root_creates_belong_to_the_owner_of_their_parent() {
        if !nix::unistd::geteuid().is_root() {
            return; // only root can give a directory away (the plugin is root)
        }
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let owner = (nix::unistd::Uid::from_raw(4242), nix::unistd::Gid::from_raw(4343));
        nix::unistd::chown(&cache, Some(owner.0), Some(owner.1)).unwrap();
        ensure_dir(&cache.join("aimodel/in-use")).unwrap();
        for p in [cache.join("aimodel"), cache.join("aimodel/in-use")] {
            let m = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&p).unwrap());
            assert_eq!(m, 4242, "{} is not the cache owner's", p.display());
        }
        // A root-owned parent keeps root's children root's.
        let rooted = d.path().join("rooted");
        ensure_dir(&rooted.join("x")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(rooted.join("x")).unwrap()), 0);
        // A symlink as the final component is still refused.
        std::os::unix::fs::symlink("/etc", cache.join("link")).unwrap();
        assert!(ensure_dir(&cache.join("link")).is_err());
    }

    #[test]
    fn links_devices_fifos_and_big_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("ok"), b"hello").unwrap();
        assert_eq!(read_capped(&p.join("ok"), 5).unwrap(), b"hello");
        let e = read_capped(&p.join("ok"), 4).unwrap_err();
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", p.join("zero")).unwrap();
        let e = read_capped(&p.join("zero"), STATE_CAP).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // Even without a link, a device is not a file (and is never read).
        assert!(read_capped(Path::new("/dev/zero"), STATE_CAP).unwrap_err().to_string().contains("not a regular"));
        nix::unistd::mkfifo(&p.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_capped(&p.join("fifo"), STATE_CAP).unwrap_err().to_string().contains("not a regular"));
        std::os::unix::fs::symlink(p, p.join("dirlink")).unwrap();
        assert!(open_dir(&p.join("dirlink")).is_err());
        assert!(open_dir(p).is_ok());
    }

    #[test]
    fn removal_unlinks_links_and_never_follows_them() {
        let d = tempfile::tempdir().unwrap();
        let sentinel = d.path().join("sentinel");
        std::fs::create_dir_all(sentinel.join("inner")).unwrap();
        std::fs::write(sentinel.join("inner/keep"), b"x").unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir_all(victim.join("a/b")).unwrap();
        std::fs::write(victim.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&sentinel, victim.join("a/link")).unwrap();
        std::os::unix::fs::symlink("..", victim.join("up")).unwrap();
        remove_tree(&victim).unwrap();
        assert!(!victim.exists());
        assert!(sentinel.join("inner/keep").exists());
        // A link itself is removed, not its target.
        std::os::unix::fs::symlink(&sentinel, d.path().join("l")).unwrap();
        remove_tree(&d.path().join("l")).unwrap();
        assert!(sentinel.join("inner/keep").exists());
        remove_tree(&d.path().join("absent")).unwrap();
    }

    #[test]
    fn atomic_writes_use_random_temp_names() {
        let d = tempfile::tempdir().unwrap();
        let a = random_hex(8);
        assert_eq!(a.len(), 16);
        assert_ne!(a, random_hex(8));
        let dir = open_dir(d.path()).unwrap();
        write_atomic_at(&dir, OsStr::new("f"), b"one").unwrap();
        write_atomic_at(&dir, OsStr::new("f"), b"two").unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temp file left");
    }
}
