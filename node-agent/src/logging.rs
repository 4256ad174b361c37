//! The daemon's logs on stderr: `AIMODEL_LOG` filters (a bare level keeps the
//! HTTP/TLS stacks at `warn`, so `debug` shows our modules, not HTTP/2 frames),
//! `AIMODEL_LOG_FORMAT=json` writes one JSON object per line, and colours are
//! used only when stderr is a terminal (not in `nomad alloc logs`).

use std::fmt::Write as _;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Crates whose debug output drowns ours; kept at `warn` when the filter is a bare level.
const NOISY: &[&str] = &["h2", "hyper", "hyper_util", "reqwest", "rustls", "tokio_util", "tower"];

/// The filter for `AIMODEL_LOG`: unset → `info`; a bare level (`debug`) → that
/// level with the noisy crates at `warn`; anything else (directives) as given.
pub fn directives(env: Option<&str>) -> String {
    let given = env.map(str::trim).filter(|s| !s.is_empty()).unwrap_or("info");
    let bare = ["trace", "debug", "info", "warn", "error", "off"].contains(&given.to_ascii_lowercase().as_str());
    if bare {
        let mut d = given.to_string();
        for n in NOISY {
            let _ = write!(d, ",{n}=warn");
        }
        d
    } else {
        given.to_string()
    }
}

/// Installs the subscriber (once; later calls do nothing).
pub fn init(environment: &crate::env::Environment) {
    let env = environment.log.clone();
    let filter = tracing_subscriber::EnvFilter::try_new(directives(env.as_deref())).unwrap_or_else(|e| {
        eprintln!("aimodel-agent: AIMODEL_LOG={:?} is not a log filter ({e}); using info", env.unwrap_or_default());
        tracing_subscriber::EnvFilter::new(directives(None))
    });
    let json = environment.log_format.as_deref().is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.event_format(JsonLines).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// One JSON object per event: `timestamp`, `level`, `target`, `message` and the event's fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

struct Fields(serde_json::Map<String, serde_json::Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        let mut ts = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut Writer::new(&mut ts),
        )?;
        let mut out = serde_json::Map::new();
        out.insert("timestamp".into(), ts.into());
        out.insert("level".into(), event.metadata().level().as_str().into());
        out.insert("target".into(), event.metadata().target().into());
        out.append(&mut fields.0);
        writeln!(w, "{}", serde_json::Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_quiets_the_http_stacks_and_directives_are_kept() {
        assert!(directives(None).starts_with("info,h2=warn,hyper=warn"));
        let d = directives(Some("debug"));
        assert!(d.starts_with("debug,") && d.contains("reqwest=warn") && d.contains("rustls=warn"), "{d}");
        assert_eq!(directives(Some("aimodel_agent=trace,h2=debug")), "aimodel_agent=trace,h2=debug");
        assert!(tracing_subscriber::EnvFilter::try_new(directives(Some("debug"))).is_ok());
    }

    #[test]
    fn json_lines_are_one_object_per_event_with_the_fields() {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let b = buf.clone();
        let sub = tracing_subscriber::fmt().event_format(JsonLines).with_writer(move || b.clone()).finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(repo = "org/m", bytes = 5u64, "abandoning org/m: no longer wanted");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["message"], "abandoning org/m: no longer wanted");
        assert_eq!(
            (v["level"].as_str(), v["repo"].as_str(), v["bytes"].as_u64()),
            (Some("INFO"), Some("org/m"), Some(5))
        );
        assert!(v["timestamp"].as_str().is_some_and(|t| t.len() > 10), "{v}");
        assert!(!text.contains('\u{1b}'));
    }
}
