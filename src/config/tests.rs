use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_with_env(text, Path::new("test.toml"), &HashMap::new())
}

const MINIMAL: &str = r#"
[database]
url = "postgres://localhost/app"
[[view]]
name = "mv_a"
mode = "concurrently"
channels = ["c"]
"#;

#[test]
fn shipped_config_parses() {
    let text = include_str!("../../config.toml");
    let c = Config::from_str_with_env(text, Path::new("config.toml"), &HashMap::new())
        .expect("shipped config.toml is valid");
    assert_eq!(c.views.len(), 8);
    assert_eq!(c.debounce.quiet, Duration::from_secs(2));
    // The documented values are the defaults.
    let d = AlertConfig::default();
    assert_eq!(c.alert.webhook_url, None);
    assert_eq!(c.alert.format, d.format);
    assert_eq!(c.alert.repeat_after, d.repeat_after);
    assert_eq!(c.alert.listener_down_after, d.listener_down_after);
    assert_eq!(c.alert.circuit_failures, d.circuit_failures);
    assert_eq!(c.alert.circuit_probe_min, d.circuit_probe_min);
    assert_eq!(c.alert.circuit_probe_max, d.circuit_probe_max);
    assert_eq!(c.alert.queue_size, d.queue_size);
    assert_eq!(c.alert.timeout, d.timeout);
    assert_eq!(c.alert.retry_min, d.retry_min);
    assert_eq!(c.alert.retry_max, d.retry_max);
    assert_eq!(c.alert.max_attempts, d.max_attempts);
    assert_eq!(c.pg_cron.watch, PgCronConfig::default().watch);
    assert_eq!(c.pg_cron.poll_interval, Duration::from_secs(10));
    assert_eq!(c.http.max_connections, 32);
    assert_eq!(c.refresh.max_pending_keys, 10_000);
    assert_eq!(c.refresh.batch_keys, 1_000);
}

#[test]
fn a_capture_name_must_fit_every_generated_identifier() {
    let with = |name: &str| {
        format!(
            "{MINIMAL}[[capture]]\nname = \"{name}\"\ntable = \"t\"\nchannel = \"c\"\nkey = \"k\"\n"
        )
    };
    let longest = "n".repeat(MAX_CAPTURE_NAME);
    assert!(parse(&with(&longest)).is_ok());
    let e = parse(&with(&format!("{longest}n")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("capture[0].name"), "{e}");
    assert!(e.contains("1 to 36"), "{e}");
}

#[test]
fn a_capture_may_not_carry_the_installs_quoting_tag() {
    const CAPTURE: &str = "[[capture]]\nname = \"x\"\ntable = \"t\"\nchannel = \"c\"\nkey = \"k\"\ncolumns = [\"a\"]\n";
    let with = |field: &str| {
        // As a table: the quoted identifier "a$mvrefresh_b$".
        let odd = if field == "table" {
            "'\"a$mvrefresh_b$\"'"
        } else {
            "\"a$mvrefresh_b$\""
        };
        let capture = match field {
            "columns" => CAPTURE.replace("[\"a\"]", &format!("[{odd}]")),
            "when" => format!("{CAPTURE}when = {odd}\n"),
            _ => CAPTURE.replace(
                &format!("{field} = \"{}\"", &field[..1]),
                &format!("{field} = {odd}"),
            ),
        };
        format!("{MINIMAL}{capture}")
    };
    assert!(parse(&with("none")).is_ok());
    for field in ["table", "channel", "key", "columns", "when"] {
        let e = parse(&with(field)).unwrap_err().to_string();
        assert!(e.contains(&format!("capture[0].{field}")), "{field}: {e}");
        assert!(e.contains("may not contain `$mvrefresh`"), "{field}: {e}");
    }
}

#[test]
fn defaults_apply() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listener.catch_up_interval, Duration::from_secs(30));
    assert_eq!(
        c.views[0].debounce(c.debounce).max_wait,
        Duration::from_secs(15)
    );
}

#[test]
fn env_overrides_url() {
    let env = HashMap::from([(
        ENV_DATABASE_URL.to_owned(),
        "postgres://other/db".to_owned(),
    )]);
    let c = Config::from_str_with_env(MINIMAL, Path::new("x.toml"), &env).unwrap();
    assert_eq!(c.database.url, "postgres://other/db");
}

#[test]
fn unknown_key_names_file_key_and_line() {
    let text = MINIMAL.replace("[[view]]", "[debounce]\nquite = \"1s\"\n[[view]]");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.starts_with("test.toml: line 5"), "{msg}");
    assert!(msg.contains("quite"), "{msg}");
}

#[test]
fn bad_duration_names_key() {
    let text = MINIMAL.replace("[[view]]", "[debounce]\nquiet = \"soon\"\n[[view]]");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("key `debounce.quiet`"), "{msg}");
}

#[test]
fn quiet_above_max_wait_rejected() {
    let text = MINIMAL.replace(
        "[[view]]",
        "[debounce]\nquiet = \"20s\"\nmax_wait = \"5s\"\n[[view]]",
    );
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("key `debounce.quiet`"), "{msg}");
}

#[test]
fn incremental_needs_function() {
    let text = MINIMAL.replace("concurrently", "incremental");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("key `view[0].function`"), "{msg}");
}

#[test]
fn unknown_dependency_rejected() {
    let text = format!("{MINIMAL}depends_on = [\"mv_b\"]\n");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("view[0].depends_on[0]"), "{msg}");
}

#[test]
fn duplicate_view_rejected() {
    let text = format!("{MINIMAL}[[view]]\nname = \"MV_A\"\nmode = \"blocking\"\n");
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("view[1].name"), "{msg}");
}

#[test]
fn alert_env_overrides_and_masks() {
    let text = MINIMAL.replace(
        "[[view]]",
        "[alert]\nwebhook_url = \"http://file/hook\"\n[[view]]",
    );
    let env = HashMap::from([
        (
            ENV_ALERT_WEBHOOK_URL.to_owned(),
            "https://hooks.example/T0K3N".to_owned(),
        ),
        (ENV_ALERT_SECRET.to_owned(), "s3cret".to_owned()),
    ]);
    let c = Config::from_str_with_env(&text, Path::new("x.toml"), &env).unwrap();
    assert_eq!(
        c.alert.webhook_url.as_ref().unwrap().expose(),
        "https://hooks.example/T0K3N"
    );
    let shown = format!("{c:?}");
    assert!(!shown.contains("T0K3N"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[test]
fn a_section_that_sets_some_keys_keeps_the_defaults_of_the_others() {
    let text = MINIMAL.replace(
        "[[view]]",
        "[debounce]\nquiet = \"1s\"\n[alert]\nformat = \"slack\"\n[pg_cron]\nwatch = false\n\
         [refresh]\nbatch_keys = 10\n[[view]]",
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.debounce.quiet, Duration::from_secs(1));
    assert_eq!(c.debounce.max_wait, DebounceConfig::default().max_wait);
    assert_eq!(c.alert.format, AlertFormat::Slack);
    assert_eq!(c.alert.max_attempts, AlertConfig::default().max_attempts);
    assert!(!c.pg_cron.watch);
    assert_eq!(
        c.pg_cron.poll_interval,
        PgCronConfig::default().poll_interval
    );
    assert_eq!(c.refresh.batch_keys, 10);
    assert_eq!(c.refresh.timeout, RefreshConfig::default().timeout);
    assert_eq!(c.database.pool_size, DatabaseConfig::default().pool_size);
    // And a section left out is its defaults.
    assert_eq!(
        c.listener.payload_key,
        ListenerConfig::default().payload_key
    );
    assert!(PgCronConfig::default().watch);
}

fn with_env(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_str_with_env(text, Path::new("x.toml"), &env)
}

#[test]
fn admin_tokens_too_short_or_placeholders_are_refused_without_echo() {
    let cases = [
        ("sh0rt-T0K3N", "at least 32"),
        ("CHANGE-ME", "placeholder"),
        ("change-me-T0K3N-0123456789abcdef0123456789", "placeholder"),
        ("T0K3N0123456789abcdef0123456789abcdef\n", "printable ASCII"),
        ("T0K3N 0123456789abcdef0123456789abcdef", "printable ASCII"),
    ];
    for (token, expected) in cases {
        let e = with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, token)]).unwrap_err();
        assert!(matches!(e, ConfigError::Env { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(ENV_ADMIN_TOKEN), "{msg}");
        assert!(msg.contains(expected), "{msg}");
        assert!(msg.contains("openssl rand -hex 32"), "{msg}");
        assert!(!msg.contains("T0K3N"), "the token is echoed: {msg}");
    }
    let token = "0123456789abcdef0123456789abcdef";
    let c = with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, token)]).unwrap();
    assert_eq!(c.http.admin_token.unwrap().expose(), token);
    // Empty is unset: manual refresh off.
    assert!(with_env(MINIMAL, &[(ENV_ADMIN_TOKEN, "")])
        .unwrap()
        .http
        .admin_token
        .is_none());
}

#[test]
fn the_placeholder_alert_secret_is_refused() {
    let msg = with_env(MINIMAL, &[(ENV_ALERT_SECRET, "CHANGE-ME")])
        .unwrap_err()
        .to_string();
    assert!(msg.contains(ENV_ALERT_SECRET), "{msg}");
    assert!(msg.contains("openssl rand -hex 32"), "{msg}");
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let token = "0123456789abcdef0123456789abcdef";
    let listen = |addr: &str| {
        MINIMAL.replace(
            "[[view]]",
            &format!("[http]\nlisten = \"{addr}\"\n[[view]]"),
        )
    };
    for open in ["0.0.0.0:9187", "[::]:9187", "10.1.2.3:9187"] {
        let c = with_env(&listen(open), &[]).unwrap();
        let problem = c.http.exposure_problem().expect(open);
        assert!(problem.contains(ENV_ADMIN_TOKEN), "{problem}");
        assert!(problem.contains("http.listen"), "{problem}");
        let c = with_env(&listen(open), &[(ENV_ADMIN_TOKEN, token)]).unwrap();
        assert_eq!(c.http.exposure_problem(), None);
    }
    for closed in ["127.0.0.1:9187", "[::1]:9187", ""] {
        let c = with_env(&listen(closed), &[]).unwrap();
        assert_eq!(c.http.exposure_problem(), None, "{closed}");
    }
}

#[test]
fn max_connections_is_bounded() {
    for bad in [0, 10_001] {
        let text = MINIMAL.replace(
            "[[view]]",
            &format!("[http]\nmax_connections = {bad}\n[[view]]"),
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("key `http.max_connections`"), "{msg}");
    }
    assert_eq!(parse(MINIMAL).unwrap().http.max_connections, 32);
}

#[test]
fn bad_webhook_url_names_key_without_echo() {
    let text = MINIMAL.replace(
        "[[view]]",
        "[alert]\nwebhook_url = \"ftp://T0K3N@x\"\n[[view]]",
    );
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("key `alert.webhook_url`"), "{msg}");
    assert!(!msg.contains("T0K3N"), "{msg}");
}

#[test]
fn bad_url_does_not_echo_password() {
    let text = MINIMAL.replace(
        "postgres://localhost/app",
        "postgres://u:s3cret@localhost:notaport/app",
    );
    let msg = parse(&text).unwrap_err().to_string();
    assert!(msg.contains("database.url"), "{msg}");
    assert!(!msg.contains("s3cret"), "{msg}");
}

#[test]
fn bad_tls_settings_name_key_and_file_without_the_password() {
    let cases = [
        ("sslmode=verify_full", "sslmode=verify_full is not one of"),
        (
            "sslmode=verify-full",
            "sslmode=verify-full needs sslrootcert",
        ),
        (
            "sslmode=verify-ca&sslrootcert=%2Fno%2Fsuch%2Fca.pem",
            "sslrootcert=/no/such/ca.pem: cannot read",
        ),
    ];
    for (query, expected) in cases {
        let url = format!("postgres://u:s3cret@localhost/app?{query}");
        let msg = parse(&MINIMAL.replace("postgres://localhost/app", &url))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("key `database.url`"), "{msg}");
        assert!(msg.contains(expected), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }
}

#[test]
fn names_and_addresses_are_parsed_at_load_naming_the_key_and_line() {
    let bad_name = MINIMAL.replace("name = \"mv_a\"", "name = \"mv a\"");
    let msg = parse(&bad_name).unwrap_err().to_string();
    assert!(msg.contains("key `view[0].name`"), "{msg}");
    assert!(msg.contains("line 5, column 8"), "{msg}");
    assert!(msg.contains("not allowed in an unquoted name"), "{msg}");

    let bad_dep = format!("{MINIMAL}depends_on = [\"a.b.c\"]\n");
    let msg = parse(&bad_dep).unwrap_err().to_string();
    assert!(msg.contains("key `view[0].depends_on[0]`"), "{msg}");

    let bad_listen = MINIMAL.replace("[[view]]", "[http]\nlisten = \"localhost\"\n[[view]]");
    let msg = parse(&bad_listen).unwrap_err().to_string();
    assert!(msg.contains("key `http.listen`"), "{msg}");
    assert!(msg.contains("`localhost` is not an address"), "{msg}");

    let off = MINIMAL.replace("[[view]]", "[http]\nlisten = \" \"\n[[view]]");
    assert_eq!(parse(&off).unwrap().http.address(), None);
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.http.address(), Some("127.0.0.1:9187".parse().unwrap()));
    let quoted = MINIMAL.replace("name = \"mv_a\"", "name = '\"Odd\".\"Mv.A\"'");
    let v = &parse(&quoted).unwrap().views[0];
    assert_eq!(v.name.schema.as_deref(), Some("Odd"));
    assert_eq!(v.name.name, "Mv.A");
}
