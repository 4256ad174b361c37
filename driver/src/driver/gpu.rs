//! GPUs through NVML (nvml-wrapper, imported only here): a small probe trait,
//! fingerprint attributes, health from XID/ECC events, per-process usage.
//! Every NVML call runs on a blocking thread under a timeout, and a hung call
//! is never stacked on: the fingerprint reports it and keeps flowing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::Nvml;

use crate::types::AttrValue;

/// Longest an NVML probe may take before the fingerprint gives up waiting.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// XIDs caused by applications, not by the GPU (nomad-device-nvidia's list).
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// One MIG instance.
#[derive(Debug, Clone, PartialEq)]
pub struct MigInfo {
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
}

/// One GPU as NVML describes it; `error` is set when the GPU cannot be queried.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_mib: u64,
    pub compute_capability: String,
    pub pci_bus_id: String,
    pub mig_enabled: bool,
    pub mig: Vec<MigInfo>,
    pub error: Option<String>,
}

/// Every GPU of the node plus the driver versions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuSnapshot {
    pub driver_version: String,
    pub cuda_driver_version: String,
    pub gpus: Vec<GpuInfo>,
}

/// A GPU-fatal event.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuEvent {
    pub uuid: String,
    /// The GPU's index, for when its uuid can no longer be read (it fell off the bus).
    pub index: Option<u32>,
    pub what: String,
}

/// GPU usage by one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessGpu {
    pub pid: u32,
    pub used_bytes: u64,
}

/// What went wrong asking NVML.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML unavailable ({library}): {source}")]
    Unavailable {
        library: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("NVML {call}: {source}")]
    Nvml {
        call: &'static str,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("NVML did not answer within {0:?}")]
    Timeout(Duration),
    #[error("an NVML call is still hung from an earlier probe")]
    Hung,
    #[error("the NVML probe failed: {0}")]
    Probe(String),
}

fn nvml(call: &'static str) -> impl FnOnce(nvml_wrapper::error::NvmlError) -> GpuError {
    move |source| GpuError::Nvml { call, source }
}

/// NVML behind a trait, so the monitor is testable and the real library optional.
pub trait GpuProbe: Send + Sync + 'static {
    /// All GPUs; an error when NVML itself fails.
    fn snapshot(&self) -> Result<GpuSnapshot, GpuError>;
    /// The next fatal event within `timeout_ms`, if any.
    fn next_event(&self, timeout_ms: u32) -> Result<Option<GpuEvent>, GpuError>;
    /// Processes on a GPU and the GPU's utilisation percent.
    fn usage(&self, uuid: &str) -> Result<(Vec<ProcessGpu>, u32), GpuError>;
}

/// The real probe over nvml-wrapper.
pub struct NvmlProbe {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlProbe").finish_non_exhaustive()
    }
}

impl NvmlProbe {
    /// Loads NVML from `library` (a path or a name the dynamic loader resolves).
    pub fn load(library: &str) -> Result<Self, GpuError> {
        Nvml::builder()
            .lib_path(std::ffi::OsStr::new(library))
            .init()
            .map(|nvml| NvmlProbe { nvml })
            .map_err(|source| GpuError::Unavailable { library: library.into(), source })
    }

    fn gpu(&self, index: u32) -> GpuInfo {
        let mut g = GpuInfo { index, ..Default::default() };
        let result = (|| -> Result<(), nvml_wrapper::error::NvmlError> {
            let d = self.nvml.device_by_index(index)?;
            g.uuid = d.uuid()?;
            g.name = d.name()?;
            g.memory_mib = d.memory_info()?.total >> 20;
            let cc = d.cuda_compute_capability()?;
            g.compute_capability = format!("{}.{}", cc.major, cc.minor);
            g.pci_bus_id = d.pci_info().map(|p| p.bus_id).unwrap_or_default();
            // Older GPUs and drivers have no MIG: not an error.
            g.mig_enabled = d.mig_mode().map(|m| m.current == 1).unwrap_or(false);
            if g.mig_enabled {
                for j in 0..d.mig_device_count().unwrap_or(0) {
                    if let Ok(m) = d.mig_device_by_index(j) {
                        g.mig.push(MigInfo {
                            uuid: m.uuid().unwrap_or_default(),
                            name: m.name().unwrap_or_default(),
                            memory_mib: m.memory_info().map(|i| i.total >> 20).unwrap_or(0),
                        });
                    }
                }
            }
            if d.are_pages_pending_retired().unwrap_or(false) {
                g.error = Some("retired pages pending: the GPU needs a reset".into());
            }
            Ok(())
        })();
        if let Err(e) = result {
            g.error = Some(e.to_string());
        }
        g
    }
}

impl GpuProbe for NvmlProbe {
    fn snapshot(&self) -> Result<GpuSnapshot, GpuError> {
        let count = self.nvml.device_count().map_err(nvml("device count"))?;
        let cuda = self.nvml.sys_cuda_driver_version().unwrap_or(0);
        Ok(GpuSnapshot {
            driver_version: self.nvml.sys_driver_version().unwrap_or_default(),
            cuda_driver_version: if cuda > 0 { format!("{}.{}", cuda / 1000, cuda % 1000 / 10) } else { String::new() },
            gpus: (0..count).map(|i| self.gpu(i)).collect(),
        })
    }

    fn next_event(&self, timeout_ms: u32) -> Result<Option<GpuEvent>, GpuError> {
        let mut set = self.nvml.create_event_set().map_err(nvml("event set"))?;
        let count = self.nvml.device_count().map_err(nvml("device count"))?;
        let types = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
        for i in 0..count {
            let Ok(d) = self.nvml.device_by_index(i) else { continue };
            // A GPU that no longer answers cannot register; a failed registration
            // frees the set, so only GPUs that answer are registered.
            if d.uuid().is_err() {
                continue;
            }
            set = match d.register_events(types, set) {
                Ok(s) => s,
                Err(e) => return Err(GpuError::Nvml { call: "register events", source: e.error }),
            };
        }
        match set.wait(timeout_ms) {
            Ok(e) => {
                let uuid = e.device.uuid().unwrap_or_default();
                let index = e.device.index().ok();
                let what = if e.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    "double-bit ECC error".to_string()
                } else {
                    match e.event_data {
                        Some(XidError::Value(x)) if APPLICATION_XIDS.contains(&x) => return Ok(None),
                        Some(XidError::Value(x)) => format!("XID {x}"),
                        _ => "XID (unknown)".into(),
                    }
                };
                Ok(Some(GpuEvent { uuid, index, what }))
            }
            Err(nvml_wrapper::error::NvmlError::Timeout) => Ok(None),
            Err(e) => Err(GpuError::Nvml { call: "wait for events", source: e }),
        }
    }

    fn usage(&self, uuid: &str) -> Result<(Vec<ProcessGpu>, u32), GpuError> {
        let d = self.nvml.device_by_uuid(uuid).map_err(nvml("device by uuid"))?;
        let procs = d
            .running_compute_processes()
            .map_err(nvml("running compute processes"))?
            .into_iter()
            .map(|p| ProcessGpu {
                pid: p.pid,
                used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
            })
            .collect();
        let util = d.utilization_rates().map(|u| u.gpu).unwrap_or(0);
        Ok((procs, util))
    }
}

/// GPU state shared by the fingerprint, the event loop and stats.
pub struct GpuMonitor {
    probe: Mutex<Option<Arc<dyn GpuProbe>>>,
    load_error: Mutex<Option<String>>,
    in_flight: Arc<AtomicBool>,
    last: Mutex<Option<GpuSnapshot>>,
    /// GPUs hit by a fatal event, until a later probe finds them usable.
    fatal: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for GpuMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMonitor").finish_non_exhaustive()
    }
}

/// What the fingerprint learns about GPUs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuStatus {
    pub attributes: BTreeMap<String, AttrValue>,
    /// Problems that concern single GPUs (named in the description).
    pub notes: Vec<String>,
    /// True when no usable GPU was found.
    pub none_usable: bool,
}

impl GpuMonitor {
    /// A monitor around `probe` (or the error that prevented loading NVML).
    pub fn new(probe: Result<Arc<dyn GpuProbe>, GpuError>) -> Arc<Self> {
        let (p, e) = match probe {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        Arc::new(GpuMonitor {
            probe: Mutex::new(p),
            load_error: Mutex::new(e.map(|e| e.to_string())),
            in_flight: Arc::new(AtomicBool::new(false)),
            last: Mutex::new(None),
            fatal: Mutex::new(BTreeMap::new()),
        })
    }

    fn probe(&self) -> Option<Arc<dyn GpuProbe>> {
        self.probe.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a fatal event (from the event loop); fills in the uuid from the
    /// last snapshot when NVML could not read it any more.
    pub fn record_fatal(&self, ev: &mut GpuEvent) {
        if ev.uuid.is_empty() {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(g) = last.as_ref().and_then(|s| s.gpus.iter().find(|g| Some(g.index) == ev.index)) {
                ev.uuid = g.uuid.clone();
            }
        }
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).insert(ev.uuid.clone(), ev.what.clone());
    }

    /// GPU attributes and notes for one fingerprint.
    pub async fn status(self: &Arc<Self>) -> GpuStatus {
        let mut st = GpuStatus::default();
        let Some(probe) = self.probe() else {
            let why = self.load_error.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
            st.attributes.insert("driver.aimodel.gpu.count".into(), AttrValue::Int(0));
            st.notes.push(format!("no GPUs: {why}"));
            st.none_usable = true;
            return st;
        };
        let snap = if self.in_flight.swap(true, Ordering::SeqCst) {
            Err(GpuError::Hung)
        } else {
            let flag = self.in_flight.clone();
            let call = tokio::task::spawn_blocking(move || {
                let r = probe.snapshot();
                flag.store(false, Ordering::SeqCst);
                r
            });
            match tokio::time::timeout(PROBE_TIMEOUT, call).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(GpuError::Probe(e.to_string())),
                Err(_) => Err(GpuError::Timeout(PROBE_TIMEOUT)),
            }
        };
        let snap = match snap {
            Ok(mut s) => {
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                // A GPU that stopped answering keeps what we knew of it, so it is
                // still named (and matched to its fatal event) while it is gone.
                for g in s.gpus.iter_mut().filter(|g| g.error.is_some() && g.uuid.is_empty()) {
                    if let Some(prev) = last.as_ref().and_then(|l| l.gpus.iter().find(|p| p.index == g.index)) {
                        let error = g.error.take();
                        *g = GpuInfo { error, ..prev.clone() };
                    }
                }
                *last = Some(s.clone());
                s
            }
            Err(e) => {
                st.notes.push(e.to_string());
                match self.last.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    Some(s) => s,
                    None => {
                        st.none_usable = true;
                        return st;
                    }
                }
            }
        };
        self.describe(&snap, &mut st);
        st
    }

    fn describe(&self, snap: &GpuSnapshot, st: &mut GpuStatus) {
        let a = &mut st.attributes;
        a.insert("driver.aimodel.gpu.count".into(), AttrValue::Int(i64::try_from(snap.gpus.len()).unwrap_or(i64::MAX)));
        a.insert("driver.aimodel.nvidia.driver_version".into(), AttrValue::Str(snap.driver_version.clone()));
        a.insert("driver.aimodel.nvidia.cuda_driver_version".into(), AttrValue::Str(snap.cuda_driver_version.clone()));
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        let mut usable = 0;
        for g in &snap.gpus {
            let p = format!("driver.aimodel.gpu.{}", g.index);
            if !g.uuid.is_empty() {
                a.insert(format!("{p}.uuid"), AttrValue::Str(g.uuid.clone()));
                a.insert(format!("{p}.name"), AttrValue::Str(g.name.clone()));
                a.insert(format!("{p}.memory_mib"), AttrValue::Int(i64::try_from(g.memory_mib).unwrap_or(i64::MAX)));
                a.insert(format!("{p}.compute_capability"), AttrValue::Str(g.compute_capability.clone()));
                a.insert(format!("{p}.pci_bus_id"), AttrValue::Str(g.pci_bus_id.clone()));
                a.insert(format!("{p}.mig"), AttrValue::Bool(g.mig_enabled));
                for (j, m) in g.mig.iter().enumerate() {
                    a.insert(format!("{p}.mig.{j}.uuid"), AttrValue::Str(m.uuid.clone()));
                    a.insert(format!("{p}.mig.{j}.name"), AttrValue::Str(m.name.clone()));
                    a.insert(
                        format!("{p}.mig.{j}.memory_mib"),
                        AttrValue::Int(i64::try_from(m.memory_mib).unwrap_or(i64::MAX)),
                    );
                }
            }
            let event = fatal.get(&g.uuid).cloned();
            let healthy = g.error.is_none() && event.is_none();
            a.insert(format!("{p}.healthy"), AttrValue::Bool(healthy));
            if let Some(what) = &event {
                st.notes.push(format!("GPU {} ({}): {what}", g.index, g.uuid));
                // Reported once; it stays only while NVML says the GPU is unusable.
                if g.error.is_none() {
                    fatal.remove(&g.uuid);
                }
            }
            if let Some(e) = &g.error {
                st.notes.push(format!(
                    "GPU {} ({}) not usable: {e}",
                    g.index,
                    if g.uuid.is_empty() { "?" } else { &g.uuid }
                ));
            }
            usable += usize::from(healthy);
        }
        st.none_usable = usable == 0;
    }

    /// Total memory (MiB) of the given GPUs / MIG instances, from the last snapshot.
    pub fn memory_of(&self, uuids: &[String]) -> u64 {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = last.as_ref() else { return 0 };
        let mut total = 0;
        for g in &s.gpus {
            if uuids.contains(&g.uuid) {
                total += g.memory_mib;
            }
            total += g.mig.iter().filter(|m| uuids.contains(&m.uuid)).map(|m| m.memory_mib).sum::<u64>();
        }
        total
    }

    /// UUIDs of the GPUs NVML knows (from the last snapshot).
    pub fn known_uuids(&self) -> BTreeSet<String> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter()
            .flat_map(|s| {
                s.gpus.iter().flat_map(|g| std::iter::once(g.uuid.clone()).chain(g.mig.iter().map(|m| m.uuid.clone())))
            })
            .collect()
    }

    /// GPU memory used by `pids` and utilisation, per GPU uuid (blocking, timed out).
    pub async fn usage_of(&self, uuids: &[String], pids: &BTreeSet<u32>) -> BTreeMap<String, (u64, u32)> {
        let Some(probe) = self.probe() else { return BTreeMap::new() };
        let (uuids, pids) = (uuids.to_vec(), pids.clone());
        let call = tokio::task::spawn_blocking(move || {
            uuids
                .iter()
                .filter_map(|u| {
                    let (procs, util) = probe.usage(u).ok()?;
                    let used = procs.iter().filter(|p| pids.contains(&p.pid)).map(|p| p.used_bytes).sum();
                    Some((u.clone(), (used, util)))
                })
                .collect()
        });
        tokio::time::timeout(PROBE_TIMEOUT, call).await.ok().and_then(Result::ok).unwrap_or_default()
    }

    /// Waits for fatal events until `stop`; each is recorded and passed to `notify`.
    pub fn run_events(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        notify: impl Fn(GpuEvent) + Send + 'static,
    ) {
        let Some(probe) = self.probe() else { return };
        std::thread::Builder::new()
            .name("nvml-events".into())
            .spawn(move || {
                while !stop.is_cancelled() {
                    match probe.next_event(500) {
                        Ok(Some(mut ev)) => {
                            self.record_fatal(&mut ev);
                            notify(ev);
                        }
                        Ok(None) => {}
                        Err(_) => std::thread::sleep(Duration::from_secs(5)),
                    }
                }
            })
            .ok();
    }
}
