//! A registry v2 client for Ollama models (ollama/ollama `server/images.go`
//! `PullModel`, `server/download.go`): the manifest of `namespace/model:tag`
//! with `Accept: application/vnd.docker.distribution.manifest.v2+json`, and
//! blobs by digest (redirects to a CDN followed; nothing of ours is sent
//! anywhere: this client carries no credentials).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT};
use reqwest::{Client, Response};

use hf_cache::ollama::{Digest, ModelName, DEFAULT_HOST, MAX_MANIFEST_BYTES, MEDIA_TYPE_MANIFEST};

use crate::fetch::{BlobSource, FetchError};
use crate::hub::{client_for, get_with_retries, read_capped, GetFailure, HubError};

/// Ollama's own registry.
pub const DEFAULT_REGISTRY: &str = "https://registry.ollama.ai";
/// Time to read a manifest.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Most bytes of an error answer read for its code.
const ERROR_BODY_CAP: usize = 64 << 10;

/// Errors talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("ollama://{name}: model not found on {endpoint} ({code})")]
    ModelNotFound { name: String, endpoint: String, code: String },
    #[error("ollama://{name}: not found on {endpoint}: no such model, or no tag {tag:?} ({code})")]
    TagNotFound { name: String, tag: String, endpoint: String, code: String },
    #[error("ollama://{name}: access denied by {endpoint} (HTTP {status}): the agent sends no registry credentials")]
    Denied { name: String, endpoint: String, status: u16 },
    #[error("{url}: HTTP {status} after {attempts} attempts")]
    Status { url: String, status: u16, attempts: u32 },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error(
        "Ollama registry {endpoint:?} is not usable: {reason} (expected an http(s) URL such as {DEFAULT_REGISTRY})"
    )]
    Endpoint { endpoint: String, reason: String },
    #[error("{url}: {reason}")]
    Read { url: String, reason: String },
}

/// The registry (or a mirror of it) models are fetched from.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `None`: each model's own host over https (`registry.ollama.ai` for most).
    mirror: Option<String>,
    http: Client,
}

impl Registry {
    /// A client for `mirror` (every model is fetched from it; its manifests are
    /// still stored under each model's own host), or for each model's own host.
    pub fn new(mirror: Option<&str>) -> Result<Self, RegistryError> {
        let endpoint = mirror.unwrap_or(DEFAULT_REGISTRY);
        let (endpoint, http) =
            client_for(endpoint).map_err(|reason| RegistryError::Endpoint { endpoint: endpoint.into(), reason })?;
        Ok(Registry { mirror: mirror.map(|_| endpoint), http })
    }

    /// Where `name` is fetched from: the mirror, else `https://<host>`.
    pub fn endpoint_for(&self, name: &ModelName) -> String {
        match &self.mirror {
            Some(m) => m.clone(),
            None if name.host.eq_ignore_ascii_case(DEFAULT_HOST) => DEFAULT_REGISTRY.to_string(),
            None => format!("https://{}", name.host),
        }
    }

    /// `<endpoint>/v2/<namespace>/<model>/manifests/<tag>`.
    pub fn manifest_url(&self, name: &ModelName) -> String {
        format!("{}/v2/{}/manifests/{}", self.endpoint_for(name), name.repository(), name.tag)
    }

    /// `<endpoint>/v2/<namespace>/<model>/blobs/sha256:<hex>`.
    pub fn blob_url(&self, name: &ModelName, digest: &Digest) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.endpoint_for(name), name.repository())
    }

    /// GET with the shared retries; a refusal is named after the model.
    pub async fn get(&self, name: &ModelName, url: &str, headers: HeaderMap) -> Result<Response, RegistryError> {
        match get_with_retries(&self.http, url, headers).await {
            Ok(r) => Ok(r),
            Err(GetFailure::Transport { reason }) => Err(RegistryError::Transport { url: url.into(), reason }),
            Err(GetFailure::Status { resp, attempts }) => {
                let status = resp.status().as_u16();
                let endpoint = self.endpoint_for(name);
                let short = name.short();
                match status {
                    401 | 403 => Err(RegistryError::Denied { name: short, endpoint, status }),
                    404 => {
                        let code = error_code(resp, url).await;
                        if code.contains("NAME_UNKNOWN") || !url.contains("/manifests/") {
                            Err(RegistryError::ModelNotFound { name: short, endpoint, code })
                        } else {
                            Err(RegistryError::TagNotFound { name: short, tag: name.tag.clone(), endpoint, code })
                        }
                    }
                    s => Err(RegistryError::Status { url: url.into(), status: s, attempts }),
                }
            }
        }
    }

    /// The manifest's bytes exactly as served (at most [`MAX_MANIFEST_BYTES`], within 120 s).
    pub async fn manifest(&self, name: &ModelName) -> Result<Vec<u8>, RegistryError> {
        let url = self.manifest_url(name);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(MEDIA_TYPE_MANIFEST));
        let resp = self.get(name, &url, h).await?;
        let cap = usize::try_from(MAX_MANIFEST_BYTES).unwrap_or(usize::MAX);
        read_capped(resp, &url, cap, MANIFEST_TIMEOUT)
            .await
            .map_err(|e: HubError| RegistryError::Read { url: url.clone(), reason: e.to_string() })
    }
}

/// The registry's error code(s) (`{"errors":[{"code":"MANIFEST_UNKNOWN",…}]}`), or the status.
async fn error_code(resp: Response, url: &str) -> String {
    let status = resp.status().as_u16();
    let body = read_capped(resp, url, ERROR_BODY_CAP, Duration::from_secs(10)).await.unwrap_or_default();
    let codes: Vec<String> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e.get("code").and_then(|c| c.as_str()))
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
        .map(str::to_string)
        .collect();
    if codes.is_empty() {
        format!("HTTP {status}")
    } else {
        codes.join(", ")
    }
}

/// One blob of one model on the registry.
#[derive(Debug, Clone)]
pub(super) struct RegistryBlob {
    pub registry: Registry,
    pub name: ModelName,
}

impl BlobSource for RegistryBlob {
    async fn get(&self, url: &str, headers: HeaderMap) -> Result<Response, FetchError> {
        self.registry.get(&self.name, url, headers).await.map_err(|e| FetchError::Source(Box::new(e)))
    }
}
