//! The Grafana dashboard, the Prometheus configuration and the alert rules: checked by
//! structure, by promtool, and by evaluating every dashboard query against a real
//! Prometheus that scraped live nodes carrying traffic. (No Grafana server can run here.)

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nym_node::client::{ClientConfig, Event, MixClient};
use nym_node::keys::Identity;

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("grafana/dashboards/nym-node.json")).unwrap(),
    )
    .unwrap()
}

/// (panel title, expr) of every query in the dashboard.
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn dashboard_is_well_formed_and_matches_its_provisioning() {
    let d = dashboard();
    let ds =
        std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(
        ds.contains("uid: prometheus"),
        "the datasource the panels name is provisioned"
    );
    let mut ids = HashSet::new();
    let panels = d["panels"].as_array().unwrap();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "panel ids are unique"
        );
        let pos = &p["gridPos"];
        assert!(pos["w"].as_i64().unwrap() > 0 && pos["h"].as_i64().unwrap() > 0);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "{} has a unit",
            p["title"]
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has queries", p["title"]);
        let refs: HashSet<_> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "refIds unique in {}", p["title"]);
    }
    // Every metric the dashboard uses exists; every metric the node exports is on the dashboard.
    let exported: HashSet<String> = nym_node::metrics::Metrics::new("mixnode")
        .describe()
        .into_iter()
        .map(|m| m.0)
        .collect();
    let all_exprs: String = queries(&d)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join(" ");
    for word in all_exprs
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("nym_node_"))
    {
        let base = word
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        assert!(
            exported.contains(base),
            "dashboard uses unknown metric {word}"
        );
    }
    let not_charted = [
        "nym_node_process_start_time_seconds",
        "nym_node_process_threads",
        "nym_node_process_virtual_memory_bytes",
    ];
    for m in &exported {
        assert!(
            all_exprs.contains(m.as_str()) || not_charted.contains(&m.as_str()),
            "metric {m} is not on the dashboard"
        );
    }
    // The committed JSON is what the generator writes.
    let out = std::process::Command::new("python3")
        .arg(repo("scripts/gen-dashboard.py"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        dashboard(),
        d,
        "grafana/dashboards/nym-node.json is stale: run scripts/gen-dashboard.py"
    );
}

#[test]
fn alert_rules_and_prometheus_config_pass_promtool() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("grafana/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo("tests/alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The compose Prometheus config, with its rule file where this checkout has it.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo("grafana/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/alerts.yml",
            &repo("grafana/alerts.yml").display().to_string(),
        );
    let path = dir.path().join("prometheus.yml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_evaluates_against_live_nodes() {
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let targets: Vec<(SocketAddr, Vec<(&str, &str)>)> =
        net.nodes.values().map(|n| (n.http_addr, vec![])).collect();
    let prometheus = Prometheus::start(&targets);
    let config = ClientConfig {
        topology: net.topology_path.display().to_string(),
        gateway: Some(net.member("gateway").entry.identity_key),
        cover_rate: 20.0,
        ..ClientConfig::default()
    };
    let mut client = MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap();
    let me = client.address();
    // Traffic for a few scrape intervals, so rates and quantiles have samples.
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut i = 0u32;
    while tokio::time::Instant::now() < until {
        client.send(me, i.to_be_bytes().to_vec(), 0).await.unwrap();
        i += 1;
        let _ = tokio::time::timeout(Duration::from_millis(100), async {
            while let Some(ev) = client.next_event().await {
                if matches!(ev, Event::Received { .. }) {
                    break;
                }
            }
        })
        .await;
    }
    // Panels that are empty on a healthy node by design (they filter on `> 0`).
    let may_be_empty = ["Drops by reason", "Handshake failures"];
    let d = dashboard();
    for (title, expr) in queries(&d) {
        let q = expr.replace("$instance", ".+");
        let mut result = None;
        for _ in 0..40 {
            match prometheus.query(&q).await {
                Some(r) if !r.is_empty() || may_be_empty.contains(&title.as_str()) => {
                    result = Some(r);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        assert!(
            result.is_some(),
            "panel {title:?}: query returned nothing or failed: {q}"
        );
    }
    client.stop().await;
    net.stop().await;
}
