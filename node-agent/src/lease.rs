//! NFS-safe exclusion per blob: flock is a no-op on NFS mounted `nolock`, so a
//! lease is a file created with O_EXCL (atomic on NFS too) that names a random
//! token, renewed by a heartbeat that rewrites it; a waiter that sees the same
//! content for `stale_after` on its own clock takes it over.
//!
//! Every step checks ownership by token: the heartbeat rewrites the file only
//! while it still holds its own token (else the lease is *lost*: the holder
//! stops and its download aborts), release removes only its own file, and a
//! takeover moves the file aside under a random name and proceeds only if what
//! it moved is exactly the content it judged stale (else it puts it back).

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first line of every lease file.
const MAGIC: &str = "aimodel-lease 1";

/// The line a holder that stopped early writes into its lease: the next
/// holder takes it over at once and resumes the partial download.
const RELEASED: &str = "released";

/// A held lease. [`Lease::finish`] removes the file (if still ours); dropping it
/// without finishing (an error, an aborted download) marks it released, so the
/// next holder takes it over at once and adopts the partial download.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    token: String,
    stale_token: Option<String>,
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    finished: bool,
}

impl Lease {
    /// The random token this lease is written with (16 bytes, hex).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The token of the stale lease this one took over, if it did: that holder
    /// is considered dead, so its partial download may be adopted.
    pub fn took_over(&self) -> Option<&str> {
        self.stale_token.as_deref()
    }

    /// The flag the heartbeat raises when the file no longer holds our token.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Whether the lease file still holds our token (read now, not from the heartbeat).
    pub fn still_mine(&self) -> bool {
        if self.lost.load(Ordering::SeqCst) {
            return false;
        }
        let mine = read_lease(&self.path).is_ok_and(|c| token_of(&c) == Some(self.token.as_str()));
        if !mine {
            self.lost.store(true, Ordering::SeqCst);
        }
        mine
    }
}

impl Lease {
    /// Done with the blob (published, or nothing worth resuming): the file goes if it is still ours.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Not ours any more (or never was): leave the new holder's file alone.
        if self.lost.load(Ordering::SeqCst)
            || read_lease(&self.path).map_or(true, |c| token_of(&c) != Some(self.token.as_str()))
        {
            return;
        }
        if self.finished {
            remove_if(&self.path, |c| token_of(c) == Some(self.token.as_str()));
        } else {
            // Through one descriptor, like a beat: a file moved aside meanwhile gets the write.
            let released = format!("{}{RELEASED}\n", content(&self.token, u64::MAX));
            if let Ok(mut f) = open_lease(&self.path) {
                let mut current = String::new();
                if (&mut f).take(LEASE_CAP).read_to_string(&mut current).is_ok()
                    && token_of(&current) == Some(self.token.as_str())
                {
                    let _ = f.set_len(0);
                    let _ = f.seek(std::io::SeekFrom::Start(0)).and_then(|_| f.write_all(released.as_bytes()));
                    let _ = f.sync_data();
                }
            }
        }
    }
}

/// Removes the file at `path` if its content satisfies `pred`: it is moved
/// aside first, so what is checked is what is removed; anything else is put
/// back (unless a newer file took the name meanwhile). Returns whether it removed.
pub fn remove_if(path: &Path, pred: impl Fn(&str) -> bool) -> bool {
    let aside = aside_path(path);
    if std::fs::rename(path, &aside).is_err() {
        return false;
    }
    let content = read_lease(&aside).unwrap_or_default();
    let ok = pred(&content);
    if !ok {
        let _ = std::fs::hard_link(&aside, path);
    }
    let _ = std::fs::remove_file(&aside);
    ok
}

/// Whether a lease file's holder stopped early and released it.
pub fn is_released(content: &str) -> bool {
    token_of(content).is_some() && content.lines().any(|l| l == RELEASED)
}

/// The token of a lease that may still have a live holder (not released).
pub fn live_token(content: &str) -> Option<&str> {
    token_of(content).filter(|_| !is_released(content))
}

/// `n` random bytes from /dev/urandom, hex.
pub fn random_hex(n: usize) -> std::io::Result<String> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A unique name beside `path` (`<name>.aside.<random>`).
fn aside_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".aside.{}", random_hex(8).unwrap_or_else(|_| format!("{:?}", Instant::now()))));
    PathBuf::from(s)
}

/// The token a lease file's content names.
pub fn token_of(content: &str) -> Option<&str> {
    let mut lines = content.lines();
    if lines.next() != Some(MAGIC) {
        return None;
    }
    lines.find_map(|l| l.strip_prefix("token ")).map(str::trim).filter(|t| !t.is_empty())
}

fn content(token: &str, beat: u64) -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{MAGIC}\ntoken {token}\nholder {} {}\nbeat {beat}\n", host.trim(), std::process::id())
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
#[derive(Debug)]
pub enum Acquired {
    /// We hold it: do the work.
    Held(Lease),
    /// `done()` became true while we waited: someone else did the work.
    Done,
}

/// Takes the lease at `path`, or waits until `done()` holds. `heartbeat` is how
/// often the holder rewrites the file; `stale_after` how long a waiter accepts
/// an unchanged file before taking over. Gives up with `TimedOut` at `until`.
pub fn acquire(
    path: &Path,
    heartbeat: Duration,
    stale_after: Duration,
    until: Option<Instant>,
    done: impl Fn() -> bool,
) -> std::io::Result<Acquired> {
    let mut seen: Option<(String, Instant)> = None;
    let mut took_over: Option<String> = None;
    loop {
        if done() {
            return Ok(Acquired::Done);
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{}: gave up waiting for the lease", path.display()),
            ));
        }
        let token = random_hex(16)?;
        if try_create(path, &content(&token, 0))? {
            return Ok(Acquired::Held(start_heartbeat(path, token, took_over, heartbeat)));
        }
        took_over = None;
        let current = match read_lease(path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => String::new(),
        };
        let released = is_released(&current);
        match &seen {
            _ if released => {
                // Released by a holder that stopped early: take it over now (and its partial).
                let judged = current.clone();
                if remove_if(path, |moved| moved == judged) {
                    took_over = token_of(&judged).map(str::to_string);
                }
                seen = None;
                continue;
            }
            Some((c, since)) if *c == current && since.elapsed() >= stale_after => {
                // Stale: move the file aside under a name of our own (rename is
                // atomic; only one waiter wins), then check that what we moved is
                // what we judged. A holder that beat meanwhile gets its file back.
                let aside = aside_path(path);
                if std::fs::rename(path, &aside).is_ok() {
                    let moved = read_lease(&aside).unwrap_or_default();
                    if moved == current {
                        took_over = Some(token_of(&moved).unwrap_or("").to_string());
                    } else {
                        let _ = std::fs::hard_link(&aside, path);
                    }
                    let _ = std::fs::remove_file(&aside);
                }
                seen = None;
                continue;
            }
            Some((c, _)) if *c == current => {}
            _ => seen = Some((current, Instant::now())),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One beat: rewrites the file through one open descriptor if it still holds
/// `token`. A file renamed aside meanwhile gets the write, and its taker sees
/// that it was alive. Returns false when the lease is no longer ours.
/// Largest lease file read: a lease is a line or two; a tenant's `/dev/zero`
/// link or a huge file must not be read whole.
const LEASE_CAP: u64 = 4096;

/// A lease file's content, opened without following a symlink, regular files only, capped.
fn read_lease(path: &Path) -> std::io::Result<String> {
    let bytes = hf_cache::safefs::read_capped(path, LEASE_CAP)?;
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A lease file opened for a rewrite: never through a symlink, never a FIFO.
fn open_lease(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a regular file"));
    }
    Ok(f)
}

fn beat(path: &Path, token: &str, n: u64) -> bool {
    let Ok(mut f) = open_lease(path) else { return false };
    let mut current = String::new();
    if (&mut f).take(LEASE_CAP).read_to_string(&mut current).is_err() || token_of(&current) != Some(token) {
        return false;
    }
    let new = content(token, n);
    let _ = f.set_len(0);
    let _ = f.seek(std::io::SeekFrom::Start(0)).and_then(|_| f.write_all(new.as_bytes()));
    let _ = f.sync_data();
    true
}

fn start_heartbeat(path: &Path, token: String, stale_token: Option<String>, every: Duration) -> Lease {
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let (p, s, l, t) = (path.to_path_buf(), stop.clone(), lost.clone(), token.clone());
    std::thread::spawn(move || {
        let mut n = 0u64;
        loop {
            let next = Instant::now() + every;
            while Instant::now() < next {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
            }
            if s.load(Ordering::SeqCst) {
                return;
            }
            n += 1;
            if !beat(&p, &t, n) {
                l.store(true, Ordering::SeqCst);
                return;
            }
        }
    });
    Lease { path: path.to_path_buf(), token, stale_token, stop, lost, finished: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(p: &Path, hb: u64, stale: u64) -> Lease {
        match acquire(p, Duration::from_millis(hb), Duration::from_millis(stale), None, || false).unwrap() {
            Acquired::Held(l) => l,
            Acquired::Done => panic!("done"),
        }
    }

    #[test]
    fn one_holder_then_takeover_of_a_stale_lease() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let first = held(&p, 50, 5000);
        assert!(first.took_over().is_none());
        // A live holder is waited for; the waiter finishes when the work is done.
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || {
            matches!(
                acquire(&p2, Duration::from_millis(50), Duration::from_millis(400), None, || d2.load(Ordering::SeqCst))
                    .unwrap(),
                Acquired::Done
            )
        });
        std::thread::sleep(Duration::from_millis(800));
        done.store(true, Ordering::SeqCst);
        assert!(waiter.join().unwrap(), "a waiter must not take over a live lease");
        assert!(first.still_mine());
        first.finish();
        assert!(!p.exists());
        // A crashed holder (no heartbeat) is taken over after stale_after, and the
        // new holder knows whose lease it took.
        std::fs::write(&p, format!("{MAGIC}\ntoken deadbeef\nholder x 1\nbeat 3\n")).unwrap();
        let l = held(&p, 50, 300);
        assert_eq!(l.took_over(), Some("deadbeef"));
        assert_ne!(l.token(), "deadbeef");
        assert_eq!(l.token().len(), 32);
    }

    #[test]
    fn a_holder_whose_lease_was_taken_stops_and_leaves_the_new_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let old = held(&p, 30, 5000);
        // Someone else took it over while we were paused.
        let other = format!("{MAGIC}\ntoken 0123\nholder y 2\nbeat 0\n");
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &other).unwrap();
        let lost = old.lost_flag();
        for _ in 0..200 {
            if lost.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(lost.load(Ordering::SeqCst), "the heartbeat must notice");
        assert!(!old.still_mine());
        // The heartbeat did not overwrite, and release does not remove, the other's lease.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), other);
        drop(old);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), other);
        let litter: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(litter.len(), 1, "{litter:?}");
    }

    #[test]
    fn a_lease_dropped_unfinished_is_released_and_taken_over_at_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lease");
        let first = held(&p, 50, 600_000);
        let token = first.token().to_string();
        drop(first);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(is_released(&text) && live_token(&text).is_none(), "{text}");
        // No waiting for stale_after (ten minutes here): the next holder adopts.
        let next = held(&p, 50, 600_000);
        assert_eq!(next.took_over(), Some(token.as_str()));
        assert_eq!(live_token(&std::fs::read_to_string(&p).unwrap()), Some(next.token()));
        next.finish();
        assert!(!p.exists());
    }

    #[test]
    fn tokens_are_random_and_parsed() {
        let (a, b) = (random_hex(16).unwrap(), random_hex(16).unwrap());
        assert_ne!(a, b);
        assert_eq!(token_of(&content(&a, 7)), Some(a.as_str()));
        assert_eq!(token_of("dead holder"), None);
        assert_eq!(token_of(""), None);
    }
}
