//! The cty-msgpack codec: what go-cty's `msgpack.Marshal` produces for plugin
//! and task configuration, decoded leniently, and encoded byte for byte.
//!
//! No I/O lives here. Facts from go-cty `cty/msgpack/marshal.go` and
//! `unmarshal.go` (summarised in shared/nomad-wire.md §4.2).

mod de;
mod number;

use std::collections::BTreeMap;

pub use de::{from_value, DecodeError};
pub use number::Number;

/// Nesting deeper than this is refused; our schemas are three levels deep.
const MAX_DEPTH: usize = 64;

/// A cty value as it travels in msgpack.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    /// Lists, sets and tuples.
    List(Vec<Value>),
    /// Maps and objects; keys sorted in byte order like Go's `sort.Strings`.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// Shorthand for an object value.
    pub fn object<const N: usize>(pairs: [(&str, Value); N]) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    /// Shorthand for a string value.
    pub fn str(s: &str) -> Value {
        Value::String(s.to_string())
    }

    /// Shorthand for an integer value.
    pub fn int(i: i64) -> Value {
        Value::Number(Number::Int(i))
    }
}

/// Errors decoding cty-msgpack. `at` is the attribute path (`hf_cache.min_free`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CtyError {
    #[error("msgpack ends early at byte {offset}")]
    Truncated { offset: usize },
    #[error("unexpected msgpack marker 0x{marker:02x} at byte {offset} ({at})")]
    UnsupportedMarker { marker: u8, offset: usize, at: String },
    #[error("{at}: the value is unknown (cty unknown-value extension); it must be known when the configuration is evaluated")]
    UnknownValue { at: String },
    #[error("{at}: string is not valid UTF-8")]
    InvalidUtf8 { at: String },
    #[error("{at}: map key is not a string")]
    NonStringKey { at: String },
    #[error("invalid number {text:?}")]
    InvalidNumber { text: String },
    #[error("{at}: nesting deeper than {MAX_DEPTH} levels")]
    TooDeep { at: String },
    #[error("{count} trailing bytes after the value")]
    TrailingBytes { count: usize },
}

/// Decodes one cty-msgpack value. Empty input (Nomad's "no config") is null.
pub fn decode(bytes: &[u8]) -> Result<Value, CtyError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let mut r = Reader { buf: bytes, pos: 0, path: Vec::new() };
    let v = r.value()?;
    if r.pos != bytes.len() {
        return Err(CtyError::TrailingBytes { count: bytes.len() - r.pos });
    }
    Ok(v)
}

/// Encodes a value exactly as go-cty would (compact ints, float64, sorted keys).
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_value(&mut out, v);
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: Vec<String>,
}

impl Reader<'_> {
    fn at(&self) -> String {
        if self.path.is_empty() {
            "(root)".into()
        } else {
            self.path.join(".")
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CtyError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(CtyError::Truncated { offset: self.buf.len() })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next `N` bytes as an array (for the `from_be_bytes` constructors).
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], CtyError> {
        let offset = self.buf.len();
        <[u8; N]>::try_from(self.take(N)?).map_err(|_| CtyError::Truncated { offset })
    }

    /// A 32-bit msgpack length. It cannot exceed `usize` on the targets we build for;
    /// if it did, no buffer could hold that many bytes, so it reads as truncated.
    fn len32(&mut self) -> Result<usize, CtyError> {
        let n = u32::from_be_bytes(self.bytes()?);
        usize::try_from(n).map_err(|_| CtyError::Truncated { offset: self.buf.len() })
    }

    fn value(&mut self) -> Result<Value, CtyError> {
        if self.path.len() > MAX_DEPTH {
            return Err(CtyError::TooDeep { at: self.at() });
        }
        let offset = self.pos;
        let m = self.take(1)?[0];
        let num = |n: Number| Ok(Value::Number(n));
        match m {
            0x00..=0x7f => num(Number::Int(i64::from(m))),
            0x80..=0x8f => self.map(usize::from(m & 0x0f)),
            0x90..=0x9f => self.list(usize::from(m & 0x0f)),
            0xa0..=0xbf => self.string(usize::from(m & 0x1f)),
            0xc0 => Ok(Value::Null),
            0xc2 => Ok(Value::Bool(false)),
            0xc3 => Ok(Value::Bool(true)),
            // bin only appears as the type half of a dynamic wrapper; read it as text.
            0xc4 | 0xd9 => {
                let n = usize::from(u8::from_be_bytes(self.bytes()?));
                self.string(n)
            }
            0xc5 | 0xda => {
                let n = usize::from(u16::from_be_bytes(self.bytes()?));
                self.string(n)
            }
            0xc6 | 0xdb => {
                let n = self.len32()?;
                self.string(n)
            }
            0xca => num(Number::from_f64(f64::from(f32::from_be_bytes(self.bytes()?)))?),
            0xcb => num(Number::from_f64(f64::from_be_bytes(self.bytes()?))?),
            0xcc => num(Number::Int(i64::from(u8::from_be_bytes(self.bytes()?)))),
            0xcd => num(Number::Int(i64::from(u16::from_be_bytes(self.bytes()?)))),
            0xce => num(Number::Int(i64::from(u32::from_be_bytes(self.bytes()?)))),
            0xcf => {
                let u = u64::from_be_bytes(self.bytes()?);
                num(i64::try_from(u).map_or(Number::UInt(u), Number::Int))
            }
            0xd0 => num(Number::Int(i64::from(i8::from_be_bytes(self.bytes()?)))),
            0xd1 => num(Number::Int(i64::from(i16::from_be_bytes(self.bytes()?)))),
            0xd2 => num(Number::Int(i64::from(i32::from_be_bytes(self.bytes()?)))),
            0xd3 => num(Number::Int(i64::from_be_bytes(self.bytes()?))),
            0xdc => {
                let n = usize::from(u16::from_be_bytes(self.bytes()?));
                self.list(n)
            }
            0xdd => {
                let n = self.len32()?;
                self.list(n)
            }
            0xde => {
                let n = usize::from(u16::from_be_bytes(self.bytes()?));
                self.map(n)
            }
            0xdf => {
                let n = self.len32()?;
                self.map(n)
            }
            // fixext1..16, ext8/16/32: go-cty uses extensions only for unknown values.
            0xd4..=0xd8 | 0xc7..=0xc9 => Err(CtyError::UnknownValue { at: self.at() }),
            // Negative fixint: the marker byte is the two's-complement value itself.
            0xe0..=0xff => num(Number::Int(i64::from(i8::from_be_bytes([m])))),
            0xc1 => Err(CtyError::UnsupportedMarker { marker: m, offset, at: self.at() }),
        }
    }

    fn string(&mut self, n: usize) -> Result<Value, CtyError> {
        let at = self.at();
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| CtyError::InvalidUtf8 { at })?;
        Ok(Value::String(s.to_string()))
    }

    fn list(&mut self, n: usize) -> Result<Value, CtyError> {
        // Each element takes at least one byte: refuse impossible lengths before allocating.
        if n > self.buf.len() - self.pos {
            return Err(CtyError::Truncated { offset: self.buf.len() });
        }
        // A value whose declared type is dynamic travels as [bin(type-json), value];
        // go-cty never writes bin otherwise, so the marker identifies the wrapper.
        if n == 2 && matches!(self.buf.get(self.pos), Some(0xc4..=0xc6)) {
            let _type_json = self.value()?;
            return self.value();
        }
        let mut items = Vec::with_capacity(n);
        for i in 0..n {
            self.path.push(i.to_string());
            let item = self.value();
            self.path.pop();
            items.push(item?);
        }
        Ok(Value::List(items))
    }

    fn map(&mut self, n: usize) -> Result<Value, CtyError> {
        if n > self.buf.len() - self.pos {
            return Err(CtyError::Truncated { offset: self.buf.len() });
        }
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let key = match self.value()? {
                Value::String(k) => k,
                _ => return Err(CtyError::NonStringKey { at: self.at() }),
            };
            self.path.push(key.clone());
            let v = self.value();
            self.path.pop();
            map.insert(key, v?);
        }
        Ok(Value::Map(map))
    }
}

fn write_len(out: &mut Vec<u8>, n: usize, fix: u8, fix_max: u8, m8: Option<u8>, m16: u8, m32: u8) {
    if let Ok(b) = u8::try_from(n) {
        if b < fix_max {
            out.push(fix | b);
            return;
        }
        if let Some(m) = m8 {
            out.extend([m, b]);
            return;
        }
    }
    if let Ok(h) = u16::try_from(n) {
        out.push(m16);
        out.extend(h.to_be_bytes());
        return;
    }
    // msgpack has no length wider than 32 bits: a longer string, list or map cannot be
    // encoded at all (go-cty fails the same way). Writing a truncated length would
    // silently corrupt the stream, so this is a bug in the caller.
    let w = u32::try_from(n).expect("cty-msgpack cannot encode a string, list or map of 4 GiB entries or more");
    out.push(m32);
    out.extend(w.to_be_bytes());
}

fn write_uint(out: &mut Vec<u8>, u: u64) {
    if let Ok(b) = u8::try_from(u) {
        if b <= 127 {
            out.push(b);
        } else {
            out.extend([0xcc, b]);
        }
    } else if let Ok(h) = u16::try_from(u) {
        out.push(0xcd);
        out.extend(h.to_be_bytes());
    } else if let Ok(w) = u32::try_from(u) {
        out.push(0xce);
        out.extend(w.to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend(u.to_be_bytes());
    }
}

fn write_int(out: &mut Vec<u8>, i: i64) {
    if let Ok(u) = u64::try_from(i) {
        return write_uint(out, u);
    }
    if let Ok(b) = i8::try_from(i) {
        // -32..=-1 is a negative fixint: the two's-complement byte is the marker.
        if b < -32 {
            out.push(0xd0);
        }
        out.extend(b.to_be_bytes());
    } else if let Ok(h) = i16::try_from(i) {
        out.push(0xd1);
        out.extend(h.to_be_bytes());
    } else if let Ok(w) = i32::try_from(i) {
        out.push(0xd2);
        out.extend(w.to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend(i.to_be_bytes());
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    write_len(out, s.len(), 0xa0, 32, Some(0xd9), 0xda, 0xdb);
    out.extend(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(0xc0),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Number(Number::Int(i)) => write_int(out, *i),
        Value::Number(Number::UInt(u)) => write_uint(out, *u),
        Value::Number(Number::Float(f)) => {
            out.push(0xcb);
            out.extend(f.to_bits().to_be_bytes());
        }
        Value::Number(Number::Decimal(s)) => write_str(out, s),
        Value::String(s) => write_str(out, s),
        Value::List(items) => {
            write_len(out, items.len(), 0x90, 16, None, 0xdc, 0xdd);
            items.iter().for_each(|i| write_value(out, i));
        }
        Value::Map(map) => {
            write_len(out, map.len(), 0x80, 16, None, 0xde, 0xdf);
            for (k, v) in map {
                write_str(out, k);
                write_value(out, v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
