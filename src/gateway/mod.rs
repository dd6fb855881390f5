//! Gateway duties (entry and exit gateways): the client API, final-hop delivery into a
//! durable mailbox, and acknowledgements back to senders.

pub mod channel;
pub mod client_api;
pub mod delivery;
pub mod exit_policy;
pub mod mailbox;
pub mod network_requester;
pub mod own_addresses;
pub mod protocol;
pub mod rate_limit;
pub mod sessions;
pub mod stream_admission;

use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Shutdown;
use mailbox::Mailbox;

/// How often expired mailbox entries are deleted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes mailbox entries older than `retention` every minute until the node stops.
pub async fn sweep_mailbox(mailbox: Arc<Mailbox>, retention: Duration, shutdown: Shutdown) {
    loop {
        let m = mailbox.clone();
        let result = tokio::task::spawn_blocking(move || m.expire(retention)).await;
        match result {
            Ok(Ok(expired)) => {
                if expired > 0 {
                    tracing::info!(expired, "deleted mailbox entries past their retention");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "mailbox sweep failed"),
            Err(e) => tracing::error!(error = %e, "mailbox sweep task failed"),
        }
        tokio::select! {
            _ = shutdown.stopping() => return,
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
    }
}
