//! cty numbers: arbitrary-precision decimals on the Go side, kept here in the
//! form go-cty's msgpack encoder would choose for them.

use std::fmt;

use super::CtyError;

/// A cty number in its canonical wire form.
///
/// go-cty (`cty/msgpack/marshal.go`) writes an exact int64/uint64 as an integer,
/// a value exactly representable as float64 as a float, and anything else as
/// the decimal text of `big.Float.Text('f', -1)`.
#[derive(Debug, Clone, PartialEq)]
pub enum Number {
    /// Fits an `i64`.
    Int(i64),
    /// Above `i64::MAX` but fits a `u64`.
    UInt(u64),
    /// Exactly representable as `f64`, not an integer in the ranges above.
    Float(f64),
    /// Any other number, as plain decimal text without exponent.
    Decimal(String),
}

impl Number {
    /// Canonical form of a float read off the wire or produced by a parser.
    // The float-to-int casts run only on whole numbers checked to lie inside the
    // target's range just before, so they are exact (there is no `try_from` for floats).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn from_f64(f: f64) -> Result<Self, CtyError> {
        if f.is_nan() {
            return Err(CtyError::InvalidNumber { text: "NaN".into() });
        }
        if f.fract() == 0.0 && f.is_finite() {
            if (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
                return Ok(Number::Int(f as i64));
            }
            if (0.0..1.844_674_407_370_955_2e19).contains(&f) {
                return Ok(Number::UInt(f as u64));
            }
        }
        Ok(Number::Float(f))
    }

    /// Canonical form of a decimal literal such as `"0.1"`, `"-3"`, `"2.5e3"`.
    pub fn from_decimal(text: &str) -> Result<Self, CtyError> {
        let bad = || CtyError::InvalidNumber { text: text.to_string() };
        let dec = Decimal::parse(text.trim()).ok_or_else(bad)?;
        Ok(dec.canonical())
    }

    /// The value as `f64` (lossy for `Decimal`).
    pub fn as_f64(&self) -> f64 {
        match self {
            Number::Int(i) => *i as f64,
            Number::UInt(u) => *u as f64,
            Number::Float(f) => *f,
            Number::Decimal(s) => s.parse().unwrap_or(f64::NAN),
        }
    }

    /// The value as `i64` when it is a whole number in range.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Number::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as `u64` when it is a non-negative whole number in range.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Number::Int(i) => u64::try_from(*i).ok(),
            Number::UInt(u) => Some(*u),
            _ => None,
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::UInt(u) => write!(f, "{u}"),
            // Rust's Display for f64 is the shortest round-trip text, no exponent.
            Number::Float(x) => write!(f, "{x}"),
            Number::Decimal(s) => f.write_str(s),
        }
    }
}

/// A parsed decimal: `(-1)^neg * digits * 10^exp`, digits without leading zeros.
struct Decimal {
    neg: bool,
    digits: String,
    exp: i64,
}

impl Decimal {
    fn parse(text: &str) -> Option<Self> {
        let (neg, rest) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let (mantissa, exp_part) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let mut exp: i64 = match exp_part {
            Some(e) => e.parse().ok().filter(|e: &i64| e.abs() < 100_000)?,
            None => 0,
        };
        let (int_part, frac_part) = match mantissa.find('.') {
            Some(i) => (&mantissa[..i], &mantissa[i + 1..]),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        if !int_part.bytes().chain(frac_part.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        exp -= i64::try_from(frac_part.len()).ok()?;
        let mut digits: String = format!("{int_part}{frac_part}").trim_start_matches('0').to_string();
        while digits.ends_with('0') {
            digits.pop();
            exp += 1;
        }
        if digits.is_empty() {
            return Some(Decimal { neg: false, digits: "0".into(), exp: 0 });
        }
        Some(Decimal { neg, digits, exp })
    }

    fn canonical(&self) -> Number {
        if self.digits == "0" {
            return Number::Int(0);
        }
        if let Ok(zeros) = usize::try_from(self.exp) {
            if self.digits.len().saturating_add(zeros) <= 20 {
                let text = format!("{}{}", self.digits, "0".repeat(zeros));
                // At most 20 digits, so the magnitude always fits an i128.
                if let Some(mag) = text.parse::<u128>().ok().and_then(|u| i128::try_from(u).ok()) {
                    let signed = if self.neg { -mag } else { mag };
                    if let Ok(i) = i64::try_from(signed) {
                        return Number::Int(i);
                    }
                    if let Ok(u) = u64::try_from(signed) {
                        return Number::UInt(u);
                    }
                }
            }
        }
        if self.exactly_f64() {
            let f: f64 = self.plain_text().parse().unwrap_or(f64::NAN);
            if f.is_finite() {
                return Number::Float(f);
            }
        }
        Number::Decimal(self.plain_text())
    }

    /// True when the value is exactly a binary fraction with a 53-bit odd part.
    /// Decimals of more than 38 significant digits are treated as inexact (they do
    /// not occur in plugin or task configuration).
    fn exactly_f64(&self) -> bool {
        let Ok(d) = self.digits.parse::<u128>() else { return false };
        let (mut odd, mut twos): (u128, i64) = (d, 0);
        if self.exp >= 0 {
            // d * 10^e = d * 5^e * 2^e
            for _ in 0..self.exp {
                odd = match odd.checked_mul(5) {
                    Some(v) => v,
                    None => return false,
                };
            }
            twos += self.exp;
        } else {
            let k = -self.exp;
            for _ in 0..k {
                if odd % 5 != 0 {
                    return false;
                }
                odd /= 5;
            }
            twos -= k;
        }
        while odd % 2 == 0 {
            odd /= 2;
            twos += 1;
        }
        odd < (1u128 << 53) && (-1074..=971).contains(&twos)
    }

    /// `big.Float.Text('f', -1)`-style text: no exponent.
    fn plain_text(&self) -> String {
        let sign = if self.neg { "-" } else { "" };
        if let Ok(zeros) = usize::try_from(self.exp) {
            return format!("{sign}{}{}", self.digits, "0".repeat(zeros));
        }
        // `parse` bounds the exponent by the literal's length plus 100 000, so it fits.
        let k = usize::try_from(self.exp.unsigned_abs()).unwrap_or(usize::MAX);
        if self.digits.len() > k {
            let (i, f) = self.digits.split_at(self.digits.len() - k);
            format!("{sign}{i}.{f}")
        } else {
            format!("{sign}0.{}{}", "0".repeat(k - self.digits.len()), self.digits)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        assert_eq!(Number::from_decimal("300").unwrap(), Number::Int(300));
        assert_eq!(Number::from_decimal("-200").unwrap(), Number::Int(-200));
        assert_eq!(Number::from_decimal("1.5").unwrap(), Number::Float(1.5));
        assert_eq!(Number::from_decimal("2.50").unwrap(), Number::Float(2.5));
        assert_eq!(Number::from_decimal("0.1").unwrap(), Number::Decimal("0.1".into()));
        assert_eq!(Number::from_decimal("1e3").unwrap(), Number::Int(1000));
        assert_eq!(Number::from_decimal("1e-1").unwrap(), Number::Decimal("0.1".into()));
        assert_eq!(Number::from_decimal("18446744073709551615").unwrap(), Number::UInt(u64::MAX));
        assert_eq!(Number::from_decimal("0.000").unwrap(), Number::Int(0));
        assert_eq!(
            Number::from_decimal("100000000000000000000000000000").unwrap(),
            Number::Decimal("100000000000000000000000000000".into())
        );
        assert!(Number::from_decimal("abc").is_err());
        assert!(Number::from_decimal("1.2.3").is_err());
        assert!(Number::from_decimal("").is_err());
        assert!(Number::from_decimal("-").is_err());
    }

    #[test]
    fn floats_canonicalise() {
        assert_eq!(Number::from_f64(3.0).unwrap(), Number::Int(3));
        assert_eq!(Number::from_f64(0.25).unwrap(), Number::Float(0.25));
        assert!(Number::from_f64(f64::NAN).is_err());
        assert_eq!(Number::from_f64(f64::INFINITY).unwrap(), Number::Float(f64::INFINITY));
    }
}
