//! `nym-client`: send and receive messages through the mixnet, or probe it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use nym_node::client::{ClientAddress, ClientConfig, Event, MixClient, probe};
use nym_node::config::{self, LogFormat};
use nym_node::keys::{Identity, NodeId, random_bytes};
use nym_node::telemetry;

#[derive(Parser)]
#[command(
    name = "nym-client",
    version,
    about = "A mixnet client: send, receive, probe"
)]
struct Cli {
    /// Topology document: a file path or an http(s) URL.
    #[arg(long, env = "NYM_CLIENT_TOPOLOGY")]
    topology: String,
    /// Gateway to connect to (identity key); a random serving gateway when omitted.
    #[arg(long)]
    gateway: Option<NodeId>,
    /// Mean per-hop delay of our packets.
    #[arg(long, default_value = "50ms", value_parser = config::parse_duration)]
    mean_delay: Duration,
    /// Poisson rate (packets/s) of outgoing packets; idle slots carry loop cover. 0 disables cover traffic.
    #[arg(long, default_value_t = 20.0)]
    cover_rate: f64,
    /// Share (0 to 1) of cover slots that carry drop cover to a made-up client of a random
    /// gateway instead of a loop back to this client.
    #[arg(long, default_value_t = 0.0)]
    drop_cover_ratio: f64,
    /// Do not ask for acknowledgements (and so never retransmit).
    #[arg(long)]
    no_acks: bool,
    /// Retransmissions per packet before a message is reported failed.
    #[arg(long, default_value_t = 6)]
    max_retransmissions: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an identity for `send`/`receive` in DIR (mode 0600).
    Init {
        #[arg(long)]
        identity: PathBuf,
    },
    /// Print this client's address (IDENTITY.ENCRYPTION@GATEWAY) for the identity in DIR.
    Address {
        #[arg(long)]
        identity: PathBuf,
    },
    /// Send one message and wait until the recipient's gateway acknowledged every fragment
    /// (or, with --receipt, until the recipient confirmed it).
    Send {
        #[arg(long)]
        identity: Option<PathBuf>,
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
    /// Print messages as they arrive (one per line).
    Receive {
        #[arg(long)]
        identity: PathBuf,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<usize>,
        #[arg(long, default_value = "1h", value_parser = config::parse_duration)]
        timeout: Duration,
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

fn identity_file(dir: &std::path::Path) -> PathBuf {
    dir.join("client-identity.key")
}

fn load_identity(dir: &std::path::Path) -> Result<Identity, String> {
    Identity::load(&identity_file(dir)).map_err(|e| e.to_string())
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    let mut config = ClientConfig {
        topology: cli.topology.clone(),
        gateway: cli.gateway,
        mean_delay: cli.mean_delay,
        cover_rate: cli.cover_rate,
        drop_cover_ratio: cli.drop_cover_ratio.clamp(0.0, 1.0),
        acks: !cli.no_acks,
        max_retransmissions: cli.max_retransmissions,
        ..ClientConfig::default()
    };
    match cli.command {
        Command::Init { identity } => {
            let id = Identity::generate().map_err(|e| e.to_string())?;
            id.write(&identity_file(&identity))
                .map_err(|e| e.to_string())?;
            println!("{}", id.public());
            Ok(ExitCode::SUCCESS)
        }
        Command::Address { identity } => {
            let id = load_identity(&identity)?;
            let client = MixClient::start(config, id)
                .await
                .map_err(|e| e.to_string())?;
            println!("{}", client.address());
            client.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            identity,
            to,
            message,
            reply_surbs,
            receipt,
            timeout,
        } => {
            config.receipt_timeout = receipt;
            let id = match identity {
                Some(dir) => load_identity(&dir)?,
                None => Identity::generate().map_err(|e| e.to_string())?,
            };
            let mut client = MixClient::start(config, id)
                .await
                .map_err(|e| e.to_string())?;
            let msg_id = client
                .send(to, message.into_bytes(), reply_surbs)
                .await
                .map_err(|e| e.to_string())?;
            let outcome = tokio::time::timeout(timeout, async {
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
        Command::Receive {
            identity,
            count,
            timeout,
        } => {
            let id = load_identity(&identity)?;
            let mut client = MixClient::start(config, id)
                .await
                .map_err(|e| e.to_string())?;
            eprintln!("receiving as {}", client.address());
            let mut got = 0;
            let _ = tokio::time::timeout(timeout, async {
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
        Command::Probe {
            count,
            size,
            timeout,
        } => {
            let id = Identity::from_secret(random_bytes().map_err(|e| e.to_string())?);
            let mut client = MixClient::start(config, id)
                .await
                .map_err(|e| e.to_string())?;
            let report = probe::run(&mut client, count, size, timeout).await;
            client.stop().await;
            println!("{}", report.summary());
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
