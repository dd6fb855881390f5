//! Gateway duties (entry and exit gateways): the client API, final-hop delivery into a
//! durable mailbox, and acknowledgements back to senders.

pub mod client_api;
pub mod delivery;
pub mod mailbox;
pub mod protocol;
pub mod rate_limit;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use mailbox::Mailbox;

/// How often expired mailbox entries are deleted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes mailbox entries older than `retention` every minute until the node stops, and
/// keeps the stored-payloads gauge exact.
pub async fn sweep_mailbox(
    mailbox: Arc<Mailbox>,
    retention: Duration,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    loop {
        let m = mailbox.clone();
        let result = tokio::task::spawn_blocking(move || {
            let expired = m.expire(retention)?;
            Ok::<_, mailbox::MailboxError>((expired, m.total()?))
        })
        .await;
        match result {
            Ok(Ok((expired, total))) => {
                if expired > 0 {
                    tracing::info!(expired, "deleted mailbox entries past their retention");
                }
                metrics.mailbox_payloads.set(total as i64);
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
