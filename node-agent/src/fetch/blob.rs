//! The lease loop around one blob: wait for it, or take its lease and fetch it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::partial::{prepare_partial, remove_stale_partials};
use super::{blocking, io, present, BlobJob, BlobSource, FetchError, FetchOptions, Progress, MAX_FILE_SIZE};
use crate::hub::ATTEMPTS;
use crate::lease::{acquire, Acquired};

/// Waits for, or takes, the blob's lease and downloads it; returns once
/// `job.dir/job.name` is a published blob of `job.size` bytes (ours or another
/// agent's). A blob already there with the right size is taken as it is (the
/// caller vets blobs it found before). A lease lost to a takeover (we were
/// paused past `stale_after`) is not an error: we wait again. `partials`:
/// the caller saw partial downloads or leases of this blob.
pub async fn fetch_blob<S: BlobSource>(
    src: &S,
    job: &BlobJob,
    o: &FetchOptions,
    progress: &Progress,
    until: Option<Instant>,
    partials: bool,
) -> Result<(), FetchError> {
    let size = job.size;
    if size > MAX_FILE_SIZE {
        return Err(FetchError::Size { path: job.label.clone(), expected: MAX_FILE_SIZE, actual: size });
    }
    let dir = job.dir.clone();
    let blob = dir.join(&job.name);
    let lease_path = dir.join(format!("{}.lease", job.name));
    let mut lost = 0;
    loop {
        if present(&blob, size) {
            // A partial of a present blob whose holder no longer holds the lease
            // would mark the model incomplete forever.
            let (d, e, l) = (dir.clone(), job.name.clone(), lease_path.clone());
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
            let (d, e, lp) = (dir.clone(), job.name.clone(), lease_path.clone());
            let (token, took) = (lease.token().to_string(), lease.took_over().map(str::to_string));
            blocking(move || Ok(prepare_partial(&d, &e, &token, took.as_deref(), &lp)))
                .await
                .map_err(|e| io(&dir, e))?
        };
        let mut last = None;
        let mut outcome = None;
        for _ in 0..ATTEMPTS {
            match super::single::download(src, job, &mine, o, progress, &lease).await {
                Ok(()) => {
                    outcome = Some(Ok(()));
                    break;
                }
                Err(
                    e @ (FetchError::Hash { .. }
                    | FetchError::Source(_)
                    | FetchError::Mismatch { .. }
                    | FetchError::TooLong { .. }
                    | FetchError::TooManyRanges { .. }
                    | FetchError::LeaseLost { .. }),
                ) => {
                    outcome = Some(Err(e));
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let outcome = outcome
            .unwrap_or_else(|| Err(last.unwrap_or(FetchError::Stalled { path: job.url.clone(), stall: o.stall })));
        match outcome {
            Err(FetchError::LeaseLost { path }) => {
                drop(lease);
                lost += 1;
                if lost > ATTEMPTS {
                    return Err(FetchError::LeaseLost { path });
                }
            }
            // Stalls, short bodies, I/O: the partial is a valid prefix; dropping
            // the lease unfinished marks it released, so the next run resumes it.
            r @ Err(FetchError::Stalled { .. } | FetchError::Size { .. } | FetchError::Io { .. }) => {
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
