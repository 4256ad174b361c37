//! One download attempt: ranged for large sha256 blobs, else one stream that
//! resumes our partial file; verified, then published while the lease is ours.

use std::path::Path;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use reqwest::header::{HeaderMap, RANGE};
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::partial::parts_of;
use super::ranged::{publish_checked, ranged, Ranged};
use super::{blocking, hex, io, BlobJob, BlobSource, FetchError, FetchOptions, HashKind, Progress};
use crate::lease::Lease;

/// One attempt: resumes `mine` (our partial download of this blob) if there
/// is one, verifies, publishes while the lease is still ours.
pub(super) async fn download<S: BlobSource>(
    src: &S,
    job: &BlobJob,
    mine: &Path,
    o: &FetchOptions,
    progress: &Progress,
    lease: &Lease,
) -> Result<(), FetchError> {
    let (url, size) = (job.url.as_str(), job.size);
    let sha256 = job.hash == HashKind::Sha256;
    let blob = job.dir.join(&job.name);
    let stall = o.stall;
    let lost = lease.lost_flag();
    let lost_err = || FetchError::LeaseLost { path: url.into() };
    let mine = mine.to_path_buf();
    if !lease.still_mine() {
        return Err(lost_err());
    }
    if sha256 && o.ranges > 1 && size >= o.range_min {
        match ranged(src, job, &mine, o, progress, &lost).await {
            Ok(sha) => return publish_checked(&mine, &blob, &job.digest, size, &sha, url, lease),
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
    if offset > 0 && sha256 {
        hasher = hash_prefix(&mine, offset).await?;
    }
    if offset == size {
        // Killed after the last byte and before the rename: nothing left to fetch
        // (a request for `bytes=<size>-` would be answered with the whole file).
        return publish_whole(job, &mine, hasher, lease);
    }
    let mut headers = HeaderMap::new();
    if offset > 0 {
        if let Ok(v) = format!("bytes={offset}-").parse() {
            headers.insert(RANGE, v);
        }
    }
    let resp = src.get(url, headers).await?;
    src.check(&resp, url)?;
    if offset > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
        // The server ignored the range (olah does): start over.
        offset = 0;
        hasher = sha2::Sha256::new();
    }
    if resp.content_length().is_some_and(|n| n > size - offset) {
        let _ = std::fs::remove_file(&mine);
        return Err(FetchError::TooLong { path: url.into(), expected: size });
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
            Err(_) => return Err(FetchError::Stalled { path: url.into(), stall }),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(FetchError::Io { path: url.into(), reason: e.to_string() }),
            Ok(Some(Ok(c))) => c,
        };
        if lost.load(Ordering::SeqCst) {
            return Err(lost_err());
        }
        if chunk.len() as u64 > size - written {
            // Never more than the listing says: an endless body ends here.
            drop(file);
            let _ = std::fs::remove_file(&mine);
            return Err(FetchError::TooLong { path: url.into(), expected: size });
        }
        file.write_all(&chunk).await.map_err(|e| io(&mine, e))?;
        if sha256 {
            hasher.update(&chunk);
        }
        written += chunk.len() as u64;
        progress.bytes_done.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        progress.downloaded.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    file.sync_all().await.map_err(|e| io(&mine, e))?;
    drop(file);
    if written != size {
        return Err(FetchError::Size { path: url.into(), expected: size, actual: written });
    }
    publish_whole(job, &mine, hasher, lease)
}

/// Verifies the whole temp file `mine` (sha256 from `hasher`, which has seen
/// every byte, or git's blob sha1 read from disk) and renames it to the blob
/// while the lease is still ours.
fn publish_whole(job: &BlobJob, mine: &Path, hasher: sha2::Sha256, lease: &Lease) -> Result<(), FetchError> {
    let url = job.url.as_str();
    let actual = if job.hash == HashKind::Sha256 {
        hex(&hasher.finalize())
    } else {
        hf_cache::check::git_blob_sha1(mine).map_err(|e| io(mine, e))?
    };
    if actual != job.digest {
        let _ = std::fs::remove_file(mine);
        return Err(FetchError::Hash { path: url.into(), expected: job.digest.clone(), actual });
    }
    if !lease.still_mine() {
        // We were paused and another agent holds the blob now: it publishes.
        let _ = std::fs::remove_file(mine);
        return Err(FetchError::LeaseLost { path: url.into() });
    }
    let blob = job.dir.join(&job.name);
    std::fs::rename(mine, &blob).map_err(|e| io(&blob, e))?;
    std::fs::File::open(&job.dir).and_then(|d| d.sync_all()).map_err(|e| io(&job.dir, e))
}

/// The sha256 state after the first `len` bytes of `path`, read in bounded
/// chunks (a resumed prefix can be hundreds of GB).
async fn hash_prefix(path: &Path, len: u64) -> Result<sha2::Sha256, FetchError> {
    let m = path.to_path_buf();
    blocking(move || {
        let mut h = sha2::Sha256::new();
        let mut f = std::fs::File::open(&m)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
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
    .map_err(|e| io(path, e))
}
