//! Which files of a repo a prewarm takes (`--include`/`--exclude`).

use super::Options;

/// `*` and `?` globs (a `*` also crosses `/`, like fnmatch in huggingface_hub).
pub fn glob(pattern: &str, text: &str) -> bool {
    fn rec(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => rec(&p[1..], t) || (!t.is_empty() && rec(p, &t[1..])),
            (Some(b'?'), Some(_)) => rec(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &t[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), text.as_bytes())
}

/// Whether `path` passes the options' include and exclude globs.
pub(super) fn wanted(o: &Options, path: &str) -> bool {
    (o.include.is_empty() || o.include.iter().any(|g| glob(g, path))) && !o.exclude.iter().any(|g| glob(g, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.safetensors", "model.safetensors"));
        assert!(glob("*.json", "tokenizer/vocab.json"));
        assert!(!glob("*.bin", "model.safetensors"));
        assert!(glob("model-?????-of-*.safetensors", "model-00001-of-00002.safetensors"));
        let mut o = Options::new(std::path::PathBuf::from("/x"));
        o.include = vec!["*.json".into()];
        o.exclude = vec!["*/vocab.json".into()];
        assert!(wanted(&o, "config.json"));
        assert!(!wanted(&o, "tokenizer/vocab.json"));
        assert!(!wanted(&o, "model.safetensors"));
    }
}
