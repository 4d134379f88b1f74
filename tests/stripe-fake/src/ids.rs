//! Object ids in Stripe's shape: a prefix and 24 base-62 characters (`pi_3MtwBwLkdIwHu7ix28a3tqPa`).

use rand::RngExt;

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A fresh id. Drawn from the thread's OS-seeded generator, not the fault seed, so that a fake
/// restarted for a demo never hands out an id an old database already holds; 62^24 makes a
/// collision negligible.
pub fn new_id(prefix: &str) -> String {
    random_suffix(prefix, 24)
}

pub fn request_id() -> String {
    random_suffix("req_", 14)
}

/// `pi_..._secret_...`, the shape Stripe.js checks.
pub fn client_secret(payment_intent_id: &str) -> String {
    random_suffix(&format!("{payment_intent_id}_secret_"), 25)
}

fn random_suffix(prefix: &str, len: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    for _ in 0..len {
        id.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    id
}
