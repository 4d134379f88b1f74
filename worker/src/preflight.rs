//! The checks before any work: the database answers, holds the pgpay extension in a version
//! this build works with, and the login role may act as `pay_worker`. A setup that cannot
//! work stops the worker with the fix in the message (exit 2); a database that cannot be
//! reached yet (wrong port, a database still being created, a server starting) is retried,
//! each attempt logged at WARN with the reason.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error_chain::ErrorChain;

/// The extension versions this build works with: `0.2.x`.
pub const EXTENSION_SERIES: (u64, u64) = (0, 2);
/// [`EXTENSION_SERIES`] as text, for messages.
pub const EXTENSION_SERIES_TEXT: &str = "0.2.x";

/// Who we are, where, and what is installed. One round trip; never raises when the extension
/// or its roles are missing (`pg_has_role` would raise on a role that does not exist).
const PROBE: &str = "SELECT current_user::text, current_database()::text, \
     (SELECT e.extversion::text FROM pg_catalog.pg_extension e WHERE e.extname = 'pgpay'), \
     CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = 'pay_worker') \
          THEN pg_catalog.pg_has_role(current_user, 'pay_worker', 'USAGE') END";

/// A setup the worker cannot work with. Each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// `CREATE EXTENSION pgpay` was never run in this database.
    #[error("the pgpay extension is not installed in database {database:?}: run CREATE EXTENSION pgpay in {database} (as its owner), or point DATABASE_URL at the database that has it")]
    NoExtension { database: String },
    /// The extension's version is not one this build works with.
    #[error("the pgpay extension in database {database:?} is version {found}, but this pgpay-worker works with {EXTENSION_SERIES_TEXT}: {fix}")]
    ExtensionVersion {
        database: String,
        found: String,
        fix: &'static str,
    },
    /// The login role is not a member of `pay_worker`.
    #[error("role {role:?} cannot claim outbox commands: run GRANT pay_worker TO {role} (the worker logs in as its own role, granted pay_worker)")]
    NotWorker { role: String },
    /// Authentication or authorization failed: retrying does not help.
    #[error("the database refused the login ({sqlstate}): {message}")]
    Login { sqlstate: String, message: String },
}

/// Whether the preflight check passed, must be retried, or can never pass.
#[derive(Debug)]
pub enum Checked {
    /// Everything is in place.
    Ready,
    /// The setup is wrong; the message says how to fix it.
    Broken(SetupError),
    /// The database could not be asked (yet); the text says why.
    Unreachable(String),
}

/// Whether `found` (an `extversion`) is one this build works with.
pub fn extension_compatible(found: &str) -> Result<(), &'static str> {
    let mut parts = found.split('.').map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) == EXTENSION_SERIES => Ok(()),
        (Some(major), Some(minor)) if (major, minor) < EXTENSION_SERIES => Err(
            "run ALTER EXTENSION pgpay UPDATE in that database (README.md, Upgrading), then start the worker again",
        ),
        (Some(_), Some(_)) => Err(
            "the extension is newer than this worker: run the pgpay-worker released with it",
        ),
        _ => Err("not a version this worker knows: install a released pgpay"),
    }
}

/// Runs the checks on an open connection.
pub async fn check_client(client: &Client) -> Checked {
    let row = match client.query_one(PROBE, &[]).await {
        Ok(row) => row,
        Err(e) => return classify_error(&e),
    };
    let get = |i| row.try_get::<_, Option<String>>(i).ok().flatten();
    let role = get(0).unwrap_or_default();
    let database = get(1).unwrap_or_default();
    let Some(found) = get(2) else {
        return Checked::Broken(SetupError::NoExtension { database });
    };
    if let Err(fix) = extension_compatible(&found) {
        return Checked::Broken(SetupError::ExtensionVersion {
            database,
            found,
            fix,
        });
    }
    match row.try_get::<_, Option<bool>>(3) {
        Ok(Some(true)) => Checked::Ready,
        _ => Checked::Broken(SetupError::NotWorker { role }),
    }
}

/// Connects (as `application_name`) and runs the checks.
pub async fn check(config: &crate::tls::DatabaseConfig, application_name: &str) -> Checked {
    match crate::db::connect(config, application_name).await {
        Ok(client) => check_client(&client).await,
        Err(e) => classify_error(&e),
    }
}

/// A failed connect or probe: a refused login can never pass; anything else may (a server
/// starting, a port not yet open, a database being created).
fn classify_error(e: &tokio_postgres::Error) -> Checked {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // 28000 invalid authorization, 28P01 invalid password, 42501 no CONNECT privilege.
        if code.starts_with("28") || code == "42501" {
            return Checked::Broken(SetupError::Login {
                sqlstate: code.to_owned(),
                message: db.message().to_owned(),
            });
        }
    }
    Checked::Unreachable(describe_unreachable(e))
}

/// The reason a connection failed, in words an operator acts on.
pub fn describe_unreachable(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        if db.code().code() == "3D000" {
            return format!(
                "{} (check the database name in DATABASE_URL, or create it)",
                db.message()
            );
        }
        return format!("{}: {}", db.code().code(), db.message());
    }
    let chain = ErrorChain(e).to_string();
    if chain.contains("Connection refused") {
        format!("{chain} (is PostgreSQL running, and is the host and port in DATABASE_URL right?)")
    } else {
        chain
    }
}

/// Checks until the setup is ready (`Ok`), broken (`Err`), `give_up_after` has passed, or
/// `cancel` fires (both `Err(None)`). Every failed attempt is logged at WARN with its reason.
pub async fn wait_until_ready(
    config: &crate::tls::DatabaseConfig,
    application_name: &str,
    give_up_after: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<(), Option<SetupError>> {
    let started = tokio::time::Instant::now();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1u32;
    loop {
        let checked = tokio::select! {
            _ = cancel.cancelled() => return Err(None),
            c = check(config, application_name) => c,
        };
        match checked {
            Checked::Ready => return Ok(()),
            Checked::Broken(e) => return Err(Some(e)),
            Checked::Unreachable(reason) => {
                if give_up_after.is_some_and(|limit| started.elapsed() >= limit) {
                    warn!(attempt, %reason, "cannot reach the database; giving up");
                    return Err(None);
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                warn!(attempt, %reason, retry_in = ?delay, "cannot reach the database; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return Err(None),
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_versions() {
        assert!(extension_compatible("0.2.0").is_ok());
        assert!(extension_compatible("0.2.7").is_ok());
        assert!(extension_compatible("0.1.0")
            .unwrap_err()
            .contains("ALTER EXTENSION pgpay UPDATE"));
        assert!(extension_compatible("0.3.0").unwrap_err().contains("newer"));
        assert!(extension_compatible("1.0.0").unwrap_err().contains("newer"));
        assert!(extension_compatible("banana").is_err());
    }

    #[test]
    fn messages_carry_the_fix() {
        let e = SetupError::ExtensionVersion {
            database: "shop".into(),
            found: "0.1.0".into(),
            fix: extension_compatible("0.1.0").unwrap_err(),
        };
        let text = e.to_string();
        assert!(
            text.contains("version 0.1.0") && text.contains("works with 0.2.x"),
            "{text}"
        );
        assert!(SetupError::NotWorker {
            role: "shop_worker".into()
        }
        .to_string()
        .contains("GRANT pay_worker TO shop_worker"));
        assert!(SetupError::NoExtension {
            database: "shop".into()
        }
        .to_string()
        .contains("CREATE EXTENSION pgpay in shop"));
    }
}
