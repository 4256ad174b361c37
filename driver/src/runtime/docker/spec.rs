//! From our container spec to Docker's: host config (binds, ports, resources,
//! GPUs, devices, log rotation), image names, credentials; and Docker's
//! timestamped log lines back.

use std::collections::HashMap;

use bollard::auth::DockerCredentials;
use bollard::models::{DeviceRequest, HostConfig, PortBinding as DockerPortBinding};

use crate::config::RegistryAuth;
use crate::runtime::{ContainerSpec, GpuRequest, LogRecord, LogStream};
use crate::timefmt::parse_rfc3339_utc;

pub(super) fn credentials(auth: Option<&RegistryAuth>) -> Option<DockerCredentials> {
    auth.map(|a| DockerCredentials {
        username: a.username.clone(),
        password: a.password.clone(),
        serveraddress: a.server_address.clone(),
        ..Default::default()
    })
}

pub(super) fn split_image(image: &str) -> (String, String) {
    // The tag is after the last ':' unless that ':' belongs to a registry port.
    if let Some((name, digest)) = image.split_once('@') {
        return (name.to_string(), digest.to_string());
    }
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (image[..i].to_string(), image[i + 1..].to_string()),
        _ => (image.to_string(), "latest".to_string()),
    }
}

pub(super) fn host_config(spec: &ContainerSpec) -> HostConfig {
    // Each port for TCP and UDP, as the docker driver publishes Nomad's ports.
    let port_bindings: HashMap<String, Option<Vec<DockerPortBinding>>> = spec
        .ports
        .iter()
        .flat_map(|p| {
            let binding = DockerPortBinding {
                host_ip: Some(p.host_ip.clone()).filter(|s| !s.is_empty()),
                host_port: Some(p.host_port.to_string()),
            };
            ["tcp", "udp"].map(|proto| (format!("{}/{proto}", p.container_port), Some(vec![binding.clone()])))
        })
        .collect();
    let device_requests = spec.gpus.as_ref().map(|g| match g {
        GpuRequest::Uuids(ids) => vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(ids.clone()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }],
        GpuRequest::Count(n) => vec![DeviceRequest {
            driver: Some("nvidia".into()),
            count: Some(*n),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }],
        GpuRequest::Cdi(names) => {
            vec![DeviceRequest { driver: Some("cdi".into()), device_ids: Some(names.clone()), ..Default::default() }]
        }
    });
    let non_empty = |v: &Vec<String>| Some(v.clone()).filter(|v| !v.is_empty());
    HostConfig {
        binds: non_empty(&spec.binds),
        port_bindings: Some(port_bindings).filter(|m| !m.is_empty()),
        network_mode: Some(spec.network_mode.clone()).filter(|m| !m.is_empty()),
        memory: spec.memory_bytes,
        memory_reservation: spec.memory_reservation_bytes,
        cpu_shares: spec.cpu_shares,
        cpuset_cpus: spec.cpuset_cpus.clone(),
        shm_size: spec.shm_size,
        ipc_mode: spec.ipc_mode.clone(),
        privileged: Some(spec.privileged),
        device_requests,
        dns: non_empty(&spec.dns),
        dns_search: non_empty(&spec.dns_search),
        dns_options: non_empty(&spec.dns_options),
        devices: Some(
            spec.devices
                .iter()
                .map(|d| bollard::models::DeviceMapping {
                    path_on_host: Some(d.host_path.clone()),
                    path_in_container: Some(d.container_path.clone()),
                    cgroup_permissions: Some(d.permissions.clone()),
                })
                .collect(),
        )
        .filter(|v: &Vec<_>| !v.is_empty()),
        log_config: spec.log_max_size.as_ref().map(|size| bollard::models::HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), size.clone()),
                ("max-file".to_string(), spec.log_max_files.max(1).to_string()),
            ])),
        }),
        ..Default::default()
    }
}

/// Splits Docker's `timestamps=true` prefix (`RFC3339Nano ` + message) off a chunk.
pub(super) fn split_timestamp(stream: LogStream, bytes: &[u8]) -> LogRecord {
    if let Some(space) = bytes.iter().position(|b| *b == b' ') {
        if let Some(ts) = std::str::from_utf8(&bytes[..space]).ok().and_then(parse_rfc3339_utc) {
            return LogRecord { stream, ts, bytes: bytes[space + 1..].to_vec() };
        }
    }
    LogRecord { stream, ts: (0, 0), bytes: bytes.to_vec() }
}
