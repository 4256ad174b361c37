//! Plugin and task configuration from Nomad's cty-msgpack to the typed,
//! validated forms in `config`.

use crate::config::{ConfigError, PluginConfig, TaskConfig};

use super::cty;

impl From<cty::CtyError> for ConfigError {
    fn from(e: cty::CtyError) -> Self {
        ConfigError::Encoding { message: e.to_string() }
    }
}

impl From<super::cty::DecodeError> for ConfigError {
    fn from(e: super::cty::DecodeError) -> Self {
        ConfigError::Invalid { field: e.field, message: e.message }
    }
}

/// Decodes and validates `SetConfigRequest.msgpack_config`.
pub fn plugin_config(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    let value = cty::decode(bytes)?;
    let mut cfg: PluginConfig = cty::from_value(&value)?;
    cfg.auth = cfg.auth.filter(|a| !a.is_empty());
    cfg.validate()?;
    Ok(cfg)
}

/// Decodes and validates `TaskConfig.msgpack_driver_config`.
pub fn task_config(bytes: &[u8]) -> Result<TaskConfig, ConfigError> {
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
