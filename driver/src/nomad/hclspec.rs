//! The adapter's view of a configuration schema: the hclspec Nomad decodes a
//! `config { ... }` body with, and the cty value an empty body decodes to.

use std::collections::HashMap;

use aimodel_proto::hclspec::{self, spec::Block as S};

use crate::config::schema::{Field, Kind};

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

/// The value Nomad would send for an empty `config {}` body: every attribute
/// present, defaults applied, blocks null. With `fill_blocks`, absent blocks are
/// replaced by their own defaults (what an empty `block {}` would give: its own
/// nested blocks absent, so null).
pub fn default_value(fields: &[Field], fill_blocks: bool) -> super::cty::Value {
    use super::cty::Value;
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
fn literal_value(lit: &str) -> super::cty::Value {
    use super::cty::{Number, Value};
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
    use crate::config::schema::{attr, block, required};

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
}
