//! What each fuzz target feeds and checks. A target is `run(&[u8])`: it must not panic on any
//! input, and it panics (a crash to the fuzzer, a failure to the replay test) when one of the
//! properties it checks does not hold. Inputs are split into fields with [`Fields`] so that the
//! seeds in `fuzz/corpus/` stay readable: one field per line, the last field takes the rest.
#![forbid(unsafe_code)]

pub mod canonical_json;
pub mod classify;
pub mod event;
pub mod form;
pub mod signature;

/// A fuzz target: panics when a property does not hold for the input.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("canonical_json", canonical_json::run),
    ("classify", classify::run),
    ("event", event::run),
    ("form", form::run),
    ("signature", signature::run),
];

/// Newline-separated fields of a fuzz input.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Fields { rest: data }
    }

    /// The next line, without its newline (empty once the input is used up).
    pub fn line(&mut self) -> &'a [u8] {
        match self.rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = &self.rest[..i];
                self.rest = &self.rest[i + 1..];
                line
            }
            None => std::mem::take(&mut self.rest),
        }
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Text as PostgreSQL and HTTP hand it over: always valid UTF-8. Invalid bytes are replaced
/// rather than skipped, so mutations that break UTF-8 still reach the parser.
pub fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

/// A decimal number from a line, or `default` when the line is not one.
pub fn number<T: std::str::FromStr>(line: &[u8], default: T) -> T {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}
