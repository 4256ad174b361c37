//! One builder for the client HCL that configures the plugin in tests, so
//! each test states only what it changes: the cache, plus any attribute,
//! `hf_cache` setting or `gpu` block it needs.

use std::path::Path;

/// `plugin "nomad-driver-aimodel" { config { ... } }`.
#[derive(Debug, Clone)]
pub struct PluginHcl {
    attrs: Vec<String>,
    hf_cache: Vec<String>,
    gpu: Option<Vec<String>>,
}

impl PluginHcl {
    /// The cache at `cache`, GPUs off.
    pub fn new(cache: &Path) -> Self {
        PluginHcl {
            attrs: Vec::new(),
            hf_cache: vec![format!("host_path = \"{}\"", cache.display())],
            gpu: Some(vec!["enabled = false".into()]),
        }
    }

    /// A top-level line of the config body (`fingerprint_period = "300ms"`, a whole block…).
    pub fn with(mut self, line: impl Into<String>) -> Self {
        let line = line.into();
        if !line.trim().is_empty() {
            self.attrs.push(line);
        }
        self
    }

    /// A line inside `hf_cache { ... }`.
    pub fn hf_cache(mut self, line: impl Into<String>) -> Self {
        self.hf_cache.push(line.into());
        self
    }

    /// The `gpu { ... }` body (replacing `enabled = false`).
    pub fn gpu(mut self, lines: &[&str]) -> Self {
        self.gpu = Some(lines.iter().map(|l| (*l).to_string()).filter(|l| !l.trim().is_empty()).collect());
        self
    }

    /// No `gpu` block at all: the plugin's defaults.
    pub fn default_gpu(mut self) -> Self {
        self.gpu = None;
        self
    }

    /// The HCL text.
    pub fn render(&self) -> String {
        let mut body = String::new();
        for a in &self.attrs {
            body.push_str(&format!("    {a}\n"));
        }
        body.push_str("    hf_cache {\n");
        for h in &self.hf_cache {
            body.push_str(&format!("      {h}\n"));
        }
        body.push_str("    }\n");
        if let Some(g) = &self.gpu {
            body.push_str("    gpu {\n");
            for l in g {
                body.push_str(&format!("      {l}\n"));
            }
            body.push_str("    }\n");
        }
        format!("plugin \"nomad-driver-aimodel\" {{\n  config {{\n{body}  }}\n}}\n")
    }
}

impl std::fmt::Display for PluginHcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_the_client_config_parser_reads() {
        let hcl =
            PluginHcl::new(Path::new("/c")).with("fingerprint_period = \"1s\"").hf_cache("min_free = \"1MB\"").render();
        assert!(hcl.contains("fingerprint_period = \"1s\"") && hcl.contains("host_path = \"/c\""), "{hcl}");
        let parsed = crate::hcl_eval::plugin_stanza(&hcl, "nomad-driver-aimodel").unwrap();
        assert!(parsed.is_some(), "{hcl}");
    }
}
