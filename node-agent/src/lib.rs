//! aimodel-agent: prewarm models into the shared HF cache exactly once across
//! the nodes that share it, verify them and report what is cached. The same
//! binary is the operator's CLI.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod env;
pub mod fetch;
pub mod hub;
pub mod images;
pub mod jobs;
pub mod lease;
pub mod logging;
pub mod nomad;
pub mod ollama;
pub mod prewarm;
