//! Asking pods who they are: `GET /api/v1/description` on every ready pod, concurrently and
//! outside the namespace lock, with each answer reused for a short while (every `NymNode`
//! of a namespace syncs the whole namespace, so a busy rollout would otherwise ask each pod
//! once per `NymNode`). One failed fetch is tolerated before a node is treated as unknown:
//! a dropped request must not take a working node out of service.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use nym_node::http::description::SignedDescription;
use parking_lot::Mutex;

/// Fetches a pod's signed description.
pub trait Describer: Send + Sync {
    fn describe(
        &self,
        pod_ip: String,
        port: i32,
    ) -> BoxFuture<'static, Result<SignedDescription, String>>;
}

/// The real one: plain HTTP to the pod's IP, with a short deadline.
pub struct HttpDescriber {
    client: reqwest::Client,
}

impl HttpDescriber {
    pub fn new(timeout: Duration) -> Self {
        HttpDescriber {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Describer for HttpDescriber {
    fn describe(
        &self,
        pod_ip: String,
        port: i32,
    ) -> BoxFuture<'static, Result<SignedDescription, String>> {
        let client = self.client.clone();
        Box::pin(async move {
            let host = if pod_ip.contains(':') {
                format!("[{pod_ip}]")
            } else {
                pod_ip
            };
            nym_node::directory::fetch_description(&client, &format!("{host}:{port}")).await
        })
    }
}

/// A node to ask: its process (the cache key: a replacement or a restart is another node),
/// name, IP and HTTP port.
#[derive(Debug, Clone)]
pub struct Target {
    pub uid: String,
    pub name: String,
    pub ip: String,
    pub port: i32,
}

#[derive(Debug, Clone)]
struct Entry {
    fetched_at: i64,
    last_ok: Option<SignedDescription>,
    /// Consecutive failed fetches since the last success.
    failures: u32,
}

/// Descriptions by node process.
pub struct Descriptions {
    entries: Mutex<HashMap<String, Entry>>,
    /// How long an answer (or a failure) is reused.
    reuse: Duration,
    /// Fetches in flight at once.
    concurrency: usize,
}

impl Descriptions {
    pub fn new(reuse: Duration) -> Self {
        Descriptions {
            entries: Mutex::default(),
            reuse,
            concurrency: 16,
        }
    }

    /// Fetches, concurrently, every target whose answer is older than the reuse interval.
    /// Returns how many fetches failed.
    pub async fn refresh(&self, describer: &dyn Describer, targets: &[Target], now: i64) -> usize {
        let stale: Vec<Target> = {
            let entries = self.entries.lock();
            targets
                .iter()
                .filter(|t| {
                    entries.get(&t.uid).is_none_or(|e| {
                        now.saturating_sub(e.fetched_at) >= self.reuse.as_secs() as i64
                    })
                })
                .cloned()
                .collect()
        };
        let results: Vec<(Target, Result<SignedDescription, String>)> =
            futures::stream::iter(stale)
                .map(|t| {
                    let fetch = describer.describe(t.ip.clone(), t.port);
                    async move { (t, fetch.await) }
                })
                .buffer_unordered(self.concurrency)
                .collect()
                .await;
        let mut failed = 0;
        let mut entries = self.entries.lock();
        for (t, result) in results {
            let entry = entries.entry(t.uid.clone()).or_insert(Entry {
                fetched_at: now,
                last_ok: None,
                failures: 0,
            });
            entry.fetched_at = now;
            match result {
                Ok(d) => {
                    entry.last_ok = Some(d);
                    entry.failures = 0;
                }
                Err(e) => {
                    failed += 1;
                    entry.failures += 1;
                    tracing::info!(pod = %t.name, error = %e, failures = entry.failures, "description not available");
                }
            }
        }
        failed
    }

    /// The description to use for each target: the latest, or after a single failure the
    /// one before it; nothing after two failures in a row (or if none was ever fetched).
    pub fn current(&self, targets: &[Target]) -> BTreeMap<String, SignedDescription> {
        let entries = self.entries.lock();
        targets
            .iter()
            .filter_map(|t| {
                let e = entries.get(&t.uid)?;
                let d = e.last_ok.clone().filter(|_| e.failures <= 1)?;
                Some((t.uid.clone(), d))
            })
            .collect()
    }

    /// Forgets nodes that no longer run.
    pub fn retain(&self, live: &[String]) {
        self.entries.lock().retain(|uid, _| live.contains(uid));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use nym_node::http::description::Description;
    use nym_node::keys::NodeKeys;

    /// Answers from a script: `true` succeeds, `false` fails; counts the fetches.
    struct Scripted {
        answers: Mutex<Vec<bool>>,
        fetches: Arc<AtomicUsize>,
        keys: NodeKeys,
    }

    impl Describer for Scripted {
        fn describe(
            &self,
            _: String,
            _: i32,
        ) -> BoxFuture<'static, Result<SignedDescription, String>> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            let ok = self.answers.lock().remove(0);
            let d = Description::new(
                "mix-0",
                nym_node::config::Mode::Mixnode,
                None,
                self.keys.public(),
                "0.0.0.0:1789".into(),
                None,
                "0.0.0.0:8080".into(),
            )
            .sign(&self.keys.identity);
            Box::pin(async move { if ok { Ok(d) } else { Err("timed out".into()) } })
        }
    }

    #[tokio::test]
    async fn one_failure_is_tolerated_two_are_not_and_answers_are_reused() {
        let fetches = Arc::new(AtomicUsize::new(0));
        let describer = Scripted {
            answers: Mutex::new(vec![true, false, false, true]),
            fetches: fetches.clone(),
            keys: NodeKeys::generate(Duration::from_secs(3600)).unwrap(),
        };
        let cache = Descriptions::new(Duration::from_secs(2));
        let targets = [Target {
            uid: "u".into(),
            name: "mix-0".into(),
            ip: "10.0.0.1".into(),
            port: 8080,
        }];
        assert_eq!(cache.refresh(&describer, &targets, 0).await, 0);
        // Reused within the interval: no second fetch.
        cache.refresh(&describer, &targets, 1).await;
        assert_eq!(fetches.load(Ordering::Relaxed), 1);
        assert!(cache.current(&targets).contains_key("u"));
        assert_eq!(cache.refresh(&describer, &targets, 2).await, 1);
        assert!(
            cache.current(&targets).contains_key("u"),
            "one failure tolerated"
        );
        cache.refresh(&describer, &targets, 4).await;
        assert!(cache.current(&targets).is_empty(), "two in a row are not");
        cache.refresh(&describer, &targets, 6).await;
        assert!(cache.current(&targets).contains_key("u"));
        cache.retain(&[]);
        assert!(cache.current(&targets).is_empty());
    }
}
