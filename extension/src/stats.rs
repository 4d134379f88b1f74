//! The tail probabilities of `pay.anomalies` (`pgpay_core::stats`), for SQL.

use pgrx::prelude::*;

/// `pay._poisson_upper_tail(k, lambda)`: P(X ≥ k) for X ~ Poisson(lambda).
#[pg_extern(immutable, strict, parallel_safe, name = "_poisson_upper_tail")]
pub fn poisson_upper_tail(k: i64, lambda: f64) -> f64 {
    pgpay_core::stats::poisson_upper_tail(u64::try_from(k).unwrap_or(0), lambda)
}

/// `pay._binomial_upper_tail(k, n, p)`: P(X ≥ k) for X ~ Binomial(n, p).
#[pg_extern(immutable, strict, parallel_safe, name = "_binomial_upper_tail")]
pub fn binomial_upper_tail(k: i64, n: i64, p: f64) -> f64 {
    pgpay_core::stats::binomial_upper_tail(
        u64::try_from(k).unwrap_or(0),
        u64::try_from(n).unwrap_or(0),
        p,
    )
}
