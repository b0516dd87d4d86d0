//! Load generation and measurement shared by the benchmark binaries, and the load harness of
//! the `loadtest` binary ([`harness`]).

pub mod harness;

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

/// One run of [wrk](https://github.com/wg/wrk), the lean C load generator, as it reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WrkReport {
    /// Responses received, any status.
    pub requests: u64,
    /// Responses whose status was not 2xx or 3xx.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
    /// The run's measured length.
    pub elapsed: Duration,
    /// Latency percentiles (printed with `--latency`).
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl WrkReport {
    /// 2xx/3xx responses per second.
    pub fn ok_per_second(&self) -> u64 {
        let micros = u64::try_from(self.elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.requests
            .saturating_sub(self.non_2xx)
            .saturating_mul(1_000_000)
            / micros
    }

    /// Parses wrk's text output.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut report = WrkReport::default();
        let mut seen = false;
        for line in text.lines().map(str::trim) {
            if let Some((count, rest)) = line.split_once(" requests in ") {
                report.requests = count.trim().parse()?;
                let time = rest.split(',').next().unwrap_or_default();
                report.elapsed = parse_wrk_time(time)
                    .ok_or_else(|| anyhow::anyhow!("unreadable wrk duration `{time}`"))?;
                seen = true;
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                report.non_2xx = n.trim().parse()?;
            } else if let Some(errors) = line.strip_prefix("Socket errors:") {
                report.socket_errors = errors
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            } else if let Some(time) = line.strip_prefix("50%") {
                report.p50 = parse_wrk_time(time.trim());
            } else if let Some(time) = line.strip_prefix("99%") {
                report.p99 = parse_wrk_time(time.trim());
            }
        }
        anyhow::ensure!(seen, "unexpected wrk output: {text}");
        Ok(report)
    }
}

/// wrk's times: `635.91us`, `1.23ms`, `10.00s`, `1.50m` (parsed in integers).
fn parse_wrk_time(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let unit: u64 = match &text[split..] {
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    let (whole, fraction) = text[..split]
        .split_once('.')
        .unwrap_or((&text[..split], ""));
    let whole: u64 = whole.parse().ok()?;
    let mut nanos = whole.checked_mul(unit)?;
    if !fraction.is_empty() {
        let digits = u32::try_from(fraction.len()).ok()?;
        let value: u64 = fraction.parse().ok()?;
        nanos = nanos.checked_add(value.checked_mul(unit)? / 10_u64.checked_pow(digits)?)?;
    }
    Some(Duration::from_nanos(nanos))
}

/// Whether wrk is on the PATH.
pub async fn wrk_installed() -> bool {
    tokio::process::Command::new("wrk")
        .arg("--version")
        .output()
        .await
        .is_ok_and(|out| !out.stdout.is_empty() || !out.stderr.is_empty())
}

/// Runs `wrk --latency` with a Lua script against `url` and parses its report.
pub async fn wrk(
    threads: usize,
    connections: usize,
    duration: Duration,
    script: &std::path::Path,
    url: &str,
) -> anyhow::Result<WrkReport> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    WrkReport::parse(&String::from_utf8_lossy(&output.stdout))
}

#[cfg(test)]
mod wrk_tests {
    use super::*;

    #[test]
    fn parses_a_wrk_report() {
        let text = "Running 10s test @ http://127.0.0.1:1\n  2 threads and 64 connections\n  \
                    Latency Distribution\n     50%  635.91us\n     75%    1.10ms\n     90%    \
                    2.00ms\n     99%    4.25ms\n  120000 requests in 10.01s, 30.00MB read\n  \
                    Socket errors: connect 0, read 1, write 0, timeout 2\n  Non-2xx or 3xx \
                    responses: 7\nRequests/sec:  11988.01\n";
        let report = WrkReport::parse(text).unwrap();
        assert_eq!(report.requests, 120_000);
        assert_eq!(report.non_2xx, 7);
        assert_eq!(report.socket_errors, 3);
        assert_eq!(report.elapsed, Duration::from_millis(10_010));
        assert_eq!(report.p50, Some(Duration::from_nanos(635_910)));
        assert_eq!(report.p99, Some(Duration::from_micros(4_250)));
        assert_eq!(report.ok_per_second(), 11_987);
    }
}
