//! Logs as hclog JSON lines on stderr, the shape go-plugin's host parses
//! (go-plugin `client.go` `logStderr`, `log_entry.go`): `@level` and `@message`
//! strings, `@timestamp` with exactly six fractional digits, fields as keys.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

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

impl std::fmt::Debug for HclogLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HclogLayer").finish_non_exhaustive()
    }
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
    crate::timefmt::micros_utc(at)
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
    use std::time::UNIX_EPOCH;

    use super::*;

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
