//! A Nomad-client simulator: launches the real plugin binary exactly as a
//! Nomad client does (environment, handshake, call order, cty-msgpack
//! payloads) and drives it over gRPC. Used by the tests, the benchmarks and the
//! demo (`nomad-sim`).

pub mod cli;
pub mod delayproxy;
pub mod docs;
pub mod engines;
pub mod faulthub;
pub mod hcl_eval;
pub mod hostilehub;
pub mod imagereg;
pub mod jobrun;
pub mod nomadapi;
pub mod olah;
pub mod ollamareg;
pub mod openai;
pub mod plugin;
pub mod pluginhcl;
pub mod sequence;
pub mod statichub;
pub mod support;
pub mod task;
pub mod tasksim;
