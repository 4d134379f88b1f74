//! Canonical JSON in the style of RFC 8785 (JCS): object members sorted by the UTF-16 code units of
//! their names at every depth, no insignificant whitespace, one spelling for every string and number.
//!
//! A small parser of our own keeps number lexemes exactly: jsonb's numbers are arbitrary-precision
//! decimals, and going through `f64` would give two different amounts the same key. Equal values
//! written differently (`1.50` and `1.5`, `1e2` and `100`) get the same spelling; RFC 8785's
//! ECMAScript form is used, with exact digits where a double would round.

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalJsonError {
    #[error("invalid JSON at byte {offset}: {what}")]
    Invalid { offset: usize, what: &'static str },
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("duplicate object key {0:?}")]
    DuplicateKey(String),
}

/// Deep enough for any real payload, shallow enough that recursion can never exhaust the stack.
pub const MAX_DEPTH: usize = 128;

/// Returns the canonical text of a JSON document.
pub fn canonicalize(text: &str) -> Result<String, CanonicalJsonError> {
    let mut parser = Parser {
        text: text.as_bytes(),
        pos: 0,
    };
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.pos != parser.text.len() {
        return Err(parser.error("trailing characters after the document"));
    }
    let mut out = String::with_capacity(text.len());
    write_value(&value, &mut out);
    Ok(out)
}

enum Value {
    Null,
    Bool(bool),
    Number(Decimal),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> CanonicalJsonError {
        CanonicalJsonError::Invalid {
            offset: self.pos,
            what,
        }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.text.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn expect_literal(&mut self, literal: &'static str) -> Result<(), CanonicalJsonError> {
        if self.text[self.pos..].starts_with(literal.as_bytes()) {
            self.pos += literal.len();
            Ok(())
        } else {
            Err(self.error("unknown literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, CanonicalJsonError> {
        if depth > MAX_DEPTH {
            return Err(CanonicalJsonError::TooDeep);
        }
        self.skip_whitespace();
        match self.peek() {
            None => Err(self.error("unexpected end of input")),
            Some(b'n') => self.expect_literal("null").map(|_| Value::Null),
            Some(b't') => self.expect_literal("true").map(|_| Value::Bool(true)),
            Some(b'f') => self.expect_literal("false").map(|_| Value::Bool(false)),
            Some(b'"') => self.string().map(Value::String),
            Some(b'[') => self.array(depth),
            Some(b'{') => self.object(depth),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, CanonicalJsonError> {
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']' in array")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, CanonicalJsonError> {
        self.pos += 1;
        let mut members: Vec<(String, Value)> = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a string key in object"));
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':' after object key"));
            }
            self.pos += 1;
            let value = self.value(depth + 1)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.error("expected ',' or '}' in object")),
            }
        }
        members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        if let Some(pair) = members.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(CanonicalJsonError::DuplicateKey(pair[0].0.clone()));
        }
        Ok(Value::Object(members))
    }

    fn string(&mut self) -> Result<String, CanonicalJsonError> {
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            let start = self.pos;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            let run = std::str::from_utf8(&self.text[start..self.pos])
                .map_err(|_| self.error("string is not valid UTF-8"))?;
            out.push_str(run);
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut out)?;
                }
                Some(_) => return Err(self.error("control character inside a string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), CanonicalJsonError> {
        let c = self
            .peek()
            .ok_or_else(|| self.error("unterminated escape"))?;
        self.pos += 1;
        let decoded = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = self.hex4()?;
                if (0xD800..0xDC00).contains(&high) {
                    if !self.text[self.pos..].starts_with(b"\\u") {
                        return Err(self.error("unpaired surrogate"));
                    }
                    self.pos += 2;
                    let low = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(self.error("unpaired surrogate"));
                    }
                    let code = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                    char::from_u32(code).ok_or_else(|| self.error("invalid code point"))?
                } else {
                    char::from_u32(high).ok_or_else(|| self.error("unpaired surrogate"))?
                }
            }
            _ => return Err(self.error("unknown escape")),
        };
        out.push(decoded);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, CanonicalJsonError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.error("short \\u escape"))?;
        // Four hex digits exactly: `from_str_radix` alone would also take a sign (`\u+041`).
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(self.error("bad \\u escape"));
        }
        let digits = std::str::from_utf8(digits).map_err(|_| self.error("bad \\u escape"))?;
        let code = u32::from_str_radix(digits, 16).map_err(|_| self.error("bad \\u escape"))?;
        self.pos += 4;
        Ok(code)
    }

    fn number(&mut self) -> Result<Decimal, CanonicalJsonError> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let int_start = self.pos;
        self.take_digits();
        let int_digits = &self.text[int_start..self.pos];
        if int_digits.is_empty() || (int_digits.len() > 1 && int_digits[0] == b'0') {
            self.pos = start;
            return Err(self.error("malformed number"));
        }
        let mut frac_digits: &[u8] = &[];
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let frac_start = self.pos;
            self.take_digits();
            frac_digits = &self.text[frac_start..self.pos];
            if frac_digits.is_empty() {
                return Err(self.error("malformed number: no digits after '.'"));
            }
        }
        let mut exponent: i64 = 0;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            let exp_negative = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let exp_start = self.pos;
            self.take_digits();
            let exp_digits = &self.text[exp_start..self.pos];
            if exp_digits.is_empty() || exp_digits.len() > 9 {
                return Err(self.error("malformed or out-of-range exponent"));
            }
            let magnitude: i64 = exp_digits
                .iter()
                .fold(0, |n, d| n * 10 + i64::from(d - b'0'));
            exponent = if exp_negative { -magnitude } else { magnitude };
        }
        Ok(Decimal::new(negative, int_digits, frac_digits, exponent))
    }

    fn take_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }
}

/// An exact decimal: `0.digits × 10^exponent`-style normal form with `digits` free of leading and
/// trailing zeros (empty for zero).
struct Decimal {
    negative: bool,
    digits: String,
    /// The value is `digits × 10^(point - digits.len())`; `point` is where the decimal point sits.
    point: i64,
}

impl Decimal {
    fn new(negative: bool, int_digits: &[u8], frac_digits: &[u8], exponent: i64) -> Decimal {
        let all: String = int_digits
            .iter()
            .chain(frac_digits)
            .map(|&b| b as char)
            .collect();
        let leading = all.len() - all.trim_start_matches('0').len();
        let digits = all.trim_matches('0').to_string();
        let point = int_digits.len() as i64 - leading as i64 + exponent;
        Decimal {
            negative: negative && !digits.is_empty(),
            digits,
            point,
        }
    }

    /// ECMAScript's Number::toString layout (RFC 8785 §3.2.2.3) applied to the exact digits.
    fn write(&self, out: &mut String) {
        if self.digits.is_empty() {
            out.push('0');
            return;
        }
        if self.negative {
            out.push('-');
        }
        let k = self.digits.len() as i64;
        let n = self.point;
        if k <= n && n <= 21 {
            out.push_str(&self.digits);
            out.extend(std::iter::repeat_n('0', (n - k) as usize));
        } else if 0 < n && n <= 21 {
            out.push_str(&self.digits[..n as usize]);
            out.push('.');
            out.push_str(&self.digits[n as usize..]);
        } else if -6 < n && n <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-n) as usize));
            out.push_str(&self.digits);
        } else {
            out.push_str(&self.digits[..1]);
            if k > 1 {
                out.push('.');
                out.push_str(&self.digits[1..]);
            }
            let exponent = n - 1;
            let sign = if exponent >= 0 { "+" } else { "-" };
            let _ = write!(out, "e{sign}{}", exponent.abs());
        }
    }
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => number.write(out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

/// RFC 8785 string form: only `"`, `\` and control characters are escaped.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms() {
        let cases = [
            (r#"{"b":1,"a":2}"#, r#"{"a":2,"b":1}"#),
            (
                " { \"a\" : [ 1 , true , null ] } ",
                r#"{"a":[1,true,null]}"#,
            ),
            (
                r#"{"z":{"y":1,"x":2},"a":{}}"#,
                r#"{"a":{},"z":{"x":2,"y":1}}"#,
            ),
            ("1.50", "1.5"),
            ("1e2", "100"),
            ("100E-2", "1"),
            ("-0", "0"),
            ("-0.0e5", "0"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("1e21", "1e+21"),
            ("123456789012345678901", "123456789012345678901"),
            ("12345678901234567890123", "1.2345678901234567890123e+22"),
            ("99999999.00", "99999999"),
            ("-12.3400", "-12.34"),
            (r#""a\u0041\/\n\u001f""#, "\"aA/\\n\\u001f\""),
            (r#""\ud83d\ude00""#, "\"😀\""),
            (r#""é€""#, "\"é€\""),
            // UTF-16 order, as RFC 8785 asks: the surrogate 0xD83D of U+1F600 sorts before U+FB01.
            (r#"{"ﬁ":1,"😀":2}"#, r#"{"😀":2,"ﬁ":1}"#),
        ];
        for (input, expected) in cases {
            assert_eq!(
                canonicalize(input).as_deref(),
                Ok(expected),
                "input {input}"
            );
        }
    }

    #[test]
    fn rejects_bad_documents() {
        for bad in [
            "",
            "{",
            "[1,]",
            "01",
            "1.",
            "{\"a\":1,\"a\":2}",
            "\"\\ud800\"",
            // Found by fuzzing (fuzz/ canonical_json): a sign inside a \u escape.
            r#""\u+041""#,
            r#""\ud83d\u+e00""#,
            "nul",
            "1 2",
            "\"\u{1}\"",
        ] {
            assert!(canonicalize(bad).is_err(), "accepted {bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(canonicalize(&deep), Err(CanonicalJsonError::TooDeep));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                (-1e12f64..1e12).prop_map(serde_json::Value::from),
                "\\PC{0,12}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map("\\PC{0,6}", inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// `5.0` and `5` are one value: compare numbers as doubles.
        fn as_floats(value: serde_json::Value) -> serde_json::Value {
            match value {
                serde_json::Value::Number(n) => serde_json::Value::from(n.as_f64().unwrap()),
                serde_json::Value::Array(items) => items.into_iter().map(as_floats).collect(),
                serde_json::Value::Object(map) => serde_json::Value::Object(
                    map.into_iter().map(|(k, v)| (k, as_floats(v))).collect(),
                ),
                other => other,
            }
        }

        proptest! {
            #[test]
            fn canonical_output_is_a_fixed_point_and_means_the_same(value in json()) {
                let pretty = serde_json::to_string_pretty(&value).unwrap();
                let canonical = canonicalize(&pretty).unwrap();
                prop_assert_eq!(canonicalize(&canonical).unwrap(), canonical.clone());
                let reparsed: serde_json::Value = serde_json::from_str(&canonical).unwrap();
                prop_assert_eq!(as_floats(reparsed), as_floats(value));
            }

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,64}") {
                let _ = canonicalize(&text);
            }
        }
    }
}
