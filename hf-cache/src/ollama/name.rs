//! Ollama model names: `[host/][namespace/]model[:tag]`, filled with Ollama's
//! defaults (`registry.ollama.ai`, `library`, `latest`), as in ollama/ollama
//! `types/model/name.go` (parsed right to left; `.` not allowed in a namespace).

use std::fmt;

/// The registry a bare name comes from.
pub const DEFAULT_HOST: &str = "registry.ollama.ai";
/// The namespace of a name without one.
pub const DEFAULT_NAMESPACE: &str = "library";
/// The tag of a name without one.
pub const DEFAULT_TAG: &str = "latest";
/// The scheme the agent's CLI and manifest use for Ollama models.
pub const SCHEME: &str = "ollama://";
/// Longest part (Ollama's `MaxNamePartLen`).
const MAX_PART: usize = 128;

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name:?} is not an Ollama model name ([host/][namespace/]model[:tag]): {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

/// A fully qualified Ollama model name. Every part is checked: letters,
/// digits, `_`, `-` and `.` (not in the namespace; the host may also hold one
/// `:port`), no `..`, no part that is only dots, at most 128 bytes — so each
/// part is safe as one path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Host,
    Namespace,
    Model,
    Tag,
}

fn check_part(kind: Part, s: &str) -> Result<(), String> {
    let what = match kind {
        Part::Host => "host",
        Part::Namespace => "namespace",
        Part::Model => "model",
        Part::Tag => "tag",
    };
    if s.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if s.len() > MAX_PART {
        return Err(format!("the {what} is longer than {MAX_PART} bytes"));
    }
    if s.bytes().all(|b| b == b'.') || s.contains("..") {
        return Err(format!("the {what} {s:?} has `..` or only dots"));
    }
    let mut colons = 0;
    for b in s.bytes() {
        let ok = match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' => true,
            b'.' => kind != Part::Namespace,
            b':' if kind == Part::Host => {
                colons += 1;
                colons == 1
            }
            _ => false,
        };
        if !ok {
            return Err(format!("the {what} {s:?} may hold only letters, digits, '_', '-' and '.'"));
        }
    }
    Ok(())
}

impl ModelName {
    /// Parses `[ollama://][host/][namespace/]model[:tag]` and fills the defaults.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let err = |reason: String| NameError { name: text.to_string(), reason };
        let s = text.strip_prefix(SCHEME).unwrap_or(text);
        if s.contains('@') || s.contains('+') {
            return Err(err("digests (@) and builds (+) are not supported; name a tag".into()));
        }
        let (path, tag) = match s.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (None, None, *m),
            [n, m] => (None, Some(*n), *m),
            [h, n, m] => (Some(*h), Some(*n), *m),
            _ => return Err(err("more than host/namespace/model".into())),
        };
        let name = ModelName {
            host: host.unwrap_or(DEFAULT_HOST).to_string(),
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_string(),
            model: model.to_string(),
            tag: tag.unwrap_or(DEFAULT_TAG).to_string(),
        };
        check_part(Part::Host, &name.host).map_err(err)?;
        check_part(Part::Namespace, &name.namespace).map_err(err)?;
        check_part(Part::Model, &name.model).map_err(err)?;
        check_part(Part::Tag, &name.tag).map_err(err)?;
        Ok(name)
    }

    /// `host/namespace/model:tag`.
    pub fn canonical(&self) -> String {
        format!("{}/{}/{}:{}", self.host, self.namespace, self.model, self.tag)
    }

    /// The shortest form Ollama shows (`llama3.2:3b`, `ns/model:tag`,
    /// `host/ns/model:tag`): defaults left out from the left, the tag always kept.
    pub fn short(&self) -> String {
        if !self.host.eq_ignore_ascii_case(DEFAULT_HOST) {
            self.canonical()
        } else if !self.namespace.eq_ignore_ascii_case(DEFAULT_NAMESPACE) {
            format!("{}/{}:{}", self.namespace, self.model, self.tag)
        } else {
            format!("{}:{}", self.model, self.tag)
        }
    }

    /// The repository path on the registry: `namespace/model`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.namespace, self.model)
    }

    /// The manifest's path below the store: `manifests/<host>/<namespace>/<model>/<tag>`.
    pub fn manifest_rel(&self) -> std::path::PathBuf {
        ["manifests", &self.host, &self.namespace, &self.model, &self.tag].iter().collect()
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl std::str::FromStr for ModelName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_filled_with_ollamas_defaults() {
        let n = ModelName::parse("llama3.2:3b").unwrap();
        assert_eq!(n.canonical(), "registry.ollama.ai/library/llama3.2:3b");
        assert_eq!(n.short(), "llama3.2:3b");
        assert_eq!(ModelName::parse("ollama://codellama").unwrap().short(), "codellama:latest");
        let n = ModelName::parse("jmorgan/mistral:7b-q4").unwrap();
        assert_eq!(n.canonical(), "registry.ollama.ai/jmorgan/mistral:7b-q4");
        assert_eq!(n.short(), "jmorgan/mistral:7b-q4");
        let n = ModelName::parse("127.0.0.1:5000/team/tiny:v1").unwrap();
        assert_eq!((n.host.as_str(), n.tag.as_str()), ("127.0.0.1:5000", "v1"));
        assert_eq!(n.short(), "127.0.0.1:5000/team/tiny:v1");
        let n = ModelName::parse("example.com/team/tiny").unwrap();
        assert_eq!(n.tag, "latest");
        assert_eq!(n.manifest_rel(), std::path::PathBuf::from("manifests/example.com/team/tiny/latest"));
    }

    #[test]
    fn names_that_could_name_other_paths_are_refused() {
        for bad in [
            "",
            ":",
            "a:",
            "../x",
            "a/../b",
            "..",
            "x/./y",
            "a/b/c/d",
            "a b",
            "a:b:c",
            "a/b:..",
            "ns.x/m",
            "m@sha256-00",
            "m+Q4",
            "a\0b",
            "/abs",
            "a//b",
            "h:1:2/n/m",
        ] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(ModelName::parse(&"a".repeat(129)).is_err());
    }
}
