//! Wallet throughput on PostgreSQL, in one run: single transfers through `POST /transfers`,
//! batches from ONE hot escrow account through `POST /transfers/batch`, and the database's raw
//! rate of single-row update transactions (plus `pgbench -N` when it is installed).
//!
//! It creates a scratch database on the server, migrates it, starts the wallet on a free port
//! in this process and drives it over HTTP, then drops the database.

use std::time::Duration;

use clap::Parser;
use loadtest::{PhaseResult, ScratchDatabases, ratio, run_phase};
use redpacket_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::{Value, json};

/// Benchmarks the wallet against the raw database in the same run.
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
    /// Concurrent clients in every phase.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Transfers per batch request.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Skip `pgbench -N` even when it is installed.
    #[arg(long)]
    no_pgbench: bool,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    redpacket_common::telemetry::install_crypto_provider();
    let scratch = ScratchDatabases::create(&args.postgres_url, &["wallet"]).await?;
    let outcome = run(&args, &scratch.url(0), scratch.name(0)).await;
    scratch.drop_all().await?;
    outcome
}

async fn run(args: &Args, url: &str, name: &str) -> anyhow::Result<()> {
    let pool_size = u32::try_from(args.concurrency).unwrap_or(u32::MAX).max(2);
    let db = redpacket_common::db::connect(url, pool_size).await?;
    Migrator::up(&db, None).await?;
    let duration = Duration::from_secs(args.seconds);
    println!(
        "wallet-bench: {} clients, {} s per phase, batches of {}, PostgreSQL database {name}",
        args.concurrency, args.seconds, args.batch_size
    );

    let raw = raw_update_loop(&db, args.concurrency, duration).await?;
    let pgbench = if args.no_pgbench {
        None
    } else {
        pgbench(url, args, name).await
    };

    let app =
        redpacket_wallet::Application::with_database(db.clone(), "127.0.0.1:0".parse()?).await?;
    let base = format!("http://{}", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let fund = json!({"id": "fund", "debit": "external", "credit": "escrow:hot",
                      "amount": 100_000_000_000_000_i64, "currency": "CNY"});
    let response = client
        .post(format!("{base}/transfers"))
        .json(&fund)
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "funding the escrow failed: {}",
        response.status()
    );

    // The tables start empty; analyze them as autovacuum would in a running system, so the
    // planner uses the primary keys instead of plans made for empty tables.
    db.execute_unprepared("ANALYZE").await?;
    let single = {
        let (client, base) = (client.clone(), base.clone());
        run_phase("POST /transfers (one credit per request)", args.concurrency, duration, move |worker, i| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let body = json!({"id": format!("s-{worker}-{i}"), "debit": "escrow:hot",
                                  "credit": format!("user:s{worker}x{i}"), "amount": 1, "currency": "CNY"});
                let response = client.post(format!("{base}/transfers")).json(&body).send().await?;
                anyhow::ensure!(response.status() == 200, "status {}", response.status());
                Ok(1)
            }
        })
        .await
    };
    db.execute_unprepared("ANALYZE").await?;
    let batch_size = args.batch_size;
    let batch = {
        let (client, base) = (client.clone(), base.clone());
        run_phase(
            "POST /transfers/batch (credits from one hot escrow)",
            args.concurrency,
            duration,
            move |worker, i| {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    let transfers: Vec<Value> = (0..batch_size)
                        .map(|n| {
                            json!({"id": format!("b-{worker}-{i}-{n}"), "debit": "escrow:hot",
                                   "credit": format!("user:b{worker}x{i}x{n}"), "amount": 1, "currency": "CNY"})
                        })
                        .collect();
                    let response = client
                        .post(format!("{base}/transfers/batch"))
                        .json(&json!({ "transfers": transfers }))
                        .send()
                        .await?;
                    anyhow::ensure!(response.status() == 200, "status {}", response.status());
                    let body: Value = response.json().await?;
                    let ok = body["results"].as_array().map_or(0, |r| r.iter().filter(|r| r["ok"] == true).count());
                    anyhow::ensure!(ok == batch_size, "{} of {batch_size} applied", ok);
                    Ok(u64::try_from(ok)?)
                }
            },
        )
        .await
    };
    let _ = stop.send(());
    server.await??;

    let ledger = redpacket_wallet::Ledger::new(db.clone());
    for check in ledger.check_invariants().await? {
        anyhow::ensure!(
            check.ok,
            "invariant {} broken: {}",
            check.name,
            check.detail
        );
    }

    println!();
    println!("| phase | completed | failed | per second |");
    println!("|---|---:|---:|---:|");
    for phase in [Some(&raw), pgbench.as_ref(), Some(&single), Some(&batch)]
        .into_iter()
        .flatten()
    {
        print_row(phase);
    }
    println!();
    println!(
        "batch / single:            {}",
        ratio(batch.per_second(), single.per_second())
    );
    println!(
        "batch / raw update loop:   {}",
        ratio(batch.per_second(), raw.per_second())
    );
    if let Some(pgbench) = &pgbench {
        println!(
            "batch / pgbench -N:        {}",
            ratio(batch.per_second(), pgbench.per_second())
        );
    }
    println!("ledger invariants: all hold");
    db.close().await?;
    Ok(())
}

fn print_row(phase: &PhaseResult) {
    println!(
        "| {} | {} | {} | {} |",
        phase.name,
        phase.completed,
        phase.failed,
        phase.per_second()
    );
}

/// The database alone: transactions of one single-row UPDATE plus one history INSERT, the
/// shape of `pgbench -N`, at the same concurrency.
async fn raw_update_loop(
    db: &sea_orm::DatabaseConnection,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<PhaseResult> {
    db.execute_unprepared(
        "CREATE TABLE bench_rows (id INT PRIMARY KEY, balance BIGINT NOT NULL);
         INSERT INTO bench_rows SELECT g, 0 FROM generate_series(1, 100000) g;
         CREATE TABLE bench_history (id BIGSERIAL PRIMARY KEY, row_id INT NOT NULL, delta BIGINT NOT NULL);",
    )
    .await?;
    let db = db.clone();
    Ok(run_phase(
        "raw single-row update transactions (database alone)",
        concurrency,
        duration,
        move |worker, i| {
            let db = db.clone();
            async move {
                let row = (worker as u64 * 7919 + i * 104_729) % 100_000 + 1;
                let txn = db.begin().await?;
                txn.execute_unprepared(&format!(
                    "UPDATE bench_rows SET balance = balance + 1 WHERE id = {row}"
                ))
                .await?;
                txn.execute_unprepared(&format!(
                    "INSERT INTO bench_history (row_id, delta) VALUES ({row}, 1)"
                ))
                .await?;
                txn.commit().await?;
                Ok(1)
            }
        },
    )
    .await)
}

/// `pgbench -N` on the same server when the binary is installed.
async fn pgbench(url: &str, args: &Args, name: &str) -> Option<PhaseResult> {
    let init = tokio::process::Command::new("pgbench")
        .args(["-i", "-s", "10", "-q", url])
        .output()
        .await
        .ok()?;
    if !init.status.success() {
        eprintln!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        return None;
    }
    let clients = args.concurrency.to_string();
    let seconds = args.seconds.to_string();
    let output = tokio::process::Command::new("pgbench")
        .args(["-N", "-c", &clients, "-j", "2", "-T", &seconds, url])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let transactions: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())?;
    let _ = name;
    Some(PhaseResult {
        name: "pgbench -N (database alone)".to_owned(),
        completed: transactions,
        failed: 0,
        elapsed: Duration::from_secs(args.seconds),
    })
}
