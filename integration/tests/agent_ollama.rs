//! aimodel-agent and Ollama models, against a real registry (Debian's
//! `docker-registry`) filled through the registry API with Ollama-layout
//! models: the store matches Ollama's layout byte for byte and a reader
//! written from the layout facts opens the model; agents sharing the store
//! fetch each blob once (also with no-op file locks); kill -9 never leaves a
//! manifest whose blobs are incomplete; wrong bytes are never published; a
//! missing model or tag is a clear error; gc keeps shared blobs, in-use and
//! pinned models.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aimodel_integration::ollamareg::{digest_of, nolock_library, OllamaRegistry, MODEL, PARAMS, TEMPLATE};
use aimodel_integration::support::agent_ok as ok;
use aimodel_integration::support::binary;

fn agent(home: &Path, registry: &OllamaRegistry, args: &[&str]) -> Command {
    let mut c = Command::new(binary("aimodel-agent").unwrap());
    c.arg("--hf-home")
        .arg(home)
        .args(args)
        .env("AIMODEL_OLLAMA_REGISTRY", registry.endpoint())
        .env_remove("OLLAMA_MODELS")
        .env_remove("HF_TOKEN");
    c
}

/// GGUF-looking weights: the magic, then `n` bytes of a fixed pseudo-random sequence.
fn weights(n: usize, seed: u32) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend(
        (0..u32::try_from(n).unwrap())
            .map(|i| u8::try_from((i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) & 0xff).unwrap()),
    );
    v
}

const TEMPLATE_TEXT: &[u8] = b"{{ .System }}\n{{ .Prompt }}";
const PARAMS_TEXT: &[u8] = br#"{"stop":["<|eot|>"],"temperature":0.2}"#;

/// One blob as the reader saw it: media type, first bytes, size.
type Blob = (String, Vec<u8>, u64);

/// A model as a reader that knows only Ollama's layout facts sees it:
/// `manifests/<host>/<ns>/<model>/<tag>` holds JSON naming blobs
/// `sha256:<hex>`, stored as `blobs/sha256-<hex>`. Returns, per model
/// (`host/ns/model:tag`), the media types with the first bytes of each blob.
fn read_store(store: &Path) -> Vec<(String, Vec<Blob>)> {
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        v.sort();
        v
    };
    for host in dirs(&store.join("manifests")) {
        for ns in dirs(&host) {
            for model in dirs(&ns) {
                for tag in std::fs::read_dir(&model).unwrap().flatten() {
                    let name = format!(
                        "{}/{}/{}:{}",
                        host.file_name().unwrap().to_string_lossy(),
                        ns.file_name().unwrap().to_string_lossy(),
                        model.file_name().unwrap().to_string_lossy(),
                        tag.file_name().to_string_lossy()
                    );
                    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(tag.path()).unwrap()).unwrap();
                    let mut layers = Vec::new();
                    for l in m["layers"].as_array().unwrap().iter().chain([&m["config"]]) {
                        let digest = l["digest"].as_str().unwrap().replace(':', "-");
                        let mut head = vec![0u8; 4];
                        let mut f = std::fs::File::open(store.join("blobs").join(&digest)).unwrap();
                        let n = std::io::Read::read(&mut f, &mut head).unwrap();
                        head.truncate(n);
                        let size = f.metadata().unwrap().len();
                        assert_eq!(size, l["size"].as_u64().unwrap(), "{digest}: size as listed");
                        layers.push((l["mediaType"].as_str().unwrap_or("").to_string(), head, size));
                    }
                    out.push((name, layers));
                }
            }
        }
    }
    out.sort();
    out
}

/// Files in `blobs/` that are not published blobs (leases, partials).
fn leftovers(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains('.'))
        .collect()
}

#[test]
fn ollama_models_are_prewarmed_in_ollamas_layout_byte_for_byte() {
    let Some(reg) = OllamaRegistry::start() else { return };
    let w = weights(3 << 20, 1);
    let pushed = reg.push_model("library/tiny", "1b", &[(MODEL, &w), (TEMPLATE, TEMPLATE_TEXT), (PARAMS, PARAMS_TEXT)]);
    let pushed_ns = reg.push_model("team/small", "v2", &[(MODEL, &weights(1000, 2)), (TEMPLATE, TEMPLATE_TEXT)]);
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("ollama");

    let out = ok(&agent(home.path(), &reg, &["prewarm", "ollama://tiny:1b"]).output().unwrap());
    assert!(out.contains("ollama://tiny:1b = sha256:") && out.contains("4 blobs"), "{out}");
    ok(&agent(home.path(), &reg, &["prewarm", "ollama://team/small:v2"]).output().unwrap());

    // Ollama's layout, the manifest byte for byte as the registry served it, under the canonical host.
    let manifest = store.join("manifests/registry.ollama.ai/library/tiny/1b");
    assert_eq!(std::fs::read(&manifest).unwrap(), pushed);
    assert_eq!(std::fs::read(store.join("manifests/registry.ollama.ai/team/small/v2")).unwrap(), pushed_ns);
    for (bytes, size) in [(&w[..], w.len()), (TEMPLATE_TEXT, TEMPLATE_TEXT.len()), (PARAMS_TEXT, PARAMS_TEXT.len())] {
        let blob = store.join("blobs").join(digest_of(bytes).replace(':', "-"));
        assert_eq!(std::fs::metadata(&blob).unwrap().len(), size as u64, "{}", blob.display());
    }
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));

    // A reader that knows only the layout lists both models and opens the weights.
    let models = read_store(&store);
    let names: Vec<&str> = models.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["registry.ollama.ai/library/tiny:1b", "registry.ollama.ai/team/small:v2"]);
    let tiny = &models[0].1;
    assert!(tiny.iter().any(|(media, head, size)| media == MODEL && head == b"GGUF" && *size == w.len() as u64));
    assert!(tiny.iter().any(|(media, head, _)| media == TEMPLATE && head == b"{{ ."));

    // verify (quick and deep), status, the warm record the driver reads.
    let v = ok(&agent(home.path(), &reg, &["verify", "--deep", "ollama://tiny:1b"]).output().unwrap());
    assert!(v.contains("ollama://tiny:1b: complete"), "{v}");
    let status = ok(&agent(home.path(), &reg, &["status"]).output().unwrap());
    assert!(status.contains("ollama://tiny:1b") && status.contains("ollama://team/small:v2"), "{status}");
    assert!(!status.contains("incomplete"), "{status}");
    let warm = hf_cache::state::StateDir::for_hub(&home.path().join("hub")).warm();
    let rec = warm.iter().find(|r| r.repo == "ollama/tiny:1b").unwrap_or_else(|| panic!("{warm:?}"));
    assert_eq!(rec.commit, digest_of(&pushed));

    // Nothing published is fetched again.
    let again = ok(&agent(home.path(), &reg, &["prewarm", "ollama://tiny:1b"]).output().unwrap());
    assert!(again.contains(", 0 B downloaded"), "{again}");

    // A removed blob makes the model incomplete for verify.
    std::fs::remove_file(store.join("blobs").join(digest_of(PARAMS_TEXT).replace(':', "-"))).unwrap();
    let o = agent(home.path(), &reg, &["verify", "ollama://tiny:1b"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("missing blob sha256-"), "{o:?}");
}

#[test]
fn four_agents_fetch_each_blob_once_also_with_no_op_locks() {
    let Some(reg) = OllamaRegistry::start() else { return };
    let nolock = nolock_library();
    if nolock.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "no C compiler for the no-op lock library");
        eprintln!("SKIP (no-op locks): no cc");
    }
    for (round, preload) in [(0u32, None), (1, nolock.clone())] {
        let repo = format!("library/shared{round}");
        let w = weights(24 << 20, 10 + round);
        reg.push_model(&repo, "latest", &[(MODEL, &w), (TEMPLATE, TEMPLATE_TEXT)]);
        let home = tempfile::tempdir().unwrap();
        let model = format!("ollama://shared{round}");
        let children: Vec<_> = (0..4)
            .map(|_| {
                let mut c = agent(
                    home.path(),
                    &reg,
                    &[
                        "prewarm",
                        &model,
                        "--range-min",
                        "4MiB",
                        "--range-size",
                        "2MiB",
                        "--heartbeat",
                        "200ms",
                        "--stale-after",
                        "2s",
                    ],
                );
                if let Some(lib) = &preload {
                    c.env("LD_PRELOAD", lib);
                }
                c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
            })
            .collect();
        for c in children {
            ok(&c.wait_with_output().unwrap());
        }
        // Counted at the registry: every byte of the weights left it once.
        let (served, gets) = reg.blob_served(&digest_of(&w));
        assert_eq!(served, w.len() as u64, "round {round}: the weights were served {served} bytes in {gets} GETs");
        let (served, _) = reg.blob_served(&digest_of(TEMPLATE_TEXT));
        assert_eq!(served, TEMPLATE_TEXT.len() as u64 * (u64::from(round) + 1), "template: once per round");
        let store = home.path().join("ollama");
        let check =
            hf_cache::ollama::Store::new(&store).verify_deep(&hf_cache::ollama::ModelName::parse(&model).unwrap());
        assert!(check.is_complete(), "{:?}", check.problems);
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    }
}

/// What a crash may leave: no manifest, or a manifest whose every blob is whole.
fn assert_no_incomplete_manifest(store: &Path, name: &hf_cache::ollama::ModelName) {
    let s = hf_cache::ollama::Store::new(store);
    if s.manifest_path(name).exists() {
        let c = s.verify_deep(name);
        assert!(c.is_complete(), "a manifest with incomplete blobs is visible: {:?}", c.problems);
    }
}

#[test]
fn kill_9_at_random_points_never_leaves_a_manifest_with_incomplete_blobs() {
    let Some(reg) = OllamaRegistry::start() else { return };
    let w = weights(16 << 20, 7);
    reg.push_model("library/big", "q4", &[(MODEL, &w), (TEMPLATE, TEMPLATE_TEXT), (PARAMS, PARAMS_TEXT)]);
    let name = hf_cache::ollama::ModelName::parse("big:q4").unwrap();
    let args = [
        "prewarm",
        "ollama://big:q4",
        "--range-min",
        "8MiB",
        "--range-size",
        "2MiB",
        "--heartbeat",
        "100ms",
        "--stale-after",
        "1s",
    ];
    // How long a whole run takes here, to spread the kills over it.
    let scratch = tempfile::tempdir().unwrap();
    let t = Instant::now();
    ok(&agent(scratch.path(), &reg, &args).output().unwrap());
    let whole = t.elapsed().max(Duration::from_millis(200));

    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("ollama");
    let mut seed = u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    for round in 0..6u32 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let at = whole.mul_f64(f64::from(u32::try_from(seed >> 40).unwrap_or(0) % 1000) / 1000.0 * 1.2);
        let mut child = agent(home.path(), &reg, &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(at);
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("round {round}: killed after {at:?} (a whole run takes {whole:?})");
        assert_no_incomplete_manifest(&store, &name);
    }
    // A run to the end completes it, resuming what the killed ones left; it also
    // removes the killed runs' leases, once they are three stale windows (3 s) old.
    std::thread::sleep(Duration::from_millis(3100));
    ok(&agent(home.path(), &reg, &args).output().unwrap());
    assert!(hf_cache::ollama::Store::new(&store).verify_deep(&name).is_complete());
    assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_never_published() {
    let Some(reg) = OllamaRegistry::start() else { return };
    let w = weights(2 << 20, 3);
    reg.push_model("library/poisoned", "1", &[(MODEL, &w), (TEMPLATE, TEMPLATE_TEXT)]);
    reg.corrupt_blob(&digest_of(&w));
    let home = tempfile::tempdir().unwrap();
    let o = agent(home.path(), &reg, &["prewarm", "ollama://poisoned:1"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hashes to") && err.contains("nothing was published"), "{err}");
    let store = home.path().join("ollama");
    assert!(!store.join("blobs").join(digest_of(&w).replace(':', "-")).exists(), "the wrong bytes were published");
    assert!(!store.join("manifests/registry.ollama.ai/library/poisoned/1").exists());
    assert!(leftovers(&store).iter().all(|n| !n.ends_with(".incomplete")), "{:?}", leftovers(&store));
}

#[test]
fn a_missing_model_or_tag_is_a_clear_error() {
    let Some(reg) = OllamaRegistry::start() else { return };
    reg.push_model("library/there", "1", &[(MODEL, &weights(10, 4))]);
    let home = tempfile::tempdir().unwrap();
    for (model, needle) in [("ollama://nope:1", "ollama://nope:1: not found on"), ("ollama://there:2", "no tag \"2\"")]
    {
        let o = agent(home.path(), &reg, &["prewarm", model]).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle) && err.contains("MANIFEST_UNKNOWN"), "{model}: {err}");
    }
    let o = agent(home.path(), &reg, &["prewarm", "ollama://../etc:1"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not an Ollama model name"), "{o:?}");
    assert!(!home.path().join("ollama/manifests").exists(), "nothing may be published");
}

#[test]
fn gc_keeps_shared_blobs_and_in_use_and_pinned_models() {
    let Some(reg) = OllamaRegistry::start() else { return };
    let (wa, wb) = (weights(1 << 20, 5), weights(1 << 20, 6));
    reg.push_model("library/a", "1", &[(MODEL, &wa), (TEMPLATE, TEMPLATE_TEXT)]);
    reg.push_model("library/b", "1", &[(MODEL, &wb), (TEMPLATE, TEMPLATE_TEXT)]);
    let home = tempfile::tempdir().unwrap();
    for m in ["ollama://a:1", "ollama://b:1"] {
        ok(&agent(home.path(), &reg, &["prewarm", m]).output().unwrap());
    }
    let store = home.path().join("ollama");
    let blob = |b: &[u8]| store.join("blobs").join(digest_of(b).replace(':', "-"));
    let state = hf_cache::state::StateDir::for_hub(&home.path().join("hub"));
    // a: in use by a task; b: pinned. Nothing may go.
    state
        .mark_in_use(&hf_cache::state::InUse {
            repo: "ollama/a:1".into(),
            commit: String::new(),
            node: "n1".into(),
            task: "alloc-1/llm".into(),
            also: vec![],
        })
        .unwrap();
    ok(&agent(home.path(), &reg, &["pin", "ollama://b:1"]).output().unwrap());
    let gc = |extra: &[&str]| {
        let o = agent(home.path(), &reg, &[&["gc", "--max-size", "0", "--json"][..], extra].concat()).output().unwrap();
        assert!(matches!(o.status.code(), Some(0 | 4)), "{o:?}");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let v = gc(&[]);
    assert_eq!(v["evicted"], serde_json::json!([]), "{v}");
    let keep: Vec<String> =
        v["models"].as_array().unwrap().iter().map(|m| format!("{}={}", m["repo"], m["keep"])).collect();
    assert!(keep.contains(&"\"ollama/a:1\"=\"in use by alloc-1/llm on n1\"".to_string()), "{keep:?}");
    assert!(keep.contains(&"\"ollama/b:1\"=\"pinned\"".to_string()), "{keep:?}");

    // b unpinned: it goes, its own weights with it; the template a shares stays.
    ok(&agent(home.path(), &reg, &["unpin", "ollama://b:1"]).output().unwrap());
    let v = gc(&[]);
    assert_eq!(v["evicted"], serde_json::json!(["ollama/b:1"]), "{v}");
    assert!(!store.join("manifests/registry.ollama.ai/library/b/1").exists());
    assert!(!blob(&wb).exists(), "b's own weights are collected");
    assert!(blob(TEMPLATE_TEXT).exists() && blob(&wa).exists(), "the shared template and a's weights stay");
    let check = hf_cache::ollama::Store::new(&store).check(&hf_cache::ollama::ModelName::parse("a:1").unwrap());
    assert!(check.is_complete(), "{:?}", check.problems);

    // No longer in use: a goes too, and every blob with it.
    state.clear_in_use("alloc-1/llm").unwrap();
    let v = gc(&[]);
    assert_eq!(v["evicted"], serde_json::json!(["ollama/a:1"]), "{v}");
    assert!(!blob(TEMPLATE_TEXT).exists() && !blob(&wa).exists());
    assert!(hf_cache::state::StateDir::for_hub(&home.path().join("hub")).warm().is_empty());
}

/// The daemon keeps a manifest's Ollama model warm: `/status`, `/metrics`, the
/// warm record the driver reads and the manifest's pin, under `ollama/<name>`.
#[tokio::test]
async fn the_daemon_keeps_manifest_ollama_models_warm() {
    use aimodel_integration::support::http_body;
    let Some(reg) = OllamaRegistry::start() else { return };
    let pushed = reg.push_model("library/tiny", "1b", &[(MODEL, &weights(1 << 20, 9)), (TEMPLATE, TEMPLATE_TEXT)]);
    let home = tempfile::tempdir().unwrap();
    let port = aimodel_integration::task::free_port();
    let cfg = home.path().join("agent.hcl");
    std::fs::write(
        &cfg,
        format!(
            "hf_home = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nollama_registry = \"{}\"\nmodels = [{{ repo = \"ollama://tiny:1b\", pin = true }}]\n",
            home.path().display(),
            reg.endpoint()
        ),
    )
    .unwrap();
    let mut daemon = tokio::process::Command::new(binary("aimodel-agent").unwrap())
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env_remove("OLLAMA_MODELS")
        .env_remove("AIMODEL_OLLAMA_REGISTRY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st: serde_json::Value = serde_json::from_str(&http_body(port, "/status").await).unwrap_or_default();
        let m = st["models"].as_array().and_then(|a| a.iter().find(|m| m["repo"] == "ollama://tiny:1b").cloned());
        if m.as_ref().is_some_and(|m| m["state"] == "warm") {
            break m.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "not warm in time: {st:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st["revision"], "1b");
    assert_eq!(st["commit"], digest_of(&pushed));
    let metrics = http_body(port, "/metrics").await;
    assert!(metrics.contains("aimodel_agent_model_warm{repo=\"ollama://tiny:1b\",revision=\"1b\"} 1"), "{metrics}");
    let state = hf_cache::state::StateDir::for_hub(&home.path().join("hub"));
    assert!(state.warm().iter().any(|r| r.repo == "ollama/tiny:1b" && r.commit == digest_of(&pushed)));
    assert!(state.pins().iter().any(|p| p.repo == "ollama/tiny:1b"), "{:?}", state.pins());
    assert_eq!(std::fs::read(home.path().join("ollama/manifests/registry.ollama.ai/library/tiny/1b")).unwrap(), pushed);
    daemon.kill().await.unwrap();
}
