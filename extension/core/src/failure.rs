//! Which failures of an event's application are the event's own (quarantined, answered 200) and
//! which are the infrastructure's (raised, answered 5xx, so Stripe delivers again later).
//!
//! The rule, by SQLSTATE (https://www.postgresql.org/docs/current/errcodes-appendix.html):
//! - class 08 (connection exception), 53 (insufficient resources: disk full, out of memory, too
//!   many connections), 57 (operator intervention: shutdown, cancel, statement timeout), 58
//!   (system error: I/O) and XX001/XX002 (data or index corrupted) are the infrastructure's: the
//!   same event will apply once the server is well again, so it must not be held back;
//! - everything else raised while applying — a bug (XX000), a constraint or a trigger of the
//!   application (P0001, 23xxx, ...), a lock timeout (55P03), a deadlock (40P01) — is about this
//!   event or this payment, and raising it would only bring the same body back for days (and get
//!   the endpoint disabled), so the event is quarantined.
//!
//! The one infrastructure failure that is not a SQLSTATE of the apply, "no live webhook secret"
//! (55000), is raised before an event is read, so it never reaches this rule.

/// Whether an error with this SQLSTATE, raised while applying an event, must be raised again
/// (the infrastructure failed) rather than quarantine the event.
pub fn is_infrastructure(sqlstate: &str) -> bool {
    matches!(sqlstate.get(..2), Some("08" | "53" | "57" | "58"))
        || matches!(sqlstate, "XX001" | "XX002")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infrastructure_classes_raise_and_the_rest_quarantine() {
        for (code, infra) in [
            ("08006", true),  // connection failure
            ("53100", true),  // disk full
            ("53200", true),  // out of memory
            ("57P01", true),  // admin shutdown
            ("57014", true),  // query canceled / statement timeout
            ("58030", true),  // io error
            ("XX001", true),  // data corrupted
            ("XX002", true),  // index corrupted
            ("XX000", false), // internal error: a bug in pgpay
            ("P0001", false), // raise_exception: the application's trigger
            ("23505", false), // unique violation
            ("55P03", false), // lock not available (lock_timeout)
            ("40P01", false), // deadlock detected
            ("55000", false), // object not in prerequisite state, raised by a trigger
            ("", false),
            ("5", false),
        ] {
            assert_eq!(is_infrastructure(code), infra, "{code}");
        }
    }
}
