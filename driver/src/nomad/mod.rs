//! The Nomad adapter: go-plugin's handshake and services, the Driver and
//! BasePlugin services as decode → core call → encode, and every conversion
//! between Nomad's protobufs and cty-msgpack and the core's types. Nothing
//! outside this module (but `main`) names tonic, prost or `aimodel_proto`.

pub mod convert;
pub mod cty;
pub mod decode;
pub mod exec_stream;
pub mod hclspec;
pub mod logging;
pub mod server;
pub mod service;
pub mod status;
