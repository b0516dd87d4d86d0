//! The sweeper: one leader (under a lease) re-drives sagas that stopped moving and purges old
//! finished ones, so saga state stays bounded.

use std::time::Duration;

use redpacket_common::lease::LeaseManager;
use redpacket_common::messages::Envelope;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::store::SagaStore;

/// A running saga not updated for this long is re-driven.
pub const STALL_AFTER: Duration = Duration::from_secs(60);
/// Finished sagas are kept this long.
pub const KEEP_FINISHED: Duration = Duration::from_secs(7 * 24 * 3600);
/// Sagas re-driven per pass at most.
const PER_PASS: u64 = 500;

/// One pass: re-publishes stalled sagas' messages; returns how many.
pub async fn sweep_once(
    store: &SagaStore,
    broker: &dyn Bus,
    stall_after: Duration,
) -> anyhow::Result<usize> {
    let now = store.now_ms();
    let before = now - i64::try_from(stall_after.as_millis()).unwrap_or(i64::MAX);
    let stalled = store.stalled(before, PER_PASS).await?;
    for saga in &stalled {
        match Envelope::from_bytes(saga.payload.as_bytes()) {
            Ok(envelope) => {
                let envelope = envelope.restarted();
                broker
                    .publish(
                        "work",
                        &format!("sweep:{}:{now}", saga.id),
                        &envelope.to_bytes(),
                    )
                    .await?;
                store
                    .note_error(&saga.id, "re-driven by the sweeper")
                    .await?;
            }
            Err(err) => {
                tracing::error!(saga = saga.id, error = %err, "stalled saga has an unreadable message")
            }
        }
    }
    let purged = store
        .purge_finished(now - i64::try_from(KEEP_FINISHED.as_millis()).unwrap_or(i64::MAX))
        .await?;
    if !stalled.is_empty() || purged > 0 {
        tracing::info!(redriven = stalled.len(), purged, "sweep");
    }
    Ok(stalled.len())
}

/// Sweeps every `period` while holding the sweeper lease.
pub async fn run(
    store: SagaStore,
    broker: std::sync::Arc<dyn Bus>,
    leases: LeaseManager,
    lease_key: String,
    period: Duration,
    stall_after: Duration,
    shutdown: CancellationToken,
) {
    let ttl = Duration::from_secs(10);
    while !shutdown.is_cancelled() {
        let Ok(Some(lease)) = leases.try_acquire(&lease_key, ttl).await else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(ttl / 2) => continue,
            }
        };
        let lost = lease.lost();
        while !shutdown.is_cancelled() && !lost.is_cancelled() {
            if let Err(err) = sweep_once(&store, &*broker, stall_after).await {
                tracing::warn!(error = %err, "sweep failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = lost.cancelled() => {}
                () = tokio::time::sleep(period) => {}
            }
        }
        let _ = lease.release().await;
    }
}
