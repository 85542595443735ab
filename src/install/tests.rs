use super::*;
use crate::sql::Relation;

#[test]
fn schema_version_matches_the_sql() {
    assert!(CORE_SQL.contains(&format!("VALUES ('schema_version', '{SCHEMA_VERSION}')")));
}

#[test]
fn fingerprint_changes_with_the_capture() {
    let c = CaptureConfig {
        name: "x".into(),
        table: Relation::parse("t").unwrap(),
        channel: "c".into(),
        key: "k".into(),
        when: None,
        columns: vec!["a".into()],
        ..trigger_defaults()
    };
    let mut d = c.clone();
    d.columns.push("b".into());
    assert_ne!(fingerprint(&c), fingerprint(&d));
    assert_eq!(fingerprint(&c), fingerprint(&c.clone()));
    let mut logical = c.clone();
    logical.method = CaptureMethod::Logical;
    assert_ne!(fingerprint(&c), fingerprint(&logical));
    // Logical template 6 (partitions): pinned, so that a new trigger template is seen to leave
    // logical captures current.
    assert_eq!(fingerprint(&logical), "7f811794d96177b1");
}

/// What a `[[capture]]` that names only the required keys gets.
fn trigger_defaults() -> CaptureConfig {
    toml::from_str(
        r#"name = "d"
table = "t"
channel = "c"
key = "k""#,
    )
    .unwrap()
}

#[test]
fn every_analytics_file_is_installed_in_order() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/analytics");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| format!("sql/analytics/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".sql"))
        .collect();
    files.sort();
    let listed: Vec<&str> = ANALYTICS_SQL.iter().map(|(n, _)| *n).collect();
    assert_eq!(listed, files);
}

#[test]
fn capture_sql_quotes_configured_names() {
    let c = CaptureConfig {
        name: "x".into(),
        table: Relation::parse("\"Odd\"\"Table\"").unwrap(),
        channel: "it's".into(),
        key: "k\"ey".into(),
        when: None,
        columns: vec!["a\"b".into()],
        ..trigger_defaults()
    };
    assert!(trigger_name(&c).len() + "_truncate".len() <= 63);
    let sql = capture_sql(&c);
    assert!(sql.contains("FROM \"Odd\"\"Table\" AS n"), "{sql}");
    assert!(sql.contains("'\"Odd\"\"Table\"'::regclass"), "{sql}");
    assert!(
        sql.contains("VALUES ('x', '\"Odd\"\"Table\"'::regclass, 'it''s',"),
        "{sql}"
    );
    assert!(sql.contains("n.\"k\"\"ey\"::text"), "{sql}");
    assert!(sql.contains("ARRAY['k\"ey', 'a\"b']"), "{sql}");
}

#[test]
fn logical_capture_sql_quotes_configured_names() {
    let c = CaptureConfig {
        name: "Odd".into(),
        table: Relation::parse("\"Odd\"\"Table\"").unwrap(),
        channel: "it's".into(),
        key: "k".into(),
        when: Some("status = 'scored'".into()),
        columns: vec![],
        method: CaptureMethod::Logical,
        ..trigger_defaults()
    };
    let sql = logical::install_sql(&c);
    assert!(
        sql.contains("ALTER TABLE \"Odd\"\"Table\" REPLICA IDENTITY FULL"),
        "{sql}"
    );
    assert!(
        sql.contains(
            "CREATE PUBLICATION \"mvrefresh_Odd\" FOR TABLE \"Odd\"\"Table\" WHERE (status = 'scored')"
        ),
        "{sql}"
    );
    // A partitioned table's leaves get the filter one by one, each name quoted by format().
    assert!(
        sql.contains(
            "EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s WHERE (%s)', 'mvrefresh_Odd', \
             r.rel, 'status = ''scored''');"
        ),
        "{sql}"
    );
    assert!(
        sql.contains("pg_partition_tree('\"Odd\"\"Table\"'::regclass)"),
        "{sql}"
    );
    assert!(
        sql.contains("VALUES ('Odd', '\"Odd\"\"Table\"'::regclass, 'it''s',"),
        "{sql}"
    );
    assert_eq!(c.slot_name(), "mvrefresh_odd");
}
