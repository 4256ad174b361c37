//! Logs as hclog JSON lines on stderr, the shape go-plugin's host parses
//! (go-plugin `client.go` `logStderr`, `log_entry.go`): `@level` and `@message`
//! strings, `@timestamp` with exactly six fractional digits, fields as keys.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The environment variable holding the log filter (`info`, `debug`, `aimodel_driver=trace`…).
pub const LOG_ENV: &str = "AIMODEL_LOG";

/// Where log lines go. Write errors (EPIPE once Nomad is gone) are swallowed:
/// a plugin must outlive its parent's pipes.
pub type Sink = Arc<Mutex<dyn Write + Send>>;

/// Installs the global subscriber writing to stderr with the `AIMODEL_LOG` filter.
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let sink: Sink = Arc::new(Mutex::new(std::io::stderr()));
    let _ = tracing_subscriber::registry().with(HclogLayer::new(sink).with_filter(filter)).try_init();
}

/// A tracing layer formatting each event as one hclog JSON line.
pub struct HclogLayer {
    sink: Sink,
}

impl HclogLayer {
    /// A layer writing to `sink`.
    pub fn new(sink: Sink) -> Self {
        HclogLayer { sink }
    }
}

impl<S: Subscriber> Layer<S> for HclogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = FieldCollector::default();
        event.record(&mut fields);
        let line = format_line(*meta.level(), meta.target(), SystemTime::now(), fields.message, fields.fields);
        if let Ok(mut w) = self.sink.lock() {
            let _ = w.write_all(line.as_bytes());
            let _ = w.flush();
        }
    }
}

/// Formats one hclog JSON line (with trailing newline).
pub fn format_line(level: Level, target: &str, at: SystemTime, message: String, fields: Map<String, Value>) -> String {
    let mut obj = Map::new();
    obj.insert("@level".into(), Value::String(level_name(level).into()));
    obj.insert("@message".into(), Value::String(message));
    obj.insert("@module".into(), Value::String(target.replace("::", ".")));
    obj.insert("@timestamp".into(), Value::String(timestamp(at)));
    for (k, v) in fields {
        // Never let a field shadow the special keys the host asserts on.
        let key = if k.starts_with('@') { format!("field{k}") } else { k };
        obj.insert(key, v);
    }
    let mut line = Value::Object(obj).to_string();
    line.push('\n');
    line
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// `2006-01-02T15:04:05.000000Z`, the layout go-plugin parses.
pub fn timestamp(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_micros())
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Default)]
struct FieldCollector {
    message: String,
    fields: Map<String, Value>,
}

impl Visit for FieldCollector {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields.insert(field.name().into(), Value::String(value.into()));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.fields.insert(field.name().into(), Value::Bool(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.fields.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields.insert(field.name().into(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.fields.insert(field.name().into(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.insert(field.name().into(), Value::String(text));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_have_six_fraction_digits() {
        let t = UNIX_EPOCH + Duration::new(1_767_323_045, 123_456_789);
        assert_eq!(timestamp(t), "2026-01-02T03:04:05.123456Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn lines_are_hclog_json() {
        let mut f = Map::new();
        f.insert("task_id".into(), Value::String("a/b/c".into()));
        f.insert("@level".into(), Value::from(3));
        let line = format_line(Level::WARN, "aimodel_driver::server", UNIX_EPOCH, "hello".into(), f);
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["@message"], "hello");
        assert_eq!(v["@module"], "aimodel_driver.server");
        assert_eq!(v["task_id"], "a/b/c");
        assert_eq!(v["field@level"], 3);
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn broken_pipe_does_not_panic() {
        let sink: Sink = Arc::new(Mutex::new(Broken));
        let subscriber = tracing_subscriber::registry().with(HclogLayer::new(sink));
        tracing::subscriber::with_default(subscriber, || tracing::info!(n = 1, "into the void"));
    }
}
