//! Every knob the node reads, defined once.
//!
//! Each knob is one line of the [`knobs!`] table below: its field name (the environment
//! variable is `NYM_NODE_` + the name in upper case), its type, its default and its doc
//! comment. That one definition feeds the environment parsing (`envy` + `serde`), the
//! README table and the Helm values (`nym-node config-docs`), so they cannot drift apart.
//!
//! Parsing goes through [`KnobValue`], so a bad value fails with one line naming the
//! variable and the form it expects; the binary turns that into exit code 64 (`EX_USAGE`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// Prefix shared by every variable the node reads.
pub const ENV_PREFIX: &str = "NYM_NODE_";

/// A configuration error: always names the variable and what it expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {message}")]
    Invalid { var: String, message: String },
    #[error("{0}")]
    Other(String),
}

/// A type a knob can hold: how it is parsed from the environment and how it is described.
pub trait KnobValue: Sized {
    /// The accepted form, in words, for error messages and the docs.
    const EXPECTED: &'static str;
    /// The accepted form as JSON Schema, for the Helm chart's `values.schema.json` (which
    /// takes an integer where the env takes its digits).
    const SCHEMA: &'static str = r#"{"type": "string"}"#;
    fn parse_knob(raw: &str) -> Result<Self, String>;
}

/// Schema of a non-negative integer knob: digits, or a YAML integer.
const INTEGER_SCHEMA: &str =
    r#"{"anyOf": [{"type": "string", "pattern": "^[0-9]+$"}, {"type": "integer", "minimum": 0}]}"#;

macro_rules! knobs {
    ($( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:literal; )+) => {
        /// The node's whole configuration, parsed once at start.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(default)]
        pub struct Config {
            $(
                $(#[doc = $doc])+
                #[serde(deserialize_with = "knob_parse")]
                pub $field: $ty,
            )+
        }

        impl Default for Config {
            fn default() -> Self {
                Self {
                    $(
                        $field: match <$ty as KnobValue>::parse_knob($default) {
                            Ok(value) => value,
                            // A default is a literal in this file; the unit tests parse every one.
                            Err(e) => panic!("default of {} does not parse: {e}", stringify!($field)),
                        },
                    )+
                }
            }
        }

        /// Every knob: variable name, default, accepted form and doc, in table order.
        pub fn knobs() -> Vec<Knob> {
            vec![$(
                Knob {
                    field: stringify!($field),
                    env: env_name(stringify!($field)),
                    default: $default,
                    expected: <$ty as KnobValue>::EXPECTED,
                    schema: <$ty as KnobValue>::SCHEMA,
                    doc: concat!($($doc, "\n"),+).lines().map(str::trim).collect::<Vec<_>>().join(" ").trim().to_string(),
                },
            )+]
        }
    };
}

knobs! {
    /// Name of this node, used in logs, traces and the localnet.
    id: String = "nym-node";
    /// Duties of this node: `mixnode`, `entry-gateway` or `exit-gateway`.
    mode: Mode = "mixnode";
    /// Topology document: a file path or an http(s) URL. Required.
    topology: String = "";
    /// How often the topology document is re-read; a bad document keeps the last good one.
    topology_refresh: DurationKnob = "30s";
    /// Base58 ed25519 public key of the directory that signs the topology document, or a file holding it. When set, a document not signed by this key is refused (the last good one is kept); a plain `http://` source needs it. Empty accepts unsigned documents from files and https.
    topology_signer: String = "";
    /// Directory holding the node's key files (created by `nym-node keygen`).
    keys_dir: PathBuf = "./nym-node-data/keys";
    /// Directory for the node's durable state (the gateway mailbox).
    data_dir: PathBuf = "./nym-node-data";
    /// Address the Noise mixnet listener binds.
    mixnet_bind: SocketAddr = "0.0.0.0:1789";
    /// Address the HTTP server (health, readiness, metrics, description) binds.
    http_bind: SocketAddr = "0.0.0.0:8080";
    /// Address the gateway client API (WebSocket) binds; unused by mix nodes.
    client_bind: SocketAddr = "0.0.0.0:9000";
    /// Largest per-hop delay a packet may ask for; packets asking for more are dropped.
    max_packet_delay: DurationKnob = "10s";
    /// Threads unwrapping Sphinx packets; `0` uses one per available core.
    sphinx_workers: usize = "0";
    /// Async runtime threads (sockets, Noise, forwarder, HTTP); `0` uses one per four cores, at least one. Unwrapping dominates the CPU, so few are needed, and fewer threads mean fewer cross-thread wake-ups per packet.
    runtime_threads: usize = "0";
    /// Packets waiting for a Sphinx worker, across all connections; beyond it packets are shed before unwrap (`overload`).
    sphinx_queue: usize = "4096";
    /// Packets one peer (all its ingress links together) may have waiting for a Sphinx worker; beyond it that peer's packets are shed (`overload`). The name predates per-peer budgets.
    sphinx_queue_per_connection: usize = "512";
    /// Unwrapped packets waiting for the forwarder (workers block when it is full, which backs up into the Sphinx queue).
    forwarder_queue: usize = "8192";
    /// Gateways: final-hop payloads waiting to be written to the mailbox; beyond it they are dropped (`delivery_queue_full`) and not acknowledged, so their senders retry. The Sphinx workers never wait on the mailbox, so slow storage cannot stall mix traffic.
    delivery_queue: usize = "8192";
    /// Packets the forwarder may hold for their per-hop delays; beyond it new delayed packets are dropped (`delay_queue_full`), so a flood asking for long delays cannot grow memory without bound (measured 2.55 KB of resident memory a held packet: 65536 hold about 167 MB).
    delay_queue_capacity: usize = "65536";
    /// Packets queued for one egress peer; beyond it packets to that peer are dropped (`queue_full`).
    egress_queue: usize = "2048";
    /// How long one Sphinx key is used before the next takes over. Each key has its own replay filter, dropped with the key, so the interval bounds the filter's size (about 3.6 bytes x packets of one epoch) and how long a stolen key can read traffic; one hour keeps a filter for 10,000 packets/s near 134 MB while the topology has a whole epoch to publish each next key.
    key_rotation_interval: DurationKnob = "1h";
    /// How long a key is still accepted after its epoch, for packets built for it that are still on their way; at least 4 x `NYM_NODE_MAX_PACKET_DELAY` (the hops of a route) + `NYM_NODE_TOPOLOGY_REFRESH`, and less than the rotation interval.
    key_overlap: DurationKnob = "2m";
    /// Packets per second one epoch's replay filter is sized for at `NYM_NODE_REPLAY_FILTER_FALSE_POSITIVE` (a busier epoch grows the filter by another stage of the same size rather than losing accuracy).
    replay_filter_rate: u64 = "2000";
    /// One in this many new packets may be mistaken for a replay once a filter stage is full (the sender retransmits it).
    replay_filter_false_positive: u64 = "1000000";
    /// How often the replay filters are snapshotted to `NYM_NODE_DATA_DIR` (and at shutdown). Every tag also goes to a journal before its packet goes on, so a crash forgets none; the snapshot bounds the journal (32 bytes a packet) and what a restart reads back.
    replay_filter_save_interval: DurationKnob = "1m";
    /// Flush the replay journal to stable storage (fdatasync) once per batch of unwrapped packets, before they go on. Off, tags still reach the kernel first, which survives any crash of the node's process (SIGKILL, the OOM killer) but not of the machine.
    replay_journal_sync: bool = "true";
    /// Close ingress/egress mixnet connections with no traffic for this long; `0` disables.
    connection_idle_timeout: DurationKnob = "5m";
    /// Give up on an egress batch whose flush takes longer than this (the connection survives two in a row); `0` disables.
    connection_write_timeout: DurationKnob = "500ms";
    /// Deadline for a TCP connect to a peer.
    connect_timeout: DurationKnob = "3s";
    /// Deadline for a whole Noise handshake, either side.
    handshake_timeout: DurationKnob = "5s";
    /// Deadline for an ingress connection's first handshake message (a peer sends it the moment it connects); a connection still silent is closed, so silent and trickling connections cannot hold handshake places.
    handshake_first_message_timeout: DurationKnob = "2s";
    /// Deadline for the rest of a frame once its first byte has arrived.
    frame_read_timeout: DurationKnob = "10s";
    /// Concurrent authenticated ingress mixnet links (after the handshake); more are closed and counted.
    max_ingress_connections: usize = "1024";
    /// Ingress links one peer (one Noise key) may hold at once; a newer link closes the oldest, so a peer cannot multiply its share by opening links (its links share one Sphinx-queue budget too).
    max_links_per_peer: usize = "2";
    /// Connections from one address group (an IPv4 address, an IPv6 /64) past their first handshake message and not yet authenticated; a newer one closes the oldest.
    max_handshakes_per_address: usize = "8";
    /// Connections in their Noise handshake at once; when full, the oldest that has not sent its first message is closed for a newcomer (else the oldest past it: a newcomer is never refused). Authenticated links count against NYM_NODE_MAX_INGRESS_CONNECTIONS instead.
    max_pending_handshakes: usize = "256";
    /// First reconnect delay after a failed connection to a peer; doubles per failure.
    reconnect_backoff_initial: DurationKnob = "200ms";
    /// Cap of the reconnect delay (each delay gets +-20% jitter).
    reconnect_backoff_max: DurationKnob = "30s";
    /// After SIGTERM, how long peers' packets are still accepted before held packets are released and the node exits.
    drain_grace: DurationKnob = "5s";
    /// Name servers for peer host names, comma-separated `ip` or `ip:port`; empty uses the system resolver configuration.
    dns_servers: DnsServers = "";
    /// Longest time a resolved peer address is cached, whatever the record's TTL says.
    dns_max_ttl: DurationKnob = "60s";
    /// How long a name that does not exist is remembered as missing.
    dns_negative_ttl: DurationKnob = "5s";
    /// Deadline for one DNS lookup.
    dns_timeout: DurationKnob = "2s";
    /// Gateways: how long an unacknowledged payload is kept for an absent client.
    mailbox_retention: DurationKnob = "24h";
    /// Gateways: bytes one client may have stored; newer payloads beyond it are refused (and not acknowledged, so senders retry).
    mailbox_quota_bytes: u64 = "67108864";
    /// Gateways: bytes all clients' stored payloads may take together, so no mix of destinations can fill the disk; beyond it new payloads are refused.
    mailbox_max_bytes: u64 = "1073741824";
    /// Gateways: bytes the payloads for clients that never opened a session here may take together (made-up destinations, drop cover, clients not yet online); they cannot crowd out the gateway's own clients.
    mailbox_unregistered_bytes: u64 = "16777216";
    /// Gateways: the share of NYM_NODE_MAILBOX_MAX_BYTES, in percent (at most 90), kept for clients with a session open: durable storage stops this far below the cap, and a payload for a connected client that finds it full is held in the reserve (an equal share per connected client), its sender acknowledged only once the client acknowledges it, and dropped for the sender to retransmit if the client leaves or does not acknowledge it within 2 to 3 minutes. So dormant clients cannot shut an active one out, and nothing acknowledged to a sender is deleted to make room.
    mailbox_present_reserve_percent: Percent = "25";
    /// Gateways: leading zero bits of the registration stamp a client new here must bring (a SHA-256 proof of work over the gateway's and the client's identities, made once per gateway and kept). Each bit doubles the client's cost; 22 is about 4 million hashes: 0.24 s of one core at the 17.6 M hashes/s `cargo bench --bench registration_stamp` measured on a 2-core cloud VM (a phone takes a few times longer). The gateway checks a stamp with one hash. 0 asks for none.
    registration_stamp_bits: StampBits = "22";
    /// Gateways: a registered client with no session for this long is registered no more: its stored payloads stay until their retention, counted as unregistered, and its next session registers it again with its kept stamp.
    registration_expiry: DurationKnob = "168h";
    /// Gateways: packets per second one client session may send on average.
    client_rate: u32 = "500";
    /// Gateways: packets one client session may send in a burst above its rate.
    client_burst: u32 = "1000";
    /// Gateways: the highest downstream rate (frames per second) a client may ask for. A client's session gets frames at the Poisson rate it asks for, up to this: a stored payload when one waits, else a dummy frame, so its link shows the same rate whether it receives or not (each frame is 2,447 bytes: 1 frame/s is 211 MB a day). What arrives faster waits in the mailbox. The exit's own services are not paced.
    client_downstream_max_rate: u32 = "50";
    /// Gateways: client API connections not yet authenticated, at once; when full, the oldest that has not sent a valid first handshake message is closed for a newcomer (else the oldest past it: a newcomer is never refused).
    client_max_pending_sessions: usize = "1024";
    /// Gateways: client API connections from one address group (an IPv4 address, an IPv6 /64) past their first handshake message and not yet authenticated; a newer one closes the oldest.
    client_max_pending_per_address: usize = "8";
    /// Exit gateways: the exit policy, a file path or an http(s) URL holding ordered `accept`/`reject` rules on address, network and port (first match wins); empty accepts every public address and port. Loopback, private, link-local, multicast and the node's own addresses are refused unless a rule names them.
    exit_policy: String = "";
    /// Exit gateways: close a stream with no traffic either way for this long.
    exit_stream_idle_timeout: DurationKnob = "5m";
    /// Exit gateways: streams one client may have open at once (a client is known only by its reply tag); more are refused.
    exit_max_streams_per_client: usize = "64";
    /// Exit gateways: streams open at once in all; more are refused.
    exit_max_streams: usize = "4096";
    /// Exit gateways: run the IP packet router, which carries whole IP packets (TCP, UDP, ICMP) of `nym-client tun` between the mixnet and a TUN device, checked against the exit policy per packet and source-NATed out of the node's uplink. The node then needs CAP_NET_ADMIN, /dev/net/tun, the `nft` command and IP forwarding on (it turns forwarding on where it may), and refuses to start without them.
    ipr_enabled: bool = "false";
    /// Exit gateways: the IP packet router's TUN device.
    ipr_device: String = "nymipr0";
    /// Exit gateways: the IPv4 network the router's clients get their addresses from (the router takes the first); prefix /8 to /30. Pick one no network the node reaches uses.
    ipr_ipv4_pool: Ipv4Pool = "10.64.0.0/16";
    /// Exit gateways: the IPv6 network the router's clients get their addresses from (the router takes the first); prefix /96 to /126.
    ipr_ipv6_pool: Ipv6Pool = "fd6e:796d:6970::/112";
    /// Exit gateways: clients of the IP packet router holding addresses at once (a client is known only by its reply tag, and holds one IPv4 and one IPv6 address); at most what the smaller pool holds; when full, a newcomer takes the addresses of the client silent longest if it has been silent 90 s, else it is refused.
    ipr_max_clients: usize = "1024";
    /// Exit gateways: a router client's addresses return to the pool after this long without a message from it (clients send a keep-alive every 30 s).
    ipr_idle_timeout: DurationKnob = "3m";
    /// Exit gateways: IP packets a second one router client may send, and receive, on average (bursts of two seconds' worth); more are dropped and counted.
    ipr_client_packet_rate: u32 = "500";
    /// Exit gateways: bytes a second one router client may send, and receive, on average (bursts of two seconds' worth).
    ipr_client_byte_rate: u32 = "1048576";
    /// Bearer token required on `GET /metrics`. With no token (here or in NYM_NODE_METRICS_TOKEN_FILE), `/metrics` answers 401 to everyone unless NYM_NODE_METRICS_PUBLIC is true.
    metrics_token: String = "";
    /// A file holding the bearer token for `GET /metrics` (a Docker secret, a mounted Secret), read at start; used when NYM_NODE_METRICS_TOKEN is empty.
    metrics_token_file: String = "";
    /// Serve `/metrics` to anyone when no token is set. Off by default: a gateway's delivery, acknowledgement and exit counters, read in real time on a quiet network, help locate a sender's gateway.
    metrics_public: bool = "false";
    /// OTLP/HTTP endpoint for traces (e.g. `http://otel-collector:4318`); empty falls back to `OTEL_EXPORTER_OTLP_ENDPOINT`, and traces are off when both are empty.
    otlp_endpoint: String = "";
    /// Log format: `text` or `json`.
    log_format: LogFormat = "text";
    /// Log filter in `tracing` syntax (`RUST_LOG` overrides it when set).
    log_level: String = "info";
}

/// The variable name of every knob (the table is built once).
pub fn knob_names() -> &'static std::collections::BTreeSet<String> {
    static NAMES: std::sync::OnceLock<std::collections::BTreeSet<String>> =
        std::sync::OnceLock::new();
    NAMES.get_or_init(|| knobs().into_iter().map(|k| k.env).collect())
}

/// Metadata of one knob, for docs and tests.
#[derive(Debug, Clone)]
pub struct Knob {
    pub field: &'static str,
    pub env: String,
    pub default: &'static str,
    pub expected: &'static str,
    /// JSON Schema of the value (see [`KnobValue::SCHEMA`]).
    pub schema: &'static str,
    pub doc: String,
}

fn env_name(field: &str) -> String {
    format!("{ENV_PREFIX}{}", field.to_ascii_uppercase())
}

impl Config {
    /// Parses the process environment.
    pub fn from_env() -> Result<(Self, Vec<String>), ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Parses any source of variables (tests feed a map instead of the real environment).
    /// Returns the config and the `NYM_NODE_*` variables that no knob reads.
    pub fn from_vars<I>(vars: I) -> Result<(Self, Vec<String>), ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let ours: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let unknown = ours
            .keys()
            .filter(|k| !knob_names().contains(*k))
            .cloned()
            .collect();
        let tracked: Tracked = envy::prefixed(ENV_PREFIX)
            .from_iter(ours)
            .map_err(|e| ConfigError::Other(e.to_string()))?;
        let config = tracked.0?;
        config.validate()?;
        Ok((config, unknown))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| {
            Err(ConfigError::Invalid {
                var: env_name(field),
                message: message.to_string(),
            })
        };
        if self.topology.trim().is_empty() {
            return invalid(
                "topology",
                "required: a topology file path or http(s) URL (generate one with `nym-node localnet`)",
            );
        }
        self.metrics_access()?;
        let signer = self.topology_signer()?;
        if signer.is_none() && self.topology.trim().starts_with("http://") {
            return invalid(
                "topology",
                "a plain http:// source can be trusted only with a signed document: set NYM_NODE_TOPOLOGY_SIGNER (or use https://)",
            );
        }
        if self.delay_queue_capacity == 0 {
            return invalid("delay_queue_capacity", "must be at least 1");
        }
        if self.sphinx_queue == 0 {
            return invalid("sphinx_queue", "must be at least 1");
        }
        if self.sphinx_queue_per_connection == 0 {
            return invalid("sphinx_queue_per_connection", "must be at least 1");
        }
        if self.delivery_queue == 0 {
            return invalid("delivery_queue", "must be at least 1");
        }
        if self.forwarder_queue == 0 {
            return invalid("forwarder_queue", "must be at least 1");
        }
        if self.egress_queue == 0 {
            return invalid("egress_queue", "must be at least 1");
        }
        if self.client_max_pending_sessions == 0 {
            return invalid("client_max_pending_sessions", "must be at least 1");
        }
        if self.client_max_pending_per_address == 0 {
            return invalid("client_max_pending_per_address", "must be at least 1");
        }
        if self.client_downstream_max_rate == 0 {
            return invalid("client_downstream_max_rate", "must be at least 1");
        }
        if self.client_rate == 0 {
            return invalid("client_rate", "must be at least 1");
        }
        if self.dns_max_ttl.0.is_zero() {
            return invalid("dns_max_ttl", "must be greater than 0");
        }
        if self.dns_timeout.0.is_zero() {
            return invalid("dns_timeout", "must be greater than 0");
        }
        if self.exit_stream_idle_timeout.0.is_zero() {
            return invalid("exit_stream_idle_timeout", "must be greater than 0");
        }
        if self.exit_max_streams_per_client == 0 {
            return invalid("exit_max_streams_per_client", "must be at least 1");
        }
        if self.exit_max_streams == 0 {
            return invalid("exit_max_streams", "must be at least 1");
        }
        if !crate::tun::valid_name(&self.ipr_device) {
            return invalid(
                "ipr_device",
                "must be an interface name: 1 to 15 characters, no '/', ':' or spaces",
            );
        }
        if self.ipr_max_clients == 0 {
            return invalid("ipr_max_clients", "must be at least 1");
        }
        if self.ipr_idle_timeout.0 < crate::ip_tunnel::KEEP_ALIVE * 2 {
            return invalid(
                "ipr_idle_timeout",
                "must be at least 1m (two of the clients' keep-alive intervals)",
            );
        }
        if self.ipr_client_packet_rate == 0 {
            return invalid("ipr_client_packet_rate", "must be at least 1");
        }
        if self.ipr_client_byte_rate < 1500 {
            return invalid(
                "ipr_client_byte_rate",
                "must be at least 1500 (one packet a second)",
            );
        }
        if self.registration_expiry.0.is_zero() {
            return invalid("registration_expiry", "must be greater than 0");
        }
        if self.mailbox_retention.0.is_zero() {
            return invalid("mailbox_retention", "must be greater than 0");
        }
        if self.max_links_per_peer == 0 {
            return invalid("max_links_per_peer", "must be at least 1");
        }
        if self.max_handshakes_per_address == 0 {
            return invalid("max_handshakes_per_address", "must be at least 1");
        }
        if self.max_pending_handshakes == 0 {
            return invalid("max_pending_handshakes", "must be at least 1");
        }
        if self.max_ingress_connections == 0 {
            return invalid("max_ingress_connections", "must be at least 1");
        }
        if self.key_rotation_interval.0 < Duration::from_secs(1) {
            return invalid("key_rotation_interval", "must be at least 1s");
        }
        let min_overlap = self.max_packet_delay.0 * 4 + self.topology_refresh.0;
        if self.key_overlap.0 < min_overlap {
            return invalid(
                "key_overlap",
                &format!(
                    "must be at least 4 x NYM_NODE_MAX_PACKET_DELAY + NYM_NODE_TOPOLOGY_REFRESH ({:?})",
                    min_overlap
                ),
            );
        }
        if self.key_overlap.0 >= self.key_rotation_interval.0 {
            return invalid(
                "key_overlap",
                "must be shorter than NYM_NODE_KEY_ROTATION_INTERVAL",
            );
        }
        if self.replay_filter_rate == 0 {
            return invalid("replay_filter_rate", "must be at least 1");
        }
        if self.replay_filter_false_positive < 2 {
            return invalid("replay_filter_false_positive", "must be at least 2");
        }
        if self.replay_filter_save_interval.0.is_zero() {
            return invalid("replay_filter_save_interval", "must be greater than 0");
        }
        if self.reconnect_backoff_initial.0 > self.reconnect_backoff_max.0 {
            return invalid(
                "reconnect_backoff_initial",
                "must not exceed NYM_NODE_RECONNECT_BACKOFF_MAX",
            );
        }
        if self.handshake_first_message_timeout.0.is_zero() {
            return invalid("handshake_first_message_timeout", "must be greater than 0");
        }
        if self.handshake_timeout.0.is_zero() {
            return invalid("handshake_timeout", "must be greater than 0");
        }
        if self.connect_timeout.0.is_zero() {
            return invalid("connect_timeout", "must be greater than 0");
        }
        if self.frame_read_timeout.0.is_zero() {
            return invalid("frame_read_timeout", "must be greater than 0");
        }
        if self.topology_refresh.0.is_zero() {
            return invalid("topology_refresh", "must be greater than 0");
        }
        Ok(())
    }

    /// Who may read `/metrics`: holders of the token (from NYM_NODE_METRICS_TOKEN, else the
    /// file NYM_NODE_METRICS_TOKEN_FILE names), else anyone with NYM_NODE_METRICS_PUBLIC,
    /// else no one.
    pub fn metrics_access(&self) -> Result<crate::http::MetricsAccess, ConfigError> {
        use crate::http::MetricsAccess;
        if !self.metrics_token.is_empty() {
            return Ok(MetricsAccess::Token(self.metrics_token.clone()));
        }
        let path = self.metrics_token_file.trim();
        if !path.is_empty() {
            let invalid = |message: String| ConfigError::Invalid {
                var: env_name("metrics_token_file"),
                message,
            };
            let token = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("reading {path}: {e}")))?
                .trim()
                .to_string();
            if token.is_empty() {
                return Err(invalid(format!("{path} holds no token")));
            }
            return Ok(MetricsAccess::Token(token));
        }
        Ok(if self.metrics_public {
            MetricsAccess::Public
        } else {
            MetricsAccess::Closed
        })
    }

    /// The directory key topology documents must be signed by: the knob's base58 key, or
    /// the key in the file it names.
    pub fn topology_signer(&self) -> Result<Option<crate::keys::KeyBytes>, ConfigError> {
        let raw = self.topology_signer.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        crate::keys::key_or_file(raw)
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                var: env_name("topology_signer"),
                message,
            })
    }

    /// How this node's Sphinx key epochs run, and where their state lives.
    pub fn epoch_settings(&self) -> crate::mixnet::epochs::EpochSettings {
        let interval = self.key_rotation_interval.0;
        crate::mixnet::epochs::EpochSettings {
            schedule: crate::keys::EpochSchedule::new(interval),
            overlap: self.key_overlap.0,
            filter_capacity: self
                .replay_filter_rate
                .saturating_mul((interval + self.key_overlap.0).as_secs().max(1)),
            filter_fp_rate: 1.0 / self.replay_filter_false_positive as f64,
            keys_path: crate::keys::NodeKeys::sphinx_path(&self.keys_dir),
            filter_dir: self.data_dir.join("replay"),
            journal_sync: self.replay_journal_sync,
        }
    }

    /// Number of Sphinx worker threads after resolving `0` to the core count.
    pub fn sphinx_worker_count(&self) -> usize {
        if self.sphinx_workers > 0 {
            return self.sphinx_workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Number of async runtime threads after resolving `0`.
    pub fn runtime_thread_count(&self) -> usize {
        if self.runtime_threads > 0 {
            return self.runtime_threads;
        }
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 4).max(1))
    }

    /// `None` where a duration knob uses `0` to mean "disabled".
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.connection_idle_timeout.enabled()
    }

    pub fn write_timeout(&self) -> Option<Duration> {
        self.connection_write_timeout.enabled()
    }
}

/// Wraps the derive so a failure names the variable (the path tells which field failed).
struct Tracked(Result<Config, ConfigError>);

impl<'de> Deserialize<'de> for Tracked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Tracked(serde_path_to_error::deserialize(d).map_err(|e| {
            let field = e.path().to_string();
            ConfigError::Invalid {
                var: env_name(&field),
                message: e.into_inner().to_string(),
            }
        })))
    }
}

fn knob_parse<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: KnobValue,
{
    let raw = String::deserialize(d)?;
    T::parse_knob(raw.trim()).map_err(|reason| {
        serde::de::Error::custom(format!(
            "expected {} (got '{raw}'){}",
            T::EXPECTED,
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            }
        ))
    })
}

/// The node's duties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Mixnode,
    EntryGateway,
    ExitGateway,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mixnode => "mixnode",
            Mode::EntryGateway => "entry-gateway",
            Mode::ExitGateway => "exit-gateway",
        }
    }

    /// Gateways accept clients and deliver final-hop payloads.
    pub fn is_gateway(self) -> bool {
        !matches!(self, Mode::Mixnode)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mixnode" => Ok(Mode::Mixnode),
            "entry-gateway" => Ok(Mode::EntryGateway),
            "exit-gateway" => Ok(Mode::ExitGateway),
            _ => Err(String::new()),
        }
    }
}

impl KnobValue for Mode {
    const EXPECTED: &'static str = "one of mixnode, entry-gateway, exit-gateway";
    const SCHEMA: &'static str = r#"{"enum": ["mixnode", "entry-gateway", "exit-gateway"]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        raw.parse()
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl KnobValue for LogFormat {
    const EXPECTED: &'static str = "text or json";
    const SCHEMA: &'static str = r#"{"enum": ["text", "json"]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        match raw {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(String::new()),
        }
    }
}

/// `NYM_NODE_KEY_ROTATION_INTERVAL` alone, for the tools that write a node's keys before
/// it runs (keygen, the localnet, the compose init): its default when unset.
pub fn key_rotation_interval_from_env() -> Result<Duration, ConfigError> {
    let var = env_name("key_rotation_interval");
    match std::env::var(&var) {
        Ok(raw) => DurationKnob::parse_knob(&raw)
            .map(DurationKnob::get)
            .map_err(|message| ConfigError::Invalid { var, message }),
        Err(_) => Ok(Config::default().key_rotation_interval.get()),
    }
}

/// A duration written `500ms`, `5s`, `5m` or `1h`; `0` is allowed where it means "disabled".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationKnob(pub Duration);

impl DurationKnob {
    pub fn get(self) -> Duration {
        self.0
    }

    pub fn enabled(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl KnobValue for DurationKnob {
    const EXPECTED: &'static str = "a duration such as 500ms, 5s, 5m or 1h (0 where it disables)";
    const SCHEMA: &'static str = r#"{"anyOf": [{"type": "string", "pattern": "^(0|[0-9]+(ms|s|m|h))$"}, {"type": "integer", "enum": [0]}]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        parse_duration(raw).map(DurationKnob)
    }
}

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h`; a bare `0` is zero.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    if raw == "0" {
        return Ok(Duration::ZERO);
    }
    let split = raw
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (ms, s, m or h)".to_string())?;
    let (digits, unit) = raw.split_at(split);
    let n: u64 = digits.parse().map_err(|_| "missing number".to_string())?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| "too large".to_string())
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!("unknown unit '{unit}'")),
    }
}

/// Renders a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl KnobValue for String {
    const EXPECTED: &'static str = "a string";
    fn parse_knob(raw: &str) -> Result<Self, String> {
        Ok(raw.to_string())
    }
}

impl KnobValue for PathBuf {
    const EXPECTED: &'static str = "a filesystem path";
    const SCHEMA: &'static str = r#"{"type": "string", "minLength": 1}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("empty".into());
        }
        Ok(PathBuf::from(raw))
    }
}

impl KnobValue for bool {
    const EXPECTED: &'static str = "true or false";
    const SCHEMA: &'static str =
        r#"{"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]}]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        match raw {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(String::new()),
        }
    }
}

impl KnobValue for usize {
    const EXPECTED: &'static str = "a non-negative integer";
    const SCHEMA: &'static str = INTEGER_SCHEMA;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        raw.parse().map_err(|_| String::new())
    }
}

impl KnobValue for u64 {
    const EXPECTED: &'static str = "a non-negative integer";
    const SCHEMA: &'static str = INTEGER_SCHEMA;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        raw.parse().map_err(|_| String::new())
    }
}

impl KnobValue for u32 {
    const EXPECTED: &'static str = "a non-negative integer below 2^32";
    const SCHEMA: &'static str = r#"{"anyOf": [{"type": "string", "pattern": "^[0-9]{1,10}$"}, {"type": "integer", "minimum": 0, "maximum": 4294967295}]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        raw.parse().map_err(|_| String::new())
    }
}

/// A share in percent, 0 to 90 (what it is a share of leaves at least a tenth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent(pub u8);

impl Percent {
    /// This share of `whole`.
    pub fn of(self, whole: u64) -> u64 {
        whole / 100 * u64::from(self.0) + whole % 100 * u64::from(self.0) / 100
    }
}

impl KnobValue for Percent {
    const EXPECTED: &'static str = "an integer from 0 to 90 (percent)";
    const SCHEMA: &'static str = r#"{"anyOf": [{"type": "string", "pattern": "^[0-9]{1,2}$"}, {"type": "integer", "minimum": 0, "maximum": 90}]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        match raw.parse::<u8>() {
            Ok(p) if p <= 90 => Ok(Percent(p)),
            _ => Err(String::new()),
        }
    }
}

/// An IPv4 network to lease addresses from, `a.b.c.d/p` with p from 8 to 30.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Pool {
    pub network: std::net::Ipv4Addr,
    pub prefix: u8,
}

/// An IPv6 network to lease addresses from, `x::/p` with p from 96 to 126.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Pool {
    pub network: std::net::Ipv6Addr,
    pub prefix: u8,
}

impl Ipv4Pool {
    /// Addresses a client may get: all but the first two (the network, the router) and the last.
    pub fn client_addresses(&self) -> u64 {
        (1u64 << (32 - self.prefix)) - 3
    }

    /// The `n`th address of the network (0 is the network address itself).
    pub fn nth(&self, n: u32) -> std::net::Ipv4Addr {
        (u32::from(self.network) + n).into()
    }

    pub fn contains(&self, ip: std::net::Ipv4Addr) -> bool {
        u32::from(ip) >> (32 - self.prefix) == u32::from(self.network) >> (32 - self.prefix)
    }
}

impl Ipv6Pool {
    /// Addresses a client may get: all but the first two (the network, the router) and the last.
    pub fn client_addresses(&self) -> u64 {
        (1u64 << (128 - self.prefix)) - 3
    }

    /// The `n`th address of the network.
    pub fn nth(&self, n: u32) -> std::net::Ipv6Addr {
        (u128::from(self.network) + u128::from(n)).into()
    }

    pub fn contains(&self, ip: std::net::Ipv6Addr) -> bool {
        u128::from(ip) >> (128 - self.prefix) == u128::from(self.network) >> (128 - self.prefix)
    }
}

fn parse_network<A: std::str::FromStr>(
    raw: &str,
    bits: u8,
    min: u8,
    max: u8,
) -> Result<(A, u8), String> {
    let (ip, prefix) = raw.split_once('/').ok_or("no /prefix")?;
    let ip = ip
        .parse::<A>()
        .map_err(|_| format!("'{ip}' is not an address"))?;
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (min..=max).contains(p) && *p <= bits)
        .ok_or_else(|| format!("the prefix must be from {min} to {max}"))?;
    Ok((ip, prefix))
}

impl KnobValue for Ipv4Pool {
    const EXPECTED: &'static str = "an IPv4 network such as 10.64.0.0/16 (prefix 8 to 30)";
    const SCHEMA: &'static str =
        r#"{"type": "string", "pattern": "^[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,2}$"}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        let (ip, prefix) = parse_network::<std::net::Ipv4Addr>(raw, 32, 8, 30)?;
        let host_bits = u32::MAX >> prefix;
        if u32::from(ip) & host_bits != 0 {
            return Err(format!("{ip} has host bits set for /{prefix}"));
        }
        Ok(Ipv4Pool {
            network: ip,
            prefix,
        })
    }
}

impl KnobValue for Ipv6Pool {
    const EXPECTED: &'static str =
        "an IPv6 network such as fd6e:796d:6970::/112 (prefix 96 to 126)";
    const SCHEMA: &'static str = r#"{"type": "string", "pattern": "^[0-9a-fA-F:]+/[0-9]{2,3}$"}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        let (ip, prefix) = parse_network::<std::net::Ipv6Addr>(raw, 128, 96, 126)?;
        let host_bits = u128::MAX >> prefix;
        if u128::from(ip) & host_bits != 0 {
            return Err(format!("{ip} has host bits set for /{prefix}"));
        }
        Ok(Ipv6Pool {
            network: ip,
            prefix,
        })
    }
}

/// Leading zero bits of a registration stamp, at most [`crate::gateway::stamp::MAX_BITS`]
/// (clients refuse to work for more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StampBits(pub u8);

impl KnobValue for StampBits {
    const EXPECTED: &'static str = "an integer from 0 to 28 (leading zero bits)";
    const SCHEMA: &'static str = r#"{"anyOf": [{"type": "string", "pattern": "^[0-9]{1,2}$"}, {"type": "integer", "minimum": 0, "maximum": 28}]}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        match raw.parse::<u8>() {
            Ok(b) if b <= crate::gateway::stamp::MAX_BITS => Ok(StampBits(b)),
            _ => Err(String::new()),
        }
    }
}

/// Name servers as `ip` or `ip:port` (port 53 by default), comma-separated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsServers(pub Vec<SocketAddr>);

impl KnobValue for DnsServers {
    const EXPECTED: &'static str =
        "comma-separated name servers such as 10.0.0.10 or 127.0.0.1:5353 (empty for the system's)";
    fn parse_knob(raw: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let addr = part
                .parse::<SocketAddr>()
                .or_else(|_| {
                    part.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| format!("'{part}' is not an IP address"))?;
            out.push(addr);
        }
        Ok(DnsServers(out))
    }
}

impl KnobValue for SocketAddr {
    const EXPECTED: &'static str = "an IP:port socket address such as 0.0.0.0:1789";
    const SCHEMA: &'static str =
        r#"{"type": "string", "pattern": "^(\\[[0-9a-fA-F:.]+\\]|[0-9.]+):[0-9]{1,5}$"}"#;
    fn parse_knob(raw: &str) -> Result<Self, String> {
        raw.parse().map_err(|_| String::new())
    }
}

/// Markdown table of every knob, as README.md carries it.
pub fn knobs_markdown() -> String {
    let mut out = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
    for k in knobs() {
        let default = if k.default.is_empty() {
            "(empty)".to_string()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!("| `{}` | {} | {} |\n", k.env, default, k.doc));
    }
    out
}

/// Knobs a deployment sets from its own values (the pod's name, its volume layout, its
/// ports); the Helm chart derives them and offers every other knob under `config`.
pub const DEPLOYMENT_OWNED: &[&str] = &[
    "NYM_NODE_ID",
    "NYM_NODE_MODE",
    "NYM_NODE_KEYS_DIR",
    "NYM_NODE_DATA_DIR",
    "NYM_NODE_MIXNET_BIND",
    "NYM_NODE_HTTP_BIND",
    "NYM_NODE_CLIENT_BIND",
];

/// Knobs that hold secrets: a deployment passes them from a Secret (the Helm chart through
/// `secretKeyRef`), never as plain configuration.
pub const SECRET_KNOBS: &[&str] = &["NYM_NODE_METRICS_TOKEN"];

/// The knobs a deployment offers as plain settings: neither its own nor secrets.
fn configurable_knobs() -> impl Iterator<Item = Knob> {
    knobs().into_iter().filter(|k| {
        !DEPLOYMENT_OWNED.contains(&k.env.as_str()) && !SECRET_KNOBS.contains(&k.env.as_str())
    })
}

/// The `config:` block of the Helm chart's values.yaml: every knob a deployment does not
/// own and that holds no secret, with its doc comment and its default, indented under
/// `config:`.
pub fn knobs_helm_values() -> String {
    let mut out = String::new();
    for k in configurable_knobs() {
        let mut line = String::from("  #");
        for word in k.doc.split_whitespace() {
            if line.len() + word.len() > 96 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("  #");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
        out.push_str(&format!("  {}: {:?}\n", k.env, k.default));
    }
    out
}

/// The JSON Schema of the Helm chart's `config:` block: each knob's accepted form (durations,
/// integers, enums as patterns), so a bad value is refused before anything renders.
pub fn knobs_helm_schema() -> String {
    let properties: serde_json::Map<String, serde_json::Value> = configurable_knobs()
        .map(|k| {
            let mut schema: serde_json::Value =
                serde_json::from_str(k.schema).unwrap_or_else(|_| serde_json::json!({}));
            schema["description"] =
                serde_json::Value::String(format!("{} Expected: {}.", k.doc, k.expected));
            (k.env, schema)
        })
        .collect();
    let schema = serde_json::json!({
        "description": "NYM_NODE_* settings (nym-node config-docs --format helm-schema); the node itself parses each value. Secrets (NYM_NODE_METRICS_TOKEN) come from a Secret, not from here.",
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
    });
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_default_parses_and_names_are_unique() {
        let config = Config::default();
        assert_eq!(config.mode, Mode::Mixnode);
        assert_eq!(
            config.connection_write_timeout.0,
            Duration::from_millis(500)
        );
        assert_eq!(config.connection_idle_timeout.0, Duration::from_secs(300));
        let names: Vec<String> = knobs().into_iter().map(|k| k.env).collect();
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(names.len(), dedup.len());
        assert!(names.iter().all(|n| n.starts_with("NYM_NODE_")));
        assert!(knobs().iter().all(|k| !k.doc.is_empty()));
        for k in knobs() {
            let schema: serde_json::Value = serde_json::from_str(k.schema)
                .unwrap_or_else(|e| panic!("{}: schema {}: {e}", k.env, k.schema));
            assert!(schema.is_object(), "{}", k.env);
        }
        // Secrets never appear among the plain settings.
        let schema: serde_json::Value = serde_json::from_str(&knobs_helm_schema()).unwrap();
        assert!(schema["properties"].get("NYM_NODE_METRICS_TOKEN").is_none());
        assert!(!knobs_helm_values().contains("NYM_NODE_METRICS_TOKEN:"));
    }

    #[test]
    fn minimal_environment_runs_with_defaults() {
        let (config, unknown) = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "/tmp/t.json"),
            ("NYM_NODE_ID", "mix1"),
        ]))
        .expect("minimal config");
        assert!(unknown.is_empty());
        assert_eq!(config.id, "mix1");
        assert_eq!(config.mixnet_bind, "0.0.0.0:1789".parse().unwrap());
        assert_eq!(config.max_packet_delay.0, Duration::from_secs(10));
    }

    #[test]
    fn bad_value_names_the_variable_and_the_form() {
        let err = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "t.json"),
            ("NYM_NODE_CONNECTION_WRITE_TIMEOUT", "fast"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("NYM_NODE_CONNECTION_WRITE_TIMEOUT: expected a duration"),
            "{err}"
        );
        assert!(err.contains("'fast'"), "{err}");

        let err = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "t"),
            ("NYM_NODE_MODE", "router"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("NYM_NODE_MODE: expected one of mixnode"),
            "{err}"
        );

        let err = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "t"),
            ("NYM_NODE_SPHINX_QUEUE", "-3"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("NYM_NODE_SPHINX_QUEUE: expected a non-negative integer"),
            "{err}"
        );
    }

    #[test]
    fn missing_topology_is_a_clear_error() {
        let err = Config::from_vars(vars(&[])).unwrap_err().to_string();
        assert!(err.starts_with("NYM_NODE_TOPOLOGY: required"), "{err}");
    }

    #[test]
    fn unknown_variables_are_reported_not_fatal() {
        let (_, unknown) = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "t"),
            ("NYM_NODE_MIXNET_BINDD", "x"),
            ("OTHER", "y"),
        ]))
        .unwrap();
        assert_eq!(unknown, vec!["NYM_NODE_MIXNET_BINDD".to_string()]);
    }

    #[test]
    fn zero_disables_idle_and_write_timeouts() {
        let (config, _) = Config::from_vars(vars(&[
            ("NYM_NODE_TOPOLOGY", "t"),
            ("NYM_NODE_CONNECTION_IDLE_TIMEOUT", "0"),
            ("NYM_NODE_CONNECTION_WRITE_TIMEOUT", "0"),
        ]))
        .unwrap();
        assert_eq!(config.idle_timeout(), None);
        assert_eq!(config.write_timeout(), None);
    }

    #[test]
    fn dns_servers_parse_with_and_without_port() {
        let d = DnsServers::parse_knob("10.0.0.10, 127.0.0.1:5353").unwrap();
        assert_eq!(
            d.0,
            vec![
                "10.0.0.10:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        assert!(DnsServers::parse_knob("").unwrap().0.is_empty());
        assert!(DnsServers::parse_knob("dns.local").is_err());
    }

    #[test]
    fn durations_round_trip() {
        for raw in ["500ms", "5s", "5m", "1h", "0", "1500ms"] {
            assert_eq!(format_duration(parse_duration(raw).unwrap()), raw);
        }
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
