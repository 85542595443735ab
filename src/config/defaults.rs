//! The defaults, one `Default` per section; the shipped `config.toml` documents each (a unit
//! test parses it and compares).

use std::net::SocketAddr;
use std::time::Duration;

use super::*;

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            format: AlertFormat::Json,
            repeat_after: Duration::from_secs(3600),
            listener_down_after: Duration::from_secs(60),
            circuit_failures: 5,
            circuit_probe_min: Duration::from_secs(30),
            circuit_probe_max: Duration::from_secs(600),
            queue_size: 1000,
            timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            max_attempts: 8,
            secret: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9187))),
            max_connections: 32,
            admin_token: None,
        }
    }
}

impl Default for PgCronConfig {
    fn default() -> Self {
        Self {
            watch: true,
            database_url: None,
            poll_interval: Duration::from_secs(10),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            export_interval: Duration::from_secs(15),
            export_timeout: Duration::from_secs(10),
            service_name: "mvrefresh".to_owned(),
        }
    }
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            catch_up_interval: Duration::from_secs(30),
            payload_key: "challenge_id".to_owned(),
        }
    }
}

impl Default for DebounceConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_secs(2),
            max_wait: Duration::from_secs(15),
        }
    }
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(10),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            history_retention: Duration::from_secs(14 * 24 * 3600),
            shutdown_deadline: Duration::from_secs(30),
            concurrency: 2,
            max_pending_keys: 10_000,
            batch_keys: 1_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}
