//! Logs and traces: the `tracing` subscriber (text or JSON), OpenTelemetry traces over
//! OTLP/HTTP when an endpoint is configured, and a throttle that keeps a misbehaving peer
//! from flooding the log while every event is still counted in metrics.
//!
//! Spans cover lifecycles, never single packets: `handshake`, `ingress_connection`,
//! `egress_link`, `client_session`, `topology_reload` and `drain`. Only this crate's spans at
//! INFO or above are exported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Lets an event through at most once per interval (the first one always passes).
pub struct Throttle {
    start: Instant,
    interval_ms: u64,
    /// Milliseconds since `start` of the last event let through, plus one (0 = never).
    last: AtomicU64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            start: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            last: AtomicU64::new(0),
        }
    }

    pub fn allow(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            return false;
        }
        self.last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

/// Where and as whom to export traces.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Base endpoint (`http://collector:4318`) or the full traces URL (`.../v1/traces`).
    pub endpoint: String,
    /// `service.instance.id`: the node's name.
    pub instance: String,
    pub mode: String,
}

impl OtlpSettings {
    /// `NYM_NODE_OTLP_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when both are empty.
    pub fn resolve(configured: &str, instance: &str, mode: &str) -> Option<Self> {
        let endpoint = if configured.trim().is_empty() {
            std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default()
        } else {
            configured.trim().to_string()
        };
        (!endpoint.is_empty()).then(|| OtlpSettings {
            endpoint,
            instance: instance.to_string(),
            mode: mode.to_string(),
        })
    }

    /// The OTLP/HTTP traces URL: the base endpoint plus `/v1/traces`, as the OTLP exporter
    /// specification says for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }
}

/// Flushes and stops trace export when dropped (keep it alive until the process ends).
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("trace export did not flush: {e}");
        }
    }
}

fn tracer_provider(
    otlp: &OtlpSettings,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(otlp.traces_url())
        .build()
        .map_err(|e| e.to_string())?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the default detectors) win
    // over our defaults, as OpenTelemetry's conventions say.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("nym-node");
    }
    let resource = resource
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", otlp.instance.clone()),
            KeyValue::new("nym.node.mode", otlp.mode.clone()),
        ])
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber (`RUST_LOG` overrides `filter` when set) and, with
/// `otlp`, exports this crate's spans over OTLP/HTTP.
pub fn init(format: LogFormat, filter: &str, otlp: Option<OtlpSettings>) -> TelemetryGuard {
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::Layer;
    let provider = otlp.as_ref().and_then(|o| match tracer_provider(o) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!(
                "traces disabled: cannot build the OTLP exporter for {}: {e}",
                o.endpoint
            );
            None
        }
    });
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("nym-node"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("nym_node", tracing::Level::INFO),
            )
    });
    install(format, filter, otel);
    TelemetryGuard { provider }
}

/// Installs the global subscriber without trace export.
pub fn init_logging(format: LogFormat, filter: &str) {
    install::<tracing_subscriber::layer::Identity>(format, filter, None);
}

fn install<L>(format: LogFormat, filter: &str, traces: Option<L>)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    use tracing_subscriber::Layer;
    // The log filter applies to the log output only, so a quiet log keeps exporting traces.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (tests, localnet children) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(traces)
        .with(logs.with_filter(filter))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_the_first_through_then_waits() {
        let t = Throttle::new(Duration::from_secs(60));
        assert!(t.allow());
        assert!(!t.allow());
        assert!(!t.allow());
        let fast = Throttle::new(Duration::ZERO);
        assert!(fast.allow());
        std::thread::sleep(Duration::from_millis(2));
        assert!(fast.allow());
    }
}
