//! The container engine behind a trait; the one implementation talks to the
//! Docker Engine API through bollard (the only module that imports bollard).

use std::time::Duration;

use bollard::{Docker, API_DEFAULT_VERSION};

/// What the engine says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub version: String,
    pub api_version: String,
}

/// Errors talking to the container engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("docker daemon unreachable at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("docker daemon at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("invalid docker endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
}

impl RuntimeError {
    /// Whether retrying later can help (the engine may come back).
    pub fn is_recoverable(&self) -> bool {
        !matches!(self, RuntimeError::BadEndpoint { .. })
    }
}

/// The container engine as the driver core sees it.
#[tonic::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// The endpoint, for messages.
    fn endpoint(&self) -> &str;
    /// Checks the engine answers and reports its version.
    async fn info(&self, timeout: Duration) -> Result<RuntimeInfo, RuntimeError>;
}

/// Docker Engine API over bollard.
pub struct DockerRuntime {
    endpoint: String,
    docker: std::sync::Mutex<Option<Docker>>,
}

impl DockerRuntime {
    /// Connects lazily: a bad or absent daemon is reported by [`ContainerRuntime::info`].
    pub fn new(endpoint: &str) -> Self {
        DockerRuntime { endpoint: endpoint.into(), docker: std::sync::Mutex::new(None) }
    }

    /// The client, connecting on first use and again after a failure (the
    /// socket may appear later, e.g. when dockerd starts after the plugin).
    fn client(&self) -> Result<Docker, RuntimeError> {
        let mut slot = self.docker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let endpoint = self.endpoint.as_str();
        let unreachable =
            |e: bollard::errors::Error| RuntimeError::Unreachable { endpoint: endpoint.into(), reason: e.to_string() };
        let docker = if let Some(path) = endpoint.strip_prefix("unix://") {
            Docker::connect_with_unix(path, 120, API_DEFAULT_VERSION).map_err(unreachable)?
        } else if let Some(addr) = endpoint.strip_prefix("tcp://") {
            Docker::connect_with_http(&format!("http://{addr}"), 120, API_DEFAULT_VERSION).map_err(unreachable)?
        } else if endpoint.starts_with("http://") {
            Docker::connect_with_http(endpoint, 120, API_DEFAULT_VERSION).map_err(unreachable)?
        } else {
            return Err(RuntimeError::BadEndpoint {
                endpoint: endpoint.into(),
                reason: "only unix://, tcp:// and http:// endpoints are supported".into(),
            });
        };
        *slot = Some(docker.clone());
        Ok(docker)
    }

    fn forget_client(&self) {
        *self.docker.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[tonic::async_trait]
impl ContainerRuntime for DockerRuntime {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn info(&self, timeout: Duration) -> Result<RuntimeInfo, RuntimeError> {
        let docker = self.client()?;
        let call = docker.version();
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err(RuntimeError::Timeout { endpoint: self.endpoint.clone(), timeout }),
            Ok(Err(e)) => {
                self.forget_client();
                Err(RuntimeError::Unreachable { endpoint: self.endpoint.clone(), reason: e.to_string() })
            }
            Ok(Ok(v)) => Ok(RuntimeInfo {
                version: v.version.unwrap_or_default(),
                api_version: v.api_version.unwrap_or_default(),
            }),
        }
    }
}
