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

/// Scratch databases on one server, created for a benchmark run and dropped after it.
#[derive(Debug)]
pub struct ScratchDatabases {
    admin: sea_orm::DatabaseConnection,
    server_url: String,
    names: Vec<String>,
}

impl ScratchDatabases {
    /// Creates `rp_bench_{label}_{random}` for every label.
    pub async fn create(server_url: &str, labels: &[&str]) -> anyhow::Result<Self> {
        use sea_orm::ConnectionTrait;
        let admin = sea_orm::Database::connect(server_url)
            .await
            .map_err(|err| anyhow::anyhow!("connecting to {server_url}: {err}"))?;
        let run = &uuid::Uuid::new_v4().simple().to_string()[..12];
        let names: Vec<String> = labels
            .iter()
            .map(|label| format!("rp_bench_{label}_{run}"))
            .collect();
        for name in &names {
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await?;
        }
        Ok(ScratchDatabases {
            admin,
            server_url: server_url.to_owned(),
            names,
        })
    }

    /// The name of the `index`-th database.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// The URL of the `index`-th database.
    pub fn url(&self, index: usize) -> String {
        database_url(&self.server_url, &self.names[index])
    }

    /// A prefix unique to this run, for Redis keys and broker names.
    pub fn run_id(&self) -> &str {
        self.names[0].rsplit('_').next().unwrap_or("run")
    }

    /// Drops every database of the run.
    pub async fn drop_all(self) -> anyhow::Result<()> {
        use sea_orm::ConnectionTrait;
        for name in &self.names {
            self.admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
        }
        Ok(())
    }
}

/// Deletes every Redis key under `prefix` (UNLINK: large values are freed in the background).
pub async fn unlink_prefix(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut redis = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await?;
    for chunk in keys.chunks(100) {
        let _: () = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut redis)
            .await?;
    }
    Ok(())
}
