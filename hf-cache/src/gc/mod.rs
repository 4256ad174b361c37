//! Eviction of cold models: least recently used first, whole repos, never a
//! pinned model, one a running task uses (a live in-use marker, any node), one
//! being downloaded (a fresh blob lease), or one the caller protects.
//!
//! Pinned means pinned by the caller's policy or by any shared pin in
//! `aimodel/pins/` (any node's manifest, `aimodel-agent pin`).
//!
//! An eviction first drops the warm records (the driver stops advertising the
//! model), then renames the repo folder into `aimodel/trash/` in one step, so a
//! reader sees the whole model or nothing, then removes it. Removal walks by
//! directory descriptors: a symlink is unlinked, never followed, and another
//! filesystem is never entered; a `trash` that is a symlink is replaced by a
//! real directory, never followed.

mod ollama;

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::OFlag;

use crate::layout::{RepoId, RepoPaths, RepoType};
use crate::safefs;
use crate::state::StateDir;

/// What to free and what to keep.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Evict until the cache filesystem has this much free.
    pub target_free: Option<u64>,
    /// Evict until the models in the cache take at most this much.
    pub max_size: Option<u64>,
    /// Repos never evicted (`org/name`).
    pub pinned: Vec<String>,
    /// Repos the caller needs (e.g. wanted by the agent's manifest).
    pub protected: Vec<String>,
    /// An in-use marker older than this no longer protects (its node is gone).
    pub in_use_ttl: Duration,
    /// A blob lease modified within this is a download in progress.
    pub lease_fresh: Duration,
    /// The Ollama store whose models are collected too (`ollama/<name>` keys).
    pub ollama_store: Option<PathBuf>,
}

/// Why a model is kept whatever the watermark says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    Pinned,
    InUse { node: String, task: String },
    Downloading,
    Protected,
}

impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keep::Pinned => f.write_str("pinned"),
            Keep::InUse { node, task } => write!(f, "in use by {task} on {node}"),
            Keep::Downloading => f.write_str("being downloaded"),
            Keep::Protected => f.write_str("wanted by the agent"),
        }
    }
}

/// One cached repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub repo: String,
    /// Bytes of its blobs.
    pub bytes: u64,
    /// When a task last started on it, else when it was last written.
    pub last_used: SystemTime,
    pub keep: Option<Keep>,
}

/// What a gc would do (or did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Every cached repo, least recently used first.
    pub models: Vec<Cached>,
    /// Repos to evict, in order.
    pub evict: Vec<String>,
    /// Bytes of all models.
    pub total: u64,
    pub free: u64,
    /// Whether evicting `evict` reaches the targets (false: pinned or in-use models are in the way).
    pub reaches_target: bool,
}

/// The repo's `blobs/`, opened without following links.
fn blobs_dir(paths: &RepoPaths) -> Option<OwnedFd> {
    safefs::open_dir(&paths.root).and_then(|r| safefs::open_dir_at(&r, OsStr::new("blobs"))).ok()
}

fn blob_bytes(paths: &RepoPaths) -> u64 {
    let Some(dir) = blobs_dir(paths) else { return 0 };
    safefs::list_dir(&dir)
        .unwrap_or_default()
        .into_iter()
        // Blobs, and the corrupt copies a repair set aside (kept for inspection,
        // they take space until the repo goes).
        .filter(|e| e.is_file() && e.name_str().is_some_and(|n| !n.contains('.') || n.ends_with(".corrupt")))
        .filter_map(|e| e.stat.map(|s| u64::try_from(s.st_size).unwrap_or(0)))
        .sum()
}

fn mtime_of(st: &nix::sys::stat::FileStat) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(st.st_mtime).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(st.st_mtime_nsec).unwrap_or(0))
}

fn newest_mtime(dirs: &[PathBuf]) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for d in dirs {
        let Ok(fd) = safefs::open_dir(d) else { continue };
        if let Ok(st) = nix::sys::stat::fstat(&fd) {
            t = t.max(mtime_of(&st));
        }
        for e in safefs::list_dir(&fd).unwrap_or_default() {
            if let Some(st) = &e.stat {
                t = t.max(mtime_of(st));
            }
        }
    }
    t
}

fn downloading(paths: &RepoPaths, fresh: Duration) -> bool {
    let now = SystemTime::now();
    let Some(dir) = blobs_dir(paths) else { return false };
    safefs::list_dir(&dir).unwrap_or_default().into_iter().any(|e| {
        e.name_str().is_some_and(|n| n.ends_with(".lease") || n.ends_with(".incomplete"))
            && e.stat.is_some_and(|st| now.duration_since(mtime_of(&st)).unwrap_or_default() < fresh)
    })
}

/// Every model repo in `hub` with its size, last use and reason to keep.
/// Pinned: `policy.pinned` and every shared pin (`aimodel/pins/`).
pub fn inventory(hub: &Path, policy: &Policy) -> std::io::Result<Vec<Cached>> {
    let state = StateDir::for_hub(hub);
    let in_use: Vec<_> = state.in_use(policy.in_use_ttl).into_iter().filter(|(_, _, live)| *live).collect();
    let shared_pins: Vec<String> = state.pins().into_iter().map(|p| p.repo).collect();
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(hub) {
        // Only Ollama models on this cache so far.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && policy.ollama_store.is_some() => Vec::new(),
        r => r?.flatten().collect(),
    };
    for e in entries {
        let Some(id) = RepoId::from_folder_name(&e.file_name().to_string_lossy()).filter(|i| i.kind == RepoType::Model)
        else {
            continue;
        };
        // Not following: a symlinked repo folder is not a model of this cache.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let paths = RepoPaths::new(hub, &id);
        let repo = id.id.clone();
        let keep = if policy.pinned.contains(&repo) || shared_pins.contains(&repo) {
            Some(Keep::Pinned)
        } else if let Some((u, _, _)) = in_use.iter().find(|(u, _, _)| u.uses(&repo)) {
            Some(Keep::InUse { node: u.node.clone(), task: u.task.clone() })
        } else if downloading(&paths, policy.lease_fresh) {
            Some(Keep::Downloading)
        } else if policy.protected.contains(&repo) {
            Some(Keep::Protected)
        } else {
            None
        };
        let last_used = state.last_used(&repo).unwrap_or_else(|| {
            newest_mtime(&[paths.root.join("refs"), paths.root.join("snapshots"), paths.root.clone()])
        });
        out.push(Cached { repo, bytes: blob_bytes(&paths), last_used, keep });
    }
    if let Some(store) = &policy.ollama_store {
        out.extend(ollama::inventory(&crate::ollama::Store::new(store), &state, policy));
    }
    out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.repo.cmp(&b.repo)));
    Ok(out)
}

/// Decides what to evict for `policy`.
pub fn plan(hub: &Path, policy: &Policy) -> std::io::Result<Plan> {
    let models = inventory(hub, policy)?;
    let total: u64 = models.iter().map(|m| m.bytes).sum();
    let free = match (crate::mount::space(hub), &policy.ollama_store) {
        (Err(_), Some(store)) => crate::mount::space(store),
        (r, _) => r,
    }
    .map(|(f, _)| f)?;
    let (mut size, mut free_after) = (total, free);
    let met = |size: u64, free: u64| {
        policy.max_size.is_none_or(|m| size <= m) && policy.target_free.is_none_or(|t| free >= t)
    };
    let mut evict = Vec::new();
    for m in models.iter().filter(|m| m.keep.is_none()) {
        if met(size, free_after) {
            break;
        }
        evict.push(m.repo.clone());
        size -= m.bytes;
        free_after += m.bytes;
    }
    Ok(Plan { reaches_target: met(size, free_after), models, evict, total, free })
}

/// Opens `aimodel/trash` as a real directory. A symlink planted there (a
/// tenant pointing gc at other files) is unlinked, never followed, and a real
/// directory made in its place.
pub fn open_trash(state: &StateDir) -> std::io::Result<OwnedFd> {
    let root = state.open_root()?;
    match safefs::ensure_dir_at(&root, OsStr::new("trash")) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Not a directory: unlink whatever it is (a link is removed, not its target).
            nix::unistd::unlinkat(&root, "trash", nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(|u| {
                std::io::Error::other(format!("{}: {e}, and cannot remove it: {u}", state.trash().display()))
            })?;
            safefs::ensure_dir_at(&root, OsStr::new("trash"))
        }
        Err(e) => Err(e),
    }
}

/// Evicts one repo; returns the bytes its blobs took, or `None` when it was
/// already gone or a task started using it meanwhile (then it is put back).
pub fn evict(hub: &Path, repo: &str, in_use_ttl: Duration) -> std::io::Result<Option<u64>> {
    let state = StateDir::for_hub(hub);
    let paths = RepoPaths::new(hub, &RepoId::model(repo));
    let folder = paths.root.file_name().unwrap_or_default().to_os_string();
    let hub_fd = nix::fcntl::open(
        hub,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    if safefs::stat_at(&hub_fd, &folder).is_err() {
        return Ok(None);
    }
    let bytes = blob_bytes(&paths);
    state.remove_warm(repo)?;
    let trash = open_trash(&state)?;
    let mut aside = folder.clone();
    aside.push(format!(".{}", safefs::random_hex(8)));
    match nix::fcntl::renameat(&hub_fd, folder.as_os_str(), &trash, aside.as_os_str()) {
        Ok(()) => {
            // A driver marks a model in use before it checks it: a marker that
            // appeared since the plan means a task is starting on it.
            if state.in_use(in_use_ttl).iter().any(|(u, _, live)| *live && u.uses(repo)) {
                nix::fcntl::renameat(&trash, aside.as_os_str(), &hub_fd, folder.as_os_str())?;
                return Ok(None);
            }
            safefs::remove_at(&trash, &aside)?
        }
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(_) => {
            // Another filesystem (HF_HUB_CACHE set apart from HF_HOME): refs go
            // first, so no reader resolves a revision while the rest goes.
            if let Ok(root) = safefs::open_dir_at(&hub_fd, &folder) {
                let _ = safefs::remove_at(&root, OsStr::new("refs"));
            }
            safefs::remove_at(&hub_fd, &folder)?;
        }
    }
    state.forget_used(repo);
    Ok(Some(bytes))
}

/// Removes what an interrupted eviction left in the trash (by descriptor:
/// links are unlinked, never followed; other filesystems are not entered).
/// An entry that cannot be removed (a mount point inside it, a tree nested
/// deeper than 128 levels) is left and reported, without holding up the rest
/// or the gc: returns those entries with their errors.
pub fn empty_trash(hub: &Path) -> std::io::Result<Vec<(std::ffi::OsString, std::io::Error)>> {
    let trash = open_trash(&StateDir::for_hub(hub))?;
    let mut left = Vec::new();
    for e in safefs::list_dir(&trash)? {
        if let Err(err) = safefs::remove_at(&trash, &e.name) {
            left.push((e.name, err));
        }
    }
    Ok(left)
}

/// How often a held gc lock is rewritten.
pub const GC_LOCK_HEARTBEAT: Duration = Duration::from_secs(3);
/// How long a gc lock's content must stay unchanged (on the waiter's clock)
/// before it is taken over.
pub const GC_LOCK_STALE: Duration = Duration::from_secs(30);

/// The cache-wide gc lock: one gc at a time across all agents sharing the
/// cache (the space a rename into the trash frees only shows once deleted, so
/// two gcs at once would both evict for the same shortfall). Created with
/// O_EXCL; it holds a random token, rewritten by a heartbeat thread every
/// `heartbeat` while held (only while the token is still ours). Another gc
/// watches it: content that changes is a live holder (it gives up), content
/// unchanged for `stale` on its own clock is a dead one (it takes over).
/// Released only if the token is still ours.
#[derive(Debug)]
pub struct GcLock {
    root: Arc<OwnedFd>,
    token: String,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    beat: Option<std::thread::JoinHandle<()>>,
}

const LOCK: &str = "gc.lock";

fn read_lock(root: &OwnedFd) -> Option<String> {
    safefs::read_capped_at(root, OsStr::new(LOCK), safefs::STATE_CAP)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn lock_token(content: &str) -> Option<&str> {
    content.split_whitespace().nth(2)
}

impl GcLock {
    /// Takes the lock, or `None` when a live gc holds it. Waits at most about
    /// `stale` (a dead holder), usually one heartbeat (a live one).
    pub fn take(state: &StateDir, heartbeat: Duration, stale: Duration) -> std::io::Result<Option<GcLock>> {
        let root = state.open_root()?;
        let token = safefs::random_hex(12);
        let tk = token.clone();
        let content = move |n: u64| format!("{} {} {tk} {n}\n", crate::state::node_name(), std::process::id());
        let mut seen: Option<(String, Instant)> = None;
        let started = Instant::now();
        loop {
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            match nix::fcntl::openat(&root, LOCK, flags, nix::sys::stat::Mode::from_bits_truncate(0o644)) {
                Ok(fd) => {
                    let mut f = std::fs::File::from(fd);
                    f.write_all(content(0).as_bytes())?;
                    f.sync_all()?;
                    return Ok(Some(GcLock::start(root, token, heartbeat, content)));
                }
                Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let now = read_lock(&root).unwrap_or_default();
            match &seen {
                Some((c, since)) if *c == now && since.elapsed() >= stale => {
                    // Dead holder: move exactly the lock judged aside (one
                    // waiter wins the rename), then compete for a fresh one.
                    let aside = format!("{LOCK}.stale.{}", safefs::random_hex(8));
                    if nix::fcntl::renameat(&root, LOCK, &root, aside.as_str()).is_ok() {
                        let moved = safefs::read_capped_at(&root, OsStr::new(&aside), safefs::STATE_CAP)
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default();
                        if moved != *c {
                            // Renewed in between: give it back (unless someone took the name since).
                            let _ = nix::fcntl::renameat2(
                                &root,
                                aside.as_str(),
                                &root,
                                LOCK,
                                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
                            );
                        }
                        let _ = nix::unistd::unlinkat(&root, aside.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
                    }
                    seen = None;
                    continue;
                }
                Some((c, _)) if *c == now => {}
                // Changed since we first looked: a live holder.
                Some(_) => return Ok(None),
                None => seen = Some((now, Instant::now())),
            }
            if started.elapsed() > stale * 3 {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100).min(heartbeat));
        }
    }

    fn start(
        root: OwnedFd,
        token: String,
        every: Duration,
        content: impl Fn(u64) -> String + Send + 'static,
    ) -> GcLock {
        let root = Arc::new(root);
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (r, s, l, t) = (root.clone(), stop.clone(), lost.clone(), token.clone());
        let beat = std::thread::Builder::new()
            .name("gc-lock".into())
            .spawn(move || {
                let mut n = 0u64;
                let tick = Duration::from_millis(50).min(every);
                let mut last = Instant::now();
                while !s.load(Ordering::SeqCst) {
                    std::thread::sleep(tick);
                    if last.elapsed() < every {
                        continue;
                    }
                    last = Instant::now();
                    n += 1;
                    // Still ours? Then rewrite it: waiters see a live holder.
                    if read_lock(&r).as_deref().and_then(lock_token) != Some(t.as_str()) {
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    // Whole (temp name, rename): a reader never sees it empty.
                    let _ = safefs::write_atomic_at(&*r, OsStr::new(LOCK), content(n).as_bytes());
                }
            })
            .ok();
        GcLock { root, token, stop, lost, beat }
    }

    /// False once another gc took the lock over (this one must stop evicting).
    pub fn held(&self) -> bool {
        !self.lost.load(Ordering::SeqCst) && read_lock(&self.root).as_deref().and_then(lock_token) == Some(&self.token)
    }
}

impl Drop for GcLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(b) = self.beat.take() {
            let _ = b.join();
        }
        if read_lock(&self.root).as_deref().and_then(lock_token) == Some(&self.token) {
            let _ = nix::unistd::unlinkat(&*self.root, LOCK, nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Plans, then evicts in order, re-checking the real targets after each
/// eviction (other writers share the filesystem). Returns the plan and the
/// repos evicted with their bytes. Fails with `WouldBlock` while another gc
/// holds the cache's gc lock, and stops (error) if the lock is lost midway.
pub fn run(hub: &Path, policy: &Policy) -> std::io::Result<(Plan, Vec<(String, u64)>)> {
    run_with_lock(hub, policy, GC_LOCK_HEARTBEAT, GC_LOCK_STALE)
}

/// [`run`] with the gc lock's heartbeat and stale window.
pub fn run_with_lock(
    hub: &Path,
    policy: &Policy,
    heartbeat: Duration,
    stale: Duration,
) -> std::io::Result<(Plan, Vec<(String, u64)>)> {
    let state = StateDir::for_hub(hub);
    let Some(lock) = GcLock::take(&state, heartbeat, stale)? else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("another gc holds {}", state.root().join(LOCK).display()),
        ));
    };
    // What cannot be removed stays in the trash; it is retried by the next gc.
    let _ = empty_trash(hub)?;
    let p = plan(hub, policy)?;
    let mut done = Vec::new();
    for repo in &p.evict {
        if !lock.held() {
            return Err(std::io::Error::other(format!(
                "lost {} to another gc (this one stalled past the stale window); stopped",
                state.root().join(LOCK).display()
            )));
        }
        let still = plan(hub, policy)?;
        if !still.evict.contains(repo) {
            continue;
        }
        let evicted = match (&policy.ollama_store, crate::ollama::from_state_key(repo).is_some()) {
            (Some(store), true) => ollama::evict(&crate::ollama::Store::new(store), &state, repo, policy)?,
            _ => evict(hub, repo, policy.in_use_ttl)?,
        };
        if let Some(bytes) = evicted {
            done.push((repo.clone(), bytes));
        }
    }
    if let Some(store) = &policy.ollama_store {
        // Blobs left by an eviction that stopped, or while a pull was running.
        ollama::collect_blobs(&crate::ollama::Store::new(store), policy.lease_fresh)?;
    }
    Ok((p, done))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{publish_snapshot, NewFile};
    use crate::state::InUse;

    fn seed(hub: &Path, repo: &str, size: usize, used_secs_ago: u64) {
        let commit = format!("{:0>40}", repo.len() + size);
        let files = [NewFile {
            path: "model.safetensors".into(),
            bytes: vec![u8::try_from(repo.len()).unwrap(); size],
            lfs: true,
        }];
        publish_snapshot(hub, &RepoId::model(repo), &commit, "main", &files).unwrap();
        let s = StateDir::for_hub(hub);
        s.touch_used(repo).unwrap();
        let f = std::fs::File::options().write(true).open(s.root().join("last-used").join(repo.replace('/', "--")));
        f.unwrap().set_modified(SystemTime::now() - Duration::from_secs(used_secs_ago)).unwrap();
    }

    #[test]
    fn lru_order_and_what_is_never_evicted() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        seed(&hub, "o/oldest", 1000, 500);
        seed(&hub, "o/pinned", 1000, 400);
        seed(&hub, "o/running", 1000, 300);
        seed(&hub, "o/older", 1000, 200);
        seed(&hub, "o/newest", 1000, 100);
        let state = StateDir::for_hub(&hub);
        state
            // One marker for a task using several models: the second one is kept too.
            .mark_in_use(&InUse {
                repo: "o/elsewhere".into(),
                commit: "c".into(),
                node: "n2".into(),
                task: "t".into(),
                also: vec!["o/running".into()],
            })
            .unwrap();
        let policy = Policy {
            max_size: Some(2000),
            pinned: vec!["o/pinned".into()],
            in_use_ttl: Duration::from_secs(60),
            lease_fresh: Duration::from_secs(30),
            ..Policy::default()
        };
        let p = plan(&hub, &policy).unwrap();
        assert_eq!(p.total, 5000);
        assert_eq!(p.models.first().unwrap().repo, "o/oldest");
        assert_eq!(p.evict, ["o/oldest", "o/older", "o/newest"]);
        assert!(p.reaches_target);
        // A smaller target cannot be reached: pinned and in-use stay.
        let tight = Policy { max_size: Some(0), ..policy.clone() };
        let (p2, done) = run(&hub, &tight).unwrap();
        assert!(!p2.reaches_target);
        assert_eq!(done.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), ["o/oldest", "o/older", "o/newest"]);
        assert!(done.iter().all(|(_, b)| *b == 1000));
        let left: Vec<String> = inventory(&hub, &tight).unwrap().into_iter().map(|m| m.repo).collect();
        assert_eq!(left, ["o/pinned", "o/running"]);
        assert!(std::fs::read_dir(state.trash()).unwrap().next().is_none(), "trash emptied");
        // A stale marker (its node gone) no longer protects.
        let stale = Policy { in_use_ttl: Duration::ZERO, ..tight };
        let (_, done) = run(&hub, &stale).unwrap();
        assert_eq!(done.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(), ["o/running"]);
    }

    #[test]
    fn one_gc_at_a_time_and_a_marker_that_appears_puts_the_repo_back() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        seed(&hub, "o/m", 10, 100);
        let state = StateDir::for_hub(&hub);
        let policy = Policy { max_size: Some(0), in_use_ttl: Duration::from_secs(60), ..Policy::default() };
        let held = GcLock::take(&state, GC_LOCK_HEARTBEAT, GC_LOCK_STALE).unwrap().expect("free");
        assert_eq!(run(&hub, &policy).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        drop(held);
        // The marker is written after the plan but before the eviction re-checks.
        let u = InUse { repo: "o/m".into(), commit: String::new(), node: "n".into(), task: "t".into(), also: vec![] };
        state.mark_in_use(&u).unwrap();
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), None);
        assert!(RepoPaths::new(&hub, &RepoId::model("o/m")).root.exists(), "put back");
        state.clear_in_use("t").unwrap();
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), Some(10));
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), None, "already gone");
    }

    #[test]
    fn corrupt_copies_count_as_the_repos_bytes_and_go_with_it() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        seed(&hub, "o/m", 10, 100);
        let blobs = RepoPaths::new(&hub, &RepoId::model("o/m")).blobs();
        std::fs::write(blobs.join(format!("{}.corrupt", "a".repeat(64))), vec![0u8; 90]).unwrap();
        let policy = Policy { max_size: Some(0), in_use_ttl: Duration::from_secs(60), ..Policy::default() };
        let p = plan(&hub, &policy).unwrap();
        assert_eq!(p.total, 100, "the set-aside copy takes space");
        let (_, done) = run(&hub, &policy).unwrap();
        assert_eq!(done, [("o/m".to_string(), 100)]);
        assert!(!blobs.exists());
    }

    #[test]
    fn a_download_in_progress_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        seed(&hub, "o/m", 10, 100);
        std::fs::write(RepoPaths::new(&hub, &RepoId::model("o/m")).blobs().join("abc.lease"), "me").unwrap();
        let policy = Policy { max_size: Some(0), lease_fresh: Duration::from_secs(30), ..Policy::default() };
        let p = plan(&hub, &policy).unwrap();
        assert_eq!(p.models[0].keep, Some(Keep::Downloading));
        assert!(p.evict.is_empty());
    }
}
