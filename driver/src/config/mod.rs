//! Typed plugin and task configuration and their schemas; the adapter
//! (`nomad::decode`) decodes them from Nomad's cty-msgpack.

mod auth;
mod env;
mod hf_cache;
mod plugin;
pub mod schema;
mod task;
pub mod units;

pub use auth::*;
pub use env::EnvOverrides;
pub use hf_cache::HfCacheConfig;
pub use plugin::*;
pub use task::*;

/// Prefix of every label the driver puts on its containers.
pub const LABEL_PREFIX: &str = "com.aimodel.";

/// A configuration that could not be used; `field` is the dotted attribute path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid cty-msgpack: {message}")]
    Encoding { message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    /// The attribute the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Encoding { .. } => None,
        }
    }
}
