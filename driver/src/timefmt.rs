//! UTC timestamps without a date library: formatting for hclog and parsing
//! Docker's RFC 3339 log timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

/// `2006-01-02T15:04:05.000000Z`, the layout go-plugin parses.
pub fn micros_utc(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    // SystemTime cannot reach i64::MAX seconds on our platforms; clamp rather than wrap.
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (Docker's log timestamps) into
/// seconds and nanoseconds since the epoch.
pub fn parse_rfc3339_utc(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = &s[19..];
    let (frac, zone) = match rest.strip_prefix('.') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit())?;
            (&r[..end], &r[end..])
        }
        None => ("", rest),
    };
    if zone != "Z" || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut nanos: u32 = 0;
    let scales = [100_000_000, 10_000_000, 1_000_000, 100_000, 10_000, 1_000, 100, 10, 1];
    for (c, scale) in frac.bytes().zip(scales) {
        nanos += u32::from(c - b'0') * scale;
    }
    let days = days_from_civil(y, u32::try_from(mo).ok()?, u32::try_from(d).ok()?);
    Some((days * 86_400 + h * 3600 + mi * 60 + sec, nanos))
}

/// Unix seconds now.
pub fn unix_now_secs() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
// The algorithm yields a day in 1..=31 and a month in 1..=12, so the casts are exact.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_and_parses() {
        let t = UNIX_EPOCH + Duration::new(1_767_323_045, 123_456_789);
        assert_eq!(micros_utc(t), "2026-01-02T03:04:05.123456Z");
        assert_eq!(micros_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        assert_eq!(parse_rfc3339_utc("2026-01-02T03:04:05.123456789Z"), Some((1_767_323_045, 123_456_789)));
        assert_eq!(parse_rfc3339_utc("2000-02-29T00:00:00Z"), Some((951_782_400, 0)));
        assert_eq!(parse_rfc3339_utc("2026-01-02T03:04:05.5Z"), Some((1_767_323_045, 500_000_000)));
        assert_eq!(parse_rfc3339_utc("2026-01-02 03:04:05Z"), None);
        assert_eq!(parse_rfc3339_utc("garbage"), None);
        for secs in [0u64, 951_782_400, 1_767_323_045, 4_102_444_800] {
            let s = micros_utc(UNIX_EPOCH + Duration::from_secs(secs));
            assert_eq!(parse_rfc3339_utc(&s), Some((i64::try_from(secs).unwrap(), 0)), "{s}");
        }
    }
}
