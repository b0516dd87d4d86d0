//! Logs (tracing, human or JSON) and Prometheus metrics.

use std::str::FromStr;
use std::time::Duration;

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use prometheus::IntGauge;
/// Metric types for services that add their own collectors.
pub use prometheus::core::{Collector, Desc};
pub use prometheus::proto::MetricFamily;

use crate::config::{ConfigError, ConfigSource};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Aligned, coloured lines for a terminal.
    Human,
    /// One JSON object per line for a log pipeline.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}` is neither `human` nor `json`")),
        }
    }
}

/// Logging settings: `RP_LOG_FORMAT` (human | json, default human) and `RP_LOG` (a tracing
/// filter such as `info,redpacket_wallet=debug`, default `info`).
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

impl LogConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        Ok(LogConfig {
            format: source.or("RP_LOG_FORMAT", LogFormat::Human)?,
            filter: source.or("RP_LOG", "info".to_owned())?,
        })
    }
}

/// Installs the global subscriber once; later calls (tests, the embedded mode) are no-ops.
pub fn init_tracing(config: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Errors mean a subscriber is already installed, which is fine.
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Installs the process-wide rustls crypto provider (ring) once. Database drivers with TLS
/// need exactly one provider installed before their first connection.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One service's metrics registry with the HTTP metrics every service has.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    /// The series of a `POST` answered 200, every granted grab, resolved once rather than
    /// looked up by label on every answer.
    post_ok: (prometheus::IntCounter, prometheus::Histogram),
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry whose every series carries `service="<service>"`.
    pub fn new(service: &str) -> Self {
        let labels = std::iter::once(("service".to_owned(), service.to_owned())).collect();
        let registry = Registry::new_custom(Some("rp".to_owned()), Some(labels))
            .unwrap_or_else(|_| Registry::new());
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests answered"),
            &["method", "status"],
        )
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"));
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to answer an HTTP request",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["method"],
        )
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"));
        let post_ok = (
            http_requests.with_label_values(&["POST", "200"]),
            http_duration.with_label_values(&["POST"]),
        );
        let metrics = Metrics {
            registry,
            http_requests,
            http_duration,
            post_ok,
        };
        metrics.register(Box::new(metrics.http_requests.clone()));
        metrics.register(Box::new(metrics.http_duration.clone()));
        metrics
    }

    /// Adds a collector; a duplicate registration is a programming error and is logged.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(err) = self.registry.register(collector) {
            tracing::warn!(error = %err, "metric registered twice");
        }
    }

    /// Counts one answered request.
    pub fn observe_http(&self, method: &str, status: u16, elapsed: Duration) {
        if status == 200 && method == "POST" {
            let (count, duration) = &self.post_ok;
            count.inc();
            duration.observe(elapsed.as_secs_f64());
            return;
        }
        self.http_requests
            .with_label_values(&[method, status_label(status)])
            .inc();
        self.http_duration
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Status labels from a fixed set, so a client cannot grow the label space.
#[allow(clippy::match_overlapping_arm)]
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        410 => "410",
        413 => "413",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        504 => "504",
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
