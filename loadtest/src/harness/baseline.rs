//! The baselines of `--baseline`, measured in the same run at the same concurrency, so the
//! scenario's throughput is read as ratios rather than absolute numbers (the machines are
//! shared and noisy; see BENCHMARKS.md):
//!
//! - the raw Redis grab script, called through the campaign service's own `RedisPool` (what
//!   campaign-bench measures) on a scratch campaign under a fresh key prefix, deleted after;
//! - `GET /v1/ping` through the gateway: its HTTP stack, routing and nothing else.

use std::sync::Arc;
use std::time::Duration;

use redpacket_campaign::pool::{PacketPool, PoolCampaign};
use redpacket_campaign::{RedisPool, service::claim_id};
use serde::Serialize;

use super::workload::DirectClient;
use crate::{PhaseResult, run_phase, unlink_prefix};

/// Packets of the scratch pool: more than the script can pop in a baseline phase on this
/// kind of machine (about 50,000 a second), so most calls are granted.
const SCRATCH_PACKETS: usize = 1_000_000;

/// The two baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    pub concurrency: usize,
    pub seconds: u64,
    /// Grab script calls answered per second (granted or sold out).
    pub redis_grab_per_sec: u64,
    pub redis_failed: u64,
    /// `GET /v1/ping` answered 200 per second.
    pub ping_per_sec: u64,
    pub ping_failed: u64,
}

/// Measures both baselines.
pub async fn measure(
    redis_url: &str,
    base: &str,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<Baselines> {
    let duration = Duration::from_secs(seconds);
    let prefix = format!(
        "rpload:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let raw = raw_grabs(redis_url, &prefix, concurrency, duration).await;
    unlink_prefix(redis_url, &prefix).await?;
    let raw = raw?;
    let ping = pings(base, concurrency, duration).await?;
    Ok(Baselines {
        concurrency,
        seconds,
        redis_grab_per_sec: raw.per_second(),
        redis_failed: raw.failed,
        ping_per_sec: ping.per_second(),
        ping_failed: ping.failed,
    })
}

/// The raw Redis grab script called directly by `concurrency` callers for `duration`, on a
/// scratch pool of its own under `prefix` (left for the caller to delete).
pub async fn raw_grabs(
    redis_url: &str,
    prefix: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<PhaseResult> {
    let pool = RedisPool::connect(redis_url, prefix).await?;
    let now = redpacket_common::time::now_ms();
    let campaign = Arc::new(PoolCampaign {
        id: 1,
        currency: "CNY".to_owned(),
        starts_at_ms: now - 1_000,
        ends_at_ms: now + 3_600_000,
        per_user_limit: 1,
        buckets: 8,
    });
    pool.load(&campaign, &vec![1; SCRATCH_PACKETS]).await?;
    Ok(run_phase(
        "Redis grab script called directly",
        concurrency,
        duration,
        move |worker, i| {
            let (pool, campaign) = (pool.clone(), campaign.clone());
            async move {
                let worker = u64::try_from(worker).unwrap_or(0);
                let claim = claim_id((worker << 40) | i, campaign.id);
                let now = redpacket_common::time::now_ms();
                pool.grab(
                    &campaign,
                    &format!("w{worker}x{i}"),
                    &claim,
                    now,
                    "loadtest",
                )
                .await?;
                Ok(1)
            }
        },
    )
    .await)
}

/// `GET /v1/ping` through the open model's client, so that the ratio to it compares the same
/// client's cost.
async fn pings(base: &str, concurrency: usize, duration: Duration) -> anyhow::Result<PhaseResult> {
    let client = Arc::new(DirectClient::new(base, concurrency)?);
    Ok(
        run_phase("GET /v1/ping", concurrency, duration, move |_, _| {
            let client = client.clone();
            async move {
                let (status, _) = client.send(false, "/v1/ping", &[], None).await?;
                anyhow::ensure!(status == 200, "status {status}");
                Ok(1)
            }
        })
        .await,
    )
}
