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
    };
    let mut d = c.clone();
    d.columns.push("b".into());
    assert_ne!(fingerprint(&c), fingerprint(&d));
    assert_eq!(fingerprint(&c), fingerprint(&c.clone()));
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
