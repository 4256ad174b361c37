//! nomad-driver-aimodel: a Nomad task-driver plugin for AI model servers.
//!
//! `main.rs` only installs logging and calls [`server::run`]; everything else
//! lives here so it can be tested.

pub mod config;
pub mod cty;
pub mod schema;
