//! The pull-ahead loop: read this node, decide, pull what is missing (with the
//! disk guard and an activity timeout, never a wall-clock cap), hold it, and
//! release what no job wants after the delay.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aimodel_driver::runtime::registry::canonical;
use aimodel_driver::runtime::{ContainerRuntime, ContainerSpec, DockerRuntime, PullProgress};
use serde::Serialize;
use tokio::sync::watch;

use super::config::ImagesConfig;
use super::policy::{decide, node_view};
use crate::jobs::TaskImage;

/// Label of a holder container (value `true`).
pub const HOLD_LABEL: &str = "com.aimodel.hold";
/// Label holding the image a holder keeps, as it was pulled.
pub const HOLD_REF_LABEL: &str = "com.aimodel.hold.ref";
/// Label holding the canonical spelling of that image.
const HOLD_KEY_LABEL: &str = "com.aimodel.hold.image";

/// Reads this node from Nomad (`GET /v1/node/<id>`).
pub type FetchNode =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send>> + Send + Sync>;

/// One image this node wants, for `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageStatus {
    pub image: String,
    /// `pending`, `pulling`, `present`, `paused` (disk guard) or `failed`.
    pub state: String,
    /// `namespace/job/group/task` of the tasks that want it.
    pub tasks: Vec<String>,
    pub layers_done: u64,
    pub layers: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub last_error: Option<String>,
    /// Seconds the last successful pull took.
    pub pull_seconds: Option<f64>,
    /// Failed pulls in a row (the retry pause doubles with each).
    pub failures: u32,
    #[serde(skip)]
    pub retry_at: Option<Instant>,
}

/// What `/status` and `/metrics` show of the pull-ahead.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImagesStatus {
    pub node_id: String,
    /// Why this node could not be read (nothing is pulled or removed meanwhile).
    pub node_error: Option<String>,
    /// Canonical image → state.
    pub images: BTreeMap<String, ImageStatus>,
    /// Why tasks' images are not pulled here.
    pub skipped: Vec<String>,
    /// The disk guard's reason when it holds pulls back.
    pub guard: Option<String>,
    pub free_bytes: Option<u64>,
    pub pulls_ok: u64,
    pub pulls_failed: u64,
    pub pulled_bytes: u64,
    pub removed: u64,
}

fn lock(s: &Mutex<ImagesStatus>) -> std::sync::MutexGuard<'_, ImagesStatus> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The disk guard: the free bytes of the filesystem holding `root` (when
/// readable) and whether a pull may run (`min` 0: always).
pub fn disk_guard(root: &std::path::Path, min: u64) -> (Option<u64>, Result<(), String>) {
    if min == 0 {
        return (None, Ok(()));
    }
    match nix::sys::statvfs::statvfs(root) {
        Ok(st) => {
            let free = st.blocks_available().saturating_mul(st.fragment_size());
            let r = if free < min {
                Err(format!(
                    "{}: {:.1} GB free, below images.min_free ({:.1} GB): pulls paused",
                    root.display(),
                    free as f64 / 1e9,
                    min as f64 / 1e9
                ))
            } else {
                Ok(())
            };
            (Some(free), r)
        }
        Err(e) => (
            None,
            Err(format!(
                "cannot read the free space of {} ({e}): pulls paused (set images.data_root to Docker's data root as \
                 the agent sees it, or images.min_free = \"0\")",
                root.display()
            )),
        ),
    }
}

/// Longest pause between retries of a failed pull.
const MAX_RETRY: Duration = Duration::from_secs(600);

struct Puller {
    cfg: ImagesConfig,
    rt: DockerRuntime,
    status: Arc<Mutex<ImagesStatus>>,
    /// Canonical image → when it was first found unwanted.
    unwanted_since: BTreeMap<String, Instant>,
}

/// Runs until `wants` has no sender and the process ends.
pub async fn run(
    cfg: ImagesConfig,
    fetch_node: FetchNode,
    mut wants: watch::Receiver<Vec<TaskImage>>,
    status: Arc<Mutex<ImagesStatus>>,
) {
    lock(&status).node_id = cfg.node_id.clone().unwrap_or_default();
    let mut p = Puller { rt: DockerRuntime::new(&cfg.docker), cfg, status, unwanted_since: BTreeMap::new() };
    loop {
        let tasks = wants.borrow_and_update().clone();
        let next = match fetch_node().await {
            Ok(node) => {
                lock(&p.status).node_error = None;
                p.round(&tasks, &node).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node from Nomad: image pull-ahead waits");
                lock(&p.status).node_error = Some(e);
                p.cfg.check_every.0
            }
        };
        tokio::select! {
            r = wants.changed() => if r.is_err() { tokio::time::sleep(next).await },
            _ = tokio::time::sleep(next) => {}
        }
    }
}

impl Puller {
    /// One pass; returns how long to wait before the next.
    async fn round(&mut self, tasks: &[TaskImage], node: &serde_json::Value) -> Duration {
        let view = node_view(node);
        let mut wanted: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        let mut skipped = Vec::new();
        for t in tasks {
            match decide(t, &view) {
                Ok(image) => {
                    wanted.entry(canonical(&image)).or_insert_with(|| (image, Vec::new())).1.push(t.task.clone())
                }
                Err(why) => skipped.push(why),
            }
        }
        {
            let mut s = lock(&self.status);
            s.skipped = skipped;
            s.images.retain(|k, _| wanted.contains_key(k));
            for (key, (image, tasks)) in &wanted {
                let e = s.images.entry(key.clone()).or_insert_with(|| ImageStatus {
                    image: image.clone(),
                    state: "pending".into(),
                    ..ImageStatus::default()
                });
                e.tasks.clone_from(tasks);
            }
        }
        for (key, (image, _)) in &wanted {
            self.unwanted_since.remove(key);
            self.ensure(key, image).await;
        }
        self.release(&wanted).await
    }

    /// Pulls `image` if it is missing (and due), then makes sure it is held.
    async fn ensure(&self, key: &str, image: &str) {
        let due = lock(&self.status).images.get(key).is_none_or(|s| s.retry_at.is_none_or(|t| Instant::now() >= t));
        let present = match self.rt.image_present(image).await {
            Ok(p) => p,
            Err(e) => return self.failed(key, format!("cannot ask Docker about {image}: {e}")),
        };
        if !present {
            if !due {
                return;
            }
            if let Err(why) = self.guard() {
                let mut s = lock(&self.status);
                if let Some(e) = s.images.get_mut(key) {
                    e.state = "paused".into();
                    e.last_error = Some(why);
                }
                return;
            }
            if let Err(e) = self.pull(key, image).await {
                return self.failed(key, e);
            }
        } else {
            let mut s = lock(&self.status);
            if let Some(e) = s.images.get_mut(key) {
                if e.state != "present" {
                    e.state = "present".into();
                    e.last_error = None;
                }
            }
        }
        if let Err(e) = self.hold(key, image).await {
            tracing::warn!(image = %image, error = %e, "cannot hold the image");
        }
    }

    async fn pull(&self, key: &str, image: &str) -> Result<(), String> {
        tracing::info!(image = %image, "pulling ahead");
        {
            let mut s = lock(&self.status);
            if let Some(e) = s.images.get_mut(key) {
                e.state = "pulling".into();
                e.last_error = None;
            }
        }
        let started = Instant::now();
        let (status, k) = (self.status.clone(), key.to_string());
        let report = move |p: PullProgress| {
            let mut s = lock(&status);
            if let Some(e) = s.images.get_mut(&k) {
                (e.layers_done, e.layers) = (p.layers_done as u64, p.layers as u64);
                (e.bytes_done, e.bytes_total) = (p.bytes_done, p.bytes_total);
            }
        };
        let auth = self.cfg.auth_for(image);
        let pull = self.rt.pull(image, auth, self.cfg.activity_timeout.0, &report);
        let r = tokio::select! {
            r = pull => r.map_err(|e| e.to_string()),
            why = self.guard_trips() => Err(why),
        };
        r?;
        let secs = started.elapsed().as_secs_f64();
        let mut s = lock(&self.status);
        let bytes = s.images.get(key).map_or(0, |e| e.bytes_total);
        s.pulls_ok += 1;
        s.pulled_bytes += bytes;
        if let Some(e) = s.images.get_mut(key) {
            (e.state, e.pull_seconds, e.failures, e.retry_at) = ("present".into(), Some(secs), 0, None);
        }
        tracing::info!(image = %image, seconds = secs, "pulled ahead");
        Ok(())
    }

    fn failed(&self, key: &str, why: String) {
        tracing::warn!(image = %key, error = %why, "image pull-ahead failed");
        let mut s = lock(&self.status);
        s.pulls_failed += 1;
        let every = self.cfg.check_every.0;
        if let Some(e) = s.images.get_mut(key) {
            e.failures = e.failures.saturating_add(1);
            let pause = every.saturating_mul(1 << e.failures.min(6)).min(MAX_RETRY);
            (e.state, e.last_error, e.retry_at) = ("failed".into(), Some(why), Some(Instant::now() + pause));
        }
    }

    /// Free space of Docker's data root against `min_free`; the reason when too low or unreadable.
    fn guard(&self) -> Result<(), String> {
        let (free, r) = disk_guard(&self.cfg.data_root, self.cfg.min_free.0);
        let mut s = lock(&self.status);
        if free.is_some() {
            s.free_bytes = free;
        }
        s.guard = r.as_ref().err().cloned();
        r
    }

    /// Resolves once the guard trips during a pull (checked every 2 s).
    async fn guard_trips(&self) -> String {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Err(why) = self.guard() {
                return why;
            }
        }
    }

    /// A holder container for `image`, unless one exists.
    async fn hold(&self, key: &str, image: &str) -> Result<(), String> {
        let held = self.rt.list_labelled(HOLD_KEY_LABEL, key).await.map_err(|e| e.to_string())?;
        if !held.is_empty() {
            return Ok(());
        }
        let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
        let name = format!("aimodel-hold-{}", &digest[..12]);
        let spec = ContainerSpec {
            name,
            image: image.to_string(),
            cmd: Some(vec!["aimodel-hold".into()]),
            labels: BTreeMap::from([
                (HOLD_LABEL.to_string(), "true".to_string()),
                (HOLD_KEY_LABEL.to_string(), key.to_string()),
                (HOLD_REF_LABEL.to_string(), image.to_string()),
            ]),
            network_mode: "none".into(),
            ..ContainerSpec::default()
        };
        match self.rt.create(&spec).await {
            Ok(_) | Err(aimodel_driver::runtime::RuntimeError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Removes holders (then their images) no job wanted for `remove_delay`;
    /// returns when to look again.
    async fn release(&mut self, wanted: &BTreeMap<String, (String, Vec<String>)>) -> Duration {
        let mut next = self.cfg.check_every.0;
        let held = match self.rt.list_labelled(HOLD_LABEL, "true").await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the held images");
                return next;
            }
        };
        let delay = self.cfg.remove_delay.0;
        for h in held {
            let (Some(key), Some(image)) = (h.labels.get(HOLD_KEY_LABEL), h.labels.get(HOLD_REF_LABEL)) else {
                continue;
            };
            if wanted.contains_key(key) {
                continue;
            }
            let since = *self.unwanted_since.entry(key.clone()).or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited < delay {
                next = next.min(delay - waited + Duration::from_millis(100));
                continue;
            }
            if let Err(e) = self.rt.remove(&h.id, true).await {
                tracing::warn!(image = %image, error = %e, "cannot remove the holder");
                continue;
            }
            self.unwanted_since.remove(key);
            match self.rt.remove_image(image).await {
                Ok(true) => {
                    lock(&self.status).removed += 1;
                    tracing::info!(image = %image, "removed: no job wants it any more");
                }
                Ok(false) => {
                    tracing::info!(image = %image, "released: a container still uses it (gc.image removes it later)")
                }
                Err(e) => tracing::warn!(image = %image, error = %e, "cannot remove the image"),
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_guard_pauses_below_the_watermark_and_when_it_cannot_measure() {
        let d = tempfile::tempdir().unwrap();
        let (free, ok) = disk_guard(d.path(), 1);
        assert!(ok.is_ok() && free.unwrap() > 0);
        let (_, low) = disk_guard(d.path(), u64::MAX);
        assert!(low.unwrap_err().contains("below images.min_free"));
        let (free, gone) = disk_guard(&d.path().join("missing"), 1);
        assert!(free.is_none() && gone.unwrap_err().contains("cannot read the free space"));
        assert_eq!(disk_guard(&d.path().join("missing"), 0), (None, Ok(())), "min_free = 0 turns it off");
    }
}
