//! NFS-safe exclusion per blob: flock is a no-op on NFS mounted `nolock`, so a
//! lease is a file created with O_EXCL (atomic on NFS too), renewed by a
//! heartbeat that rewrites it; a waiter that sees the same content for
//! `stale_after` on its own clock takes it over.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A held lease; the heartbeat stops and the file goes when it is dropped.
pub struct Lease {
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn holder() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{} {} {:?}", host.trim(), std::process::id(), Instant::now())
}

fn try_create(path: &Path, content: &str) -> std::io::Result<bool> {
    match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(mut f) => {
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// The outcome of waiting for a lease.
pub enum Acquired {
    /// We hold it: do the work.
    Held(Lease),
    /// `done()` became true while we waited: someone else did the work.
    Done,
}

/// Takes the lease at `path`, or waits until `done()` holds. `heartbeat` is how
/// often the holder rewrites the file; `stale_after` how long a waiter accepts
/// an unchanged file before taking over.
pub fn acquire(
    path: &Path,
    heartbeat: Duration,
    stale_after: Duration,
    done: impl Fn() -> bool,
) -> std::io::Result<Acquired> {
    let mut seen: Option<(String, Instant)> = None;
    loop {
        if done() {
            return Ok(Acquired::Done);
        }
        let me = holder();
        if try_create(path, &me)? {
            return Ok(Acquired::Held(start_heartbeat(path, heartbeat)));
        }
        let content = std::fs::read_to_string(path).unwrap_or_default();
        match &seen {
            Some((c, since)) if *c == content && since.elapsed() >= stale_after => {
                // Stale: move exactly the lease we judged aside (rename is atomic;
                // only one waiter wins), then compete for a fresh one.
                let aside = path.with_extension(format!("stale.{}", std::process::id()));
                if std::fs::rename(path, &aside).is_ok() {
                    let _ = std::fs::remove_file(&aside);
                }
                seen = None;
                continue;
            }
            Some((c, _)) if *c == content => {}
            _ => seen = Some((content, Instant::now())),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_heartbeat(path: &Path, every: Duration) -> Lease {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, s) = (path.to_path_buf(), stop.clone());
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(every);
            if s.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            n += 1;
            // Rewrite in place: the content changes, so waiters see a live holder.
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).truncate(true).open(&p) {
                let _ = write!(f, "{} beat {n}", holder());
            }
        }
    });
    Lease { path: path.to_path_buf(), stop }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_then_takeover_of_a_stale_lease() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let Acquired::Held(first) = acquire(&p, Duration::from_millis(50), Duration::from_secs(5), || false).unwrap()
        else {
            panic!()
        };
        // A live holder is waited for; the waiter finishes when the work is done.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            matches!(
                acquire(&p2, Duration::from_millis(50), Duration::from_millis(400), || d2
                    .load(std::sync::atomic::Ordering::SeqCst))
                .unwrap(),
                Acquired::Done
            )
        });
        std::thread::sleep(Duration::from_millis(800));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(waiter.join().unwrap(), "a waiter must not take over a live lease");
        drop(first);
        assert!(!p.exists());
        // A crashed holder (no heartbeat) is taken over after stale_after.
        std::fs::write(&p, "dead holder").unwrap();
        let started = Instant::now();
        let Acquired::Held(_l) = acquire(&p, Duration::from_millis(50), Duration::from_millis(300), || false).unwrap()
        else {
            panic!()
        };
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
