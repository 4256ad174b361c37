//! Proto ↔ domain conversions, all in one place.

use std::time::{Duration, SystemTime};

use aimodel_proto::drivers::{self as pb, network_isolation_spec::NetworkIsolationMode};
use aimodel_proto::structs;

use crate::types::{AttrValue, ExitResult, TaskEvent, TaskUsage};
use crate::types::{NetworkMode, NomadDevice, NomadMount, NomadPort, NomadTask};

/// Nomad's TaskConfig as our domain task.
pub fn task_from_proto(c: &pb::TaskConfig) -> NomadTask {
    let res = c.resources.as_ref();
    let alloc = res.and_then(|r| r.allocated_resources.as_ref());
    let linux = res.and_then(|r| r.linux_resources.as_ref());
    let memory = alloc.and_then(|a| a.memory.as_ref());
    let mut ports: Vec<NomadPort> = res
        .map(|r| {
            r.ports
                .iter()
                .map(|p| NomadPort {
                    label: p.label.clone(),
                    value: u16::try_from(p.value).unwrap_or(0),
                    to: u16::try_from(p.to).unwrap_or(0),
                    host_ip: p.host_ip.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    // Task-level (legacy) networks carry host-mode ports; add any label not already known.
    for net in alloc.map(|a| a.networks.as_slice()).unwrap_or_default() {
        for p in net.reserved_ports.iter().chain(&net.dynamic_ports) {
            if !ports.iter().any(|q| q.label == p.label) {
                let value = u16::try_from(p.value).unwrap_or(0);
                ports.push(NomadPort { label: p.label.clone(), value, to: value, host_ip: net.ip.clone() });
            }
        }
    }
    let isolation = c.network_isolation_spec.as_ref();
    let network_mode = match isolation.map(|n| n.mode()) {
        Some(NetworkIsolationMode::Group) => NetworkMode::Group,
        Some(NetworkIsolationMode::None) => NetworkMode::None,
        _ => NetworkMode::Host,
    };
    let dns = c.dns.clone().unwrap_or_default();
    NomadTask {
        id: c.id.clone(),
        name: c.name.clone(),
        alloc_id: c.alloc_id.clone(),
        job_name: c.job_name.clone(),
        job_id: c.job_id.clone(),
        namespace: c.namespace.clone(),
        group: c.task_group_name.clone(),
        node_name: c.node_name.clone(),
        user: c.user.clone(),
        alloc_dir: c.alloc_dir.clone(),
        stdout_path: c.stdout_path.clone(),
        stderr_path: c.stderr_path.clone(),
        env: c.env.clone().into_iter().collect(),
        device_env: c.device_env.clone().into_iter().collect(),
        memory_mb: memory.map_or(0, |m| m.memory_mb),
        memory_max_mb: memory.map_or(0, |m| m.memory_max_mb),
        cpu_shares: alloc.and_then(|a| a.cpu.as_ref()).map_or(0, |c| c.cpu_shares),
        cpuset_cpus: linux.map(|l| l.cpuset_cpus.clone()).unwrap_or_default(),
        percent_ticks: linux.map_or(0.0, |l| l.percent_ticks),
        cpuset_cgroup: linux.map(|l| l.cpuset_cgroup.clone()).unwrap_or_default(),
        ports,
        mounts: c
            .mounts
            .iter()
            .map(|m| NomadMount {
                host_path: m.host_path.clone(),
                task_path: m.task_path.clone(),
                readonly: m.readonly,
                propagation: m.propagation_mode.clone(),
            })
            .collect(),
        network_mode,
        network_path: isolation.map(|n| n.path.clone()).unwrap_or_default(),
        network_labels: isolation.map(|n| n.labels.clone().into_iter().collect()).unwrap_or_default(),
        devices: c
            .devices
            .iter()
            .map(|d| NomadDevice {
                host_path: d.host_path.clone(),
                task_path: d.task_path.clone(),
                permissions: d.cgroup_permissions.clone(),
            })
            .collect(),
        dns_servers: dns.servers,
        dns_searches: dns.searches,
        dns_options: dns.options,
    }
}

/// A Go-style duration from a proto Duration (missing: zero).
pub fn duration(d: Option<&prost_types::Duration>) -> Duration {
    d.map(|d| Duration::new(u64::try_from(d.seconds).unwrap_or(0), u32::try_from(d.nanos).unwrap_or(0)))
        .unwrap_or_default()
}

/// Our exit result as Nomad's.
pub fn exit_to_proto(r: &ExitResult) -> pb::ExitResult {
    pb::ExitResult { exit_code: r.exit_code, signal: r.signal, oom_killed: r.oom_killed }
}

/// A domain attribute as Nomad's typed attribute.
pub fn attribute_to_proto(v: AttrValue) -> structs::Attribute {
    use structs::attribute::Value;
    let value = match v {
        AttrValue::Bool(b) => Value::BoolVal(b),
        AttrValue::Int(i) => Value::IntVal(i),
        AttrValue::Float(f) => Value::FloatVal(f),
        AttrValue::Str(s) => Value::StringVal(s),
    };
    structs::Attribute { value: Some(value), unit: String::new() }
}

/// A task event as Nomad's.
pub fn event_to_proto(ev: TaskEvent) -> pb::DriverTaskEvent {
    pb::DriverTaskEvent {
        task_id: ev.task_id,
        alloc_id: ev.alloc_id,
        task_name: ev.task_name,
        timestamp: Some(prost_types::Timestamp::from(ev.at)),
        message: ev.message,
        annotations: ev.annotations.into_iter().collect(),
    }
}

/// A usage sample as Nomad's TaskStats; timestamp and aggregate always set.
pub fn stats_to_proto(id: &str, u: &TaskUsage) -> pb::TaskStats {
    use pb::cpu_usage::Fields as C;
    use pb::memory_usage::Fields as M;
    let cpu = pb::CpuUsage {
        system_mode: u.cpu_system_ms,
        user_mode: u.cpu_user_ms,
        // (Percentages, as Nomad's drivers report them.)
        total_ticks: u.total_ticks,
        throttled_periods: u.raw.throttled_periods,
        throttled_time: u.raw.throttled_time_ns,
        percent: u.cpu_percent,
        measured_fields: [C::SystemMode, C::UserMode, C::TotalTicks, C::ThrottledPeriods, C::ThrottledTime, C::Percent]
            .iter()
            .map(|f| *f as i32)
            .collect(),
    };
    let memory = pb::MemoryUsage {
        rss: u.raw.mem_rss,
        cache: u.raw.mem_cache,
        max_usage: u.raw.mem_max,
        usage: u.raw.mem_usage,
        swap: u.raw.mem_swap,
        measured_fields: [M::Rss, M::Cache, M::MaxUsage, M::Usage, M::Swap].iter().map(|f| *f as i32).collect(),
        ..Default::default()
    };
    // Nomad's stats have no GPU fields: each GPU the task uses is reported as a
    // pseudo-process `gpu:<uuid>` (memory usage = GPU memory of the task's
    // processes, cpu percent = GPU utilisation).
    let resource_usage_by_pid = u
        .gpus
        .iter()
        .map(|(uuid, (bytes, util))| {
            let usage = pb::TaskResourceUsage {
                cpu: Some(pb::CpuUsage {
                    percent: f64::from(*util),
                    measured_fields: vec![C::Percent as i32],
                    ..Default::default()
                }),
                memory: Some(pb::MemoryUsage {
                    usage: *bytes,
                    measured_fields: vec![M::Usage as i32],
                    ..Default::default()
                }),
            };
            (format!("gpu:{uuid}"), usage)
        })
        .collect();
    pb::TaskStats {
        id: id.into(),
        timestamp: Some(prost_types::Timestamp::from(u.at.unwrap_or_else(SystemTime::now))),
        agg_resource_usage: Some(pb::TaskResourceUsage { cpu: Some(cpu), memory: Some(memory) }),
        resource_usage_by_pid,
    }
}
