//! Gateway duties (entry and exit gateways): the client API, final-hop delivery into a
//! durable mailbox, and acknowledgements back to senders.

pub mod channel;
pub mod client_api;
pub mod client_listener;
pub mod delivery;
pub mod downstream;
pub mod mailbox;
pub mod protocol;
pub mod rate_limit;
pub mod sessions;
pub mod stamp;
pub mod surb_ack;

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use mailbox::Mailbox;

/// How often expired mailbox entries and lapsed registrations are deleted.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// What the sweep deletes.
#[derive(Debug, Clone, Copy)]
pub struct Sweep {
    /// Payloads stored longer ago than this.
    pub retention: Duration,
    /// Registrations whose client was not seen for this long.
    pub registration_expiry: Duration,
}

/// Deletes mailbox entries past their retention and lapsed registrations every minute
/// until the node stops.
pub async fn sweep_mailbox(
    mailbox: Arc<Mailbox>,
    sweep: Sweep,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) {
    loop {
        let m = mailbox.clone();
        let result = tokio::task::spawn_blocking(move || {
            let expired = m.expire(sweep.retention)?;
            let lapsed = m.expire_registrations(sweep.registration_expiry)?;
            let released = m.release_stale_held()?;
            if released > 0 {
                tracing::debug!(
                    released,
                    "dropped held payloads no client acknowledged in time"
                );
            }
            Ok::<_, mailbox::MailboxError>((expired, lapsed))
        })
        .await;
        match result {
            Ok(Ok((expired, lapsed))) => {
                if expired > 0 {
                    tracing::info!(expired, "deleted mailbox entries past their retention");
                }
                if lapsed > 0 {
                    metrics.registrations_n("expired", lapsed as u64);
                    tracing::info!(lapsed, "ended registrations of clients long absent");
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
