//! TLS to PostgreSQL with libpq's `sslmode` semantics, over rustls.
//!
//! `DATABASE_URL` is parsed here, once, into a [`DatabaseConfig`]: the libpq TLS settings that
//! tokio-postgres does not know (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`,
//! `sslkey`) are taken out of the string, the rest is parsed by tokio-postgres, and the root
//! and client certificates are loaded from their files at that moment, so a bad path stops the
//! worker at start with a message naming the setting and the file.
//!
//! Every connection the worker opens goes through [`DatabaseConfig::connect`] (or, for the
//! pool, the same connector from [`DatabaseConfig::tls`]).
//!
//! | sslmode       | encrypted                  | certificate chain checked      | host name checked |
//! |---------------|----------------------------|--------------------------------|-------------------|
//! | `disable`     | no                         | –                              | –                 |
//! | `prefer`      | if the server offers TLS   | only when a root cert is given | no                |
//! | `require`     | yes                        | only when a root cert is given | no                |
//! | `verify-ca`   | yes                        | yes                            | no                |
//! | `verify-full` | yes                        | yes                            | yes               |
//!
//! As in libpq, the root certificates are `sslrootcert`, else `~/.postgresql/root.crt` when it
//! exists; `sslrootcert=system` means the public web roots (Mozilla's, compiled in) and implies
//! `verify-full`. `allow` is refused: it tries plain text first, which tokio-postgres cannot do.

use std::fmt;
use std::future::Future;
use std::io;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Connection, Socket};

/// libpq's `sslmode` values the worker supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS when the server offers it, plain text otherwise (libpq's default).
    Prefer,
    /// TLS or no connection.
    Require,
    /// TLS, and the server's certificate chains to a root certificate.
    VerifyCa,
    /// `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<Self, DatabaseUrlError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err(DatabaseUrlError::SslModeAllow),
            other => {
                return Err(DatabaseUrlError::UnknownSslMode(
                    other.chars().take(40).collect(),
                ))
            }
        })
    }
}

/// Where the trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// None: the server's certificate is not checked.
    None,
    /// A PEM file (`sslrootcert`, or `~/.postgresql/root.crt`).
    File(PathBuf),
    /// `sslrootcert=system`: the public web roots (Mozilla's, compiled in).
    System,
}

/// A `DATABASE_URL` that cannot be used. Messages name the setting and the file, never the
/// password.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    /// tokio-postgres rejected the string (after the TLS settings were taken out).
    #[error("not a valid PostgreSQL connection string")]
    Parse(#[source] tokio_postgres::Error),
    /// A `key=value` string that does not tokenize.
    #[error("not a valid key=value connection string: {0}")]
    Syntax(&'static str),
    /// `sslmode` has a value libpq does not know.
    #[error("unknown sslmode {0:?} (use disable, prefer, require, verify-ca or verify-full)")]
    UnknownSslMode(String),
    /// `sslmode=allow`.
    #[error("sslmode=allow is not supported (use prefer, or disable)")]
    SslModeAllow,
    /// `verify-ca`/`verify-full` without any root certificate.
    #[error("sslmode={0} needs the CA that signed the server's certificate: set sslrootcert=/path/to/ca.pem (or sslrootcert=system for a publicly trusted certificate), or put it in ~/.postgresql/root.crt")]
    NoRootCert(&'static str),
    /// `sslrootcert=system` with a weaker mode (libpq refuses this too).
    #[error("sslrootcert=system needs sslmode=verify-full (not {0})")]
    SystemRootsNeedVerifyFull(&'static str),
    /// Only one of `sslcert` and `sslkey`.
    #[error("sslcert and sslkey must be given together")]
    ClientCertPair,
    /// A certificate or key file cannot be read.
    #[error("cannot read the {setting} file {path}")]
    File {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file does not hold what it should.
    #[error("the {setting} file {path} {problem}")]
    Content {
        /// `sslrootcert`, `sslcert` or `sslkey`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the resulting configuration (a client key that does not match its
    /// certificate, for one).
    #[error("cannot set up TLS")]
    Tls(#[source] rustls::Error),
}

/// The database connection settings: tokio-postgres's [`tokio_postgres::Config`] (reachable
/// through `Deref`, so `application_name`, `connect_timeout`, ... are set on it directly) and the
/// TLS connector built from the libpq TLS settings. `Debug` hides the password.
#[derive(Clone)]
pub struct DatabaseConfig {
    postgres: tokio_postgres::Config,
    tls: PgTls,
}

impl DatabaseConfig {
    /// Parses a URL (`postgres://...?sslmode=verify-full&sslrootcert=/ca.pem`) or a key=value
    /// string (`host=db sslmode=verify-full sslrootcert=/ca.pem`), reading the certificate files.
    /// `home` is where `~/.postgresql/root.crt` is looked for (the `FromStr` impl uses `$HOME`).
    pub fn parse(s: &str, home: Option<&Path>) -> Result<Self, DatabaseUrlError> {
        let (rest, tls) = split_tls_settings(s)?;
        let mut postgres = rest
            .parse::<tokio_postgres::Config>()
            .map_err(DatabaseUrlError::Parse)?;

        let roots = match tls.rootcert.as_deref() {
            Some("system") => RootCerts::System,
            Some(path) => RootCerts::File(PathBuf::from(path)),
            None => match home.map(|h| h.join(".postgresql").join("root.crt")) {
                Some(default) if default.is_file() => RootCerts::File(default),
                _ => RootCerts::None,
            },
        };
        let mode = match (tls.sslmode.as_deref(), &roots) {
            (None, RootCerts::System) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
            (Some(m), _) => SslMode::parse(m)?,
        };
        if roots == RootCerts::System && mode != SslMode::VerifyFull {
            return Err(DatabaseUrlError::SystemRootsNeedVerifyFull(mode.as_str()));
        }
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && roots == RootCerts::None {
            return Err(DatabaseUrlError::NoRootCert(mode.as_str()));
        }
        postgres.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });

        let client_cert = match (tls.cert, tls.key) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            _ => return Err(DatabaseUrlError::ClientCertPair),
        };
        // With sslmode=disable libpq reads no certificate file; neither do we.
        let (roots, client_cert) = if mode == SslMode::Disable {
            (RootCerts::None, None)
        } else {
            (roots, client_cert)
        };
        let tls = PgTls::new(mode, &roots, client_cert.as_ref())?;
        Ok(Self { postgres, tls })
    }

    /// The tokio-postgres settings (host, user, ...), `sslmode` mapped to what it knows.
    pub fn postgres(&self) -> &tokio_postgres::Config {
        &self.postgres
    }

    /// The TLS connector (cheap to clone), for connection pools.
    pub fn tls(&self) -> PgTls {
        self.tls.clone()
    }

    /// The effective `sslmode`.
    pub fn ssl_mode(&self) -> SslMode {
        self.tls.setup.mode
    }

    /// Opens one connection with these settings: the only way the worker connects.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, PgTlsStream<Socket>>), tokio_postgres::Error> {
        self.postgres.connect(self.tls()).await
    }
}

impl FromStr for DatabaseConfig {
    type Err = DatabaseUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from);
        Self::parse(s, home.as_deref())
    }
}

impl Deref for DatabaseConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &Self::Target {
        &self.postgres
    }
}

impl DerefMut for DatabaseConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.postgres
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's Debug redacts the password.
        f.debug_struct("DatabaseConfig")
            .field("postgres", &self.postgres)
            .field("sslmode", &self.tls.setup.mode.as_str())
            .field("roots", &self.tls.setup.roots)
            .field("client_cert", &self.tls.setup.client_cert)
            .finish()
    }
}

/// The libpq TLS settings found in a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsSettings {
    sslmode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsSettings {
    /// Takes `key=value` if it is one of ours (the last occurrence wins, as in libpq).
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.rootcert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value.to_owned());
        true
    }
}

/// Splits the TLS settings out of a connection string: the string without them (for
/// tokio-postgres's parser) and the settings. Mirrors tokio-postgres's two grammars.
fn split_tls_settings(s: &str) -> Result<(String, TlsSettings), DatabaseUrlError> {
    let mut tls = TlsSettings::default();
    let url_body = s
        .strip_prefix("postgres://")
        .or_else(|| s.strip_prefix("postgresql://"));
    let Some(body) = url_body else {
        let mut kept = Vec::new();
        for (key, value) in key_value_pairs(s)? {
            if !tls.take(key, &value) {
                let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
                kept.push(format!("{key}='{escaped}'"));
            }
        }
        return Ok((kept.join(" "), tls));
    };
    // tokio-postgres takes the credentials up to the first '@', then host and path up to
    // the first '?'.
    let after_credentials = body.find('@').map_or(0, |i| i + 1);
    let Some(q) = body[after_credentials..].find('?') else {
        return Ok((s.to_owned(), tls));
    };
    let query_start = s.len() - body.len() + after_credentials + q;
    let mut kept = Vec::new();
    for pair in s[query_start + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key);
        if !tls.take(&key, &percent_decode(value)) {
            kept.push(pair);
        }
    }
    let mut rest = s[..query_start].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, tls))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// `key = value` pairs with tokio-postgres's (and libpq's) quoting: values are bare or in
/// single quotes, a backslash escapes the next character.
fn key_value_pairs(s: &str) -> Result<Vec<(&str, String)>, DatabaseUrlError> {
    let mut pairs = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        if key.is_empty() {
            return Err(DatabaseUrlError::Syntax("a value without a key"));
        }
        rest = rest[key_end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or(DatabaseUrlError::Syntax("a key without `=`"))?
            .trim_start();
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let quoted = rest.starts_with('\'');
        if quoted {
            chars.next();
        }
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                '\'' if quoted => {
                    end = Some(i + 1);
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = match end {
            Some(end) => end,
            None if quoted => return Err(DatabaseUrlError::Syntax("an unterminated quoted value")),
            None => rest.len(),
        };
        if !quoted && value.is_empty() {
            return Err(DatabaseUrlError::Syntax("a key without a value"));
        }
        pairs.push((key, value));
        rest = rest[end..].trim_start();
    }
    Ok(pairs)
}

/// What the server's certificate is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

struct Setup {
    mode: SslMode,
    roots: RootCerts,
    client_cert: Option<PathBuf>,
    check: Check,
    config: Arc<ClientConfig>,
}

/// The TLS connector for tokio-postgres (a [`MakeTlsConnect`]): rustls with libpq's
/// `sslmode` semantics, ALPN `postgresql`, and `tls-server-end-point` channel binding for
/// SCRAM.
#[derive(Clone)]
pub struct PgTls {
    setup: Arc<Setup>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("sslmode", &self.setup.mode.as_str())
            .field("roots", &self.setup.roots)
            .finish_non_exhaustive()
    }
}

impl PgTls {
    fn new(
        mode: SslMode,
        roots: &RootCerts,
        client_cert: Option<&(PathBuf, PathBuf)>,
    ) -> Result<Self, DatabaseUrlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let check = match (mode, roots) {
            (SslMode::Disable, _) | (_, RootCerts::None) => Check::Nothing,
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            // libpq: with a root certificate, prefer and require check like verify-ca.
            _ => Check::Chain,
        };
        let any_certificate = || {
            Arc::new(PartialCheck {
                chain: None,
                provider: provider.clone(),
            })
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            _ if check == Check::Nothing => any_certificate(),
            RootCerts::None => any_certificate(),
            RootCerts::System => webpki(
                RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
                &provider,
                check,
            )?,
            RootCerts::File(path) => {
                let mut store = RootCertStore::empty();
                for (i, cert) in read_certs("sslrootcert", path)?.into_iter().enumerate() {
                    store.add(cert).map_err(|e| DatabaseUrlError::Content {
                        setting: "sslrootcert",
                        path: path.clone(),
                        problem: format!("has an unusable certificate (number {}): {e}", i + 1),
                    })?;
                }
                webpki(store, &provider, check)?
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(DatabaseUrlError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certs("sslcert", cert)?, read_key(key)?)
                .map_err(DatabaseUrlError::Tls)?,
        };
        // libpq 17 sends it; PostgreSQL 17 requires it with sslnegotiation=direct.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            setup: Arc::new(Setup {
                mode,
                roots: roots.clone(),
                client_cert: client_cert.map(|(cert, _)| cert.clone()),
                check,
                config: Arc::new(config),
            }),
        })
    }
}

fn webpki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
    check: Check,
) -> Result<Arc<dyn ServerCertVerifier>, DatabaseUrlError> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| DatabaseUrlError::Tls(rustls::Error::General(e.to_string())))?;
    Ok(match check {
        Check::Chain => Arc::new(PartialCheck {
            chain: Some(inner),
            provider: provider.clone(),
        }),
        _ => inner,
    })
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, DatabaseUrlError> {
    std::fs::read(path).map_err(|source| DatabaseUrlError::File {
        setting,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, DatabaseUrlError> {
    let pem = read_file(setting, path)?;
    let content = |problem: String| DatabaseUrlError::Content {
        setting,
        path: path.to_owned(),
        problem,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(content("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, DatabaseUrlError> {
    let pem = read_file("sslkey", path)?;
    // The error names the file only: a key's bytes never go into a message.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| DatabaseUrlError::Content {
        setting: "sslkey",
        path: path.to_owned(),
        problem: "holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })
}

/// The certificate checks below `verify-full` (which is rustls' own WebPKI verifier, host name
/// included). `chain` None: `require`/`prefer` without root certificates accept any certificate
/// (the connection is encrypted to whoever answered). `chain` Some: `verify-ca`, the full WebPKI
/// check (chain, validity, key usage) except the host name. Either way the handshake signatures
/// are checked, with the provider's algorithms (as the WebPKI verifier checks them).
#[derive(Debug)]
struct PartialCheck {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PartialCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the name last, so a name error means everything else passed.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = HandshakeError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, HandshakeError> {
        // The name is checked when the handshake starts: tokio-postgres asks for a connector
        // for every connection, also those (sslmode=disable, Unix sockets) that never use it.
        Ok(PgTlsConnect {
            setup: self.setup.clone(),
            host: domain.to_owned(),
        })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    setup: Arc<Setup>,
    host: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let fail = |reason: String| HandshakeError {
                host: self.host.clone(),
                mode: self.setup.mode,
                reason,
            };
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| fail("the host is not a valid DNS name or IP address".into()))?;
            let connector = tokio_rustls::TlsConnector::from(self.setup.config.clone());
            let stream = connector
                .connect(name, stream)
                .await
                .map_err(|e| fail(describe(&e, self.setup.check, &self.host)))?;
            let binding = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| tls_server_end_point(cert));
            Ok(PgTlsStream {
                inner: stream,
                binding,
            })
        })
    }
}

/// A failed TLS handshake, with the reason in words ("certificate verify failed: unknown
/// issuer", ...).
#[derive(Debug, thiserror::Error)]
#[error("TLS with {host} (sslmode={}) failed: {reason}", mode.as_str())]
pub struct HandshakeError {
    host: String,
    mode: SslMode,
    reason: String,
}

fn describe(e: &io::Error, check: Check, host: &str) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => {
                    "unknown issuer: the server's certificate is not signed by a CA in sslrootcert"
                        .to_owned()
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "host name mismatch: the server's certificate is not valid for {host:?} \
                     (verify-full checks the name; verify-ca does not)"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet".to_owned()
                }
                other => format!("{other:?}"),
            };
            let checked = match check {
                Check::ChainAndName => "chain and host name",
                _ => "chain",
            };
            format!("certificate verify failed ({checked} checked): {why}")
        }
        other => other.to_string(),
    }
}

/// A TLS connection to PostgreSQL.
pub struct PgTlsStream<S> {
    inner: tokio_rustls::client::TlsStream<S>,
    binding: Option<Vec<u8>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match &self.binding {
            Some(hash) => ChannelBinding::tls_server_end_point(hash.clone()),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929 `tls-server-end-point`: the server certificate hashed with its signature's hash
/// (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. `None` for other algorithms
/// (RSA-PSS, Ed25519): SCRAM then runs without channel binding.
fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    let (0x30, certificate, _) = der(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der(certificate)? else {
        return None;
    };
    let (0x30, algorithm, _) = der(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der(algorithm)? else {
        return None;
    };
    let bits = match oid {
        // md5, sha1, sha256, sha384, sha512 WithRSAEncryption
        [prefix @ .., last] if prefix == RSA => match last {
            0x04 | 0x05 | 0x0b => 256,
            0x0c => 384,
            0x0d => 512,
            _ => return None,
        },
        o if o == ECDSA_SHA1 => 256,
        [prefix @ .., last] if prefix == ECDSA_SHA2 => match last {
            0x02 => 256,
            0x03 => 384,
            0x04 => 512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match bits {
        256 => Sha256::digest(cert).to_vec(),
        384 => Sha384::digest(cert).to_vec(),
        _ => Sha512::digest(cert).to_vec(),
    })
}

/// One DER element: (tag, contents, what follows).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, after) = rest.split_at_checked(n)?;
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    let (contents, after) = rest.split_at_checked(len)?;
    Some((tag, contents, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, TlsSettings) {
        split_tls_settings(s).unwrap()
    }

    #[test]
    fn url_settings_are_taken_out_and_the_rest_kept_verbatim() {
        let (rest, tls) = split(
            "postgres://u:p%3Fw@db.example.com:5432/app?sslmode=verify-full&application_name=a%20b&sslrootcert=%2Fetc%2Fca%20x.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example.com:5432/app?application_name=a%20b&connect_timeout=3"
        );
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.rootcert.as_deref(), Some("/etc/ca x.pem"));

        let (rest, tls) = split("postgresql://h/db?sslmode=require");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));

        // A '?' in the password is part of the credentials, as for tokio-postgres.
        let (rest, tls) = split("postgres://u:a?b@h/db");
        assert_eq!(rest, "postgres://u:a?b@h/db");
        assert_eq!(tls, TlsSettings::default());
    }

    #[test]
    fn key_value_settings_are_taken_out_and_the_rest_requoted() {
        let (rest, tls) = split(
            "host=h sslmode = verify-ca password='p w\\'' sslrootcert='/a b/c\\'d.pem' user=x\\ y",
        );
        assert_eq!(rest, "host='h' password='p w\\'' user='x y'");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(tls.rootcert.as_deref(), Some("/a b/c'd.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"p w'"[..]));
        assert_eq!(parsed.get_user(), Some("x y"));

        for bad in ["host", "host=", "host='x", "=x"] {
            assert!(
                matches!(split_tls_settings(bad), Err(DatabaseUrlError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_knows() {
        let home = Path::new("/nonexistent-home");
        let cases = [
            ("host=h", SslMode::Prefer, PgSslMode::Prefer),
            (
                "host=h sslmode=disable",
                SslMode::Disable,
                PgSslMode::Disable,
            ),
            ("host=h sslmode=prefer", SslMode::Prefer, PgSslMode::Prefer),
            (
                "postgres://h/d?sslmode=require",
                SslMode::Require,
                PgSslMode::Require,
            ),
        ];
        for (s, mode, pg) in cases {
            let c = DatabaseConfig::parse(s, Some(home)).unwrap();
            assert_eq!(c.ssl_mode(), mode, "{s}");
            assert_eq!(c.get_ssl_mode(), pg, "{s}");
            assert_eq!(c.tls.setup.check, Check::Nothing, "{s}");
        }
        let c = DatabaseConfig::parse("host=h sslrootcert=system", Some(home)).unwrap();
        assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(c.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(c.tls.setup.check, Check::ChainAndName);
    }

    #[test]
    fn bad_settings_are_named_and_the_password_never_printed() {
        let home = Path::new("/nonexistent-home");
        let err = |s: &str| {
            let e = DatabaseConfig::parse(s, Some(home)).unwrap_err();
            let text = crate::error_chain::ErrorChain(&e).to_string();
            assert!(!text.contains("hunter2"), "{text}");
            (e, text)
        };
        let (e, text) = err("postgres://u:hunter2@h/d?sslmode=verify-everything");
        assert!(matches!(e, DatabaseUrlError::UnknownSslMode(_)), "{text}");
        assert!(text.contains("verify-everything"), "{text}");
        let (e, _) = err("postgres://u:hunter2@h/d?sslmode=allow");
        assert!(matches!(e, DatabaseUrlError::SslModeAllow));
        let (e, text) = err("postgres://u:hunter2@h/d?sslmode=verify-ca");
        assert!(
            matches!(e, DatabaseUrlError::NoRootCert("verify-ca")),
            "{text}"
        );
        let (e, text) =
            err("postgres://u:hunter2@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
        assert!(matches!(
            e,
            DatabaseUrlError::File {
                setting: "sslrootcert",
                ..
            }
        ));
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
        let (e, _) = err("password=hunter2 host=h sslrootcert=system sslmode=require");
        assert!(matches!(
            e,
            DatabaseUrlError::SystemRootsNeedVerifyFull("require")
        ));
        let (e, _) = err("password=hunter2 host=h sslmode=require sslcert=/x.pem");
        assert!(matches!(e, DatabaseUrlError::ClientCertPair));
        let (e, _) = err("password=hunter2 host=h sslsni=1");
        assert!(matches!(e, DatabaseUrlError::Parse(_)));

        let dir = std::env::temp_dir().join(format!("pgpay-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("ca.pem");
        std::fs::write(&not_pem, "hunter2 is not a certificate\n").unwrap();
        let (e, text) = err(&format!(
            "password=hunter2 host=h sslmode=verify-ca sslrootcert={}",
            not_pem.display()
        ));
        assert!(
            matches!(
                e,
                DatabaseUrlError::Content {
                    setting: "sslrootcert",
                    ..
                }
            ),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_root_cert_is_used_when_present() {
        let home = std::env::temp_dir().join(format!("pgpay-tls-home-{}", std::process::id()));
        std::fs::create_dir_all(home.join(".postgresql")).unwrap();
        // A missing file keeps require unverified; a present one is read (a bad one is an
        // error, as in libpq).
        let c = DatabaseConfig::parse("host=h sslmode=require", Some(&home)).unwrap();
        assert_eq!(c.tls.setup.check, Check::Nothing);
        std::fs::write(home.join(".postgresql/root.crt"), "not pem").unwrap();
        let e = DatabaseConfig::parse("host=h sslmode=require", Some(&home)).unwrap_err();
        assert!(matches!(e, DatabaseUrlError::Content { .. }), "{e}");
        // sslmode=disable reads no file.
        DatabaseConfig::parse("host=h sslmode=disable", Some(&home)).unwrap();
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn der_reader_rejects_truncation() {
        assert_eq!(
            der(&[0x30, 0x02, 0x05, 0x00]),
            Some((0x30, &[0x05, 0x00][..], &[][..]))
        );
        assert_eq!(der(&[0x30, 0x03, 0x05, 0x00]), None);
        assert_eq!(der(&[0x30, 0x81]), None);
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
    }
}
