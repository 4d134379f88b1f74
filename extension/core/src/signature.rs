//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`.
//!
//! The signed string is `<t>.<payload>` byte for byte, HMAC-SHA256 keyed with the whole endpoint
//! secret (`whsec_...`). Any `v1` may match (Stripe sends several while a secret rotates); `v0` and
//! unknown schemes are ignored. Verdicts agree with stripe-python and stripe-node on
//! `tests/fixtures/stripe_webhook_signatures.json` (copied from the SDK-verified set).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery was not accepted. A closed set: callers map each case to a reason a DBA can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing or empty")]
    MissingHeader,
    #[error("the Stripe-Signature header is malformed: {0}")]
    MalformedHeader(&'static str),
    #[error("the Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    #[error("no v1 signature matches the payload")]
    Mismatch,
    #[error("the signature timestamp is older than the tolerance")]
    TooOld,
    #[error("the signature timestamp is too far in the future")]
    TooFarInFuture,
}

impl SignatureError {
    /// A short stable name, used as the rejection reason in counters and views.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::MissingHeader => "missing_header",
            SignatureError::MalformedHeader(_) => "malformed_header",
            SignatureError::NoV1Signature => "no_v1_signature",
            SignatureError::Mismatch => "signature_mismatch",
            SignatureError::TooOld => "timestamp_too_old",
            SignatureError::TooFarInFuture => "timestamp_in_future",
        }
    }
}

/// A parsed header: the timestamp and every `v1` value, still as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    pub timestamp: i64,
    pub v1: Vec<&'a str>,
}

// Twelve digits reach the year 33658; anything longer is not a Stripe timestamp and would
// otherwise overflow.
const MAX_TIMESTAMP_DIGITS: usize = 12;

/// Longest header accepted. Stripe sends `t=` and one `v1` (two while a secret rotates, and a `v0`
/// in test mode): about 150 bytes. A flood of a million `v1=` entries took 7 s of backend CPU.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Most `v1` signatures accepted in one header.
pub const MAX_V1_SIGNATURES: usize = 8;

/// Parses `t=...,v1=...`. Items without `=` and schemes other than `t` and `v1` are ignored, as the
/// SDKs do; a missing, repeated or non-numeric `t` is malformed (the SDKs disagree on repeats:
/// python keeps the first, node the last, so we accept neither).
pub fn parse_header(header: &str) -> Result<SignatureHeader<'_>, SignatureError> {
    if header.is_empty() {
        return Err(SignatureError::MissingHeader);
    }
    if header.len() > MAX_HEADER_BYTES {
        return Err(SignatureError::MalformedHeader(
            "longer than 4096 bytes (Stripe sends about 150)",
        ));
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (key, value) = match item.split_once('=') {
            Some(pair) => pair,
            None if item == "t" => return Err(SignatureError::MalformedHeader("t has no value")),
            None => continue,
        };
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::MalformedHeader("t appears more than once"));
                }
                timestamp = Some(parse_timestamp(value)?);
            }
            "v1" if v1.len() == MAX_V1_SIGNATURES => {
                return Err(SignatureError::MalformedHeader("more than 8 v1 signatures"));
            }
            "v1" => v1.push(value),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::MalformedHeader("no t= timestamp"))?;
    if v1.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }
    Ok(SignatureHeader { timestamp, v1 })
}

fn parse_timestamp(value: &str) -> Result<i64, SignatureError> {
    if value.is_empty()
        || value.len() > MAX_TIMESTAMP_DIGITS
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(SignatureError::MalformedHeader(
            "t is not a unix timestamp in decimal digits",
        ));
    }
    value
        .parse()
        .map_err(|_| SignatureError::MalformedHeader("t is not a unix timestamp"))
}

/// How old (or how far ahead) a timestamp may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tolerance {
    /// No age check at all (the SDKs' tolerance 0).
    Off,
    Seconds(u32),
}

impl Tolerance {
    /// Stripe's SDK convention: 0 turns the check off.
    pub fn from_seconds(seconds: u32) -> Tolerance {
        if seconds == 0 {
            Tolerance::Off
        } else {
            Tolerance::Seconds(seconds)
        }
    }
}

/// Verifies a delivery against one secret.
pub fn verify(
    payload: &[u8],
    header: &str,
    secret: &[u8],
    tolerance: Tolerance,
    now_unix: i64,
) -> Result<(), SignatureError> {
    verify_any(payload, header, &[secret], tolerance, now_unix).map(|_| ())
}

/// Verifies a delivery against several live secrets (rotation) and returns the index of the secret
/// that matched. The signature is checked before the timestamp, like the SDKs, so a forged stale
/// delivery reports a mismatch rather than its age.
pub fn verify_any<S: AsRef<[u8]>>(
    payload: &[u8],
    header: &str,
    secrets: &[S],
    tolerance: Tolerance,
    now_unix: i64,
) -> Result<usize, SignatureError> {
    let parsed = parse_header(header)?;
    let candidates: Vec<[u8; 32]> = parsed.v1.iter().filter_map(|v| decode_v1(v)).collect();
    let matched = secrets.iter().position(|secret| {
        // One HMAC per secret, whatever the number of candidates.
        let expected: [u8; 32] = signed_mac(secret.as_ref(), parsed.timestamp, payload)
            .finalize()
            .into_bytes()
            .into();
        // Every candidate is compared (constant time each) so timing reveals nothing about which.
        candidates
            .iter()
            .fold(Choice::from(0), |any, candidate| {
                any | expected.ct_eq(candidate)
            })
            .into()
    });
    let matched = matched.ok_or(SignatureError::Mismatch)?;
    if let Tolerance::Seconds(limit) = tolerance {
        // In i128: any two i64 differ by less than its range, so no clock value can wrap.
        let age = i128::from(now_unix) - i128::from(parsed.timestamp);
        if age > i128::from(limit) {
            return Err(SignatureError::TooOld);
        }
        if -age > i128::from(limit) {
            return Err(SignatureError::TooFarInFuture);
        }
    }
    Ok(matched)
}

/// A `v1` value can only match when it is exactly 64 lowercase hex digits: the SDKs compare the hex
/// text itself, so `ABCD...` never matches.
fn decode_v1(value: &str) -> Option<[u8; 32]> {
    if value.len() != 64
        || !value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(value, &mut out).ok()?;
    Some(out)
}

fn signed_mac(secret: &[u8], timestamp: i64, payload: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// The `v1` signature Stripe would compute, as lowercase hex.
pub fn compute_v1(payload: &[u8], secret: &[u8], timestamp: i64) -> String {
    hex::encode(
        signed_mac(secret, timestamp, payload)
            .finalize()
            .into_bytes(),
    )
}

/// A complete `Stripe-Signature` header value, as Stripe sends it (used by stripe-fake and tests).
pub fn sign_header(payload: &[u8], secret: &[u8], timestamp: i64) -> String {
    format!(
        "t={timestamp},v1={}",
        compute_v1(payload, secret, timestamp)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test_secret";
    const NOW: i64 = 1_700_000_000;

    fn check(header: &str, payload: &str, now: i64, tolerance: u32) -> Result<(), SignatureError> {
        verify(
            payload.as_bytes(),
            header,
            SECRET,
            Tolerance::from_seconds(tolerance),
            now,
        )
    }

    #[test]
    fn verdicts_table() {
        let body = r#"{"id":"evt_1"}"#;
        let good = sign_header(body.as_bytes(), SECRET, NOW);
        let sig = compute_v1(body.as_bytes(), SECRET, NOW);
        /// name, header, now, tolerance, verdict
        type Case = (&'static str, String, i64, u32, Result<(), SignatureError>);
        let cases: Vec<Case> = vec![
            ("fresh", good.clone(), NOW, 300, Ok(())),
            ("at the edge", good.clone(), NOW + 300, 300, Ok(())),
            (
                "one second too old",
                good.clone(),
                NOW + 301,
                300,
                Err(SignatureError::TooOld),
            ),
            ("future within", good.clone(), NOW - 300, 300, Ok(())),
            (
                "too far ahead",
                good.clone(),
                NOW - 301,
                300,
                Err(SignatureError::TooFarInFuture),
            ),
            ("tolerance off", good.clone(), NOW + 10_000_000, 0, Ok(())),
            (
                "empty",
                String::new(),
                NOW,
                300,
                Err(SignatureError::MissingHeader),
            ),
            (
                "no t",
                format!("v1={sig}"),
                NOW,
                300,
                Err(SignatureError::MalformedHeader("no t= timestamp")),
            ),
            (
                "bare t",
                format!("t,v1={sig}"),
                NOW,
                300,
                Err(SignatureError::MalformedHeader("t has no value")),
            ),
            (
                "two t",
                format!("t={NOW},t={NOW},v1={sig}"),
                NOW,
                300,
                Err(SignatureError::MalformedHeader("t appears more than once")),
            ),
            (
                "signed t",
                format!("t=+{NOW},v1={sig}"),
                NOW,
                300,
                Err(SignatureError::MalformedHeader(
                    "t is not a unix timestamp in decimal digits",
                )),
            ),
            (
                "huge t",
                format!("t=99999999999999999999,v1={sig}"),
                NOW,
                300,
                Err(SignatureError::MalformedHeader(
                    "t is not a unix timestamp in decimal digits",
                )),
            ),
            (
                "no v1",
                format!("t={NOW},v0={sig}"),
                NOW,
                300,
                Err(SignatureError::NoV1Signature),
            ),
            (
                "upper hex",
                format!("t={NOW},v1={}", sig.to_uppercase()),
                NOW,
                300,
                Err(SignatureError::Mismatch),
            ),
            (
                "second v1",
                format!("t={NOW},v1={},v1={sig}", "0".repeat(64)),
                NOW,
                300,
                Ok(()),
            ),
            // Found by fuzzing SQL (tests/sql_fuzz.rs): the most negative clock overflowed.
            (
                "clock at i64::MIN",
                good.clone(),
                i64::MIN,
                300,
                Err(SignatureError::TooFarInFuture),
            ),
            (
                "clock at i64::MAX",
                good.clone(),
                i64::MAX,
                300,
                Err(SignatureError::TooOld),
            ),
            (
                "garbage items ignored",
                format!("junk,t={NOW},x=1,v1={sig}"),
                NOW,
                300,
                Ok(()),
            ),
            (
                "short v1",
                format!("t={NOW},v1=abc"),
                NOW,
                300,
                Err(SignatureError::Mismatch),
            ),
        ];
        for (name, header, now, tolerance, expected) in cases {
            assert_eq!(
                check(&header, body, now, tolerance),
                expected,
                "case {name}"
            );
        }
    }

    #[test]
    fn rotation_reports_which_secret_matched() {
        let body = b"payload";
        let header = sign_header(body, b"whsec_new", NOW);
        let secrets: [&[u8]; 2] = [b"whsec_old", b"whsec_new"];
        assert_eq!(
            verify_any(body, &header, &secrets, Tolerance::Seconds(300), NOW),
            Ok(1)
        );
        let none: [&[u8]; 0] = [];
        assert_eq!(
            verify_any(body, &header, &none, Tolerance::Seconds(300), NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn official_sdk_vectors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/stripe_webhook_signatures.json"
        );
        let text =
            std::fs::read_to_string(path).expect("tests/fixtures/stripe_webhook_signatures.json");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("vectors are JSON");
        let vectors = doc["vectors"].as_array().expect("a vectors array");
        assert!(vectors.len() >= 20);
        for v in vectors {
            let name = v["name"].as_str().unwrap_or("?");
            let verdict = verify(
                v["payload"].as_str().expect("payload").as_bytes(),
                v["header"].as_str().expect("header"),
                v["secret"].as_str().expect("secret").as_bytes(),
                Tolerance::from_seconds(v["tolerance"].as_u64().expect("tolerance") as u32),
                v["now"].as_i64().expect("now"),
            );
            let expected_valid = v["stripe_sdk"] == "valid";
            assert_eq!(
                verdict.is_ok(),
                expected_valid,
                "vector {name}: {verdict:?}"
            );
        }
    }

    /// Issue #9, defect 10: a million `v1=` entries took 7 s of backend CPU.
    #[test]
    fn d10_header_floods_are_refused_before_any_hmac() {
        let body = b"{}";
        let sig = compute_v1(body, SECRET, NOW);
        let flood = format!("t={NOW},{}v1={sig}", "v1=00,".repeat(1_000_000));
        let started = std::time::Instant::now();
        assert_eq!(
            verify(body, &flood, SECRET, Tolerance::Seconds(300), NOW),
            Err(SignatureError::MalformedHeader(
                "longer than 4096 bytes (Stripe sends about 150)"
            ))
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        let nine = format!(
            "t={NOW},{}v1={sig}",
            format!("v1={},", "0".repeat(64)).repeat(8)
        );
        assert!(nine.len() <= MAX_HEADER_BYTES);
        assert_eq!(
            verify(body, &nine, SECRET, Tolerance::Seconds(300), NOW),
            Err(SignatureError::MalformedHeader("more than 8 v1 signatures"))
        );
    }

    /// Issue #9, defect 11: `now_unix => -9223372036854775000` accepted a 1970 signature (the age
    /// check wrapped around).
    #[test]
    fn d11_absurd_clocks_never_accept_a_signature_outside_the_tolerance() {
        let body = b"{}";
        for t in [0, 1, 1_000, NOW] {
            let header = sign_header(body, SECRET, t);
            for now in [i64::MIN, -9_223_372_036_854_775_000, i64::MAX] {
                let verdict = verify(body, &header, SECRET, Tolerance::Seconds(300), now);
                assert!(verdict.is_err(), "t={t} now={now}: {verdict:?}");
            }
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            // Defect 11: the age check is exact for every clock and timestamp.
            #[test]
            fn d11_the_age_check_is_exact_for_any_clock(t in 0i64..999_999_999_999, now in any::<i64>(), tol in 1u32..u32::MAX) {
                let header = sign_header(b"p", b"whsec_x", t);
                let verdict = verify(b"p", &header, b"whsec_x", Tolerance::Seconds(tol), now);
                let age = i128::from(now) - i128::from(t);
                let expected = if age > i128::from(tol) {
                    Err(SignatureError::TooOld)
                } else if -age > i128::from(tol) {
                    Err(SignatureError::TooFarInFuture)
                } else {
                    Ok(())
                };
                prop_assert_eq!(verdict, expected);
            }

            // Defect 10: up to 8 signatures, the matching one anywhere among them, verifies; any
            // more is malformed whatever they hold.
            #[test]
            fn d10_signature_count_is_capped(others in 0usize..12, at in any::<prop::sample::Index>()) {
                let payload = b"payload";
                let good = compute_v1(payload, b"whsec_x", 1_700_000_000);
                let mut v1: Vec<String> = (0..others).map(|i| format!("{i:064x}")).collect();
                v1.insert(at.index(others + 1), good);
                let header = format!("t=1700000000,{}", v1.iter().map(|s| format!("v1={s}")).collect::<Vec<_>>().join(","));
                let verdict = verify(payload, &header, b"whsec_x", Tolerance::Off, 0);
                if v1.len() <= MAX_V1_SIGNATURES {
                    prop_assert_eq!(verdict, Ok(()));
                } else {
                    prop_assert_eq!(verdict, Err(SignatureError::MalformedHeader("more than 8 v1 signatures")));
                }
            }

            // Defect 10: no header, however long, is read past the cap.
            #[test]
            fn d10_long_headers_are_malformed(extra in (MAX_HEADER_BYTES - 10)..(MAX_HEADER_BYTES * 4)) {
                let header = format!("t=1700000000,v0={}", "a".repeat(extra));
                let verdict = verify(b"p", &header, b"whsec_x", Tolerance::Off, 0);
                prop_assert_eq!(verdict.is_err(), true);
                if header.len() > MAX_HEADER_BYTES {
                    prop_assert_eq!(verdict, Err(SignatureError::MalformedHeader("longer than 4096 bytes (Stripe sends about 150)")));
                }
            }

            #[test]
            fn arbitrary_headers_never_panic(header in "\\PC{0,200}", payload in any::<Vec<u8>>(), now in any::<i64>(), tol in any::<u32>()) {
                let _ = verify(&payload, &header, b"whsec_x", Tolerance::from_seconds(tol), now);
            }

            #[test]
            fn arbitrary_header_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let header = String::from_utf8_lossy(&bytes);
                let _ = parse_header(&header);
            }

            #[test]
            fn signed_with_the_right_secret_verifies(payload in any::<Vec<u8>>(), secret in "whsec_[A-Za-z0-9]{1,40}", t in 1_000_000_000i64..4_000_000_000, skew in -300i64..=300) {
                let header = sign_header(&payload, secret.as_bytes(), t);
                prop_assert_eq!(verify(&payload, &header, secret.as_bytes(), Tolerance::Seconds(300), t + skew), Ok(()));
            }

            #[test]
            fn any_flipped_byte_fails(payload in proptest::collection::vec(any::<u8>(), 1..300), t in 1_000_000_000i64..4_000_000_000, which in any::<prop::sample::Index>(), bit in 0u8..8) {
                let secret = b"whsec_property";
                let header = sign_header(&payload, secret, t);
                // Flip one bit of the payload.
                let mut tampered = payload.clone();
                let i = which.index(tampered.len());
                tampered[i] ^= 1 << bit;
                prop_assert!(verify(&tampered, &header, secret, Tolerance::Off, t).is_err());
                // Change one character of the header's timestamp or signature (staying in its alphabet).
                let bytes = header.as_bytes();
                let positions: Vec<usize> = (0..bytes.len()).filter(|&p| bytes[p].is_ascii_hexdigit()).collect();
                let p = positions[which.index(positions.len())];
                let mut changed = bytes.to_vec();
                changed[p] = if changed[p] == b'0' { b'1' } else { b'0' };
                let changed = String::from_utf8(changed).expect("ascii");
                prop_assert!(verify(&payload, &changed, secret, Tolerance::Off, t).is_err());
            }
        }
    }
}
