//! Campaign service benchmarks, in one run on local PostgreSQL and Redis:
//!
//! 1. create, persist and load a campaign of 1,000,000 packets: the time of each step and the
//!    Redis memory per packet;
//! 2. grabs on one hot campaign through the service's HTTP API, against the same Redis grab
//!    script called directly (no HTTP) at the same concurrency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use loadtest::{PhaseResult, ScratchDatabases, ratio, run_phase, unlink_prefix};
use redpacket_campaign::{Application, CampaignService, PacketPool, RedisPool, Store};
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::time::rfc3339_in;
use redpacket_migrations::{Migrator, MigratorTrait};

use serde_json::{Value, json};

/// Benchmarks the campaign service against the raw Redis script in the same run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A PostgreSQL server URL; a scratch database is created on it and dropped afterwards.
    #[arg(
        long,
        env = "RP_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Redis URL; keys go under a fresh prefix, deleted afterwards.
    #[arg(
        long,
        env = "RP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Packets of each campaign.
    #[arg(long, default_value_t = 1_000_000)]
    packets: i64,
    /// Buckets per campaign pool.
    #[arg(long, default_value_t = 8)]
    buckets: u32,
    /// Concurrent clients in both grab phases.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Seconds each grab phase runs. Two rounds of each phase draw on one campaign of
    /// `--packets` packets: at about 65,000 raw grabs a second, 5 s phases fit 1,000,000.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    redpacket_common::telemetry::install_crypto_provider();
    let scratch = ScratchDatabases::create(&args.postgres_url, &["campaign"]).await?;
    let prefix = format!("rpbench:{}", scratch.run_id());
    let outcome = run(&args, &scratch.url(0), &prefix).await;
    unlink_prefix(&args.redis_url, &prefix).await?;
    scratch.drop_all().await?;
    outcome
}

async fn wait_active(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<()> {
    for _ in 0..1200 {
        let campaign: Value = client
            .get(format!("{base}/campaigns/{id}"))
            .send()
            .await?
            .json()
            .await?;
        if campaign["status"] == "active" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("campaign {id} did not become active")
}

async fn run(args: &Args, url: &str, prefix: &str) -> anyhow::Result<()> {
    let db = redpacket_common::db::connect(url, 16).await?;
    Migrator::up(&db, None).await?;
    let pool = RedisPool::connect(&args.redis_url, prefix).await?;
    let service = CampaignService::new(
        Store::new(db.clone()),
        Arc::new(pool.clone()),
        Arc::new(SnowflakeGenerator::new(1)?),
        args.buckets,
    );
    let app = Application::with_service(service.clone(), "127.0.0.1:0".parse()?).await?;
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    println!(
        "campaign-bench: {} packets, {} buckets, {} clients, {} s per grab phase",
        args.packets, args.buckets, args.concurrency, args.seconds
    );

    // 1. Create + persist, then fund and load.
    let body = json!({
        "merchant_id": "bench", "title": "bench", "currency": "CNY",
        "total_amount": args.packets * 100, "packet_count": args.packets,
        "split": {"mode": "double_mean"}, "starts_at": rfc3339_in(-1_000), "ends_at": rfc3339_in(3_600_000),
    });
    let used_before = redis_memory(&pool).await?;
    let started = Instant::now();
    let created: Value = client
        .post(format!("{base}/campaigns"))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let create_time = started.elapsed();
    let id = created["id"].as_str().context("no campaign id")?.to_owned();
    let loading = Instant::now();
    client
        .post(format!("{base}/campaigns/{id}/funded"))
        .send()
        .await?
        .error_for_status()?;
    wait_active(&client, &base, &id).await?;
    let load_time = loading.elapsed();
    let used_after = redis_memory(&pool).await?;
    let bucket_bytes = bucket_memory(&pool, prefix, &id, args.buckets).await?;
    let packets = u64::try_from(args.packets)?;
    println!();
    println!("| step | time |");
    println!("|---|---:|");
    println!(
        "| create: split + persist {} packets (POST /campaigns) | {:.2?} |",
        args.packets, create_time
    );
    println!(
        "| fund + load into Redis until active | {:.2?} |",
        load_time
    );
    println!("| total | {:.2?} |", create_time + load_time);
    println!();
    println!(
        "Redis memory: {} bytes per packet in the bucket lists (MEMORY USAGE), {} bytes per packet by used_memory",
        bucket_bytes / packets,
        used_after.saturating_sub(used_before) / packets
    );

    // 2. Grabs: the raw script directly on campaign A, then the service over HTTP on campaign B.
    let model = service
        .store()
        .campaign(id.parse()?)
        .await?
        .context("campaign vanished")?;
    let raw_campaign = Arc::new(redpacket_campaign::service::pool_campaign(&model));
    let second: Value = client
        .post(format!("{base}/campaigns"))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let second_id = second["id"].as_str().context("no campaign id")?.to_owned();
    client
        .post(format!("{base}/campaigns/{second_id}/funded"))
        .send()
        .await?
        .error_for_status()?;
    wait_active(&client, &base, &second_id).await?;
    let duration = Duration::from_secs(args.seconds);

    // Two rounds, raw then service, so a noisy neighbour hurts both alike; each round's
    // figures are printed, and the ratio uses the sums.
    let mut rounds = Vec::new();
    for round in 0..2_u64 {
        let raw = {
            let (pool, campaign) = (pool.clone(), raw_campaign.clone());
            run_phase(
                "Redis grab script called directly",
                args.concurrency,
                duration,
                move |worker, i| {
                    let (pool, campaign) = (pool.clone(), campaign.clone());
                    async move {
                        let claim = redpacket_campaign::service::claim_id(
                            (round << 48) | ((worker as u64) << 32) | i,
                            campaign.id,
                        );
                        let now = chrono::Utc::now().timestamp_millis();
                        match pool
                            .grab(
                                &campaign,
                                &format!("r{round}w{worker}x{i}"),
                                &claim,
                                now,
                                "bench",
                            )
                            .await?
                        {
                            redpacket_campaign::pool::GrabOutcome::Granted { .. } => Ok(1),
                            other => anyhow::bail!("{other:?}"),
                        }
                    }
                },
            )
            .await
        };
        let service_phase = match wrk_grabs(&base, &second_id, args, round).await {
            Some(result) => result?,
            None => {
                println!(
                    "(wrk not installed: driving the service with an in-process HTTP client, which competes for the CPU)"
                );
                let (client, base, id) = (client.clone(), base.clone(), second_id.clone());
                run_phase(
                    "POST /campaigns/{id}/grab (campaign service)",
                    args.concurrency,
                    duration,
                    move |worker, i| {
                        let (client, url) = (client.clone(), format!("{base}/campaigns/{id}/grab"));
                        async move {
                            let user = format!("s{round}w{worker}x{i}");
                            let response = client
                                .post(url)
                                .json(&json!({ "user_id": user }))
                                .send()
                                .await?;
                            anyhow::ensure!(
                                response.status() == 200,
                                "status {}",
                                response.status()
                            );
                            Ok(1)
                        }
                    },
                )
                .await
            }
        };
        rounds.push((raw, service_phase));
    }
    println!();
    println!("| round | phase | grabs | failed | per second |");
    println!("|---|---|---:|---:|---:|");
    for (round, (raw, service_phase)) in rounds.iter().enumerate() {
        for phase in [raw, service_phase] {
            println!(
                "| {} | {} | {} | {} | {} |",
                round + 1,
                phase.name,
                phase.completed,
                phase.failed,
                phase.per_second()
            );
        }
    }
    let raw_total: u64 = rounds.iter().map(|(raw, _)| raw.per_second()).sum();
    let service_total: u64 = rounds.iter().map(|(_, service)| service.per_second()).sum();
    println!();
    println!("service / raw script: {}", ratio(service_total, raw_total));
    if rounds
        .iter()
        .any(|(raw, service)| raw.failed > 0 || service.failed > 0)
    {
        println!(
            "⚠ a phase had failed grabs (a campaign sold out?): the ratio is not valid; \
             shorten --seconds or raise --packets"
        );
    }
    let _ = stop.send(());
    server.await??;
    db.close().await?;
    Ok(())
}

async fn redis_memory(pool: &RedisPool) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut pool.connection())
        .await?;
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|value| value.trim().parse().ok())
        .context("no used_memory in INFO")
}

async fn bucket_memory(
    pool: &RedisPool,
    prefix: &str,
    id: &str,
    buckets: u32,
) -> anyhow::Result<u64> {
    let mut total = 0;
    for bucket in 0..buckets {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("{prefix}:{{c:{id}}}:b:{bucket}"))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut pool.connection())
            .await?;
        total += bytes.unwrap_or(0);
    }
    Ok(total)
}

/// Drives the grab endpoint with wrk (a separate, lean C load generator) when it is installed:
/// every request a new user, so every answer is a granted grab.
async fn wrk_grabs(
    base: &str,
    id: &str,
    args: &Args,
    round: u64,
) -> Option<anyhow::Result<PhaseResult>> {
    let available = tokio::process::Command::new("wrk")
        .arg("--version")
        .output()
        .await
        .ok()?;
    if available.stdout.is_empty() && available.stderr.is_empty() {
        return None;
    }
    Some(wrk_run(base, id, args, round).await)
}

async fn wrk_run(base: &str, id: &str, args: &Args, round: u64) -> anyhow::Result<PhaseResult> {
    let script = std::env::temp_dir().join(format!("campaign-bench-{id}.lua"));
    std::fs::write(
        &script,
        format!(
            r#"local counter = 0
local next_thread = 0
setup = function(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
request = function()
  counter = counter + 1
  local body = '{{"user_id":"r{round}w' .. tid .. 'x' .. counter .. '"}}'
  return wrk.format("POST", "/campaigns/{id}/grab", {{["Content-Type"]="application/json"}}, body)
end
"#
        ),
    )?;
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{}", args.concurrency),
            &format!("-d{}s", args.seconds),
            "-s",
        ])
        .arg(&script)
        .arg(base)
        .output()
        .await?;
    std::fs::remove_file(&script).ok();
    let text = String::from_utf8_lossy(&output.stdout);
    let requests: u64 = text
        .lines()
        .find_map(|line| line.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("unexpected wrk output: {text}"))?;
    let failed: u64 = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(PhaseResult {
        name: "POST /campaigns/{id}/grab (campaign service, driven by wrk)".to_owned(),
        completed: requests - failed,
        failed,
        elapsed: Duration::from_secs(args.seconds),
    })
}
