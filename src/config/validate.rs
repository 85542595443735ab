//! What serde cannot check: ranges, references between sections, names. Each check returns
//! the offending key and the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;

impl Config {
    /// Checks what serde cannot: ranges, references between sections, names.
    /// Returns the offending key and the problem.
    pub(super) fn validate(&self) -> Result<(), (String, String)> {
        self.validate_database()?;
        self.validate_timing()?;
        self.validate_alert()?;
        self.validate_serving()?;
        self.validate_captures()?;
        self.validate_views()
    }

    /// `[database]`: the URL (the whole connection setup) and the pool.
    fn validate_database(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        if self.database.url.trim().is_empty() {
            return err(
                "database.url",
                &format!("is empty; set it or the environment variable {ENV_DATABASE_URL}"),
            );
        }
        // The whole connection setup, TLS files included: a bad one is a configuration error.
        if let Err(e) = crate::db::Db::new(&self.database) {
            return err("database.url", &e.problem());
        }
        if self.database.pool_size < 2 {
            return err("database.pool_size", "must be at least 2");
        }
        positive("database.connect_timeout", self.database.connect_timeout)?;
        Ok(())
    }

    /// `[listener]`, `[debounce]`, `[refresh]`: durations, bounds, concurrency.
    fn validate_timing(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        positive(
            "listener.heartbeat_interval",
            self.listener.heartbeat_interval,
        )?;
        positive(
            "listener.heartbeat_timeout",
            self.listener.heartbeat_timeout,
        )?;
        positive("listener.reconnect_min", self.listener.reconnect_min)?;
        positive(
            "listener.catch_up_interval",
            self.listener.catch_up_interval,
        )?;
        if self.listener.reconnect_max < self.listener.reconnect_min {
            return err(
                "listener.reconnect_max",
                "must not be less than listener.reconnect_min",
            );
        }
        if self.listener.payload_key.is_empty() {
            return err("listener.payload_key", "must not be empty");
        }
        check_debounce("debounce", self.debounce)?;
        positive("refresh.timeout", self.refresh.timeout)?;
        positive("refresh.lock_timeout", self.refresh.lock_timeout)?;
        positive("refresh.retry_min", self.refresh.retry_min)?;
        positive("refresh.history_retention", self.refresh.history_retention)?;
        if self.refresh.retry_max < self.refresh.retry_min {
            return err(
                "refresh.retry_max",
                "must not be less than refresh.retry_min",
            );
        }
        if self.refresh.max_pending_keys == 0 {
            return err("refresh.max_pending_keys", "must be at least 1");
        }
        if self.refresh.batch_keys == 0 {
            return err("refresh.batch_keys", "must be at least 1");
        }
        if self.refresh.concurrency == 0 {
            return err("refresh.concurrency", "must be at least 1");
        }
        if self.refresh.concurrency >= self.database.pool_size {
            return err(
                "refresh.concurrency",
                "must be less than database.pool_size (one connection is kept for bookkeeping)",
            );
        }
        Ok(())
    }

    /// `[http]`, `[telemetry]`, `[log]`.
    fn validate_serving(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        if !(1..=10_000).contains(&self.http.max_connections) {
            return err("http.max_connections", "must be between 1 and 10000");
        }
        positive("telemetry.export_interval", self.telemetry.export_interval)?;
        positive("telemetry.export_timeout", self.telemetry.export_timeout)?;
        if let Some(e) = &self.telemetry.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return err(
                    "telemetry.otlp_endpoint",
                    "must be an http:// or https:// URL",
                );
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return err("log.level", &format!("is not a valid filter: {e}"));
        }
        Ok(())
    }

    /// `[[capture]]`: names that fit every generated identifier, channels, keys.
    fn validate_captures(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        let mut capture_names = BTreeSet::new();
        let mut slots = BTreeSet::new();
        for (i, c) in self.captures.iter().enumerate() {
            let at = |field: &str| format!("capture[{i}].{field}");
            if !is_simple_name(&c.name) {
                return err(
                    &at("name"),
                    &format!(
                        "must be 1 to {} letters, digits and underscores (it names the triggers and functions)",
                        MAX_CAPTURE_NAME
                    ),
                );
            }
            if !capture_names.insert(c.name.as_str()) {
                return err(&at("name"), &format!("`{}` is used twice", c.name));
            }
            check_channel(&at("channel"), &c.channel)?;
            if c.key.is_empty() {
                return err(&at("key"), "must name the key column");
            }
            // The install's generated SQL quotes function bodies with `$mvrefresh…$` tags.
            let quoted = [
                ("table", c.table.to_string()),
                ("channel", c.channel.clone()),
                ("key", c.key.clone()),
                ("when", c.when.clone().unwrap_or_default()),
            ];
            let columns = c.columns.iter().map(|col| ("columns", col.clone()));
            for (field, text) in quoted.into_iter().chain(columns) {
                if text.contains("$mvrefresh") {
                    return err(
                        &at(field),
                        "may not contain `$mvrefresh` (the install quotes its generated SQL with it)",
                    );
                }
            }
            if c.when.as_deref().is_some_and(|w| w.trim().is_empty()) {
                return err(&at("when"), "is empty; leave it out to capture every row");
            }
            if c.method == CaptureMethod::Trigger {
                if c.slot.is_some() {
                    return err(&at("slot"), "is only used with method = \"logical\"");
                }
                continue;
            }
            let slot = c.slot_name();
            if slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            {
                return err(
                    &at("slot"),
                    &format!(
                        "`{slot}` is not a replication slot name (1 to 63 lower-case letters, \
                         digits and underscores)"
                    ),
                );
            }
            if !slots.insert(slot.clone()) {
                return err(&at("slot"), &format!("`{slot}` is used by two captures"));
            }
            if c.poll_interval < Duration::from_millis(10) {
                return err(&at("poll_interval"), "must be at least 10ms");
            }
            if c.max_retained_wal_mb == 0 {
                return err(&at("max_retained_wal_mb"), "must be at least 1");
            }
        }
        Ok(())
    }

    /// `[[view]]`: names once each, channels, mode and function, `depends_on`, durations.
    fn validate_views(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        if self.views.is_empty() {
            return err("view", "at least one [[view]] is required");
        }
        let mut names = BTreeMap::new();
        for (i, v) in self.views.iter().enumerate() {
            if let Some(j) = names.insert(v.name.canonical(), i) {
                return err(
                    &format!("view[{i}].name"),
                    &format!("`{}` is also view[{j}]", v.name),
                );
            }
        }
        for (i, v) in self.views.iter().enumerate() {
            let at = |field: &str| format!("view[{i}].{field}");
            for (j, ch) in v.channels.iter().enumerate() {
                check_channel(&format!("view[{i}].channels[{j}]"), ch)?;
            }
            match (v.mode, &v.function) {
                (Mode::Incremental, None) => {
                    return err(&at("function"), "is required in mode `incremental`")
                }
                (Mode::Incremental, Some(_)) | (_, None) => {}
                (_, Some(_)) => return err(&at("function"), "is only used in mode `incremental`"),
            }
            if v.mode == Mode::Partitioned {
                if v.source.is_none() {
                    return err(
                        &at("source"),
                        "is required in mode `partitioned` (the view the table is kept equal to)",
                    );
                }
                match v.key.as_deref() {
                    None => return err(&at("key"), "is required in mode `partitioned`"),
                    Some(k) if k.is_empty() || k.contains('\0') => {
                        return err(&at("key"), "must name a column")
                    }
                    Some(_) => {}
                }
                if let Some(cols) = &v.unique {
                    if cols.is_empty() || cols.iter().any(|c| c.is_empty() || c.contains('\0')) {
                        return err(&at("unique"), "must name one or more columns");
                    }
                }
                if v.source.as_ref() == Some(&v.name) {
                    return err(&at("source"), "must not be the view itself");
                }
            } else {
                for (field, set) in [
                    ("source", v.source.is_some()),
                    ("key", v.key.is_some()),
                    ("unique", v.unique.is_some()),
                ] {
                    if set {
                        return err(&at(field), "is only used in mode `partitioned`");
                    }
                }
            }
            if let Some(deps) = &v.depends_on {
                for (j, d) in deps.iter().enumerate() {
                    let key = format!("view[{i}].depends_on[{j}]");
                    if !names.contains_key(&d.canonical()) {
                        return err(&key, &format!("`{d}` is not a configured [[view]]"));
                    }
                    if d == &v.name {
                        return err(&key, "a view cannot depend on itself");
                    }
                }
            }
            for (field, d) in [
                ("schedule", v.schedule),
                ("max_staleness", v.max_staleness),
                ("timeout", v.timeout),
            ] {
                if let Some(d) = d {
                    positive(&at(field), d)?;
                }
            }
            check_debounce(&format!("view[{i}]"), v.debounce(self.debounce))?;
        }
        Ok(())
    }

    fn validate_alert(&self) -> Result<(), (String, String)> {
        let err = |key: &str, msg: &str| Err((key.to_owned(), msg.to_owned()));
        let a = &self.alert;
        if let Some(url) = &a.webhook_url {
            let u = url.expose();
            // Never echo the URL: it may carry a token.
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return err(
                    "alert.webhook_url",
                    &format!("must be an http:// or https:// URL (or set {ENV_ALERT_WEBHOOK_URL})"),
                );
            }
            if reqwest::Url::parse(u).is_err() {
                return err("alert.webhook_url", "is not a valid URL");
            }
        }
        positive("alert.repeat_after", a.repeat_after)?;
        positive("alert.listener_down_after", a.listener_down_after)?;
        positive("alert.circuit_probe_min", a.circuit_probe_min)?;
        if a.circuit_probe_max < a.circuit_probe_min {
            return err(
                "alert.circuit_probe_max",
                "must not be less than alert.circuit_probe_min",
            );
        }
        if a.queue_size == 0 {
            return err("alert.queue_size", "must be at least 1");
        }
        positive("alert.timeout", a.timeout)?;
        positive("alert.retry_min", a.retry_min)?;
        if a.retry_max < a.retry_min {
            return err("alert.retry_max", "must not be less than alert.retry_min");
        }
        if a.max_attempts == 0 {
            return err("alert.max_attempts", "must be at least 1");
        }
        positive("pg_cron.poll_interval", self.pg_cron.poll_interval)?;
        if let Some(url) = &self.pg_cron.database_url {
            // Same checks as database.url (TLS files included); the problem never echoes the URL.
            let mut settings = self.database.clone();
            settings.url = url.expose().to_owned();
            if let Err(e) = crate::db::Db::new(&settings) {
                return err("pg_cron.database_url", &e.problem());
            }
        }
        Ok(())
    }
}

fn positive(key: &str, d: Duration) -> Result<(), (String, String)> {
    if d.is_zero() {
        Err((key.to_owned(), "must be greater than zero".to_owned()))
    } else {
        Ok(())
    }
}

fn check_debounce(prefix: &str, d: DebounceConfig) -> Result<(), (String, String)> {
    positive(&format!("{prefix}.max_wait"), d.max_wait)?;
    if d.quiet > d.max_wait {
        return Err((
            format!("{prefix}.quiet"),
            format!(
                "({}) must not exceed max_wait ({})",
                humantime::format_duration(d.quiet),
                humantime::format_duration(d.max_wait)
            ),
        ));
    }
    Ok(())
}

fn check_channel(key: &str, channel: &str) -> Result<(), (String, String)> {
    if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
        return Err((
            key.to_owned(),
            "a channel name must be 1 to 63 bytes".to_owned(),
        ));
    }
    Ok(())
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CAPTURE_NAME
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}
