//! The `AIMODEL_*` environment overrides of the plugin, read once at start-up
//! (`main` → `nomad::server::run`) and carried by the driver; nothing deeper
//! reads the environment. They exist for tests and comparisons; operators
//! configure the plugin through its HCL.

use std::path::PathBuf;
use std::time::Duration;

/// What the environment overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvOverrides {
    /// `AIMODEL_ORPHAN_GRACE` (e.g. `10s`): how long after start-up containers
    /// no task claims are left alone.
    pub orphan_grace: Option<Duration>,
    /// `AIMODEL_STATS_SOURCE=docker`: TaskStats from Docker's stats API instead
    /// of the cgroup files.
    pub stats_from_docker: bool,
    /// `AIMODEL_AGENT_BIN`: the agent `prewarm = true` runs.
    pub agent_bin: Option<PathBuf>,
    /// `AIMODEL_MOUNTINFO`: where mount facts are read (default `/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// `PATH`, where the agent is looked for last.
    pub path: Option<String>,
    /// `AIMODEL_OLLAMA_REGISTRY`: the operator's Ollama mirror, which `prewarm = true`
    /// fetches from (the agent reads it from the plugin's environment).
    pub ollama_registry: Option<String>,
}

impl Default for EnvOverrides {
    fn default() -> Self {
        EnvOverrides {
            orphan_grace: None,
            stats_from_docker: false,
            agent_bin: None,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            path: None,
            ollama_registry: None,
        }
    }
}

impl EnvOverrides {
    /// Reads the overrides through `get` (the process environment in `main`).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut o = EnvOverrides {
            orphan_grace: get("AIMODEL_ORPHAN_GRACE").and_then(|g| super::units::parse_duration(&g).ok()),
            stats_from_docker: get("AIMODEL_STATS_SOURCE").as_deref() == Some("docker"),
            agent_bin: get("AIMODEL_AGENT_BIN").map(PathBuf::from),
            path: get("PATH"),
            ollama_registry: get("AIMODEL_OLLAMA_REGISTRY").filter(|r| !r.trim().is_empty()),
            ..Default::default()
        };
        if let Some(m) = get("AIMODEL_MOUNTINFO") {
            o.mountinfo = PathBuf::from(m);
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_read_from_the_given_environment() {
        let env = |k: &str| match k {
            "AIMODEL_ORPHAN_GRACE" => Some("10s".to_string()),
            "AIMODEL_STATS_SOURCE" => Some("docker".to_string()),
            _ => None,
        };
        let o = EnvOverrides::read(env);
        assert_eq!(o.orphan_grace, Some(Duration::from_secs(10)));
        assert!(o.stats_from_docker);
        assert_eq!(o.mountinfo, PathBuf::from("/proc/self/mountinfo"));
        assert_eq!(EnvOverrides::read(|_| None), EnvOverrides::default());
    }
}
