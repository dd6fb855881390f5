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

fn dashboard(name: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo(&format!("grafana/dashboards/{name}"))).unwrap(),
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

/// The `nym_*` metric names an expression uses (histogram series named by their family).
fn metric_names(expr: &str) -> HashSet<String> {
    expr.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| {
            w.starts_with("nym_node_")
                || w.starts_with("nym_operator_")
                || w.starts_with("nym_client_")
        })
        .map(|w| w.to_string())
        .collect()
}

/// A query with the dashboard's variables at "All".
fn with_all(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".+")
        .replace("$namespace", ".*")
        .replace("$layer", ".*")
}

/// A client of the localnet's gateway, sending cover at the default rate.
async fn client_of(net: &Net) -> MixClient {
    let config = ClientConfig {
        topology: net.topology_path.display().to_string(),
        gateway: Some(net.member("gateway").entry.identity_key),
        cover_rate: 20.0,
        ..ClientConfig::default()
    };
    MixClient::start(config, Identity::generate().unwrap())
        .await
        .unwrap()
}

type Series = (serde_json::Map<String, serde_json::Value>, f64);

/// A panel's query with its variables at "All", retried for up to 10 s until it returns
/// data (or merely succeeds, for panels that are empty on a healthy network by design).
async fn answer(
    prometheus: &Prometheus,
    title: &str,
    expr: &str,
    may_be_empty: bool,
) -> Vec<Series> {
    let q = with_all(expr);
    for _ in 0..40 {
        match prometheus.query(&q).await {
            Some(r) if !r.is_empty() || may_be_empty => return r,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    panic!("panel {title:?}: query returned nothing or failed: {q}");
}

/// What both dashboards must be: unique ids, panels inside the 24-column grid, one
/// provisioned datasource, a unit and queries on every panel, defined variables only, and a
/// link to the other dashboards of the family.
fn check_structure(d: &serde_json::Value) {
    let name = d["uid"].as_str().unwrap();
    let variables: HashSet<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let mut ids = HashSet::new();
    for p in d["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "{name}: panel ids are unique"
        );
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_i64().unwrap(), pos["w"].as_i64().unwrap());
        assert!(
            w > 0 && pos["h"].as_i64().unwrap() > 0 && x + w <= 24,
            "{name}/{title}: {pos}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "{name}/{title}");
        assert!(
            p["description"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}/{title} says what it shows"
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "{name}/{title} has a unit"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{name}/{title} has queries");
        let refs: HashSet<_> = targets
            .iter()
            .map(|t| t["refId"].as_str().unwrap())
            .collect();
        assert_eq!(refs.len(), targets.len(), "refIds unique in {name}/{title}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            for used in expr.split('$').skip(1) {
                let var: String = used
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    var.starts_with("__") || variables.contains(var.as_str()),
                    "{name}/{title} uses undefined ${var}"
                );
            }
            assert!(!with_all(expr).contains('$'), "{name}/{title}: {expr}");
        }
        match p["type"].as_str().unwrap() {
            "table" => {
                assert!(
                    targets
                        .iter()
                        .all(|t| t["instant"] == true && t["format"] == "table"),
                    "{name}/{title}"
                );
                assert_eq!(p["transformations"][0]["id"], "merge", "{name}/{title}");
            }
            "stat" => assert!(
                p["options"]["reduceOptions"]["calcs"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
            ),
            "state-timeline" => assert!(p["fieldConfig"]["defaults"]["mappings"].is_array()),
            "timeseries" => {}
            other => panic!("{name}/{title}: unexpected panel type {other}"),
        }
    }
    let tags = d["tags"].as_array().unwrap();
    assert!(
        tags.contains(&"nym-mixnet".into()),
        "{name} is in the family"
    );
    assert!(
        d["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["type"] == "dashboards" && l["tags"][0] == "nym-mixnet"),
        "{name} links to the family"
    );
}

#[test]
fn dashboards_are_well_formed_and_match_their_provisioning() {
    let ds =
        std::fs::read_to_string(repo("grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert!(
        ds.contains("uid: prometheus"),
        "the datasource the panels name is provisioned"
    );
    let node = dashboard("nym-node.json");
    let network = dashboard("nym-network.json");
    check_structure(&node);
    check_structure(&network);
    assert!(
        network["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "namespace")
    );
    assert!(
        network["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "layer")
    );
    // A node's row in the network dashboard opens its node dashboard.
    let links = network.to_string();
    assert!(
        links.contains(&format!("/d/{}/", node["uid"].as_str().unwrap()))
            && links.contains("var-instance=${__value.raw}"),
        "the network dashboard links to the node dashboard"
    );
    // Every metric the node dashboard uses exists; every metric the node exports is on it.
    let exported: HashSet<String> = nym_node::metrics::Metrics::new("mixnode")
        .describe()
        .into_iter()
        .map(|m| m.0)
        .collect();
    let all_exprs: String = queries(&node)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join(" ");
    for word in metric_names(&all_exprs) {
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
    let dir = tempfile::tempdir().unwrap();
    let script = std::fs::read_to_string(repo("scripts/gen-dashboards.py")).unwrap();
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    std::fs::create_dir_all(dir.path().join("grafana/dashboards")).unwrap();
    std::fs::write(dir.path().join("scripts/gen-dashboards.py"), script).unwrap();
    let out = std::process::Command::new("python3")
        .arg(dir.path().join("scripts/gen-dashboards.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["nym-node.json", "nym-network.json"] {
        let written: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("grafana/dashboards").join(name)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            dashboard(name),
            written,
            "grafana/dashboards/{name} is stale: run scripts/gen-dashboards.py"
        );
    }
}

#[test]
fn alert_rules_and_prometheus_config_pass_promtool() {
    for (rules, tests) in [
        ("grafana/alerts.yml", "tests/alerts.test.yml"),
        (
            "grafana/network-alerts.yml",
            "tests/network-alerts.test.yml",
        ),
    ] {
        let out = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(repo(rules))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{rules}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("promtool")
            .args(["test", "rules"])
            .arg(repo(tests))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tests}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The compose Prometheus config, with its rule file where this checkout has it (and the
    // metrics token the compose init writes into its volume).
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "t\n").unwrap();
    let config = std::fs::read_to_string(repo("grafana/prometheus.yml"))
        .unwrap()
        .replace("/data/metrics.token", &token.display().to_string())
        .replace(
            "/etc/prometheus/alerts.yml",
            &repo("grafana/alerts.yml").display().to_string(),
        )
        .replace(
            "/etc/prometheus/network-alerts.yml",
            &repo("grafana/network-alerts.yml").display().to_string(),
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
    let mut client = client_of(&net).await;
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
    let d = dashboard("nym-node.json");
    for (title, expr) in queries(&d) {
        answer(
            &prometheus,
            &title,
            &expr,
            may_be_empty.contains(&title.as_str()),
        )
        .await;
    }
    client.stop().await;
    net.stop().await;
}

/// The operator reconciling an example network in the strict fake API server, its
/// `/metrics` served on a real socket as in a cluster.
struct Operator {
    cluster: nym_operator::fixtures::Cluster,
    ctx: std::sync::Arc<nym_operator::controller::Context>,
    addr: SocketAddr,
}

impl Operator {
    async fn start() -> Operator {
        let (cluster, ctx) = nym_operator::fixtures::Cluster::start(3).await;
        for nn in nym_operator::fixtures::example_network(3) {
            cluster.insert_nymnode(&nn);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = nym_operator::http::HttpState {
            metrics: ctx.metrics.clone(),
            ready: std::sync::Arc::new(true.into()),
            alive: std::sync::Arc::new(true.into()),
        };
        tokio::spawn(async move {
            let _ = axum::serve(listener, nym_operator::http::router(state)).await;
        });
        ctx.metrics.leader.set(1);
        let operator = Operator { cluster, ctx, addr };
        for _ in 0..10 {
            operator.step().await;
        }
        assert_eq!(
            operator.cluster.topology().map(|t| t.nodes.len()),
            Some(8),
            "the example network settled"
        );
        operator
    }

    /// Reconciles every NymNode once, then one second passes in the cluster.
    async fn step(&self) {
        for name in self.cluster.nymnode_names() {
            if let Some(nn) = self.cluster.try_nymnode(&name) {
                let _ =
                    nym_operator::controller::reconcile(std::sync::Arc::new(nn), self.ctx.clone())
                        .await;
            }
        }
        self.cluster.tick();
    }
}

/// The network dashboard and its alerts' inputs: a localnet carrying a prober's traffic (and
/// a replay and a stranger's handshake, so the drop and failure panels have something to
/// show), and the operator upgrading its network while one NymNode is Degraded, all scraped
/// by one real Prometheus. Every metric the dashboard names is one Prometheus scraped, and
/// every query returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_network_dashboard_query_evaluates_against_a_localnet_a_prober_and_the_operator() {
    use nym_node::client::prober::{self, ProbeMetrics, ProberSettings};
    let net = Net::start(&three_layers(), |_, _| {}, no_hooks).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let probe_metrics = ProbeMetrics::new();
    let probe_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe_addr = probe_listener.local_addr().unwrap();
    tokio::spawn(prober::serve_metrics(
        probe_listener,
        probe_metrics.clone(),
        stop.clone(),
    ));
    let mut client = client_of(&net).await;
    let settings = ProberSettings {
        count: 5,
        size: 64,
        timeout: Duration::from_secs(20),
        interval: Duration::from_millis(200),
        ok_file: None,
    };
    let prober_task = tokio::spawn({
        let (metrics, stop) = (probe_metrics.clone(), stop.clone());
        async move {
            prober::run(&mut client, &settings, &metrics, stop).await;
            client.stop().await;
        }
    });
    let operator = Operator::start().await;
    let mut targets: Vec<(SocketAddr, Vec<(&str, &str)>)> =
        net.nodes.values().map(|n| (n.http_addr, vec![])).collect();
    targets.push((probe_addr, vec![]));
    targets.push((operator.addr, vec![]));
    let prometheus = Prometheus::start(&targets);
    // Counters must move after a first scrape for their rates to show.
    let all_up = format!("count(up == 1) == {}", targets.len());
    let mut up = false;
    for _ in 0..80 {
        if prometheus
            .query(&all_up)
            .await
            .is_some_and(|r| !r.is_empty())
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(up, "Prometheus scraped every target");

    // A replayed packet (a drop) and a peer outside the topology (a handshake failure).
    let mut link = net.link("mix-1a", "mix-2a").await;
    let packet = net.packets(&["mix-2a", "mix-3a", "gateway"], 1).remove(0);
    link.send_packet(&packet).await.unwrap();
    link.send_packet(&packet).await.unwrap();
    let stranger = nym_node::keys::NodeKeys::generate(Duration::from_secs(3600)).unwrap();
    // (The node closes the link once it sees the key; the panel shows the refusal.)
    let _ = Link::connect(
        net.mixnet_addr("mix-2a"),
        &stranger,
        &net.member("mix-2a").entry.noise_key,
    )
    .await;

    // One NymNode refused (Degraded), another upgraded: one pod done, the next under way.
    operator.cluster.edit_nymnode("exit", |nn| {
        nn.spec
            .env
            .insert("NYM_NODE_MAX_PACKET_DELAY".into(), "soon".into());
    });
    operator
        .cluster
        .edit_nymnode("mix-l1", |nn| nn.spec.image = "nym-node:1.1".into());
    let mut upgraded_one = false;
    for _ in 0..400 {
        operator.step().await;
        let text = operator.ctx.metrics.render();
        if text.contains("nym_operator_rollout_pod_duration_seconds_count{namespace=\"mixnet\"} 1")
            && text.contains("nym_operator_rollout_pod_started_timestamp_seconds{")
        {
            upgraded_one = true;
            break;
        }
        // Slow enough for Prometheus (1 s scrapes) to see the upgrade move.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(upgraded_one, "{}", operator.ctx.metrics.render());
    // Two more scrapes, so the instant queries below see the state the upgrade stopped in.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let d = dashboard("nym-network.json");
    let mut named = HashSet::new();
    for (_, expr) in queries(&d) {
        named.extend(metric_names(&expr));
    }
    let mut known: HashSet<String> = HashSet::new();
    for _ in 0..40 {
        known = prometheus
            .metric_names()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        if named.iter().all(|n| known.contains(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing: Vec<_> = named.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard names metrics nothing exports: {missing:?}"
    );
    let mut answers = std::collections::HashMap::new();
    for (title, expr) in queries(&d) {
        let result = answer(&prometheus, &title, &expr, false).await;
        answers.insert(title, result);
    }
    // What the panels answer is what the setup did.
    let label = |r: &Series, k: &str| {
        r.0.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    // The localnet (no namespace) as its nodes loaded it; the operator's network as the
    // operator published it, layer 1 one short while its pod is withdrawn.
    let layers: std::collections::BTreeMap<_, _> = answers["Serving mix nodes per layer"]
        .iter()
        .map(|r| ((label(r, "namespace"), label(r, "layer")), r.1))
        .collect();
    let expected: std::collections::BTreeMap<_, _> = [
        ("", "1", 2.0),
        ("", "2", 2.0),
        ("", "3", 2.0),
        ("mixnet", "1", 1.0),
        ("mixnet", "2", 2.0),
        ("mixnet", "3", 2.0),
    ]
    .into_iter()
    .map(|(ns, layer, n)| ((ns.to_string(), layer.to_string()), n))
    .collect();
    assert_eq!(layers, expected);
    let delivery = answers["End-to-end delivery"][0].1;
    assert!(delivery > 0.0 && delivery <= 1.0, "{delivery}");
    let degraded = &answers["Degraded NymNodes"];
    assert_eq!(degraded.len(), 1);
    assert_eq!(
        (
            label(&degraded[0], "nymnode"),
            label(&degraded[0], "reason")
        ),
        ("exit".into(), "InvalidSpec".into())
    );
    let upgrading = &answers["Pod being upgraded"];
    assert_eq!(
        upgrading
            .iter()
            .map(|r| label(r, "pod"))
            .collect::<Vec<_>>(),
        ["mix-l1-1"]
    );
    let drops = &answers["Drops by reason"];
    assert!(
        drops.iter().any(|r| label(r, "reason") == "replay"),
        "{drops:?}"
    );
    stop.cancel();
    let _ = prober_task.await;
    net.stop().await;
}
