//! nomad-driver-aimodel: a Nomad task-driver plugin for AI model servers.
//!
//! `main.rs` only checks the environment, installs logging and calls
//! [`server::run`]; everything else lives here so it can be tested.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod cache;
pub mod cgroup;
pub mod config;
pub mod convert;
pub mod cty;
pub mod driver;
pub mod engine;
pub mod error;
pub mod exec_stream;
pub mod gpu;
pub mod grpc;
pub mod lifecycle;
pub mod logging;
pub mod logrelay;
pub mod readiness;
pub mod registry;
pub mod runtime;
pub mod schema;
pub mod server;
pub mod task;
pub mod timefmt;
