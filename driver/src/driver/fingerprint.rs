//! Fingerprinting: the node attributes and health Nomad gets every period and
//! on every change, the dangling-container reconciler that runs with it, and
//! GPU faults turned into task events.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::driver::{Driver, IN_USE_REFRESH, PLUGIN_NAME, PLUGIN_VERSION};
use crate::runtime::ContainerRuntime;
use crate::types::{AttrValue, Fingerprint, Health, TaskEvent};

/// The first fingerprint must not wait longer than this for the engine.
const FIRST_PROBE_TIMEOUT: Duration = Duration::from_millis(750);
/// Later probes may take longer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Containers of ours that no task claims are reported only after this long,
/// so that Nomad has had time to recover its tasks (`AIMODEL_ORPHAN_GRACE`
/// overrides it, e.g. `10s`).
const ORPHAN_GRACE: Duration = Duration::from_secs(120);
/// The description of a healthy driver (Nomad's drivers say "Healthy").
const HEALTHY: &str = "Healthy";

/// How often the fingerprint is recomputed to notice changes between periods.
const RECHECK: Duration = Duration::from_secs(5);

impl Driver {
    /// The Fingerprint stream: fingerprints as Nomad should get them (see
    /// [`run_fingerprints`]), until shutdown or until the receiver is dropped.
    pub fn fingerprints(&self) -> tokio::sync::mpsc::Receiver<Fingerprint> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(run_fingerprints(self.clone(), tx));
        rx
    }

    /// One fingerprint. `first` bounds the engine probe tightly so the first
    /// message reaches Nomad at once.
    pub async fn fingerprint(&self, first: bool) -> Fingerprint {
        let timeout = if first { FIRST_PROBE_TIMEOUT } else { PROBE_TIMEOUT };
        let mut attributes = BTreeMap::new();
        attributes.insert(format!("driver.{PLUGIN_NAME}"), AttrValue::Bool(true));
        attributes.insert(format!("driver.{PLUGIN_NAME}.version"), AttrValue::Str(PLUGIN_VERSION.into()));
        // The image each engine defaults to here: the node agent pulls it ahead
        // for tasks that do not name their own.
        let plugin = self.config();
        for e in crate::engines::ENGINES {
            if let Some(image) = e.image_key.and_then(|k| plugin.images.get(k)).filter(|i| !i.is_empty()) {
                attributes.insert(format!("driver.{PLUGIN_NAME}.image.{}", e.name), AttrValue::Str(image.to_string()));
            }
        }
        let runtime = self.runtime();
        let cache_cfg = self.config().hf_cache.clone();
        let cache =
            tokio::task::spawn_blocking(move || crate::driver::cache::assess(&cache_cfg)).await.unwrap_or_default();
        attributes.extend(cache.attributes.clone());
        let cache_cfg = self.config().hf_cache.clone();
        let warm = tokio::task::spawn_blocking(move || crate::driver::cache::warm_attributes(&cache_cfg)).await;
        attributes.extend(warm.unwrap_or_default());
        let due = {
            let mut last = self.in_use_refreshed.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= IN_USE_REFRESH);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            self.refresh_in_use().await;
        }
        let mut gpu_notes = Vec::new();
        let mut gpu_required_missing = false;
        if let Some(monitor) = self.gpus().await {
            let st = monitor.status().await;
            attributes.extend(st.attributes);
            gpu_required_missing = st.none_usable && self.config().gpu.required;
            gpu_notes = st.notes;
        }
        let (mut health, mut description) = match runtime.info(timeout).await {
            Ok(info) => {
                attributes.insert(format!("driver.{PLUGIN_NAME}.docker.version"), AttrValue::Str(info.version));
                attributes.insert(format!("driver.{PLUGIN_NAME}.docker.api_version"), AttrValue::Str(info.api_version));
                if let Some(n) = self.scan_orphans(runtime.as_ref()).await {
                    attributes.insert(
                        format!("driver.{PLUGIN_NAME}.orphans"),
                        AttrValue::Int(i64::try_from(n).unwrap_or(i64::MAX)),
                    );
                }
                self.docker_seen.store(true, std::sync::atomic::Ordering::SeqCst);
                if cache.problems.is_empty() {
                    (Health::Healthy, HEALTHY.to_string())
                } else {
                    (Health::Unhealthy, cache.problems.join("; "))
                }
            }
            Err(e) => {
                let mut d = vec![e.to_string()];
                d.extend(cache.problems);
                // As the docker driver: an engine never reached is "undetected"
                // (the driver is not usable here), one that went away is unhealthy.
                let seen = self.docker_seen.load(std::sync::atomic::Ordering::SeqCst);
                (if seen { Health::Unhealthy } else { Health::Undetected }, d.join("; "))
            }
        };
        if gpu_required_missing {
            health = Health::Unhealthy;
            description = if description == HEALTHY {
                "no usable GPU and gpu.required is true".into()
            } else {
                format!("{description}; no usable GPU and gpu.required is true")
            };
        }
        if !gpu_notes.is_empty() {
            description = format!("{description}; {}", gpu_notes.join("; "));
        }
        Fingerprint { attributes, health, description }
    }

    /// Containers labelled as ours, created for this node, whose task this
    /// plugin does not track (dangling: a StartTask whose answer was lost, a
    /// plugin restart with lost state). They are reported (log line and
    /// attribute) and, as the docker driver's reconciler does
    /// (`drivers/docker/reconcile_dangling.go`), removed once older than
    /// `gc.dangling_containers.creation_grace` unless that is disabled or a dry
    /// run. Nothing is judged before the plugin has run for the orphan grace
    /// (Nomad recovers its tasks first), nor containers of other clients.
    async fn scan_orphans(&self, runtime: &dyn ContainerRuntime) -> Option<usize> {
        let grace = self.env().orphan_grace.unwrap_or(ORPHAN_GRACE);
        if self.born.elapsed() < grace {
            return None;
        }
        let node = self.tasks.node_name().or_else(|| std::fs::read_to_string("/etc/hostname").ok())?;
        let node = node.trim().to_string();
        let listed = runtime.list_labelled(crate::plan::LABEL_MANAGED, "true").await.ok()?;
        let tracked = self.tasks.ids();
        let dangling: Vec<crate::runtime::Listed> = listed
            .into_iter()
            .filter(|c| c.labels.get(crate::plan::LABEL_NODE) == Some(&node))
            .filter(|c| c.labels.get(crate::plan::LABEL_TASK_ID).is_none_or(|t| !tracked.contains(t)))
            .collect();
        let policy = self.config().gc.dangling_containers.clone();
        let now = crate::timefmt::unix_now_secs();
        let mut kept = Vec::new();
        for c in dangling {
            let task = c.labels.get(crate::plan::LABEL_TASK_ID).cloned().unwrap_or_default();
            let short = c.id[..12.min(c.id.len())].to_string();
            let old_enough =
                now.saturating_sub(c.created) >= i64::try_from(policy.creation_grace.0.as_secs()).unwrap_or(i64::MAX);
            if policy.enabled && !policy.dry_run && old_enough {
                match runtime.remove(&c.id, true).await {
                    Ok(()) => {
                        tracing::warn!(container = %short, task_id = %task, "removed a dangling container no task of this plugin owns");
                        continue;
                    }
                    Err(e) => tracing::warn!(container = %short, error = %e, "cannot remove a dangling container"),
                }
            }
            kept.push(format!("{short} ({task})"));
        }
        kept.sort();
        let mut last = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        if *last != kept && !kept.is_empty() {
            tracing::warn!(node = %node, containers = %kept.join(", "), "containers labelled as aimodel tasks of this node that Nomad no longer knows");
        }
        let n = kept.len();
        *last = kept;
        Some(n)
    }

    /// A fatal GPU event: logged, and an event on every task using that GPU.
    pub(crate) fn gpu_fault(&self, ev: &crate::driver::gpu::GpuEvent) {
        tracing::error!(gpu = %ev.uuid, what = %ev.what, "GPU fault");
        for id in self.tasks.ids() {
            let Some(task) = self.tasks.task(&id) else { continue };
            let uses = crate::plan::assigned_gpus(&task).contains(&ev.uuid);
            if uses {
                self.emit(TaskEvent {
                    task_id: task.id.clone(),
                    alloc_id: task.alloc_id.clone(),
                    task_name: task.name.clone(),
                    at: SystemTime::now(),
                    message: format!("GPU {} failed: {}", ev.uuid, ev.what),
                    annotations: BTreeMap::from([("gpu".to_string(), ev.uuid.clone())]),
                });
            }
        }
    }
}

/// Sends the first fingerprint at once, then one every `fingerprint_period`
/// (re-read on every round, so SetConfig takes effect), and in between as soon
/// as anything changed (checked every [`RECHECK`]), until shutdown.
async fn run_fingerprints(driver: Driver, tx: tokio::sync::mpsc::Sender<Fingerprint>) {
    let stop = driver.shutdown_token();
    let mut config = driver.watch_config();
    let mut first = true;
    let mut last: Option<Fingerprint> = None;
    let mut last_sent = tokio::time::Instant::now();
    // Nomad merges driver attributes into the node and deletes a key only when
    // it is sent as "" (`client/node_updater.go` `applyNodeUpdatesFromDriver`):
    // a key that went away (an evicted warm model) is sent once as "".
    let mut sent_keys: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    loop {
        let fp = tokio::select! {
            _ = stop.cancelled() => return,
            fp = driver.fingerprint(first) => fp,
        };
        first = false;
        let period = config.borrow_and_update().fingerprint_period.0;
        if last.as_ref() != Some(&fp) || last_sent.elapsed() >= period {
            let mut out = fp.clone();
            for gone in sent_keys.iter().filter(|k| !fp.attributes.contains_key(*k)) {
                out.attributes.insert(gone.clone(), AttrValue::Str(String::new()));
            }
            if tx.send(out).await.is_err() {
                return;
            }
            sent_keys = fp.attributes.keys().cloned().collect();
            last = Some(fp);
            last_sent = tokio::time::Instant::now();
        }
        let wait = period.min(RECHECK);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(wait) => {}
            // A new configuration may change the period or the engine: re-probe.
            _ = config.changed() => {}
        }
    }
}
