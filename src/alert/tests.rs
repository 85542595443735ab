use super::delivery::*;
use super::*;
use crate::config::{AlertConfig, AlertFormat, Secret};
use crate::stats::Stats;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

#[test]
fn subjects_print_as_documented() {
    let cases = [
        (Subject::View("mv_x".into()), "view:mv_x"),
        (
            Subject::Key {
                view: "a_x".into(),
                key: "42".into(),
            },
            "key:a_x:42",
        ),
        (Subject::Circuit("mv_x".into()), "circuit:mv_x"),
        (Subject::Stale("mv_x".into()), "stale:mv_x"),
        (Subject::Listener, "listener"),
        (
            Subject::PgCronJob("mvrefresh:mv_x".into()),
            "pg_cron_job:mvrefresh:mv_x",
        ),
        (Subject::PgCronRun(7), "pg_cron_run:7"),
        (Subject::Test, "test"),
    ];
    for (subject, text) in cases {
        assert_eq!(subject.to_string(), text);
    }
}

fn failed(n: u64) -> Event {
    Event::new(
        Kind::RefreshFailed,
        Subject::View("mv".into()),
        "refresh of mv failed",
    )
    .view("mv")
    .error("boom")
    .failures(n)
}

#[test]
fn repeats_are_suppressed_until_repeat_after_and_recovery_closes() {
    let mut t = Tracker::new(Duration::from_secs(60), "h:1");
    let t0 = Instant::now();
    let first = t.fail(failed(1), t0).expect("opens");
    assert_eq!(first.status, AlertStatus::Firing);
    assert_eq!(first.consecutive_failures, Some(1));
    assert!(first.first_failure_at.is_some());
    for i in 2..10 {
        assert!(t.fail(failed(i), t0 + Duration::from_secs(i)).is_none());
    }
    let reminder = t.fail(failed(10), t0 + Duration::from_secs(61)).unwrap();
    assert!(reminder.reminder);
    assert_eq!(reminder.suppressed, 8);
    assert_eq!(reminder.first_failure_at, first.first_failure_at);
    let ok = Event::new(
        Kind::RefreshRecovered,
        Subject::View("mv".into()),
        "recovered",
    );
    let closed = t.recover(ok.clone()).unwrap();
    assert_eq!(closed.status, AlertStatus::Resolved);
    assert_eq!(closed.consecutive_failures, Some(10));
    assert!(t.recover(ok).is_none());
    assert!(!t.is_open(&Subject::View("mv".into())));
}

#[test]
fn json_has_the_v1_fields_and_slack_has_text() {
    let a = failed(3).into_alert("h:1");
    let v: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Json)).unwrap();
    assert_eq!(v["schema"], SCHEMA);
    assert_eq!(v["kind"], "refresh_failed");
    assert_eq!(v["status"], "firing");
    assert_eq!(v["consecutive_failures"], 3);
    assert_eq!(v["view"], "mv");
    let s: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Slack)).unwrap();
    let text = s["text"].as_str().unwrap();
    assert!(
        text.contains("refresh_failed") && text.contains("boom"),
        "{text}"
    );
}

#[test]
fn slack_text_cannot_mention_or_link() {
    let a = Event::new(
        Kind::RefreshFailed,
        Subject::View("<!here>".into()),
        "refresh of <@U123> failed & <!subteam^S1>",
    )
    .error("ERROR: value <!channel> in <http://evil.example|your bank> > 1 (detail: a&b)")
    .into_alert("h:1");
    let s: serde_json::Value = serde_json::from_slice(&render(&a, AlertFormat::Slack)).unwrap();
    let text = s["text"].as_str().unwrap();
    let (head, quoted) = text.split_once("\n> ").expect("the error is quoted");
    for part in [head, quoted] {
        assert!(!part.contains('<') && !part.contains('>'), "{text}");
    }
    assert!(text.contains("view:&lt;!here&gt;"), "{text}");
    assert!(
        text.contains("&lt;@U123&gt; failed &amp; &lt;!subteam^S1&gt;"),
        "{text}"
    );
    assert!(
        text.contains(
            "&lt;!channel&gt; in &lt;http://evil.example|your bank&gt; &gt; 1 (detail: a&amp;b)"
        ),
        "{text}"
    );
    assert_eq!(slack_escape("a & b"), "a &amp; b");
    assert_eq!(slack_escape("&amp;"), "&amp;amp;");
}

#[test]
fn signature_matches_rfc4231_case_2() {
    assert_eq!(
        signature(b"Jefe", b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn a_full_queue_drops_the_oldest_and_counts_it() {
    let stats = Arc::new(Stats::default());
    let queue = Arc::new(Queue {
        items: Mutex::new(VecDeque::new()),
        wake: Notify::new(),
        capacity: 3,
    });
    let alerts = Alerts {
        queue: Some(queue.clone()),
        stats: stats.clone(),
    };
    for n in 1..=5 {
        alerts.send(failed(n).into_alert("h:1"));
    }
    assert_eq!(stats.alerts_dropped.get(), 2);
    let kept: Vec<Option<u64>> = queue
        .items
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.consecutive_failures)
        .collect();
    assert_eq!(kept, vec![Some(3), Some(4), Some(5)]);
}

#[test]
fn webhook_debug_masks_url_and_secret() {
    let config = AlertConfig {
        webhook_url: Some(Secret::new("https://hooks.example/T0K3N")),
        secret: Some(Secret::new("s3cret")),
        ..AlertConfig::default()
    };
    let w = Webhook::new(&config).unwrap().unwrap();
    let shown = format!("{w:?}");
    assert!(
        !shown.contains("T0K3N") && !shown.contains("s3cret"),
        "{shown}"
    );
}
