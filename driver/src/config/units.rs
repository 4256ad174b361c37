//! Durations and byte sizes as operators write them (`"30s"`, `"10GiB"`), parsed
//! while decoding so that errors carry the attribute path. Shared with the agent
//! through `hf_cache::units`.

pub use hf_cache::units::{parse_bytes, parse_duration, Bytes, Dur};
