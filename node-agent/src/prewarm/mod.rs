//! Prewarming `repo@revision` into the shared cache: every blob fetched once
//! across nodes (`crate::fetch`: per-blob leases, a unique `*.incomplete`
//! name, resumed after a crash, verified — size, sha256 for LFS, git sha1
//! otherwise — and only then renamed into place); then snapshot links,
//! `trees/<commit>.json`, the completion record and `refs/<rev>` last, so
//! nothing partial is ever visible through a ref.

mod glob;
mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_cache::layout::CompletionRecord;
use hf_cache::layout::{is_commit, RepoId, RepoPaths, TreeEntry};
use hf_cache::publish::{
    check_present_blob, link_file, read_completion, record_completion_hashed, write_ref, write_tree, PresentBlob,
};

use crate::fetch::{blocking, fetch_blob, present, set_aside, BlobJob, HashKind};
pub use crate::fetch::{FetchError, FetchOptions, Progress};
use crate::hub::{Hub, HubError, TreeItem};
pub use glob::glob;
use glob::wanted;
use source::HfBlob;

/// Errors of a prewarm.
#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{repo}: not finished within the deadline of {deadline:?} (--deadline)")]
    Deadline { repo: String, deadline: Duration },
}

fn io(path: &Path, e: impl std::fmt::Display) -> PrewarmError {
    PrewarmError::Io { path: path.display().to_string(), reason: e.to_string() }
}

/// Options of a prewarm.
#[derive(Debug, Clone)]
pub struct Options {
    /// The hub cache directory (`HF_HUB_CACHE`).
    pub hub_dir: PathBuf,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Files downloaded at once.
    pub concurrency: usize,
    /// Leases, stalls and ranges.
    pub fetch: FetchOptions,
    /// The whole prewarm of one model (listing, waiting for leases, downloads) must end within this.
    pub deadline: Duration,
}

impl Options {
    /// Defaults for `hub_dir`.
    pub fn new(hub_dir: PathBuf) -> Self {
        Options {
            hub_dir,
            include: Vec::new(),
            exclude: Vec::new(),
            concurrency: 4,
            fetch: FetchOptions::default(),
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// The default of [`Options::deadline`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// What a prewarm did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub commit: String,
    pub files: usize,
    pub bytes: u64,
    /// Bytes this process fetched from the hub.
    pub downloaded: u64,
    pub elapsed: Duration,
    /// Files whose blob was corrupt (did not hash to its name) and was fetched again.
    pub repaired: Vec<String>,
}

/// What a prewarm knows about the blobs it found in place: the commit's
/// completion record, the blobs it hashed, the corrupt ones it replaced.
#[derive(Debug, Default)]
struct Found {
    record: Option<CompletionRecord>,
    hashed: std::sync::Mutex<BTreeMap<String, (i64, i64)>>,
    repaired: std::sync::Mutex<Vec<String>>,
}

fn entry_of(item: &TreeItem) -> TreeEntry {
    TreeEntry {
        size: item.size,
        blob_id: item.oid.clone(),
        lfs_sha256: item.lfs.as_ref().map(|l| l.oid.clone()),
        lfs_size: item.lfs.as_ref().map(|l| l.size),
        xet_hash: item.xet_hash.clone(),
    }
}

/// Prewarms `repo@revision`, within `o.deadline`.
pub async fn prewarm(
    hub: &Hub,
    repo: &str,
    revision: &str,
    o: &Options,
    progress: Arc<Progress>,
) -> Result<Summary, PrewarmError> {
    match tokio::time::timeout(o.deadline, prewarm_inner(hub, repo, revision, o, progress)).await {
        Ok(r) => r,
        Err(_) => Err(PrewarmError::Deadline { repo: repo.into(), deadline: o.deadline }),
    }
}

/// Aborts the blob tasks still running when a prewarm ends early (an error, the deadline).
pub(crate) struct AbortAll<E>(pub Vec<tokio::task::JoinHandle<Result<(), E>>>);

impl<E> Drop for AbortAll<E> {
    fn drop(&mut self) {
        for j in &self.0 {
            j.abort();
        }
    }
}

/// The names of blobs in `dir` with partial downloads or leases beside them
/// (listed once, not once per file).
pub(crate) fn blobs_with_partials(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".incomplete") || n.ends_with(".incomplete.parts") || n.ends_with(".lease"))
        .filter_map(|n| n.split('.').next().map(str::to_string))
        .collect()
}

async fn prewarm_inner(
    hub: &Hub,
    repo: &str,
    revision: &str,
    o: &Options,
    progress: Arc<Progress>,
) -> Result<Summary, PrewarmError> {
    let started = Instant::now();
    let until = started.checked_add(o.deadline);
    if !hf_cache::layout::is_safe_revision(revision) {
        return Err(PrewarmError::Io { path: repo.into(), reason: format!("unsafe revision {revision:?}") });
    }
    if !hf_cache::layout::is_repo_id(repo) {
        return Err(PrewarmError::Io {
            path: repo.into(),
            reason: hf_cache::layout::REPO_ID_RULE.trim_start_matches("is ").into(),
        });
    }
    let commit = if is_commit(revision) { revision.to_string() } else { hub.resolve(repo, revision).await? };
    let all = hub.tree(repo, &commit).await?;
    let items: Vec<TreeItem> = all.iter().filter(|i| wanted(o, &i.path)).cloned().collect();
    let paths = RepoPaths::new(&o.hub_dir, &RepoId::model(repo));
    let total = items.iter().try_fold(0u64, |t, i| t.checked_add(entry_of(i).content_size())).ok_or_else(|| {
        PrewarmError::Io { path: repo.into(), reason: "the listed sizes add up past 2^64 bytes".into() }
    })?;
    // The repo folder and its blobs/ must be real directories: downloads go
    // there by path, and a tenant's `blobs -> /etc/cron.d` would otherwise make
    // root write hub-chosen bytes into the host.
    {
        use hf_cache::safefs::{ensure_dir, ensure_dir_at};
        let hub_fd = ensure_dir(&o.hub_dir).map_err(|e| io(&o.hub_dir, e))?;
        let root_fd =
            ensure_dir_at(&hub_fd, paths.root.file_name().unwrap_or_default()).map_err(|e| io(&paths.root, e))?;
        ensure_dir_at(&root_fd, std::ffi::OsStr::new("blobs")).map_err(|e| io(&paths.blobs(), e))?;
    }
    progress.bytes_total.store(total, Ordering::SeqCst);
    let with_partials = Arc::new(blobs_with_partials(&paths.blobs()));

    let found = {
        let (p, c) = (paths.clone(), commit.clone());
        let record = tokio::task::spawn_blocking(move || read_completion(&p, &c)).await.unwrap_or_default();
        Arc::new(Found { record, ..Found::default() })
    };

    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let mut jobs = AbortAll(Vec::new());
    for item in items.clone() {
        let (hub, paths, o, progress, sem) = (hub.clone(), paths.clone(), o.clone(), progress.clone(), sem.clone());
        let (repo, commit, partials, found) = (repo.to_string(), commit.clone(), with_partials.clone(), found.clone());
        jobs.0.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let partials = partials.contains(entry_of(&item).etag());
            fetch_item(&hub, &repo, &commit, &item, &paths, &o, &progress, until, partials, &found).await
        }));
    }
    for j in jobs.0.iter_mut() {
        // The first error drops `jobs`: nobody will publish what the others fetch
        // (their leases go with them).
        j.await.map_err(|e| PrewarmError::Io { path: repo.into(), reason: e.to_string() })??;
    }
    drop(jobs);
    // Publish order (hf_cache::publish): blobs (above) → snapshot links →
    // trees listing → completion record → ref last. Blobs changed since this
    // prewarm started were verified by a download; any other is vouched for by
    // an earlier record, hashed by fetch_item (found.hashed) or by record_completion.
    let trusted_since = std::time::SystemTime::now() - started.elapsed();
    for item in &items {
        link_file(&paths, &commit, &item.path, entry_of(item).etag()).map_err(|e| io(&paths.snapshot(&commit), e))?;
    }
    let filtered = !(o.include.is_empty() && o.exclude.is_empty());
    if !filtered {
        let listing: BTreeMap<String, TreeEntry> = all.iter().map(|i| (i.path.clone(), entry_of(i))).collect();
        write_tree(&paths, &commit, listing).map_err(|e| io(&paths.tree(&commit), e))?;
    }
    let published: BTreeMap<String, TreeEntry> = items.iter().map(|i| (i.path.clone(), entry_of(i))).collect();
    let (p, c) = (paths.clone(), commit.clone());
    let hashed = found.hashed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    tokio::task::spawn_blocking(move || record_completion_hashed(&p, &c, &published, filtered, trusted_since, &hashed))
        .await
        .map_err(|e| io(&paths.completion(&commit), e))?
        .map_err(|e| io(&paths.completion(&commit), e))?;
    if revision != commit {
        write_ref(&paths, revision, &commit).map_err(|e| io(&paths.refs(revision), e))?;
    }
    let repaired = std::mem::take(&mut *found.repaired.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Summary {
        commit,
        files: items.len(),
        bytes: total,
        downloaded: progress.downloaded.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
        repaired,
    })
}

/// One file of the listing: a blob in place before this prewarm is kept only
/// if the completion record vouches for it or it hashes right (a corrupt one
/// is set aside and fetched again); then [`fetch_blob`].
#[allow(clippy::too_many_arguments)]
async fn fetch_item(
    hub: &Hub,
    repo: &str,
    commit: &str,
    item: &TreeItem,
    paths: &RepoPaths,
    o: &Options,
    progress: &Progress,
    until: Option<Instant>,
    partials: bool,
    found: &Found,
) -> Result<(), PrewarmError> {
    let entry = entry_of(item);
    let (etag, size) = (entry.etag().to_string(), entry.content_size());
    let blob = paths.blob(&etag);
    if present(&blob, size) {
        let (p, rec, path, e) = (paths.clone(), found.record.clone(), item.path.clone(), entry.clone());
        let state = blocking(move || check_present_blob(&p, rec.as_ref(), &path, &e)).await;
        match state.map_err(|e| io(&blob, e))? {
            PresentBlob::Recorded => {}
            PresentBlob::Sound { ctime } => {
                found.hashed.lock().unwrap_or_else(|p| p.into_inner()).insert(etag.clone(), ctime);
            }
            PresentBlob::Corrupt { actual } => {
                tracing::warn!(repo, path = %item.path, blob = %etag, %actual, "corrupt blob: fetching it again");
                set_aside(&blob, &paths.blobs(), &etag).map_err(|e| io(&blob, e))?;
                found.repaired.lock().unwrap_or_else(|p| p.into_inner()).push(item.path.clone());
            }
        }
    }
    let lfs = entry.lfs_sha256.is_some();
    let job = BlobJob {
        url: hub.file_url(repo, commit, &item.path),
        dir: paths.blobs(),
        name: etag.clone(),
        digest: etag.clone(),
        hash: if lfs { HashKind::Sha256 } else { HashKind::GitSha1 },
        size,
        label: item.path.clone(),
    };
    let src = HfBlob { hub: hub.clone(), repo: repo.into(), commit: commit.into(), etag, size, lfs };
    Ok(fetch_blob(&src, &job, &o.fetch, progress, until, partials).await?)
}

/// Checks `repo@revision` on disk (quick mode) and, when it is complete,
/// records it as warm for the driver's fingerprint. Returns the check and the
/// error of writing the record, if any.
pub fn record_if_warm(hub_dir: &Path, repo: &str, revision: &str) -> (hf_cache::Report, Option<std::io::Error>) {
    let report = hf_cache::check(hub_dir, &RepoId::model(repo), revision, hf_cache::Mode::Quick);
    let mut err = None;
    if report.is_complete() {
        let rec = hf_cache::state::WarmRecord {
            repo: repo.to_string(),
            revision: revision.to_string(),
            commit: report.commit.clone().unwrap_or_default(),
            bytes: report.total_bytes(),
            verified_at: hf_cache::state::unix_now(),
            node: hf_cache::state::node_name(),
        };
        err = hf_cache::state::StateDir::for_hub(hub_dir).write_warm(&rec).err();
    }
    (report, err)
}
