use super::*;
use crate::config::*;
use crate::nomad::cty::{encode, Value};
use crate::nomad::hclspec::default_value;

fn plugin_bytes(overrides: &[(&str, Value)]) -> Vec<u8> {
    let Value::Map(mut m) = default_value(PLUGIN_SCHEMA, false) else { unreachable!() };
    for (k, v) in overrides {
        m.insert((*k).to_string(), v.clone());
    }
    encode(&Value::Map(m))
}

#[test]
fn schema_defaults_equal_rust_defaults() {
    for fill in [false, true] {
        let bytes = encode(&default_value(PLUGIN_SCHEMA, fill));
        assert_eq!(plugin_config(&bytes).unwrap(), PluginConfig::default(), "fill_blocks={fill}");
    }
    let Value::Map(mut task) = default_value(TASK_SCHEMA, true) else { unreachable!() };
    task.insert("engine".into(), Value::str("custom"));
    task.insert("image".into(), Value::str("busybox"));
    let t = task_config(&encode(&Value::Map(task))).unwrap();
    assert_eq!(t.readiness, Readiness::default());
    assert_eq!(t.revision, "main");
    assert!(t.offline);
    assert_eq!(t.load_strategy, LoadStrategy::Auto);
}

#[test]
fn empty_plugin_config_is_all_defaults() {
    assert_eq!(plugin_config(&[]).unwrap(), PluginConfig::default());
}

#[test]
fn bad_plugin_inputs_name_the_field() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (plugin_bytes(&[("fingerprint_period", Value::int(-5))]), "fingerprint_period"),
        (plugin_bytes(&[("fingerprint_period", Value::str("0s"))]), "fingerprint_period"),
        (plugin_bytes(&[("allow_privileged", Value::str("maybe"))]), "allow_privileged"),
        (plugin_bytes(&[("endpoint", Value::str("docker.sock"))]), "endpoint"),
        (plugin_bytes(&[("hf_cache", Value::object([("min_free", Value::str("-1GiB"))]))]), "hf_cache.min_free"),
        (
            plugin_bytes(&[("gpu", Value::object([("visible_devices_from", Value::str("bogus"))]))]),
            "gpu.visible_devices_from",
        ),
        (plugin_bytes(&[("gpu", Value::object([("device_request", Value::int(3))]))]), "gpu.device_request"),
        (plugin_bytes(&[("no_such_option", Value::Bool(true))]), "no_such_option"),
        (plugin_bytes(&[("extra_labels", Value::List(vec![]))]), "extra_labels"),
        (
            plugin_bytes(&[("container_logs", Value::object([("max_size", Value::str("lots"))]))]),
            "container_logs.max_size",
        ),
        (
            plugin_bytes(&[("gpu", Value::object([("visible_devices_from", Value::str("config"))]))]),
            "gpu.visible_devices_from",
        ),
        (
            plugin_bytes(&[("auth", Value::object([("username", Value::str("u")), ("password", Value::str("p"))]))]),
            "auth.server_address",
        ),
    ];
    for (bytes, field) in cases {
        let err = plugin_config(&bytes).unwrap_err();
        assert_eq!(err.field(), Some(field), "{err}");
    }
    let unknown = [0x81, 0xa8, b'e', b'n', b'd', b'p', b'o', b'i', b'n', b't', 0xd4, 0, 0];
    let err = plugin_config(&unknown).unwrap_err();
    assert!(err.to_string().contains("endpoint") && err.to_string().contains("unknown"), "{err}");
    assert!(matches!(plugin_config(&[0xc1, 0x00]), Err(ConfigError::Encoding { .. })));
}

#[test]
fn registry_password_is_never_in_debug_output() {
    let auth = RegistryAuth { username: Some("u".into()), password: Some("hunter2".into()), server_address: None };
    assert!(!format!("{auth:?}").contains("hunter2"));
}

fn task(pairs: &[(&str, Value)]) -> Result<TaskConfig, ConfigError> {
    let Value::Map(mut m) = default_value(TASK_SCHEMA, false) else { unreachable!() };
    for (k, v) in pairs {
        m.insert((*k).to_string(), v.clone());
    }
    task_config(&encode(&Value::Map(m)))
}

#[test]
fn task_config_checks() {
    let ok =
        task(&[("engine", Value::str("vllm")), ("model", Value::str("org/name")), ("gpus", Value::int(2))]).unwrap();
    assert_eq!(ok.engine, Engine::Vllm);
    assert_eq!(ok.gpu_count(), Some(GpuCount::Count(2)));
    assert_eq!(task(&[("engine", Value::str("sglang-router"))]).unwrap().engine, Engine::SglangRouter);

    let field = |pairs: &[(&str, Value)]| task(pairs).unwrap_err().field().map(str::to_string);
    assert_eq!(field(&[("engine", Value::str("llama.cpp"))]).as_deref(), Some("engine"));
    assert_eq!(field(&[("engine", Value::str("vllm"))]).as_deref(), Some("model"));
    assert_eq!(field(&[("engine", Value::str("vllm")), ("model", Value::str("../etc"))]).as_deref(), Some("model"));
    assert_eq!(field(&[("engine", Value::str("custom"))]).as_deref(), Some("image"));
    assert_eq!(field(&[("engine", Value::str("ollama")), ("gpus", Value::int(0))]).as_deref(), Some("gpus"));
    assert_eq!(
        field(&[("engine", Value::str("ollama")), ("shm_size", Value::str("-1g"))]).as_deref(),
        Some("shm_size")
    );
    assert_eq!(field(&[("engine", Value::str("ollama")), ("port", Value::str("h t"))]).as_deref(), Some("port"));
    assert_eq!(
        field(&[("engine", Value::str("ollama")), ("volumes", Value::List(vec![Value::str("relative")]))]).as_deref(),
        Some("volumes")
    );
    assert_eq!(
        field(&[("engine", Value::str("ollama")), ("load_strategy", Value::str("lazy"))]).as_deref(),
        Some("load_strategy")
    );
    // Ollama names: each one safe, `models` only for ollama.
    let models = |v: &[&str]| Value::List(v.iter().map(|m| Value::str(m)).collect());
    assert_eq!(
        field(&[("engine", Value::str("ollama")), ("models", models(&["llama3.2:3b", "../x:1"]))]).as_deref(),
        Some("models")
    );
    assert_eq!(
        field(&[("engine", Value::str("ollama")), ("model", Value::str("a/b/c/d:1"))]).as_deref(),
        Some("model")
    );
    assert_eq!(
        field(&[("engine", Value::str("vllm")), ("model", Value::str("o/m")), ("models", models(&["x:1"]))]).as_deref(),
        Some("models")
    );
    let ok =
        task(&[("engine", Value::str("ollama")), ("model", Value::str("qwen:1b")), ("models", models(&["qwen:1b"]))]);
    assert_eq!(ok.unwrap().ollama_models().unwrap().len(), 1, "one model named twice is one model");
    let labels = Value::object([("com.aimodel.hold", Value::str("true"))]);
    assert_eq!(field(&[("engine", Value::str("ollama")), ("labels", labels)]).as_deref(), Some("labels"));
    assert_eq!(task_config(&[]).unwrap_err().field(), Some("engine"));
}

#[test]
fn revisions_that_would_escape_refs_are_refused() {
    let Value::Map(mut task) = default_value(TASK_SCHEMA, true) else { unreachable!() };
    task.insert("engine".into(), Value::str("vllm"));
    task.insert("model".into(), Value::str("org/m"));
    for (rev, ok) in
        [("main", true), ("refs/pr/3", true), ("refs/../../../../etc/x", false), ("a/b", false), ("..", false)]
    {
        task.insert("revision".into(), Value::str(rev));
        let r = task_config(&encode(&Value::Map(task.clone())));
        assert_eq!(r.is_ok(), ok, "{rev}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e.field(), Some("revision"), "{e}");
        }
    }
}
