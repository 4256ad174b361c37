//! The registry v2 manifest of an Ollama model, checked before any name in it
//! becomes a file name.

use serde::Deserialize;

/// Largest manifest read or accepted (real ones are a few KiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest blob a manifest may list (1 TiB).
pub const MAX_BLOB_SIZE: u64 = 1 << 40;
/// Most layers a manifest may list.
pub const MAX_LAYERS: usize = 1000;

/// Why a manifest is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a registry v2 manifest: {0}")]
    Syntax(String),
    #[error("digest {0:?} is not sha256: followed by 64 lowercase hex digits")]
    Digest(String),
    #[error("{digest}: listed size {size} exceeds the limit of {MAX_BLOB_SIZE} bytes")]
    Size { digest: String, size: u64 },
    #[error("{0} layers (at most {MAX_LAYERS})")]
    TooManyLayers(usize),
    #[error("media type {0:?}: manifest lists and other kinds are not supported")]
    MediaType(String),
}

/// A checked sha256 digest: 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>` (the manifest's form).
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        text.strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .map(|h| Digest(h.to_string()))
            .ok_or_else(|| ManifestError::Digest(text.chars().take(100).collect()))
    }

    /// The digest of a blob file name `sha256-<hex>`, if it is one.
    pub fn from_file_name(name: &str) -> Option<Self> {
        Digest::parse(&name.replacen("sha256-", "sha256:", 1)).ok().filter(|_| name.starts_with("sha256-"))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The blob's file name: `sha256-<hex>`.
    pub fn file_name(&self) -> String {
        format!("sha256-{}", self.0)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// One blob a manifest names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// A checked manifest: the config blob and the layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Layer,
    pub layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct RawLayer {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: RawLayer,
    #[serde(default)]
    layers: Vec<RawLayer>,
}

fn layer(raw: RawLayer) -> Result<Layer, ManifestError> {
    let digest = Digest::parse(&raw.digest)?;
    if raw.size > MAX_BLOB_SIZE {
        return Err(ManifestError::Size { digest: raw.digest, size: raw.size });
    }
    Ok(Layer { media_type: raw.media_type, digest, size: raw.size })
}

impl Manifest {
    /// Parses and checks the bytes of a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Syntax(format!("larger than {MAX_MANIFEST_BYTES} bytes")));
        }
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        if raw.schema_version != 2 {
            return Err(ManifestError::Syntax(format!("schemaVersion {}", raw.schema_version)));
        }
        if !raw.media_type.is_empty() && raw.media_type != super::MEDIA_TYPE_MANIFEST {
            return Err(ManifestError::MediaType(raw.media_type));
        }
        if raw.layers.len() > MAX_LAYERS {
            return Err(ManifestError::TooManyLayers(raw.layers.len()));
        }
        let config = layer(raw.config)?;
        let layers = raw.layers.into_iter().map(layer).collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest { config, layers })
    }

    /// Every distinct blob (config first, then layers in order) with its size.
    pub fn blobs(&self) -> Vec<&Layer> {
        let mut seen = std::collections::BTreeSet::new();
        std::iter::once(&self.config).chain(&self.layers).filter(|l| seen.insert(&l.digest)).collect()
    }

    /// Bytes of the distinct blobs.
    pub fn total_size(&self) -> u64 {
        self.blobs().iter().map(|l| l.size).fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(digest: &str, size: u64) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"sha256:{}","size":3}},"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"{digest}","size":{size}}}]}}"#,
            "a".repeat(64)
        )
    }

    #[test]
    fn digests_and_sizes_are_checked_before_they_become_names() {
        let good = format!("sha256:{}", "b".repeat(64));
        let m = Manifest::parse(doc(&good, 10).as_bytes()).unwrap();
        assert_eq!(m.blobs().len(), 2);
        assert_eq!(m.layers[0].digest.file_name(), format!("sha256-{}", "b".repeat(64)));
        assert_eq!(m.total_size(), 13);
        for bad in [
            format!("sha256:{}", "B".repeat(64)),
            format!("sha256:{}", "b".repeat(63)),
            format!("sha512:{}", "b".repeat(64)),
            format!("sha256:../../{}", "b".repeat(58)),
            "sha256-x".to_string(),
        ] {
            assert!(matches!(Manifest::parse(doc(&bad, 1).as_bytes()), Err(ManifestError::Digest(_))), "{bad}");
        }
        assert!(matches!(Manifest::parse(doc(&good, 1 << 41).as_bytes()), Err(ManifestError::Size { .. })));
        assert!(Manifest::parse(b"{}").is_err());
        assert_eq!(Digest::from_file_name(&format!("sha256-{}", "c".repeat(64))).unwrap().hex(), "c".repeat(64));
        assert!(Digest::from_file_name(&format!("sha256-{}.lease", "c".repeat(64))).is_none());
    }
}
