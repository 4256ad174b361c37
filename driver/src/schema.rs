//! One declarative description of each configuration schema, turned into the
//! hclspec Nomad decodes with and into the reference tables in the docs.

use std::collections::HashMap;

use aimodel_proto::hclspec::{self, spec::Block as S};

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

fn wrap(b: S) -> hclspec::Spec {
    hclspec::Spec { block: Some(b) }
}

/// The hclspec object Nomad uses to decode a `config { ... }` body.
pub fn to_spec(fields: &[Field]) -> hclspec::Spec {
    let attributes: HashMap<String, hclspec::Spec> =
        fields.iter().map(|f| (f.name.to_string(), field_spec(f))).collect();
    wrap(S::Object(hclspec::Object { attributes }))
}

fn field_spec(f: &Field) -> hclspec::Spec {
    match &f.kind {
        Kind::Attr { ty, required, default } => {
            let a = wrap(S::Attr(hclspec::Attr { name: f.name.into(), r#type: (*ty).into(), required: *required }));
            match default {
                Some(lit) => wrap(S::Default(Box::new(hclspec::Default {
                    primary: Some(Box::new(a)),
                    default: Some(Box::new(wrap(S::Literal(hclspec::Literal { value: (*lit).into() })))),
                }))),
                None => a,
            }
        }
        Kind::Block(nested) => wrap(S::BlockValue(Box::new(hclspec::Block {
            name: f.name.into(),
            required: false,
            nested: Some(Box::new(to_spec(nested))),
        }))),
    }
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

/// The value Nomad would send for an empty `config {}` body: every attribute
/// present, defaults applied, blocks null. With `fill_blocks`, absent blocks are
/// replaced by their own defaults (what an empty `block {}` would give: its own
/// nested blocks absent, so null).
pub fn default_value(fields: &[Field], fill_blocks: bool) -> crate::cty::Value {
    use crate::cty::Value;
    let map = fields
        .iter()
        .map(|f| {
            let v = match &f.kind {
                Kind::Attr { default: Some(lit), .. } => literal_value(lit),
                Kind::Attr { .. } => Value::Null,
                Kind::Block(nested) if fill_blocks => default_value(nested, false),
                Kind::Block(_) => Value::Null,
            };
            (f.name.to_string(), v)
        })
        .collect();
    Value::Map(map)
}

/// Our default literals are JSON-compatible HCL (strings, bools, numbers).
fn literal_value(lit: &str) -> crate::cty::Value {
    use crate::cty::{Number, Value};
    match serde_json::from_str::<serde_json::Value>(lit) {
        Ok(serde_json::Value::String(s)) => Value::String(s),
        Ok(serde_json::Value::Bool(b)) => Value::Bool(b),
        Ok(serde_json::Value::Number(n)) => Number::from_decimal(&n.to_string()).map_or(Value::Null, Value::Number),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INNER: &[Field] = &[attr("b", "bool", Some("true"), "b")];
    const FIELDS: &[Field] = &[required("a", "string", "a"), block("blk", INNER, "blk")];

    #[test]
    fn spec_shapes_match_hclspec() {
        let spec = to_spec(FIELDS);
        let Some(S::Object(obj)) = spec.block else { panic!("not an object") };
        let Some(S::Attr(a)) = &obj.attributes["a"].block else { panic!("a is not an attr") };
        assert!(a.required);
        assert_eq!(a.r#type, "string");
        let Some(S::BlockValue(b)) = &obj.attributes["blk"].block else { panic!("blk is not a block") };
        let Some(S::Object(inner)) = &b.nested.as_ref().unwrap().block else { panic!() };
        let Some(S::Default(d)) = &inner.attributes["b"].block else { panic!("b has no default") };
        let Some(S::Literal(l)) = &d.default.as_ref().unwrap().block else { panic!() };
        assert_eq!(l.value, "true");
    }

    #[test]
    fn doc_rows_flatten_blocks() {
        let paths: Vec<_> = doc_rows(FIELDS).into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["a", "blk.b"]);
        assert!(markdown_table(FIELDS).contains("| `blk.b` | `bool` | `true` |"));
    }
}
