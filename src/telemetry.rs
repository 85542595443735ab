//! Metrics through the OpenTelemetry API: one meter provider, two readers — a Prometheus registry
//! served at `GET /metrics`, and OTLP over HTTP/protobuf pushed every `export_interval` when an
//! endpoint is configured (`[telemetry] otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! Instruments (Prometheus names):
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `mvrefresh_notifications_received_total` | counter | channel | notifications received |
//! | `mvrefresh_notifications_rejected_total` | counter | channel, reason | payloads that named no usable key |
//! | `mvrefresh_refreshes_total` | counter | view, outcome | refreshes by outcome (`success`, `failure`, `skipped`, `busy`) |
//! | `mvrefresh_refresh_duration_seconds` | histogram | view | duration of successful refreshes (10 ms … 10 min) |
//! | `mvrefresh_refresh_keys` | histogram | view | keys per incremental refresh |
//! | `mvrefresh_pending_keys` | gauge | view | keys waiting for a refresh |
//! | `mvrefresh_pending_oldest_age_seconds` | gauge | view | age of the oldest change not yet reflected (0 when none) |
//! | `mvrefresh_last_success_age_seconds` | gauge | view | seconds since the last successful refresh |
//! | `mvrefresh_listener_connected` | gauge | | 1 while the LISTEN connection is up |
//! | `mvrefresh_listener_reconnects_total` | counter | | reconnections of the LISTEN connection |
//! | `mvrefresh_heartbeat_latency_seconds` | gauge | | the last heartbeat's round trip |
//! | `mvrefresh_catch_ups_total` | counter | | reads of the change log |
//! | `mvrefresh_collected_keys_total` | counter | | dirty keys taken from the capture (one per key and collect, whatever the rows written) |
//! | `mvrefresh_alerts_sent_total`, `_failed_total`, `_dropped_total` | counter | | alert deliveries |
//! | `mvrefresh_pg_cron_failed_runs_total` | counter | | failed pg_cron runs seen |
//! | `mvrefresh_logical_messages_total` | counter | | messages decoded from logical captures' slots |
//! | `mvrefresh_logical_wal_flushes_total` | counter | | write-ahead log flushes a logical capture's reader asked for (asynchronous commits not yet flushed) |
//! | `mvrefresh_slot_retained_bytes` | gauge | slot | write-ahead log a logical capture's slot holds back |
//! | `mvrefresh_http_connections` | gauge | | connections open to the admin server |
//! | `mvrefresh_http_refused_total` | counter | | admin connections refused (`[http] max_connections` open) |
//! | `mvrefresh_build_info` | gauge | version | always 1 |

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;
use crate::stats::Stats;

/// Histogram boundaries for refresh durations, in seconds: 10 ms … 10 min.
const DURATION_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 450.0, 600.0,
];
const KEY_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the Prometheus exporter: {0}")]
    Prometheus(String),
    #[error("cannot set up the OTLP exporter (telemetry.otlp_endpoint): {0}")]
    Otlp(String),
}

/// The meter provider and what reads it.
pub struct Telemetry {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    pub metrics: Metrics,
    otlp: bool,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otlp", &self.otlp)
            .finish()
    }
}

/// How a refresh attempt ended: the `outcome` label of `mvrefresh_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    Success,
    Failure,
    /// Another replica had covered the changes already.
    Skipped,
    /// Another replica was refreshing the view; retried later.
    Busy,
}

impl RefreshOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Success => "success",
            RefreshOutcome::Failure => "failure",
            RefreshOutcome::Skipped => "skipped",
            RefreshOutcome::Busy => "busy",
        }
    }
}

/// The synchronous instruments, recorded where things happen, in one call per event: where the
/// process itself reads a count (notifications received: the listener's liveness; failed
/// refreshes), the call also moves the counter of [`Stats`].
#[derive(Clone)]
pub struct Metrics {
    stats: Arc<Stats>,
    notifications: Counter<u64>,
    rejected: Counter<u64>,
    refreshes: Counter<u64>,
    duration: Histogram<f64>,
    keys: Histogram<u64>,
}

impl Metrics {
    pub fn notification(&self, channel: &str) {
        self.stats.notifications_received.inc();
        self.notifications
            .add(1, &[KeyValue::new("channel", channel.to_owned())]);
    }

    pub fn rejected(&self, channel: &str, reason: &'static str) {
        self.rejected.add(
            1,
            &[
                KeyValue::new("channel", channel.to_owned()),
                KeyValue::new("reason", reason),
            ],
        );
    }

    /// One refresh attempt's outcome; `duration` and `keys` for successful ones.
    pub fn refresh(
        &self,
        view: &str,
        outcome: RefreshOutcome,
        duration: Option<Duration>,
        keys: Option<usize>,
    ) {
        if outcome == RefreshOutcome::Failure {
            self.stats.refreshes_failed.inc();
        }
        let view = KeyValue::new("view", view.to_owned());
        self.refreshes.add(
            1,
            &[view.clone(), KeyValue::new("outcome", outcome.as_str())],
        );
        if let Some(d) = duration {
            self.duration
                .record(d.as_secs_f64(), std::slice::from_ref(&view));
        }
        if let Some(k) = keys {
            self.keys.record(k as u64, &[view]);
        }
    }
}

impl Telemetry {
    /// Builds the provider with its readers and registers every instrument. Gauges read `stats`.
    pub fn new(config: &TelemetryConfig, stats: Arc<Stats>) -> Result<Telemetry, TelemetryError> {
        crate::install_tls_provider();
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| TelemetryError::Prometheus(e.to_string()))?;
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(prometheus);
        let endpoint = config
            .otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|e| !e.trim().is_empty());
        let otlp = endpoint.is_some();
        if let Some(endpoint) = endpoint {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_endpoint(metrics_endpoint(&endpoint))
                .with_timeout(config.export_timeout)
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let reader = PeriodicReader::builder(exporter)
                .with_interval(config.export_interval)
                .build();
            builder = builder.with_reader(reader);
        }
        let provider = builder.build();
        let meter = provider.meter("mvrefresh");
        let metrics = instruments(&meter, stats);
        Ok(Telemetry {
            provider,
            registry,
            metrics,
            otlp,
        })
    }

    /// The Prometheus text exposition of every instrument.
    pub fn prometheus_text(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Pushes what is pending (OTLP) and stops the readers. Blocking: call it off the async
    /// runtime (the OTLP reader uses a blocking HTTP client on its own thread).
    pub fn shutdown(&self) {
        if self.otlp {
            if let Err(e) = self.provider.force_flush() {
                tracing::warn!(error = %e, "could not flush metrics");
            }
        }
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "meter provider shutdown");
        }
    }
}

/// The OTLP/HTTP metrics URL: `…/v1/metrics` appended to a base endpoint, kept when given.
fn metrics_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/metrics") {
        e.to_owned()
    } else {
        format!("{e}/v1/metrics")
    }
}

/// Every instrument, registered once. Long on purpose: a flat list, one entry per metric with its
/// name and description, so the exported names can be read (and grepped) in one place.
fn instruments(meter: &Meter, stats: Arc<Stats>) -> Metrics {
    let metrics = Metrics {
        stats: stats.clone(),
        notifications: meter
            .u64_counter("mvrefresh.notifications.received")
            .with_description("Notifications received on the LISTEN connection")
            .build(),
        rejected: meter
            .u64_counter("mvrefresh.notifications.rejected")
            .with_description("Notification payloads that named no usable key")
            .build(),
        refreshes: meter
            .u64_counter("mvrefresh.refreshes")
            .with_description("Refresh attempts by view and outcome")
            .build(),
        duration: meter
            .f64_histogram("mvrefresh.refresh.duration")
            .with_description("Duration of successful refreshes")
            .with_unit("s")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build(),
        keys: meter
            .u64_histogram("mvrefresh.refresh.keys")
            .with_description("Keys covered by one incremental refresh")
            .with_boundaries(KEY_BUCKETS.to_vec())
            .build(),
    };

    let per_view = |f: fn(&crate::stats::ViewGauges, Instant) -> f64| {
        let stats = stats.clone();
        move |o: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
            let now = Instant::now();
            if let Ok(views) = stats.views.lock() {
                for v in views.iter() {
                    o.observe(f(v, now), &[KeyValue::new("view", v.name.clone())]);
                }
            }
        }
    };
    meter
        .f64_observable_gauge("mvrefresh.pending.keys")
        .with_description("Keys waiting for a refresh (pending or in flight)")
        .with_callback(per_view(|v, _| v.pending_keys as f64))
        .build();
    meter
        .f64_observable_gauge("mvrefresh.pending.oldest_age")
        .with_description("Age of the oldest change not yet reflected in the view (0 when none)")
        .with_unit("s")
        .with_callback(per_view(|v, now| {
            v.oldest_pending
                .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64())
        }))
        .build();
    meter
        .f64_observable_gauge("mvrefresh.last_success.age")
        .with_description("Seconds since the view's last successful refresh (-1 when never)")
        .with_unit("s")
        .with_callback(per_view(|v, now| {
            v.last_success
                .map_or(-1.0, |t| now.saturating_duration_since(t).as_secs_f64())
        }))
        .build();

    let gauge = |name: &'static str,
                 description: &'static str,
                 unit: Option<&'static str>,
                 f: fn(&Stats) -> f64| {
        let stats = stats.clone();
        let mut b = meter
            .f64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |o| o.observe(f(&stats), &[]));
        if let Some(u) = unit {
            b = b.with_unit(u);
        }
        b.build();
    };
    gauge(
        "mvrefresh.listener.connected",
        "1 while the LISTEN connection is up",
        None,
        |s| f64::from(u8::from(s.listener_connected.get())),
    );
    gauge(
        "mvrefresh.http.connections",
        "Connections open to the admin HTTP server",
        None,
        |s| s.http_connections.get() as f64,
    );
    gauge(
        "mvrefresh.heartbeat.latency",
        "Round trip of the last heartbeat query on the LISTEN connection",
        Some("s"),
        |s| s.heartbeat_latency.get().as_secs_f64(),
    );

    let counter = |name: &'static str, description: &'static str, f: fn(&Stats) -> u64| {
        let stats = stats.clone();
        meter
            .u64_observable_counter(name)
            .with_description(description)
            .with_callback(move |o| o.observe(f(&stats), &[]))
            .build();
    };
    counter(
        "mvrefresh.listener.reconnects",
        "Reconnections of the LISTEN connection",
        |s| s.listener_reconnects.get(),
    );
    counter("mvrefresh.catch_ups", "Reads of the change log", |s| {
        s.catch_ups.get()
    });
    counter(
        "mvrefresh.collected_keys",
        "Dirty keys taken from the capture",
        |s| s.collected_keys.get(),
    );
    counter(
        "mvrefresh.alerts.sent",
        "Alerts delivered to the webhook",
        |s| s.alerts_sent.get(),
    );
    counter(
        "mvrefresh.alerts.failed",
        "Alert deliveries that failed (after retries)",
        |s| s.alerts_failed.get(),
    );
    counter(
        "mvrefresh.alerts.dropped",
        "Alerts dropped because the delivery queue was full",
        |s| s.alerts_dropped.get(),
    );
    counter(
        "mvrefresh.http.refused",
        "Admin HTTP connections refused because [http] max_connections were open",
        |s| s.http_refused.get(),
    );
    counter(
        "mvrefresh.pg_cron.failed_runs",
        "Failed pg_cron job runs seen",
        |s| s.pg_cron_failed_runs.get(),
    );
    counter(
        "mvrefresh.logical.messages",
        "Messages decoded from logical captures' replication slots",
        |s| s.logical_messages.get(),
    );
    counter(
        "mvrefresh.logical.wal_flushes",
        "Write-ahead log flushes a logical capture's reader asked for",
        |s| s.logical_wal_flushes.get(),
    );
    let slots = stats.clone();
    meter
        .f64_observable_gauge("mvrefresh.slot.retained")
        .with_description("Write-ahead log a logical capture's replication slot holds back")
        .with_unit("By")
        .with_callback(move |o| {
            if let Ok(slots) = slots.slots_retained.lock() {
                for (slot, bytes) in slots.iter() {
                    o.observe(*bytes as f64, &[KeyValue::new("slot", slot.clone())]);
                }
            }
        })
        .build();
    meter
        .u64_observable_gauge("mvrefresh.build.info")
        .with_description("Build information (always 1)")
        .with_callback(|o| {
            o.observe(1, &[KeyValue::new("version", env!("CARGO_PKG_VERSION"))]);
        })
        .build();
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `mvrefresh_*` series the dashboard and the alert rules use is exported.
    #[test]
    fn dashboard_and_alert_rules_use_existing_metrics() {
        let stats = Arc::new(Stats::default());
        let t = Telemetry::new(&TelemetryConfig::default(), stats.clone()).unwrap();
        t.metrics.refresh(
            "v",
            RefreshOutcome::Success,
            Some(Duration::from_secs(1)),
            Some(1),
        );
        t.metrics.notification("c");
        t.metrics.rejected("c", "r");
        if let Ok(mut views) = stats.views.lock() {
            views.push(crate::stats::ViewGauges {
                name: "v".into(),
                pending_keys: 0,
                oldest_pending: None,
                last_success: None,
            });
        }
        if let Ok(mut slots) = stats.slots_retained.lock() {
            slots.insert("s".into(), 0);
        }
        let exported = t.prometheus_text();
        for file in [
            "deploy/grafana/mvrefresh-dashboard.json",
            "deploy/prometheus/mvrefresh-alerts.yml",
        ] {
            let text =
                std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("mvrefresh_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&format!("\n{name}{{"))
                        || exported.contains(&format!("\n{name} ")),
                    "{file} uses {name}, which is not exported"
                );
                rest = &rest[at + name.len()..];
            }
        }
    }

    #[test]
    fn metrics_endpoint_appends_the_path_once() {
        assert_eq!(
            metrics_endpoint("http://c:4318"),
            "http://c:4318/v1/metrics"
        );
        assert_eq!(
            metrics_endpoint("http://c:4318/"),
            "http://c:4318/v1/metrics"
        );
        assert_eq!(
            metrics_endpoint("http://c:4318/v1/metrics"),
            "http://c:4318/v1/metrics"
        );
    }

    #[test]
    fn prometheus_names_and_help() {
        let stats = Arc::new(Stats::default());
        let t = Telemetry::new(&TelemetryConfig::default(), stats.clone()).unwrap();
        t.metrics.refresh(
            "mv_x",
            RefreshOutcome::Success,
            Some(Duration::from_millis(30)),
            Some(3),
        );
        t.metrics.notification("ch");
        stats.listener_reconnects.add(2);
        let text = t.prometheus_text();
        for name in [
            "mvrefresh_refreshes_total{outcome=\"success\",view=\"mv_x\",otel_scope_name=\"mvrefresh\"} 1",
            "mvrefresh_refresh_duration_seconds_bucket{view=\"mv_x\",otel_scope_name=\"mvrefresh\",le=\"0.05\"} 1",
            "mvrefresh_refresh_keys_bucket",
            "mvrefresh_notifications_received_total{channel=\"ch\",otel_scope_name=\"mvrefresh\"} 1",
            "mvrefresh_listener_reconnects_total{otel_scope_name=\"mvrefresh\"} 2",
            "mvrefresh_listener_connected{otel_scope_name=\"mvrefresh\"} 0",
            "# HELP mvrefresh_refreshes_total Refresh attempts by view and outcome",
            "mvrefresh_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
