//! The shared HF cache as the driver sees it: mount health for the
//! fingerprint, and the completeness gate before a model server starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_cache::mount::{mount_for, parse_mountinfo, probe as with_timeout_for, space, writable};
use hf_cache::state::{InUse, StateDir};
use hf_cache::{check, Mode, RepoId, RepoPaths};

use crate::config::{HfCacheConfig, TaskConfig};
use crate::driver::error::DriverError;
use crate::types::AttrValue;

/// What the filesystem probes found (all of them run on one thread under a timeout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub exists: bool,
    pub writable: Result<(), String>,
    pub free_bytes: Option<u64>,
}

/// The real probes: existence, create/rename/unlink, statvfs.
pub fn probe_path(path: &Path) -> ProbeResult {
    let exists = path.is_dir();
    if !exists {
        return ProbeResult { exists, writable: Err("does not exist".into()), free_bytes: None };
    }
    ProbeResult {
        exists,
        writable: writable(path).map_err(|e| e.to_string()),
        free_bytes: space(path).ok().map(|(free, _)| free),
    }
}

/// The cache's fingerprint: attributes, and the problems that make the driver unhealthy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CacheStatus {
    pub attributes: BTreeMap<String, AttrValue>,
    pub problems: Vec<String>,
    pub on_nfs: bool,
}

/// Whether the cache sits on NFS, from mountinfo alone (no filesystem probe:
/// StartTask needs only this for `load_strategy = "auto"`).
pub fn on_nfs(cfg: &HfCacheConfig) -> bool {
    let mountinfo = std::fs::read_to_string(&cfg.mountinfo).unwrap_or_default();
    mount_for(&parse_mountinfo(&mountinfo), Path::new(&cfg.host_path)).is_some_and(|m| m.is_nfs())
}

/// Assesses the cache with the real probes.
pub fn assess(cfg: &HfCacheConfig) -> CacheStatus {
    let mountinfo = std::fs::read_to_string(&cfg.mountinfo).unwrap_or_default();
    assess_with(cfg, &mountinfo, probe_path)
}

/// Assesses the cache with `probe` (injectable so a hanging filesystem can be simulated).
pub fn assess_with(
    cfg: &HfCacheConfig,
    mountinfo: &str,
    probe: impl FnOnce(&Path) -> ProbeResult + Send + 'static,
) -> CacheStatus {
    let path = PathBuf::from(&cfg.host_path);
    let mut st = CacheStatus::default();
    let attr = |k: &str| format!("driver.aimodel.hf_cache.{k}");
    st.attributes.insert(attr("path"), AttrValue::Str(cfg.host_path.clone()));
    let mounts = parse_mountinfo(mountinfo);
    if let Some(m) = mount_for(&mounts, &path) {
        st.on_nfs = m.is_nfs();
        st.attributes.insert(attr("fstype"), AttrValue::Str(m.fstype.clone()));
        if let Some(v) = m.nfs_version() {
            st.attributes.insert(attr("nfs.version"), AttrValue::Str(v));
            st.attributes.insert(attr("nfs.nolock"), AttrValue::Bool(m.nolock()));
            st.attributes.insert(attr("nfs.soft"), AttrValue::Bool(m.soft()));
        }
        if cfg.require_nfs && !m.is_nfs() {
            st.problems.push(format!(
                "hf cache {} is on {} ({}), not NFS, and require_nfs is true",
                cfg.host_path,
                m.fstype,
                m.mount_point.display()
            ));
        }
        if m.read_only() {
            st.problems.push(format!("hf cache {} is mounted read-only", cfg.host_path));
        }
    } else if cfg.require_nfs {
        st.problems.push(format!("hf cache {} is not on any mount (require_nfs is true)", cfg.host_path));
    }
    let timeout = cfg.probe_timeout.0;
    let p = path.clone();
    match with_timeout_for(&path, timeout, move || probe(&p)) {
        Err(t) => {
            st.problems.push(format!("hf cache {}: {t}", cfg.host_path));
            st.attributes.insert(attr("writable"), AttrValue::Bool(false));
        }
        Ok(r) if !r.exists => {
            st.problems.push(format!("hf cache path {} does not exist (is the NFS export mounted?)", cfg.host_path));
            st.attributes.insert(attr("writable"), AttrValue::Bool(false));
        }
        Ok(r) => {
            st.attributes.insert(attr("writable"), AttrValue::Bool(r.writable.is_ok()));
            if let Err(e) = &r.writable {
                st.problems.push(format!("hf cache {} is not writable: {e}", cfg.host_path));
            }
            // No byte counts in attributes or the health description: other nodes
            // write this filesystem all the time, and every change re-registers
            // the node and re-evaluates its jobs (`client/node_updater.go`).
            if let Some(free) = r.free_bytes {
                if free < cfg.min_free.0 {
                    st.problems
                        .push(format!("hf cache {} has less free space than min_free {}", cfg.host_path, cfg.min_free));
                }
            }
        }
    }
    st
}

/// The outcome of the completeness gate.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCheck {
    pub repo: String,
    pub revision: String,
    pub commit: Option<String>,
    pub complete: bool,
    pub verifiable: bool,
    pub files: usize,
    pub bytes: u64,
    /// The commit's files (path in the repo → size), as far as they are known.
    pub sizes: BTreeMap<String, u64>,
    /// Human lines, one per finding.
    pub findings: Vec<String>,
}

impl ModelCheck {
    /// The one message StartTask fails with: what is missing and the command that fixes it.
    pub fn failure_message(&self, hub: &Path) -> String {
        let shown: Vec<&str> = self.findings.iter().take(8).map(String::as_str).collect();
        let more = self.findings.len().saturating_sub(shown.len());
        // `hub` is `<host_path>/hub`; the agent's --hf-home is `host_path` (HF_HOME).
        let home = hub.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(hub);
        format!(
            "model {}@{} is not complete in the HF cache at {}: {}{}. Fix: aimodel-agent --hf-home {} prewarm {}@{}",
            self.repo,
            self.revision,
            hub.display(),
            shown.join("; "),
            if more > 0 { format!(" (and {more} more)") } else { String::new() },
            home.display(),
            self.repo,
            self.revision
        )
    }
}

/// Which tasks load an HF model from the cache.
pub fn uses_hf_cache(cfg: &TaskConfig) -> bool {
    cfg.model.is_some() && cfg.engine.spec().uses_hf_cache
}

/// The shared-state keys of the models a task will keep in use (see
/// [`crate::types::DriverState::in_use_keys`]).
pub fn in_use_keys(cfg: &TaskConfig) -> Vec<String> {
    if cfg.engine == crate::engines::Engine::Ollama {
        return cfg.ollama_models().unwrap_or_default().iter().map(hf_cache::ollama::state_key).collect();
    }
    cfg.model.iter().filter(|_| uses_hf_cache(cfg)).cloned().collect()
}

/// Checks `model@revision` in `<host_path>/hub` (quick mode) under the probe timeout.
pub fn check_model(
    cache: &HfCacheConfig,
    model: &str,
    revision: &str,
    timeout: Duration,
) -> Result<ModelCheck, DriverError> {
    let hub = hub_dir(cache);
    let (repo, rev) = (model.to_string(), revision.to_string());
    let key = PathBuf::from(&cache.host_path);
    let report = with_timeout_for(&key, timeout, move || check(&hub, &RepoId::model(&repo), &rev, Mode::Quick))
        .map_err(|t| DriverError::CacheUnavailable { path: cache.host_path.clone(), reason: t.to_string() })?;
    Ok(ModelCheck {
        repo: model.to_string(),
        revision: revision.to_string(),
        commit: report.commit.clone(),
        complete: report.is_complete(),
        verifiable: report.verifiable,
        files: report.files.len(),
        bytes: report.total_bytes(),
        sizes: report.files.clone(),
        findings: report.findings.iter().map(ToString::to_string).collect(),
    })
}

/// Whether `text` matches the glob `pattern` (`*` any run of characters but
/// `/`, `?` one character; anything else literally).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], t) || t.first().is_some_and(|c| *c != '/') && go(p, &t[1..]),
            (Some('?'), Some(c)) if *c != '/' => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(&pattern.chars().collect::<Vec<_>>(), &text.chars().collect::<Vec<_>>())
}

/// The one file of `sizes` that `pattern` names (its path in the repo, or, for
/// a pattern without `/`, its file name); an error says what matched instead.
pub fn choose_file(sizes: &BTreeMap<String, u64>, pattern: &str) -> Result<(String, u64), String> {
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let hits: Vec<(&String, &u64)> = sizes
        .iter()
        .filter(|(p, _)| glob_match(pattern, p) || !pattern.contains('/') && glob_match(pattern, &name(p)))
        .collect();
    match hits.as_slice() {
        [(p, n)] => Ok(((*p).clone(), **n)),
        [] => {
            let ggufs: Vec<&str> = sizes.keys().filter(|p| p.ends_with(".gguf")).map(String::as_str).collect();
            Err(format!("{pattern:?} matches no file of the model (its GGUF files: {})", ggufs.join(", ")))
        }
        many => {
            let names: Vec<&str> = many.iter().map(|(p, _)| p.as_str()).collect();
            Err(format!("{pattern:?} matches {} files ({}); name exactly one", names.len(), names.join(", ")))
        }
    }
}

/// `models--org--name/snapshots/<commit>/<file>`, relative to the hub cache.
pub fn snapshot_file(model: &str, commit: &str, file: &str) -> String {
    format!("{}/snapshots/{commit}/{file}", RepoId::model(model).folder_name())
}

/// Checks that `file` of the snapshot is there with `size` bytes (following its
/// link to the blob), under the probe timeout; an error is a finding.
pub fn check_file(cache: &HfCacheConfig, model: &str, commit: &str, file: &str, size: u64) -> Result<(), String> {
    let path = hub_dir(cache).join(snapshot_file(model, commit, file));
    let p = path.clone();
    match with_timeout_for(Path::new(&cache.host_path), cache.probe_timeout.0, move || std::fs::metadata(&p)) {
        Err(t) => Err(format!("{file}: {t}")),
        Ok(Err(e)) => Err(format!("{file} is missing ({e})")),
        Ok(Ok(m)) if m.len() != size => Err(format!("{file} has {} of its {size} bytes", m.len())),
        Ok(Ok(_)) => Ok(()),
    }
}

/// `driver.aimodel.warm.<org>/<name>` = commit for every model the agent
/// recorded as warm whose snapshot is still there (one stat each), and
/// `driver.aimodel.warm.ollama/<name>:<tag>` = `sha256:<manifest digest>` for
/// every Ollama model whose manifest is still in the store; read under the
/// probe timeout. Several revisions of one repo: the latest verified wins.
pub fn warm_attributes(cache: &HfCacheConfig) -> BTreeMap<String, AttrValue> {
    let hub = hub_dir(cache);
    let store = hf_cache::ollama::Store::new(cache.ollama_store());
    with_timeout_for(Path::new(&cache.host_path), cache.probe_timeout.0, move || {
        let mut latest: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for r in StateDir::for_hub(&hub).warm() {
            if latest.len() >= MAX_WARM_ATTRIBUTES && !latest.contains_key(&r.repo) {
                continue;
            }
            if let Some(name) = hf_cache::ollama::from_state_key(&r.repo) {
                // An Ollama model: its manifest (a regular file) is still in the store.
                let key = hf_cache::ollama::state_key(&name);
                // (Read without following links, as the gate reads it.)
                if hf_cache::ollama::Digest::parse(&r.commit).is_err()
                    || !store.read_manifest(&name).is_ok_and(|m| m.is_some())
                {
                    continue;
                }
                let e = latest.entry(key).or_insert((0, String::new()));
                if r.verified_at >= e.0 {
                    *e = (r.verified_at, r.commit);
                }
                continue;
            }
            // Records live on a shared filesystem: only a well-formed repo id and
            // commit become an attribute, and only so many (each is node state).
            if !crate::config::valid_repo_id(&r.repo)
                || !r.repo.contains('/')
                || !hf_cache::layout::is_commit(&r.commit)
                || latest.len() >= MAX_WARM_ATTRIBUTES && !latest.contains_key(&r.repo)
            {
                continue;
            }
            if !RepoPaths::new(&hub, &RepoId::model(&r.repo)).snapshot(&r.commit).is_dir() {
                continue;
            }
            let e = latest.entry(r.repo.clone()).or_insert((0, String::new()));
            if r.verified_at >= e.0 {
                *e = (r.verified_at, r.commit);
            }
        }
        latest
            .into_iter()
            .map(|(repo, (_, commit))| (format!("driver.aimodel.warm.{repo}"), AttrValue::Str(commit)))
            .collect()
    })
    .unwrap_or_default()
}

/// At most this many `driver.aimodel.warm.*` attributes.
const MAX_WARM_ATTRIBUTES: usize = 256;

/// Marks `models` (state keys: `org/name`, `ollama/llama3.2:3b`) in use by
/// `task` for the agents' gc (any node), in one marker, and notes the use for
/// least-recently-used ordering. Errors are logged, never fatal: a missing
/// marker only weakens gc protection.
pub fn mark_in_use(cache: &HfCacheConfig, task: &str, node: &str, models: &[String], commit: &str, touch: bool) {
    let Some((first, rest)) = models.split_first() else { return };
    let (hub, timeout) = (hub_dir(cache), cache.probe_timeout.0);
    let u =
        InUse { repo: first.clone(), commit: commit.into(), node: node.into(), task: task.into(), also: rest.to_vec() };
    let r = with_timeout_for(Path::new(&cache.host_path), timeout, move || {
        let s = StateDir::for_hub(&hub);
        s.mark_in_use(&u)?;
        if touch {
            for m in std::iter::once(&u.repo).chain(&u.also) {
                s.touch_used(m)?;
            }
        }
        Ok::<_, std::io::Error>(())
    });
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(task_id = %task, error = %e, "could not write the in-use marker"),
        Err(t) => tracing::warn!(task_id = %task, error = %t, "could not write the in-use marker"),
    }
}

/// Removes the in-use marker of `task`.
pub fn clear_in_use(cache: &HfCacheConfig, task: &str) {
    let (hub, t) = (hub_dir(cache), task.to_string());
    let key = Path::new(&cache.host_path);
    if let Ok(Err(e)) = with_timeout_for(key, cache.probe_timeout.0, move || StateDir::for_hub(&hub).clear_in_use(&t)) {
        tracing::warn!(task_id = %task, error = %e, "could not remove the in-use marker");
    }
}

/// `HF_HUB_CACHE` on the host: `<host_path>/hub`.
pub fn hub_dir(cache: &HfCacheConfig) -> PathBuf {
    Path::new(&cache.host_path).join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::{Bytes, Dur};

    fn cfg(path: &Path, require_nfs: bool) -> HfCacheConfig {
        HfCacheConfig {
            host_path: path.display().to_string(),
            require_nfs,
            min_free: Bytes(1),
            probe_timeout: Dur(Duration::from_millis(300)),
            ..Default::default()
        }
    }

    #[test]
    fn only_well_formed_warm_records_become_attributes() {
        let d = tempfile::tempdir().unwrap();
        let hub = d.path().join("hub");
        let state = StateDir::for_hub(&hub);
        let good = "a".repeat(40);
        for (repo, commit) in [("org/ok", good.as_str()), ("org/bad-commit", "zz"), ("a b/c", good.as_str())] {
            std::fs::create_dir_all(RepoPaths::new(&hub, &RepoId::model(repo)).snapshot(commit)).unwrap();
            let rec = hf_cache::state::WarmRecord {
                repo: repo.into(),
                revision: "main".into(),
                commit: commit.into(),
                bytes: 1,
                verified_at: 1,
                node: "n".into(),
            };
            state.write_warm(&rec).unwrap();
        }
        // Ollama models: the record's digest is well formed and the manifest is still in the store.
        let digest = format!("sha256:{}", "b".repeat(64));
        for (key, commit, manifest) in [
            ("ollama/tiny:1b", digest.as_str(), true),
            ("ollama/gone:1b", digest.as_str(), false),
            ("ollama/bad:1b", "sha256:zz", true),
        ] {
            let name = hf_cache::ollama::from_state_key(key).unwrap();
            if manifest {
                let path = hf_cache::ollama::Store::new(d.path().join("ollama")).manifest_path(&name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, b"{}").unwrap();
            }
            let rec = hf_cache::state::WarmRecord {
                repo: key.into(),
                revision: name.tag.clone(),
                commit: commit.into(),
                bytes: 1,
                verified_at: 1,
                node: "n".into(),
            };
            state.write_warm(&rec).unwrap();
        }
        let attrs = warm_attributes(&cfg(d.path(), false));
        assert_eq!(
            attrs.keys().collect::<Vec<_>>(),
            ["driver.aimodel.warm.ollama/tiny:1b", "driver.aimodel.warm.org/ok"]
        );
        assert_eq!(attrs["driver.aimodel.warm.ollama/tiny:1b"], AttrValue::Str(digest));
    }

    fn mountinfo(point: &Path, fstype: &str, opts: &str) -> String {
        format!(
            "22 1 259:2 / / rw,relatime - ext4 /dev/root rw\n101 22 0:52 / {} rw,relatime - {fstype} nas:/hf {opts}\n",
            point.display()
        )
    }

    #[test]
    fn nfs_cache_is_healthy_and_described() {
        let d = tempfile::tempdir().unwrap();
        let st = assess_with(
            &cfg(d.path(), true),
            &mountinfo(d.path(), "nfs4", "rw,vers=4.2,hard,local_lock=none"),
            probe_path,
        );
        assert!(st.problems.is_empty(), "{:?}", st.problems);
        assert!(st.on_nfs);
        assert_eq!(st.attributes["driver.aimodel.hf_cache.fstype"], AttrValue::Str("nfs4".into()));
        assert_eq!(st.attributes["driver.aimodel.hf_cache.nfs.version"], AttrValue::Str("4.2".into()));
        assert_eq!(st.attributes["driver.aimodel.hf_cache.writable"], AttrValue::Bool(true));
        assert!(!st.attributes.keys().any(|k| k.contains("free")), "no volatile byte counts: {:?}", st.attributes);
    }

    #[test]
    fn local_filesystem_with_require_nfs_is_unhealthy() {
        let d = tempfile::tempdir().unwrap();
        let st = assess_with(&cfg(d.path(), true), &mountinfo(d.path(), "overlay", "rw"), probe_path);
        assert_eq!(st.problems.len(), 1, "{:?}", st.problems);
        assert!(st.problems[0].contains("overlay") && st.problems[0].contains("not NFS"), "{:?}", st.problems);
        assert!(assess_with(&cfg(d.path(), false), &mountinfo(d.path(), "overlay", "rw"), probe_path)
            .problems
            .is_empty());
    }

    #[test]
    fn read_only_missing_full_and_hung() {
        let d = tempfile::tempdir().unwrap();
        let ro = assess_with(&cfg(d.path(), false), &mountinfo(d.path(), "nfs4", "ro,vers=4.2"), probe_path);
        assert!(ro.problems.iter().any(|p| p.contains("read-only")), "{:?}", ro.problems);

        let missing = d.path().join("not-mounted");
        let st = assess_with(&cfg(&missing, false), "", probe_path);
        assert!(st.problems[0].contains("does not exist"), "{:?}", st.problems);

        let mut full = cfg(d.path(), false);
        full.min_free = Bytes(u64::MAX);
        let st = assess_with(&full, "", probe_path);
        assert!(st.problems.iter().any(|p| p.contains("less free space than min_free")), "{:?}", st.problems);

        let started = std::time::Instant::now();
        let st = assess_with(&cfg(d.path(), false), "", |_| {
            std::thread::sleep(Duration::from_secs(30));
            ProbeResult { exists: true, writable: Ok(()), free_bytes: None }
        });
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(st.problems.iter().any(|p| p.contains("cache probe timed out after 0.3s")), "{:?}", st.problems);
    }

    #[test]
    fn a_gguf_pattern_names_exactly_one_file() {
        let sizes: BTreeMap<String, u64> =
            [("a-Q4_K_M.gguf", 4), ("a-Q8_0.gguf", 8), ("sub/b-Q4_K_M.gguf", 5), ("README.md", 1)]
                .into_iter()
                .map(|(p, n)| (p.to_string(), n))
                .collect();
        assert_eq!(choose_file(&sizes, "a-Q8_0.gguf").unwrap(), ("a-Q8_0.gguf".into(), 8));
        assert_eq!(choose_file(&sizes, "sub/*.gguf").unwrap(), ("sub/b-Q4_K_M.gguf".into(), 5));
        assert_eq!(choose_file(&sizes, "a-*Q?_0.gguf").unwrap().0, "a-Q8_0.gguf");
        let many = choose_file(&sizes, "*Q4_K_M.gguf").unwrap_err();
        assert!(many.contains("matches 2 files"), "{many}");
        let none = choose_file(&sizes, "*Q2_K.gguf").unwrap_err();
        assert!(none.contains("matches no file") && none.contains("a-Q8_0.gguf"), "{none}");
        assert!(!glob_match("*.gguf", "sub/b.gguf"));
    }

    #[test]
    fn the_chosen_file_must_be_there_whole() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path(), false);
        let f = hub_dir(&c).join(snapshot_file("org/m", "abc", "m.gguf"));
        assert!(check_file(&c, "org/m", "abc", "m.gguf", 4).unwrap_err().contains("m.gguf is missing"));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"GG").unwrap();
        assert_eq!(check_file(&c, "org/m", "abc", "m.gguf", 4).unwrap_err(), "m.gguf has 2 of its 4 bytes");
        std::fs::write(&f, b"GGUF").unwrap();
        assert_eq!(check_file(&c, "org/m", "abc", "m.gguf", 4), Ok(()));
    }

    #[test]
    fn the_fix_command_names_the_cache() {
        let c = ModelCheck {
            repo: "org/m".into(),
            revision: "main".into(),
            commit: None,
            complete: false,
            verifiable: false,
            files: 0,
            bytes: 0,
            sizes: BTreeMap::new(),
            findings: vec!["refs/main is missing".into()],
        };
        let m = c.failure_message(Path::new("/mnt/hf-cache/hub"));
        assert!(m.ends_with("Fix: aimodel-agent --hf-home /mnt/hf-cache prewarm org/m@main"), "{m}");
    }
}
