//! Eviction of Ollama models: a model goes as its manifest; a blob goes once
//! no manifest left in the store names it (blobs are shared between models)
//! and no pull is in progress (no fresh `*.lease` in `blobs/`).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{Cached, Keep, Policy};
use crate::ollama::{Digest, Manifest, ModelName, Store};
use crate::safefs;
use crate::state::StateDir;

fn mtime_of(st: &nix::sys::stat::FileStat) -> SystemTime {
    let secs = u64::try_from(st.st_mtime).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Every model of the store with the bytes evicting it would free (blobs no
/// other manifest names), its last use and its reason to be kept.
pub fn inventory(store: &Store, state: &StateDir, policy: &Policy) -> Vec<Cached> {
    let in_use: Vec<_> = state.in_use(policy.in_use_ttl).into_iter().filter(|(_, _, live)| *live).collect();
    let shared_pins: Vec<String> = state.pins().into_iter().map(|p| p.repo).collect();
    let manifests: Vec<(ModelName, Option<Manifest>)> = store
        .models()
        .into_iter()
        .map(|n| {
            let m = store.read_manifest(&n).ok().flatten().and_then(|b| Manifest::parse(&b).ok());
            (n, m)
        })
        .collect();
    let mut out = Vec::new();
    for (name, manifest) in &manifests {
        let key = crate::ollama::state_key(name);
        let others: BTreeSet<&Digest> = manifests
            .iter()
            .filter(|(n, _)| n != name)
            .filter_map(|(_, m)| m.as_ref())
            .flat_map(|m| m.blobs().into_iter().map(|l| &l.digest))
            .collect();
        let bytes = manifest
            .as_ref()
            .map_or(0, |m| m.blobs().iter().filter(|l| !others.contains(&l.digest)).map(|l| l.size).sum::<u64>());
        let keep = if policy.pinned.contains(&key) || shared_pins.contains(&key) {
            Some(Keep::Pinned)
        } else if let Some((u, _, _)) = in_use.iter().find(|(u, _, _)| u.uses(&key)) {
            Some(Keep::InUse { node: u.node.clone(), task: u.task.clone() })
        } else if policy.protected.contains(&key) {
            Some(Keep::Protected)
        } else {
            None
        };
        let last_used = state.last_used(&key).unwrap_or_else(|| {
            std::fs::symlink_metadata(store.manifest_path(name))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        });
        out.push(Cached { repo: key, bytes, last_used, keep });
    }
    out
}

/// Evicts the model `key` names (`ollama/<name>`): its warm records first,
/// then its manifest (moved aside, put back if an in-use marker appeared
/// meanwhile), then the blobs no manifest names any more ([`collect_blobs`]).
/// Returns the bytes freed, or `None` when it was gone or is in use now.
pub fn evict(store: &Store, state: &StateDir, key: &str, policy: &Policy) -> std::io::Result<Option<u64>> {
    let Some(name) = crate::ollama::from_state_key(key) else { return Ok(None) };
    let rel = name.manifest_rel();
    let dir = match safefs::open_dir(store.root())
        .and_then(|r| safefs::open_dir_path_at(r, rel.parent().unwrap_or(Path::new(""))))
    {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    state.remove_warm(key)?;
    let aside = format!(".{}.evicting.{}", name.tag, safefs::random_hex(6));
    match nix::fcntl::renameat(&dir, name.tag.as_str(), &dir, aside.as_str()) {
        Ok(()) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    if state.in_use(policy.in_use_ttl).iter().any(|(u, _, live)| *live && u.uses(key)) {
        nix::fcntl::renameat(&dir, aside.as_str(), &dir, name.tag.as_str())?;
        return Ok(None);
    }
    nix::unistd::unlinkat(&dir, aside.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
    state.forget_used(key);
    collect_blobs(store, policy.lease_fresh).map(Some)
}

/// Whether a pull is in progress: a `*.lease` in `blobs/` changed within `fresh`.
fn pulling(blobs: &OwnedFd, fresh: Duration) -> bool {
    let now = SystemTime::now();
    safefs::list_dir(blobs).unwrap_or_default().into_iter().any(|e| {
        e.name_str().is_some_and(|n| n.ends_with(".lease"))
            && e.stat.is_some_and(|st| now.duration_since(mtime_of(&st)).unwrap_or_default() < fresh)
    })
}

/// Removes the blobs no manifest of the store names, unless a pull is in
/// progress (then nothing: the next pass collects them). Each is moved aside
/// first and put back if a pull started meanwhile. A manifest that cannot be
/// read or parsed stops the collection (its blobs cannot be told apart; nothing
/// is removed). Returns the bytes freed.
pub fn collect_blobs(store: &Store, lease_fresh: Duration) -> std::io::Result<u64> {
    let blobs = match safefs::open_dir(&store.blobs_dir()) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut referenced = BTreeSet::new();
    for name in store.models() {
        let parsed = store.read_manifest(&name).ok().flatten().and_then(|b| Manifest::parse(&b).ok());
        // Its blobs cannot be told apart: collect nothing (not an error: one bad
        // manifest, a tenant's, must not stop the HF models' gc).
        let Some(m) = parsed else { return Ok(0) };
        referenced.extend(m.blobs().into_iter().map(|l| l.digest.clone()));
    }
    let mut freed = 0;
    for e in safefs::list_dir(&blobs)? {
        let Some(digest) = e.name_str().and_then(Digest::from_file_name) else { continue };
        if referenced.contains(&digest) || !e.is_file() || pulling(&blobs, lease_fresh) {
            continue;
        }
        let aside = format!(".{}.gc.{}", digest.file_name(), safefs::random_hex(6));
        if nix::fcntl::renameat(&blobs, e.name.as_os_str(), &blobs, aside.as_str()).is_err() {
            continue;
        }
        if pulling(&blobs, lease_fresh) {
            let _ = nix::fcntl::renameat(&blobs, aside.as_str(), &blobs, e.name.as_os_str());
            continue;
        }
        freed += e.stat.map_or(0, |st| u64::try_from(st.st_size).unwrap_or(0));
        safefs::remove_at(&blobs, OsStr::new(&aside))?;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use sha2::Digest as _;

    use super::*;

    fn put_model(store: &Store, name: &str, blobs: &[&[u8]]) -> Vec<PathBuf> {
        let name = ModelName::parse(name).unwrap();
        std::fs::create_dir_all(store.blobs_dir()).unwrap();
        let layers: Vec<String> = blobs
            .iter()
            .map(|b| {
                let hex = crate::blob::hex(&sha2::Sha256::digest(b));
                std::fs::write(store.blobs_dir().join(format!("sha256-{hex}")), b).unwrap();
                format!(r#"{{"digest":"sha256:{hex}","size":{}}}"#, b.len())
            })
            .collect();
        let m = format!(r#"{{"schemaVersion":2,"config":{},"layers":[{}]}}"#, layers[0], layers[1..].join(","));
        std::fs::create_dir_all(store.manifest_path(&name).parent().unwrap()).unwrap();
        std::fs::write(store.manifest_path(&name), m).unwrap();
        blobs
            .iter()
            .map(|b| store.blobs_dir().join(format!("sha256-{}", crate::blob::hex(&sha2::Sha256::digest(b)))))
            .collect()
    }

    #[test]
    fn only_blobs_no_manifest_names_go_and_a_bad_manifest_stops_the_collection() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let a = put_model(&store, "a:1", &[b"cfg-a", b"shared", b"only-a"]);
        let b = put_model(&store, "b:1", &[b"cfg-b", b"shared"]);
        std::fs::remove_file(store.manifest_path(&ModelName::parse("b:1").unwrap())).unwrap();
        // A fresh pull lease: nothing is collected.
        std::fs::write(store.blobs_dir().join("pull-00.lease"), "x").unwrap();
        assert_eq!(collect_blobs(&store, Duration::from_secs(60)).unwrap(), 0);
        assert!(b[0].exists());
        std::fs::remove_file(store.blobs_dir().join("pull-00.lease")).unwrap();
        // A manifest that does not parse: nothing is collected either.
        let bad = ModelName::parse("bad:1").unwrap();
        std::fs::create_dir_all(store.manifest_path(&bad).parent().unwrap()).unwrap();
        std::fs::write(store.manifest_path(&bad), "{").unwrap();
        assert_eq!(collect_blobs(&store, Duration::from_secs(60)).unwrap(), 0);
        std::fs::remove_file(store.manifest_path(&bad)).unwrap();
        // b's own config goes; the blob a shares stays, and a is complete.
        assert_eq!(collect_blobs(&store, Duration::from_secs(60)).unwrap(), 5);
        assert!(!b[0].exists() && a.iter().all(|p| p.exists()));
        assert!(store.check(&ModelName::parse("a:1").unwrap()).is_complete());
    }
}
