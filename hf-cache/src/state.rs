//! What the agent and the driver tell each other through the cache itself, in
//! `<HF_HOME>/aimodel/` (beside `hub/`, so huggingface_hub never sees it):
//!
//! - `warm/<org>--<name>@<rev>.json`: a model the agent prewarmed and verified
//!   (repo, revision, commit). The driver's fingerprint reports these as
//!   `driver.aimodel.warm.<org>/<name>` = commit.
//! - `in-use/<task>.json`: a model a running task uses, written by the driver
//!   at StartTask, refreshed while the task runs, removed at DestroyTask. A
//!   marker not refreshed for the TTL (a crashed node) no longer protects.
//! - `last-used/<org>--<name>`: its mtime is the last time a task started on
//!   the model: the order of least-recently-used eviction.
//! - `trash/`: repos being evicted (renamed here in one step, then removed).
//!
//! Every file is written whole under a temp name and renamed, so a reader on
//! another node sees the old or the new content, never a part.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::publish::write_atomic;

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

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect())
        .unwrap_or_default();
    v.sort();
    v
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

    fn warm_path(&self, repo: &str, revision: &str) -> PathBuf {
        self.root.join("warm").join(format!("{}@{}.json", key(repo), escape(revision)))
    }

    /// Records a verified model.
    pub fn write_warm(&self, rec: &WarmRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
        write_atomic(&self.warm_path(&rec.repo, &rec.revision), &bytes)
    }

    /// Every warm record (unreadable files are skipped).
    pub fn warm(&self) -> Vec<WarmRecord> {
        json_files(&self.root.join("warm"))
            .iter()
            .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
            .collect()
    }

    /// Forgets every warm record of `repo`.
    pub fn remove_warm(&self, repo: &str) -> std::io::Result<()> {
        let prefix = format!("{}@", key(repo));
        for p in json_files(&self.root.join("warm")) {
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)) {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn in_use_path(&self, task: &str) -> PathBuf {
        self.root.join("in-use").join(format!("{}.json", escape(task)))
    }

    /// Marks a model in use by `u.task` (also refreshes the marker's age).
    pub fn mark_in_use(&self, u: &InUse) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(u).map_err(std::io::Error::other)?;
        write_atomic(&self.in_use_path(&u.task), &bytes)
    }

    /// Removes the marker of `task` (absent is fine).
    pub fn clear_in_use(&self, task: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.in_use_path(task)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every in-use marker with its age; `live` ones are younger than `ttl`.
    pub fn in_use(&self, ttl: Duration) -> Vec<(InUse, Duration, bool)> {
        let now = SystemTime::now();
        json_files(&self.root.join("in-use"))
            .iter()
            .filter_map(|p| {
                let age = now.duration_since(std::fs::metadata(p).ok()?.modified().ok()?).unwrap_or_default();
                let u: InUse = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                Some((u, age, age < ttl))
            })
            .collect()
    }

    /// Notes that a task started on `repo` now.
    pub fn touch_used(&self, repo: &str) -> std::io::Result<()> {
        let p = self.root.join("last-used").join(key(repo));
        std::fs::create_dir_all(p.parent().unwrap_or(&self.root))?;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p)?;
        f.set_modified(SystemTime::now())
    }

    /// When a task last started on `repo`, if ever.
    pub fn last_used(&self, repo: &str) -> Option<SystemTime> {
        std::fs::metadata(self.root.join("last-used").join(key(repo))).ok()?.modified().ok()
    }

    /// Forgets when `repo` was last used.
    pub fn forget_used(&self, repo: &str) {
        let _ = std::fs::remove_file(self.root.join("last-used").join(key(repo)));
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

        let u = InUse { repo: "org/m".into(), commit: "c".repeat(40), node: "n1".into(), task: "alloc/web/1".into() };
        s.mark_in_use(&u).unwrap();
        let seen = s.in_use(Duration::from_secs(60));
        assert_eq!(seen.len(), 1);
        assert!(seen[0].2, "a fresh marker is live");
        assert!(!s.in_use(Duration::ZERO)[0].2, "a marker older than the TTL is not");
        s.clear_in_use("alloc/web/1").unwrap();
        s.clear_in_use("alloc/web/1").unwrap();
        assert!(s.in_use(Duration::from_secs(60)).is_empty());

        assert!(s.last_used("org/m").is_none());
        s.touch_used("org/m").unwrap();
        assert!(s.last_used("org/m").unwrap() <= SystemTime::now());
    }
}
