//! A subset of Stripe's search query language for PaymentIntents: clauses such as
//! `metadata['pgpay_payment_id']:'8c0e...'`, `status:'succeeded'`, `amount>1000`, optionally
//! negated with `-`, joined by `AND` or by `OR` (not both, as Stripe requires).

use crate::payment_intent::PaymentIntent;

/// Stripe allows at most ten clauses.
pub const MAX_CLAUSES: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Metadata(String),
    Status,
    Currency,
    Customer,
    Amount,
    Created,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Text(String),
    Number(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub negated: bool,
    pub field: Field,
    pub op: Op,
    pub value: Literal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub clauses: Vec<Clause>,
    /// Joined by OR rather than AND.
    pub any: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("The search query is empty.")]
    Empty,
    #[error("Invalid search query at position {at}: expected {expected}.")]
    Syntax { at: usize, expected: &'static str },
    #[error("Field '{0}' is an unsupported search field for this resource; use one of amount, created, currency, customer, metadata, status.")]
    UnknownField(String),
    #[error("Field '{0}' does not support this operator or value.")]
    BadOperator(String),
    #[error("Search queries cannot mix AND and OR.")]
    MixedAndOr,
    #[error("Search queries can have at most {MAX_CLAUSES} clauses.")]
    TooManyClauses,
}

pub fn parse(text: &str) -> Result<Query, SearchError> {
    let mut p = Parser {
        text: text.as_bytes(),
        pos: 0,
    };
    p.skip_ws();
    if p.at_end() {
        return Err(SearchError::Empty);
    }
    let mut clauses = vec![p.clause()?];
    let mut joiner: Option<bool> = None;
    loop {
        let had_ws = p.skip_ws();
        if p.at_end() {
            break;
        }
        let any = if had_ws && p.keyword("AND") {
            false
        } else if had_ws && p.keyword("OR") {
            true
        } else {
            return Err(p.expected("AND or OR between clauses"));
        };
        if joiner.is_some_and(|j| j != any) {
            return Err(SearchError::MixedAndOr);
        }
        joiner = Some(any);
        if !p.skip_ws() {
            return Err(p.expected("a space after AND/OR"));
        }
        clauses.push(p.clause()?);
        if clauses.len() > MAX_CLAUSES {
            return Err(SearchError::TooManyClauses);
        }
    }
    Ok(Query {
        clauses,
        any: joiner.unwrap_or(false),
    })
}

impl Query {
    pub fn matches(&self, pi: &PaymentIntent) -> bool {
        let mut results = self.clauses.iter().map(|c| c.matches(pi));
        if self.any {
            results.any(|m| m)
        } else {
            results.all(|m| m)
        }
    }

    /// A metadata equality every match must satisfy, to start from the index instead of a scan.
    pub fn required_metadata(&self) -> Option<(&str, &str)> {
        if self.any && self.clauses.len() > 1 {
            return None;
        }
        self.clauses
            .iter()
            .find_map(|c| match (&c.field, c.op, &c.value, c.negated) {
                (Field::Metadata(key), Op::Eq, Literal::Text(value), false) => {
                    Some((key.as_str(), value.as_str()))
                }
                _ => None,
            })
    }
}

impl Clause {
    fn matches(&self, pi: &PaymentIntent) -> bool {
        let text = |actual: Option<&str>| match &self.value {
            Literal::Text(expected) => actual == Some(expected.as_str()),
            Literal::Number(_) => false,
        };
        let number = |actual: i64| match self.value {
            Literal::Number(expected) => match self.op {
                Op::Eq => actual == expected,
                Op::Gt => actual > expected,
                Op::Gte => actual >= expected,
                Op::Lt => actual < expected,
                Op::Lte => actual <= expected,
            },
            Literal::Text(_) => false,
        };
        let found = match &self.field {
            Field::Metadata(key) => text(pi.metadata.get(key).map(String::as_str)),
            Field::Status => text(Some(pi.status.as_str())),
            Field::Currency => text(Some(pi.currency.as_str())),
            Field::Customer => text(pi.customer.as_deref()),
            Field::Amount => number(pi.amount),
            Field::Created => number(pi.created),
        };
        found != self.negated
    }
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
        self.pos > start
    }

    fn keyword(&mut self, word: &str) -> bool {
        if self.text[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    fn expected(&self, expected: &'static str) -> SearchError {
        SearchError::Syntax {
            at: self.pos,
            expected,
        }
    }

    fn clause(&mut self) -> Result<Clause, SearchError> {
        let negated = self.peek() == Some(b'-');
        if negated {
            self.pos += 1;
        }
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            self.pos += 1;
        }
        let name = String::from_utf8_lossy(&self.text[start..self.pos]).into_owned();
        if name.is_empty() {
            return Err(self.expected("a field name"));
        }
        let field = match name.as_str() {
            "metadata" => {
                if self.peek() != Some(b'[') {
                    return Err(self.expected("[ after metadata"));
                }
                self.pos += 1;
                let key = self.quoted()?;
                if self.peek() != Some(b']') {
                    return Err(self.expected("] after the metadata key"));
                }
                self.pos += 1;
                Field::Metadata(key)
            }
            "status" => Field::Status,
            "currency" => Field::Currency,
            "customer" => Field::Customer,
            "amount" => Field::Amount,
            "created" => Field::Created,
            _ => return Err(SearchError::UnknownField(crate::error::shorten(&name))),
        };
        let op = if self.keyword(":") {
            Op::Eq
        } else if self.keyword(">=") {
            Op::Gte
        } else if self.keyword("<=") {
            Op::Lte
        } else if self.keyword(">") {
            Op::Gt
        } else if self.keyword("<") {
            Op::Lt
        } else {
            return Err(self.expected("one of : > >= < <="));
        };
        let value = match self.peek() {
            Some(b'\'' | b'"') => Literal::Text(self.quoted()?),
            _ => Literal::Number(self.number()?),
        };
        let numeric = matches!(field, Field::Amount | Field::Created);
        let value = match (numeric, value) {
            // Stripe accepts `amount:'1000'` as well as `amount:1000`.
            (true, Literal::Text(t)) => Literal::Number(
                t.parse()
                    .map_err(|_| SearchError::BadOperator(name.clone()))?,
            ),
            (false, Literal::Number(_)) => return Err(SearchError::BadOperator(name)),
            (_, value) => value,
        };
        if !numeric && op != Op::Eq {
            return Err(SearchError::BadOperator(name));
        }
        Ok(Clause {
            negated,
            field,
            op,
            value,
        })
    }

    /// `'...'` or `"..."`, with `\` escaping the next character.
    fn quoted(&mut self) -> Result<String, SearchError> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.expected("a quoted string")),
        };
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.expected("a closing quote")),
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b) => out.push(b),
                        None => return Err(self.expected("a character after \\")),
                    }
                }
                Some(b) if b == quote => {
                    self.pos += 1;
                    break;
                }
                Some(b) => out.push(b),
            }
            self.pos += 1;
        }
        // The input was a &str and escapes only drop ASCII backslashes, so this stays UTF-8.
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn number(&mut self) -> Result<i64, SearchError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
        std::str::from_utf8(&self.text[start..self.pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(SearchError::Syntax {
                at: start,
                expected: "a quoted string or an integer",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payment_intent::Status;

    fn pi() -> PaymentIntent {
        let mut pi =
            PaymentIntent::new("pi_1".into(), "s".into(), 2000, "usd".into(), 1_700_000_000);
        pi.metadata
            .insert("pgpay_payment_id".into(), "8c0e-1".into());
        pi.metadata.insert("order_ref".into(), "it's".into());
        pi.status = Status::Succeeded;
        pi
    }

    #[test]
    fn matching_table() {
        let cases = [
            ("metadata['pgpay_payment_id']:'8c0e-1'", true),
            ("metadata[\"pgpay_payment_id\"]:\"8c0e-1\"", true),
            ("metadata['pgpay_payment_id']:'8c0e-2'", false),
            ("metadata['order_ref']:'it\\'s'", true),
            ("metadata['missing']:'x'", false),
            (
                "status:'succeeded' AND metadata['pgpay_payment_id']:'8c0e-1'",
                true,
            ),
            (
                "status:'canceled' AND metadata['pgpay_payment_id']:'8c0e-1'",
                false,
            ),
            (
                "status:'canceled' OR metadata['pgpay_payment_id']:'8c0e-1'",
                true,
            ),
            ("-status:'canceled'", true),
            ("amount>1999 AND amount<=2000", true),
            ("amount:'2000'", true),
            ("amount>2000", false),
            ("created>=1700000000", true),
            ("currency:'usd'", true),
            ("customer:'cus_1'", false),
            ("  status:'succeeded'  ", true),
        ];
        for (query, expected) in cases {
            let parsed = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
            assert_eq!(parsed.matches(&pi()), expected, "{query}");
        }
    }

    #[test]
    fn errors_table() {
        type Check = fn(&SearchError) -> bool;
        let cases: [(&str, Check); 11] = [
            ("", |e| *e == SearchError::Empty),
            ("   ", |e| *e == SearchError::Empty),
            ("foo:'x'", |e| matches!(e, SearchError::UnknownField(_))),
            ("status:'a' AND status:'b' OR status:'c'", |e| {
                *e == SearchError::MixedAndOr
            }),
            ("status>'a'", |e| matches!(e, SearchError::BadOperator(_))),
            ("status:1", |e| matches!(e, SearchError::BadOperator(_))),
            ("metadata['k':'v'", |e| {
                matches!(e, SearchError::Syntax { .. })
            }),
            ("status:'open", |e| matches!(e, SearchError::Syntax { .. })),
            ("status:'a'status:'b'", |e| {
                matches!(e, SearchError::Syntax { .. })
            }),
            ("amount>99999999999999999999", |e| {
                matches!(e, SearchError::Syntax { .. })
            }),
            ("status:'a' AND", |e| {
                matches!(e, SearchError::Syntax { .. })
            }),
        ];
        for (query, check) in cases {
            let error = parse(query).expect_err(query);
            assert!(check(&error), "{query}: {error:?}");
        }
        let many = ["status:'a'"; MAX_CLAUSES + 1].join(" AND ");
        assert_eq!(parse(&many), Err(SearchError::TooManyClauses));
    }

    #[test]
    fn index_hint() {
        let q = parse("status:'succeeded' AND metadata['k']:'v'").expect("valid");
        assert_eq!(q.required_metadata(), Some(("k", "v")));
        let q = parse("status:'succeeded' OR metadata['k']:'v'").expect("valid");
        assert_eq!(q.required_metadata(), None);
        let q = parse("-metadata['k']:'v'").expect("valid");
        assert_eq!(q.required_metadata(), None);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_queries_never_panic(query in "\\PC{0,80}") {
                let _ = parse(&query);
            }

            #[test]
            fn query_soup_never_panics(query in "(metadata|status|amount|AND|OR|[\\[\\]'\":<>=\\\\ -]|[a-z0-9]){0,30}") {
                let _ = parse(&query);
            }
        }
    }
}
