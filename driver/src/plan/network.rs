//! The network of a task's container: Docker's bridge with Nomad's ports
//! published (the docker driver's mapping), the node's network where the
//! operator allows it, or the group's namespace.

use std::collections::BTreeMap;

use crate::config::{ConfigError, PluginConfig, TaskConfig};
use crate::runtime::PortBinding;
use crate::types::{NetworkMode, NomadTask};

use super::{err, DOCKER_SANDBOX_LABEL};

/// The network a container gets.
pub(super) struct Net {
    pub(super) mode: String,
    pub(super) bindings: Vec<PortBinding>,
    /// The port the server listens on inside the container.
    pub(super) inside: u16,
    /// Where the host reaches it (ip, port).
    pub(super) host: Option<(String, u16)>,
    pub(super) port_map: BTreeMap<String, u16>,
    /// The address the server binds: every address of its own namespace, or,
    /// on the node's network, the one Nomad picked for the port.
    pub(super) bind: String,
}

/// Resolves the network: which ports to publish, which port the server listens
/// on inside the container, and the host port Nomad assigned to it.
pub(super) fn network(
    cfg: &TaskConfig,
    task: &NomadTask,
    plugin: &PluginConfig,
    default_port: u16,
) -> Result<Net, ConfigError> {
    let port_map: BTreeMap<String, u16> = task.ports.iter().map(|p| (p.label.clone(), p.value)).collect();
    let chosen = match &cfg.port {
        Some(label) => Some(task.ports.iter().find(|p| &p.label == label).ok_or_else(|| {
            let known: Vec<&str> = task.ports.iter().map(|p| p.label.as_str()).collect();
            err("port", format!("no port labelled {label:?} in the group's network block (known: {known:?})"))
        })?),
        None => None,
    };
    let host_network = match cfg.network_mode.as_deref() {
        Some("host") if task.network_mode != NetworkMode::Host => {
            return Err(err("network_mode", "\"host\" cannot be used in a group with a network block".into()))
        }
        Some("host") if !plugin.allow_host_network => return Err(err(
            "network_mode",
            "\"host\" puts the server on every interface of the node; it needs the plugin's allow_host_network = true"
                .into(),
        )),
        Some("host") => true,
        _ => false,
    };
    let any = "0.0.0.0".to_string();
    if host_network {
        // On the node's network the server binds the address Nomad assigned to
        // the port (`host_network`), not every interface.
        let ip = |p: &crate::types::NomadPort| {
            if p.host_ip.is_empty() || p.host_ip == "0.0.0.0" {
                None
            } else {
                Some(p.host_ip.clone())
            }
        };
        let (inside, host, bind) = match chosen {
            Some(p) => (
                p.value,
                Some((ip(p).unwrap_or_else(|| "127.0.0.1".into()), p.value)),
                ip(p).unwrap_or_else(|| any.clone()),
            ),
            None => (default_port, Some(("127.0.0.1".to_string(), default_port)), any.clone()),
        };
        return Ok(Net { mode: "host".into(), bindings: Vec::new(), inside, host, port_map, bind });
    }
    if cfg.network_mode.as_deref() == Some("none") || task.network_mode == NetworkMode::None {
        return Ok(Net {
            mode: "none".into(),
            bindings: Vec::new(),
            inside: default_port,
            host: None,
            port_map,
            bind: any,
        });
    }
    if task.network_mode == NetworkMode::Group {
        // The group's namespace. Created by a docker task (a Connect sidecar, a
        // docker driver's pause container): join it, publish nothing — Nomad's
        // network hook maps the group's ports into it (`drivers/docker/driver.go`
        // createContainerConfig, `client/allocrunner/network_manager_linux.go`).
        if let Some(sandbox) = task.network_labels.get(DOCKER_SANDBOX_LABEL).filter(|s| !s.is_empty()) {
            let (inside, host) = match chosen {
                Some(p) => {
                    let ip = if p.host_ip.is_empty() || p.host_ip == "0.0.0.0" { "127.0.0.1" } else { &p.host_ip };
                    (if p.to > 0 { p.to } else { p.value }, Some((ip.to_string(), p.value)))
                }
                None => (default_port, None),
            };
            return Ok(Net {
                mode: format!("container:{sandbox}"),
                bindings: Vec::new(),
                inside,
                host,
                port_map,
                bind: any,
            });
        }
        if !task.network_path.is_empty() {
            // Docker cannot join a namespace by path, and a namespace of our own
            // beside Nomad's would split the group.
            return Err(err(
                "network_mode",
                format!(
                    "the group's network namespace {} was not created by a docker task, and aimodel can only join one \
                     that was: add a docker task to the group (a Consul Connect sidecar is one) or remove the group's \
                     network mode",
                    task.network_path
                ),
            ));
        }
    }
    // As the docker driver does (`drivers/docker/driver.go` createContainerConfig):
    // Docker's bridge, the task's ports (its `port` and `ports` labels; not the
    // other tasks' of the group) published on the address Nomad picked,
    // `host_ip:value → to` (`to` defaults to the value); the server listens on `to`.
    for label in &cfg.ports {
        if !task.ports.iter().any(|p| &p.label == label) {
            let known: Vec<&str> = task.ports.iter().map(|p| p.label.as_str()).collect();
            return Err(err(
                "ports",
                format!("no port labelled {label:?} in the group's network block (known: {known:?})"),
            ));
        }
    }
    let bindings = task
        .ports
        .iter()
        .filter(|p| cfg.port.as_ref() == Some(&p.label) || cfg.ports.contains(&p.label))
        .map(|p| PortBinding {
            container_port: if p.to > 0 { p.to } else { p.value },
            host_ip: p.host_ip.clone(),
            host_port: p.value,
        })
        .collect();
    let (inside, host) = match chosen {
        Some(p) => {
            let ip = if p.host_ip.is_empty() || p.host_ip == "0.0.0.0" { "127.0.0.1" } else { &p.host_ip };
            (if p.to > 0 { p.to } else { p.value }, Some((ip.to_string(), p.value)))
        }
        None => (default_port, None),
    };
    Ok(Net { mode: "bridge".into(), bindings, inside, host, port_map, bind: any })
}
