//! Peer host names → addresses, with the caching rules a moving cluster needs.
//!
//! - Positive answers are kept at most `NYM_NODE_DNS_MAX_TTL` (default 60 s) whatever the
//!   record says, so a pod that moved is found again within a minute even when its record
//!   carries a TTL of an hour; negative answers (no such name, no records) are kept
//!   `NYM_NODE_DNS_NEGATIVE_TTL` (default 5 s) so a missing peer is not queried per packet.
//! - Every lookup returns the addresses in a fresh random order and [`Resolver::connect`]
//!   walks them in that order, so retries spread over every address of a name.
//! - A hard connection failure (refused, unreachable, timed out) on every address of a
//!   name evicts its entry, so the next attempt resolves again instead of waiting out the cap.
//!
//! The cache is ours (hickory's own is disabled) and runs on tokio's clock, so its expiry is
//! testable with paused time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::topology::PeerAddress;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error("{host}: no such name or no address records")]
    NotFound { host: String },
    #[error("{host}: lookup timed out")]
    Timeout { host: String },
    #[error("{host}: lookup failed: {message}")]
    Failed { host: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("connecting to {peer}: {message}")]
    Connect { peer: String, message: String },
}

/// Resolver settings (from the `NYM_NODE_DNS_*` knobs).
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Name servers (`ip` or `ip:port`); empty uses the system configuration.
    pub servers: Vec<SocketAddr>,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    pub timeout: Duration,
    /// Answers the cache holds at most; when full, expired ones are swept, then the one
    /// expiring soonest makes room (unique names cannot grow it).
    pub max_entries: usize,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            max_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            max_entries: 10_000,
        }
    }
}

struct Entry {
    answer: Result<Vec<IpAddr>, DnsError>,
    expires: Instant,
}

pub struct Resolver {
    inner: TokioResolver,
    settings: DnsSettings,
    cache: Mutex<HashMap<String, Entry>>,
    metrics: Arc<Metrics>,
}

impl Resolver {
    /// Builds a resolver counting into `metrics`.
    pub fn new(settings: DnsSettings, metrics: Arc<Metrics>) -> Result<Arc<Self>, DnsError> {
        let fail = |e: &dyn std::fmt::Display| DnsError::Failed {
            host: "(resolver)".into(),
            message: e.to_string(),
        };
        let mut builder = if settings.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| fail(&e))?
        } else {
            let servers = settings
                .servers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.cache_size = 0;
        opts.timeout = settings.timeout;
        opts.attempts = 1;
        let inner = builder.build().map_err(|e| fail(&e))?;
        Ok(Arc::new(Resolver {
            inner,
            settings,
            cache: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    /// The addresses of `host`, in a fresh random order. IP literals need no lookup.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let cached = {
            let cache = self.cache.lock();
            cache
                .get(host)
                .filter(|e| e.expires > Instant::now())
                .map(|e| e.answer.clone())
        };
        let answer = match cached {
            Some(answer) => {
                self.metrics.dns_cache_hits.inc();
                answer
            }
            None => self.query(host).await,
        };
        let mut addrs = answer?;
        addrs.shuffle(&mut rand::rng());
        Ok(addrs)
    }

    async fn query(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        self.metrics.dns_queries.inc();
        let lookup = tokio::time::timeout(self.settings.timeout, self.inner.lookup_ip(host)).await;
        let (answer, ttl) = match lookup {
            Err(_) => (
                Err(DnsError::Timeout {
                    host: host.to_string(),
                }),
                None,
            ),
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => (
                Err(DnsError::NotFound {
                    host: host.to_string(),
                }),
                Some(self.settings.negative_ttl),
            ),
            Ok(Err(e)) => (
                Err(DnsError::Failed {
                    host: host.to_string(),
                    message: e.to_string(),
                }),
                None,
            ),
            Ok(Ok(ips)) => {
                let record_ttl = ips
                    .valid_until()
                    .saturating_duration_since(std::time::Instant::now());
                let addrs: Vec<IpAddr> = ips.iter().collect();
                if addrs.is_empty() {
                    (
                        Err(DnsError::NotFound {
                            host: host.to_string(),
                        }),
                        Some(self.settings.negative_ttl),
                    )
                } else {
                    (Ok(addrs), Some(record_ttl.min(self.settings.max_ttl)))
                }
            }
        };
        if let Err(e) = &answer {
            match e {
                DnsError::NotFound { .. } => self.metrics.dns_not_found.inc(),
                DnsError::Timeout { .. } => self.metrics.dns_timeouts.inc(),
                DnsError::Failed { .. } => self.metrics.dns_errors.inc(),
            }
        }
        // Timeouts and server errors are not cached: the next attempt asks again.
        if let Some(ttl) = ttl.filter(|t| !t.is_zero()) {
            let mut cache = self.cache.lock();
            if cache.len() >= self.settings.max_entries && !cache.contains_key(host) {
                self.make_room(&mut cache);
            }
            cache.insert(
                host.to_string(),
                Entry {
                    answer: answer.clone(),
                    expires: Instant::now() + ttl,
                },
            );
        }
        answer
    }

    /// Sweeps expired answers; if none had expired, drops the one expiring soonest.
    fn make_room(&self, cache: &mut HashMap<String, Entry>) {
        let now = Instant::now();
        let before = cache.len();
        cache.retain(|_, e| e.expires > now);
        if cache.len() < before {
            return;
        }
        let soonest = cache
            .iter()
            .min_by_key(|(_, e)| e.expires)
            .map(|(host, _)| host.clone());
        if let Some(host) = soonest {
            cache.remove(&host);
            self.metrics.dns_evictions.inc();
        }
    }

    /// Answers cached now (expired ones included until swept).
    pub fn cached(&self) -> usize {
        self.cache.lock().len()
    }

    /// Forgets what is cached for `host`; the next lookup asks a name server.
    pub fn invalidate(&self, host: &str) {
        if self.cache.lock().remove(host).is_some() {
            self.metrics.dns_evictions.inc();
        }
    }

    /// Connects to `peer`, trying its addresses in random order until one accepts within
    /// `timeout`. If none does, the name's cache entry is evicted.
    pub async fn connect(
        &self,
        peer: &PeerAddress,
        timeout: Duration,
    ) -> Result<TcpStream, ConnectError> {
        let addrs = self.resolve(&peer.host).await?;
        let mut last = String::from("no addresses");
        for ip in addrs {
            let addr = SocketAddr::new(ip, peer.port);
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        self.invalidate(&peer.host);
        Err(ConnectError::Connect {
            peer: peer.to_string(),
            message: last,
        })
    }
}
