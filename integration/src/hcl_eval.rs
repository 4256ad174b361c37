//! Evaluating an HCL body against an hclspec the way Nomad's hcldec does
//! (`plugins/shared/hclspec`, `hclspecutils/dec.go`), producing the cty value
//! that Nomad would msgpack-encode: every attribute present, defaults applied,
//! absent ones null, values converted to the declared type.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Context, Result};
use hcl::eval::{Context as EvalContext, Evaluate};
use hcl::{Body, Expression};

use aimodel_driver::nomad::cty::{Number, Value};
use aimodel_proto::hclspec::{spec::Block as S, Spec};

/// An HCL type expression as hcldec parses `Attr.type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    String,
    Number,
    Bool,
    Any,
    List(Box<Type>),
    Set(Box<Type>),
    Map(Box<Type>),
}

/// Parses `string`, `number`, `bool`, `any`, `list(T)`, `set(T)`, `map(T)`.
pub fn parse_type(text: &str) -> Result<Type> {
    let t = text.trim();
    if t.is_empty() {
        bail!("empty type expression");
    }
    let inner = |prefix: &str| t.strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
    Ok(match t {
        "string" => Type::String,
        "number" => Type::Number,
        "bool" => Type::Bool,
        "any" => Type::Any,
        _ => {
            if let Some(i) = inner("list(") {
                Type::List(Box::new(parse_type(i)?))
            } else if let Some(i) = inner("set(") {
                Type::Set(Box::new(parse_type(i)?))
            } else if let Some(i) = inner("map(") {
                Type::Map(Box::new(parse_type(i)?))
            } else {
                bail!("unsupported type expression {t:?}")
            }
        }
    })
}

/// Converts an HCL value to a cty value of type `ty`, like cty's `convert`.
pub fn convert(v: &hcl::Value, ty: &Type, at: &str) -> Result<Value> {
    use hcl::Value as H;
    let mismatch = |want: &str| anyhow!("{at}: Incorrect attribute value type; {want} required");
    Ok(match (ty, v) {
        (_, H::Null) => Value::Null,
        (Type::Any, _) => natural(v)?,
        (Type::String, H::String(s)) => Value::String(s.clone()),
        (Type::String, H::Number(n)) => Value::String(number(n)?.to_string()),
        (Type::String, H::Bool(b)) => Value::String(b.to_string()),
        (Type::Number, H::Number(n)) => Value::Number(number(n)?),
        (Type::Number, H::String(s)) => Value::Number(Number::from_decimal(s).map_err(|_| mismatch("number"))?),
        (Type::Bool, H::Bool(b)) => Value::Bool(*b),
        (Type::Bool, H::String(s)) if s == "true" || s == "false" => Value::Bool(s == "true"),
        (Type::List(t), H::Array(items)) => Value::List(
            items.iter().enumerate().map(|(i, x)| convert(x, t, &format!("{at}[{i}]"))).collect::<Result<_>>()?,
        ),
        (Type::Set(t), H::Array(items)) => {
            // cty orders sets of primitives by their value; strings sort bytewise.
            let mut vals: Vec<Value> =
                items.iter().enumerate().map(|(i, x)| convert(x, t, &format!("{at}[{i}]"))).collect::<Result<_>>()?;
            vals.sort_by_key(|v| format!("{v:?}"));
            vals.dedup();
            Value::List(vals)
        }
        (Type::Map(t), H::Object(m)) => Value::Map(
            m.iter().map(|(k, x)| Ok((k.clone(), convert(x, t, &format!("{at}.{k}"))?))).collect::<Result<_>>()?,
        ),
        (Type::String, _) => return Err(mismatch("string")),
        (Type::Number, _) => return Err(mismatch("number")),
        (Type::Bool, _) => return Err(mismatch("bool")),
        (Type::List(_), _) => return Err(mismatch("list")),
        (Type::Set(_), _) => return Err(mismatch("set")),
        (Type::Map(_), _) => return Err(mismatch("map")),
    })
}

fn number(n: &hcl::Number) -> Result<Number> {
    if let Some(i) = n.as_i64() {
        return Ok(Number::Int(i));
    }
    if let Some(u) = n.as_u64() {
        return Ok(Number::UInt(u));
    }
    let f = n.as_f64().context("number out of range")?;
    // HCL keeps 512-bit decimals; the shortest round-trip text of the f64 is the
    // literal the user wrote, which go-cty then encodes as float or as text.
    Number::from_decimal(&format!("{f}")).map_err(|e| anyhow!("{e}"))
}

fn natural(v: &hcl::Value) -> Result<Value> {
    use hcl::Value as H;
    Ok(match v {
        H::Null => Value::Null,
        H::Bool(b) => Value::Bool(*b),
        H::Number(n) => Value::Number(number(n)?),
        H::String(s) => Value::String(s.clone()),
        H::Array(items) => Value::List(items.iter().map(natural).collect::<Result<_>>()?),
        H::Object(m) => Value::Map(m.iter().map(|(k, x)| Ok((k.clone(), natural(x)?))).collect::<Result<_>>()?),
    })
}

/// Evaluates an expression like Nomad's jobspec parser: a string template that
/// refers to something unknown here (`${NOMAD_PORT_http}`, `${attr.x}`, an env
/// var from a template block) is kept verbatim for runtime interpolation.
pub fn evaluate_lenient(expr: &Expression, ctx: &EvalContext) -> Result<hcl::Value> {
    use hcl::expr::TemplateExpr;
    match expr {
        Expression::Array(items) => {
            Ok(hcl::Value::Array(items.iter().map(|i| evaluate_lenient(i, ctx)).collect::<Result<_>>()?))
        }
        Expression::TemplateExpr(t) => match expr.evaluate(ctx) {
            Ok(v) => Ok(v),
            Err(_) => Ok(hcl::Value::String(match t.as_ref() {
                TemplateExpr::QuotedString(s) => s.clone(),
                TemplateExpr::Heredoc(h) => h.template.clone(),
            })),
        },
        _ => expr.evaluate(ctx).map_err(|e| anyhow!("{e}")),
    }
}

/// Evaluates `body` against `spec` (the top level must be an Object spec).
pub fn eval_body(spec: &Spec, body: &Body, ctx: &EvalContext) -> Result<Value> {
    match &spec.block {
        Some(S::Object(_)) => eval(spec, "", body, ctx, ""),
        _ => bail!("the top-level spec must be an object"),
    }
}

fn eval(spec: &Spec, key: &str, body: &Body, ctx: &EvalContext, at: &str) -> Result<Value> {
    let block = spec.block.as_ref().ok_or_else(|| anyhow!("{at}: Invalid spec block"))?;
    let path = |name: &str| if at.is_empty() { name.to_string() } else { format!("{at}.{name}") };
    match block {
        S::Object(obj) => {
            let mut known = BTreeSet::new();
            for (k, s) in &obj.attributes {
                consumed_names(s, k, &mut known);
            }
            for a in body.attributes() {
                if !known.contains(a.key.as_str()) {
                    bail!(
                        "{}: Unsupported argument; an argument named {:?} is not expected here",
                        path(a.key.as_str()),
                        a.key.as_str()
                    );
                }
            }
            for b in body.blocks() {
                if !known.contains(b.identifier.as_str()) {
                    bail!(
                        "{}: Unsupported block type; blocks of type {:?} are not expected here",
                        path(b.identifier.as_str()),
                        b.identifier.as_str()
                    );
                }
            }
            let mut map = BTreeMap::new();
            for (k, s) in &obj.attributes {
                map.insert(k.clone(), eval(s, k, body, ctx, at)?);
            }
            Ok(Value::Map(map))
        }
        S::Array(arr) => {
            Ok(Value::List(arr.values.iter().map(|s| eval(s, key, body, ctx, at)).collect::<Result<_>>()?))
        }
        S::Attr(a) => {
            let name = if a.name.is_empty() { key } else { &a.name };
            let ty = parse_type(&a.r#type).with_context(|| path(name))?;
            match body.attributes().find(|x| x.key.as_str() == name) {
                None if a.required => {
                    bail!("{}: Missing required argument; the argument {name:?} is required", path(name))
                }
                None => Ok(Value::Null),
                Some(attr) => {
                    let v = evaluate_lenient(&attr.expr, ctx).map_err(|e| anyhow!("{}: {e}", path(name)))?;
                    convert(&v, &ty, &path(name))
                }
            }
        }
        S::Default(d) => {
            let primary = d.primary.as_deref().ok_or_else(|| anyhow!("{at}: default without primary"))?;
            let v = eval(primary, key, body, ctx, at)?;
            if v != Value::Null {
                return Ok(v);
            }
            let default = d.default.as_deref().ok_or_else(|| anyhow!("{at}: default without value"))?;
            eval(default, key, body, ctx, at)
        }
        S::Literal(l) => {
            let wrapped: Body =
                hcl::parse(&format!("v = {}\n", l.value)).with_context(|| format!("literal {:?}", l.value))?;
            let expr: &Expression = &wrapped.attributes().next().context("empty literal")?.expr;
            let v = expr.evaluate(ctx).map_err(|e| anyhow!("literal {:?}: {e}", l.value))?;
            natural(&v)
        }
        S::BlockValue(b) => {
            let found: Vec<_> = body.blocks().filter(|x| x.identifier.as_str() == b.name).collect();
            match found.as_slice() {
                [] if b.required => bail!("{}: Missing {:?} block", path(&b.name), b.name),
                [] => Ok(Value::Null),
                [one] => {
                    let nested = b.nested.as_deref().context("block without nested spec")?;
                    eval(nested, &b.name, &one.body, ctx, &path(&b.name))
                }
                _ => bail!("{}: Duplicate {:?} block; only one is allowed", path(&b.name), b.name),
            }
        }
        S::BlockList(b) => {
            let nested = b.nested.as_deref().context("block list without nested spec")?;
            let items: Vec<Value> = body
                .blocks()
                .filter(|x| x.identifier.as_str() == b.name)
                .enumerate()
                .map(|(i, x)| eval(nested, &b.name, &x.body, ctx, &format!("{}[{i}]", path(&b.name))))
                .collect::<Result<_>>()?;
            check_count(&path(&b.name), items.len() as u64, b.min_items, b.max_items)?;
            Ok(Value::List(items))
        }
        S::BlockSet(b) => {
            let nested = b.nested.as_deref().context("block set without nested spec")?;
            let items: Vec<Value> = body
                .blocks()
                .filter(|x| x.identifier.as_str() == b.name)
                .map(|x| eval(nested, &b.name, &x.body, ctx, &path(&b.name)))
                .collect::<Result<_>>()?;
            check_count(&path(&b.name), items.len() as u64, b.min_items, b.max_items)?;
            Ok(Value::List(items))
        }
        S::BlockMap(b) => {
            let nested = b.nested.as_deref().context("block map without nested spec")?;
            let mut map = BTreeMap::new();
            for x in body.blocks().filter(|x| x.identifier.as_str() == b.name) {
                if x.labels.len() != b.labels.len() {
                    bail!("{}: expected {} labels", path(&b.name), b.labels.len());
                }
                let label = x.labels.first().map(|l| l.as_str().to_string()).unwrap_or_default();
                map.insert(label.clone(), eval(nested, &b.name, &x.body, ctx, &format!("{}.{label}", path(&b.name)))?);
            }
            Ok(if map.is_empty() { Value::Null } else { Value::Map(map) })
        }
        S::BlockAttrs(b) => {
            let ty = parse_type(&b.r#type)?;
            match body.blocks().find(|x| x.identifier.as_str() == b.name) {
                None if b.required => bail!("{}: Missing {:?} block", path(&b.name), b.name),
                None => Ok(Value::Null),
                Some(x) => {
                    let mut map = BTreeMap::new();
                    for a in x.body.attributes() {
                        let v = a.expr.evaluate(ctx).map_err(|e| anyhow!("{}: {e}", path(&b.name)))?;
                        map.insert(a.key.to_string(), convert(&v, &ty, &path(&b.name))?);
                    }
                    Ok(Value::Map(map))
                }
            }
        }
    }
}

fn check_count(at: &str, n: u64, min: u64, max: u64) -> Result<()> {
    if n < min {
        bail!("{at}: at least {min} blocks are required");
    }
    if max > 0 && n > max {
        bail!("{at}: no more than {max} blocks are allowed");
    }
    Ok(())
}

/// The argument and block names a spec reads from the body it is applied to.
fn consumed_names(spec: &Spec, key: &str, out: &mut BTreeSet<String>) {
    match &spec.block {
        Some(S::Attr(a)) => {
            out.insert(if a.name.is_empty() { key.to_string() } else { a.name.clone() });
        }
        Some(S::Default(d)) => {
            if let Some(p) = d.primary.as_deref() {
                consumed_names(p, key, out);
            }
        }
        Some(S::BlockValue(b)) => {
            out.insert(b.name.clone());
        }
        Some(S::BlockList(b)) => {
            out.insert(b.name.clone());
        }
        Some(S::BlockSet(b)) => {
            out.insert(b.name.clone());
        }
        Some(S::BlockMap(b)) => {
            out.insert(b.name.clone());
        }
        Some(S::BlockAttrs(b)) => {
            out.insert(b.name.clone());
        }
        Some(S::Array(a)) => a.values.iter().for_each(|s| consumed_names(s, key, out)),
        Some(S::Object(_)) | Some(S::Literal(_)) | None => {}
    }
}

/// The `plugin "<name>" { args = [...] config { ... } }` block of a Nomad client
/// configuration file: its args and its config body (`None` when the plugin is
/// not referenced, in which case Nomad ≥ 1.7 skips the binary).
pub fn plugin_stanza(client_hcl: &str, name: &str) -> Result<Option<(Vec<String>, Body)>> {
    let body: Body = hcl::parse(client_hcl).context("parsing the client configuration")?;
    let Some(block) =
        body.blocks().find(|b| b.identifier.as_str() == "plugin" && b.labels.first().map(|l| l.as_str()) == Some(name))
    else {
        return Ok(None);
    };
    let ctx = EvalContext::new();
    let args = match block.body.attributes().find(|a| a.key.as_str() == "args") {
        Some(a) => match a.expr.evaluate(&ctx)? {
            hcl::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).context("args must be strings"))
                .collect::<Result<_>>()?,
            _ => bail!("plugin args must be a list of strings"),
        },
        None => Vec::new(),
    };
    let config =
        block.body.blocks().find(|b| b.identifier.as_str() == "config").map(|b| b.body.clone()).unwrap_or_default();
    Ok(Some((args, config)))
}

#[cfg(test)]
mod tests {
    use aimodel_driver::config::{PLUGIN_SCHEMA, TASK_SCHEMA};
    use aimodel_driver::nomad::cty::encode;
    use aimodel_driver::nomad::hclspec::{default_value, to_spec};

    use super::*;

    fn eval_str(spec: &Spec, text: &str) -> Result<Value> {
        eval_body(spec, &hcl::parse(text)?, &EvalContext::new())
    }

    #[test]
    fn empty_body_gives_the_schema_defaults() {
        let spec = to_spec(PLUGIN_SCHEMA);
        assert_eq!(eval_str(&spec, "").unwrap(), default_value(PLUGIN_SCHEMA, false));
        let with_blocks = "hf_cache {}\ngpu {}\nimages {}\ngc {}\n";
        let Value::Map(got) = eval_str(&spec, with_blocks).unwrap() else { panic!() };
        let Value::Map(want) = default_value(PLUGIN_SCHEMA, true) else { panic!() };
        for k in ["hf_cache", "gpu", "images", "gc"] {
            assert_eq!(got[k], want[k], "{k}");
        }
    }

    #[test]
    fn values_are_converted_like_cty() {
        let spec = to_spec(TASK_SCHEMA);
        let v = eval_str(&spec, "engine = \"vllm\"\nmodel = \"a/b\"\ngpus = 2\nargs = [\"--x\", 1]\n").unwrap();
        let Value::Map(m) = &v else { panic!() };
        assert_eq!(m["gpus"], Value::str("2"));
        assert_eq!(m["args"], Value::List(vec![Value::str("--x"), Value::str("1")]));
        assert_eq!(m["revision"], Value::str("main"));
        assert_eq!(m["image"], Value::Null);
        // Attributes sorted, every one present.
        assert_eq!(m.len(), TASK_SCHEMA.len());
        assert!(!encode(&v).is_empty());
    }

    #[test]
    fn numbers_follow_go_cty() {
        let spec = Spec {
            block: Some(S::Object(aimodel_proto::hclspec::Object {
                attributes: [(
                    "n".to_string(),
                    Spec {
                        block: Some(S::Attr(aimodel_proto::hclspec::Attr {
                            name: "n".into(),
                            r#type: "number".into(),
                            required: false,
                        })),
                    },
                )]
                .into_iter()
                .collect(),
            })),
        };
        let n = |text: &str| encode(&eval_str(&spec, &format!("n = {text}")).unwrap())[3..].to_vec();
        assert_eq!(n("0.1"), vec![0xa3, b'0', b'.', b'1']);
        assert_eq!(n("1.5"), vec![0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(n("300"), vec![0xcd, 0x01, 0x2c]);
        assert_eq!(n("-1"), vec![0xff]);
    }

    #[test]
    fn unknown_and_missing_arguments_are_errors() {
        let spec = to_spec(TASK_SCHEMA);
        let e = eval_str(&spec, "engine = \"vllm\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("Unsupported argument") && e.contains("bogus"), "{e}");
        let e = eval_str(&spec, "model = \"a/b\"\n").unwrap_err().to_string();
        assert!(e.contains("engine") && e.contains("required"), "{e}");
        let e = eval_str(&spec, "engine = \"vllm\"\nreadiness {}\nreadiness {}\n").unwrap_err().to_string();
        assert!(e.contains("Duplicate"), "{e}");
        let e = eval_str(&spec, "engine = [1]\n").unwrap_err().to_string();
        assert!(e.contains("engine") && e.contains("string required"), "{e}");
    }

    #[test]
    fn plugin_stanza_is_found_by_binary_name() {
        let text = r#"
plugin_dir = "/opt/nomad/plugins"
plugin "nomad-driver-aimodel" {
  args = ["--flag"]
  config {
    endpoint = "unix:///run/docker.sock"
  }
}
plugin "other" {}
"#;
        let (args, body) = plugin_stanza(text, "nomad-driver-aimodel").unwrap().unwrap();
        assert_eq!(args, ["--flag"]);
        assert_eq!(body.attributes().count(), 1);
        assert!(plugin_stanza(text, "missing").unwrap().is_none());
        let (_, empty) = plugin_stanza(text, "other").unwrap().unwrap();
        assert_eq!(empty.attributes().count(), 0);
    }
}
