//! stripe-fake's form decoder (`stripe_fake::form`): every request body and query string.
//!
//! Input: the encoded form. Checks: the error names a short parameter; parsed parameters, encoded
//! again, parse to the same tree and the same canonical JSON.

use stripe_fake::form::{parse, Param, Params};

pub fn run(data: &[u8]) {
    match parse(data) {
        Err(e) => {
            let _ = e.to_string();
            if let Some(param) = e.param() {
                assert!(param.chars().count() <= 103, "{param:?}");
            }
        }
        Ok(params) => {
            let json = serde_json::to_string(&params).expect("parameters are JSON");
            let again = parse(encode(&params).as_bytes()).expect("re-encoded form parses");
            assert_eq!(again, params);
            assert_eq!(serde_json::to_string(&again).expect("JSON"), json);
        }
    }
}

fn encode(params: &Params) -> String {
    let mut pairs = Vec::new();
    for (key, value) in &params.0 {
        encode_param(&percent(key), value, &mut pairs);
    }
    pairs.join("&")
}

fn encode_param(name: &str, value: &Param, pairs: &mut Vec<String>) {
    match value {
        Param::Str(s) => pairs.push(format!("{name}={}", percent(s))),
        Param::List(items) => {
            for item in items {
                encode_param(&format!("{name}[]"), item, pairs);
            }
        }
        Param::Map(children) => {
            for (key, child) in children {
                encode_param(&format!("{name}[{}]", percent(key)), child, pairs);
            }
        }
    }
}

fn percent(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}
