//! nomad-driver-aimodel: a Nomad task-driver plugin for AI model servers.
//!
//! Layers, each importing only the ones below it (docs/architecture.md):
//!
//! - [`nomad`]: the adapter, the only code that names tonic, prost or the
//!   generated protos (server and handshake, the services, proto ↔ domain
//!   conversions, statuses, hclspec, the cty codec, hclog output);
//! - [`driver`]: the task core in Nomad's vocabulary (the driver, fingerprints,
//!   events, the cache gate, GPUs, and one file per task operation family);
//! - [`plan`]: pure planning, task config → container spec, one table of engines;
//! - [`runtime`]: the container engine trait, Docker, a scripted fake, cgroup
//!   files, image references;
//! - [`engines`], [`config`], [`types`], [`timefmt`]: the engine table, typed
//!   configuration and shared types.
//!
//! `main.rs` checks the environment, installs logging and calls
//! [`nomad::server::run`]; [`logrelay`] is the detached per-task log relay.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod config;
pub mod driver;
pub mod engines;
pub mod logrelay;
pub mod nomad;
pub mod plan;
pub mod runtime;
pub mod timefmt;
pub mod types;
