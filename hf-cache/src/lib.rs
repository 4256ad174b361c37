//! The HuggingFace hub cache on disk, compatible with huggingface_hub:
//! layout, completeness of `repo@revision`, deep verification, mount checks
//! and publishing. No network, no async, no Docker.

pub mod backoff;
mod blob;
pub mod check;
pub mod gc;
pub mod layout;
pub mod mount;
pub mod ollama;
pub mod publish;
pub mod safefs;
pub mod state;
pub mod units;

pub use check::{check, Finding, Mode, Report};
pub use layout::{CompletionRecord, RecordedFile, RepoId, RepoPaths, RepoType, TreeEntry, TreeFile};

#[cfg(test)]
mod hostile;
#[cfg(test)]
mod tests;
