//! Load generation and measurement shared by the benchmark binaries.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The outcome of one timed phase.
#[derive(Debug, Clone)]
pub struct PhaseResult {
    pub name: String,
    /// Units of work completed (transfers, transactions).
    pub completed: u64,
    /// Operations that failed.
    pub failed: u64,
    pub elapsed: Duration,
}

impl PhaseResult {
    /// Completed units per second.
    pub fn per_second(&self) -> u64 {
        let millis = u64::try_from(self.elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.completed.saturating_mul(1000) / millis
    }
}

/// Runs `concurrency` workers for `duration`; each worker calls `operation` in a loop. An
/// operation returns how many units it completed, or an error that is counted as a failure.
pub async fn run_phase<F, Fut>(
    name: &str,
    concurrency: usize,
    duration: Duration,
    operation: F,
) -> PhaseResult
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send,
{
    let operation = Arc::new(operation);
    let completed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let operation = operation.clone();
            let completed = completed.clone();
            let failed = failed.clone();
            tokio::spawn(async move {
                let mut iteration = 0;
                while Instant::now() < deadline {
                    match operation(worker, iteration).await {
                        Ok(units) => {
                            completed.fetch_add(units, Ordering::Relaxed);
                        }
                        Err(err) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("{worker}: {err:#}");
                            }
                        }
                    }
                    iteration += 1;
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    PhaseResult {
        name: name.to_owned(),
        completed: completed.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

/// Formats a ratio of two rates as `1.23×` in integer arithmetic.
pub fn ratio(numerator: u64, denominator: u64) -> String {
    if denominator == 0 {
        return "n/a".to_owned();
    }
    let hundredths = numerator.saturating_mul(100) / denominator;
    format!("{}.{:02}×", hundredths / 100, hundredths % 100)
}

pub use redpacket_common::db::database_url;
