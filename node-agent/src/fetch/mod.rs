//! One content-addressed blob into a directory shared by many nodes, fetched
//! once across all of them: a per-blob lease (O_EXCL, heartbeat, stale
//! takeover: `crate::lease`), a download into `<name>.<token>.incomplete`
//! that survives a crash and is resumed (a single stream, or parallel byte
//! ranges recorded in `.parts`), the content hashed and compared with the
//! blob's digest, and only then renamed to its name — while the lease is
//! still ours. The HF prewarm (`crate::prewarm`) and the Ollama prewarm
//! (`crate::ollama`) both fetch through here; what differs (the URL, the
//! HTTP client, answer checks) comes in through [`BlobSource`].

mod blob;
mod partial;
mod ranged;
mod single;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use reqwest::header::HeaderMap;

pub use blob::fetch_blob;
pub use partial::set_aside;

/// Largest blob accepted from any listing or manifest (1 TiB).
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Most ranges one file is cut into (bounds the record of finished ranges).
pub const MAX_RANGES: u64 = 1 << 20;

/// Errors of fetching one blob.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server (hub, registry) refused or could not be reached; not retried here.
    #[error(transparent)]
    Source(Box<dyn std::error::Error + Send + Sync>),
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
    #[error("{path}: {size} bytes in ranges of {range} bytes would be more than {max} ranges")]
    TooManyRanges { path: String, size: u64, range: u64, max: u64 },
}

pub(crate) fn io(path: &Path, e: impl std::fmt::Display) -> FetchError {
    FetchError::Io { path: path.display().to_string(), reason: e.to_string() }
}

/// How a blob's name is derived from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// sha256 of the content (HF LFS files, Ollama blobs); may be fetched in ranges.
    Sha256,
    /// git's blob sha1 (`blob <len>\0` + content: HF regular files).
    GitSha1,
}

/// One blob to fetch: `url` → `dir/name`, `size` bytes hashing to `digest`.
#[derive(Debug, Clone)]
pub struct BlobJob {
    pub url: String,
    /// The blob directory (must be a real directory, checked by the caller).
    pub dir: PathBuf,
    /// The file name in `dir` (already validated: hex digests only).
    pub name: String,
    /// The expected digest, lowercase hex.
    pub digest: String,
    pub hash: HashKind,
    pub size: u64,
    /// What messages call it (the file's path in the repo, the layer digest).
    pub label: String,
}

/// The server side of a fetch.
pub trait BlobSource: Send + Sync {
    /// GET `url` with `headers` (a `Range`), with the client's own retries.
    fn get(&self, url: &str, headers: HeaderMap) -> impl Future<Output = Result<reqwest::Response, FetchError>> + Send;
    /// Checks what an answer says about itself before any byte is written.
    fn check(&self, _resp: &reqwest::Response, _url: &str) -> Result<(), FetchError> {
        Ok(())
    }
}

/// How blobs are fetched.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub heartbeat: Duration,
    pub stale_after: Duration,
    /// A download that sees no bytes for this long is retried.
    pub stall: Duration,
    /// Byte ranges fetched at once for one large sha256 blob (1: a single stream).
    pub ranges: usize,
    /// Blobs at least this large are fetched in ranges.
    pub range_min: u64,
    /// Size of one range.
    pub range_size: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            heartbeat: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            stall: Duration::from_secs(60),
            ranges: 4,
            range_min: 128 << 20,
            range_size: 32 << 20,
        }
    }
}

/// Live progress, readable from another task.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub downloaded: AtomicU64,
}

/// Whether `blob` is a file of `size` bytes.
pub fn present(blob: &Path, size: u64) -> bool {
    std::fs::metadata(blob).is_ok_and(|m| m.len() == size)
}

/// Runs file I/O off the async threads (NFS writes and COMMITs can block for long).
pub async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(op).await.map_err(std::io::Error::other).and_then(|r| r)
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
