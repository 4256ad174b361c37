//! Ollama's model store on disk (`OLLAMA_MODELS`; by default `<HF_HOME>/ollama`
//! on the shared export), as ollama/ollama lays it out (`manifest/paths.go`,
//! `manifest/manifest.go`):
//!
//! ```text
//! <store>/manifests/<host>/<namespace>/<model>/<tag>   the manifest JSON, byte for byte as the registry served it
//! <store>/blobs/sha256-<64 hex>                        config and layers, named by the sha256 of their content
//! ```
//!
//! # Contract (for the agent, which writes the store, and the driver, which gates starts on it)
//!
//! - **Names**: [`ModelName::parse`] accepts Ollama's syntax (`llama3.2:3b`,
//!   `ns/model:tag`, `host/ns/model:tag`, optionally after `ollama://`) and
//!   fills `registry.ollama.ai`, `library`, `latest`. Every part is checked to be
//!   one safe path component. The manifest lives under the model's canonical
//!   host even when it was fetched from a mirror, so a stock Ollama server
//!   pointed at the store finds it.
//! - **Publishing order** (the agent): every blob is downloaded under a temp
//!   name, its sha256 compared with its digest, and only then renamed to
//!   `blobs/sha256-<hex>`; the manifest is written last, whole (temp name,
//!   fsync, rename). So a manifest on disk means its blobs were published —
//!   unless something removed them later, which [`Store::check`] detects.
//! - **Completeness** ([`Store::check`], quick: metadata only): the manifest is
//!   a regular file (no symlink followed anywhere below the store, size-capped
//!   at [`MAX_MANIFEST_BYTES`]), parses as a v2 manifest whose every digest is
//!   `sha256:` + 64 lowercase hex and every size at most [`MAX_BLOB_SIZE`],
//!   and every blob it names (config and layers) is a regular file of exactly
//!   the listed size. [`Store::verify_deep`] also hashes each blob.
//!   A [`Check`] with no [`Problem`] is complete; each problem says what is
//!   wrong in words fit for a task event ("missing blob sha256-…").
//! - **State shared through `<HF_HOME>/aimodel/`** ([`crate::state`]): Ollama
//!   models use the same records as HF models, keyed by [`state_key`] =
//!   `ollama/<short name>` (`ollama/llama3.2:3b`): a warm record
//!   (`WarmRecord { repo: "ollama/llama3.2:3b", revision: <tag>, commit:
//!   "sha256:<manifest digest>" }`, so the driver's existing warm attributes
//!   read `driver.aimodel.warm.ollama/llama3.2:3b`), in-use markers
//!   (`InUse { repo: "ollama/llama3.2:3b", commit: <manifest digest>, .. }`),
//!   pins and last-used stamps. The agent's gc keeps a model that is pinned,
//!   in use (a live marker) or wanted, and a blob while any kept manifest
//!   names it (blobs are shared between models).
//! - **Blobs being pulled**: an agent pulling a model holds a heartbeat lease
//!   `blobs/pull-<token>.lease` from before it looks at blobs until its
//!   manifest is written; gc removes unreferenced blobs only while no fresh
//!   lease is in `blobs/`, and checks again after moving each one aside.
//!
//! The driver should mount the store read-only and set `OLLAMA_NOPRUNE=1`:
//! a starting Ollama server otherwise prunes blobs no manifest names yet —
//! blobs another node is pulling right now — and our partial files.

mod manifest;
mod name;
mod store;

pub use manifest::{Digest, Layer, Manifest, ManifestError, MAX_BLOB_SIZE, MAX_LAYERS, MAX_MANIFEST_BYTES};
pub use name::{ModelName, NameError, DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, SCHEME};
pub use store::{Check, Problem, Store};

/// Media type of a registry v2 manifest (what the agent asks for).
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Media type of the model weights layer (GGUF).
pub const MEDIA_TYPE_MODEL: &str = "application/vnd.ollama.image.model";

/// The default store of a cache: `<HF_HOME>/ollama`, beside `hub/` and `aimodel/`
/// (the agent's `ollama_models` or `OLLAMA_MODELS` may put it elsewhere).
pub fn default_store(hf_home: &std::path::Path) -> std::path::PathBuf {
    hf_home.join("ollama")
}

/// The key of an Ollama model in the shared state records (`aimodel/warm`,
/// `in-use`, `pins`, `last-used`): `ollama/<short name>`, e.g. `ollama/llama3.2:3b`.
pub fn state_key(name: &ModelName) -> String {
    format!("ollama/{}", name.short())
}

/// The model a state key names, if it is an Ollama key (always with a `:tag`,
/// which no HF repo id has: `ollama/x` is the HF repo of an org called ollama).
pub fn from_state_key(key: &str) -> Option<ModelName> {
    key.strip_prefix("ollama/").filter(|n| n.contains(':')).and_then(|n| ModelName::parse(n).ok())
}
