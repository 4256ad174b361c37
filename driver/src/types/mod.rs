//! Types shared by the layers, in Nomad's vocabulary and free of protobuf:
//! what Nomad tells us about a task ([`NomadTask`]), what we keep to recover it
//! ([`DriverState`]), and what the driver core reports back (fingerprints,
//! events, exit results, usage).

mod task;

pub use task::*;

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::runtime::Stats;

/// A node attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

/// Driver health as Nomad models it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Undetected,
    Unhealthy,
    Healthy,
}

/// One fingerprint: attributes and health.
#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub attributes: BTreeMap<String, AttrValue>,
    pub health: Health,
    pub description: String,
}

/// A task event for the TaskEvents stream.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEvent {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
    pub at: SystemTime,
    pub message: String,
    pub annotations: BTreeMap<String, String>,
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitResult {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    pub err: Option<String>,
}

/// What StartTask returns to Nomad.
#[derive(Debug)]
pub struct Started {
    pub state: DriverState,
    pub port_map: BTreeMap<String, u16>,
}

/// A StatsSample with the rates Nomad wants.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaskUsage {
    pub at: Option<SystemTime>,
    pub cpu_percent: f64,
    pub cpu_user_ms: f64,
    pub cpu_system_ms: f64,
    pub total_ticks: f64,
    pub raw: Stats,
    /// GPU uuid → (memory used by the task's processes, GPU utilisation percent).
    pub gpus: BTreeMap<String, (u64, u32)>,
}
