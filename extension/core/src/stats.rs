//! The tail probabilities `pay.anomalies` tests against (README, "Anomalies"): exact, in log
//! space, so that large counts neither overflow nor round to 0 or 1 too early.

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9: about 15 significant digits).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(π x).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Sums `exp(ln_term(i))` for i = from, from + 1, ... until `to` or until the terms (past their
/// peak) no longer change the sum.
fn tail_sum(from: u64, to: u64, peak: f64, ln_term: impl Fn(f64) -> f64) -> f64 {
    let mut sum = 0.0;
    let mut i = from;
    while i <= to {
        let term = ln_term(i as f64).exp();
        sum += term;
        if (i as f64) > peak && term <= sum * 1e-17 {
            break;
        }
        i += 1;
    }
    sum.min(1.0)
}

/// P(X ≥ k) for X ~ Poisson(λ). 1 when k = 0; for λ ≤ 0, 0 unless k = 0.
pub fn poisson_upper_tail(k: u64, lambda: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if lambda <= 0.0 || lambda.is_nan() {
        return 0.0;
    }
    let ln_lambda = lambda.ln();
    tail_sum(k, u64::MAX, lambda, |i| {
        i * ln_lambda - lambda - ln_gamma(i + 1.0)
    })
}

/// P(X ≥ k) for X ~ Binomial(n, p). 1 when k = 0, 0 when k > n; p is clamped to [0, 1].
pub fn binomial_upper_tail(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    if p == 0.0 {
        return 0.0;
    }
    if p == 1.0 {
        return 1.0;
    }
    let nf = n as f64;
    let (ln_p, ln_q) = (p.ln(), (-p).ln_1p());
    let ln_n_fact = ln_gamma(nf + 1.0);
    tail_sum(k, n, nf * p, |i| {
        ln_n_fact - ln_gamma(i + 1.0) - ln_gamma(nf - i + 1.0) + i * ln_p + (nf - i) * ln_q
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-300)
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut fact = 1.0_f64;
        for n in 1..30u32 {
            fact *= f64::from(n);
            assert!(
                close(ln_gamma(f64::from(n) + 1.0), fact.ln(), 1e-12),
                "{n}!"
            );
        }
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-12
        ));
    }

    #[test]
    fn poisson_tails_against_hand_computed_values() {
        // P(X ≥ 1 | λ) = 1 - e^-λ.
        for lambda in [0.001, 0.5, 1.0, 7.0, 100.0] {
            assert!(close(
                poisson_upper_tail(1, lambda),
                1.0 - (-lambda).exp(),
                1e-12
            ));
        }
        // P(X ≥ 3 | 1) = 1 - e^-1 (1 + 1 + 1/2).
        assert!(close(
            poisson_upper_tail(3, 1.0),
            1.0 - (-1.0f64).exp() * 2.5,
            1e-12
        ));
        assert_eq!(poisson_upper_tail(0, 3.0), 1.0);
        assert_eq!(poisson_upper_tail(2, 0.0), 0.0);
        // Far in the tail: tiny but not zero, and monotone in k.
        let far = poisson_upper_tail(60, 2.0);
        assert!(far > 0.0 && far < 1e-40);
        assert!(poisson_upper_tail(61, 2.0) < far);
    }

    #[test]
    fn binomial_tails_against_hand_computed_values() {
        // P(X ≥ n) = p^n; P(X ≥ 1) = 1 - (1 - p)^n.
        assert!(close(binomial_upper_tail(3, 3, 0.01), 1e-6, 1e-9));
        assert!(close(
            binomial_upper_tail(1, 10, 0.1),
            1.0 - 0.9f64.powi(10),
            1e-12
        ));
        // P(X ≥ 2 | 4, 1/2) = 11/16.
        assert!(close(binomial_upper_tail(2, 4, 0.5), 11.0 / 16.0, 1e-12));
        assert_eq!(binomial_upper_tail(0, 5, 0.3), 1.0);
        assert_eq!(binomial_upper_tail(6, 5, 0.3), 0.0);
        assert_eq!(binomial_upper_tail(1, 5, 0.0), 0.0);
        assert_eq!(binomial_upper_tail(5, 5, 1.0), 1.0);
        // Large n: the mean itself is not surprising.
        let mid = binomial_upper_tail(1_000, 100_000, 0.01);
        assert!(mid > 0.4 && mid < 0.6, "{mid}");
    }
}
