//! A fake `libnvidia-ml.so` for tests on machines without a GPU. Everything it
//! reports comes from the JSON file named by `FAKE_NVML_CONFIG`, re-read on every
//! call so tests can change values, lose a GPU or raise events while the plugin
//! runs. Struct layouts come from nvml-wrapper-sys, so they match what
//! nvml-wrapper passes in.
//!
//! ```json
//! { "driver_version": "550.54.15", "cuda_version": 12040,
//!   "init_error": 9, "hang_ms": 0, "hang": ["nvmlDeviceGetMemoryInfo_v2"],
//!   "missing": ["nvmlDeviceGetMigMode"],
//!   "gpus": [{ "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-…", "memory_mib": 81920,
//!              "used_mib": 0, "cc": [8, 0], "pci_bus_id": "00000000:07:00.0",
//!              "mig": false, "mig_devices": [{ "uuid": "MIG-…", "name": "…", "memory_mib": 10240 }],
//!              "lost": false, "pages_pending": false, "util": [0, 0],
//!              "processes": [{ "pid": 123, "used_mib": 1024 }] }],
//!   "events": [{ "gpu": 0, "kind": "xid", "data": 79 }] }
//! ```
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlProcessInfo_t, nvmlUtilization_t,
};
use serde::Deserialize;

type Ret = c_uint;
const SUCCESS: Ret = 0;
const INVALID_ARGUMENT: Ret = 2;
const NOT_FOUND: Ret = 6;
const INSUFFICIENT_SIZE: Ret = 7;
const TIMEOUT: Ret = 10;
const FUNCTION_NOT_FOUND: Ret = 13;
const GPU_IS_LOST: Ret = 15;

const EVENT_SINGLE_BIT_ECC: u64 = 0x1;
const EVENT_DOUBLE_BIT_ECC: u64 = 0x2;
const EVENT_XID: u64 = 0x8;

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Config {
    driver_version: String,
    cuda_version: i32,
    init_error: Option<u32>,
    hang_ms: u64,
    hang: Vec<String>,
    missing: Vec<String>,
    gpus: Vec<Gpu>,
    events: Vec<Event>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Gpu {
    name: String,
    uuid: String,
    memory_mib: u64,
    used_mib: u64,
    cc: (i32, i32),
    pci_bus_id: String,
    mig: bool,
    mig_devices: Vec<Mig>,
    lost: bool,
    pages_pending: bool,
    util: (u32, u32),
    processes: Vec<Process>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Mig {
    uuid: String,
    name: String,
    memory_mib: u64,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Process {
    pid: u32,
    used_mib: u64,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct Event {
    gpu: usize,
    kind: String,
    data: u64,
}

static EVENTS_DELIVERED: AtomicUsize = AtomicUsize::new(0);

/// The config, re-parsed only when the file's modification time or size changed.
fn config() -> Config {
    static CACHE: std::sync::Mutex<Option<(std::time::SystemTime, u64, Config)>> = std::sync::Mutex::new(None);
    let Ok(path) = std::env::var("FAKE_NVML_CONFIG") else { return Config::default() };
    let Ok(meta) = std::fs::metadata(&path) else { return Config::default() };
    let stamp = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((m, l, c)) = cache.as_ref() {
        if (*m, *l) == stamp {
            return c.clone();
        }
    }
    let c: Config = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    *cache = Some((stamp.0, stamp.1, c.clone()));
    c
}

/// Common entry: missing and hanging functions, then the config.
fn enter(name: &str) -> Result<Config, Ret> {
    let c = config();
    if c.missing.iter().any(|m| m == name) {
        return Err(FUNCTION_NOT_FOUND);
    }
    if c.hang.iter().any(|m| m == name) {
        std::thread::sleep(Duration::from_millis(c.hang_ms));
    }
    Ok(c)
}

/// Handles: GPU i is `i + 1`; MIG device j of GPU i is `(i + 1) * 1000 + j + 1`.
fn handle(gpu: usize, mig: Option<usize>) -> nvmlDevice_t {
    let v = match mig {
        None => gpu + 1,
        Some(j) => (gpu + 1) * 1000 + j + 1,
    };
    v as nvmlDevice_t
}

enum Dev {
    Gpu(Gpu),
    Mig(Gpu, Mig),
}

fn device(c: &Config, d: nvmlDevice_t) -> Result<Dev, Ret> {
    let v = d as usize;
    let (gi, mi) = if v >= 1000 { (v / 1000 - 1, Some(v % 1000 - 1)) } else { (v.wrapping_sub(1), None) };
    let g = c.gpus.get(gi).cloned().ok_or(INVALID_ARGUMENT)?;
    if g.lost {
        return Err(GPU_IS_LOST);
    }
    match mi {
        None => Ok(Dev::Gpu(g)),
        Some(j) => {
            let m = g.mig_devices.get(j).cloned().ok_or(INVALID_ARGUMENT)?;
            Ok(Dev::Mig(g, m))
        }
    }
}

unsafe fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> Ret {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, buf, bytes.len());
    *buf.add(bytes.len()) = 0;
    SUCCESS
}

macro_rules! body {
    ($name:literal, |$c:ident| $e:expr) => {
        match enter($name) {
            Err(r) => r,
            Ok($c) => $e,
        }
    };
}

#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> Ret {
    body!("nvmlInit_v2", |c| c.init_error.unwrap_or(SUCCESS))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> Ret {
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    body!("nvmlDeviceGetCount_v2", |c| {
        *count = c.gpus.len() as c_uint;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> Ret {
    body!("nvmlSystemGetDriverVersion", |c| write_str(&c.driver_version, buf, len))
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> Ret {
    body!("nvmlSystemGetCudaDriverVersion_v2", |c| {
        *v = c.cuda_version;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, out: *mut nvmlDevice_t) -> Ret {
    body!("nvmlDeviceGetHandleByIndex_v2", |c| {
        if index as usize >= c.gpus.len() {
            return INVALID_ARGUMENT;
        }
        *out = handle(index as usize, None);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(uuid: *const c_char, out: *mut nvmlDevice_t) -> Ret {
    body!("nvmlDeviceGetHandleByUUID", |c| {
        let want = std::ffi::CStr::from_ptr(uuid).to_string_lossy();
        match c.gpus.iter().position(|g| g.uuid == want) {
            Some(i) => {
                *out = handle(i, None);
                SUCCESS
            }
            None => NOT_FOUND,
        }
    })
}

/// Works for lost GPUs too: it only maps the handle back to its index.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(d: nvmlDevice_t, index: *mut c_uint) -> Ret {
    body!("nvmlDeviceGetIndex", |c| {
        let v = d as usize;
        if v == 0 || v > c.gpus.len() {
            return INVALID_ARGUMENT;
        }
        *index = (v - 1) as c_uint;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(d: nvmlDevice_t, buf: *mut c_char, len: c_uint) -> Ret {
    body!("nvmlDeviceGetName", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) => write_str(&g.name, buf, len),
        Ok(Dev::Mig(_, m)) => write_str(&m.name, buf, len),
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(d: nvmlDevice_t, buf: *mut c_char, len: c_uint) -> Ret {
    body!("nvmlDeviceGetUUID", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) => write_str(&g.uuid, buf, len),
        Ok(Dev::Mig(_, m)) => write_str(&m.uuid, buf, len),
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(d: nvmlDevice_t, out: *mut nvmlMemory_v2_t) -> Ret {
    body!("nvmlDeviceGetMemoryInfo_v2", |c| {
        let (total, used) = match device(&c, d) {
            Ok(Dev::Gpu(g)) => (g.memory_mib, g.used_mib),
            Ok(Dev::Mig(_, m)) => (m.memory_mib, 0),
            Err(r) => return r,
        };
        let mib = 1u64 << 20;
        (*out).total = total * mib;
        (*out).used = used * mib;
        (*out).free = total.saturating_sub(used) * mib;
        (*out).reserved = 0;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    d: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> Ret {
    body!("nvmlDeviceGetCudaComputeCapability", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) | Ok(Dev::Mig(g, _)) => {
            *major = g.cc.0;
            *minor = g.cc.1;
            SUCCESS
        }
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(d: nvmlDevice_t, out: *mut nvmlPciInfo_t) -> Ret {
    body!("nvmlDeviceGetPciInfo_v3", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) | Ok(Dev::Mig(g, _)) => {
            std::ptr::write_bytes(out, 0, 1);
            let id = g.pci_bus_id.as_bytes();
            let n = id.len().min(31);
            std::ptr::copy_nonoverlapping(id.as_ptr() as *const c_char, (*out).busId.as_mut_ptr(), n);
            let m = id.len().min(15);
            std::ptr::copy_nonoverlapping(id.as_ptr() as *const c_char, (*out).busIdLegacy.as_mut_ptr(), m);
            (*out).pciDeviceId = 0x20b2_10de;
            SUCCESS
        }
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(d: nvmlDevice_t, current: *mut c_uint, pending: *mut c_uint) -> Ret {
    body!("nvmlDeviceGetMigMode", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) => {
            *current = u32::from(g.mig);
            *pending = u32::from(g.mig);
            SUCCESS
        }
        Ok(Dev::Mig(..)) => INVALID_ARGUMENT,
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(d: nvmlDevice_t, count: *mut c_uint) -> Ret {
    body!("nvmlDeviceGetMaxMigDeviceCount", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) => {
            *count = g.mig_devices.len() as c_uint;
            SUCCESS
        }
        Ok(Dev::Mig(..)) => INVALID_ARGUMENT,
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    d: nvmlDevice_t,
    index: c_uint,
    out: *mut nvmlDevice_t,
) -> Ret {
    body!("nvmlDeviceGetMigDeviceHandleByIndex", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) if (index as usize) < g.mig_devices.len() => {
            *out = handle(d as usize - 1, Some(index as usize));
            SUCCESS
        }
        Ok(_) => NOT_FOUND,
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    d: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> Ret {
    body!("nvmlDeviceGetComputeRunningProcesses_v3", |c| {
        let procs = match device(&c, d) {
            Ok(Dev::Gpu(g)) => g.processes,
            Ok(Dev::Mig(..)) => Vec::new(),
            Err(r) => return r,
        };
        if infos.is_null() || (*count as usize) < procs.len() {
            *count = procs.len() as c_uint;
            return if procs.is_empty() { SUCCESS } else { INSUFFICIENT_SIZE };
        }
        for (i, p) in procs.iter().enumerate() {
            let slot = &mut *infos.add(i);
            slot.pid = p.pid;
            slot.usedGpuMemory = p.used_mib << 20;
            slot.gpuInstanceId = u32::MAX;
            slot.computeInstanceId = u32::MAX;
        }
        *count = procs.len() as c_uint;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(d: nvmlDevice_t, out: *mut nvmlUtilization_t) -> Ret {
    body!("nvmlDeviceGetUtilizationRates", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) | Ok(Dev::Mig(g, _)) => {
            (*out).gpu = g.util.0;
            (*out).memory = g.util.1;
            SUCCESS
        }
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(d: nvmlDevice_t, pending: *mut c_uint) -> Ret {
    body!("nvmlDeviceGetRetiredPagesPendingStatus", |c| match device(&c, d) {
        Ok(Dev::Gpu(g)) | Ok(Dev::Mig(g, _)) => {
            *pending = u32::from(g.pages_pending);
            SUCCESS
        }
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> Ret {
    body!("nvmlEventSetCreate", |_c| {
        *set = 1usize as nvmlEventSet_t;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(d: nvmlDevice_t, _types: c_ulonglong, _set: nvmlEventSet_t) -> Ret {
    body!("nvmlDeviceRegisterEvents", |c| match device(&c, d) {
        Ok(_) => SUCCESS,
        Err(r) => r,
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetFree(_set: nvmlEventSet_t) -> Ret {
    SUCCESS
}

/// Delivers the configured events in order, one per call; waits out the timeout otherwise.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    _set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> Ret {
    let deadline = std::time::Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let c = match enter("nvmlEventSetWait_v2") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let next = EVENTS_DELIVERED.load(Ordering::SeqCst);
        if let Some(e) = c.events.get(next) {
            EVENTS_DELIVERED.store(next + 1, Ordering::SeqCst);
            (*data).device = handle(e.gpu, None);
            (*data).eventType = match e.kind.as_str() {
                "dbe" => EVENT_DOUBLE_BIT_ECC,
                "sbe" => EVENT_SINGLE_BIT_ECC,
                _ => EVENT_XID,
            };
            (*data).eventData = e.data;
            (*data).gpuInstanceId = u32::MAX;
            (*data).computeInstanceId = u32::MAX;
            return SUCCESS;
        }
        if std::time::Instant::now() >= deadline {
            return TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Used by nvml-wrapper for some error paths.
#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(_r: Ret) -> *const c_char {
    c"fake nvml error".as_ptr()
}
