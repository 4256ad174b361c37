//! Eviction of cold models: least recently used first, whole repos, never a
//! pinned model, one a running task uses (a live in-use marker, any node), one
//! being downloaded (a fresh blob lease), or one the caller protects.
//!
//! An eviction first drops the warm records (the driver stops advertising the
//! model), then renames the repo folder into `aimodel/trash/` in one step, so a
//! reader sees the whole model or nothing, then removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::layout::{RepoId, RepoPaths, RepoType};
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

fn blob_bytes(paths: &RepoPaths) -> u64 {
    std::fs::read_dir(paths.blobs())
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().contains('.'))
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn newest_mtime(dirs: &[PathBuf]) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for d in dirs {
        if let Ok(m) = std::fs::metadata(d).and_then(|m| m.modified()) {
            t = t.max(m);
        }
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if let Ok(m) = std::fs::symlink_metadata(e.path()).and_then(|m| m.modified()) {
                t = t.max(m);
            }
        }
    }
    t
}

fn downloading(paths: &RepoPaths, fresh: Duration) -> bool {
    let now = SystemTime::now();
    std::fs::read_dir(paths.blobs()).into_iter().flatten().flatten().any(|e| {
        let n = e.file_name().to_string_lossy().to_string();
        (n.ends_with(".lease") || n.ends_with(".incomplete"))
            && e.metadata().and_then(|m| m.modified()).is_ok_and(|m| now.duration_since(m).unwrap_or_default() < fresh)
    })
}

/// Every model repo in `hub` with its size, last use and reason to keep.
pub fn inventory(hub: &Path, policy: &Policy) -> std::io::Result<Vec<Cached>> {
    let state = StateDir::for_hub(hub);
    let in_use: Vec<_> = state.in_use(policy.in_use_ttl).into_iter().filter(|(_, _, live)| *live).collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir(hub)?.flatten() {
        let Some(id) = RepoId::from_folder_name(&e.file_name().to_string_lossy()).filter(|i| i.kind == RepoType::Model)
        else {
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let paths = RepoPaths::new(hub, &id);
        let repo = id.id.clone();
        let keep = if policy.pinned.contains(&repo) {
            Some(Keep::Pinned)
        } else if let Some((u, _, _)) = in_use.iter().find(|(u, _, _)| u.repo == repo) {
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
    out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.repo.cmp(&b.repo)));
    Ok(out)
}

/// Decides what to evict for `policy`.
pub fn plan(hub: &Path, policy: &Policy) -> std::io::Result<Plan> {
    let models = inventory(hub, policy)?;
    let total: u64 = models.iter().map(|m| m.bytes).sum();
    let free = crate::mount::space(hub).map(|(f, _)| f)?;
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

/// Evicts one repo; returns the bytes its blobs took, or `None` when it was
/// already gone or a task started using it meanwhile (then it is put back).
pub fn evict(hub: &Path, repo: &str, in_use_ttl: Duration) -> std::io::Result<Option<u64>> {
    let state = StateDir::for_hub(hub);
    let paths = RepoPaths::new(hub, &RepoId::model(repo));
    if !paths.root.exists() {
        return Ok(None);
    }
    let bytes = blob_bytes(&paths);
    state.remove_warm(repo)?;
    std::fs::create_dir_all(state.trash())?;
    let nonce = format!("{}.{}", std::process::id(), crate::state::unix_now());
    let aside = state.trash().join(format!("{}.{nonce}", paths.root.file_name().unwrap_or_default().to_string_lossy()));
    match std::fs::rename(&paths.root, &aside) {
        Ok(()) => {
            // A driver marks a model in use before it checks it: a marker that
            // appeared since the plan means a task is starting on it.
            if state.in_use(in_use_ttl).iter().any(|(u, _, live)| *live && u.repo == repo) {
                std::fs::rename(&aside, &paths.root)?;
                return Ok(None);
            }
            std::fs::remove_dir_all(&aside)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => {
            // Another filesystem (HF_HUB_CACHE set apart from HF_HOME): refs go
            // first, so no reader resolves a revision while the rest goes.
            let _ = std::fs::remove_dir_all(paths.root.join("refs"));
            std::fs::remove_dir_all(&paths.root)?;
        }
    }
    state.forget_used(repo);
    Ok(Some(bytes))
}

/// Removes what an interrupted eviction left in the trash.
pub fn empty_trash(hub: &Path) {
    let trash = StateDir::for_hub(hub).trash();
    for e in std::fs::read_dir(trash).into_iter().flatten().flatten() {
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// The cache-wide gc lock: one gc at a time across all agents sharing the
/// cache (the space a rename into the trash frees only shows once deleted, so
/// two gcs at once would both evict for the same shortfall). O_EXCL, like the
/// blob leases; a lock untouched for ten minutes is from a dead gc.
struct GcLock(PathBuf);

impl GcLock {
    fn take(state: &StateDir) -> std::io::Result<Option<GcLock>> {
        let path = state.root().join("gc.lock");
        std::fs::create_dir_all(state.root())?;
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{} {}", crate::state::node_name(), std::process::id());
                    return Ok(Some(GcLock(path)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .map(|m| SystemTime::now().duration_since(m).unwrap_or_default())
                        .unwrap_or_default();
                    if age < Duration::from_secs(600) {
                        return Ok(None);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for GcLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Plans, then evicts in order, re-checking the real targets after each
/// eviction (other writers share the filesystem). Returns the plan and the
/// repos evicted with their bytes. Fails with `WouldBlock` while another gc
/// holds the cache's gc lock.
pub fn run(hub: &Path, policy: &Policy) -> std::io::Result<(Plan, Vec<(String, u64)>)> {
    let state = StateDir::for_hub(hub);
    let Some(_lock) = GcLock::take(&state)? else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("another gc holds {}", state.root().join("gc.lock").display()),
        ));
    };
    empty_trash(hub);
    let p = plan(hub, policy)?;
    let mut done = Vec::new();
    for repo in &p.evict {
        let still = plan(hub, policy)?;
        if !still.evict.contains(repo) {
            continue;
        }
        if let Some(bytes) = evict(hub, repo, policy.in_use_ttl)? {
            done.push((repo.clone(), bytes));
        }
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
        let files = [NewFile { path: "model.safetensors".into(), bytes: vec![repo.len() as u8; size], lfs: true }];
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
            .mark_in_use(&InUse { repo: "o/running".into(), commit: "c".into(), node: "n2".into(), task: "t".into() })
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
        let held = GcLock::take(&state).unwrap().expect("free");
        assert_eq!(run(&hub, &policy).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        drop(held);
        // The marker is written after the plan but before the eviction re-checks.
        let u = InUse { repo: "o/m".into(), commit: String::new(), node: "n".into(), task: "t".into() };
        state.mark_in_use(&u).unwrap();
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), None);
        assert!(RepoPaths::new(&hub, &RepoId::model("o/m")).root.exists(), "put back");
        state.clear_in_use("t").unwrap();
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), Some(10));
        assert_eq!(evict(&hub, "o/m", policy.in_use_ttl).unwrap(), None, "already gone");
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
