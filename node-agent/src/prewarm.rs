//! Prewarming `repo@revision` into the shared cache: every blob fetched once
//! across nodes (per-blob leases), downloaded to a unique `*.incomplete` name,
//! resumed after a crash, verified (size, sha256 for LFS, git sha1 otherwise)
//! and only then renamed into place; then snapshot links, `trees/<commit>.json`
//! and `refs/<rev>` last, so nothing partial is ever visible through a ref.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::header::{HeaderMap, RANGE};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use hf_cache::layout::CompletionRecord;
use hf_cache::layout::{is_commit, RepoId, RepoPaths, TreeEntry};
use hf_cache::publish::{
    check_present_blob, link_file, read_completion, record_completion_hashed, write_ref, write_tree, PresentBlob,
};

use crate::hub::{Hub, HubError, TreeItem, ATTEMPTS, MAX_FILE_SIZE};
use crate::lease::{acquire, is_released, live_token, remove_if, Acquired, Lease};

/// Errors of a prewarm.
#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}: downloaded {actual} bytes, the hub lists {expected}")]
    Size { path: String, expected: u64, actual: u64 },
    #[error("{path}: content hashes to {actual}, the hub lists {expected}; nothing was published")]
    Hash { path: String, expected: String, actual: String },
    #[error("{path}: no data for {stall:?}")]
    Stalled { path: String, stall: Duration },
    #[error("{path}: the hub's {header} is {actual}, the tree listing says {expected}; nothing was published")]
    Mismatch { path: String, header: &'static str, expected: String, actual: String },
    #[error("{path}: the body is longer than the {expected} bytes the hub lists; the partial file was removed")]
    TooLong { path: String, expected: u64 },
    #[error("{path}: another agent took over this blob's lease; waiting for it instead")]
    LeaseLost { path: String },
    #[error("{repo}: not finished within the deadline of {deadline:?} (--deadline)")]
    Deadline { repo: String, deadline: Duration },
    #[error("{path}: {size} bytes in ranges of {range} bytes would be more than {max} ranges")]
    TooManyRanges { path: String, size: u64, range: u64, max: u64 },
}

/// Compares what a resolve answer says about itself (`X-Repo-Commit`,
/// `X-Linked-Etag`, `X-Linked-Size`, present when the hub answers without a
/// redirect) with the tree listing, before any byte is written.
fn check_answer(
    resp: &reqwest::Response,
    url: &str,
    commit: &str,
    etag: &str,
    size: u64,
    lfs: bool,
) -> Result<(), PrewarmError> {
    let h = |k: &str| {
        resp.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().trim_start_matches("W/").trim_matches('"').to_string())
    };
    let mismatch = |header, expected: String, actual: String| PrewarmError::Mismatch {
        path: url.into(),
        header,
        expected,
        actual,
    };
    if let Some(c) = h("x-repo-commit").filter(|c| !c.is_empty() && c != commit) {
        return Err(mismatch("X-Repo-Commit", commit.into(), c));
    }
    if lfs {
        if let Some(e) = h("x-linked-etag").filter(|e| !e.is_empty() && e != etag) {
            return Err(mismatch("X-Linked-Etag", etag.into(), e));
        }
        if let Some(n) = h("x-linked-size").and_then(|n| n.parse::<u64>().ok()).filter(|n| *n != size) {
            return Err(mismatch("X-Linked-Size", size.to_string(), n.to_string()));
        }
    }
    Ok(())
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
    pub heartbeat: Duration,
    pub stale_after: Duration,
    /// A download that sees no bytes for this long is retried.
    pub stall: Duration,
    /// Byte ranges fetched at once for one large LFS file (1: a single stream).
    pub ranges: usize,
    /// Files at least this large are fetched in ranges.
    pub range_min: u64,
    /// Size of one range.
    pub range_size: u64,
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
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            stall: Duration::from_secs(60),
            ranges: 4,
            range_min: 128 << 20,
            range_size: 32 << 20,
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// The default of [`Options::deadline`].
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// Most ranges one file is cut into (bounds the record of finished ranges).
pub const MAX_RANGES: u64 = 1 << 20;

/// Live progress, readable from another task.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub downloaded: AtomicU64,
}

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

/// `*` and `?` globs (a `*` also crosses `/`, like fnmatch in huggingface_hub).
pub fn glob(pattern: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], t) || (!t.is_empty() && rec(p, &t[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &t[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), text.as_bytes())
}

fn wanted(o: &Options, path: &str) -> bool {
    (o.include.is_empty() || o.include.iter().any(|g| glob(g, path))) && !o.exclude.iter().any(|g| glob(g, path))
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

fn present(blob: &Path, size: u64) -> bool {
    std::fs::metadata(blob).is_ok_and(|m| m.len() == size)
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
struct AbortAll(Vec<tokio::task::JoinHandle<Result<(), PrewarmError>>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for j in &self.0 {
            j.abort();
        }
    }
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
    // Blobs with partial downloads or leases beside them, listed once (not once per file).
    let with_partials: Arc<std::collections::BTreeSet<String>> = Arc::new(
        std::fs::read_dir(paths.blobs())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.ends_with(".incomplete") || n.ends_with(".incomplete.parts") || n.ends_with(".lease"))
            .filter_map(|n| n.split('.').next().map(str::to_string))
            .collect(),
    );

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
            fetch_blob(&hub, &repo, &commit, &item, &paths, &o, &progress, until, partials, &found).await
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
    // an earlier record, hashed by fetch_blob (found.hashed) or by record_completion.
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

/// `blobs/<etag>.<token>.incomplete` (or `.incomplete.parts`): the token, for
/// any name of a partial download of `etag` (`Some("")` for the older
/// `<etag>.incomplete`).
fn partial_token<'a>(name: &'a str, etag: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(etag)?;
    let rest = rest.strip_suffix(".parts").unwrap_or(rest);
    let rest = rest.strip_suffix(".incomplete")?;
    if rest.is_empty() {
        return Some("");
    }
    rest.strip_prefix('.')
}

/// Removes the partial downloads of `etag` in `dir` except `keep`'s and those
/// of the holder the lease file names now (a live holder's). The directory is
/// listed before the lease is read: a holder creates its lease before its file.
fn remove_stale_partials(dir: &Path, etag: &str, lease_path: &Path, keep: Option<&str>) -> usize {
    let names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| partial_token(n, etag).is_some())
        .collect();
    let lease = std::fs::read_to_string(lease_path).unwrap_or_default();
    let live = live_token(&lease);
    if keep.is_none() && is_released(&lease) {
        // The blob is here: nobody will resume the released download.
        remove_if(lease_path, |c| c == lease);
    }
    let mut removed = 0;
    for n in names {
        let t = partial_token(&n, etag);
        if t.is_some() && (t == live || t == keep) {
            continue;
        }
        if std::fs::remove_file(dir.join(&n)).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The temp file of the lease holder: `<etag>.<token>.incomplete`. A holder
/// that took a stale lease over adopts the dead holder's file (and its range
/// record); every other partial of the blob is litter now (its holder lost
/// the lease) and goes.
fn prepare_partial(dir: &Path, etag: &str, token: &str, took_over: Option<&str>, lease_path: &Path) -> PathBuf {
    let mine = dir.join(format!("{etag}.{token}.incomplete"));
    if let Some(old) = took_over.filter(|t| is_token(t)) {
        let old = dir.join(format!("{etag}.{old}.incomplete"));
        if !mine.exists() && std::fs::rename(&old, &mine).is_ok() {
            let _ = std::fs::rename(parts_of(&old), parts_of(&mine));
        }
    }
    remove_stale_partials(dir, etag, lease_path, Some(token));
    if !mine.exists() {
        // A range record whose file is gone says nothing.
        let _ = std::fs::remove_file(parts_of(&mine));
    }
    mine
}

/// Moves a corrupt blob to `blobs/<etag>.corrupt` (kept for inspection, replacing
/// an earlier one; safe to delete), so that it is downloaded again.
fn set_aside(blob: &Path, dir: &Path, etag: &str) -> std::io::Result<()> {
    match std::fs::rename(blob, dir.join(format!("{etag}.corrupt"))) {
        // Another agent set it aside first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn is_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Waits for, or takes, the blob's lease and downloads it. A lease lost to a
/// takeover (we were paused past `stale_after`) is not an error: we wait again.
#[allow(clippy::too_many_arguments)]
async fn fetch_blob(
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
    if size > MAX_FILE_SIZE {
        return Err(PrewarmError::Size { path: item.path.clone(), expected: MAX_FILE_SIZE, actual: size });
    }
    let blob = paths.blob(&etag);
    let dir = paths.blobs();
    let lease_path = dir.join(format!("{etag}.lease"));
    let url = hub.file_url(repo, commit, &item.path);
    let mut lost = 0;
    // A blob in place before this prewarm is kept only if the completion record
    // vouches for it or it hashes right; one that appears later was published
    // (verified) by another agent while we waited.
    let mut first = true;
    loop {
        if std::mem::take(&mut first) && present(&blob, size) {
            let (p, rec, path, e) = (paths.clone(), found.record.clone(), item.path.clone(), entry.clone());
            let state = blocking(move || check_present_blob(&p, rec.as_ref(), &path, &e)).await;
            match state.map_err(|e| io(&blob, e))? {
                PresentBlob::Recorded => {}
                PresentBlob::Sound { ctime } => {
                    found.hashed.lock().unwrap_or_else(|p| p.into_inner()).insert(etag.clone(), ctime);
                }
                PresentBlob::Corrupt { actual } => {
                    tracing::warn!(repo, path = %item.path, blob = %etag, %actual, "corrupt blob: fetching it again");
                    set_aside(&blob, &dir, &etag).map_err(|e| io(&blob, e))?;
                    found.repaired.lock().unwrap_or_else(|p| p.into_inner()).push(item.path.clone());
                    continue;
                }
            }
        }
        if present(&blob, size) {
            // A partial of a present blob whose holder no longer holds the lease
            // would mark the model incomplete forever.
            let (d, e, l) = (dir.clone(), etag.clone(), lease_path.clone());
            if partials || lost > 0 {
                let _ = blocking(move || Ok(remove_stale_partials(&d, &e, &l, None))).await;
            }
            progress.bytes_done.fetch_add(size, Ordering::SeqCst);
            return Ok(());
        }
        let (b, l) = (blob.clone(), lease_path.clone());
        let (hb, stale) = (o.heartbeat, o.stale_after);
        let got = tokio::task::spawn_blocking(move || acquire(&l, hb, stale, until, || present(&b, size)))
            .await
            .map_err(|e| io(&blob, e))?
            .map_err(|e| io(&blob, e))?;
        let lease = match got {
            Acquired::Done => continue,
            Acquired::Held(l) => l,
        };
        if present(&blob, size) {
            lease.finish();
            continue;
        }
        let mine = {
            let (d, e, lp) = (dir.clone(), etag.clone(), lease_path.clone());
            let (token, took) = (lease.token().to_string(), lease.took_over().map(str::to_string));
            blocking(move || Ok(prepare_partial(&d, &e, &token, took.as_deref(), &lp)))
                .await
                .map_err(|e| io(&dir, e))?
        };
        let mut last = None;
        let mut outcome = None;
        for _ in 0..ATTEMPTS {
            let r = download(
                hub,
                repo,
                commit,
                &url,
                &blob,
                &mine,
                &etag,
                size,
                entry.lfs_sha256.is_some(),
                o,
                progress,
                &lease,
            )
            .await;
            match r {
                Ok(()) => {
                    outcome = Some(Ok(()));
                    break;
                }
                Err(
                    e @ (PrewarmError::Hash { .. }
                    | PrewarmError::Hub(_)
                    | PrewarmError::Mismatch { .. }
                    | PrewarmError::TooLong { .. }
                    | PrewarmError::TooManyRanges { .. }
                    | PrewarmError::LeaseLost { .. }),
                ) => {
                    outcome = Some(Err(e));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let outcome =
            outcome.unwrap_or_else(|| Err(last.unwrap_or(PrewarmError::Stalled { path: url.clone(), stall: o.stall })));
        match outcome {
            Err(PrewarmError::LeaseLost { path }) => {
                drop(lease);
                lost += 1;
                if lost > ATTEMPTS {
                    return Err(PrewarmError::LeaseLost { path });
                }
            }
            // Stalls, short bodies, I/O: the partial is a valid prefix; dropping
            // the lease unfinished marks it released, so the next run resumes it.
            r @ Err(PrewarmError::Stalled { .. } | PrewarmError::Size { .. } | PrewarmError::Io { .. }) => {
                drop(lease);
                return r;
            }
            r => {
                lease.finish();
                return r;
            }
        }
    }
}

/// One attempt: resumes `mine` (our partial download of this blob) if there
/// is one, verifies, publishes while the lease is still ours.
#[allow(clippy::too_many_arguments)]
async fn download(
    hub: &Hub,
    repo: &str,
    commit: &str,
    url: &str,
    blob: &Path,
    mine: &Path,
    etag: &str,
    size: u64,
    lfs: bool,
    o: &Options,
    progress: &Progress,
    lease: &Lease,
) -> Result<(), PrewarmError> {
    let stall = o.stall;
    let lost = lease.lost_flag();
    let lost_err = || PrewarmError::LeaseLost { path: url.into() };
    let dir = blob.parent().unwrap_or(Path::new("."));
    let mine = mine.to_path_buf();
    if !lease.still_mine() {
        return Err(lost_err());
    }
    if lfs && o.ranges > 1 && size >= o.range_min {
        match ranged(hub, repo, commit, etag, url, &mine, size, o, progress, &lost).await {
            Ok(sha) => return publish_checked(&mine, blob, etag, size, &sha, url, lease),
            Err(Ranged::Unsupported) => {
                // The server ignores ranges (olah does): one stream from the start.
                let _ = std::fs::remove_file(&mine);
                let _ = std::fs::remove_file(parts_of(&mine));
            }
            Err(Ranged::Failed(e)) => return Err(e),
        }
    } else if parts_of(&mine).exists() {
        // Left by a ranged download: its length says nothing about a prefix.
        let _ = std::fs::remove_file(&mine);
        let _ = std::fs::remove_file(parts_of(&mine));
    }
    let mut offset = std::fs::metadata(&mine).map(|m| m.len()).unwrap_or(0);
    if offset > size {
        // Longer than the file: not a prefix of it.
        let _ = std::fs::remove_file(&mine);
        offset = 0;
    }
    let mut hasher = sha2::Sha256::new();
    if offset > 0 && lfs {
        // Hash the prefix in bounded chunks (it can be hundreds of GB).
        let m = mine.clone();
        hasher = blocking(move || {
            let mut h = sha2::Sha256::new();
            let mut f = std::fs::File::open(&m)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = offset;
            while left > 0 {
                let want = (left.min(buf.len() as u64)) as usize;
                let n = std::io::Read::read(&mut f, &mut buf[..want])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                h.update(&buf[..n]);
                left -= n as u64;
            }
            Ok(h)
        })
        .await
        .map_err(|e| io(&mine, e))?;
    }
    let mut headers = HeaderMap::new();
    if offset > 0 {
        if let Ok(v) = format!("bytes={offset}-").parse() {
            headers.insert(RANGE, v);
        }
    }
    let resp = hub.get(url, headers, repo).await?;
    check_answer(&resp, url, commit, etag, size, lfs)?;
    if offset > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
        // The server ignored the range (olah does): start over.
        offset = 0;
        hasher = sha2::Sha256::new();
    }
    if resp.content_length().is_some_and(|n| n > size - offset) {
        let _ = std::fs::remove_file(&mine);
        return Err(PrewarmError::TooLong { path: url.into(), expected: size });
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&mine)
        .await
        .map_err(|e| io(&mine, e))?;
    file.set_len(offset).await.map_err(|e| io(&mine, e))?;
    let mut f = file.into_std().await;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(offset)).map_err(|e| io(&mine, e))?;
    let mut file = tokio::fs::File::from_std(f);
    let mut written = offset;
    let mut body = resp.bytes_stream();
    loop {
        let chunk = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => return Err(PrewarmError::Stalled { path: url.into(), stall }),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(PrewarmError::Io { path: url.into(), reason: e.to_string() }),
            Ok(Some(Ok(c))) => c,
        };
        if lost.load(Ordering::SeqCst) {
            return Err(lost_err());
        }
        if chunk.len() as u64 > size - written {
            // Never more than the listing says: an endless body ends here.
            drop(file);
            let _ = std::fs::remove_file(&mine);
            return Err(PrewarmError::TooLong { path: url.into(), expected: size });
        }
        file.write_all(&chunk).await.map_err(|e| io(&mine, e))?;
        if lfs {
            hasher.update(&chunk);
        }
        written += chunk.len() as u64;
        progress.bytes_done.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        progress.downloaded.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    file.sync_all().await.map_err(|e| io(&mine, e))?;
    drop(file);
    if written != size {
        return Err(PrewarmError::Size { path: url.into(), expected: size, actual: written });
    }
    let actual = if lfs {
        hasher.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()
    } else {
        hf_cache::check::git_blob_sha1(&mine).map_err(|e| io(&mine, e))?
    };
    if actual != etag {
        let _ = std::fs::remove_file(&mine);
        return Err(PrewarmError::Hash { path: url.into(), expected: etag.into(), actual });
    }
    if !lease.still_mine() {
        // We were paused and another agent holds the blob now: it publishes.
        let _ = std::fs::remove_file(&mine);
        return Err(lost_err());
    }
    std::fs::rename(&mine, blob).map_err(|e| io(blob, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

/// Verifies a finished temp file (size; `sha256` when the caller hashed it)
/// and publishes it as the blob.
fn publish_checked(
    mine: &Path,
    blob: &Path,
    etag: &str,
    size: u64,
    sha256: &str,
    url: &str,
    lease: &Lease,
) -> Result<(), PrewarmError> {
    let len = std::fs::metadata(mine).map_err(|e| io(mine, e))?.len();
    if len != size {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(PrewarmError::Size { path: url.into(), expected: size, actual: len });
    }
    if sha256 != etag {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(PrewarmError::Hash { path: url.into(), expected: etag.into(), actual: sha256.into() });
    }
    if !lease.still_mine() {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(PrewarmError::LeaseLost { path: url.into() });
    }
    // The record goes first: a crash after it costs a re-download, never a stray file.
    let _ = std::fs::remove_file(parts_of(mine));
    std::fs::rename(mine, blob).map_err(|e| io(blob, e))?;
    let dir = blob.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

/// Runs file I/O off the async threads (NFS writes and COMMITs can block for long).
async fn blocking<T: Send + 'static>(op: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(op).await.map_err(std::io::Error::other).and_then(|r| r)
}

/// Bytes a range download gathers before one write.
const WRITE_BUFFER: usize = 4 << 20;

/// The record of finished ranges beside a ranged temp file.
fn parts_of(tmp: &Path) -> PathBuf {
    let mut s = tmp.as_os_str().to_owned();
    s.push(".parts");
    PathBuf::from(s)
}

/// Why a ranged download did not finish.
enum Ranged {
    /// The server answered a range with the whole file.
    Unsupported,
    Failed(PrewarmError),
}

/// Finished ranges and the hasher's wake-up.
struct RangeState {
    done: Vec<bool>,
    failed: bool,
}

/// Fetches `size` bytes of `url` into `mine` as `o.ranges` parallel byte
/// ranges of `o.range_size`. A range counts as done only once its bytes are
/// on disk (fdatasync) and its index is appended to the `.parts` file, so a
/// crash resumes with the finished ranges. sha256 is computed while the
/// download runs, following the finished prefix in order. Returns the sha256.
#[allow(clippy::too_many_arguments)]
async fn ranged(
    hub: &Hub,
    repo: &str,
    commit: &str,
    etag: &str,
    url: &str,
    mine: &Path,
    size: u64,
    o: &Options,
    progress: &Progress,
    lost: &std::sync::atomic::AtomicBool,
) -> Result<String, Ranged> {
    use std::os::unix::fs::FileExt;
    let fail = |e: PrewarmError| Ranged::Failed(e);
    let chunk = o.range_size.max(1 << 20);
    if size.div_ceil(chunk) > MAX_RANGES {
        return Err(fail(PrewarmError::TooManyRanges { path: url.into(), size, range: chunk, max: MAX_RANGES }));
    }
    let n = size.div_ceil(chunk) as usize;
    let parts_path = parts_of(mine);
    let mut done = vec![false; n];
    // The first line says how the file was cut; a record of other cuts (another
    // --range-size, another file size) says nothing about these ranges.
    let header = format!("ranges {chunk} {size}");
    let recorded = std::fs::read_to_string(&parts_path).ok();
    match recorded.as_deref().and_then(|t| t.split_once('\n')) {
        Some((h, rest)) if h == header => {
            for line in rest.lines() {
                if let Some(d) = line.trim().parse::<usize>().ok().and_then(|i| done.get_mut(i)) {
                    *d = true;
                }
            }
        }
        _ => {
            let _ = std::fs::remove_file(mine);
            std::fs::write(&parts_path, format!("{header}\n")).map_err(|e| fail(io(&parts_path, e)))?;
        }
    }
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(mine)
            .map_err(|e| fail(io(mine, e)))?,
    );
    let parts = Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&parts_path)
            .map_err(|e| fail(io(&parts_path, e)))?,
    ));
    let range_of = |i: usize| ((i as u64).saturating_mul(chunk), (i as u64 + 1).saturating_mul(chunk).min(size));
    let already: u64 = (0..n).filter(|&i| done[i]).map(|i| range_of(i).1 - range_of(i).0).sum();
    progress.bytes_done.fetch_add(already, Ordering::SeqCst);
    let todo: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
    let state = Arc::new((std::sync::Mutex::new(RangeState { done, failed: false }), std::sync::Condvar::new()));
    // However this function ends (an error, or its future dropped), the hasher is released.
    struct Release(Arc<(std::sync::Mutex<RangeState>, std::sync::Condvar)>);
    impl Drop for Release {
        fn drop(&mut self) {
            let (m, cv) = &*self.0;
            m.lock().unwrap_or_else(|p| p.into_inner()).failed = true;
            cv.notify_all();
        }
    }

    // The hasher: reads finished ranges in order (from the page cache, mostly).
    let (hs, hf) = (state.clone(), file.clone());
    let hasher = tokio::task::spawn_blocking(move || -> Option<std::io::Result<String>> {
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..n {
            {
                let (m, cv) = &*hs;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                while !g.done[i] && !g.failed {
                    g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                if g.failed {
                    return None;
                }
            }
            let (mut at, end) = ((i as u64).saturating_mul(chunk), (i as u64 + 1).saturating_mul(chunk).min(size));
            while at < end {
                let want = ((end - at) as usize).min(buf.len());
                if let Err(e) = hf.read_exact_at(&mut buf[..want], at) {
                    return Some(Err(e));
                }
                h.update(&buf[..want]);
                at += want as u64;
            }
        }
        Some(Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect()))
    });

    let release = Release(state.clone());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let unsupported = std::sync::atomic::AtomicBool::new(false);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let completed_now = AtomicU64::new(0);
    // Writes leave the async threads (NFS writes and COMMITs can block for long).
    let write_at = |chunks: Vec<bytes::Bytes>, at: u64| {
        let f = file.clone();
        async move {
            blocking(move || {
                let mut at = at;
                for c in chunks {
                    f.write_all_at(&c, at)?;
                    at += c.len() as u64;
                }
                Ok(())
            })
            .await
        }
    };
    let work = || async {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let k = next.fetch_add(1, Ordering::SeqCst);
            let Some(&i) = todo.get(k) else { return Ok(()) };
            let (start, end) = range_of(i);
            let mut last = None;
            let mut ok = false;
            for _ in 0..ATTEMPTS {
                if unsupported.load(Ordering::SeqCst) {
                    return Err(Ranged::Unsupported);
                }
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut headers = HeaderMap::new();
                if let Ok(v) = format!("bytes={start}-{}", end - 1).parse() {
                    headers.insert(RANGE, v);
                }
                let resp = match hub.get(url, headers, repo).await {
                    Ok(r) => r,
                    Err(e) => return Err(fail(e.into())),
                };
                if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                    unsupported.store(true, Ordering::SeqCst);
                    return Err(Ranged::Unsupported);
                }
                check_answer(&resp, url, commit, etag, size, true).map_err(fail)?;
                let mut at = start;
                // Chunks received but not yet written (no copy), starting at `at - pending_len`.
                let (mut pending, mut pending_len): (Vec<bytes::Bytes>, usize) = (Vec::new(), 0);
                let mut body = resp.bytes_stream();
                let outcome: Result<(), PrewarmError> = loop {
                    match tokio::time::timeout(o.stall, body.next()).await {
                        Err(_) => break Err(PrewarmError::Stalled { path: url.into(), stall: o.stall }),
                        Ok(None) => break Ok(()),
                        Ok(Some(Err(e))) => break Err(PrewarmError::Io { path: url.into(), reason: e.to_string() }),
                        Ok(Some(Ok(c))) => {
                            if lost.load(Ordering::SeqCst) {
                                break Err(PrewarmError::LeaseLost { path: url.into() });
                            }
                            if at + c.len() as u64 > end {
                                break Err(PrewarmError::Size {
                                    path: url.into(),
                                    expected: end - start,
                                    actual: at + c.len() as u64 - start,
                                });
                            }
                            at += c.len() as u64;
                            progress.bytes_done.fetch_add(c.len() as u64, Ordering::SeqCst);
                            progress.downloaded.fetch_add(c.len() as u64, Ordering::SeqCst);
                            pending_len += c.len();
                            pending.push(c);
                            if pending_len >= WRITE_BUFFER {
                                let offset = at - pending_len as u64;
                                pending_len = 0;
                                if let Err(e) = write_at(std::mem::take(&mut pending), offset).await {
                                    break Err(io(mine, e));
                                }
                            }
                        }
                    }
                };
                let outcome = match (outcome, pending.is_empty()) {
                    (Ok(()), false) => write_at(pending, at - pending_len as u64).await.map_err(|e| io(mine, e)),
                    (r, _) => r,
                };
                let got = at - start;
                match outcome {
                    Ok(()) if at == end => {
                        ok = true;
                        break;
                    }
                    Err(e @ PrewarmError::LeaseLost { .. }) => {
                        progress.bytes_done.fetch_sub(got, Ordering::SeqCst);
                        return Err(fail(e));
                    }
                    Ok(()) => last = Some(PrewarmError::Size { path: url.into(), expected: end - start, actual: got }),
                    Err(e) => last = Some(e),
                }
                progress.bytes_done.fetch_sub(got, Ordering::SeqCst);
            }
            if !ok {
                return Err(fail(last.unwrap_or(PrewarmError::Stalled { path: url.into(), stall: o.stall })));
            }
            // Durable first, then recorded: a recorded range is never a hole.
            let f = file.clone();
            blocking(move || f.sync_data()).await.map_err(|e| fail(io(mine, e)))?;
            {
                let mut p = parts.lock().unwrap_or_else(|p| p.into_inner());
                std::io::Write::write_all(&mut *p, format!("{i}\n").as_bytes())
                    .map_err(|e| fail(io(&parts_path, e)))?;
            }
            completed_now.fetch_add(end - start, Ordering::SeqCst);
            let (m, cv) = &*state;
            m.lock().unwrap_or_else(|p| p.into_inner()).done[i] = true;
            cv.notify_all();
        }
    };
    // The first failure stops the other workers after their current range.
    let worker = || async {
        let r = work().await;
        if r.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        r
    };
    let workers = o.ranges.min(todo.len()).max(1);
    let results = futures::future::join_all((0..workers).map(|_| worker())).await;
    let err = results.into_iter().find_map(Result::err);
    if err.is_some() {
        let (m, cv) = &*state;
        m.lock().unwrap_or_else(|p| p.into_inner()).failed = true;
        cv.notify_all();
    }
    let hashed = hasher.await.map_err(|e| fail(io(mine, e)))?;
    if let Some(e) = err {
        // The next attempt counts the recorded ranges again.
        progress.bytes_done.fetch_sub(already + completed_now.load(Ordering::SeqCst), Ordering::SeqCst);
        return Err(e);
    }
    drop(release);
    let f = file.clone();
    blocking(move || f.sync_all()).await.map_err(|e| fail(io(mine, e)))?;
    match hashed {
        Some(Ok(sha)) => Ok(sha),
        Some(Err(e)) => Err(fail(io(mine, e))),
        None => Err(fail(io(mine, "hashing stopped"))),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names() {
        let e = "ab".repeat(32);
        assert_eq!(partial_token(&format!("{e}.0a1b.incomplete"), &e), Some("0a1b"));
        assert_eq!(partial_token(&format!("{e}.0a1b.incomplete.parts"), &e), Some("0a1b"));
        assert_eq!(partial_token(&format!("{e}.incomplete"), &e), Some(""));
        assert_eq!(partial_token(&e, &e), None);
        assert_eq!(partial_token(&format!("{e}.lease"), &e), None);
        assert_eq!(partial_token(&format!("{e}x.1.incomplete"), &e), None);
    }

    #[test]
    fn partials_are_adopted_only_from_a_stale_takeover_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let e = "cd".repeat(32);
        let lease = d.path().join(format!("{e}.lease"));
        let touch = |n: &str, body: &[u8]| std::fs::write(d.path().join(n), body).unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|x| x.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        // A fresh lease adopts nothing: an older partial may belong to a paused holder.
        touch(&format!("{e}.aaaa.incomplete"), b"old");
        touch(&format!("{e}.aaaa.incomplete.parts"), b"ranges 1 3\n");
        std::fs::write(&lease, "aimodel-lease 1\ntoken bbbb\n").unwrap();
        let mine = prepare_partial(d.path(), &e, "bbbb", None, &lease);
        assert_eq!(mine, d.path().join(format!("{e}.bbbb.incomplete")));
        assert!(!mine.exists());
        assert_eq!(names(), vec![format!("{e}.lease")]);
        // After a stale takeover of cccc's lease, cccc's partial and record are ours.
        touch(&format!("{e}.cccc.incomplete"), b"prefix");
        touch(&format!("{e}.cccc.incomplete.parts"), b"ranges 1 6\n0\n");
        touch(&format!("{e}.dddd.incomplete"), b"other");
        std::fs::write(&lease, "aimodel-lease 1\ntoken eeee\n").unwrap();
        let mine = prepare_partial(d.path(), &e, "eeee", Some("cccc"), &lease);
        assert_eq!(std::fs::read(&mine).unwrap(), b"prefix");
        assert_eq!(
            names(),
            vec![format!("{e}.eeee.incomplete"), format!("{e}.eeee.incomplete.parts"), format!("{e}.lease")]
        );
        // Beside a present blob: the live holder's partial stays, the rest goes.
        touch(&format!("{e}.ffff.incomplete"), b"dead");
        assert_eq!(remove_stale_partials(d.path(), &e, &lease, None), 1);
        assert!(mine.exists());
        std::fs::remove_file(&lease).unwrap();
        assert_eq!(remove_stale_partials(d.path(), &e, &lease, None), 2);
        assert_eq!(names(), Vec::<String>::new());
    }

    #[test]
    fn globs() {
        assert!(glob("*.safetensors", "model.safetensors"));
        assert!(glob("*.json", "tokenizer/vocab.json"));
        assert!(!glob("*.bin", "model.safetensors"));
        assert!(glob("model-?????-of-*.safetensors", "model-00001-of-00002.safetensors"));
        let mut o = Options::new(PathBuf::from("/x"));
        o.include = vec!["*.json".into()];
        o.exclude = vec!["*/vocab.json".into()];
        assert!(wanted(&o, "config.json"));
        assert!(!wanted(&o, "tokenizer/vocab.json"));
        assert!(!wanted(&o, "model.safetensors"));
    }
}
