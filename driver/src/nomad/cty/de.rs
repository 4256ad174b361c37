//! serde over cty values, lenient the way cty's type conversion is: numbers may
//! arrive as int, float or string, a string attribute may hold a number or bool,
//! and null means "not set" (so `#[serde(default)]` applies).

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use super::{Number, Value};

/// A typed decode failure, naming the attribute path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DecodeError {
    /// Dotted attribute path, e.g. `gpu.visible_devices_from`.
    pub field: String,
    /// What was wrong with it.
    pub message: String,
}

#[derive(Debug)]
struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Decodes a cty value into a typed struct, reporting the failing field path.
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize(ValueDe(v)).map_err(|e| {
        let field = e.path().to_string();
        DecodeError { field: if field == "." { "(root)".into() } else { field }, message: e.into_inner().0 }
    })
}

#[derive(Clone, Copy)]
struct ValueDe<'a>(&'a Value);

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::List(_) => "a list",
        Value::Map(_) => "an object",
    }
}

impl<'a> ValueDe<'a> {
    fn mismatch(&self, want: &str) -> Error {
        Error(format!("expected {want}, found {}", describe(self.0)))
    }

    fn number(&self) -> Result<Number, Error> {
        match self.0 {
            Value::Number(n) => Ok(n.clone()),
            Value::String(s) => Number::from_decimal(s).map_err(|_| Error(format!("expected a number, found {s:?}"))),
            _ => Err(self.mismatch("a number")),
        }
    }

    // The float cast runs only on a whole number below 1.8e19 in magnitude, which an
    // i128 holds exactly (there is no `try_from` for floats).
    #[allow(clippy::cast_possible_truncation)]
    fn integer(&self) -> Result<i128, Error> {
        match self.number()? {
            Number::Int(i) => Ok(i128::from(i)),
            Number::UInt(u) => Ok(i128::from(u)),
            Number::Float(f) if f.fract() == 0.0 && f.abs() < 1.8e19 => Ok(f as i128),
            other => Err(Error(format!("expected a whole number, found {other}"))),
        }
    }
}

macro_rules! int_method {
    ($method:ident, $visit:ident, $ty:ty) => {
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let i = self.integer()?;
            let v = <$ty>::try_from(i).map_err(|_| {
                if i < 0 {
                    Error(format!("must not be negative, found {i}"))
                } else {
                    Error(format!("{i} is out of range"))
                }
            })?;
            visitor.$visit(v)
        }
    };
}

impl<'de, 'a> de::Deserializer<'de> for ValueDe<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(Number::Int(i)) => visitor.visit_i64(*i),
            Value::Number(Number::UInt(u)) => visitor.visit_u64(*u),
            Value::Number(n) => visitor.visit_f64(n.as_f64()),
            Value::String(s) => visitor.visit_str(s),
            Value::List(items) => visitor.visit_seq(de::value::SeqDeserializer::new(items.iter().map(ValueDe))),
            Value::Map(_) => self.deserialize_map(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::String(s) if s == "true" => visitor.visit_bool(true),
            Value::String(s) if s == "false" => visitor.visit_bool(false),
            _ => Err(self.mismatch("a bool")),
        }
    }

    int_method!(deserialize_i8, visit_i8, i8);
    int_method!(deserialize_i16, visit_i16, i16);
    int_method!(deserialize_i32, visit_i32, i32);
    int_method!(deserialize_i64, visit_i64, i64);
    int_method!(deserialize_u8, visit_u8, u8);
    int_method!(deserialize_u16, visit_u16, u16);
    int_method!(deserialize_u32, visit_u32, u32);
    int_method!(deserialize_u64, visit_u64, u64);

    // Narrowing to f32 rounds to the nearest f32, which is what asking for an f32 means.
    #[allow(clippy::cast_possible_truncation)]
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f32(self.number()?.as_f64() as f32)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(self.number()?.as_f64())
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // cty converts numbers and bools to strings for string-typed attributes.
        match self.0 {
            Value::String(s) => visitor.visit_str(s),
            Value::Number(n) => visitor.visit_string(n.to_string()),
            Value::Bool(b) => visitor.visit_string(b.to_string()),
            _ => Err(self.mismatch("a string")),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::List(items) => visitor.visit_seq(de::value::SeqDeserializer::new(items.iter().map(ValueDe))),
            Value::Null => visitor.visit_seq(de::value::SeqDeserializer::new(std::iter::empty::<ValueDe>())),
            _ => Err(self.mismatch("a list")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            // Null attributes are "not set": skip them so serde defaults apply.
            Value::Map(map) => visitor.visit_map(de::value::MapDeserializer::new(
                map.iter().filter(|(_, v)| !matches!(v, Value::Null)).map(|(k, v)| (k.as_str(), ValueDe(v))),
            )),
            Value::Null => visitor.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(&str, ValueDe)>())),
            _ => Err(self.mismatch("an object")),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            _ => Err(self.mismatch("a string")),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

impl<'de, 'a> IntoDeserializer<'de, Error> for ValueDe<'a> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}
