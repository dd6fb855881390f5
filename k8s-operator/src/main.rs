//! `nym-operator`: runs the controller (default), or `render`s the objects it would apply
//! for `NymNode` manifests, without a cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, ResourceExt};

use nym_operator::config::{OperatorConfig, Parsed};
use nym_operator::controller::{self, Context};
use nym_operator::crd::{self, NymNode};
use nym_operator::describe::HttpDescriber;
use nym_operator::metrics::Metrics;
use nym_operator::resources::{self, NYMNODE_LABEL};
use nym_operator::{directory, leader};

/// Exit code for a bad setting (EX_USAGE), as the node uses.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "nym-operator",
    version,
    about = "Kubernetes operator for nym-node networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (the default). Configured by NYM_OPERATOR_* environment variables.
    Run,
    /// Print, as YAML, every object the operator applies for the NymNode manifests given.
    Render {
        /// YAML files, each one or more NymNode documents.
        files: Vec<PathBuf>,
    },
    /// Exit 0 if URL answers 200 (the chart's `helm test`; the image has no curl).
    Probe {
        #[arg(long)]
        url: String,
    },
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command.unwrap_or(Command::Run) {
        Command::Run => run(),
        Command::Render { files } => render(&files),
        Command::Probe { url } => probe(&url),
    }
}

fn probe(url: &str) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let client = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(5))
                    .build()
                    .map_err(|e| e.to_string())?;
                let response = client.get(url).send().await.map_err(|e| e.to_string())?;
                Ok::<_, String>(response.status())
            })
        });
    match result {
        Ok(status) if status.is_success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("nym-operator probe: {url}: HTTP {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nym-operator probe: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn render(files: &[PathBuf]) -> ExitCode {
    let settings = nym_operator::resources::BuildSettings::default();
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("nym-operator render: {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        };
        for doc in serde_norway::Deserializer::from_str(&text) {
            let nn: NymNode = match serde::Deserialize::deserialize(doc) {
                Ok(nn) => nn,
                Err(e) => {
                    eprintln!("nym-operator render: {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = crd::validate_name(&nn.name_any()).and_then(|()| nn.spec.validate()) {
                eprintln!(
                    "nym-operator render: {}: {}: {e}",
                    file.display(),
                    nn.name_any()
                );
                return ExitCode::FAILURE;
            }
            for obj in resources::all(&nn, &settings) {
                match serde_norway::to_string(&obj) {
                    Ok(yaml) => print!("---\n{yaml}"),
                    Err(e) => {
                        eprintln!("nym-operator render: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    }
    ExitCode::SUCCESS
}

fn run() -> ExitCode {
    let config = match OperatorConfig::from_vars(std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nym-operator: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let key_file = match config.directory_key_file() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("nym-operator: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    init_logs(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nym-operator: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(operate(config, key_file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "operator stopped");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(config: &Parsed) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.raw.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.raw.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The directory key: from the file when one is named, else from the operator's Secret
/// (made on first start); its public half is published either way.
async fn directory_key(
    client: &Client,
    config: &Parsed,
    key_file: Option<nym_node::keys::Identity>,
) -> anyhow::Result<nym_node::keys::Identity> {
    let namespace = config.operator_namespace();
    let name = &config.raw.directory_name;
    let key = match key_file {
        Some(key) => key,
        None => directory::load_or_create(client.clone(), &namespace, name).await?,
    };
    directory::publish_public_key(client.clone(), &namespace, name, &key).await?;
    tracing::info!(
        directory_key = %key.public(),
        configmap = %format!("{namespace}/{name}"),
        "topology documents are signed with this key"
    );
    Ok(key)
}

async fn serve_http(config: &Parsed, state: nym_operator::http::HttpState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_bind).await?;
    let app = nym_operator::http::router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(())
}

async fn operate(config: Parsed, key_file: Option<nym_node::keys::Identity>) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let alive = Arc::new(AtomicBool::new(true));
    let ready = Arc::new(AtomicBool::new(true));
    serve_http(
        &config,
        nym_operator::http::HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            alive: alive.clone(),
        },
    )
    .await?;
    let key = directory_key(&client, &config, key_file).await?;
    let identity = leader::identity();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config.settings(key),
        metrics.clone(),
        Arc::new(HttpDescriber::new(config.description_timeout)),
        Arc::new(|| k8s_openapi::jiff::Timestamp::now().as_second()),
        identity.clone(),
    ));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    if !config.raw.leader_election {
        metrics.leader.set(1);
        tokio::select! {
            _ = run_controller(ctx, &config) => {}
            _ = &mut shutdown => {}
        }
        return Ok(());
    }
    let manager = leader::lease_manager(
        client,
        &config.operator_namespace(),
        &config.raw.lease_name,
        &identity,
        config.lease_duration.as_secs(),
    )
    .await?;
    lead(manager, ctx, &config, &metrics, &alive, &identity, shutdown).await
}

/// Runs the controller while this replica holds the lease; stands by otherwise.
async fn lead(
    manager: kube_lease_manager::LeaseManager,
    ctx: Arc<Context>,
    config: &Parsed,
    metrics: &Metrics,
    alive: &AtomicBool,
    identity: &str,
    mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let (mut leading, lease_task) = manager.watch().await;
    loop {
        // Standby: wait for the lease (or for shutdown).
        while !*leading.borrow_and_update() {
            tokio::select! {
                changed = leading.changed() => { changed?; }
                _ = &mut shutdown => return Ok(()),
            }
        }
        tracing::info!(identity, "leading: starting the controller");
        metrics.leader.set(1);
        tokio::select! {
            _ = run_controller(ctx.clone(), config) => {
                alive.store(false, Ordering::Relaxed);
                anyhow::bail!("the controller stopped");
            }
            _ = async {
                while *leading.borrow_and_update() {
                    if leading.changed().await.is_err() { break; }
                }
            } => {
                metrics.leader.set(0);
                // What this replica said of the networks is the new leader's to say now.
                metrics.forget_networks();
                tracing::warn!("lost the lease: controller stopped, standing by");
            }
            _ = &mut shutdown => {
                metrics.leader.set(0);
                // Dropping the receiver makes the lease task release the lease, so the
                // standby replica takes over at once rather than after the lease expires.
                drop(leading);
                let _ = lease_task.await;
                return Ok(());
            }
        }
    }
}

/// The controller: NymNodes (spec changes only: status writes do not retrigger), their
/// StatefulSets, and their pods (readiness changes drive the topology and the rollout).
async fn run_controller(ctx: Arc<Context>, config: &Parsed) {
    let client = ctx.client.clone();
    let ns = config.raw.namespace.clone();
    let (nymnodes, pods, statefulsets): (Api<NymNode>, Api<Pod>, Api<StatefulSet>) =
        if ns.is_empty() {
            (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client),
            )
        } else {
            (
                Api::namespaced(client.clone(), &ns),
                Api::namespaced(client.clone(), &ns),
                Api::namespaced(client, &ns),
            )
        };
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        resources::MANAGED_BY.0,
        resources::MANAGED_BY.1
    ));
    let (reader, writer) = reflector::store();
    let trigger = watcher(nymnodes, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        // Spec changes and the start of a deletion; not status writes.
        .predicate_filter(spec_or_deletion, Default::default());
    Controller::for_stream(trigger, reader)
        .owns(statefulsets, managed.clone())
        .watches(pods, managed, |pod: Pod| {
            let ns = pod.namespace()?;
            let owner = pod.labels().get(NYMNODE_LABEL)?.clone();
            Some(ObjectRef::<NymNode>::new(&owner).within(&ns))
        })
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}

/// Changes when the spec's generation does, or when a deletion starts.
fn spec_or_deletion(nn: &NymNode) -> Option<u64> {
    let generation = predicates::generation(nn)?;
    Some(generation.wrapping_mul(2) | u64::from(nn.metadata.deletion_timestamp.is_some()))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
