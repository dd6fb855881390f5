//! The client's registration stamps, one per gateway (see [`crate::gateway::stamp`]): made
//! the first time a gateway asks for one, then kept (in `stamps.json` of a named client's
//! directory, else for the life of the process) and sent with every session, so the work is
//! paid once per gateway.

use std::collections::BTreeMap;
use std::path::PathBuf;

use parking_lot::Mutex;

use crate::gateway::stamp;
use crate::keys::{KeyBytes, NodeId};

#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error(
        "the gateway asks for a registration stamp of {0} bits; more than {max} is refused",
        max = stamp::MAX_BITS
    )]
    TooDear(u8),
    #[error("making the stamp: {0}")]
    Task(String),
    #[error(
        "the gateway asked again for a stamp of {0} bits, which the one it was sent meets: a broken or hostile gateway"
    )]
    Refused(u8),
}

/// Stamps made so far, by gateway.
pub struct Stamps {
    path: Option<PathBuf>,
    known: Mutex<BTreeMap<NodeId, u64>>,
}

impl Stamps {
    /// The stamps kept at `path` (none yet if it does not exist or cannot be read: a stamp
    /// lost is only made again).
    pub fn open(path: Option<PathBuf>) -> Self {
        let known = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, u64>>(&bytes).ok())
            .map(|m| {
                m.into_iter()
                    .filter_map(|(gateway, nonce)| Some((gateway.parse().ok()?, nonce)))
                    .collect()
            })
            .unwrap_or_default();
        Stamps {
            path,
            known: Mutex::new(known),
        }
    }

    /// The stamp for `gateway`, or 0 (which a gateway asking for a stamp refuses) if none
    /// was made.
    pub fn get(&self, gateway: &NodeId) -> u64 {
        self.known.lock().get(gateway).copied().unwrap_or(0)
    }

    /// Makes `client`'s stamp of `bits` for `gateway` (off the async runtime) and keeps it.
    /// A gateway that asks for bits the kept stamp already meets gets no new work: it
    /// would make the client hash without end.
    pub async fn make(
        &self,
        gateway: NodeId,
        client: KeyBytes,
        bits: u8,
    ) -> Result<u64, StampError> {
        if bits > stamp::MAX_BITS {
            return Err(StampError::TooDear(bits));
        }
        let kept = self.known.lock().get(&gateway).copied();
        if kept.is_some_and(|nonce| stamp::verify(&gateway, &client, nonce, bits)) {
            return Err(StampError::Refused(bits));
        }
        let start = rand::random::<u64>();
        let started = std::time::Instant::now();
        let nonce =
            tokio::task::spawn_blocking(move || stamp::make(&gateway, &client, bits, start))
                .await
                .map_err(|e| StampError::Task(e.to_string()))?;
        tracing::info!(
            bits,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "made a registration stamp for the gateway"
        );
        self.known.lock().insert(gateway, nonce);
        self.save();
        Ok(nonce)
    }

    fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let map: BTreeMap<String, u64> = self
            .known
            .lock()
            .iter()
            .map(|(g, n)| (g.to_string(), *n))
            .collect();
        let written = serde_json::to_vec_pretty(&map)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(path, bytes));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "could not keep the registration stamp; it will be made again next start");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stamp_is_made_once_and_kept_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stamps.json");
        let (gateway, client) = (KeyBytes([4; 32]), KeyBytes([5; 32]));
        let stamps = Stamps::open(Some(path.clone()));
        assert_eq!(stamps.get(&gateway), 0);
        let nonce = stamps.make(gateway, client, 10).await.unwrap();
        assert!(stamp::verify(&gateway, &client, nonce, 10));
        assert_eq!(Stamps::open(Some(path)).get(&gateway), nonce);
        assert!(matches!(
            stamps.make(gateway, client, stamp::MAX_BITS + 1).await,
            Err(StampError::TooDear(_))
        ));
        // A gateway that refuses the stamp it asked for gets no second one.
        assert!(matches!(
            stamps.make(gateway, client, 10).await,
            Err(StampError::Refused(10))
        ));
    }
}
