//! The engines a task can name, one entry each in [`ENGINES`]: the name jobs
//! write, the plugin's default image for it, its container port and readiness
//! path, whether it needs a model and reads it from the HF cache, its command
//! line and its load flags. Adding an engine is one variant, one entry and
//! (when it has a default image) one field in `images { ... }`; see
//! docs/conventions.md. Pure data and functions: no I/O.

use serde::{Deserialize, Serialize};

/// A model-server engine, as jobs name it (`engine = "vllm"`). Serialized by
/// name, so stored handles keep recovering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    Vllm,
    Sglang,
    SglangRouter,
    Ollama,
    Tgi,
    Ray,
    Llamacpp,
    Custom,
}

/// How weights are read from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoadStrategy {
    #[default]
    Auto,
    Eager,
    Mmap,
    /// No flags, whatever the cache is on.
    None,
}

/// What an engine's command line is built from.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub model: &'a str,
    /// The commit the revision resolved to, else the revision as written.
    pub revision: &'a str,
    pub served_name: &'a str,
    /// The address to listen on inside the container.
    pub bind: &'a str,
    pub port: &'a str,
    /// The GPU count when more than one GPU is assigned.
    pub tensor_parallel: Option<&'a str>,
    pub load_format: Option<&'a str>,
    /// Whether the task named its port (Ray's dashboard then moves to it).
    pub port_named: bool,
    /// The GPUs assigned (0: none).
    pub gpus: usize,
    /// The model file to load, its path inside the container (llama.cpp's GGUF).
    pub model_file: Option<&'a str>,
}

/// An engine's entrypoint (`None`: the image's own) and arguments.
pub type Argv = (Option<Vec<String>>, Vec<String>);

/// One engine.
#[derive(Debug)]
pub struct EngineSpec {
    pub engine: Engine,
    /// The name jobs write.
    pub name: &'static str,
    /// The key of the plugin's default image in `images { ... }`; `None`: the
    /// task must set `image`.
    pub image_key: Option<&'static str>,
    /// The port the server listens on in the container.
    pub port: u16,
    /// The readiness path polled until the server answers.
    pub health_path: Option<&'static str>,
    /// Whether `model` is required.
    pub needs_model: bool,
    /// Whether `model` names an HF repo read from the shared cache (the cache
    /// gate checks it, in-use markers keep it).
    pub uses_hf_cache: bool,
    /// An environment variable the server reads its listen address from.
    pub listen_env: Option<&'static str>,
    /// The command line.
    pub argv: fn(&Launch<'_>) -> Argv,
    /// The flags an explicit load strategy adds (eager suits NFS, mmap local disks).
    pub load_flags: fn(LoadStrategy) -> &'static [&'static str],
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_string()).collect()
}

fn none(_: LoadStrategy) -> &'static [&'static str] {
    &[]
}

fn vllm_argv(l: &Launch<'_>) -> Argv {
    let mut c = strings(&["--model", l.model, "--revision", l.revision, "--host", l.bind, "--port", l.port]);
    c.extend(strings(&["--served-model-name", l.served_name]));
    if let Some(n) = l.tensor_parallel {
        c.extend(strings(&["--tensor-parallel-size", n]));
    }
    if let Some(f) = l.load_format {
        c.extend(strings(&["--load-format", f]));
    }
    (None, c)
}

fn vllm_load(s: LoadStrategy) -> &'static [&'static str] {
    match s {
        LoadStrategy::Eager => &["--safetensors-load-strategy", "eager"],
        LoadStrategy::Mmap => &["--safetensors-load-strategy", "lazy"],
        LoadStrategy::Auto | LoadStrategy::None => &[],
    }
}

fn sglang_argv(l: &Launch<'_>) -> Argv {
    let mut c = strings(&["--model-path", l.model, "--revision", l.revision, "--host", l.bind, "--port", l.port]);
    c.extend(strings(&["--served-model-name", l.served_name]));
    if let Some(n) = l.tensor_parallel {
        c.extend(strings(&["--tp-size", n]));
    }
    if let Some(f) = l.load_format {
        c.extend(strings(&["--load-format", f]));
    }
    (Some(strings(&["python3", "-m", "sglang.launch_server"])), c)
}

fn sglang_load(s: LoadStrategy) -> &'static [&'static str] {
    match s {
        LoadStrategy::Eager => &["--weight-loader-disable-mmap"],
        _ => &[],
    }
}

fn router_argv(l: &Launch<'_>) -> Argv {
    (Some(strings(&["python3", "-m", "sglang_router.launch_router"])), strings(&["--host", l.bind, "--port", l.port]))
}

fn ollama_argv(_: &Launch<'_>) -> Argv {
    (None, strings(&["serve"]))
}

fn tgi_argv(l: &Launch<'_>) -> Argv {
    let mut c = strings(&["--model-id", l.model, "--revision", l.revision, "--hostname", l.bind, "--port", l.port]);
    if let Some(n) = l.tensor_parallel {
        c.extend(strings(&["--num-shard", n]));
    }
    (None, c)
}

fn ray_argv(l: &Launch<'_>) -> Argv {
    let mut c = strings(&["ray", "start", "--block"]);
    c.push(format!("--dashboard-host={}", l.bind));
    if l.port_named {
        c.push(format!("--dashboard-port={}", l.port));
    }
    (None, c)
}

fn llamacpp_argv(l: &Launch<'_>) -> Argv {
    let ngl = if l.gpus > 0 { "999" } else { "0" };
    let mut c = strings(&["-m", l.model_file.unwrap_or_default(), "--host", l.bind, "--port", l.port]);
    c.extend(strings(&["-ngl", ngl]));
    (None, c)
}

fn custom_argv(_: &Launch<'_>) -> Argv {
    (None, Vec::new())
}

/// Every engine.
pub const ENGINES: &[EngineSpec] = &[
    EngineSpec {
        engine: Engine::Vllm,
        name: "vllm",
        image_key: Some("vllm"),
        port: 8000,
        health_path: Some("/health"),
        needs_model: true,
        uses_hf_cache: true,
        listen_env: None,
        argv: vllm_argv,
        load_flags: vllm_load,
    },
    EngineSpec {
        engine: Engine::Sglang,
        name: "sglang",
        image_key: Some("sglang"),
        port: 30000,
        health_path: Some("/health"),
        needs_model: true,
        uses_hf_cache: true,
        listen_env: None,
        argv: sglang_argv,
        load_flags: sglang_load,
    },
    EngineSpec {
        engine: Engine::SglangRouter,
        name: "sglang-router",
        image_key: Some("sglang_router"),
        port: 30000,
        health_path: Some("/health"),
        needs_model: false,
        uses_hf_cache: true,
        listen_env: None,
        argv: router_argv,
        load_flags: none,
    },
    EngineSpec {
        engine: Engine::Ollama,
        name: "ollama",
        image_key: Some("ollama"),
        port: 11434,
        health_path: Some("/api/version"),
        needs_model: false,
        uses_hf_cache: false,
        listen_env: Some("OLLAMA_HOST"),
        argv: ollama_argv,
        load_flags: none,
    },
    EngineSpec {
        engine: Engine::Tgi,
        name: "tgi",
        image_key: Some("tgi"),
        port: 80,
        health_path: Some("/health"),
        needs_model: true,
        uses_hf_cache: true,
        listen_env: None,
        argv: tgi_argv,
        load_flags: none,
    },
    EngineSpec {
        engine: Engine::Ray,
        name: "ray",
        image_key: Some("ray"),
        port: 8265,
        health_path: None,
        needs_model: false,
        uses_hf_cache: true,
        listen_env: None,
        argv: ray_argv,
        load_flags: none,
    },
    EngineSpec {
        engine: Engine::Llamacpp,
        name: "llamacpp",
        image_key: Some("llamacpp"),
        port: 8080,
        health_path: Some("/health"),
        needs_model: true,
        uses_hf_cache: true,
        listen_env: None,
        argv: llamacpp_argv,
        load_flags: none,
    },
    EngineSpec {
        engine: Engine::Custom,
        name: "custom",
        image_key: None,
        port: 8080,
        health_path: None,
        needs_model: false,
        uses_hf_cache: true,
        listen_env: None,
        argv: custom_argv,
        load_flags: none,
    },
];

impl Engine {
    /// The engine's entry in [`ENGINES`].
    pub fn spec(self) -> &'static EngineSpec {
        ENGINES.iter().find(|s| s.engine == self).unwrap_or(&ENGINES[ENGINES.len() - 1])
    }

    /// The engine's name as written in job files.
    pub fn as_str(self) -> &'static str {
        self.spec().name
    }

    /// Whether the engine serves a single model named by `model`.
    pub fn needs_model(self) -> bool {
        self.spec().needs_model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_engine_has_one_entry_whose_name_is_its_serialized_form() {
        for e in [
            Engine::Vllm,
            Engine::Sglang,
            Engine::SglangRouter,
            Engine::Ollama,
            Engine::Tgi,
            Engine::Ray,
            Engine::Llamacpp,
            Engine::Custom,
        ] {
            assert_eq!(ENGINES.iter().filter(|s| s.engine == e).count(), 1, "{e:?}");
            let json = serde_json::to_string(&e).unwrap();
            assert_eq!(json, format!("\"{}\"", e.as_str()));
            assert_eq!(serde_json::from_str::<Engine>(&json).unwrap(), e);
        }
        let mut names: Vec<&str> = ENGINES.iter().map(|s| s.name).collect();
        names.dedup();
        assert_eq!(names.len(), ENGINES.len());
    }
}
