//! Typed reading of a request's parameters with Stripe's error for each way a value can be wrong.
//! A handler takes what it knows and then calls [`Reader::finish`], which refuses the rest the way
//! Stripe does (`Received unknown parameter: foo`), so a typo in the worker fails loudly here too.

use std::collections::BTreeMap;

use crate::error::{shorten, ApiError};
use crate::form::{Param, Params};

/// Stripe's metadata limits.
pub const MAX_METADATA_KEYS: usize = 50;
pub const MAX_METADATA_KEY_CHARS: usize = 40;
pub const MAX_METADATA_VALUE_CHARS: usize = 500;

/// What a request asks of an object's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataUpdate {
    /// `metadata=` (empty): remove every key.
    Clear,
    /// Set these keys; an empty value removes its key.
    Set(BTreeMap<String, String>),
}

impl MetadataUpdate {
    /// Applies the update and checks the 50-key limit on the result.
    pub fn apply(self, metadata: &mut BTreeMap<String, String>) -> Result<(), ApiError> {
        let mut next = metadata.clone();
        match self {
            MetadataUpdate::Clear => next.clear(),
            MetadataUpdate::Set(changes) => {
                for (key, value) in changes {
                    if value.is_empty() {
                        next.remove(&key);
                    } else {
                        next.insert(key, value);
                    }
                }
            }
        }
        if next.len() > MAX_METADATA_KEYS {
            return Err(ApiError::invalid_param(
                "metadata",
                format!(
                    "You can have up to {MAX_METADATA_KEYS} metadata keys, but you passed in {}.",
                    next.len()
                ),
            ));
        }
        *metadata = next;
        Ok(())
    }
}

/// Inclusive and exclusive bounds on `created` (`created=N` or `created[gte]=N` ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreatedRange {
    pub gt: Option<i64>,
    pub gte: Option<i64>,
    pub lt: Option<i64>,
    pub lte: Option<i64>,
}

impl CreatedRange {
    /// The smallest and largest `created` allowed, inclusive.
    pub fn bounds(&self) -> (i64, i64) {
        let low = [self.gte, self.gt.map(|v| v.saturating_add(1))]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(i64::MIN);
        let high = [self.lte, self.lt.map(|v| v.saturating_sub(1))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(i64::MAX);
        (low, high)
    }
}

/// Consumes parameters by name.
#[derive(Debug)]
pub struct Reader {
    params: BTreeMap<String, Param>,
    /// For a nested hash (`line_items[0]`): errors name `line_items[0][quantity]`, as Stripe's do.
    prefix: Option<String>,
}

impl Reader {
    pub fn new(params: Params) -> Reader {
        Reader {
            params: params.0,
            prefix: None,
        }
    }

    /// The full name of a parameter read here, for error messages.
    pub fn path(&self, name: &str) -> String {
        match &self.prefix {
            Some(prefix) => format!("{prefix}[{name}]"),
            None => name.to_owned(),
        }
    }

    /// A hash parameter (`payment_intent_data[...]`), read with its own reader.
    pub fn hash(&mut self, name: &str) -> Result<Option<Reader>, ApiError> {
        let path = self.path(name);
        match self.params.remove(name) {
            None => Ok(None),
            Some(Param::Str(s)) if s.is_empty() => Ok(None),
            Some(Param::Map(entries)) => Ok(Some(Reader {
                params: entries,
                prefix: Some(path),
            })),
            Some(_) => Err(ApiError::invalid_param(
                &path,
                format!("Invalid hash: {path} must be a hash"),
            )),
        }
    }

    /// An array of hashes (`line_items[0][...]`, `line_items[1][...]`), in index order, each with
    /// its own reader.
    pub fn hash_list(&mut self, name: &str) -> Result<Vec<Reader>, ApiError> {
        let path = self.path(name);
        let invalid = || ApiError::invalid_param(&path, format!("Invalid array: {path}"));
        let items: Vec<(String, Param)> = match self.params.remove(name) {
            None => return Ok(Vec::new()),
            Some(Param::Str(s)) if s.is_empty() => return Ok(Vec::new()),
            Some(Param::List(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| (i.to_string(), item))
                .collect(),
            Some(Param::Map(entries)) => {
                // `a[0]`, `a[1]`, ... arrive as a hash keyed by index; order by the number.
                let mut indexed = Vec::with_capacity(entries.len());
                for (index, item) in entries {
                    let n: usize = index.parse().map_err(|_| invalid())?;
                    indexed.push((n, index, item));
                }
                indexed.sort_by_key(|(n, _, _)| *n);
                indexed.into_iter().map(|(_, i, item)| (i, item)).collect()
            }
            Some(Param::Str(_)) => return Err(invalid()),
        };
        items
            .into_iter()
            .map(|(index, item)| match item {
                Param::Map(entries) => Ok(Reader {
                    params: entries,
                    prefix: Some(format!("{path}[{index}]")),
                }),
                _ => Err(ApiError::invalid_param(
                    format!("{path}[{index}]"),
                    format!("Invalid hash: {path}[{index}] must be a hash"),
                )),
            })
            .collect()
    }

    /// A string parameter. Stripe treats an empty string as "unset", so it reads as `None`.
    pub fn string(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        let path = self.path(name);
        match self.params.remove(name) {
            None => Ok(None),
            Some(Param::Str(s)) if s.is_empty() => Ok(None),
            Some(Param::Str(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid_param(
                &path,
                format!("Invalid string: {path} must be a string, not a hash or an array"),
            )),
        }
    }

    /// A string on update: `None` when absent, `Some(None)` when sent empty (unset the field).
    pub fn nullable_string(
        &mut self,
        name: &str,
        max_chars: usize,
    ) -> Result<Option<Option<String>>, ApiError> {
        let given = self.params.contains_key(name);
        let value = self.bounded_string(name, max_chars)?;
        Ok(given.then_some(value))
    }

    pub fn required_string(&mut self, name: &str) -> Result<String, ApiError> {
        self.string(name)?
            .ok_or_else(|| ApiError::missing_param(&self.path(name)))
    }

    /// A string limited to `max_chars` characters.
    pub fn bounded_string(
        &mut self,
        name: &str,
        max_chars: usize,
    ) -> Result<Option<String>, ApiError> {
        let value = self.string(name)?;
        if let Some(text) = &value {
            if text.chars().count() > max_chars {
                let path = self.path(name);
                return Err(ApiError::invalid_param(
                    &path,
                    format!("Invalid string: {path} must be at most {max_chars} characters"),
                ));
            }
        }
        Ok(value)
    }

    /// A decimal integer that fits in i64; anything else (`1.5`, `1e3`, 30 digits) is Stripe's
    /// "Invalid integer".
    pub fn integer(&mut self, name: &str) -> Result<Option<i64>, ApiError> {
        let path = self.path(name);
        match self.params.remove(name) {
            None => Ok(None),
            Some(Param::Str(s)) => parse_integer(&path, &s).map(Some),
            Some(_) => Err(invalid_integer(&path, "a hash or an array")),
        }
    }

    pub fn boolean(&mut self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.params.remove(name) {
            None => Ok(None),
            Some(Param::Str(s)) => match s.as_str() {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                other => Err(ApiError::invalid_param(
                    name,
                    format!("Invalid boolean: {}", shorten(other)),
                )),
            },
            Some(_) => Err(ApiError::invalid_param(
                name,
                "Invalid boolean: a hash or an array",
            )),
        }
    }

    /// `limit`: 1..=100, default 10.
    pub fn limit(&mut self) -> Result<usize, ApiError> {
        match self.integer("limit")? {
            None => Ok(10),
            Some(n) if (1..=100).contains(&n) => Ok(n as usize),
            Some(n) if n < 1 => Err(ApiError::invalid_param(
                "limit",
                "This value must be greater than or equal to 1.",
            )),
            Some(_) => Err(ApiError::invalid_param(
                "limit",
                "This value must be less than or equal to 100.",
            )),
        }
    }

    /// `metadata[...]`, checked against Stripe's limits.
    pub fn metadata(&mut self) -> Result<Option<MetadataUpdate>, ApiError> {
        let name = self.path("metadata");
        let entries = match self.params.remove("metadata") {
            None => return Ok(None),
            Some(Param::Str(s)) if s.is_empty() => return Ok(Some(MetadataUpdate::Clear)),
            Some(Param::Map(entries)) => entries,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    &name,
                    format!("Invalid hash: {name} must be a hash of string keys and values"),
                ))
            }
        };
        if entries.len() > MAX_METADATA_KEYS {
            return Err(ApiError::invalid_param(
                &name,
                format!(
                    "You can have up to {MAX_METADATA_KEYS} metadata keys, but you passed in {}.",
                    entries.len()
                ),
            ));
        }
        let mut out = BTreeMap::new();
        for (key, value) in entries {
            let param = format!("{name}[{}]", shorten(&key));
            let Param::Str(value) = value else {
                return Err(ApiError::invalid_param(
                    param,
                    "Metadata values must be strings, not hashes or arrays.",
                ));
            };
            if key.chars().count() > MAX_METADATA_KEY_CHARS {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "Keys for metadata can have up to {MAX_METADATA_KEY_CHARS} characters, but you passed in a key that is {} characters. Invalid key: {}",
                        key.chars().count(),
                        shorten(&key)
                    ),
                ));
            }
            if value.chars().count() > MAX_METADATA_VALUE_CHARS {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "Metadata values can have up to {MAX_METADATA_VALUE_CHARS} characters, but you passed in a value that is {} characters.",
                        value.chars().count()
                    ),
                ));
            }
            out.insert(key, value);
        }
        Ok(Some(MetadataUpdate::Set(out)))
    }

    /// `created`, either an exact value or a hash of `gt`, `gte`, `lt`, `lte`.
    pub fn created(&mut self) -> Result<CreatedRange, ApiError> {
        match self.params.remove("created") {
            None => Ok(CreatedRange::default()),
            Some(Param::Str(s)) => {
                let at = parse_integer("created", &s)?;
                Ok(CreatedRange {
                    gte: Some(at),
                    lte: Some(at),
                    ..CreatedRange::default()
                })
            }
            Some(Param::Map(bounds)) => {
                let mut range = CreatedRange::default();
                for (op, value) in bounds {
                    let param = format!("created[{}]", shorten(&op));
                    let value = match value {
                        Param::Str(s) => parse_integer(&param, &s)?,
                        _ => return Err(invalid_integer(&param, "a hash or an array")),
                    };
                    match op.as_str() {
                        "gt" => range.gt = Some(value),
                        "gte" => range.gte = Some(value),
                        "lt" => range.lt = Some(value),
                        "lte" => range.lte = Some(value),
                        _ => return Err(ApiError::unknown_param(&param)),
                    }
                }
                Ok(range)
            }
            Some(Param::List(_)) => Err(invalid_integer("created", "an array")),
        }
    }

    /// Every value given for a list parameter (`types[]=a&types[]=b`).
    pub fn string_list(&mut self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.params.remove(name) {
            None => Ok(Vec::new()),
            Some(Param::Str(s)) if s.is_empty() => Ok(Vec::new()),
            Some(Param::List(items)) => items
                .into_iter()
                .map(|item| match item {
                    Param::Str(s) => Ok(s),
                    _ => Err(ApiError::invalid_param(name, "Invalid array")),
                })
                .collect(),
            // The official SDKs send arrays with indexes: `types[0]=a&types[1]=b`.
            Some(Param::Map(entries)) => {
                let mut indexed = Vec::with_capacity(entries.len());
                for (index, item) in entries {
                    match (index.parse::<usize>(), item) {
                        (Ok(n), Param::Str(s)) => indexed.push((n, s)),
                        _ => return Err(ApiError::invalid_param(name, "Invalid array")),
                    }
                }
                indexed.sort_by_key(|(n, _)| *n);
                Ok(indexed.into_iter().map(|(_, s)| s).collect())
            }
            Some(_) => Err(ApiError::invalid_param(name, "Invalid array")),
        }
    }

    /// Whether the request names this parameter at all (read or not yet).
    pub fn has(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// Parameters Stripe accepts that change nothing here (`expand[]`, `return_url`, ...).
    pub fn ignore(&mut self, names: &[&str]) {
        for name in names {
            self.params.remove(*name);
        }
    }

    /// Refuses whatever was not read.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.params.into_iter().next() {
            None => Ok(()),
            Some((name, value)) => {
                let name = match &self.prefix {
                    Some(prefix) => format!("{prefix}[{name}]"),
                    None => name,
                };
                Err(ApiError::unknown_param(&first_leaf(&name, &value)))
            }
        }
    }
}

/// `created[foo]` rather than just `created`, so the message points at the exact typo.
fn first_leaf(name: &str, value: &Param) -> String {
    match value {
        Param::Map(children) => match children.iter().next() {
            Some((child, inner)) => first_leaf(&format!("{name}[{child}]"), inner),
            None => name.to_owned(),
        },
        _ => shorten(name),
    }
}

pub fn parse_integer(name: &str, text: &str) -> Result<i64, ApiError> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid_integer(name, text));
    }
    text.parse::<i64>().map_err(|_| invalid_integer(name, text))
}

fn invalid_integer(name: &str, text: &str) -> ApiError {
    ApiError::invalid_param(name, format!("Invalid integer: {}", shorten(text)))
        .with_code("parameter_invalid_integer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::form::parse;

    fn reader(input: &str) -> Reader {
        Reader::new(parse(input.as_bytes()).expect("valid form"))
    }

    #[test]
    fn integers() {
        let cases = [
            ("amount=2000", Ok(Some(2000))),
            ("amount=-5", Ok(Some(-5))),
            ("x=1", Ok(None)),
            ("amount=1.5", Err("Invalid integer: 1.5")),
            ("amount=1e3", Err("Invalid integer: 1e3")),
            ("amount=", Err("Invalid integer: ")),
            ("amount=-", Err("Invalid integer: -")),
            ("amount=%2B5", Err("Invalid integer: +5")),
            ("amount=+5", Err("Invalid integer:  5")),
            (
                "amount=99999999999999999999999",
                Err("Invalid integer: 99999999999999999999999"),
            ),
            ("amount[a]=1", Err("Invalid integer: a hash or an array")),
        ];
        for (input, expected) in cases {
            let got = reader(input).integer("amount");
            match expected {
                Ok(v) => assert_eq!(got, Ok(v), "{input}"),
                Err(message) => {
                    let error = got.expect_err(input);
                    assert_eq!(error.message, message, "{input}");
                    assert_eq!(error.param.as_deref(), Some("amount"));
                }
            }
        }
    }

    #[test]
    fn created_ranges() {
        let mut r = reader("created[gte]=10&created[lt]=20");
        assert_eq!(r.created().expect("valid").bounds(), (10, 19));
        let mut r = reader("created=15");
        assert_eq!(r.created().expect("valid").bounds(), (15, 15));
        let mut r = reader("created[gt]=9223372036854775807");
        assert_eq!(r.created().expect("valid").bounds(), (i64::MAX, i64::MAX));
        let mut r = reader("created[since]=1");
        assert_eq!(
            r.created().expect_err("unknown").param.as_deref(),
            Some("created[since]")
        );
    }

    #[test]
    fn metadata_rules() {
        let mut r = reader("metadata[a]=1&metadata[b]=");
        let update = r.metadata().expect("valid").expect("given");
        let mut m = BTreeMap::from([("b".to_owned(), "old".to_owned())]);
        update.apply(&mut m).expect("applies");
        assert_eq!(m, BTreeMap::from([("a".to_owned(), "1".to_owned())]));

        let long_key = "k".repeat(41);
        let error = reader(&format!("metadata[{long_key}]=v"))
            .metadata()
            .expect_err("too long");
        assert_eq!(error.param, Some(format!("metadata[{long_key}]")));

        let error = reader(&format!("metadata[k]={}", "v".repeat(501)))
            .metadata()
            .expect_err("too long");
        assert_eq!(error.param.as_deref(), Some("metadata[k]"));

        let many: Vec<String> = (0..51).map(|i| format!("metadata[k{i}]=v")).collect();
        assert!(reader(&many.join("&")).metadata().is_err());
        assert!(reader("metadata[a][b]=1").metadata().is_err());
        assert_eq!(
            reader("metadata=").metadata(),
            Ok(Some(MetadataUpdate::Clear))
        );
    }

    #[test]
    fn nested_hashes_and_indexed_lists() {
        let mut r = reader(
            "items[10][q]=c&items[2][q]=b&items[0][q]=a&items[0][x][y]=1&types[1]=t1&types[0]=t0",
        );
        let mut items = r.hash_list("items").expect("a list");
        assert_eq!(
            r.string_list("types").expect("a list"),
            ["t0", "t1"],
            "in index order"
        );
        let got: Vec<String> = items
            .iter_mut()
            .map(|i| i.string("q").expect("string").expect("given"))
            .collect();
        assert_eq!(got, ["a", "b", "c"], "10 after 2");
        let first = &mut items[0];
        assert_eq!(first.path("q"), "items[0][q]");
        let mut nested = first.hash("x").expect("hash").expect("given");
        assert_eq!(nested.integer("z"), Ok(None), "absent is fine at any depth");
        assert_eq!(
            nested.finish().expect_err("y unread").param.as_deref(),
            Some("items[0][x][y]")
        );
        assert!(reader("items[a][q]=1").hash_list("items").is_err());
        assert!(reader("items[0]=1").hash_list("items").is_err());
        let error = reader("items[0][n]=1.5")
            .hash_list("items")
            .expect("a list")[0]
            .integer("n")
            .expect_err("not an integer");
        assert_eq!(error.param.as_deref(), Some("items[0][n]"));
    }

    #[test]
    fn unknown_parameters_are_named() {
        let mut r = reader("amount=1&created[foo][bar]=2");
        r.integer("amount").expect("valid");
        assert_eq!(
            r.finish().expect_err("unknown").param.as_deref(),
            Some("created[foo][bar]")
        );
    }
}
