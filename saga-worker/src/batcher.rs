//! Credits from many sagas gathered into the wallet's batch endpoint.
//!
//! A saga hands its credit to the batcher and waits for that credit's own result. The batcher
//! sends a batch when it holds `max_batch` credits or when the first credit has waited
//! `linger`, whichever comes first, so a quiet saga waits at most `linger` and a busy hot
//! campaign is credited in batches of up to 1,000 transfers per database transaction.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::clients::{StepError, Transfer, WalletClient};

/// The wallet's bound on a batch.
pub const MAX_BATCH: usize = 1000;
/// Credits waiting for a batch at most; senders wait when it is full.
const QUEUE_BOUND: usize = 10_000;

type Job = (Transfer, oneshot::Sender<Result<(), StepError>>);

/// Hands credits to the batching task.
#[derive(Debug, Clone)]
pub struct CreditBatcher {
    jobs: mpsc::Sender<Job>,
}

impl CreditBatcher {
    /// Starts the batching task. `max_batch` 1 sends every credit on its own (one transfer per
    /// request), the baseline the batching is measured against.
    pub fn start(wallet: WalletClient, max_batch: usize, linger: Duration) -> Self {
        let (jobs, receiver) = mpsc::channel(QUEUE_BOUND);
        tokio::spawn(run(wallet, receiver, max_batch.clamp(1, MAX_BATCH), linger));
        CreditBatcher { jobs }
    }

    /// Applies one credit, batched with others; its own result.
    pub async fn credit(&self, transfer: Transfer) -> Result<(), StepError> {
        let (answer, result) = oneshot::channel();
        self.jobs
            .send((transfer, answer))
            .await
            .map_err(|_| StepError::transient("the credit batcher stopped"))?;
        result
            .await
            .unwrap_or_else(|_| Err(StepError::transient("the credit batcher dropped a credit")))
    }
}

/// Wallet batch calls in flight at once. Credits of a hot campaign all lock its one escrow
/// row, so more concurrent batches would only queue on that lock; instead, while batches are in
/// flight, the next one keeps gathering, and batches grow with the load (group commit).
const MAX_IN_FLIGHT: usize = 2;

async fn run(
    wallet: WalletClient,
    mut receiver: mpsc::Receiver<Job>,
    max_batch: usize,
    linger: Duration,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(job)) => batch.push(job),
                _ => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Whatever arrived while waiting for a free slot rides along.
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let wallet = wallet.clone();
        tokio::spawn(async move {
            let transfers: Vec<Transfer> = batch.iter().map(|(t, _)| t.clone()).collect();
            let results = if transfers.len() == 1 {
                vec![wallet.transfer(&transfers[0], "").await.map(|_| ())]
            } else {
                match wallet.transfer_batch(&transfers).await {
                    Ok(results) => results,
                    Err(err) => vec![Err(err); transfers.len()],
                }
            };
            drop(slot);
            for ((_, answer), result) in batch.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        });
    }
}
