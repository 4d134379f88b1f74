//! Billing periods: adding days, weeks, months or years to a unix time the way Stripe bills them
//! (a monthly subscription anchored on the 31st renews on the last day of shorter months, and
//! returns to the 31st after), in UTC, without a date library.

/// Stripe's `recurring[interval]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Year => "year",
        }
    }

    pub fn parse(text: &str) -> Option<Interval> {
        [
            Interval::Day,
            Interval::Week,
            Interval::Month,
            Interval::Year,
        ]
        .into_iter()
        .find(|i| i.as_str() == text)
    }

    /// Stripe's limit: at most one year (`interval_count` 365 days, 52 weeks, 12 months, 1 year).
    pub fn max_count(self) -> i64 {
        match self {
            Interval::Day => 365,
            Interval::Week => 52,
            Interval::Month => 12,
            Interval::Year => 1,
        }
    }
}

const DAY: i64 = 86_400;

/// The end of the `n`-th period after `anchor` (`n` = 0 is the anchor itself).
pub fn period_end(anchor: i64, interval: Interval, count: i64, n: i64) -> i64 {
    let steps = count.saturating_mul(n);
    match interval {
        Interval::Day => anchor.saturating_add(steps.saturating_mul(DAY)),
        Interval::Week => anchor.saturating_add(steps.saturating_mul(7 * DAY)),
        Interval::Month => add_months(anchor, steps),
        Interval::Year => add_months(anchor, steps.saturating_mul(12)),
    }
}

fn add_months(t: i64, months: i64) -> i64 {
    let days = t.div_euclid(DAY);
    let secs = t.rem_euclid(DAY);
    let (y, m, d) = civil_from_days(days);
    let total = y * 12 + (m - 1) + months;
    let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    let nd = d.min(days_in_month(ny, nm));
    days_from_civil(ny, nm, nd) * DAY + secs
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's algorithms: days since 1970-01-01 to (year, month, day) and back.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(y: i64, m: i64, d: i64) -> i64 {
        days_from_civil(y, m, d) * DAY + 3600
    }

    #[test]
    fn months_clamp_to_the_end_and_come_back() {
        let jan31 = ts(2025, 1, 31);
        assert_eq!(period_end(jan31, Interval::Month, 1, 1), ts(2025, 2, 28));
        assert_eq!(period_end(jan31, Interval::Month, 1, 2), ts(2025, 3, 31));
        assert_eq!(
            period_end(ts(2024, 1, 31), Interval::Month, 1, 1),
            ts(2024, 2, 29)
        );
        assert_eq!(period_end(jan31, Interval::Month, 3, 1), ts(2025, 4, 30));
        assert_eq!(period_end(jan31, Interval::Year, 1, 1), ts(2026, 1, 31));
        assert_eq!(
            period_end(ts(2024, 2, 29), Interval::Year, 1, 1),
            ts(2025, 2, 28)
        );
        assert_eq!(period_end(jan31, Interval::Day, 1, 2), jan31 + 2 * DAY);
        assert_eq!(period_end(jan31, Interval::Week, 2, 1), jan31 + 14 * DAY);
    }

    #[test]
    fn civil_round_trip() {
        for days in [-1000, 0, 59, 365, 11_016, 20_000, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }
}
