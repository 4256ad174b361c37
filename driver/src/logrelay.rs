//! The per-task log relay: a detached process (`nomad-driver-aimodel log-relay`)
//! that holds Nomad's log FIFOs and streams the container's output into them.
//!
//! Nomad's logmon copies each FIFO once until EOF and never reopens it
//! (`client/logmon/logmon.go`), so the writer must outlive the plugin: a plugin
//! crash, upgrade or restart must lose no line. The relay records the Docker
//! timestamp of the last record it delivered in a small state file, so a new
//! relay resumes exactly after it. While the plugin runs it also holds a write
//! end of each FIFO, so the reader never sees EOF between two relays.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;

use crate::runtime::{ContainerRuntime, DockerRuntime, LogStream};

/// The subcommand name.
pub const SUBCOMMAND: &str = "log-relay";
/// How long to wait for Nomad's logmon to open the read end of a FIFO.
const READER_WAIT: Duration = Duration::from_secs(30);

/// Position of the relay: the last delivered record's timestamp and how many
/// records carried exactly that timestamp (Docker's `since` is whole seconds
/// and inclusive, so a resumed stream repeats them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub secs: i64,
    pub nanos: u32,
    pub same_ts: u32,
}

impl Position {
    const LEN: usize = 16;

    fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.secs.to_le_bytes());
        b[8..12].copy_from_slice(&self.nanos.to_le_bytes());
        b[12..].copy_from_slice(&self.same_ts.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Position> {
        Some(Position {
            secs: i64::from_le_bytes(b.get(..8)?.try_into().ok()?),
            nanos: u32::from_le_bytes(b.get(8..12)?.try_into().ok()?),
            same_ts: u32::from_le_bytes(b.get(12..16)?.try_into().ok()?),
        })
    }

    /// Reads a state file; a missing or short file means "from the start".
    pub fn load(path: &Path) -> Position {
        std::fs::read(path).ok().and_then(|b| Position::from_bytes(&b)).unwrap_or_default()
    }
}

/// Decides, record by record, what a resumed stream has already delivered.
#[derive(Debug, Clone, Copy)]
pub struct Dedup {
    pos: Position,
    seen_at_pos: u32,
}

impl Dedup {
    /// Starts from a saved position.
    pub fn new(pos: Position) -> Self {
        Dedup { pos, seen_at_pos: 0 }
    }

    /// True when the record with timestamp `ts` must be written; advances the position.
    pub fn admit(&mut self, ts: (i64, u32)) -> bool {
        let cur = (self.pos.secs, self.pos.nanos);
        if ts < cur {
            return false;
        }
        if ts == cur {
            self.seen_at_pos += 1;
            if self.seen_at_pos <= self.pos.same_ts {
                return false;
            }
            self.pos.same_ts = self.seen_at_pos;
            return true;
        }
        self.pos = Position { secs: ts.0, nanos: ts.1, same_ts: 1 };
        self.seen_at_pos = 1;
        true
    }

    /// A new stream replays from the start of the position's second: count the
    /// records at the position's timestamp afresh.
    pub fn restart(&mut self) {
        self.seen_at_pos = 0;
    }

    /// The position after the last admitted record.
    pub fn position(&self) -> Position {
        self.pos
    }
}

/// Positions per output stream. Docker copies stdout and stderr in separate
/// goroutines, so timestamps are ordered within a stream but not across them:
/// one position for both would drop a stdout line stamped just before a stderr
/// line that reached the log first.
#[derive(Debug, Clone, Copy)]
pub struct StreamsDedup {
    streams: [Dedup; 2],
}

impl StreamsDedup {
    /// Loads both positions (a 16-byte file from an older relay applies to both).
    pub fn load(path: &Path) -> Self {
        let b = std::fs::read(path).unwrap_or_default();
        let out = Position::from_bytes(&b).unwrap_or_default();
        let err = b.get(Position::LEN..).and_then(Position::from_bytes).unwrap_or(out);
        StreamsDedup { streams: [Dedup::new(out), Dedup::new(err)] }
    }

    /// True when the record must be written.
    pub fn admit(&mut self, stream: LogStream, ts: (i64, u32)) -> bool {
        self.streams[usize::from(stream == LogStream::Stderr)].admit(ts)
    }

    /// Where a resumed stream must start: the earlier of the two positions.
    pub fn since(&self) -> i64 {
        self.streams[0].position().secs.min(self.streams[1].position().secs)
    }

    /// A new stream replays: count records at each position afresh.
    pub fn restart(&mut self) {
        self.streams.iter_mut().for_each(Dedup::restart);
    }

    /// The state file's content.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..16].copy_from_slice(&self.streams[0].position().to_bytes());
        b[16..].copy_from_slice(&self.streams[1].position().to_bytes());
        b
    }
}

/// Opens a FIFO for writing without blocking forever: waits for the reader
/// (ENXIO until logmon opens it), then switches the fd to blocking writes.
pub fn open_fifo_writer(path: &Path, wait: Duration) -> std::io::Result<OwnedFd> {
    if path == Path::new("/dev/null") {
        return Ok(File::options().write(true).open(path)?.into());
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        match open(path, OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => {
                let flags = OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL)?);
                fcntl(&fd, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
                return Ok(fd);
            }
            Err(nix::errno::Errno::ENXIO) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(std::io::Error::from(e)),
        }
    }
}

/// Arguments of the relay subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayArgs {
    pub endpoint: String,
    pub container: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub state: PathBuf,
}

impl RelayArgs {
    /// The command line (after the subcommand).
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--endpoint".into(),
            self.endpoint.clone(),
            "--container".into(),
            self.container.clone(),
            "--stdout".into(),
            self.stdout.display().to_string(),
            "--stderr".into(),
            self.stderr.display().to_string(),
            "--state".into(),
            self.state.display().to_string(),
        ]
    }

    /// Parses what [`RelayArgs::to_args`] produced.
    pub fn parse(args: &[String]) -> Result<Self, UsageError> {
        let get = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
                .ok_or_else(|| UsageError { missing: flag.to_string() })
        };
        Ok(RelayArgs {
            endpoint: get("--endpoint")?,
            container: get("--container")?,
            stdout: get("--stdout")?.into(),
            stderr: get("--stderr")?.into(),
            state: get("--state")?.into(),
        })
    }
}

/// A relay command line without one of its flags.
#[derive(Debug, thiserror::Error)]
#[error("{SUBCOMMAND}: missing {missing}")]
pub struct UsageError {
    pub missing: String,
}

/// The relay's main loop: returns when the container has stopped and every
/// record has been delivered, or when the reader went away.
pub async fn run(args: RelayArgs) -> std::io::Result<()> {
    let state = File::options().read(true).write(true).create(true).truncate(false).open(&args.state)?;
    // One relay per task: a second one (a respawn racing a survivor) leaves at once.
    let state = match nix::fcntl::Flock::lock(state, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(()),
        Err((_, e)) => return Err(e.into()),
    };
    let stdout = File::from(open_fifo_writer(&args.stdout, READER_WAIT)?);
    let stderr = File::from(open_fifo_writer(&args.stderr, READER_WAIT)?);
    let mut dedup = StreamsDedup::load(&args.state);
    let runtime = DockerRuntime::new(&args.endpoint);
    let mut out = [stdout, stderr];
    let mut backoff = Duration::from_millis(200);
    loop {
        let since = dedup.since();
        dedup.restart();
        match runtime.logs(&args.container, since, true).await {
            Ok(mut stream) => {
                while let Some(item) = stream.next().await {
                    let Ok(rec) = item else { break };
                    if !dedup.admit(rec.stream, rec.ts) {
                        continue;
                    }
                    let w = match rec.stream {
                        LogStream::Stdout => &mut out[0],
                        LogStream::Stderr => &mut out[1],
                    };
                    if let Err(e) = w.write_all(&rec.bytes) {
                        // EPIPE: the reader (logmon) is gone for good.
                        tracing::warn!(error = %e, "log reader went away");
                        return Ok(());
                    }
                    state.write_all_at(&dedup.to_bytes(), 0)?;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot stream logs"),
        }
        // The stream ended: finished if the container is no longer running;
        // otherwise the engine hiccupped (restart, timeout) and we resume.
        match runtime.inspect(&args.container).await {
            Ok(None) => return Ok(()),
            Ok(Some(s)) if !s.running => {
                drain_rest(&runtime, &args, &mut dedup, &mut out, &state).await?;
                return Ok(());
            }
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// After the container stopped, one last non-following read catches records
/// that arrived between the follow stream's end and the inspect.
async fn drain_rest(
    runtime: &DockerRuntime,
    args: &RelayArgs,
    dedup: &mut StreamsDedup,
    out: &mut [File; 2],
    state: &File,
) -> std::io::Result<()> {
    dedup.restart();
    let Ok(mut stream) = runtime.logs(&args.container, dedup.since(), false).await else { return Ok(()) };
    while let Some(Ok(rec)) = stream.next().await {
        if dedup.admit(rec.stream, rec.ts) {
            let i = usize::from(rec.stream == LogStream::Stderr);
            if out[i].write_all(&rec.bytes).is_err() {
                return Ok(());
            }
            state.write_all_at(&dedup.to_bytes(), 0)?;
        }
    }
    Ok(())
}

/// The pid of a live relay for `container`, found through /proc (the pid in a
/// stored handle may be stale after a respawn, or recycled).
pub fn find_relay(container: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().to_str()?.parse().ok().filter(|pid| is_relay(*pid, container)))
}

/// Whether `pid` is a live relay of `container` (one process checked, not all of /proc).
pub fn is_relay(pid: i32, container: &str) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let text = String::from_utf8_lossy(&cmd);
    text.contains(SUBCOMMAND) && text.contains(container) && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_skips_exactly_what_was_delivered() {
        let mut d = Dedup::new(Position::default());
        assert!(d.admit((10, 5)));
        assert!(d.admit((10, 5)));
        assert!(d.admit((11, 0)));
        let pos = d.position();
        assert_eq!(pos, Position { secs: 11, nanos: 0, same_ts: 1 });
        // A resumed stream replays from second 10.
        let mut r = Dedup::new(pos);
        assert!(!r.admit((10, 5)));
        assert!(!r.admit((10, 5)));
        assert!(!r.admit((11, 0)));
        assert!(r.admit((11, 0)), "a second record with the same timestamp is new");
        assert!(r.admit((12, 0)));
        // The same dedup replaying a second stream (reconnect, final drain).
        r.restart();
        assert!(!r.admit((11, 0)));
        assert!(!r.admit((11, 0)));
        assert!(!r.admit((12, 0)), "a replayed stream must not repeat the last record");
        assert!(r.admit((13, 0)));
    }

    #[test]
    fn streams_are_ordered_separately() {
        let mut d = StreamsDedup::load(Path::new("/nonexistent"));
        assert!(d.admit(LogStream::Stderr, (10, 500)));
        // stdout stamped earlier but arriving later is still new.
        assert!(d.admit(LogStream::Stdout, (10, 400)));
        assert!(d.admit(LogStream::Stdout, (10, 600)));
        let dir = tempfile_dir();
        let p = dir.join("state2");
        std::fs::write(&p, d.to_bytes()).unwrap();
        let mut r = StreamsDedup::load(&p);
        assert_eq!(r.since(), 10);
        r.restart();
        assert!(!r.admit(LogStream::Stderr, (10, 500)));
        assert!(!r.admit(LogStream::Stdout, (10, 400)));
        assert!(!r.admit(LogStream::Stdout, (10, 600)));
        assert!(r.admit(LogStream::Stderr, (10, 550)));
        assert!(r.admit(LogStream::Stdout, (11, 0)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn position_file_round_trips() {
        let dir = tempfile_dir();
        let p = dir.join("state");
        assert_eq!(Position::load(&p), Position::default());
        let pos = Position { secs: 1_767_323_045, nanos: 999, same_ts: 3 };
        std::fs::write(&p, pos.to_bytes()).unwrap();
        assert_eq!(Position::load(&p), pos);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn args_round_trip() {
        let a = RelayArgs {
            endpoint: "unix:///var/run/docker.sock".into(),
            container: "abc".into(),
            stdout: "/a/.t.stdout.fifo".into(),
            stderr: "/a/.t.stderr.fifo".into(),
            state: "/a/state".into(),
        };
        assert_eq!(RelayArgs::parse(&a.to_args()).unwrap(), a);
        assert!(RelayArgs::parse(&[]).is_err());
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("aimodel-relay-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
