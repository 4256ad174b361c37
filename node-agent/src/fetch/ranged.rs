//! Parallel byte ranges of one large sha256 blob, recorded as they finish so
//! a crash resumes with the finished ranges; hashed in order as they land.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use reqwest::header::{HeaderMap, RANGE};
use sha2::Digest;

use super::partial::parts_of;
use super::{blocking, hex, io, BlobJob, BlobSource, FetchError, FetchOptions, Progress, MAX_RANGES};
use crate::hub::ATTEMPTS;
use crate::lease::Lease;

/// Verifies a finished temp file (size; `sha256` when the caller hashed it)
/// and publishes it as the blob.
pub(super) fn publish_checked(
    mine: &Path,
    blob: &Path,
    etag: &str,
    size: u64,
    sha256: &str,
    url: &str,
    lease: &Lease,
) -> Result<(), FetchError> {
    let len = std::fs::metadata(mine).map_err(|e| io(mine, e))?.len();
    if len != size {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(FetchError::Size { path: url.into(), expected: size, actual: len });
    }
    if sha256 != etag {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(FetchError::Hash { path: url.into(), expected: etag.into(), actual: sha256.into() });
    }
    if !lease.still_mine() {
        let _ = std::fs::remove_file(mine);
        let _ = std::fs::remove_file(parts_of(mine));
        return Err(FetchError::LeaseLost { path: url.into() });
    }
    // The record goes first: a crash after it costs a re-download, never a stray file.
    let _ = std::fs::remove_file(parts_of(mine));
    std::fs::rename(mine, blob).map_err(|e| io(blob, e))?;
    let dir = blob.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))
}

/// Bytes a range download gathers before one write.
const WRITE_BUFFER: usize = 4 << 20;

/// Why a ranged download did not finish.
pub(super) enum Ranged {
    /// The server answered a range with the whole file.
    Unsupported,
    Failed(FetchError),
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
pub(super) async fn ranged<S: BlobSource>(
    src: &S,
    job: &BlobJob,
    mine: &Path,
    o: &FetchOptions,
    progress: &Progress,
    lost: &std::sync::atomic::AtomicBool,
) -> Result<String, Ranged> {
    let (url, size) = (job.url.as_str(), job.size);
    use std::os::unix::fs::FileExt;
    let fail = |e: FetchError| Ranged::Failed(e);
    let chunk = o.range_size.max(1 << 20);
    let n = match usize::try_from(size.div_ceil(chunk)) {
        Ok(n) if size.div_ceil(chunk) <= MAX_RANGES => n,
        _ => return Err(fail(FetchError::TooManyRanges { path: url.into(), size, range: chunk, max: MAX_RANGES })),
    };
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
                let want = usize::try_from(end - at).map_or(buf.len(), |left| left.min(buf.len()));
                if let Err(e) = hf.read_exact_at(&mut buf[..want], at) {
                    return Some(Err(e));
                }
                h.update(&buf[..want]);
                at += want as u64;
            }
        }
        Some(Ok(hex(&h.finalize())))
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
                let resp = match src.get(url, headers).await {
                    Ok(r) => r,
                    Err(e) => return Err(fail(e)),
                };
                if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                    unsupported.store(true, Ordering::SeqCst);
                    return Err(Ranged::Unsupported);
                }
                src.check(&resp, url).map_err(fail)?;
                let mut at = start;
                // Chunks received but not yet written (no copy), starting at `at - pending_len`.
                let (mut pending, mut pending_len): (Vec<bytes::Bytes>, usize) = (Vec::new(), 0);
                let mut body = resp.bytes_stream();
                let outcome: Result<(), FetchError> = loop {
                    match tokio::time::timeout(o.stall, body.next()).await {
                        Err(_) => break Err(FetchError::Stalled { path: url.into(), stall: o.stall }),
                        Ok(None) => break Ok(()),
                        Ok(Some(Err(e))) => break Err(FetchError::Io { path: url.into(), reason: e.to_string() }),
                        Ok(Some(Ok(c))) => {
                            if lost.load(Ordering::SeqCst) {
                                break Err(FetchError::LeaseLost { path: url.into() });
                            }
                            if at + c.len() as u64 > end {
                                break Err(FetchError::Size {
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
                    Err(e @ FetchError::LeaseLost { .. }) => {
                        progress.bytes_done.fetch_sub(got, Ordering::SeqCst);
                        return Err(fail(e));
                    }
                    Ok(()) => last = Some(FetchError::Size { path: url.into(), expected: end - start, actual: got }),
                    Err(e) => last = Some(e),
                }
                progress.bytes_done.fetch_sub(got, Ordering::SeqCst);
            }
            if !ok {
                return Err(fail(last.unwrap_or(FetchError::Stalled { path: url.into(), stall: o.stall })));
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
