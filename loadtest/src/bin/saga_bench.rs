//! The credit pipeline end to end, in one run on local PostgreSQL, Redis and RabbitMQ: the
//! wallet, the campaign service and the saga worker in this process.
//!
//! 1. **drain**: grab `--packets` packets of one hot campaign while no saga worker runs, then
//!    start one and time how fast it credits them all; once with credits batched through the
//!    wallet's batch endpoint, once with one transfer per credit;
//! 2. **lag**: with the batching worker running, grab at a fixed arrival rate (an open model:
//!    requests start on schedule whatever the answers' latency) and report the grab→credited
//!    lag percentiles from the claims' own timestamps, and whether the backlog stayed flat.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use loadtest::{ScratchDatabases, ratio, unlink_prefix};
use redpacket_campaign::{CampaignService, RedisPool, Store};
use redpacket_common::Secret;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::time::rfc3339_in;
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_saga_worker::broker::{Broker, DEFAULT_RETRY_BASE};
use redpacket_saga_worker::{Application, SagaConfig, TestSwitches};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measures credits/s batched vs single, and the grab→credited lag at a given rate.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(
        long,
        env = "RP_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    #[arg(
        long,
        env = "RP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    #[arg(
        long,
        env = "RP_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    /// Packets grabbed before each drain.
    #[arg(long, default_value_t = 20_000)]
    packets: i64,
    /// Grabs per second in the lag phase.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of the lag phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

struct Bench {
    client: reqwest::Client,
    dbs: Vec<sea_orm::DatabaseConnection>,
    campaign_url: String,
    wallet_url: String,
    campaign_db: sea_orm::DatabaseConnection,
    config: SagaConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    redpacket_common::telemetry::install_crypto_provider();
    let scratch =
        ScratchDatabases::create(&args.postgres_url, &["wallet", "campaign", "saga"]).await?;
    let suffix = scratch.run_id().to_owned();
    let urls = [scratch.url(0), scratch.url(1), scratch.url(2)];
    let outcome = run(&args, &urls, &suffix).await;
    scratch.drop_all().await?;
    unlink_prefix(&args.redis_url, &format!("rpbench:{suffix}")).await?;
    // Every worker run declared its own RabbitMQ names (see `worker_config`): remove them all.
    for run in ["batched", "single", "lag"] {
        let prefix = format!("rpbench.{suffix}.{run}");
        match Broker::connect(&args.amqp_url, &prefix, DEFAULT_RETRY_BASE).await {
            Ok(broker) => {
                if let Err(err) = broker.delete_topology().await {
                    eprintln!("leftover RabbitMQ names {prefix}.*: {err}");
                }
                broker.close_connection().await;
            }
            Err(err) => eprintln!("leftover RabbitMQ names {prefix}.*: {err}"),
        }
    }
    outcome
}

async fn run(args: &Args, urls: &[String; 3], suffix: &str) -> anyhow::Result<()> {
    let mut dbs = Vec::new();
    for url in urls {
        let db = redpacket_common::db::connect(url, 16).await?;
        Migrator::up(&db, None).await?;
        dbs.push(db);
    }
    let wallet =
        redpacket_wallet::Application::with_database(dbs[0].clone(), "127.0.0.1:0".parse()?)
            .await?;
    let wallet_url = format!("http://{}", wallet.local_addr());
    tokio::spawn(wallet.run_until_stopped(std::future::pending()));
    let prefix = format!("rpbench:{suffix}");
    let pool = RedisPool::connect(&args.redis_url, &prefix).await?;
    let service = CampaignService::new(
        Store::new(dbs[1].clone()),
        Arc::new(pool),
        Arc::new(SnowflakeGenerator::new(1)?),
        8,
    );
    let campaign =
        redpacket_campaign::Application::with_service(service, "127.0.0.1:0".parse()?).await?;
    let campaign_url = format!("http://{}", campaign.local_addr());
    tokio::spawn(campaign.run_until_stopped(std::future::pending()));
    let bench = Bench {
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        campaign_url,
        wallet_url,
        campaign_db: dbs[1].clone(),
        dbs: dbs.clone(),
        config: SagaConfig {
            database_url: Secret::new(urls[2].clone()),
            redis_url: Secret::new(args.redis_url.clone()),
            amqp_url: Secret::new(args.amqp_url.clone()),
            campaign_url: String::new(),
            wallet_url: String::new(),
            worker_id: 2,
            listen: "127.0.0.1:0".parse()?,
            redis_prefix: prefix,
            amqp_prefix: format!("rpbench.{suffix}"),
            prefetch: 1000,
            credit_batch: 500,
            credit_linger: Duration::from_millis(5),
            retry_base: Duration::from_millis(200),
            retry_budget: Duration::from_secs(600),
            wait_max: Duration::from_secs(1800),
            lease_ttl: Duration::from_secs(10),
            db_max_connections: 16,
        },
    };
    println!(
        "saga-bench: drains of {} credits, then {} grabs/s for {} s",
        args.packets, args.rate, args.seconds
    );
    bench.analyze().await?;
    let batched = bench.drain(args.packets, 500, "batched").await?;
    bench.analyze().await?;
    let single = bench.drain(args.packets, 1, "single").await?;
    bench.analyze().await?;
    println!();
    println!("| credit pipeline | credits | seconds | credits/s |");
    println!("|---|---:|---:|---:|");
    for (name, (count, elapsed)) in [
        ("batched (wallet batch endpoint, up to 500)", batched),
        ("one transfer per credit", single),
    ] {
        println!(
            "| {name} | {count} | {:.2} | {} |",
            elapsed.as_secs_f64(),
            per_second(count, elapsed)
        );
    }
    println!();
    println!(
        "batched / single: {}",
        ratio(
            per_second(batched.0, batched.1),
            per_second(single.0, single.1)
        )
    );
    bench.lag(args).await
}

fn per_second(count: i64, elapsed: Duration) -> u64 {
    let millis = u64::try_from(elapsed.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    u64::try_from(count).unwrap_or(0) * 1000 / millis
}

impl Bench {
    /// Refreshes the planner's statistics, as autovacuum does within a minute in a running
    /// deployment. Without it, tables created seconds ago that already hold tens of thousands
    /// of rows are planned as if nearly empty: batch lookups by id scan them whole.
    async fn analyze(&self) -> anyhow::Result<()> {
        for db in &self.dbs {
            db.execute_unprepared("ANALYZE").await?;
        }
        Ok(())
    }

    async fn post(&self, url: String, body: Value) -> anyhow::Result<Value> {
        let response = self.client.post(url).json(&body).send().await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        Ok(response.json().await?)
    }

    async fn get(&self, url: String) -> anyhow::Result<Value> {
        Ok(self.client.get(url).send().await?.json().await?)
    }

    fn worker_config(&self, credit_batch: usize, run: &str) -> SagaConfig {
        let mut config = self.config.clone();
        config.campaign_url = self.campaign_url.clone();
        config.wallet_url = self.wallet_url.clone();
        config.credit_batch = credit_batch;
        config.amqp_prefix = format!("{}.{run}", self.config.amqp_prefix);
        config
    }

    /// A funded, active campaign of `packets` packets; funded by a worker run just for it.
    async fn hot_campaign(&self, packets: i64, run: &str) -> anyhow::Result<String> {
        let merchant = format!("bench-{run}");
        self.post(
            format!("{}/transfers", self.wallet_url),
            json!({"id": format!("topup-{merchant}"), "debit": "external",
            "credit": format!("merchant:{merchant}"), "amount": packets * 100, "currency": "CNY"}),
        )
        .await?;
        let campaign = self.post(format!("{}/campaigns", self.campaign_url), json!({"merchant_id": merchant, "title": "bench",
            "currency": "CNY", "total_amount": packets * 100, "packet_count": packets, "split": {"mode": "fixed"},
            "starts_at": rfc3339_in(-1000), "ends_at": rfc3339_in(3_600_000)})).await?;
        let id = campaign["id"].as_str().context("campaign id")?.to_owned();
        for _ in 0..600 {
            if self
                .get(format!("{}/campaigns/{id}", self.campaign_url))
                .await?["status"]
                == "active"
            {
                return Ok(id);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("campaign {id} was not funded")
    }

    async fn credited(&self, id: &str) -> anyhow::Result<i64> {
        Ok(self
            .get(format!("{}/campaigns/{id}/stats", self.campaign_url))
            .await?["packets_credited"]
            .as_i64()
            .unwrap_or(0))
    }

    /// Grabs every packet with no worker running, then times a worker crediting them.
    async fn drain(
        &self,
        packets: i64,
        credit_batch: usize,
        run: &str,
    ) -> anyhow::Result<(i64, Duration)> {
        // A worker funds the campaign, then stops: the grabs pile up in the hand-off.
        let funder = Application::build(
            self.worker_config(credit_batch, run),
            TestSwitches::default(),
        )
        .await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(funder.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let id = self.hot_campaign(packets, run).await?;
        let _ = stop.send(());
        running.await??;
        self.grab(&id, packets, 64, run).await?;
        let worker = Application::build(
            self.worker_config(credit_batch, run),
            TestSwitches::default(),
        )
        .await?;
        let started = Instant::now();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run_until_stopped(async {
            let _ = stopped.await;
        }));
        while self.credited(&id).await? < packets {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the drain did not finish"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed();
        let _ = stop.send(());
        running.await??;
        Ok((packets, elapsed))
    }

    async fn grab(&self, id: &str, count: i64, in_flight: usize, run: &str) -> anyhow::Result<()> {
        use futures::StreamExt;
        let url = format!("{}/campaigns/{id}/grab", self.campaign_url);
        let failures = futures::stream::iter(0..count)
            .map(|i| {
                let (client, url) = (self.client.clone(), url.clone());
                async move {
                    client
                        .post(url)
                        .json(&json!({"user_id": format!("{run}{i}")}))
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false)
                }
            })
            .buffer_unordered(in_flight)
            .filter(|ok| std::future::ready(!ok))
            .count()
            .await;
        anyhow::ensure!(failures == 0, "{failures} grabs failed");
        Ok(())
    }

    /// Grabs at a fixed rate with the batching worker running; reports the lag.
    async fn lag(&self, args: &Args) -> anyhow::Result<()> {
        let total = i64::try_from(args.rate * args.seconds)?;
        let worker =
            Application::build(self.worker_config(500, "lag"), TestSwitches::default()).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run_until_stopped(async {
            let _ = stopped.await;
        }));
        let id = self.hot_campaign(total, "lag").await?;
        let url = format!("{}/campaigns/{id}/grab", self.campaign_url);
        let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
        let started = tokio::time::Instant::now();
        let mut backlog = Vec::new();
        let mut requests = Vec::with_capacity(usize::try_from(total)?);
        for i in 0..total {
            let due = started + interval * u32::try_from(i)?;
            tokio::time::sleep_until(due).await;
            let (client, url) = (self.client.clone(), url.clone());
            requests.push(tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"user_id": format!("lag{i}")}))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            }));
            if i % i64::try_from(args.rate)? == 0 {
                let credited = self.credited(&id).await?;
                backlog.push((started.elapsed().as_secs(), i - credited));
            }
        }
        let offered = started.elapsed();
        let mut granted = 0;
        for request in requests {
            granted += i64::from(request.await?);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.credited(&id).await? < granted && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(());
        running.await??;
        let backend = self.campaign_db.get_database_backend();
        let rows = self
            .campaign_db
            .query_all_raw(Statement::from_string(
                backend,
                format!("SELECT credited_at_ms - grabbed_at_ms FROM campaign_claims WHERE campaign_id = {id} AND credited_at_ms IS NOT NULL ORDER BY 1"),
            ))
            .await?;
        let lags: Vec<i64> = rows
            .iter()
            .filter_map(|r| r.try_get_by_index::<i64>(0).ok())
            .collect();
        let at = |q: usize| {
            lags.get((lags.len() * q / 100).min(lags.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!();
        println!(
            "lag phase: asked {} grabs/s for {} s, achieved {} grabs/s offered, {} granted, {} credited",
            args.rate,
            args.seconds,
            per_second(total, offered),
            granted,
            lags.len()
        );
        println!(
            "grab→credited lag: p50 {} ms, p99 {} ms, max {} ms",
            at(50),
            at(99),
            lags.last().copied().unwrap_or(0)
        );
        println!("backlog (grabbed − credited) each second: {backlog:?}");
        Ok(())
    }
}
