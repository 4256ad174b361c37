//! Our .proto files must match Nomad's wire facts exactly (shared/nomad-wire.md §1.3, §3).
//! Each row is (message, field, number, type); a drift in any of them fails here.

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

fn set() -> FileDescriptorSet {
    FileDescriptorSet::decode(aimodel_proto::FILE_DESCRIPTOR_SET).unwrap()
}

fn find<'a>(set: &'a FileDescriptorSet, full: &str) -> &'a DescriptorProto {
    for f in &set.file {
        let pkg = f.package();
        for m in &f.message_type {
            if let Some(d) = walk(m, pkg, full) {
                return d;
            }
        }
    }
    panic!("message {full} not found");
}

fn walk<'a>(m: &'a DescriptorProto, prefix: &str, full: &str) -> Option<&'a DescriptorProto> {
    let name = format!("{prefix}.{}", m.name());
    if name == full {
        return Some(m);
    }
    m.nested_type.iter().find_map(|n| walk(n, &name, full))
}

const D: &str = "hashicorp.nomad.plugins.drivers.proto";
const B: &str = "hashicorp.nomad.plugins.base.proto";
const H: &str = "hashicorp.nomad.plugins.shared.hclspec";
const S: &str = "hashicorp.nomad.plugins.shared.structs";

#[test]
fn field_numbers_and_types_match_nomad() {
    use Type::*;
    let rows: &[(&str, &str, &str, i32, Type)] = &[
        (B, "PluginInfoResponse", "type", 1, Enum),
        (B, "PluginInfoResponse", "plugin_api_versions", 2, String),
        (B, "PluginInfoResponse", "plugin_version", 3, String),
        (B, "PluginInfoResponse", "name", 4, String),
        (B, "SetConfigRequest", "msgpack_config", 1, Bytes),
        (B, "SetConfigRequest", "nomad_config", 2, Message),
        (B, "SetConfigRequest", "plugin_api_version", 3, String),
        (B, "NomadDriverConfig", "ClientMaxPort", 1, Uint32),
        (B, "NomadDriverConfig", "ClientMinPort", 2, Uint32),
        (B, "NomadDriverConfig", "Topology", 3, Message),
        (B, "ClientTopology", "override_withold_compute", 5, Uint64),
        (B, "ClientTopologySLIT", "values", 2, Uint32),
        (B, "ClientTopologyCore", "guess_speed", 8, Uint64),
        (D, "FingerprintResponse", "attributes", 1, Message),
        (D, "FingerprintResponse", "health", 2, Enum),
        (D, "FingerprintResponse", "health_description", 3, String),
        (D, "FingerprintResponse", "err", 4, String),
        (D, "RecoverTaskRequest", "handle", 2, Message),
        (D, "StartTaskResponse", "handle", 3, Message),
        (D, "StartTaskResponse", "network_override", 4, Message),
        (D, "StopTaskRequest", "timeout", 2, Message),
        (D, "StopTaskRequest", "signal", 3, String),
        (D, "DriverCapabilities", "fs_isolation", 3, Enum),
        (D, "DriverCapabilities", "network_isolation_modes", 4, Enum),
        (D, "DriverCapabilities", "mount_configs", 6, Enum),
        (D, "DriverCapabilities", "disable_log_collection", 8, Bool),
        (D, "DriverCapabilities", "dynamic_workload_users", 9, Bool),
        (D, "NetworkIsolationSpec", "hostsConfig", 4, Message),
        (D, "TaskConfig", "msgpack_driver_config", 3, Bytes),
        (D, "TaskConfig", "device_env", 5, Message),
        (D, "TaskConfig", "stdout_path", 11, String),
        (D, "TaskConfig", "alloc_id", 15, String),
        (D, "TaskConfig", "dns", 17, Message),
        (D, "TaskConfig", "node_id", 21, String),
        (D, "TaskConfig", "parent_job_id", 22, String),
        (D, "AllocatedTaskResources", "networks", 5, Message),
        (D, "AllocatedMemoryResources", "memory_mb", 2, Int64),
        (D, "AllocatedMemoryResources", "memory_max_mb", 3, Int64),
        (D, "PortMapping", "host_ip", 4, String),
        (D, "LinuxResources", "PercentTicks", 8, Double),
        (D, "LinuxResources", "cpuset_cgroup", 9, String),
        (D, "Mount", "request_name", 6, String),
        (D, "TaskHandle", "version", 1, Int32),
        (D, "TaskHandle", "driver_state", 4, Bytes),
        (D, "NetworkOverride", "port_map", 1, Message),
        (D, "ExitResult", "oom_killed", 3, Bool),
        (D, "TaskStatus", "completed_at", 5, Message),
        (D, "TaskStats", "agg_resource_usage", 3, Message),
        (D, "CPUUsage", "measured_fields", 7, Enum),
        (D, "MemoryUsage", "measured_fields", 6, Enum),
        (D, "MemoryUsage", "usage", 7, Uint64),
        (D, "MemoryUsage", "swap", 8, Uint64),
        (D, "DriverTaskEvent", "annotations", 6, Message),
        (D, "ExecTaskStreamingRequest", "stdin", 3, Message),
        (D, "ExecTaskStreamingRequest.TerminalSize", "width", 2, Int32),
        (D, "ExecTaskStreamingResponse", "result", 4, Message),
        (H, "Spec", "Attr", 3, Message),
        (H, "Spec", "block_value", 4, Message),
        (H, "Spec", "default", 9, Message),
        (H, "Spec", "literal", 10, Message),
        (H, "BlockList", "nested", 4, Message),
        (H, "BlockMap", "labels", 2, String),
        (H, "Default", "default", 2, Message),
        (S, "Attribute", "int_val", 2, Int64),
        (S, "Attribute", "bool_val", 4, Bool),
        (S, "Attribute", "unit", 5, String),
        (S, "RecoverableError", "recoverable", 1, Bool),
        ("plugin", "ConnInfo", "knock", 4, Message),
        ("plugin", "ConnInfo.Knock", "error", 3, String),
        ("plugin", "StdioData", "channel", 1, Enum),
        ("plugin", "StdioData", "data", 2, Bytes),
    ];
    let set = set();
    for (pkg, msg, field, number, ty) in rows {
        let m = find(&set, &format!("{pkg}.{msg}"));
        let f = m.field.iter().find(|f| f.name() == *field).unwrap_or_else(|| panic!("{msg}.{field} missing"));
        assert_eq!(f.number(), *number, "{msg}.{field} number");
        assert_eq!(f.r#type(), *ty, "{msg}.{field} type");
    }
    let caps = find(&set, &format!("{D}.DriverCapabilities"));
    assert!(caps.reserved_range.iter().any(|r| r.start() == 7), "field 7 of DriverCapabilities must be reserved");
    assert!(caps.field.iter().all(|f| f.number() != 7));
}

#[test]
fn services_and_methods_match_nomad() {
    let set = set();
    let methods = |pkg: &str, svc: &str| -> Vec<String> {
        set.file
            .iter()
            .filter(|f| f.package() == pkg)
            .flat_map(|f| &f.service)
            .find(|s| s.name() == svc)
            .unwrap_or_else(|| panic!("service {pkg}.{svc} missing"))
            .method
            .iter()
            .map(|m| {
                let kind = match (m.client_streaming(), m.server_streaming()) {
                    (false, false) => "unary",
                    (false, true) => "server-stream",
                    (true, true) => "bidi",
                    (true, false) => "client-stream",
                };
                format!("{}:{kind}", m.name())
            })
            .collect()
    };
    assert_eq!(methods(B, "BasePlugin"), ["PluginInfo:unary", "ConfigSchema:unary", "SetConfig:unary"]);
    let mut driver = methods(D, "Driver");
    driver.sort();
    let mut want = vec![
        "Init:unary",
        "TaskConfigSchema:unary",
        "Capabilities:unary",
        "Fingerprint:server-stream",
        "RecoverTask:unary",
        "StartTask:unary",
        "WaitTask:unary",
        "StopTask:unary",
        "DestroyTask:unary",
        "InspectTask:unary",
        "TaskStats:server-stream",
        "TaskEvents:server-stream",
        "Shutdown:unary",
        "SignalTask:unary",
        "ExecTask:unary",
        "ExecTaskStreaming:bidi",
        "CreateNetwork:unary",
        "DestroyNetwork:unary",
    ];
    want.sort();
    assert_eq!(driver, want);
    assert_eq!(methods("plugin", "GRPCController"), ["Shutdown:unary"]);
    assert_eq!(methods("plugin", "GRPCStdio"), ["StreamStdio:server-stream"]);
    assert_eq!(methods("plugin", "GRPCBroker"), ["StartStream:bidi"]);
}

#[test]
fn enum_values_match_nomad() {
    use aimodel_proto::base::PluginType;
    use aimodel_proto::drivers::{driver_capabilities::FsIsolation, fingerprint_response::HealthState, TaskState};
    assert_eq!(PluginType::Driver as i32, 2);
    assert_eq!(PluginType::Device as i32, 3);
    assert_eq!(HealthState::Healthy as i32, 2);
    assert_eq!(FsIsolation::Image as i32, 2);
    assert_eq!(FsIsolation::Unveil as i32, 3);
    assert_eq!(TaskState::Exited as i32, 2);
}
