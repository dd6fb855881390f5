//! Probing the mixnet without end: one client sends a probe round (`probe.rs`) every
//! interval and exports what it measured as Prometheus metrics (`nym_client_probe_*`).
//! No node can see end-to-end delivery; this is where the network dashboard gets it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::MixClient;
use crate::client::probe::{self, ProbeReport};

/// What one round sends and how long it waits.
#[derive(Debug, Clone)]
pub struct ProberSettings {
    pub count: usize,
    pub size: usize,
    pub timeout: Duration,
    /// From the end of one round to the start of the next.
    pub interval: Duration,
    /// Present while the last round delivered every message (a container health check).
    pub ok_file: Option<PathBuf>,
}

/// The prober's metrics, in a registry of their own.
pub struct ProbeMetrics {
    registry: Registry,
    rounds: IntCounterVec,
    messages: IntCounterVec,
    latency: Histogram,
    retransmissions: IntCounter,
    last_success: Gauge,
}

impl ProbeMetrics {
    pub fn new() -> Arc<Self> {
        let registry =
            Registry::new_custom(Some("nym_client_probe".into()), None).unwrap_or_default();
        let metrics = ProbeMetrics {
            rounds: IntCounterVec::new(
                Opts::new(
                    "rounds_total",
                    "Probe rounds, by result (ok: every message came back; failed).",
                ),
                &["result"],
            )
            .expect("static metric definition"),
            messages: IntCounterVec::new(
                Opts::new(
                    "messages_total",
                    "Probe messages sent through three mix layers back to the prober, by result (delivered, lost: not back within the round's timeout).",
                ),
                &["result"],
            )
            .expect("static metric definition"),
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "message_latency_seconds",
                    "From sending a probe message to receiving it, end to end.",
                )
                .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]),
            )
            .expect("static metric definition"),
            retransmissions: IntCounter::new(
                "retransmissions_total",
                "Packets the prober sent again because no acknowledgement came back in time.",
            )
            .expect("static metric definition"),
            last_success: Gauge::new(
                "last_success_timestamp_seconds",
                "Unix time of the end of the last round that delivered every message.",
            )
            .expect("static metric definition"),
            registry,
        };
        for c in [
            Box::new(metrics.rounds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.messages.clone()),
            Box::new(metrics.latency.clone()),
            Box::new(metrics.retransmissions.clone()),
            Box::new(metrics.last_success.clone()),
        ] {
            // Distinct constant names: registration cannot clash.
            let _ = metrics.registry.register(c);
        }
        // Both results of each counter exist before the first round ends.
        for result in ["ok", "failed"] {
            metrics.rounds.with_label_values(&[result]);
        }
        for result in ["delivered", "lost"] {
            metrics.messages.with_label_values(&[result]);
        }
        Arc::new(metrics)
    }

    /// Counts one round; `retransmitted` is what this round added to the client's total.
    pub fn record(&self, report: &ProbeReport, retransmitted: u64) {
        let result = if report.ok() { "ok" } else { "failed" };
        self.rounds.with_label_values(&[result]).inc();
        self.messages
            .with_label_values(&["delivered"])
            .inc_by(report.delivered as u64);
        self.messages
            .with_label_values(&["lost"])
            .inc_by(report.sent.saturating_sub(report.delivered) as u64);
        for l in &report.latencies {
            self.latency.observe(l.as_secs_f64());
        }
        self.retransmissions.inc_by(retransmitted);
        if report.ok() {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_success.set(now.as_secs_f64());
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Probes with `client` every `settings.interval` until `stop` fires.
pub async fn run(
    client: &mut MixClient,
    settings: &ProberSettings,
    metrics: &ProbeMetrics,
    stop: CancellationToken,
) {
    let mut retransmissions_before = 0;
    while !stop.is_cancelled() {
        let report = tokio::select! {
            r = probe::run(client, settings.count, settings.size, settings.timeout) => r,
            _ = stop.cancelled() => break,
        };
        // The client's counter covers its whole life; a round adds the difference.
        metrics.record(
            &report,
            report
                .retransmissions
                .saturating_sub(retransmissions_before),
        );
        retransmissions_before = report.retransmissions;
        mark_ok_file(settings.ok_file.as_ref(), report.ok());
        tracing::info!(summary = %report.summary(), "probe round");
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = stop.cancelled() => break,
        }
    }
    mark_ok_file(settings.ok_file.as_ref(), false);
}

fn mark_ok_file(path: Option<&PathBuf>, ok: bool) {
    let Some(path) = path else { return };
    let result = if ok {
        std::fs::write(path, b"ok\n")
    } else {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    };
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot update the probe's ok file");
    }
}

/// Serves `GET /metrics` (and `GET /livez`) on `listener` until `stop` fires.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<ProbeMetrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Binds the metrics listener (an error names the address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_counts_delivered_and_lost_messages_and_only_new_retransmissions() {
        let m = ProbeMetrics::new();
        let mut report = ProbeReport {
            sent: 10,
            delivered: 7,
            latencies: vec![Duration::from_millis(300); 7],
            ..ProbeReport::default()
        };
        m.record(&report, 4);
        report.delivered = 10;
        report.latencies = vec![Duration::from_millis(300); 10];
        m.record(&report, 0);
        let text = m.render();
        assert!(
            text.contains("nym_client_probe_messages_total{result=\"delivered\"} 17"),
            "{text}"
        );
        assert!(text.contains("nym_client_probe_messages_total{result=\"lost\"} 3"));
        assert!(text.contains("nym_client_probe_rounds_total{result=\"failed\"} 1"));
        assert!(text.contains("nym_client_probe_rounds_total{result=\"ok\"} 1"));
        assert!(text.contains("nym_client_probe_retransmissions_total 4"));
        assert!(text.contains("nym_client_probe_message_latency_seconds_count 17"));
        assert!(!text.contains("nym_client_probe_last_success_timestamp_seconds 0\n"));
    }

    #[test]
    fn the_ok_file_follows_the_last_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok");
        mark_ok_file(Some(&path), true);
        assert!(path.exists());
        mark_ok_file(Some(&path), false);
        assert!(!path.exists());
        mark_ok_file(Some(&path), false);
    }
}
