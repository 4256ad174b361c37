//! The store: where a model's manifest and blobs are, and whether it is complete.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::manifest::{Digest, Manifest, MAX_MANIFEST_BYTES};
use super::name::ModelName;
use crate::safefs;

/// An Ollama store (`OLLAMA_MODELS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

/// What is wrong with a model in the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no manifest at {path}")]
    MissingManifest { path: String },
    #[error("the manifest at {path} is refused: {reason}")]
    BadManifest { path: String, reason: String },
    #[error("missing blob {}", .digest.file_name())]
    MissingBlob { digest: Digest },
    #[error("blob {} has {actual} bytes, the manifest lists {expected}", .digest.file_name())]
    WrongSize { digest: Digest, expected: u64, actual: u64 },
    #[error("blob {} is not a regular file (refused, not followed)", .digest.file_name())]
    NotAFile { digest: Digest },
    #[error("blob {} hashes to {actual} (corrupt)", .digest.file_name())]
    HashMismatch { digest: Digest, actual: String },
}

/// The outcome of [`Store::check`]: complete when `problems` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: ModelName,
    /// The manifest, when it could be read and parsed.
    pub manifest: Option<Manifest>,
    /// `sha256:<hex>` of the manifest's bytes (the model's identity, like a commit).
    pub manifest_digest: Option<String>,
    pub problems: Vec<Problem>,
}

impl Check {
    /// Whether the manifest and every blob it names are there with the right sizes.
    pub fn is_complete(&self) -> bool {
        self.problems.is_empty() && self.manifest.is_some()
    }

    /// Bytes of the distinct blobs the manifest names.
    pub fn bytes(&self) -> u64 {
        self.manifest.as_ref().map_or(0, Manifest::total_size)
    }
}

impl Store {
    /// The store at `dir` (nothing is read or created).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { root: dir.into() }
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<store>/manifests/<host>/<namespace>/<model>/<tag>`.
    pub fn manifest_path(&self, name: &ModelName) -> PathBuf {
        self.root.join(name.manifest_rel())
    }

    /// `<store>/blobs`.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// `<store>/blobs/sha256-<hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.file_name())
    }

    /// Opens `rel` (a directory below the store) through real directories only.
    fn open_below(&self, rel: &Path) -> std::io::Result<OwnedFd> {
        safefs::open_dir_path_at(safefs::open_dir(&self.root)?, rel)
    }

    /// The manifest's bytes as stored (`Ok(None)`: there is none). Read
    /// through real directories, without following a link, capped at
    /// [`MAX_MANIFEST_BYTES`].
    pub fn read_manifest(&self, name: &ModelName) -> std::io::Result<Option<Vec<u8>>> {
        let rel = name.manifest_rel();
        let dir = match self.open_below(rel.parent().unwrap_or(Path::new(""))) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match safefs::read_capped_at(&dir, OsStr::new(&name.tag), MAX_MANIFEST_BYTES) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Quick check: the manifest and the size of every blob it names (metadata only).
    pub fn check(&self, name: &ModelName) -> Check {
        self.check_with(name, false)
    }

    /// [`Store::check`], and every blob hashed against its digest (reads every byte).
    pub fn verify_deep(&self, name: &ModelName) -> Check {
        self.check_with(name, true)
    }

    fn check_with(&self, name: &ModelName, deep: bool) -> Check {
        let path = self.manifest_path(name).display().to_string();
        let mut c = Check { name: name.clone(), manifest: None, manifest_digest: None, problems: Vec::new() };
        let bytes = match self.read_manifest(name) {
            Ok(Some(b)) => b,
            Ok(None) => {
                c.problems.push(Problem::MissingManifest { path });
                return c;
            }
            Err(e) => {
                c.problems.push(Problem::BadManifest { path, reason: e.to_string() });
                return c;
            }
        };
        let manifest = match Manifest::parse(&bytes) {
            Ok(m) => m,
            Err(e) => {
                c.problems.push(Problem::BadManifest { path, reason: e.to_string() });
                return c;
            }
        };
        c.manifest_digest = Some(format!("sha256:{}", crate::blob::hex(&sha2::Sha256::digest(&bytes))));
        let blobs = self.open_below(Path::new("blobs"));
        for l in manifest.blobs() {
            c.problems.extend(self.check_blob(blobs.as_ref().ok(), &l.digest, l.size, deep));
        }
        c.manifest = Some(manifest);
        c
    }

    fn check_blob(&self, blobs: Option<&OwnedFd>, digest: &Digest, size: u64, deep: bool) -> Option<Problem> {
        let missing = || Problem::MissingBlob { digest: digest.clone() };
        let Some(blobs) = blobs else { return Some(missing()) };
        let name = digest.file_name();
        let (f, st) = match safefs::open_regular_at(blobs, OsStr::new(&name)) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(missing()),
            Err(_) => return Some(Problem::NotAFile { digest: digest.clone() }),
        };
        let actual = u64::try_from(st.st_size).unwrap_or(0);
        if actual != size {
            return Some(Problem::WrongSize { digest: digest.clone(), expected: size, actual });
        }
        if deep {
            let mut f = f;
            let mut h = sha2::Sha256::new();
            if std::io::copy(&mut f, &mut h).is_err() {
                return Some(Problem::NotAFile { digest: digest.clone() });
            }
            let got = crate::blob::hex(&h.finalize());
            if got != digest.hex() {
                return Some(Problem::HashMismatch { digest: digest.clone(), actual: got });
            }
        }
        None
    }

    /// Every model with a manifest file in the store (`manifests/<host>/<ns>/<model>/<tag>`,
    /// real directories and regular files only, names that parse), sorted.
    pub fn models(&self) -> Vec<ModelName> {
        let mut out = Vec::new();
        let Ok(top) = self.open_below(Path::new("manifests")) else { return out };
        let dirs = |fd: &OwnedFd| -> Vec<(OwnedFd, String)> {
            safefs::list_dir(fd)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.is_dir())
                .filter_map(|e| Some((safefs::open_dir_at(fd, &e.name).ok()?, e.name_str()?.to_string())))
                .collect()
        };
        for (h, host) in dirs(&top) {
            for (n, ns) in dirs(&h) {
                for (m, model) in dirs(&n) {
                    for e in safefs::list_dir(&m).unwrap_or_default().into_iter().filter(|e| e.is_file()) {
                        let Some(tag) = e.name_str().filter(|t| !t.starts_with('.')) else { continue };
                        if let Ok(name) = ModelName::parse(&format!("{host}/{ns}/{model}:{tag}")) {
                            out.push(name);
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_complete_only_with_every_blob_at_its_size() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let name = ModelName::parse("tiny:1").unwrap();
        assert!(matches!(store.check(&name).problems[..], [Problem::MissingManifest { .. }]));
        let blob = b"weights";
        let hex = crate::blob::hex(&sha2::Sha256::digest(blob));
        let config = b"{}";
        let chex = crate::blob::hex(&sha2::Sha256::digest(config));
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"sha256:{chex}","size":2}},"layers":[{{"mediaType":"application/vnd.ollama.image.model","digest":"sha256:{hex}","size":7}}]}}"#
        );
        std::fs::create_dir_all(store.manifest_path(&name).parent().unwrap()).unwrap();
        std::fs::write(store.manifest_path(&name), &manifest).unwrap();
        std::fs::create_dir_all(store.blobs_dir()).unwrap();
        let c = store.check(&name);
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        std::fs::write(store.blobs_dir().join(format!("sha256-{chex}")), config).unwrap();
        std::fs::write(store.blobs_dir().join(format!("sha256-{hex}")), b"weight").unwrap();
        assert!(matches!(store.check(&name).problems[..], [Problem::WrongSize { expected: 7, actual: 6, .. }]));
        std::fs::write(store.blobs_dir().join(format!("sha256-{hex}")), b"WEIGHTS").unwrap();
        assert!(store.check(&name).is_complete());
        assert!(matches!(store.verify_deep(&name).problems[..], [Problem::HashMismatch { .. }]));
        std::fs::write(store.blobs_dir().join(format!("sha256-{hex}")), blob).unwrap();
        assert!(store.verify_deep(&name).is_complete());
        assert_eq!(store.models(), vec![name.clone()]);
        // A symlinked blob is refused, not followed.
        std::fs::remove_file(store.blobs_dir().join(format!("sha256-{hex}"))).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", store.blobs_dir().join(format!("sha256-{hex}"))).unwrap();
        assert!(matches!(store.check(&name).problems[..], [Problem::NotAFile { .. }]));
    }
}
