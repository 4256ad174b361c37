//! Value parsers of the command line's options (clap takes their `String` errors).

use std::time::Duration;

/// A size with a unit (`200GiB`, `512MB`); a bare number other than 0 is refused
/// (`--target-free 10` is far more likely to mean 10 GiB than 10 bytes).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t != "0" && !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{s:?} has no unit: write e.g. \"{t}GiB\" (binary) or \"{t}GB\" (decimal)"));
    }
    hf_cache::units::parse_bytes(s).map_err(|e| e.0)
}

/// `30s`, `500ms`, `2m`, `1h` or plain seconds; positive.
pub(super) fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = hf_cache::units::parse_duration(s).map_err(|e| e.0)?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(d)
}

/// Bounds of a duration option, checked before anything multiplies it.
pub(super) fn parse_bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse_secs(s)?;
    if d < min || d > max {
        return Err(format!("duration {s:?} must be between {min:?} and {max:?}"));
    }
    Ok(d)
}

pub(super) fn parse_heartbeat(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(10), Duration::from_secs(600))
}

pub(super) fn parse_stale_after(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_millis(30), Duration::from_secs(24 * 3600))
}

pub(super) fn parse_stall(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_secs(1), Duration::from_secs(3600))
}

pub(super) fn parse_deadline(s: &str) -> Result<Duration, String> {
    parse_bounded(s, Duration::from_secs(1), Duration::from_secs(30 * 24 * 3600))
}

/// Concurrency and ranges: 1 to 64.
pub(super) fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=64) => Ok(n),
        _ => Err(format!("{s:?} must be a whole number from 1 to 64")),
    }
}

pub(super) fn parse_range_size(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !(1 << 20..=4 << 30).contains(&n) {
        return Err(format!("{s:?} must be between 1MiB and 4GiB"));
    }
    Ok(n)
}
