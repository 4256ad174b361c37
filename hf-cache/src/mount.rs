//! Which mount holds the cache, and is it healthy? Facts from
//! `/proc/self/mountinfo` (path injectable), probes under a timeout on their own
//! thread so a hung NFS server can never wedge the caller.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Path inside the filesystem that is mounted (bind mounts of subdirectories).
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options and superblock options together.
    pub options: Vec<String>,
}

impl MountEntry {
    /// True for nfs and nfs4.
    pub fn is_nfs(&self) -> bool {
        self.fstype == "nfs" || self.fstype == "nfs4"
    }

    fn option(&self, key: &str) -> Option<&str> {
        self.options.iter().find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    fn has(&self, flag: &str) -> bool {
        self.options.iter().any(|o| o == flag)
    }

    /// NFS protocol version (`vers=4.2`), if NFS.
    pub fn nfs_version(&self) -> Option<String> {
        if !self.is_nfs() {
            return None;
        }
        self.option("vers")
            .or_else(|| self.option("nfsvers"))
            .map(str::to_string)
            .or_else(|| (self.fstype == "nfs4").then(|| "4".to_string()))
    }

    /// Mounted read-only.
    pub fn read_only(&self) -> bool {
        self.has("ro")
    }

    /// NFS `soft` mount (I/O errors after retries instead of waiting).
    pub fn soft(&self) -> bool {
        self.has("soft")
    }

    /// NFS without locking (`nolock`, or v4 `local_lock=all`): flock excludes nothing across nodes.
    pub fn nolock(&self) -> bool {
        self.has("nolock") || self.option("local_lock") == Some("all") || self.option("local_lock") == Some("flock")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text (proc(5)): `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split_whitespace().collect();
            let r: Vec<&str> = right.split_whitespace().collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            let mut options: Vec<String> = l[5].split(',').map(str::to_string).collect();
            if let Some(sup) = r.get(2) {
                options.extend(sup.split(',').map(str::to_string));
            }
            Some(MountEntry {
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                fstype: r[0].to_string(),
                source: unescape(r[1]),
                options,
            })
        })
        .collect()
}

/// The mount holding `path`: the last-mounted entry whose mount point is the
/// longest prefix of the path.
pub fn mount_for<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// A probe that did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// It did not finish in time (its thread is left behind, blocked).
    #[error("cache probe timed out after {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// Earlier probes of the same path are still blocked: no new thread was started.
    #[error("cache probe still pending: {0} earlier probes of this path are still blocked (hung filesystem?)")]
    Pending(usize),
}

/// Former name of [`ProbeError`].
pub type ProbeTimeout = ProbeError;

/// At most this many timed-out probe threads per path stay blocked; beyond,
/// probes of that path answer [`ProbeError::Pending`] without a new thread.
pub const MAX_HUNG_PER_PATH: usize = 2;

fn hung() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, usize>> {
    static HUNG: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());
    HUNG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Timed-out probes of `key` still blocked now.
pub fn hung_probes(key: &Path) -> usize {
    hung().get(key).copied().unwrap_or(0)
}

/// Runs `f` on its own thread and gives up waiting after `timeout` (the thread
/// is left behind, blocked in the kernel, rather than blocking the caller).
/// Probes are counted per `key` (the cache path): while
/// [`MAX_HUNG_PER_PATH`] of its probes are still blocked, no thread is
/// started and the answer is [`ProbeError::Pending`], so a hung NFS server
/// costs a bounded number of threads.
pub fn probe<T: Send + 'static>(
    key: &Path,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProbeError> {
    let key = key.to_path_buf();
    let n = hung_probes(&key);
    if n >= MAX_HUNG_PER_PATH {
        return Err(ProbeError::Pending(n));
    }
    // (finished, abandoned by its caller): locked before the hung table, by both sides.
    let state = Arc::new(Mutex::new((false, false)));
    let (tx, rx) = mpsc::channel();
    let (st, k) = (state.clone(), key.clone());
    let spawned = std::thread::Builder::new().name("cache-probe".into()).spawn(move || {
        let r = f();
        let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = true;
        if s.1 {
            let mut h = hung();
            if let Some(c) = h.get_mut(&k) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    h.remove(&k);
                }
            }
        }
        drop(s);
        let _ = tx.send(r);
    });
    if spawned.is_err() {
        return Err(ProbeError::Timeout(Duration::ZERO));
    }
    match rx.recv_timeout(timeout) {
        Ok(v) => Ok(v),
        Err(_) => {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if s.0 {
                // It finished just now.
                drop(s);
                return rx.recv().map_err(|_| ProbeError::Timeout(timeout));
            }
            s.1 = true;
            *hung().entry(key).or_insert(0) += 1;
            Err(ProbeError::Timeout(timeout))
        }
    }
}

/// [`probe`] counted under one process-wide key (prefer [`probe`] with the cache path).
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProbeError> {
    probe(Path::new(""), timeout, f)
}

/// Free and total bytes of the filesystem holding `path`.
pub fn space(path: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path)?;
    let frag = s.fragment_size() as u64;
    Ok((s.blocks_available() as u64 * frag, s.blocks() as u64 * frag))
}

/// Creates, renames and removes a probe file in `dir`.
pub fn writable(dir: &Path) -> std::io::Result<()> {
    // Random: probes of several nodes share the directory.
    let unique = format!(".aimodel-probe-{}", crate::safefs::random_hex(8));
    let a = dir.join(format!("{unique}.tmp"));
    let b = dir.join(unique);
    std::fs::write(&a, b"probe")?;
    let r = std::fs::rename(&a, &b);
    let _ = std::fs::remove_file(&a);
    r?;
    std::fs::remove_file(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lines from NFSv3, NFSv4.2 and local hosts.
    const FIXTURE: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
101 22 0:52 / /mnt/nfs3 rw,relatime shared:60 - nfs 10.0.0.5:/export/hf rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.5,mountvers=3,mountport=20048,mountproto=tcp,local_lock=all,addr=10.0.0.5
102 22 0:53 / /mnt/hf-cache rw,relatime shared:61 - nfs4 10.0.0.5:/hf rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.7,local_lock=none,addr=10.0.0.5
103 22 0:54 / /mnt/soft rw,relatime shared:62 - nfs4 nas:/soft rw,vers=4.1,soft,proto=tcp,timeo=100,retrans=3,sec=sys,local_lock=none,addr=10.0.0.6
104 22 0:55 / /mnt/ro ro,relatime shared:63 - nfs4 nas:/ro ro,vers=4.2,hard,proto=tcp,sec=sys,local_lock=none,addr=10.0.0.6
105 22 0:53 /models /srv/models rw,relatime shared:61 - nfs4 10.0.0.5:/hf rw,vers=4.2,hard,proto=tcp,sec=sys,local_lock=none,addr=10.0.0.5
106 22 0:56 / /var/lib/docker/overlay2/x/merged rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
107 22 0:57 / /mnt/with\\040space rw,relatime - ext4 /dev/sdb1 rw
";

    fn find(path: &str) -> MountEntry {
        let m = parse_mountinfo(FIXTURE);
        mount_for(&m, Path::new(path)).unwrap().clone()
    }

    #[test]
    fn nfs3_with_nolock() {
        let m = find("/mnt/nfs3/hub/models--a--b");
        assert!(m.is_nfs());
        assert_eq!(m.nfs_version().as_deref(), Some("3"));
        assert!(m.nolock() && !m.soft() && !m.read_only());
    }

    #[test]
    fn nfs42_hard_with_locks() {
        let m = find("/mnt/hf-cache/hub");
        assert_eq!(m.fstype, "nfs4");
        assert_eq!(m.nfs_version().as_deref(), Some("4.2"));
        assert!(!m.nolock() && !m.soft());
    }

    #[test]
    fn soft_and_read_only() {
        assert!(find("/mnt/soft/x").soft());
        assert!(find("/mnt/ro").read_only());
    }

    #[test]
    fn bind_mount_of_an_nfs_subdirectory() {
        let m = find("/srv/models/hub");
        assert!(m.is_nfs());
        assert_eq!(m.root, "/models");
        assert_eq!(m.mount_point, PathBuf::from("/srv/models"));
    }

    #[test]
    fn local_filesystems_and_escapes() {
        assert_eq!(find("/opt/cache").fstype, "ext4");
        assert!(!find("/opt/cache").is_nfs());
        assert_eq!(find("/var/lib/docker/overlay2/x/merged/app").fstype, "overlay");
        assert_eq!(find("/mnt/with space/x").mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn timeouts_do_not_block_the_caller() {
        let started = std::time::Instant::now();
        let r = with_timeout(Duration::from_millis(100), || std::thread::sleep(Duration::from_secs(5)));
        assert_eq!(r, Err(ProbeError::Timeout(Duration::from_millis(100))));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(with_timeout(Duration::from_secs(1), || 7), Ok(7));
        assert_eq!(ProbeError::Timeout(Duration::from_secs(5)).to_string(), "cache probe timed out after 5s");
    }

    #[test]
    fn hung_probes_of_a_path_are_bounded() {
        let key = Path::new("/test/hung-probes");
        let (release, wait) = mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hang = || {
            let (w, s) = (wait.clone(), started.clone());
            move || {
                s.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = w.lock().unwrap().recv();
            }
        };
        for _ in 0..MAX_HUNG_PER_PATH {
            assert!(matches!(probe(key, Duration::from_millis(50), hang()), Err(ProbeError::Timeout(_))));
        }
        assert_eq!(hung_probes(key), MAX_HUNG_PER_PATH);
        let r = probe(key, Duration::from_millis(50), hang());
        assert_eq!(r, Err(ProbeError::Pending(MAX_HUNG_PER_PATH)));
        assert!(r.unwrap_err().to_string().contains("still pending"));
        // No thread was started for it (the first may still be entering its closure).
        while started.load(std::sync::atomic::Ordering::SeqCst) < MAX_HUNG_PER_PATH {
            std::thread::yield_now();
        }
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), MAX_HUNG_PER_PATH);
        // Other paths are not held up.
        assert_eq!(probe(Path::new("/test/other"), Duration::from_secs(5), || 1), Ok(1));
        // Once the blocked probes return, the path is probed again.
        for _ in 0..MAX_HUNG_PER_PATH {
            release.send(()).unwrap();
        }
        while hung_probes(key) > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(probe(key, Duration::from_secs(5), || 2), Ok(2));
    }

    #[test]
    fn probes_on_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        writable(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "probe files left behind");
        let (free, total) = space(d.path()).unwrap();
        assert!(total > 0 && free <= total);
    }
}
