//! `nym-node`: runs a mixnet node (configured by `NYM_NODE_*` variables), generates keys,
//! describes a node, or starts a whole local testnet.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use nym_node::config::{self, Config};
use nym_node::keys::NodeKeys;
use nym_node::localnet::{self, LocalnetOptions};
use nym_node::node::{self, Listeners, TestHooks};
use nym_node::{shutdown, telemetry};

/// Exit code for a bad configuration (sysexits' EX_USAGE).
const EX_USAGE: u8 = 64;
/// Exit code for unusable keys (sysexits' EX_CONFIG).
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "nym-node",
    version,
    about = "A Sphinx mixnet node: mix node, entry gateway or exit gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node (the default). Configured only by NYM_NODE_* environment variables.
    Run,
    /// Generate the node's keys (mode 0600) and print the public halves as JSON.
    Keygen {
        /// Where to write them; defaults to NYM_NODE_KEYS_DIR or ./nym-node-data/keys.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep keys that already exist and make only the missing ones (printing the public
        /// halves) instead of refusing; for a pod's init step, which runs on every start but
        /// must generate each key only once.
        #[arg(long)]
        if_missing: bool,
    },
    /// Print the public keys of existing keys as JSON.
    Describe {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Start a local testnet: 3 mix layers x 2 nodes, an entry and an exit gateway, and a traffic client.
    Localnet {
        /// Where keys, logs and topology.json go.
        #[arg(long, default_value = "./localnet")]
        dir: PathBuf,
        /// First port; each node takes ten from here.
        #[arg(long, default_value_t = 21000)]
        base_port: u16,
        /// Do not run the built-in traffic client.
        #[arg(long)]
        no_traffic: bool,
        /// Mean per-hop delay of the traffic client's packets.
        #[arg(long, default_value = "50ms", value_parser = parse_duration)]
        mean_delay: Duration,
    },
    /// Exit 0 if this node's HTTP endpoint answers 200 on PATH (for container health checks;
    /// the port comes from NYM_NODE_HTTP_BIND).
    Health {
        #[arg(long, default_value = "/livez")]
        path: String,
        /// Ask another node instead: `host:port` of its HTTP server (for `helm test`).
        #[arg(long)]
        addr: Option<String>,
    },
    /// Generate keys for the compose testnet's eight nodes (where missing) and its directory key.
    TestnetInit {
        #[arg(long, default_value = "/data")]
        dir: PathBuf,
        /// Keep running as the testnet's directory until SIGTERM: list the nodes (service
        /// names as hosts) from their signed descriptions, and follow their key rotations.
        #[arg(long)]
        watch: bool,
    },
    /// Check a node environment without running the node: every NYM_NODE_* variable of this
    /// process (or of KEY=VALUE lines in FILE) through the node's own parser. Exit 0 when it
    /// would start, 64 with the error naming the variable when it would not.
    CheckEnv {
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print generated docs: README's knob or metric table, or the Helm values' config block
    /// and its schema.
    ConfigDocs {
        #[arg(long, value_enum, default_value_t = DocsFormat::Markdown)]
        format: DocsFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DocsFormat {
    /// README's table of configuration knobs.
    Markdown,
    /// README's table of metrics.
    Metrics,
    /// The `config:` block of the Helm chart's values.yaml.
    HelmValues,
    /// The JSON Schema of that block, for the chart's values.schema.json.
    HelmSchema,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn main() -> ExitCode {
    // rustls (topology over https, trace export) needs its process-wide provider chosen once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run_node(),
        Command::Keygen { dir, if_missing } => keygen(dir, if_missing),
        Command::Describe { dir } => describe(dir),
        Command::Localnet {
            dir,
            base_port,
            no_traffic,
            mean_delay,
        } => run_localnet(LocalnetOptions {
            dir,
            base_port,
            traffic: !no_traffic,
            mean_delay,
        }),
        Command::Health { path, addr } => health(&path, addr.as_deref()),
        Command::TestnetInit { dir, watch } => match config::key_rotation_interval_from_env()
            .map_err(|e| localnet::LocalnetError::Other(e.to_string()))
            .and_then(|rotation| localnet::prepare_compose(&dir, rotation))
        {
            Ok(topology) => {
                println!(
                    "testnet keys written; the directory (--watch) publishes {}",
                    topology.display()
                );
                if watch {
                    return watch_testnet(dir);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nym-node testnet-init: {e}");
                ExitCode::FAILURE
            }
        },
        Command::ConfigDocs { format } => {
            match format {
                DocsFormat::Markdown => print!("{}", config::knobs_markdown()),
                DocsFormat::Metrics => print!("{}", nym_node::metrics::metrics_markdown()),
                DocsFormat::HelmValues => print!("{}", config::knobs_helm_values()),
                DocsFormat::HelmSchema => print!("{}", config::knobs_helm_schema()),
            }
            ExitCode::SUCCESS
        }
        Command::CheckEnv { file } => check_env(file.as_deref()),
    }
}

fn check_env(file: Option<&std::path::Path>) -> ExitCode {
    let vars: Vec<(String, String)> = match file {
        None => std::env::vars().collect(),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .collect(),
            Err(e) => {
                eprintln!("nym-node check-env: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    match Config::from_vars(vars) {
        Ok((_, unknown)) if unknown.is_empty() => ExitCode::SUCCESS,
        Ok((_, unknown)) => {
            eprintln!(
                "nym-node check-env: unknown variables: {}",
                unknown.join(", ")
            );
            ExitCode::from(EX_USAGE)
        }
        Err(e) => {
            eprintln!("nym-node check-env: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}

fn health(path: &str, other: Option<&str>) -> ExitCode {
    let bind = std::env::var("NYM_NODE_HTTP_BIND")
        .ok()
        .and_then(|b| b.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| Config::default().http_bind);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::FAILURE;
    };
    let addr = match other {
        None => std::net::SocketAddr::from(([127, 0, 0, 1], bind.port())),
        Some(other) => match rt
            .block_on(tokio::net::lookup_host(other))
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => addr,
            _ => {
                eprintln!("{path}: cannot resolve {other}");
                return ExitCode::FAILURE;
            }
        },
    };
    match rt.block_on(nym_node::http::probe::get(addr, path)) {
        Some((200, _)) => ExitCode::SUCCESS,
        Some((status, body)) => {
            eprintln!("{path}: {status} {}", body.trim());
            ExitCode::FAILURE
        }
        None => {
            eprintln!("{path}: no answer on {addr}");
            ExitCode::FAILURE
        }
    }
}

fn keys_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.or_else(|| std::env::var_os("NYM_NODE_KEYS_DIR").map(PathBuf::from))
        .unwrap_or_else(|| Config::default().keys_dir)
}

/// `testnet-init --watch`: the compose testnet's directory, until SIGTERM or SIGINT.
fn watch_testnet(dir: PathBuf) -> ExitCode {
    telemetry::init_logging(config::LogFormat::Text, "info");
    let rt = match runtime(Some(1)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nym-node testnet-init: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn({
            let stop = stop.clone();
            async move {
                if let Err(e) = localnet::run_compose_directory(dir, stop).await {
                    tracing::error!(error = %e, "directory stopped");
                }
            }
        });
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        stop.cancel();
        let _ = watcher.await;
    });
    ExitCode::SUCCESS
}

fn keygen(dir: Option<PathBuf>, if_missing: bool) -> ExitCode {
    let dir = keys_dir(dir);
    if if_missing && NodeKeys::complete_in(&dir) {
        return print_public_keys("keygen", NodeKeys::load(&dir));
    }
    // The seed is bound to the interval the node will rotate at.
    let rotation = match config::key_rotation_interval_from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nym-node keygen: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let written = NodeKeys::generate(rotation).and_then(|k| {
        if if_missing && NodeKeys::exist_in(&dir) {
            k.write_missing(&dir).map(|_| ())
        } else {
            k.write(&dir)
        }
    });
    print_public_keys("keygen", written.and_then(|_| NodeKeys::load(&dir)))
}

fn describe(dir: Option<PathBuf>) -> ExitCode {
    print_public_keys("describe", NodeKeys::load(&keys_dir(dir)))
}

/// Prints the public halves as JSON, or the key error (exit code 78).
fn print_public_keys(command: &str, keys: Result<NodeKeys, nym_node::keys::KeyError>) -> ExitCode {
    match keys {
        Ok(keys) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&keys.public()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nym-node {command}: {e}");
            ExitCode::from(EX_CONFIG)
        }
    }
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    builder.enable_all().thread_name("nym-node").build()
}

fn run_node() -> ExitCode {
    let (config, unknown) = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nym-node: configuration error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let _telemetry = telemetry::init(
        config.log_format,
        &config.log_level,
        telemetry::OtlpSettings::resolve(&config.otlp_endpoint, &config.id, config.mode.as_str()),
    );
    for var in unknown {
        tracing::warn!(variable = %var, "ignoring unknown NYM_NODE_ variable (a typo?)");
    }
    let keys = match NodeKeys::load(&config.keys_dir) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot load keys (generate them with `nym-node keygen`)");
            eprintln!("nym-node: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let rt = match runtime(Some(config.runtime_thread_count())) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nym-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let grace = config.drain_grace.get();
    let result = rt.block_on(async move {
        // Before the node can turn ready, so no SIGTERM meets the default disposition.
        let signals = shutdown::Signals::install().map_err(node::NodeError::Signals)?;
        let listeners = Listeners::bind(&config).await?;
        let node = node::start(config, keys, listeners, TestHooks::from_env()).await?;
        tokio::spawn(signals.drive(node.shutdown.clone(), grace));
        node.wait().await;
        Ok::<(), node::NodeError>(())
    });
    match result {
        Ok(()) => {
            tracing::info!("node stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("nym-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_localnet(options: LocalnetOptions) -> ExitCode {
    telemetry::init_logging(config::LogFormat::Text, "warn,nym_node::localnet=info");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nym-node localnet: cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match runtime(None) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nym-node localnet: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(localnet::run(options, exe)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nym-node localnet: {e}");
            ExitCode::FAILURE
        }
    }
}
