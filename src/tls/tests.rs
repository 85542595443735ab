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
            format!(
                "sslmode={mode} needs sslrootcert (a PEM file of the CA certificates, or `system`)"
            )
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
