//! Enough of Ollama's API (`/api/*`) to prove what an `ollama` task sees: the
//! store under `OLLAMA_MODELS` (Ollama's layout: `manifests/<host>/<ns>/<model>/<tag>`
//! naming blobs `blobs/sha256-<hex>`), whether it is writable, and the
//! load-only `POST /api/generate` the driver sends once the server answers.

use std::path::{Path, PathBuf};

/// The store, if `OLLAMA_MODELS` is set.
fn store() -> Option<PathBuf> {
    std::env::var_os("OLLAMA_MODELS").map(PathBuf::from)
}

/// Printed at start: the store, whether a file can be created in it, `OLLAMA_NOPRUNE`.
pub fn describe_store() {
    let Some(dir) = store() else { return };
    let probe = dir.join(".standin-write-test");
    let writable = std::fs::write(&probe, b"x").is_ok();
    let _ = std::fs::remove_file(&probe);
    let noprune = std::env::var("OLLAMA_NOPRUNE").unwrap_or_default();
    println!("ollama store {}: writable={writable} noprune={noprune}", dir.display());
}

/// `[host/][ns/]model[:tag]` → the manifest's path below the store, Ollama's defaults filled in.
fn manifest_rel(name: &str) -> Option<PathBuf> {
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (host, ns, model) = match parts.as_slice() {
        [m] => ("registry.ollama.ai", "library", *m),
        [n, m] => ("registry.ollama.ai", *n, *m),
        [h, n, m] => (*h, *n, *m),
        _ => return None,
    };
    let all = [host, ns, model, tag];
    if all.iter().any(|p| p.is_empty() || p.starts_with('.') || p.contains('\\')) {
        return None;
    }
    Some(["manifests", host, ns, model, tag].iter().collect())
}

/// Every `"digest":"sha256:<hex>"` of a manifest.
fn digests(manifest: &str) -> Vec<String> {
    manifest
        .split("\"digest\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').nth(1))
        .filter(|d| d.starts_with("sha256:") && d.len() == 71)
        .map(|d| d.replace(':', "-"))
        .collect()
}

/// Loads a model as Ollama would begin to: its manifest, then the first bytes
/// of every blob it names; how many blobs and bytes, or why not.
fn load(dir: &Path, name: &str) -> Result<(usize, u64), String> {
    let rel = manifest_rel(name).ok_or_else(|| format!("{name:?} is not a model name"))?;
    let manifest = std::fs::read_to_string(dir.join(rel)).map_err(|_| format!("model '{name}' not found"))?;
    let mut bytes = 0;
    let blobs = digests(&manifest);
    for b in &blobs {
        let mut f = std::fs::File::open(dir.join("blobs").join(b)).map_err(|e| format!("blob {b}: {e}"))?;
        let mut head = [0u8; 4];
        let _ = std::io::Read::read(&mut f, &mut head);
        bytes += f.metadata().map(|m| m.len()).unwrap_or(0);
    }
    Ok((blobs.len(), bytes))
}

/// The value of `"key":"value"` in a small JSON object.
fn string_field(body: &str, key: &str) -> Option<String> {
    let rest = body.split(&format!("\"{key}\"")).nth(1)?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    Some(rest.split('"').next()?.to_string())
}

/// Models in the store, as `host/ns/model:tag`.
fn models(dir: &Path) -> Vec<String> {
    let sub = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    };
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut out = Vec::new();
    for host in sub(&dir.join("manifests")) {
        for ns in sub(&host) {
            for model in sub(&ns) {
                for tag in sub(&model) {
                    out.push(format!("{}/{}/{}:{}", name(&host), name(&ns), name(&model), name(&tag)));
                }
            }
        }
    }
    out
}

/// Answers `/api/*` paths; `None` for others.
pub fn answer(method: &str, path: &str, body: &[u8]) -> Option<(&'static str, String)> {
    let dir = store().unwrap_or_else(|| PathBuf::from("/root/.ollama/models"));
    match (method, path) {
        ("GET", "/api/tags") => {
            let list: Vec<String> =
                models(&dir).iter().map(|m| format!("{{\"name\":\"{m}\",\"model\":\"{m}\"}}")).collect();
            Some(("200 OK", format!("{{\"models\":[{}]}}", list.join(","))))
        }
        ("POST", "/api/generate") => {
            let body = String::from_utf8_lossy(body);
            let Some(model) = string_field(&body, "model") else {
                return Some(("400 Bad Request", "{\"error\":\"model is required\"}".into()));
            };
            match load(&dir, &model) {
                Ok((blobs, bytes)) => {
                    println!(
                        "loaded model {model}: {blobs} blobs, {bytes} bytes from {}; request {body}",
                        dir.display()
                    );
                    Some((
                        "200 OK",
                        format!("{{\"model\":\"{model}\",\"response\":\"\",\"done\":true,\"done_reason\":\"load\"}}"),
                    ))
                }
                Err(e) => {
                    println!("could not load model {model}: {e}");
                    Some(("404 Not Found", format!("{{\"error\":\"{}\"}}", e.replace('"', "'"))))
                }
            }
        }
        _ => None,
    }
}
