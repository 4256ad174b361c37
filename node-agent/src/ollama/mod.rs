//! Prewarming Ollama models (`ollama://<name>[:<tag>]`) into an Ollama store
//! on the shared export ([`hf_cache::ollama`] has the layout and the contract):
//! the manifest from the registry (or a mirror), every blob fetched once
//! across nodes through [`crate::fetch`] (leases, resumable partials, sha256
//! checked against the digest before the rename), and the manifest written
//! last, whole, byte for byte as served, under the model's canonical host.

mod registry;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_cache::ollama::{Manifest, ManifestError, ModelName, Store};
use hf_cache::safefs::{ensure_dir, ensure_dir_at, write_atomic_at};

use crate::fetch::{fetch_blob, present, BlobJob, FetchError, FetchOptions, HashKind, Progress};
use crate::lease::{acquire, Acquired};
use crate::prewarm::{blobs_with_partials, AbortAll};
use registry::RegistryBlob;
pub use registry::{Registry, RegistryError, DEFAULT_REGISTRY};

/// Errors of an Ollama prewarm.
#[derive(Debug, thiserror::Error)]
pub enum OllamaError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("ollama://{name}: the registry's manifest is refused: {source}; nothing was published")]
    Manifest { name: String, source: ManifestError },
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("ollama://{name}: not finished within the deadline of {deadline:?} (--deadline)")]
    Deadline { name: String, deadline: Duration },
}

fn io(path: &Path, e: impl std::fmt::Display) -> OllamaError {
    OllamaError::Io { path: path.display().to_string(), reason: e.to_string() }
}

/// Options of an Ollama prewarm.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The store (`OLLAMA_MODELS`).
    pub store: PathBuf,
    /// Blobs downloaded at once.
    pub concurrency: usize,
    pub fetch: FetchOptions,
    pub deadline: Duration,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSummary {
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    pub blobs: usize,
    pub bytes: u64,
    /// Bytes this process fetched.
    pub downloaded: u64,
    pub elapsed: Duration,
}

/// Prewarms `name` into `o.store`, within `o.deadline`.
pub async fn pull(
    registry: &Registry,
    name: &ModelName,
    o: &PullOptions,
    progress: Arc<Progress>,
) -> Result<PullSummary, OllamaError> {
    match tokio::time::timeout(o.deadline, pull_inner(registry, name, o, progress)).await {
        Ok(r) => r,
        Err(_) => Err(OllamaError::Deadline { name: name.short(), deadline: o.deadline }),
    }
}

async fn pull_inner(
    registry: &Registry,
    name: &ModelName,
    o: &PullOptions,
    progress: Arc<Progress>,
) -> Result<PullSummary, OllamaError> {
    let started = Instant::now();
    let until = started.checked_add(o.deadline);
    let store = Store::new(&o.store);
    let bytes = registry.manifest(name).await?;
    let manifest = Manifest::parse(&bytes).map_err(|source| OllamaError::Manifest { name: name.short(), source })?;
    let blobs = manifest.blobs();
    let total = blobs.iter().try_fold(0u64, |t, l| t.checked_add(l.size)).ok_or_else(|| OllamaError::Io {
        path: name.short(),
        reason: "the listed sizes add up past 2^64 bytes".into(),
    })?;
    progress.bytes_total.store(total, Ordering::SeqCst);
    // The store and its blobs/ must be real directories (no tenant's link leads the writes elsewhere).
    let blobs_dir = store.blobs_dir();
    {
        let root = ensure_dir(store.root()).map_err(|e| io(store.root(), e))?;
        ensure_dir_at(&root, std::ffi::OsStr::new("blobs")).map_err(|e| io(&blobs_dir, e))?;
    }
    // Held until the manifest is written: gc leaves unreferenced blobs alone meanwhile.
    let pull_lease = {
        let path = blobs_dir.join(format!("pull-{}.lease", hf_cache::safefs::random_hex(8)));
        let (hb, stale) = (o.fetch.heartbeat, o.fetch.stale_after);
        let p = path.clone();
        match tokio::task::spawn_blocking(move || acquire(&p, hb, stale, until, || false)).await {
            Ok(Ok(Acquired::Held(l))) => l,
            Ok(Ok(Acquired::Done)) => return Err(io(&path, "unexpected: a fresh pull lease was already done")),
            Ok(Err(e)) => return Err(io(&path, e)),
            Err(e) => return Err(io(&path, e)),
        }
    };
    let partials = Arc::new(blobs_with_partials(&blobs_dir));
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let src = RegistryBlob { registry: registry.clone(), name: name.clone() };
    let mut jobs = AbortAll(Vec::new());
    for l in &blobs {
        let job = BlobJob {
            url: registry.blob_url(name, &l.digest),
            dir: blobs_dir.clone(),
            name: l.digest.file_name(),
            digest: l.digest.hex().to_string(),
            hash: HashKind::Sha256,
            size: l.size,
            label: l.digest.to_string(),
        };
        let (src, fetch, progress, sem) = (src.clone(), o.fetch.clone(), progress.clone(), sem.clone());
        let seen = partials.contains(&job.name);
        jobs.0.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            fetch_blob(&src, &job, &fetch, &progress, until, seen).await
        }));
    }
    for j in jobs.0.iter_mut() {
        // The first error drops `jobs` (and their leases): nothing is published for this model.
        j.await.map_err(|e| io(&blobs_dir, e))??;
    }
    drop(jobs);
    // Blobs are published; a gc may have taken one that was there before we
    // started (it checks for our pull lease after moving a blob aside): look again.
    for l in &blobs {
        if !present(&store.blob_path(&l.digest), l.size) {
            return Err(io(&store.blob_path(&l.digest), "removed while the model was pulled; run the prewarm again"));
        }
    }
    write_manifest(&store, name, &bytes)?;
    pull_lease.finish();
    remove_dead_pull_leases(&blobs_dir, o.fetch.stale_after * 3);
    Ok(PullSummary {
        manifest_digest: format!("sha256:{}", crate::fetch::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes))),
        blobs: blobs.len(),
        bytes: total,
        downloaded: progress.downloaded.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
    })
}

/// Removes the leases of pulls that died (killed, a node lost) — pull leases,
/// and blob leases beside a published blob — not rewritten for `older_than`
/// (three stale windows; live ones are rewritten every heartbeat, and a live
/// holder that loses one finds its blob published). Dead leases only hold
/// gc back while fresh, so this is tidying, not correctness.
fn remove_dead_pull_leases(blobs_dir: &Path, older_than: Duration) {
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(blobs_dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = e.metadata() else { continue };
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
        let Some(stem) = name.strip_suffix(".lease") else { continue };
        let dead_holder = stem.starts_with("pull-") || blobs_dir.join(stem).is_file();
        if dead_holder && meta.is_file() && age > older_than {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes the manifest last: `manifests/<host>/<ns>/<model>/` as real
/// directories, then the bytes under a temp name, fsync, rename.
fn write_manifest(store: &Store, name: &ModelName, bytes: &[u8]) -> Result<(), OllamaError> {
    let path = store.manifest_path(name);
    let err = |e: std::io::Error| io(&path, e);
    let mut dir = ensure_dir(store.root()).map_err(err)?;
    for part in ["manifests", &name.host, &name.namespace, &name.model] {
        dir = ensure_dir_at(&dir, std::ffi::OsStr::new(part)).map_err(err)?;
    }
    write_atomic_at(&dir, std::ffi::OsStr::new(&name.tag), bytes).map_err(err)
}

/// Checks `name` in the store (quick) and records it as warm for the driver
/// (`ollama/<name>` in `<HF_HOME>/aimodel/warm`), or drops its warm record
/// when it is not complete. Returns the check and the error of writing, if any.
pub fn record_if_warm(
    hub_dir: &Path,
    store: &Path,
    name: &ModelName,
) -> (hf_cache::ollama::Check, Option<std::io::Error>) {
    let check = Store::new(store).check(name);
    let state = hf_cache::state::StateDir::for_hub(hub_dir);
    let key = hf_cache::ollama::state_key(name);
    let err = if check.is_complete() {
        let rec = hf_cache::state::WarmRecord {
            repo: key,
            revision: name.tag.clone(),
            commit: check.manifest_digest.clone().unwrap_or_default(),
            bytes: check.bytes(),
            verified_at: hf_cache::state::unix_now(),
            node: hf_cache::state::node_name(),
        };
        state.write_warm(&rec).err()
    } else {
        state.remove_warm(&key).err()
    };
    (check, err)
}
