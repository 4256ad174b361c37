//! Durations and byte sizes as operators write them (`"30s"`, `"1h30m"`,
//! `"10GiB"`), shared by the driver's and the agent's configuration.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration or size that does not parse; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub String);

/// Parses a Go-style duration (`"1h2m3s"`, `"500ms"`); a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    duration(text).map_err(UnitError)
}

/// Parses a byte size: decimal (`KB`, `MB`, `GB`, `TB`) and binary (`KiB`…`TiB`,
/// and Docker's `k`, `m`, `g`) suffixes, case-insensitive.
pub fn parse_bytes(text: &str) -> Result<u64, UnitError> {
    bytes(text).map_err(UnitError)
}

fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("duration must not be negative, found {text:?}"));
    }
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {text:?}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    if rest.is_empty() {
        return Err("duration is empty".into());
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let unit_len = rest[num_len..].find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len() - num_len);
        let (num, unit) = (&rest[..num_len], &rest[num_len..num_len + unit_len]);
        let n: f64 =
            num.parse().map_err(|_| format!("invalid duration {text:?} (use e.g. \"30s\", \"5m\", \"1h\")"))?;
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m or h)")),
        };
        let part = Duration::try_from_secs_f64(n * scale).map_err(|_| format!("invalid duration {text:?}"))?;
        total = total.checked_add(part).ok_or_else(|| format!("duration {text:?} is too long"))?;
        rest = &rest[num_len + unit_len..];
    }
    Ok(total)
}

// The final cast runs on a finite, non-negative value checked against u64::MAX just
// before (2^64 itself saturates to u64::MAX); floats have no `try_from`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("size must not be negative, found {text:?}"));
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let n: f64 = num.parse().map_err(|_| format!("invalid size {text:?} (use e.g. \"10GiB\" or \"512MB\")"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size {text:?}: unknown unit {unit:?}")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// `12.3 MiB/s`: `bytes` over `elapsed`, as [`human_bytes`] per second.
pub fn human_rate(bytes: u64, elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    // Display only: a float-to-int cast saturates (and is never negative here).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = (bytes as f64 / secs) as u64;
    format!("{}/s", human_bytes(rate))
}

/// `12.3 GiB`: binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A duration written as `"1h30m"`, `"30s"`, `"250ms"` or a bare number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A size written as `"10GiB"`, `"512MB"`, `"16g"` or a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(Dur).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_bytes(&s).map(Bytes).map_err(de::Error::custom)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("-5s").unwrap_err().0.contains("negative"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        for bad in ["nan", "NaN", "inf", "1e300", "1e300s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("16g").unwrap(), 16 << 30);
        assert_eq!(parse_bytes("512MB").unwrap(), 512_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert!(parse_bytes("-1g").unwrap_err().0.contains("negative"));
        assert!(parse_bytes("12 furlongs").is_err());
        assert!(parse_bytes("nan").is_err() && parse_bytes("1e300").is_err());
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
