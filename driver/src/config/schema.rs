//! One declarative description of each configuration schema, turned into the
//! reference tables in the docs here and into the hclspec Nomad decodes with
//! by the adapter (`nomad::hclspec`).

/// One attribute or nested block of a configuration schema.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub doc: &'static str,
}

/// What a [`Field`] is in HCL.
#[derive(Debug)]
pub enum Kind {
    /// `name = value` with an HCL type expression and an optional default literal
    /// (an HCL expression, e.g. `"\"30s\""` or `true`).
    Attr { ty: &'static str, required: bool, default: Option<&'static str> },
    /// `name { ... }`, at most once; absent means every nested default.
    Block(&'static [Field]),
}

/// Shorthand for an optional attribute with a default.
pub const fn attr(name: &'static str, ty: &'static str, default: Option<&'static str>, doc: &'static str) -> Field {
    Field { name, kind: Kind::Attr { ty, required: false, default }, doc }
}

/// Shorthand for a required attribute.
pub const fn required(name: &'static str, ty: &'static str, doc: &'static str) -> Field {
    Field { name, kind: Kind::Attr { ty, required: true, default: None }, doc }
}

/// Shorthand for a nested block.
pub const fn block(name: &'static str, fields: &'static [Field], doc: &'static str) -> Field {
    Field { name, kind: Kind::Block(fields), doc }
}

/// One row of a reference table: dotted path, type, default, required, doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRow {
    pub path: String,
    pub ty: String,
    pub default: String,
    pub required: bool,
    pub doc: String,
}

/// Every attribute of a schema, depth first, blocks as `block.attr` paths.
pub fn doc_rows(fields: &[Field]) -> Vec<DocRow> {
    let mut rows = Vec::new();
    collect(fields, "", &mut rows);
    rows
}

fn collect(fields: &[Field], prefix: &str, rows: &mut Vec<DocRow>) {
    for f in fields {
        let path = format!("{prefix}{}", f.name);
        match &f.kind {
            Kind::Attr { ty, required, default } => rows.push(DocRow {
                path,
                ty: (*ty).into(),
                default: default.map(str::to_string).unwrap_or_default(),
                required: *required,
                doc: f.doc.into(),
            }),
            Kind::Block(nested) => collect(nested, &format!("{path}."), rows),
        }
    }
}

/// A Markdown table of [`doc_rows`], as the docs carry it.
pub fn markdown_table(fields: &[Field]) -> String {
    let mut out = String::from("| Option | Type | Default | Description |\n|---|---|---|---|\n");
    for r in doc_rows(fields) {
        let default = if r.required {
            "required".to_string()
        } else if r.default.is_empty() {
            "none".to_string()
        } else {
            format!("`{}`", r.default.replace('|', "\\|"))
        };
        out.push_str(&format!("| `{}` | `{}` | {} | {} |\n", r.path, r.ty, default, r.doc));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INNER: &[Field] = &[attr("b", "bool", Some("true"), "b")];
    const FIELDS: &[Field] = &[required("a", "string", "a"), block("blk", INNER, "blk")];

    #[test]
    fn doc_rows_flatten_blocks() {
        let paths: Vec<_> = doc_rows(FIELDS).into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["a", "blk.b"]);
        assert!(markdown_table(FIELDS).contains("| `blk.b` | `bool` | `true` |"));
    }
}
