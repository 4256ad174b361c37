//! `images { ... }` of the agent's configuration: pull engine images ahead.
//!
//! ```hcl
//! images {
//!   docker           = "unix:///var/run/docker.sock"
//!   min_free         = "20GiB"
//!   activity_timeout = "2m"
//!   remove_delay     = "3m"
//!   auth {
//!     server_address = "registry.example:5000"
//!     username       = "puller"
//!     password       = "…"
//!   }
//! }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use aimodel_driver::config::RegistryAuth;
use hf_cache::units::{Bytes, Dur};
use serde::Deserialize;

/// The block; its presence turns pull-ahead on (it needs `nomad { ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// The Docker engine of this node (the driver's `endpoint`).
    #[serde(default = "default_docker")]
    pub docker: String,
    /// This node's Nomad node ID (the agent reads its own node: driver health,
    /// GPUs, the driver's default images); default `$AIMODEL_NODE_ID`.
    #[serde(default)]
    pub node_id: Option<String>,
    /// No pull starts, and a running one stops, while the filesystem of
    /// `data_root` has less free space than this. `"0"` turns the guard off.
    #[serde(default = "default_min_free")]
    pub min_free: Bytes,
    /// Docker's data root as this process sees it (where images are stored).
    #[serde(default = "default_data_root")]
    pub data_root: PathBuf,
    /// A pull that reports no progress for this long is cancelled and retried
    /// later; a pull that progresses has no time limit.
    #[serde(default = "default_activity")]
    pub activity_timeout: Dur,
    /// An image pulled ahead that no job wants any more is removed after this
    /// long (unless a container uses it).
    #[serde(default = "default_remove_delay")]
    pub remove_delay: Dur,
    /// How often this node is read again from Nomad and what is wanted reconsidered.
    #[serde(default = "default_check_every")]
    pub check_every: Dur,
    /// Registry credentials, each sent only to its `server_address` (one
    /// `auth { ... }` block per registry).
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth: Vec<RegistryAuth>,
}

/// One HCL block decodes as a map, repeated blocks as a list: both are a list here.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<RegistryAuth>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(RegistryAuth),
        Many(Vec<RegistryAuth>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

fn default_docker() -> String {
    "unix:///var/run/docker.sock".into()
}
fn default_min_free() -> Bytes {
    Bytes(20 << 30)
}
fn default_data_root() -> PathBuf {
    PathBuf::from("/var/lib/docker")
}
fn default_activity() -> Dur {
    Dur(Duration::from_secs(120))
}
fn default_remove_delay() -> Dur {
    Dur(Duration::from_secs(180))
}
fn default_check_every() -> Dur {
    Dur(Duration::from_secs(30))
}

impl ImagesConfig {
    /// What is wrong with the block, if anything.
    pub fn check(&self) -> Result<(), String> {
        if !["unix://", "tcp://", "http://", "https://"].iter().any(|p| self.docker.starts_with(p)) {
            return Err(format!("images.docker {:?}: use unix:///var/run/docker.sock or tcp://host:2375", self.docker));
        }
        for (i, a) in self.auth.iter().enumerate() {
            if a.server_address.as_deref().is_none_or(|s| s.trim().is_empty()) {
                return Err(format!("images.auth[{i}]: server_address is required (credentials go only to it)"));
            }
        }
        for (field, d) in [("activity_timeout", self.activity_timeout), ("check_every", self.check_every)] {
            if d.0.is_zero() {
                return Err(format!("images.{field}: must be greater than zero"));
            }
        }
        Ok(())
    }

    /// The credentials for `image`'s registry, if any are configured.
    pub fn auth_for(&self, image: &str) -> Option<&RegistryAuth> {
        self.auth.iter().find(|a| {
            a.server_address.as_deref().is_some_and(|s| aimodel_driver::runtime::registry::credentials_apply(s, image))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_auth_block_or_several() {
        let one: ImagesConfig =
            hcl::from_str("auth {\n  server_address = \"r.example\"\n  password = \"p\"\n}\n").unwrap();
        assert_eq!(one.auth.len(), 1);
        assert!(one.auth_for("r.example/x:1").is_some() && one.auth_for("other.example/x").is_none());
        let two: ImagesConfig = hcl::from_str(
            "auth {\n  server_address = \"a.example\"\n}\nauth {\n  server_address = \"b.example:5000\"\n}\n",
        )
        .unwrap();
        assert_eq!(two.auth.len(), 2);
        assert!(two.auth_for("b.example:5000/x").is_some());
        assert!(format!("{two:?}").contains("a.example") && !format!("{one:?}").contains("\"p\""));
        let none: ImagesConfig = hcl::from_str("auth {\n  username = \"u\"\n}\n").unwrap();
        assert!(none.check().unwrap_err().contains("server_address is required"));
    }
}
