//! TLS to PostgreSQL with rustls, configured by libpq's keys in the connection string.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` only, and none of the certificate keys,
//! so [`split`] takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the connection
//! string (URL or key=value form) before the driver parses the rest, and [`TlsParams::connector`]
//! builds the one connector every connection uses: the refresh pool, the LISTEN connection,
//! one-shot commands, and server-side cancel.
//!
//! | `sslmode` | encrypted | certificate chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `allow`, `prefer` (default) | when the server offers it, else **plaintext** | no | no |
//! | `require` | always | only when `sslrootcert` is set (then as `verify-ca`, like libpq) | no |
//! | `verify-ca` | always | against `sslrootcert` | no |
//! | `verify-full` | always | against `sslrootcert` | yes |
//!
//! `sslrootcert` is a PEM file of trusted CA certificates, or `system` for the platform's trust
//! store (as in libpq 16, `system` makes `verify-full` the default and refuses weaker modes: any
//! public CA can issue a certificate for some other host). `sslcert` + `sslkey` (PEM) present a
//! client certificate. libpq's implicit `~/.postgresql/root.crt` is not read: name the file.
//! Over a Unix socket TLS does not apply, as in libpq ([`crate::db::Db::new`] sees to that).
//!
//! Errors name the key and the file, never the connection string (it may hold a password).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::ClientConfig;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;

mod certs;
#[cfg(test)]
mod tests;

use certs::{load_certs, load_key, load_roots, ChainOnly, NoVerification};

/// The connector of every connection (cheap to clone: the rustls config is shared).
pub type MakeTls = tokio_postgres_rustls::MakeRustlsConnect;
/// The stream of a connection made with [`MakeTls`] (plain or encrypted).
pub type TlsStream = <MakeTls as MakeTlsConnect<Socket>>::Stream;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// Treated as `prefer` (tokio-postgres cannot try plaintext first).
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(s: &str) -> Option<SslMode> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// What tokio-postgres is told: whether to ask for TLS and whether to insist.
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Allow | SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }

    /// Whether a session may end up unencrypted.
    pub fn may_be_plaintext(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sslrootcert`: the CAs a server certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// The platform's trust store (`sslrootcert=system`).
    System,
}

/// The TLS keys of a connection string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsParams {
    /// `sslmode` as written (`None`: the default).
    pub mode: Option<SslMode>,
    pub root_cert: Option<RootCert>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A TLS setting that cannot be used. The message names the key and the file; the caller
/// prefixes the config key (`database.url`).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("sslmode={0} is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    BadMode(String),
    #[error("{key} has an invalid percent-encoding")]
    BadEncoding { key: &'static str },
    #[error("unterminated quoted value of {key}")]
    Unterminated { key: &'static str },
    #[error("sslmode={0} needs sslrootcert (a PEM file of the CA certificates, or `system`)")]
    NoRootCert(SslMode),
    #[error("sslrootcert=system needs sslmode=verify-full (got sslmode={0}): with the platform's roots, any public CA could vouch for another host")]
    SystemNeedsVerifyFull(SslMode),
    #[error("sslcert and sslkey go together: {0} is set without the other")]
    HalfClientCert(&'static str),
    #[error("{key}={}: cannot read: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}={}: not valid PEM: {source}", path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{key}={}: no {what} in the file", path.display())]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{key}={}: {source}", path.display())]
    Rejected {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("sslrootcert=system: no usable certificate in the platform's trust store{0}")]
    NoSystemRoots(String),
    #[error("sslcert/sslkey: {0}")]
    ClientCert(#[source] rustls::Error),
}

/// The keys taken out of connection strings (tokio-postgres rejects them or lacks the modes).
const KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// Splits a connection string into what tokio-postgres parses (everything but the TLS keys,
/// otherwise untouched) and the TLS keys. Later occurrences of a key win, as in libpq.
pub fn split(conn: &str) -> Result<(String, TlsParams), TlsError> {
    let mut params = TlsParams::default();
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        split_url(conn, &mut params)?
    } else {
        split_key_value(conn, &mut params)?
    };
    Ok((rest, params))
}

fn split_url(conn: &str, params: &mut TlsParams) -> Result<String, TlsError> {
    let Some((base, query)) = conn.split_once('?') else {
        return Ok(conn.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match KEYS.iter().find(|k| **k == key) {
            Some(&key) => params.set(key, &percent_decode(value, key)?)?,
            None if pair.is_empty() => {}
            None => kept.push(pair),
        }
    }
    Ok(if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

/// libpq's `key = value` form: values are bare (backslash escapes) or single-quoted. Kept pairs
/// are copied verbatim.
fn split_key_value(conn: &str, params: &mut TlsParams) -> Result<String, TlsError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut chars = conn.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &conn[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        // A malformed pair is left for tokio-postgres to reject with its own message.
        let ours = KEYS.iter().find(|k| **k == key).copied();
        let mut value = String::new();
        let mut end = key_end;
        if chars.next_if(|(_, c)| *c == '=').is_some() {
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
            let mut closed = !quoted;
            while let Some(&(i, c)) = chars.peek() {
                if !quoted && c.is_whitespace() {
                    break;
                }
                chars.next();
                end = i + c.len_utf8();
                match c {
                    '\'' if quoted => {
                        closed = true;
                        break;
                    }
                    '\\' => {
                        if let Some((j, escaped)) = chars.next() {
                            end = j + escaped.len_utf8();
                            value.push(escaped);
                        }
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                if let Some(key) = ours {
                    return Err(TlsError::Unterminated { key });
                }
            }
        }
        match ours {
            Some(key) => params.set(key, &value)?,
            None => kept.push(&conn[start..end.max(key_end)]),
        }
    }
    Ok(kept.join(" "))
}

fn percent_decode(s: &str, key: &'static str) -> Result<String, TlsError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(TlsError::BadEncoding { key })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsError::BadEncoding { key })
}

impl TlsParams {
    fn set(&mut self, key: &str, value: &str) -> Result<(), TlsError> {
        match key {
            "sslmode" => {
                let mode = SslMode::parse(value).ok_or_else(|| {
                    // Not a secret, but bounded: a mangled string could carry anything.
                    TlsError::BadMode(value.chars().take(20).collect())
                })?;
                self.mode = Some(mode);
            }
            "sslrootcert" => {
                self.root_cert = Some(match value {
                    "system" => RootCert::System,
                    path => RootCert::File(PathBuf::from(path)),
                });
            }
            "sslcert" => self.cert = Some(PathBuf::from(value)),
            "sslkey" => self.key = Some(PathBuf::from(value)),
            _ => unreachable!("only KEYS are set"),
        }
        Ok(())
    }

    /// The mode in force: as written, else `verify-full` with `sslrootcert=system`, else
    /// `prefer`.
    pub fn mode(&self) -> SslMode {
        match (self.mode, &self.root_cert) {
            (Some(mode), _) => mode,
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (None, _) => SslMode::Prefer,
        }
    }

    /// Whether the server's certificate chain is checked against `sslrootcert`.
    pub fn verifies_chain(&self) -> bool {
        match self.mode() {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
        }
    }

    /// The connector for these settings: reads and checks the certificate files.
    pub fn connector(&self) -> Result<MakeTls, TlsError> {
        let mode = self.mode();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, &self.root_cert) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(TlsError::NoRootCert(mode))
            }
            (m, Some(RootCert::System)) if m != SslMode::VerifyFull => {
                return Err(TlsError::SystemNeedsVerifyFull(m))
            }
            (SslMode::Disable | SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => {
                Arc::new(NoVerification(provider.clone()))
            }
            (SslMode::Require | SslMode::VerifyCa, Some(root)) => Arc::new(ChainOnly {
                roots: Arc::new(load_roots(root)?),
                provider: provider.clone(),
            }),
            (SslMode::VerifyFull, Some(root)) => {
                let roots = Arc::new(load_roots(root)?);
                WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| match root {
                        RootCert::File(path) => TlsError::Rejected {
                            key: "sslrootcert",
                            path: path.clone(),
                            source: rustls::Error::General(e.to_string()),
                        },
                        RootCert::System => TlsError::NoSystemRoots(format!(": {e}")),
                    })?
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => return Err(TlsError::HalfClientCert("sslcert")),
            (None, Some(_)) => return Err(TlsError::HalfClientCert("sslkey")),
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs("sslcert", cert)?, load_key(key)?)
                .map_err(TlsError::ClientCert)?,
        };
        Ok(MakeTls::new(config))
    }
}
