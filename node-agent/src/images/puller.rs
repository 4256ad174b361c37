//! The pull-ahead loop: read this node, decide, pull what is missing (with the
//! disk guard and an activity timeout, never a wall-clock cap), hold it, and
//! release what no job wants after the delay.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aimodel_driver::runtime::registry::canonical;
use aimodel_driver::runtime::{ContainerRuntime, ContainerSpec, DockerRuntime, PullProgress};
use serde::Serialize;
use tokio::sync::watch;

use super::config::ImagesConfig;
use super::policy::{decide, image_for, node_view};
use crate::jobs::ImageWants;

/// Label of a holder container (value `true`).
pub const HOLD_LABEL: &str = "com.aimodel.hold";
/// Label holding the image a holder keeps, as it was pulled.
pub const HOLD_REF_LABEL: &str = "com.aimodel.hold.ref";
/// Label holding the canonical spelling of that image.
const HOLD_KEY_LABEL: &str = "com.aimodel.hold.image";
/// Label set when this agent pulled the image (only then is it removed with its holder).
const HOLD_PULLED_LABEL: &str = "com.aimodel.hold.pulled";

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
    /// Bytes of the finished pulls.
    pub pulled_bytes: u64,
    pub removed: u64,
}

fn lock(s: &Mutex<ImagesStatus>) -> std::sync::MutexGuard<'_, ImagesStatus> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The name of the holder of an image (by its canonical spelling): one per image.
fn holder_name(key: &str) -> String {
    let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
    format!("aimodel-hold-{}", &digest[..12])
}

/// Whether a listed container is one of our holders: the name that belongs to
/// its image, never started, not a task's container, its labels consistent.
/// (Anyone can put labels on a container; the name and state are checked too.)
fn is_holder(c: &aimodel_driver::runtime::Listed) -> Option<(String, String)> {
    let (key, image) = (c.labels.get(HOLD_KEY_LABEL)?, c.labels.get(HOLD_REF_LABEL)?);
    let ok = c.labels.get(HOLD_LABEL).is_some_and(|v| v == "true")
        && c.name == holder_name(key)
        && c.state == "created"
        && canonical(image) == *key
        && !c.labels.contains_key(aimodel_driver::plan::LABEL_MANAGED);
    ok.then(|| (key.clone(), image.clone()))
}

/// While a pull runs, the loop looks at it this often.
const PULL_POLL: Duration = Duration::from_secs(1);

struct Puller {
    cfg: Arc<ImagesConfig>,
    rt: Arc<DockerRuntime>,
    status: Arc<Mutex<ImagesStatus>>,
    /// Canonical image → when it was first found unwanted.
    unwanted_since: BTreeMap<String, Instant>,
    /// The one pull running: its image (canonical) and task.
    pulling: Option<(String, tokio::task::JoinHandle<Result<(), String>>)>,
    /// Images this agent pulled and has not held yet.
    pulled: BTreeSet<String>,
}

/// Runs until the process ends.
pub async fn run(
    cfg: ImagesConfig,
    fetch_node: FetchNode,
    mut wants: watch::Receiver<Option<ImageWants>>,
    status: Arc<Mutex<ImagesStatus>>,
) {
    lock(&status).node_id = cfg.node_id.clone().unwrap_or_default();
    let mut p = Puller {
        rt: Arc::new(DockerRuntime::new(&cfg.docker)),
        cfg: Arc::new(cfg),
        status,
        unwanted_since: BTreeMap::new(),
        pulling: None,
        pulled: BTreeSet::new(),
    };
    let every = p.cfg.check_every.0;
    let (mut node, mut read_at): (Option<serde_json::Value>, Option<Instant>) = (None, None);
    let mut changed = true;
    loop {
        if changed || read_at.is_none_or(|t| t.elapsed() >= every) {
            read_at = Some(Instant::now());
            node = match fetch_node().await {
                Ok(n) => {
                    lock(&p.status).node_error = None;
                    Some(n)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this node from Nomad: image pull-ahead waits");
                    lock(&p.status).node_error = Some(e);
                    None
                }
            };
        }
        let current = wants.borrow_and_update().clone();
        p.reap().await;
        let mut next = match (&node, &current) {
            (Some(n), Some(w)) => p.round(w, n).await,
            _ => every,
        };
        if p.pulling.is_some() {
            next = next.min(PULL_POLL);
        }
        changed = tokio::select! {
            r = wants.changed() => {
                if r.is_err() {
                    tokio::time::sleep(next).await;
                }
                r.is_ok()
            }
            _ = tokio::time::sleep(next) => false,
        };
    }
}

impl Puller {
    /// Collects a finished pull.
    async fn reap(&mut self) {
        if !self.pulling.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return;
        }
        let Some((key, h)) = self.pulling.take() else { return };
        match h.await {
            Ok(Ok(())) => {
                self.pulled.insert(key);
            }
            Ok(Err(e)) => self.failed(&key, e, true),
            Err(e) if e.is_cancelled() => {}
            Err(e) => self.failed(&key, e.to_string(), true),
        }
    }

    /// One pass; returns how long to wait before the next.
    async fn round(&mut self, wants: &ImageWants, node: &serde_json::Value) -> Duration {
        let view = node_view(node);
        let mut keep = BTreeSet::new();
        let mut pull: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        let mut skipped = Vec::new();
        for t in &wants.tasks {
            match image_for(t, &view) {
                Ok(image) => {
                    keep.insert(canonical(&image));
                }
                Err(why) => {
                    skipped.push(why);
                    continue;
                }
            }
            match decide(t, &view) {
                Ok(image) => {
                    pull.entry(canonical(&image)).or_insert_with(|| (image, Vec::new())).1.push(t.task.clone())
                }
                Err(why) => skipped.push(why),
            }
        }
        {
            let mut s = lock(&self.status);
            s.skipped = skipped;
            s.images.retain(|k, _| pull.contains_key(k));
            for (key, (image, tasks)) in &pull {
                let e = s.images.entry(key.clone()).or_insert_with(|| ImageStatus {
                    image: image.clone(),
                    state: "pending".into(),
                    ..ImageStatus::default()
                });
                e.tasks.clone_from(tasks);
            }
        }
        // A pull of an image nobody wants here any more stops.
        if self.pulling.as_ref().is_some_and(|(k, _)| !pull.contains_key(k)) {
            if let Some((key, h)) = self.pulling.take() {
                h.abort();
                tracing::info!(image = %key, "pull cancelled: no job wants the image here any more");
            }
        }
        for (key, (image, _)) in &pull {
            self.unwanted_since.remove(key);
            self.ensure(key, image).await;
        }
        if wants.complete {
            self.release(&keep).await
        } else {
            self.cfg.check_every.0
        }
    }

    /// Holds `image` if it is present; else starts its pull when none runs and it is due.
    async fn ensure(&mut self, key: &str, image: &str) {
        if self.pulling.as_ref().is_some_and(|(k, _)| k == key) {
            return;
        }
        match self.rt.image_present(image).await {
            Ok(true) => {
                {
                    let mut s = lock(&self.status);
                    if let Some(e) = s.images.get_mut(key) {
                        if e.state != "present" {
                            (e.state, e.last_error) = ("present".into(), None);
                        }
                    }
                }
                let pulled = self.pulled.contains(key);
                match self.hold(key, image, pulled).await {
                    Ok(()) => {
                        self.pulled.remove(key);
                    }
                    Err(e) => tracing::warn!(image = %image, error = %e, "cannot hold the image"),
                }
            }
            Ok(false) => {
                let due =
                    lock(&self.status).images.get(key).is_none_or(|s| s.retry_at.is_none_or(|t| Instant::now() >= t));
                if self.pulling.is_some() || !due {
                    return;
                }
                if let Err(why) = check_guard(&self.cfg, &self.status) {
                    let mut s = lock(&self.status);
                    if let Some(e) = s.images.get_mut(key) {
                        (e.state, e.last_error) = ("paused".into(), Some(why));
                    }
                    return;
                }
                let (rt, cfg, status) = (self.rt.clone(), self.cfg.clone(), self.status.clone());
                let (k, i) = (key.to_string(), image.to_string());
                let h = tokio::spawn(async move { pull(&rt, &cfg, &status, &k, &i).await });
                self.pulling = Some((key.to_string(), h));
            }
            Err(e) => self.failed(key, format!("cannot ask Docker about {image}: {e}"), false),
        }
    }

    fn failed(&self, key: &str, why: String, counted: bool) {
        tracing::warn!(image = %key, error = %why, "image pull-ahead failed");
        let mut s = lock(&self.status);
        if counted {
            s.pulls_failed += 1;
        }
        let every = self.cfg.check_every.0;
        if let Some(e) = s.images.get_mut(key) {
            e.failures = e.failures.saturating_add(1);
            let pause = every.saturating_mul(1 << (e.failures - 1).min(6)).min(MAX_RETRY);
            (e.state, e.last_error, e.retry_at) = ("failed".into(), Some(why), Some(Instant::now() + pause));
        }
    }

    /// A holder container for `image`, unless one exists.
    async fn hold(&self, key: &str, image: &str, pulled: bool) -> Result<(), String> {
        let held = self.rt.list_labelled(HOLD_KEY_LABEL, key).await.map_err(|e| e.to_string())?;
        if held.iter().any(|c| is_holder(c).is_some()) {
            return Ok(());
        }
        let mut labels = BTreeMap::from([
            (HOLD_LABEL.to_string(), "true".to_string()),
            (HOLD_KEY_LABEL.to_string(), key.to_string()),
            (HOLD_REF_LABEL.to_string(), image.to_string()),
        ]);
        if pulled {
            labels.insert(HOLD_PULLED_LABEL.to_string(), "true".to_string());
        }
        let spec = ContainerSpec {
            name: holder_name(key),
            image: image.to_string(),
            cmd: Some(vec!["aimodel-hold".into()]),
            labels,
            network_mode: "none".into(),
            ..ContainerSpec::default()
        };
        match self.rt.create(&spec).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Removes holders of images no registered job wants here for
    /// `remove_delay` (and the image, when this agent pulled it); returns when
    /// to look again.
    async fn release(&mut self, keep: &BTreeSet<String>) -> Duration {
        let mut next = self.cfg.check_every.0;
        let listed = match self.rt.list_labelled(HOLD_LABEL, "true").await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the held images");
                return next;
            }
        };
        let delay = self.cfg.remove_delay.0;
        for h in listed {
            let Some((key, image)) = is_holder(&h) else {
                tracing::debug!(container = %h.id, "a container with holder labels that is not ours: left alone");
                continue;
            };
            if keep.contains(&key) {
                continue;
            }
            let since = *self.unwanted_since.entry(key.clone()).or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited < delay {
                next = next.min(delay - waited + Duration::from_millis(100));
                continue;
            }
            if let Err(e) = self.rt.remove(&h.id, false).await {
                tracing::warn!(image = %image, error = %e, "cannot remove the holder");
                continue;
            }
            self.unwanted_since.remove(&key);
            if h.labels.get(HOLD_PULLED_LABEL).is_none_or(|v| v != "true") {
                tracing::info!(image = %image, "released; the agent did not pull it, so the image stays");
                continue;
            }
            match self.rt.remove_image(&image).await {
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

/// One pull, with its progress in the status and the disk guard watching.
async fn pull(
    rt: &DockerRuntime,
    cfg: &ImagesConfig,
    status: &Arc<Mutex<ImagesStatus>>,
    key: &str,
    image: &str,
) -> Result<(), String> {
    tracing::info!(image = %image, "pulling ahead");
    {
        let mut s = lock(status);
        if let Some(e) = s.images.get_mut(key) {
            (e.state, e.last_error) = ("pulling".into(), None);
        }
    }
    let started = Instant::now();
    let (st, k) = (status.clone(), key.to_string());
    let report = move |p: PullProgress| {
        let mut s = lock(&st);
        if let Some(e) = s.images.get_mut(&k) {
            (e.layers_done, e.layers) = (p.layers_done as u64, p.layers as u64);
            (e.bytes_done, e.bytes_total) = (p.bytes_done, p.bytes_total);
        }
    };
    let pulling = rt.pull(image, cfg.auth_for(image), cfg.activity_timeout.0, &report);
    let trips = async {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Err(why) = check_guard(cfg, status) {
                return why;
            }
        }
    };
    tokio::select! {
        r = pulling => r.map_err(|e| e.to_string())?,
        why = trips => return Err(why),
    }
    let secs = started.elapsed().as_secs_f64();
    let mut s = lock(status);
    let bytes = s.images.get(key).map_or(0, |e| e.bytes_total);
    s.pulls_ok += 1;
    s.pulled_bytes += bytes;
    if let Some(e) = s.images.get_mut(key) {
        (e.state, e.pull_seconds, e.failures, e.retry_at) = ("present".into(), Some(secs), 0, None);
    }
    tracing::info!(image = %image, seconds = secs, "pulled ahead");
    Ok(())
}

/// [`disk_guard`] of the configuration, its findings kept in the status.
fn check_guard(cfg: &ImagesConfig, status: &Mutex<ImagesStatus>) -> Result<(), String> {
    let (free, r) = disk_guard(&cfg.data_root, cfg.min_free.0);
    let mut s = lock(status);
    if free.is_some() {
        s.free_bytes = free;
    }
    s.guard = r.as_ref().err().cloned();
    r
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
