//! Images: present or pulled (with progress events and scoped credentials),
//! and counted per task so that `gc.image` can remove one nobody uses.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::{PullPolicy, TaskConfig};
use crate::driver::error::DriverError;
use crate::driver::Driver;
use crate::plan::Plan;
use crate::runtime::{ContainerRuntime, PullProgress};
use crate::types::NomadTask;

impl Driver {
    /// Counts a task using `image` (from its plan until DestroyTask).
    pub(crate) fn image_ref(&self, image: &str) {
        let key = crate::runtime::registry::canonical(image);
        *self.image_refs.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default() += 1;
    }

    /// A task stopped using `image`; with `gc.image` the image is removed once no
    /// task has used it for `gc.image_delay` (as the docker driver's image coordinator does).
    pub(crate) fn image_unref(&self, image: &str) {
        let key = crate::runtime::registry::canonical(image);
        {
            let mut refs = self.image_refs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = refs.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
        }
        let gc = self.config().gc.clone();
        if !gc.image {
            return;
        }
        let (me, image) = (self.clone(), image.to_string());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(gc.image_delay.0) => {}
                _ = me.shutdown.cancelled() => return,
            }
            let unused = {
                let mut refs = me.image_refs.lock().unwrap_or_else(|p| p.into_inner());
                let unused = refs.get(&key).is_none_or(|n| *n == 0);
                if unused {
                    refs.remove(&key);
                }
                unused
            };
            if !unused {
                return;
            }
            match me.runtime().remove_image(&image).await {
                Ok(true) => tracing::info!(image = %image, "removed the unused image (gc.image)"),
                Ok(false) => tracing::debug!(image = %image, "image kept: gone already or used by another container"),
                Err(e) => tracing::warn!(image = %image, error = %e, "cannot remove the unused image"),
            }
        });
    }

    pub(crate) async fn ensure_image(
        &self,
        task: &NomadTask,
        cfg: &TaskConfig,
        plan: &Plan,
        rt: &dyn ContainerRuntime,
    ) -> Result<(), DriverError> {
        let image = &plan.spec.image;
        let present = rt.image_present(image).await?;
        if present && cfg.pull == PullPolicy::Missing {
            self.event(task, format!("Image {image} is on this node: not pulled"), &[("image", image.clone())]);
            return Ok(());
        }
        let plugin = self.config();
        self.event(task, format!("Downloading image {image}"), &[("image", image.clone())]);
        let every = plugin.pull_progress_interval.0;
        let last = Mutex::new(Instant::now());
        let me = self.clone();
        let t = task.clone();
        let report = move |p: PullProgress| {
            let mut l = last.lock().unwrap_or_else(|e| e.into_inner());
            if l.elapsed() >= every {
                *l = Instant::now();
                me.event(
                    &t,
                    format!(
                        "Pulling image: {}/{} layers, {:.1}/{:.1} MB",
                        p.layers_done,
                        p.layers,
                        p.bytes_done as f64 / 1e6,
                        p.bytes_total as f64 / 1e6
                    ),
                    &[],
                );
            }
        };
        // The task's own credentials go with its image; the plugin's only to the
        // registry they name (never to whatever host a job author picks).
        let plugin_auth = plugin.auth.as_ref().filter(|a| {
            a.server_address.as_deref().is_some_and(|s| crate::runtime::registry::credentials_apply(s, image))
        });
        if cfg.auth.is_none() && plugin.auth.is_some() && plugin_auth.is_none() {
            tracing::debug!(image = %image, "the plugin's registry credentials are for another registry: pulling without");
        }
        let auth = cfg.auth.as_ref().or(plugin_auth);
        rt.pull(image, auth, plugin.pull_activity_timeout.0, &report).await?;
        self.event(task, format!("Downloaded image {image}"), &[]);
        Ok(())
    }
}
