//! Registry credentials (`auth { ... }`, in the plugin and in a task).

use serde::Deserialize;

use crate::config::schema::{attr, Field};

/// The attributes of an `auth` block.
pub const AUTH_SCHEMA: &[Field] = &[
    attr("username", "string", None, "Registry user name."),
    attr("password", "string", None, "Registry password or token. Never logged."),
    attr(
        "server_address",
        "string",
        None,
        "Registry host the credentials are for (`docker.io`, `ghcr.io`, `registry.example:5000`); required in the plugin's `auth`.",
    ),
];

/// Registry credentials. `Debug` never shows the password.
#[derive(Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub server_address: Option<String>,
}

impl RegistryAuth {
    /// True when no credential is set (an empty `auth {}` block).
    pub fn is_empty(&self) -> bool {
        self.username.is_none() && self.password.is_none() && self.server_address.is_none()
    }
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("server_address", &self.server_address)
            .finish()
    }
}
