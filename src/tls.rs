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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Socket;

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

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_owned(),
            what: "certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("sslkey", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            key: "sslkey",
            path: path.to_owned(),
            what: "private key",
        },
        source => TlsError::Pem {
            key: "sslkey",
            path: path.to_owned(),
            source,
        },
    })
}

fn load_roots(root: &RootCert) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            for cert in load_certs("sslrootcert", path)? {
                store.add(cert).map_err(|source| TlsError::Rejected {
                    key: "sslrootcert",
                    path: path.clone(),
                    source,
                })?;
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                return Err(TlsError::NoSystemRoots(if why.is_empty() {
                    String::new()
                } else {
                    format!(": {}", why.join("; "))
                }));
            }
        }
    }
    Ok(store)
}

/// `prefer`/`require` without a root certificate: encryption against passive eavesdropping
/// only. The handshake signatures are still checked (they prove the server holds the key of
/// the certificate it sent), the certificate itself is not.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (and `require` with a root certificate): the chain must lead to a trusted root;
/// the host name is not compared.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: Option<SslMode>, root: Option<RootCert>) -> TlsParams {
        TlsParams {
            mode,
            root_cert: root,
            ..TlsParams::default()
        }
    }

    #[test]
    fn url_without_tls_keys_is_untouched() {
        let url = "postgres://u:p%40ss@db:5432/app?application_name=x&connect_timeout=3";
        let (rest, p) = split(url).unwrap();
        assert_eq!(rest, url);
        assert_eq!(p, TlsParams::default());
        assert_eq!(p.mode(), SslMode::Prefer);
    }

    #[test]
    fn url_tls_keys_are_taken_out_and_decoded() {
        let url = "postgresql://u:pw@db/app?sslmode=verify-full&application_name=x\
                   &sslrootcert=%2Fetc%2Fpki%2Fmy%20ca.pem&sslcert=/c.pem&sslkey=/k%2Epem";
        let (rest, p) = split(url).unwrap();
        assert_eq!(rest, "postgresql://u:pw@db/app?application_name=x");
        assert_eq!(p.mode, Some(SslMode::VerifyFull));
        assert_eq!(
            p.root_cert,
            Some(RootCert::File("/etc/pki/my ca.pem".into()))
        );
        assert_eq!(p.cert, Some("/c.pem".into()));
        assert_eq!(p.key, Some("/k.pem".into()));
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn url_with_only_tls_keys_loses_the_query() {
        let (rest, p) = split("postgres://db/app?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!(rest, "postgres://db/app");
        assert_eq!(p.mode(), SslMode::VerifyCa);
        assert_eq!(p.root_cert, Some(RootCert::System));
    }

    #[test]
    fn url_last_occurrence_wins() {
        let (_, p) = split("postgres://db/app?sslmode=disable&sslmode=require").unwrap();
        assert_eq!(p.mode(), SslMode::Require);
    }

    #[test]
    fn url_bad_percent_encoding_names_the_key() {
        let e = split("postgres://db/app?sslrootcert=%zz").unwrap_err();
        assert_eq!(e.to_string(), "sslrootcert has an invalid percent-encoding");
        let e = split("postgres://db/app?sslkey=%ff").unwrap_err();
        assert!(e.to_string().starts_with("sslkey"), "{e}");
    }

    #[test]
    fn key_value_tls_keys_are_taken_out() {
        let conn = "host=db  user=u password=s3cret sslmode = verify-full \
                    sslrootcert='/etc/my ca.pem' dbname=app sslcert=/c\\ d.pem sslkey=/k.pem";
        let (rest, p) = split(conn).unwrap();
        assert_eq!(rest, "host=db user=u password=s3cret dbname=app");
        assert_eq!(p.mode, Some(SslMode::VerifyFull));
        assert_eq!(p.root_cert, Some(RootCert::File("/etc/my ca.pem".into())));
        assert_eq!(p.cert, Some("/c d.pem".into()));
        assert_eq!(p.key, Some("/k.pem".into()));
    }

    #[test]
    fn key_value_kept_pairs_are_verbatim() {
        let conn = r"host=db password='a \' b\\c' sslmode=require options='-c x=1'";
        let (rest, p) = split(conn).unwrap();
        assert_eq!(rest, r"host=db password='a \' b\\c' options='-c x=1'");
        assert_eq!(p.mode(), SslMode::Require);
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&br"a ' b\c"[..]));
    }

    #[test]
    fn key_value_escaped_quote_in_tls_value() {
        let (_, p) = split(r"sslrootcert='/tmp/o\'brien.pem' host=db").unwrap();
        assert_eq!(p.root_cert, Some(RootCert::File("/tmp/o'brien.pem".into())));
        let e = split("host=db sslrootcert='/tmp/x").unwrap_err();
        assert!(e.to_string().contains("sslrootcert"), "{e}");
    }

    #[test]
    fn bad_mode_is_named_and_bounded() {
        let e = split("postgres://db/app?sslmode=verify_full").unwrap_err();
        assert_eq!(
            e.to_string(),
            "sslmode=verify_full is not one of disable, allow, prefer, require, verify-ca, verify-full"
        );
        let e = split("host=db sslmode=averyveryverylongvaluethatgoeson").unwrap_err();
        assert!(!e.to_string().contains("goeson"), "{e}");
    }

    #[test]
    fn modes_map_to_the_driver() {
        use tokio_postgres::config::SslMode as D;
        let cases = [
            ("disable", D::Disable),
            ("allow", D::Prefer),
            ("prefer", D::Prefer),
            ("require", D::Require),
            ("verify-ca", D::Require),
            ("verify-full", D::Require),
        ];
        for (s, driver) in cases {
            let mode = SslMode::parse(s).unwrap();
            assert_eq!(mode.as_str(), s);
            assert_eq!(mode.driver_mode(), driver, "{s}");
        }
    }

    #[test]
    fn system_roots_default_to_verify_full_and_refuse_weaker_modes() {
        assert_eq!(
            params(None, Some(RootCert::System)).mode(),
            SslMode::VerifyFull
        );
        let e = params(Some(SslMode::VerifyCa), Some(RootCert::System))
            .connector()
            .err()
            .unwrap();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn verify_modes_need_a_root_cert() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = params(Some(mode), None).connector().err().unwrap();
            assert_eq!(
                e.to_string(),
                format!("sslmode={mode} needs sslrootcert (a PEM file of the CA certificates, or `system`)")
            );
        }
        params(Some(SslMode::Require), None).connector().unwrap();
        params(None, None).connector().unwrap();
    }

    #[test]
    fn unreadable_and_empty_files_are_named() {
        let missing = params(
            Some(SslMode::VerifyFull),
            Some(RootCert::File("/nonexistent/ca.pem".into())),
        );
        let e = missing.connector().err().unwrap().to_string();
        assert!(
            e.starts_with("sslrootcert=/nonexistent/ca.pem: cannot read"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("mvrefresh-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = params(Some(SslMode::VerifyCa), Some(RootCert::File(empty.clone())))
            .connector()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("empty.pem: no certificate"), "{e}");
        let half = TlsParams {
            cert: Some(empty.clone()),
            ..TlsParams::default()
        };
        let e = half.connector().err().unwrap().to_string();
        assert!(e.contains("sslcert is set without"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
