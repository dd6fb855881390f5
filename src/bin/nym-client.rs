//! `nym-client`: send and receive messages through the mixnet, or probe it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use nym_node::client::state::{self, ClientDir, Running, Settings};
use nym_node::client::websocket::{self, Request, TextResponse};
use nym_node::client::{
    ClientAddress, ClientConfig, Event, MixClient, daemon, probe, prober, socks5, tunnel,
};
use nym_node::config::{self, LogFormat};
use nym_node::keys::{Identity, NodeId, random_bytes};
use nym_node::telemetry;
use nym_node::topology::TopologySource;

#[derive(Parser)]
#[command(
    name = "nym-client",
    version,
    about = "A mixnet client: a long-running client with Nym's WebSocket API, or one-shot send, receive and probe",
    after_help = "Examples:
  nym-client --topology T --topology-signer K init --id alice   create client 'alice' (keys, gateway)
  nym-client address --id alice                    its address, the same every time
  nym-client run --id alice                        serve Nym's WebSocket API on 127.0.0.1:1977
  nym-client send --id bob --to ADDRESS --message hi
  nym-client receive --id alice --count 1
  nym-client --topology T --topology-signer K probe --count 20 --cover-rate 0
  nym-client --topology T --topology-signer K probe --every 5s --metrics-listen 0.0.0.0:9100
  nym-client --topology T --topology-signer K socks5   then: curl --socks5-hostname 127.0.0.1:1080 URL
  sudo nym-client tun --id alice --route 198.51.100.0/24   IP packets to that network via an exit

T is the topology (a file or URL), K the directory key it must be signed by (base58 or a file,
such as the localnet's directory.pub); init stores both with the client.
Options apply wherever they are written: before or after the subcommand.",
    allow_negative_numbers = true
)]
struct Cli {
    /// Topology document: a file path or an http(s) URL. Defaults to the one given at init.
    #[arg(long, env = "NYM_CLIENT_TOPOLOGY", global = true)]
    topology: Option<String>,
    /// The directory key the topology must be signed by (base58, or a file holding it, such
    /// as the localnet's directory.pub). Required unless the client was made with one
    /// (`init` stores it) or --insecure-unsigned-topology is given.
    #[arg(long, env = "NYM_CLIENT_TOPOLOGY_SIGNER", global = true, value_parser = nym_node::keys::key_or_file)]
    topology_signer: Option<nym_node::keys::KeyBytes>,
    /// Take topology documents no directory signed (tests, hand-written topologies): whoever
    /// can change the document then chooses every key this client encrypts to.
    #[arg(long, global = true)]
    insecure_unsigned_topology: bool,
    /// The client to use: DATA_DIR/NAME (created by `init --id NAME`).
    #[arg(long, global = true, conflicts_with = "identity")]
    id: Option<String>,
    /// The client to use, by its directory (instead of --id).
    #[arg(long, global = true)]
    identity: Option<PathBuf>,
    /// Where named clients live [default: $XDG_DATA_HOME/nym-client or ~/.local/share/nym-client].
    #[arg(long, env = "NYM_CLIENT_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Gateway to register with at init (identity key); a random serving gateway when omitted.
    /// Clients made by init always use their own.
    #[arg(long, global = true)]
    gateway: Option<NodeId>,
    /// Reach the gateway's client API at HOST:PORT instead of the address the topology gives
    /// (a port forward, a proxy); the gateway is still authenticated by its key.
    #[arg(long, global = true)]
    gateway_address: Option<nym_node::topology::PeerAddress>,
    /// Mean per-hop delay of our packets (e.g. 50ms).
    #[arg(long, default_value = "50ms", value_parser = config::parse_duration, global = true)]
    mean_delay: Duration,
    /// Poisson rate (frames/s) of the upstream stream: each slot carries a packet of ours, acks
    /// to the gateway or drop cover. It bounds how fast we send. 0 disables cover traffic
    /// (loops and downstream pacing too): packets leave at once and show when we talk
    /// [default: 0.5; socks5, tun and probe: 20].
    #[arg(long, value_parser = non_negative, global = true)]
    cover_rate: Option<f64>,
    /// Poisson rate (frames/s) of loop cover, a stream of its own that real traffic never
    /// replaces [default: a fifth of --cover-rate].
    #[arg(long, value_parser = non_negative, global = true)]
    loop_rate: Option<f64>,
    /// Poisson rate (frames/s) at which our gateway sends us frames, real or dummy, so the
    /// link shows nothing of what we receive; the gateway may grant less. It bounds how fast
    /// we receive (acks of what we send and loops included) [default: --cover-rate plus
    /// --loop-rate; socks5 and tun: 50; 0 with --cover-rate 0].
    #[arg(long, value_parser = non_negative, global = true)]
    downstream_rate: Option<f64>,
    /// Send a delivery receipt (after a random delay of up to 10 s, once per message) to a
    /// sender that asks for one. Off by default: a receipt tells the sender when we read.
    #[arg(long, global = true)]
    send_receipts: bool,
    /// Do not ask for acknowledgements (and so never retransmit).
    #[arg(long, global = true)]
    no_acks: bool,
    /// Retransmissions per packet before a message is reported failed.
    #[arg(long, default_value_t = 6, global = true)]
    max_retransmissions: u32,
    #[command(subcommand)]
    command: Command,
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!(
            "expected a number of packets per second, 0 or more, got {s:?}"
        )),
    }
}

/// Upstream slots a second by default: with the loops and the downstream that follow from
/// it, 0.6 frames/s each way of 2,447 bytes, about 250 MB a day in all (see README).
const DEFAULT_COVER_RATE: f64 = 0.5;
/// The SOCKS5 proxy's and the prober's: browsing needs bandwidth, and a probe measures the
/// network, not the client's slots.
const FAST_COVER_RATE: f64 = 20.0;
/// The SOCKS5 proxy's downstream: a gateway's default cap (NYM_NODE_CLIENT_DOWNSTREAM_MAX_RATE).
const SOCKS5_DOWNSTREAM_RATE: f64 = 50.0;

impl Cli {
    fn cover_rate(&self) -> f64 {
        let default = match self.command {
            Command::Socks5 { .. } | Command::Tun { .. } | Command::Probe { .. } => FAST_COVER_RATE,
            _ => DEFAULT_COVER_RATE,
        };
        self.cover_rate.unwrap_or(default)
    }

    fn loop_rate(&self) -> f64 {
        self.loop_rate.unwrap_or(self.cover_rate() / 5.0)
    }

    fn downstream_rate(&self) -> f64 {
        let default = match (&self.command, self.cover_rate() > 0.0) {
            (_, false) => 0.0,
            // Browsing takes in far more than it sends.
            (Command::Socks5 { .. } | Command::Tun { .. }, true) => SOCKS5_DOWNSTREAM_RATE,
            (_, true) => self.cover_rate() + self.loop_rate(),
        };
        self.downstream_rate.unwrap_or(default)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create a client: its identity (mode 0600) and its gateway, registered once.
    Init,
    /// Print the client's address (IDENTITY.ENCRYPTION@GATEWAY); it never changes.
    Address,
    /// Run the client: hold its gateway session, send cover, keep reply SURBs, and serve
    /// Nym's WebSocket API to local applications until SIGTERM or Ctrl-C.
    Run {
        /// Address of the WebSocket API.
        #[arg(long, default_value = "127.0.0.1:1977")]
        listen: SocketAddr,
        /// Allow a non-loopback --listen address (anyone reaching it can use this client).
        #[arg(long)]
        allow_remote: bool,
        /// Let web pages of this origin (`https://app.example`) use the API; repeat for
        /// more. Without it, an upgrade that carries an `Origin` header (every browser's
        /// does) is refused, so no web page the user visits can drive the client.
        #[arg(long = "allow-origin", value_name = "ORIGIN")]
        allow_origins: Vec<String>,
        /// Require a token on every API connection (`Authorization: Bearer T`, or `?token=T`
        /// for a web page); a fresh one each run, in `run.json` in the client's directory,
        /// which only its owner can read. `send` and `receive` find it there.
        #[arg(long)]
        require_token: bool,
    },
    /// Send one message (through the running client when one serves this client). Without
    /// --id or --identity, from a fresh throwaway identity.
    Send {
        /// Recipient address, IDENTITY.ENCRYPTION@GATEWAY.
        #[arg(long)]
        to: ClientAddress,
        #[arg(long)]
        message: String,
        /// Reply SURBs to attach, so the recipient can answer without knowing us.
        #[arg(long, default_value_t = 0)]
        reply_surbs: usize,
        /// Ask the recipient for a delivery receipt and wait for it, sending the message
        /// again when none came this long after its gateway stored it (e.g. 30s).
        #[arg(long, value_parser = config::parse_duration)]
        receipt: Option<Duration>,
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        timeout: Duration,
    },
    /// Print messages as they arrive, one per line (through the running client when one
    /// serves this client).
    Receive {
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        #[arg(long, default_value = "1h", value_parser = config::parse_duration)]
        timeout: Duration,
    },
    /// Serve a SOCKS5 proxy (CONNECT, no authentication) whose streams leave the mixnet at
    /// an exit gateway, until SIGTERM or Ctrl-C. With --id or --identity, as that client
    /// (while no `run` holds it); otherwise from a fresh throwaway identity.
    Socks5 {
        /// Address of the proxy.
        #[arg(long, default_value = socks5::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Allow a non-loopback --listen address (anyone reaching it can use this client).
        #[arg(long)]
        allow_remote: bool,
        /// Exit gateway to leave through, by name or identity key; a random serving one
        /// when omitted.
        #[arg(long)]
        exit: Option<String>,
        /// Create this file once the proxy serves (connected to its gateway, listening),
        /// and remove it at exit: a readiness signal for containers.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Carry IP packets through the mixnet: a TUN device whose packets leave at an exit
    /// gateway's IP packet router (TCP, UDP and ICMP alike), until SIGTERM or Ctrl-C, which
    /// remove the device and its routes. Needs CAP_NET_ADMIN (root, or `setcap
    /// cap_net_admin+ep` on the binary). With --id or --identity, as that client (while no
    /// `run` holds it); otherwise from a fresh throwaway identity.
    Tun {
        /// Name of the device [default: nym-NAME for --id NAME, else nymtun0].
        #[arg(long)]
        device: Option<String>,
        /// Route everything into the tunnel (as 0.0.0.0/1, 128.0.0.0/1, ::/1 and 8000::/1);
        /// the gateway's own address keeps the path it has now.
        #[arg(long)]
        default_route: bool,
        /// Route this network into the tunnel (e.g. 198.51.100.0/24 or 2001:db8::/32);
        /// repeat for more.
        #[arg(long = "route", value_name = "PREFIX", value_parser = parse_prefix)]
        routes: Vec<(IpAddr, u8)>,
        /// Exit gateway to leave through, by name or identity key; a random serving one
        /// with an IP packet router when omitted.
        #[arg(long)]
        exit: Option<String>,
        /// Write the device's name and addresses (JSON) to this file once the tunnel
        /// carries packets, and remove it at exit: a readiness signal.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Send COUNT messages from a fresh client through three mix layers back to itself.
    Probe {
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Bytes per message (larger ones are split across packets).
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "60s", value_parser = config::parse_duration)]
        timeout: Duration,
        /// Probe again this long after each round, until stopped, with one client (the
        /// exit code then says nothing; the metrics and --ok-file do).
        #[arg(long, value_parser = config::parse_duration)]
        every: Option<Duration>,
        /// With --every: serve the rounds' results as Prometheus metrics
        /// (`nym_client_probe_*`) at http://ADDR/metrics.
        #[arg(long, requires = "every")]
        metrics_listen: Option<SocketAddr>,
        /// With --every: keep this file while the last round delivered every message.
        #[arg(long, requires = "every")]
        ok_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    telemetry::init_logging(LogFormat::Text, "warn");
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nym-client: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nym-client: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The client directory named by --id or --identity, if any.
fn client_dir(cli: &Cli) -> Result<Option<ClientDir>, String> {
    if let Some(dir) = &cli.identity {
        return Ok(Some(ClientDir::new(dir.clone())));
    }
    let Some(name) = &cli.id else {
        return Ok(None);
    };
    let data = match &cli.data_dir {
        Some(d) => d.clone(),
        None => state::data_dir(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?,
    };
    Ok(Some(ClientDir::new(
        state::named(&data, name).map_err(|e| e.to_string())?,
    )))
}

fn need_client(cli: &Cli) -> Result<ClientDir, String> {
    client_dir(cli)?.ok_or_else(|| "which client? pass --id NAME (or --identity DIR)".to_string())
}

/// The client's settings; a directory from an older init (identity only) gets a gateway now.
fn settings(dir: &ClientDir) -> Result<Option<Settings>, String> {
    dir.settings().map_err(|e| e.to_string())
}

/// Configuration for a client in `dir` (its own gateway and SURB store), or a fresh one.
fn config_for(cli: &Cli, dir: Option<&ClientDir>) -> Result<ClientConfig, String> {
    let stored = match dir {
        Some(d) => settings(d)?,
        None => None,
    };
    let topology = cli
        .topology
        .clone()
        .or_else(|| stored.as_ref().and_then(|s| s.topology.clone()))
        .ok_or("no topology: pass --topology or set NYM_CLIENT_TOPOLOGY")?;
    let topology_signer = cli
        .topology_signer
        .or_else(|| stored.as_ref().and_then(|s| s.topology_signer));
    let unsigned =
        cli.insecure_unsigned_topology || stored.as_ref().is_some_and(|s| s.unsigned_topology);
    if topology_signer.is_none() && !unsigned {
        return Err(
            "no directory key: pass --topology-signer KEY_OR_FILE (init stores it), or --insecure-unsigned-topology to take documents no directory signed"
                .into(),
        );
    }
    Ok(ClientConfig {
        topology,
        gateway: stored.as_ref().map(|s| s.gateway).or(cli.gateway),
        mean_delay: cli.mean_delay,
        cover_rate: cli.cover_rate(),
        loop_rate: cli.loop_rate(),
        downstream_rate: cli.downstream_rate(),
        send_receipts: cli.send_receipts,
        gateway_address: cli.gateway_address.clone(),
        acks: !cli.no_acks,
        max_retransmissions: cli.max_retransmissions,
        surb_store: dir.map(ClientDir::surb_store),
        stamps: dir.map(ClientDir::stamps),
        topology_memory: dir.map(ClientDir::topology),
        completed_ids: dir.map(ClientDir::completed_ids),
        inbox: dir.map(ClientDir::inbox),
        topology_signer,
        ..ClientConfig::default()
    })
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match &cli.command {
        Command::Init => init(&cli).await,
        Command::Address => address(&cli).await,
        Command::Run {
            listen,
            allow_remote,
            allow_origins,
            require_token,
        } => serve_api(&cli, listen, allow_remote, allow_origins, require_token).await,
        Command::Send {
            to,
            message,
            reply_surbs,
            receipt,
            timeout,
        } => send(&cli, to, message, reply_surbs, receipt, timeout).await,
        Command::Receive { count, timeout } => receive(&cli, count, timeout).await,
        Command::Socks5 {
            listen,
            allow_remote,
            exit,
            ready_file,
        } => serve_socks5(&cli, listen, allow_remote, exit, ready_file).await,
        Command::Tun {
            device,
            default_route,
            routes,
            exit,
            ready_file,
        } => serve_tun(&cli, device, *default_route, routes, exit, ready_file).await,
        Command::Probe {
            count,
            size,
            timeout,
            every,
            metrics_listen,
            ok_file,
        } => probe_network(&cli, count, size, timeout, every, metrics_listen, ok_file).await,
    }
}

/// `init`: a new client, its identity and its gateway, registered once.
async fn init(cli: &Cli) -> Result<ExitCode, String> {
    let dir = need_client(cli)?;
    if settings(&dir)?.is_some() {
        return Err(format!(
            "{}: a client already exists here",
            dir.path.display()
        ));
    }
    let identity = match dir.identity() {
        Ok(id) => id, // made by an older init: keep it
        Err(_) => Identity::generate().map_err(|e| e.to_string())?,
    };
    let mut config = config_for(cli, None)?;
    // A file given by a relative path is remembered by its full path.
    if let Ok(full) = std::fs::canonicalize(&config.topology) {
        config.topology = full.display().to_string();
    }
    // Connecting registers the client with the gateway; the gateway it picked
    // (or was given) is its gateway from now on.
    let client = MixClient::start(config.clone(), identity.clone())
        .await
        .map_err(|e| e.to_string())?;
    let address = client.address();
    client.stop().await;
    dir.create(
        &identity,
        &Settings {
            gateway: address.gateway,
            topology: Some(config.topology),
            topology_signer: config.topology_signer,
            unsigned_topology: config.topology_signer.is_none(),
        },
    )
    .map_err(|e| e.to_string())?;
    println!("{address}");
    Ok(ExitCode::SUCCESS)
}

/// `address`: the client's address, from its identity and its gateway.
async fn address(cli: &Cli) -> Result<ExitCode, String> {
    let dir = need_client(cli)?;
    let identity = dir.identity().map_err(|e| e.to_string())?;
    let Some(settings) = settings(&dir)? else {
        return Err(format!(
            "{}: no gateway chosen yet; run `nym-client init` with this client first",
            dir.path.display()
        ));
    };
    println!("{}", ClientAddress::of(&identity, settings.gateway));
    Ok(ExitCode::SUCCESS)
}

/// `run`: the long-running client serving Nym's WebSocket API.
async fn serve_api(
    cli: &Cli,
    listen: &SocketAddr,
    allow_remote: &bool,
    allow_origins: &[String],
    require_token: &bool,
) -> Result<ExitCode, String> {
    let listen = websocket::check_listen(*listen, *allow_remote)?;
    let dir = need_client(cli)?;
    let config = config_for(cli, Some(&dir))?;
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    let access = daemon::ApiAccess {
        origins: websocket::AllowedOrigins::new(allow_origins.iter().cloned()),
        require_token: *require_token,
    };
    daemon::run(config, dir, listen, access, stop, None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// `send`: one message, through the running client when one serves this client.
async fn send(
    cli: &Cli,
    to: &ClientAddress,
    message: &str,
    reply_surbs: &usize,
    receipt: &Option<Duration>,
    timeout: &Duration,
) -> Result<ExitCode, String> {
    let dir = client_dir(cli)?;
    if let Some(dir) = &dir
        && let Some(running) = dir.running().map_err(|e| e.to_string())?
    {
        if receipt.is_some() {
            return Err("--receipt needs the client's own session; `nym-client run` holds it for this client".into());
        }
        send_through_running(&running, &send_request(to, message, *reply_surbs)).await?;
        println!("queued by the running client");
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = match &dir {
        Some(d) => Some(
            d.try_lock()
                .map_err(|e| e.to_string())?
                .ok_or("another nym-client holds this client's session")?,
        ),
        None => None,
    };
    let mut config = config_for(cli, dir.as_ref())?;
    config.receipt_timeout = *receipt;
    let identity = match &dir {
        Some(d) => d.identity().map_err(|e| e.to_string())?,
        None => Identity::generate().map_err(|e| e.to_string())?,
    };
    let mut client = MixClient::start(config, identity)
        .await
        .map_err(|e| e.to_string())?;
    let msg_id = client
        .send(*to, message.as_bytes().to_vec(), *reply_surbs)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = tokio::time::timeout(*timeout, async {
        loop {
            match client.next_event().await {
                Some(Event::Delivered { id }) if id == msg_id && receipt.is_none() => {
                    return true;
                }
                Some(Event::Confirmed { id }) if id == msg_id => return true,
                Some(Event::Failed { id }) if id == msg_id => return false,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    client.stop().await;
    if outcome {
        println!(
            "{}",
            if receipt.is_some() {
                "confirmed by the recipient"
            } else {
                "delivered"
            }
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("not acknowledged");
        Ok(ExitCode::FAILURE)
    }
}

/// The WebSocket request `send` hands a running client.
fn send_request(to: &ClientAddress, message: &str, reply_surbs: usize) -> Request {
    match reply_surbs {
        0 => Request::Send {
            recipient: to.to_string(),
            message: message.to_string(),
            with_reply_surb: false,
            connection_id: None,
        },
        n => Request::SendAnonymous {
            recipient: to.to_string(),
            message: message.to_string(),
            reply_surbs: n as u32,
            connection_id: None,
        },
    }
}

/// `receive`: messages printed as they arrive.
async fn receive(cli: &Cli, count: &Option<usize>, timeout: &Duration) -> Result<ExitCode, String> {
    let dir = need_client(cli)?;
    if let Some(running) = dir.running().map_err(|e| e.to_string())? {
        let got = receive_through_running(&running, *count, *timeout).await?;
        return Ok(if count.is_none_or(|c| got >= c) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let _lock = dir
        .try_lock()
        .map_err(|e| e.to_string())?
        .ok_or("another nym-client holds this client's session")?;
    let identity = dir.identity().map_err(|e| e.to_string())?;
    let mut client = MixClient::start(config_for(cli, Some(&dir))?, identity)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("receiving as {}", client.address());
    let mut got = 0;
    let _ = tokio::time::timeout(*timeout, async {
        while count.is_none_or(|c| got < c) {
            match client.next_event().await {
                Some(Event::Received { body, .. }) => {
                    println!("{}", String::from_utf8_lossy(&body));
                    got += 1;
                }
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    client.stop().await;
    Ok(if count.is_none_or(|c| got >= c) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What a subcommand that holds the client's session itself (`socks5`, `tun`) starts from.
struct Own {
    /// Held while the subcommand runs, so no `run` takes the same client meanwhile.
    _lock: Option<state::SessionLock>,
    identity: Identity,
    config: ClientConfig,
    topology: nym_node::topology::Topology,
}

/// The client named by --id or --identity (locked), or a throwaway identity; its
/// configuration, and the topology it starts from.
async fn own_session(cli: &Cli) -> Result<Own, String> {
    let dir = client_dir(cli)?;
    let _lock = match &dir {
        Some(d) => Some(d.try_lock().map_err(|e| e.to_string())?.ok_or_else(|| {
            format!(
                "{}: another process (`nym-client run`?) holds this client",
                d.path.display()
            )
        })?),
        None => None,
    };
    let identity = match &dir {
        Some(d) => d.identity().map_err(|e| e.to_string())?,
        None => Identity::from_secret(random_bytes().map_err(|e| e.to_string())?),
    };
    let config = config_for(cli, dir.as_ref())?;
    let topology = TopologySource::parse(&config.topology)
        .signed_by(config.topology_signer)
        .remembered_in(config.topology_memory.clone())
        .load_or_remembered()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Own {
        _lock,
        identity,
        config,
        topology,
    })
}

/// `socks5`: the proxy whose streams leave at an exit gateway.
async fn serve_socks5(
    cli: &Cli,
    listen: &SocketAddr,
    allow_remote: &bool,
    exit: &Option<String>,
    ready_file: &Option<PathBuf>,
) -> Result<ExitCode, String> {
    let listen = socks5::check_listen(*listen, *allow_remote)?;
    let Own {
        _lock,
        identity,
        config,
        topology,
    } = own_session(cli).await?;
    let requester = socks5::choose_exit(&topology, exit.as_deref()).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let client = MixClient::start(config, identity)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "SOCKS5 proxy on {} (exit {}); try: curl --socks5-hostname {} http://example.org/",
        listener.local_addr().map_err(|e| e.to_string())?,
        requester.gateway,
        listen
    );
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    if let Some(path) = ready_file {
        std::fs::write(path, b"serving\n")
            .map_err(|e| format!("--ready-file {}: {e}", path.display()))?;
    }
    socks5::serve(listener, client, requester, stop).await;
    if let Some(path) = ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(ExitCode::SUCCESS)
}

/// `tun`'s outbox: a few seconds of upstream slots. A deeper queue would only add delay
/// for TCP inside the tunnel to mistake for a slow path; what does not fit is dropped,
/// as a router's full queue drops.
const TUN_OUTBOX: usize = 64;

fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?}: expected an IP network such as 198.51.100.0/24"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else {
        len.parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length 0 to {max}"))?
    };
    Ok((ip, len))
}

/// `tun`: a TUN device carried through the mixnet to an exit's IP packet router.
async fn serve_tun(
    cli: &Cli,
    device: &Option<String>,
    default_route: bool,
    routes: &[(IpAddr, u8)],
    exit: &Option<String>,
    ready_file: &Option<PathBuf>,
) -> Result<ExitCode, String> {
    if !default_route && routes.is_empty() {
        return Err(
            "nothing to route: pass --route PREFIX (repeat for more) or --default-route".into(),
        );
    }
    let name = device.clone().unwrap_or_else(|| match &cli.id {
        Some(id) => format!("nym-{id}")
            .chars()
            .take(nym_node::tun::MAX_NAME)
            .collect(),
        None => "nymtun0".into(),
    });
    if !nym_node::tun::valid_name(&name) {
        return Err(format!(
            "--device {name:?}: 1 to 15 characters, no '/', ':' or spaces"
        ));
    }
    let Own {
        _lock,
        identity,
        mut config,
        topology,
    } = own_session(cli).await?;
    config.max_outbox = TUN_OUTBOX;
    let router = tunnel::choose_router(&topology, exit.as_deref()).map_err(|e| e.to_string())?;
    let mut client = MixClient::start(config, identity)
        .await
        .map_err(|e| e.to_string())?;
    let gateway_ip = gateway_ip(cli, &topology, client.address().gateway).await;
    let lease = tunnel::connect(&mut client, router)
        .await
        .map_err(|e| e.to_string())?;
    let routes = tunnel::Routes {
        default: default_route,
        prefixes: routes.to_vec(),
    };
    let (device, pinned) = tunnel::open_device(&name, &lease, &routes, gateway_ip)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "tunnel {name}: {} and {} (MTU {}) through exit {}",
        lease.ipv4, lease.ipv6, lease.mtu, router.gateway
    );
    if let Some(path) = ready_file {
        let ready = serde_json::json!({"device": name, "ipv4": lease.ipv4, "ipv6": lease.ipv6, "mtu": lease.mtu});
        std::fs::write(path, ready.to_string())
            .map_err(|e| format!("--ready-file {}: {e}", path.display()))?;
    }
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    let stats = tunnel::pump(&mut client, router, &lease, &device, stop.cancelled()).await;
    if let Some(route) = pinned {
        device.unpin_route(route).await;
    }
    drop(device);
    client.stop().await;
    if let Some(path) = ready_file {
        let _ = std::fs::remove_file(path);
    }
    eprintln!(
        "tunnel {name} closed: {} packets ({} bytes) out, {} ({} bytes) in, {} dropped at a full outbox",
        stats.packets_out, stats.bytes_out, stats.packets_in, stats.bytes_in, stats.dropped
    );
    Ok(ExitCode::SUCCESS)
}

/// The IP our gateway link goes to (pinned outside a default route into the tunnel).
async fn gateway_ip(
    cli: &Cli,
    topology: &nym_node::topology::Topology,
    gateway: NodeId,
) -> Option<IpAddr> {
    let address = cli.gateway_address.clone().or_else(|| {
        topology
            .node(&gateway)
            .and_then(|n| n.client_address.clone())
    })?;
    tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .ok()?
        .next()
        .map(|a| a.ip())
}

/// `probe`: messages through the mixnet back to a fresh client, once or `--every`.
async fn probe_network(
    cli: &Cli,
    count: &usize,
    size: &usize,
    timeout: &Duration,
    every: &Option<Duration>,
    metrics_listen: &Option<SocketAddr>,
    ok_file: &Option<PathBuf>,
) -> Result<ExitCode, String> {
    let id = Identity::from_secret(random_bytes().map_err(|e| e.to_string())?);
    let mut client = MixClient::start(config_for(cli, None)?, id)
        .await
        .map_err(|e| e.to_string())?;
    let Some(interval) = every else {
        let report = probe::run(&mut client, *count, *size, *timeout).await;
        client.stop().await;
        println!("{}", report.summary());
        return Ok(if report.ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    let settings = prober::ProberSettings {
        count: *count,
        size: *size,
        timeout: *timeout,
        interval: *interval,
        ok_file: ok_file.clone(),
    };
    probe_forever(client, settings, *metrics_listen).await?;
    Ok(ExitCode::SUCCESS)
}

/// `probe --every`: rounds until a signal, their results served as metrics.
async fn probe_forever(
    mut client: MixClient,
    settings: prober::ProberSettings,
    metrics_listen: Option<SocketAddr>,
) -> Result<(), String> {
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signals(stop.clone()));
    let metrics = prober::ProbeMetrics::new();
    if let Some(addr) = metrics_listen {
        let listener = prober::bind(addr).await?;
        tokio::spawn(prober::serve_metrics(
            listener,
            metrics.clone(),
            stop.clone(),
        ));
    }
    prober::run(&mut client, &settings, &metrics, stop).await;
    client.stop().await;
    Ok(())
}

/// Installs SIGTERM/SIGINT handlers now (before the caller reports itself ready, so no
/// signal meets the default disposition) and returns the task that cancels `stop` on one.
fn stop_on_signals(stop: CancellationToken) -> impl std::future::Future<Output = ()> {
    let signals = nym_node::shutdown::Signals::install();
    async move {
        if let Ok(mut signals) = signals {
            signals.next().await;
            stop.cancel();
        }
    }
}

type RunningSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A connection to the running client's WebSocket API, with its token if it needs one.
async fn connect_running(running: &Running) -> Result<RunningSocket, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let addr = running.websocket;
    let failed = |e: String| format!("the running client at {addr}: {e}");
    let mut request = format!("ws://{addr}/")
        .into_client_request()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(token) = &running.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| failed("its token in run.json is not a header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(ws)
}

/// Hands one request to the running client's WebSocket API; an error it answers with
/// (within a moment) is reported.
async fn send_through_running(running: &Running, request: &Request) -> Result<(), String> {
    use futures_util::{SinkExt, StreamExt};
    let addr = running.websocket;
    let mut ws = connect_running(running).await?;
    let text = serde_json::to_string(request).map_err(|e| e.to_string())?;
    ws.send(tokio_tungstenite::tungstenite::Message::text(text))
        .await
        .map_err(|e| format!("the running client at {addr}: {e}"))?;
    if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(answer)))) =
        tokio::time::timeout(Duration::from_millis(500), ws.next()).await
        && let Ok(TextResponse::Error { message }) = serde_json::from_str(&answer)
    {
        return Err(message);
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// Prints what the running client receives, as its current application.
async fn receive_through_running(
    running: &Running,
    count: Option<usize>,
    timeout: Duration,
) -> Result<usize, String> {
    use futures_util::StreamExt;
    let mut ws = connect_running(running).await?;
    let mut got = 0;
    let _ = tokio::time::timeout(timeout, async {
        while count.is_none_or(|c| got < c) {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    if let Ok(TextResponse::Received { message, .. }) = serde_json::from_str(&text)
                    {
                        println!("{message}");
                        got += 1;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    })
    .await;
    Ok(got)
}
