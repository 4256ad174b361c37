//! Typed plugin and task configuration, decoded from Nomad's cty-msgpack.

mod plugin;
mod task;
pub mod units;

pub use plugin::*;
pub use task::*;

use crate::cty;

/// Prefix of every label the driver puts on its containers.
pub const LABEL_PREFIX: &str = "com.aimodel.";

/// A configuration that could not be used; `field` is the dotted attribute path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid cty-msgpack: {0}")]
    Encoding(#[from] cty::CtyError),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    /// The attribute the error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Encoding(_) => None,
        }
    }
}

impl From<cty::DecodeError> for ConfigError {
    fn from(e: cty::DecodeError) -> Self {
        ConfigError::Invalid { field: e.field, message: e.message }
    }
}

/// Decodes and validates `SetConfigRequest.msgpack_config`.
pub fn decode_plugin_config(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    let value = cty::decode(bytes)?;
    let mut cfg: PluginConfig = cty::from_value(&value)?;
    cfg.auth = cfg.auth.filter(|a| !a.is_empty());
    cfg.validate()?;
    Ok(cfg)
}

/// Decodes and validates `TaskConfig.msgpack_driver_config`.
pub fn decode_task_config(bytes: &[u8]) -> Result<TaskConfig, ConfigError> {
    let value = cty::decode(bytes)?;
    if value == cty::Value::Null {
        return Err(ConfigError::Invalid {
            field: "engine".into(),
            message: "is required (the task has no config)".into(),
        });
    }
    let mut cfg: TaskConfig = cty::from_value(&value)?;
    cfg.auth = cfg.auth.filter(|a| !a.is_empty());
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests;
