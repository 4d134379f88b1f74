//! `Stripe-Signature` parsing and verification (`pgpay_core::signature`), as `pay.ingest_webhook`
//! and `pay.verify_stripe_signature` run them.
//!
//! Input: `<now> <tolerance>` / header / secret / payload (the rest). Checks: the verdict agrees
//! with a plain re-computation of Stripe's rule; a header signed with the secret always verifies.

use pgpay_core::signature::{
    compute_v1, parse_header, sign_header, verify, verify_any, SignatureError, Tolerance,
};

use crate::{number, text, Fields};

pub fn run(data: &[u8]) {
    let mut fields = Fields::new(data);
    let clock = text(fields.line()).into_owned();
    let mut clock = clock.split(' ');
    let now: i64 = number(clock.next().unwrap_or("").as_bytes(), 1_700_000_000);
    let tolerance = Tolerance::from_seconds(number(clock.next().unwrap_or("").as_bytes(), 300));
    let header = text(fields.line()).into_owned();
    let secret = fields.line().to_vec();
    let payload = fields.rest();

    let verdict = verify(payload, &header, &secret, tolerance, now);
    let _ = verdict.map_err(SignatureError::reason);
    match parse_header(&header) {
        Err(e) => assert_eq!(
            verdict,
            Err(e),
            "a header that does not parse cannot verify"
        ),
        Ok(parsed) => {
            let expected = compute_v1(payload, &secret, parsed.timestamp);
            let matches = parsed.v1.contains(&expected.as_str());
            let age = now.saturating_sub(parsed.timestamp);
            let in_time = match tolerance {
                Tolerance::Off => true,
                Tolerance::Seconds(limit) => age.unsigned_abs() <= u64::from(limit),
            };
            assert_eq!(
                verdict.is_ok(),
                matches && in_time,
                "verdict {verdict:?} for header {header:?}"
            );
            if !matches {
                assert_eq!(verdict, Err(SignatureError::Mismatch));
            }
            // Rotation: a wrong secret first does not hide the right one second.
            let secrets: [&[u8]; 2] = [b"whsec_other", &secret];
            let rotated = verify_any(payload, &header, &secrets, tolerance, now);
            if verdict.is_ok() && secret != b"whsec_other" {
                assert_eq!(rotated, Ok(1));
            }
            // Stripe's own header for this payload, secret and timestamp always verifies.
            let signed = sign_header(payload, &secret, parsed.timestamp);
            assert_eq!(
                verify(payload, &signed, &secret, Tolerance::Off, now),
                Ok(())
            );
        }
    }
}
