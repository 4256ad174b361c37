//! What the agent and the driver tell each other through the cache itself, in
//! `<HF_HOME>/aimodel/` (beside `hub/`, so huggingface_hub never sees it):
//!
//! - `warm/<org>--<name>@<rev>.json`: a model the agent prewarmed and verified
//!   (repo, revision, commit). The driver's fingerprint reports these as
//!   `driver.aimodel.warm.<org>/<name>` = commit.
//! - `in-use/<task>.json`: a model a running task uses, written by the driver
//!   at StartTask, refreshed while the task runs, removed at DestroyTask. A
//!   marker not refreshed for the TTL (a crashed node) no longer protects. The
//!   TTL (agent `gc.in_use_ttl`, default 1 h) is long on purpose: markers are
//!   refreshed by the driver only, so a plugin restart or a client upgrade
//!   must not expose a model a container still reads; at recovery the driver
//!   re-marks its tasks ([`StateDir::in_use_for_node`]).
//! - `pins/<org>--<name>.json`: a model pinned cluster-wide (who, when),
//!   written by the daemon for `pin = true` manifest models and by
//!   `aimodel-agent pin`; every node's gc honours every pin.
//! - `last-used/<org>--<name>`: its mtime is the last time a task started on
//!   the model: the order of least-recently-used eviction.
//! - `trash/`: repos being evicted (renamed here in one step, then removed).
//!
//! Ollama models share these records under the key `ollama/<short name>`
//! ([`crate::ollama::state_key`], e.g. `ollama/llama3.2:3b`; an HF repo id never
//! holds a `:`): `warm/ollama--llama3.2:3b@3b.json` with `revision` = the tag
//! and `commit` = `sha256:<hex>` of the manifest, `in-use` markers whose `repo`
//! is the key (and `commit` the manifest digest), `pins/ollama--llama3.2:3b.json`,
//! `last-used/ollama--llama3.2:3b`.
//!
//! Every file is written whole under a random temp name and renamed, so a
//! reader on another node sees the old or the new content, never a part.
//!
//! A task may be able to write the cache: every record is read with
//! `O_NOFOLLOW|O_NONBLOCK`, must be a regular file and at most 64 KiB
//! ([`crate::safefs`]); `aimodel/` and its subdirectories are opened without
//! following a symlink (a symlinked one is refused: nothing read, nothing
//! written through it).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::OFlag;
use serde::{Deserialize, Serialize};

use crate::safefs;

/// The state directory of one cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

/// A model the agent has prewarmed and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmRecord {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub bytes: u64,
    /// Unix seconds of the last verification.
    pub verified_at: u64,
    /// The node whose agent verified it.
    pub node: String,
}

/// A model a running task uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InUse {
    pub repo: String,
    pub commit: String,
    pub node: String,
    pub task: String,
    /// More models the same task uses (an Ollama server serving several):
    /// one marker per task, so removing it releases them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<String>,
}

impl InUse {
    /// Whether the marker keeps `repo` (its `repo` or one of `also`).
    pub fn uses(&self, repo: &str) -> bool {
        self.repo == repo || self.also.iter().any(|r| r == repo)
    }
}

/// `org/name` → `org--name` (the hub folder name without `models--`).
fn key(repo: &str) -> String {
    repo.replace('/', "--")
}

/// A file-name-safe form of any string (revisions, task ids).
fn escape(s: &str) -> String {
    crate::layout::percent_encode(s, b"-_.")
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This machine's name (for records other nodes read).
pub fn node_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// A repo pinned cluster-wide: no agent's gc evicts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub repo: String,
    /// Who pinned it (`node` or `node:manifest`, `node:cli`).
    pub by: String,
    /// Unix seconds.
    pub at: u64,
}

fn mtime_of(st: &nix::sys::stat::FileStat) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(st.st_mtime).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(st.st_mtime_nsec).unwrap_or(0))
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl StateDir {
    /// The state directory of the hub cache `hub_dir` (`<HF_HOME>/hub` → `<HF_HOME>/aimodel`).
    pub fn for_hub(hub_dir: &Path) -> Self {
        let parent = hub_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        StateDir { root: parent.join("aimodel") }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens `aimodel/` (created if absent), refusing a symlink.
    pub fn open_root(&self) -> std::io::Result<OwnedFd> {
        safefs::ensure_dir(&self.root)
    }

    /// Opens `aimodel/<sub>` (created if absent), refusing a symlink at either level.
    pub fn open_sub(&self, sub: &str) -> std::io::Result<OwnedFd> {
        safefs::ensure_dir_at(self.open_root()?, OsStr::new(sub))
    }

    /// Opens `aimodel/<sub>` if it exists (never creating it: readers may be read-only).
    fn existing_sub(&self, sub: &str) -> std::io::Result<OwnedFd> {
        safefs::open_dir_at(safefs::open_dir(&self.root)?, OsStr::new(sub))
    }

    /// Every `*.json` regular file of `aimodel/<sub>` with its content (at most
    /// [`safefs::STATE_CAP`]) and mtime. Links, devices, FIFOs and oversized
    /// files are skipped; a symlinked directory yields nothing.
    fn records(&self, sub: &str) -> Vec<(Vec<u8>, SystemTime)> {
        let Ok(dir) = self.existing_sub(sub) else { return Vec::new() };
        safefs::list_dir(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.is_file() && e.name_str().is_some_and(|n| n.ends_with(".json") && !n.starts_with('.')))
            .filter_map(|e| {
                let (f, st) = safefs::open_regular_at(&dir, &e.name).ok()?;
                let bytes = safefs::read_file_capped(f, safefs::STATE_CAP, Path::new(&e.name)).ok()?;
                Some((bytes, mtime_of(&st)))
            })
            .collect()
    }

    fn write_record(&self, sub: &str, name: &str, value: &impl Serialize) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
        safefs::write_atomic_at(self.open_sub(sub)?, OsStr::new(name), &bytes)
    }

    /// Removes `aimodel/<sub>/<name>` (absent is fine; a link is removed, not followed).
    fn remove_record(&self, sub: &str, name: &str) -> std::io::Result<()> {
        let dir = match self.existing_sub(sub) {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        match nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records a verified model.
    pub fn write_warm(&self, rec: &WarmRecord) -> std::io::Result<()> {
        self.write_record("warm", &format!("{}@{}.json", key(&rec.repo), escape(&rec.revision)), rec)
    }

    /// Every warm record (unreadable, linked or oversized files are skipped).
    pub fn warm(&self) -> Vec<WarmRecord> {
        self.records("warm").iter().filter_map(|(b, _)| serde_json::from_slice(b).ok()).collect()
    }

    /// Forgets every warm record of `repo`.
    pub fn remove_warm(&self, repo: &str) -> std::io::Result<()> {
        let dir = match self.existing_sub("warm") {
            Ok(d) => d,
            Err(e) if not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let prefix = format!("{}@", key(repo));
        for e in safefs::list_dir(&dir)? {
            if e.name_str().is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json")) {
                match nix::unistd::unlinkat(&dir, e.name.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir) {
                    Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Marks a model in use by `u.task` (also refreshes the marker's age).
    pub fn mark_in_use(&self, u: &InUse) -> std::io::Result<()> {
        self.write_record("in-use", &format!("{}.json", escape(&u.task)), u)
    }

    /// Removes the marker of `task` (absent is fine).
    pub fn clear_in_use(&self, task: &str) -> std::io::Result<()> {
        self.remove_record("in-use", &format!("{}.json", escape(task)))
    }

    /// Every in-use marker with its age; `live` ones are younger than `ttl`.
    pub fn in_use(&self, ttl: Duration) -> Vec<(InUse, Duration, bool)> {
        let now = SystemTime::now();
        self.records("in-use")
            .iter()
            .filter_map(|(b, mtime)| {
                let age = now.duration_since(*mtime).unwrap_or_default();
                let u: InUse = serde_json::from_slice(b).ok()?;
                Some((u, age, age < ttl))
            })
            .collect()
    }

    /// The in-use markers written for `node`, whatever their age: what a driver
    /// re-marks (refreshes) at recovery for the tasks it still runs.
    pub fn in_use_for_node(&self, node: &str) -> Vec<InUse> {
        self.in_use(Duration::MAX).into_iter().map(|(u, _, _)| u).filter(|u| u.node == node).collect()
    }

    /// Notes that a task started on `repo` now.
    pub fn touch_used(&self, repo: &str) -> std::io::Result<()> {
        let dir = self.open_sub("last-used")?;
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(&dir, key(repo).as_str(), flags, nix::sys::stat::Mode::from_bits_truncate(0o644))?;
        let f = std::fs::File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "last-used entry is not a regular file"));
        }
        f.set_modified(SystemTime::now())
    }

    /// When a task last started on `repo`, if ever.
    pub fn last_used(&self, repo: &str) -> Option<SystemTime> {
        let dir = self.existing_sub("last-used").ok()?;
        let st = safefs::stat_at(&dir, OsStr::new(&key(repo))).ok()?;
        Some(mtime_of(&st))
    }

    /// Forgets when `repo` was last used.
    pub fn forget_used(&self, repo: &str) {
        let _ = self.remove_record("last-used", &key(repo));
    }

    /// Pins `repo` for every node's gc, noting who.
    pub fn pin(&self, repo: &str, by: &str) -> std::io::Result<()> {
        let p = Pin { repo: repo.to_string(), by: by.to_string(), at: unix_now() };
        self.write_record("pins", &format!("{}.json", key(repo)), &p)
    }

    /// Removes the shared pin of `repo` (absent is fine).
    pub fn unpin(&self, repo: &str) -> std::io::Result<()> {
        self.remove_record("pins", &format!("{}.json", key(repo)))
    }

    /// Every shared pin (unreadable, linked or oversized files are skipped).
    pub fn pins(&self) -> Vec<Pin> {
        self.records("pins").iter().filter_map(|(b, _)| serde_json::from_slice(b).ok()).collect()
    }

    /// Where evicted repos go before removal.
    pub fn trash(&self) -> PathBuf {
        self.root.join("trash")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_age() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        let s = StateDir::for_hub(&hub);
        assert_eq!(s.root(), d.path().join("aimodel"));
        assert!(s.warm().is_empty());
        let rec = |rev: &str| WarmRecord {
            repo: "org/m".into(),
            revision: rev.into(),
            commit: "c".repeat(40),
            bytes: 10,
            verified_at: unix_now(),
            node: node_name(),
        };
        s.write_warm(&rec("main")).unwrap();
        s.write_warm(&rec("refs/pr/1")).unwrap();
        s.write_warm(&WarmRecord { repo: "org/other".into(), ..rec("main") }).unwrap();
        assert_eq!(s.warm().len(), 3);
        s.remove_warm("org/m").unwrap();
        assert_eq!(s.warm().iter().map(|r| r.repo.as_str()).collect::<Vec<_>>(), ["org/other"]);

        let u = InUse {
            repo: "org/m".into(),
            commit: "c".repeat(40),
            node: "n1".into(),
            task: "alloc/web/1".into(),
            also: vec![],
        };
        s.mark_in_use(&u).unwrap();
        let seen = s.in_use(Duration::from_secs(60));
        assert_eq!(seen.len(), 1);
        assert!(seen[0].2, "a fresh marker is live");
        assert!(!s.in_use(Duration::ZERO)[0].2, "a marker older than the TTL is not");
        let other = InUse { node: "n2".into(), task: "alloc/db/1".into(), ..u.clone() };
        s.mark_in_use(&other).unwrap();
        // Whatever their age: what a recovering driver re-marks.
        assert_eq!(s.in_use_for_node("n1"), std::slice::from_ref(&u));
        assert_eq!(s.in_use_for_node("n2"), [other]);
        assert!(s.in_use_for_node("n3").is_empty());
        s.clear_in_use("alloc/db/1").unwrap();
        s.clear_in_use("alloc/web/1").unwrap();
        s.clear_in_use("alloc/web/1").unwrap();
        assert!(s.in_use(Duration::from_secs(60)).is_empty());

        assert!(s.last_used("org/m").is_none());
        s.touch_used("org/m").unwrap();
        assert!(s.last_used("org/m").unwrap() <= SystemTime::now());
    }
}
