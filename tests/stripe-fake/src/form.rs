//! Stripe's request encoding: `application/x-www-form-urlencoded` with bracket notation
//! (`metadata[order_ref]=o-1`, `created[gte]=1700000000`, `expand[]=latest_charge`), parsed into a
//! tree. Parsing never panics on any input: every problem is a [`FormError`] naming the parameter.

use std::collections::BTreeMap;

use serde::Serialize;

/// Stripe nests at most a few levels (`a[b][c]`); deeper names are refused before they cost memory.
pub const MAX_DEPTH: usize = 5;
/// Far beyond any real request (Stripe allows 50 metadata keys), small enough to bound the work.
pub const MAX_PAIRS: usize = 5_000;

/// One parameter value: a string, a nested map (`a[b]=...`) or a list (`a[]=...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Param {
    Str(String),
    Map(BTreeMap<String, Param>),
    List(Vec<Param>),
}

/// A whole request's parameters. Ordered, so that its JSON form is canonical: two requests with the
/// same parameters in any order have the same fingerprint for idempotency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Params(pub BTreeMap<String, Param>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("Invalid UTF-8 in the request's parameter {0}")]
    InvalidUtf8(String),
    #[error("Invalid parameter name: {0}")]
    BadName(String),
    #[error("Parameter {0} is nested more than {MAX_DEPTH} levels deep")]
    TooDeep(String),
    #[error("Parameter {0} is given both as a value and as a hash or array")]
    Conflict(String),
    #[error("The request has more than {MAX_PAIRS} parameters")]
    TooMany,
}

impl FormError {
    /// The parameter to name in Stripe's error object.
    pub fn param(&self) -> Option<&str> {
        match self {
            FormError::InvalidUtf8(p)
            | FormError::BadName(p)
            | FormError::TooDeep(p)
            | FormError::Conflict(p) => Some(p),
            FormError::TooMany => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment<'a> {
    Key(&'a str),
    /// `[]`: append to a list.
    Push,
}

/// Parses one encoded string (a query string or a request body).
pub fn parse(input: &[u8]) -> Result<Params, FormError> {
    let mut params = Params::default();
    parse_into(&mut params, input)?;
    Ok(params)
}

/// Parses into existing parameters (a POST's query string, then its body). A repeated scalar keeps
/// the last value, as Stripe's Rack-style parser does.
pub fn parse_into(params: &mut Params, input: &[u8]) -> Result<(), FormError> {
    let mut pairs = 0usize;
    for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        pairs += 1;
        if pairs > MAX_PAIRS {
            return Err(FormError::TooMany);
        }
        let (raw_name, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let name = decode(raw_name)
            .map_err(|lossy| FormError::InvalidUtf8(crate::error::shorten(&lossy)))?;
        let value = decode(raw_value).map_err(|_| FormError::InvalidUtf8(shown(&name)))?;
        let (base, segments) = parse_name(&name)?;
        insert(&mut params.0, &name, base, &segments, value)?;
    }
    Ok(())
}

/// Percent-decoding with `+` as space. A `%` not followed by two hex digits is kept literally, as
/// browsers and Stripe do. Invalid UTF-8 comes back as the lossy text, for the error message.
fn decode(raw: &[u8]) -> Result<String, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => match (raw.get(i + 1).and_then(hex), raw.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn shown(name: &str) -> String {
    crate::error::shorten(name)
}

/// `a[b][]` → (`a`, [Key("b"), Push]).
fn parse_name(name: &str) -> Result<(&str, Vec<Segment<'_>>), FormError> {
    let bad = || FormError::BadName(shown(name));
    let (base, mut rest) = match name.find('[') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    };
    if base.is_empty() || base.contains(']') {
        return Err(bad());
    }
    let mut segments = Vec::new();
    while !rest.is_empty() {
        let inner_and_rest = rest.strip_prefix('[').ok_or_else(bad)?;
        let close = inner_and_rest.find(']').ok_or_else(bad)?;
        let inner = &inner_and_rest[..close];
        if inner.contains('[') {
            return Err(bad());
        }
        if segments.len() == MAX_DEPTH {
            return Err(FormError::TooDeep(shown(name)));
        }
        segments.push(if inner.is_empty() {
            Segment::Push
        } else {
            Segment::Key(inner)
        });
        rest = &inner_and_rest[close + 1..];
    }
    // `a[][b]` (lists of hashes) is valid Stripe but used by no endpoint here: refuse it plainly.
    if segments[..segments.len().saturating_sub(1)].contains(&Segment::Push) {
        return Err(bad());
    }
    Ok((base, segments))
}

fn insert(
    map: &mut BTreeMap<String, Param>,
    full_name: &str,
    key: &str,
    segments: &[Segment<'_>],
    value: String,
) -> Result<(), FormError> {
    let conflict = || FormError::Conflict(shown(full_name));
    match segments.split_first() {
        None => match map.get_mut(key) {
            Some(Param::Str(existing)) => {
                *existing = value;
                Ok(())
            }
            Some(_) => Err(conflict()),
            None => {
                map.insert(key.to_owned(), Param::Str(value));
                Ok(())
            }
        },
        Some((Segment::Push, [])) => {
            match map
                .entry(key.to_owned())
                .or_insert_with(|| Param::List(Vec::new()))
            {
                Param::List(items) => {
                    items.push(Param::Str(value));
                    Ok(())
                }
                _ => Err(conflict()),
            }
        }
        Some((Segment::Key(inner), rest)) => {
            match map
                .entry(key.to_owned())
                .or_insert_with(|| Param::Map(BTreeMap::new()))
            {
                Param::Map(children) => insert(children, full_name, inner, rest, value),
                _ => Err(conflict()),
            }
        }
        // parse_name only lets `[]` come last.
        Some((Segment::Push, _)) => Err(FormError::BadName(shown(full_name))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(input: &str) -> Result<serde_json::Value, FormError> {
        parse(input.as_bytes()).map(|p| serde_json::to_value(p).expect("params are JSON"))
    }

    #[test]
    fn table() {
        let cases: Vec<(&str, Result<serde_json::Value, FormError>)> = vec![
            ("", Ok(json!({}))),
            (
                "amount=2000&currency=usd",
                Ok(json!({"amount": "2000", "currency": "usd"})),
            ),
            (
                "metadata[order_ref]=o-1&metadata[x]=y",
                Ok(json!({"metadata": {"order_ref": "o-1", "x": "y"}})),
            ),
            (
                "created[gte]=10&created[lt]=20",
                Ok(json!({"created": {"gte": "10", "lt": "20"}})),
            ),
            ("expand[]=a&expand[]=b", Ok(json!({"expand": ["a", "b"]}))),
            ("a[b][c]=1", Ok(json!({"a": {"b": {"c": "1"}}}))),
            (
                "description=hello+world%21",
                Ok(json!({"description": "hello world!"})),
            ),
            ("metadata%5Bk%5D=v", Ok(json!({"metadata": {"k": "v"}}))),
            ("d=100%", Ok(json!({"d": "100%"}))),
            ("d=%zz%4", Ok(json!({"d": "%zz%4"}))),
            ("d=caf%C3%A9", Ok(json!({"d": "café"}))),
            ("flag", Ok(json!({"flag": ""}))),
            ("a=1&a=2", Ok(json!({"a": "2"}))),
            ("&&a=1&", Ok(json!({"a": "1"}))),
            ("metadata=", Ok(json!({"metadata": ""}))),
            ("=1", Err(FormError::BadName(String::new()))),
            ("[a]=1", Err(FormError::BadName("[a]".into()))),
            ("a[b=1", Err(FormError::BadName("a[b".into()))),
            ("a]=1", Err(FormError::BadName("a]".into()))),
            ("a[b]c=1", Err(FormError::BadName("a[b]c".into()))),
            ("a[[b]]=1", Err(FormError::BadName("a[[b]]".into()))),
            ("a[][b]=1", Err(FormError::BadName("a[][b]".into()))),
            (
                "a[1][2][3][4][5][6]=x",
                Err(FormError::TooDeep("a[1][2][3][4][5][6]".into())),
            ),
            ("a=1&a[b]=2", Err(FormError::Conflict("a[b]".into()))),
            ("a[b]=2&a=1", Err(FormError::Conflict("a".into()))),
            ("a[]=1&a[b]=2", Err(FormError::Conflict("a[b]".into()))),
            ("d=%FF", Err(FormError::InvalidUtf8("d".into()))),
            ("%FF=1", Err(FormError::InvalidUtf8("\u{FFFD}".into()))),
        ];
        for (input, expected) in cases {
            assert_eq!(parsed(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn too_many_pairs() {
        let input = "a=1&".repeat(MAX_PAIRS + 1);
        assert_eq!(parse(input.as_bytes()), Err(FormError::TooMany));
    }

    #[test]
    fn order_does_not_change_the_canonical_form() {
        let a = parse(b"b=2&metadata[y]=1&a=1&metadata[x]=2").expect("valid");
        let b = parse(b"metadata[x]=2&a=1&metadata[y]=1&b=2").expect("valid");
        assert_eq!(
            serde_json::to_string(&a).expect("json"),
            serde_json::to_string(&b).expect("json")
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = parse(&bytes);
            }

            #[test]
            fn bracket_soup_never_panics(input in "[a-c\\[\\]=&%+0-9A-F]{0,120}") {
                let _ = parse(input.as_bytes());
            }

            #[test]
            fn simple_pairs_round_trip(key in "[a-z_]{1,12}", sub in "[a-z_]{1,12}", value in "\\PC{0,40}") {
                let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
                let params = parse(format!("{key}[{sub}]={encoded}").as_bytes()).expect("valid");
                let mut inner = BTreeMap::new();
                inner.insert(sub.clone(), Param::Str(value.clone()));
                prop_assert_eq!(params.0.get(&key), Some(&Param::Map(inner)));
            }
        }
    }
}
