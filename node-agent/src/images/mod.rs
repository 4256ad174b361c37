//! Engine images pulled ahead: the image of every `driver = "aimodel"` task
//! that this node could run (the [`policy`]) is pulled into the node's Docker
//! engine before Nomad places the task, so StartTask finds it and pulls nothing.
//!
//! An image pulled ahead is *held*: a created, never started container
//! labelled `com.aimodel.hold` refers to it, so neither the driver's
//! `gc.image` nor `docker image prune` removes an image a registered job still
//! wants (Docker refuses to remove an image a container uses). When no job
//! wants it any more, the agent removes the holder after `remove_delay` and
//! then the image, unless a task's container still uses it (the driver's
//! `gc.image` then removes it after that task). Nothing is removed while this
//! node cannot be read from Nomad.

mod config;
mod policy;
mod puller;

pub use config::ImagesConfig;
pub use policy::{decide, image_for, node_view, NodeView};
pub use puller::{disk_guard, run, FetchNode, ImageStatus, ImagesStatus, HOLD_LABEL, HOLD_REF_LABEL};
