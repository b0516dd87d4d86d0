//! Work items from many sagas gathered into batches.
//!
//! A caller hands its item to a [`Batcher`] and waits for that item's own answer. The batcher
//! sends a batch when it holds `max_batch` items or when the first item has waited `linger`,
//! whichever comes first, so a quiet saga waits at most `linger` and a busy hot campaign is
//! served in batches of up to [`MAX_BATCH`] items. At most `in_flight` batches run at once;
//! while they do, the next batch keeps gathering, so batches grow with the load (group commit).
//!
//! Two batchers serve the sagas: whole grab sagas (see `Engine::handle_grabs`) and, for the
//! sagas driven one by one, their credits through the wallet's batch endpoint.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::clients::{StepError, Transfer, WalletApi};

/// The most items in one batch: the wallet's and the campaign service's bound on a batch call.
pub const MAX_BATCH: usize = 1000;
/// Items waiting for a batch at most; callers wait when it is full.
const QUEUE_BOUND: usize = 10_000;

type Job<I, O> = (I, oneshot::Sender<O>);

/// Hands items to a batching task; each caller gets its own item's answer.
#[derive(Debug)]
pub struct Batcher<I, O> {
    jobs: mpsc::Sender<Job<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            jobs: self.jobs.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the batching task. `apply` takes a batch and answers one output per item, in
    /// order; an item it leaves unanswered gets `None` from [`Batcher::submit`].
    pub fn start<F, Fut>(max_batch: usize, linger: Duration, in_flight: usize, apply: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::channel(QUEUE_BOUND);
        tokio::spawn(run(
            receiver,
            max_batch.clamp(1, MAX_BATCH),
            linger,
            in_flight.max(1),
            Arc::new(apply),
        ));
        Batcher { jobs }
    }

    /// Hands one item over and waits for its answer; `None` when the batcher stopped or the
    /// batch gave no answer for it.
    pub async fn submit(&self, item: I) -> Option<O> {
        let (answer, result) = oneshot::channel();
        self.jobs.send((item, answer)).await.ok()?;
        result.await.ok()
    }
}

async fn run<I, O, F, Fut>(
    mut receiver: mpsc::Receiver<Job<I, O>>,
    max_batch: usize,
    linger: Duration,
    in_flight: usize,
    apply: Arc<F>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<O>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(in_flight));
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
        let apply = apply.clone();
        tokio::spawn(async move {
            let (items, answers): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
            let outputs = apply(items).await;
            drop(slot);
            for (answer, output) in answers.into_iter().zip(outputs) {
                let _ = answer.send(output);
            }
        });
    }
}

/// Wallet batch calls in flight at once. Credits of a hot campaign all lock its one escrow
/// row, so more concurrent batches would only queue on that lock.
const CREDITS_IN_FLIGHT: usize = 2;

/// Credits from sagas driven one by one, gathered into the wallet's batch endpoint.
#[derive(Debug, Clone)]
pub struct CreditBatcher {
    route: CreditRoute,
}

#[derive(Debug, Clone)]
enum CreditRoute {
    Batched(Batcher<Transfer, Result<(), StepError>>),
    /// Each credit applied by its caller's own task, one transfer per call: no batching task
    /// and no linger timer, so a caller's calls are all its own (a deterministic simulation
    /// schedules callers one call at a time).
    Inline(Arc<dyn WalletApi>),
}

impl CreditBatcher {
    /// Starts the credit batcher. `max_batch` 1 sends every credit on its own (one transfer per
    /// request), the baseline the batching is measured against.
    pub fn start(wallet: Arc<dyn WalletApi>, max_batch: usize, linger: Duration) -> Self {
        let batcher = Batcher::start(max_batch, linger, CREDITS_IN_FLIGHT, move |transfers| {
            let wallet = wallet.clone();
            async move { credit_all(&*wallet, &transfers).await }
        });
        CreditBatcher {
            route: CreditRoute::Batched(batcher),
        }
    }

    /// Credits applied one by one in the caller's task, without a batching task.
    pub fn inline(wallet: Arc<dyn WalletApi>) -> Self {
        CreditBatcher {
            route: CreditRoute::Inline(wallet),
        }
    }

    /// Applies one credit, batched with others; its own result.
    pub async fn credit(&self, transfer: Transfer) -> Result<(), StepError> {
        match &self.route {
            CreditRoute::Batched(batcher) => batcher.submit(transfer).await.unwrap_or_else(|| {
                Err(StepError::transient("the credit batcher dropped a credit"))
            }),
            CreditRoute::Inline(wallet) => wallet.transfer(&transfer, "").await.map(|_| ()),
        }
    }
}

/// Applies transfers, one request for the lot: each transfer's own result, in order.
pub async fn credit_all(
    wallet: &dyn WalletApi,
    transfers: &[Transfer],
) -> Vec<Result<(), StepError>> {
    if let [transfer] = transfers {
        return vec![wallet.transfer(transfer, "").await.map(|_| ())];
    }
    wallet.transfer_batch(transfers).await
}
