use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

// Golden vectors from shared/nomad-wire.md §4.3.
#[test]
fn golden_task_schema_example() {
    let v = Value::object([("args", Value::List(vec![Value::str("hi")])), ("command", Value::str("echo"))]);
    let bytes = hex("82 a4 61 72 67 73 91 a2 68 69 a7 63 6f 6d 6d 61 6e 64 a4 65 63 68 6f");
    assert_eq!(encode(&v), bytes);
    assert_eq!(decode(&bytes).unwrap(), v);

    let absent = Value::object([("args", Value::Null), ("command", Value::str("echo"))]);
    let bytes = encode(&absent);
    assert_eq!(&bytes[..7], &hex("82 a4 61 72 67 73 c0")[..]);
    assert_eq!(decode(&bytes).unwrap(), absent);
}

#[test]
fn golden_plugin_schema_example() {
    let v = Value::object([("enabled", Value::Bool(true)), ("port", Value::int(8080))]);
    let bytes = hex("82 a7 65 6e 61 62 6c 65 64 c3 a4 70 6f 72 74 cd 1f 90");
    assert_eq!(encode(&v), bytes);
    assert_eq!(decode(&bytes).unwrap(), v);
}

#[test]
fn golden_numbers() {
    let cases = [
        ("-1", "ff"),
        ("300", "cd 01 2c"),
        ("-200", "d1 ff 38"),
        ("1.5", "cb 3f f8 00 00 00 00 00 00"),
        ("0.1", "a3 30 2e 31"),
        ("0", "00"),
        ("127", "7f"),
        ("128", "cc 80"),
        ("255", "cc ff"),
        ("65536", "ce 00 01 00 00"),
        ("4294967296", "cf 00 00 00 01 00 00 00 00"),
        ("-32", "e0"),
        ("-33", "d0 df"),
        ("-129", "d1 ff 7f"),
        ("-40000", "d2 ff ff 63 c0"),
    ];
    for (text, want) in cases {
        let n = Value::Number(Number::from_decimal(text).unwrap());
        assert_eq!(encode(&n), hex(want), "encoding {text}");
        // Without a type, a decimal that travels as text decodes as a string;
        // the typed layer (`from_value`) turns it back into a number.
        assert_eq!(decode(&hex(want)).unwrap(), as_decoded(&n), "decoding {text}");
    }
}

#[test]
fn integer_width_boundaries() {
    let cases: [(i64, &str); 14] = [
        (-1, "ff"),
        (-128, "d0 80"),
        (i64::from(i16::MIN), "d1 80 00"),
        (i64::from(i16::MIN) - 1, "d2 ff ff 7f ff"),
        (i64::from(i32::MIN), "d2 80 00 00 00"),
        (i64::from(i32::MIN) - 1, "d3 ff ff ff ff 7f ff ff ff"),
        (i64::MIN, "d3 80 00 00 00 00 00 00 00"),
        (65535, "cd ff ff"),
        (256, "cd 01 00"),
        (65536, "ce 00 01 00 00"),
        (i64::from(u32::MAX), "ce ff ff ff ff"),
        (i64::from(u32::MAX) + 1, "cf 00 00 00 01 00 00 00 00"),
        (i64::MAX, "cf 7f ff ff ff ff ff ff ff"),
        (-129, "d1 ff 7f"),
    ];
    for (i, want) in cases {
        assert_eq!(encode(&Value::int(i)), hex(want), "encoding {i}");
        assert_eq!(decode(&hex(want)).unwrap(), Value::int(i), "decoding {i}");
    }
    let max = Value::Number(Number::UInt(u64::MAX));
    assert_eq!(encode(&max), hex("cf ff ff ff ff ff ff ff ff"));
    assert_eq!(decode(&encode(&max)).unwrap(), max);
    // float32 on the wire is widened; a negative fixint byte is the value itself.
    assert_eq!(decode(&hex("ca 3f c0 00 00")).unwrap(), Value::Number(Number::Float(1.5)));
    assert_eq!(decode(&hex("e0")).unwrap(), Value::int(-32));
}

#[test]
fn string_lengths_use_smallest_form() {
    assert_eq!(encode(&Value::str(&"a".repeat(31)))[0], 0xbf);
    assert_eq!(&encode(&Value::str(&"a".repeat(32)))[..2], &[0xd9, 32]);
    assert_eq!(&encode(&Value::str(&"a".repeat(256)))[..3], &[0xda, 1, 0]);
    let list = Value::List(vec![Value::Null; 16]);
    assert_eq!(&encode(&list)[..3], &[0xdc, 0, 16]);
    assert_eq!(&encode(&Value::str(&"a".repeat(65535)))[..3], &[0xda, 0xff, 0xff]);
    let long = Value::str(&"a".repeat(65536));
    assert_eq!(&encode(&long)[..5], &[0xdb, 0, 1, 0, 0]);
    assert_eq!(decode(&encode(&long)).unwrap(), long);
    let list = Value::List(vec![Value::Null; 65536]);
    assert_eq!(&encode(&list)[..5], &[0xdd, 0, 1, 0, 0]);
    assert_eq!(decode(&encode(&list)).unwrap(), list);
}

#[test]
fn unknown_value_is_refused_with_its_path() {
    let err = decode(&hex("d4 00 00")).unwrap_err();
    assert!(matches!(err, CtyError::UnknownValue { .. }));
    let v = hex("81 a4 70 6f 72 74 d4 00 00");
    let err = decode(&v).unwrap_err();
    assert_eq!(err, CtyError::UnknownValue { at: "port".into() });
    assert!(err.to_string().contains("port"));
}

#[test]
fn lenient_integer_encodings_are_accepted() {
    // Signed families for positive values, as go-msgpack writes them.
    assert_eq!(decode(&hex("d1 01 2c")).unwrap(), Value::int(300));
    assert_eq!(decode(&hex("d3 00 00 00 00 00 00 00 05")).unwrap(), Value::int(5));
    // An integral float is the same number.
    assert_eq!(decode(&hex("cb 40 08 00 00 00 00 00 00")).unwrap(), Value::int(3));
}

#[test]
fn dynamic_wrapper_is_unwrapped() {
    // [bin8("\"string\""), "x"]
    let mut b = hex("92 c4 08");
    b.extend(b"\"string\"");
    b.extend(hex("a1 78"));
    assert_eq!(decode(&b).unwrap(), Value::str("x"));
}

#[test]
fn malformed_inputs_are_errors() {
    assert!(matches!(decode(&hex("a5 61")), Err(CtyError::Truncated { .. })));
    assert!(matches!(decode(&hex("c0 c0")), Err(CtyError::TrailingBytes { count: 1 })));
    assert!(matches!(decode(&hex("c1")), Err(CtyError::UnsupportedMarker { .. })));
    assert!(matches!(decode(&hex("81 01 02")), Err(CtyError::NonStringKey { .. })));
    assert!(matches!(decode(&hex("a2 ff fe")), Err(CtyError::InvalidUtf8 { .. })));
    assert!(matches!(decode(&hex("dd ff ff ff ff")), Err(CtyError::Truncated { .. })));
    let deep = vec![0x91u8; 200];
    assert!(matches!(decode(&deep), Err(CtyError::TooDeep { .. })));
    assert_eq!(decode(&[]).unwrap(), Value::Null);
}

#[derive(Debug, serde::Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
struct Sample {
    name: String,
    count: u32,
    ratio: f64,
    flag: bool,
    tags: Vec<String>,
    inner: Inner,
    mode: Mode,
}

#[derive(Debug, serde::Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
struct Inner {
    size: Option<u64>,
}

#[derive(Debug, serde::Deserialize, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    Nomad,
    Config,
}

#[test]
fn typed_decoding_is_lenient_about_numbers_and_strict_about_names() {
    let v = Value::object([
        ("count", Value::str("7")),
        ("flag", Value::Null),
        ("inner", Value::object([("size", Value::Number(Number::Float(4096.0)))])),
        ("mode", Value::str("config")),
        ("name", Value::int(12)),
        ("ratio", Value::str("0.1")),
        ("tags", Value::List(vec![Value::str("a")])),
    ]);
    let s: Sample = from_value(&v).unwrap();
    assert_eq!(s.count, 7);
    assert_eq!(s.name, "12");
    assert!((s.ratio - 0.1).abs() < 1e-12);
    assert!(!s.flag);
    assert_eq!(s.inner.size, Some(4096));
    assert_eq!(s.mode, Mode::Config);

    let bad = Value::object([("count", Value::int(-4))]);
    let e = from_value::<Sample>(&bad).unwrap_err();
    assert_eq!(e.field, "count");
    assert!(e.message.contains("negative"), "{e}");

    let bad = Value::object([("mode", Value::str("bogus"))]);
    let e = from_value::<Sample>(&bad).unwrap_err();
    assert_eq!(e.field, "mode");
    assert!(e.message.contains("bogus"), "{e}");

    let bad = Value::object([("inner", Value::object([("sise", Value::int(1))]))]);
    let e = from_value::<Sample>(&bad).unwrap_err();
    assert!(e.field.starts_with("inner"), "{e}");
    assert!(e.message.contains("sise"), "{e}");

    let bad = Value::object([("flag", Value::int(1))]);
    assert_eq!(from_value::<Sample>(&bad).unwrap_err().field, "flag");
}

/// What an untyped decode yields: decimals arrive as strings.
fn as_decoded(v: &Value) -> Value {
    match v {
        Value::Number(Number::Decimal(s)) => Value::String(s.clone()),
        Value::List(items) => Value::List(items.iter().map(as_decoded).collect()),
        Value::Map(m) => Value::Map(m.iter().map(|(k, v)| (k.clone(), as_decoded(v))).collect()),
        other => other.clone(),
    }
}

fn arb_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::Int),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Number::UInt),
        any::<f64>().prop_filter("finite, non-integral", |f| f.is_finite() && f.fract() != 0.0).prop_map(Number::Float),
        (1u32..1000, 1u32..6)
            .prop_map(|(n, k)| { Number::from_decimal(&format!("{n}.{}1", "0".repeat(k as usize))).unwrap() }),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number().prop_map(Value::Number),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 20, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..20).prop_map(Value::List),
            prop::collection::btree_map(".{0,12}", inner, 0..20).prop_map(|m: BTreeMap<String, Value>| Value::Map(m)),
        ]
    })
}

/// Cases per property: 512 in the test command (seconds); a longer run is
/// `PROPTEST_CASES=200000 cargo test -p nomad-driver-aimodel cty::` (docs/security.md).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
}

#[test]
fn hostile_shapes_are_errors_not_crashes() {
    // 100 000 nested one-element arrays: a depth error, not a stack overflow.
    let mut deep = vec![0x91u8; 100_000];
    deep.push(0xc0);
    assert!(decode(&deep).is_err());
    // An array32 claiming 4 billion elements in a 5-byte input: no allocation of that size.
    assert!(decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    assert!(decode(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
    // A str32 longer than the input.
    assert!(decode(&[0xdb, 0x7f, 0xff, 0xff, 0xff, b'a']).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn round_trip(v in arb_value()) {
        let bytes = encode(&v);
        prop_assert_eq!(decode(&bytes).unwrap(), as_decoded(&v));
        // Canonical bytes re-encode to themselves.
        prop_assert_eq!(encode(&decode(&bytes).unwrap()), bytes);
    }

    #[test]
    fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_mutated_valid_input(v in arb_value(), idx in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode(&v);
        if !bytes.is_empty() {
            let i = idx.index(bytes.len());
            bytes[i] = byte;
        }
        let _ = decode(&bytes);
    }

    #[test]
    fn decimal_text_round_trips(n in any::<i32>(), k in 0u32..8) {
        let text = if k == 0 { n.to_string() } else {
            let s = format!("{:0>width$}", n.unsigned_abs(), width = k as usize + 1);
            let (i, f) = s.split_at(s.len() - k as usize);
            format!("{}{i}.{f}", if n < 0 { "-" } else { "" })
        };
        let num = Number::from_decimal(&text).unwrap();
        let parsed: f64 = text.parse().unwrap();
        prop_assert!((num.as_f64() - parsed).abs() <= parsed.abs() * 1e-15);
    }
}
