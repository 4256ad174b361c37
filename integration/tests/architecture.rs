//! The layering rules of docs/architecture.md, checked on the sources:
//! no import cycle between sibling modules of a crate, no non-test source file
//! over 500 lines, and tonic/prost/the generated protos named only in the
//! driver's adapter (`driver/src/nomad/`) and `main.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: &[&str] = &["proto/src", "hf-cache/src", "driver/src", "node-agent/src", "integration/src"];
const MAX_LINES: usize = 500;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The non-test part of a file: unit-test files are skipped and inline test
/// modules (at the end, by our convention) are cut.
fn production_code(path: &Path) -> Option<String> {
    if path.file_name().is_some_and(|n| n == "tests.rs") || path.components().any(|c| c.as_os_str() == "tests") {
        return None;
    }
    let text = std::fs::read_to_string(path).unwrap();
    let cut = text.lines().position(|l| l.trim() == "#[cfg(test)]").unwrap_or(usize::MAX);
    Some(text.lines().take(cut).collect::<Vec<_>>().join("\n"))
}

/// A file's module path inside its crate (`driver/task/start.rs` → driver::task::start).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") && !rel.starts_with("bin") {
        parts.push(stem.to_string());
    }
    if rel.starts_with("bin") {
        return vec!["bin".into()];
    }
    parts
}

/// Module paths named by `crate::…` and `super::…` paths in `code`, grouped
/// `use crate::{a, b::c}` included.
fn references(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !code.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &code[i..];
        let starts_word = i == 0 || !ident(bytes[i - 1]);
        let (base, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            // `here` is the file's own module (a mod.rs is its directory's), so
            // each `super::` is one step up from it.
            let mut base = here.to_vec();
            let mut n = 0;
            while code[i + n..].starts_with("super::") {
                base.pop();
                n += "super::".len();
            }
            (base, n)
        } else {
            i += 1;
            continue;
        };
        let tail = &code[i + skip..];
        if tail.starts_with('{') {
            let end = tail.find('}').unwrap_or(tail.len());
            for item in tail[1..end].split(',') {
                let mut p = base.clone();
                p.extend(item.trim().split("::").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                out.push(p);
            }
        } else {
            let len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(tail.len());
            let mut p = base;
            p.extend(tail[..len].split("::").filter(|s| !s.is_empty()).map(str::to_string));
            out.push(p);
        }
        i += skip;
    }
    out
}

#[test]
fn no_import_cycles_between_sibling_modules() {
    let root = root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
        // Edges between siblings: (parent, from, to).
        let mut edges: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
        for f in &files {
            let Some(code) = production_code(f) else { continue };
            let here = module_of(&src, f);
            for r in references(&code, &here) {
                // The longest prefix that is a module of ours.
                let Some(target) = (0..=r.len()).rev().map(|n| r[..n].to_vec()).find(|p| modules.contains(p)) else {
                    continue;
                };
                let common = here.iter().zip(&target).take_while(|(a, b)| a == b).count();
                if common == here.len() || common == target.len() {
                    continue; // ancestor or descendant: not a sibling edge
                }
                edges
                    .entry(here[..common].to_vec())
                    .or_default()
                    .insert((here[common].clone(), target[common].clone()));
            }
        }
        for (parent, es) in &edges {
            let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (a, b) in es {
                graph.entry(a).or_default().push(b);
            }
            if let Some(cycle) = find_cycle(&graph) {
                problems.push(format!("{krate} {}: {}", parent.join("::"), cycle.join(" → ")));
            }
        }
    }
    assert!(problems.is_empty(), "import cycles between sibling modules:\n{}", problems.join("\n"));
}

fn find_cycle<'a>(graph: &BTreeMap<&'a str, Vec<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        n: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(i) = stack.iter().position(|s| *s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n);
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n);
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = BTreeMap::from([("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]);
    assert_eq!(find_cycle(&g), Some(vec!["a", "b", "c", "a"]));
    let g = BTreeMap::from([("a", vec!["b"]), ("b", vec!["c"])]);
    assert_eq!(find_cycle(&g), None);
    let refs = references("use crate::{driver::Driver, plan};\nlet x = super::y::z;", &["a".into(), "b".into()]);
    assert!(refs.contains(&vec!["driver".to_string(), "Driver".into()]), "{refs:?}");
    assert!(refs.contains(&vec!["plan".to_string()]), "{refs:?}");
    assert!(refs.contains(&vec!["a".to_string(), "y".into(), "z".into()]), "{refs:?}");
}

#[test]
fn no_source_file_is_over_500_lines() {
    let root = root();
    let mut long = Vec::new();
    for krate in CRATES {
        let mut files = Vec::new();
        rust_files(&root.join(krate), &mut files);
        for f in files {
            let Some(code) = production_code(&f) else { continue };
            let n = code.lines().count();
            if n > MAX_LINES {
                long.push(format!("{} ({n} lines)", f.strip_prefix(&root).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "split these along their seams:\n{}", long.join("\n"));
}

#[test]
fn protobuf_and_grpc_names_stay_in_the_adapter() {
    let src = root().join("driver/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut leaks = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        if rel.starts_with("nomad") || rel == Path::new("main.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if ["tonic::", "prost::", "prost_types::", "aimodel_proto::", "tonic_health::"]
                .iter()
                .any(|w| code.contains(w))
            {
                leaks.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(leaks.is_empty(), "tonic/prost/protos outside driver/src/nomad/:\n{}", leaks.join("\n"));
}
