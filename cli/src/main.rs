//! `redpacket`: one binary that runs any service of the red-packet system, the embedded
//! all-in-one mode, and the migrations. It only parses arguments and configuration and calls
//! the libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use redpacket_common::ConfigSource;
use redpacket_common::http::shutdown_signal;
use redpacket_common::telemetry::{LogConfig, init_tracing, install_crypto_provider};
use redpacket_migrations::{Migrator, MigratorTrait};

mod demo;

/// Repair calls one `reconcile --repair` makes at most, following the cursor (each bounded by
/// its items and time); a run that has not reached the end by then fails.
const REPAIR_CALLS: u32 = 100;
/// How long `reconcile --repair` waits for the reconciliation to hold after a repair.
const REPAIR_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);
mod embedded;

// Every request allocates a little; mimalloc does that several times cheaper than the system
// allocator under contention, which shows on the grab's hot path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The red-packet system: merchants fund campaigns split into packets, crowds grab them, a
/// saga credits the money to wallets.
///
/// Services read their settings from `RP_*` environment variables (or a TOML file named by
/// `RP_CONFIG_FILE`); each names the variables it needs when one is missing.
#[derive(Debug, Parser)]
#[command(name = "redpacket", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system in one process on SQLite: the default for a first run.
    ///
    /// The gateway, campaign service, wallet and saga worker, with an in-process packet pool,
    /// lease store and message bus; nothing else to install. Data lives in `--data-dir`, so a
    /// restart keeps everything. Prints the docs address and ready-made tokens, and seeds (once)
    /// a demo merchant with money and a demo campaign.
    Dev {
        /// Address of the public gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Directory for the SQLite databases and the token secret.
        #[arg(long, default_value = ".redpacket")]
        data_dir: PathBuf,
    },
    /// Drive a running system: top up a merchant, create a campaign, let N users grab at once,
    /// wait for the credits, print a summary and the reconciliation verdict.
    ///
    /// Exits non-zero when an invariant is broken. Tokens are minted with RP_AUTH_SECRET, or
    /// the secret `redpacket dev` keeps in `--data-dir`.
    Demo {
        /// The gateway's address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Simulated users, each grabbing once.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        users: u32,
        /// Packets in the campaign (default: one per user).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        packets: Option<u32>,
        /// Where `redpacket dev` keeps its secret (used when RP_AUTH_SECRET is not set).
        #[arg(long, default_value = ".redpacket")]
        data_dir: PathBuf,
    },
    /// Check every money invariant now through the gateway, printing each as held or broken
    /// with the offending ids; exits non-zero when one is broken.
    ///
    /// With --repair, first repairs what can be repaired (claims the pool granted that the
    /// database does not know, pools that disagree with the database, claims and refunds with
    /// no live saga, stuck and stalled sagas), printing each finding with what was done; then
    /// exits non-zero when something is left unrepaired. A second run finds nothing.
    Reconcile {
        /// The gateway's address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Repair what can be repaired before checking.
        #[arg(long)]
        repair: bool,
        /// Items each service takes per repair call.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Only claims grabbed, campaigns ended and sagas stalled at least this long ago (ms)
        /// are repaired: younger ones are still moving on their own.
        #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(i64).range(0..=86_400_000))]
        min_age_ms: i64,
        /// Where `redpacket dev` keeps its secret (used when RP_AUTH_SECRET is not set).
        #[arg(long, default_value = ".redpacket")]
        data_dir: PathBuf,
    },
    /// Replay dead letters through the gateway: those of a campaign, those whose reason
    /// contains a text, or all; at most 200 a second. Prints each letter's outcome; exits
    /// non-zero when one could not be replayed.
    Replay {
        /// The gateway's address.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Only this campaign's sagas.
        #[arg(long)]
        campaign: Option<String>,
        /// Only letters whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Every dead letter (required without --campaign or --reason).
        #[arg(long)]
        all: bool,
        /// The most letters to replay.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        most: u32,
        /// Where `redpacket dev` keeps its secret (used when RP_AUTH_SECRET is not set).
        #[arg(long, default_value = ".redpacket")]
        data_dir: PathBuf,
    },
    /// Run the wallet service (double-entry ledger). Needs RP_DATABASE_URL; listens on
    /// RP_LISTEN (default 127.0.0.1:8082).
    Wallet {
        /// Apply pending migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Run the campaign service (campaigns, the packet pool, the grab). Needs RP_DATABASE_URL,
    /// RP_REDIS_URL and RP_WORKER_ID; listens on RP_LISTEN (default 127.0.0.1:8081).
    Campaign {
        /// Apply pending migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Run the saga worker (hand-off relay, grab / funding / refund sagas, sweeper). Needs
    /// RP_DATABASE_URL, RP_REDIS_URL, RP_AMQP_URL, RP_CAMPAIGN_URL, RP_WALLET_URL and
    /// RP_WORKER_ID; listens on RP_LISTEN (default 127.0.0.1:8083).
    SagaWorker {
        /// Apply pending migrations before serving.
        #[arg(long)]
        migrate: bool,
    },
    /// Run the public gateway (OpenAPI at /openapi.json, Swagger UI at /docs). Needs
    /// RP_CAMPAIGN_URL, RP_WALLET_URL, RP_SAGA_URL and RP_AUTH_SECRET; listens on RP_LISTEN
    /// (default 127.0.0.1:8080).
    Gateway,
    /// Print a bearer token for the gateway.
    ///
    /// Signed with RP_AUTH_SECRET when set, else with the secret `redpacket dev` keeps in
    /// `--data-dir`, so a token minted either way works against a gateway using that secret.
    Token {
        /// `user`, `merchant` or `operator`.
        #[arg(long)]
        role: redpacket_common::auth::Role,
        /// The user's or merchant's id (letters, digits, `-`, `_`; at most 64).
        #[arg(long)]
        sub: String,
        /// Lifetime: `30s`, `15m`, `12h`, `7d` (at most 366d).
        #[arg(long, default_value = "24h", value_parser = redpacket_common::auth::parse_ttl)]
        ttl: std::time::Duration,
        /// Where `redpacket dev` keeps its secret (used when RP_AUTH_SECRET is not set).
        #[arg(long, default_value = ".redpacket")]
        data_dir: PathBuf,
    },
    /// Print the public API's OpenAPI spec (what `openapi.json` holds).
    Openapi,
    /// Apply, revert or list the schema migrations on RP_DATABASE_URL.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
}

#[derive(Debug, Subcommand)]
enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert applied migrations, the newest first (one unless told otherwise).
    Down {
        /// How many to revert.
        #[arg(long, default_value_t = 1, conflicts_with = "all")]
        steps: u32,
        /// Revert all of them.
        #[arg(long)]
        all: bool,
    },
    /// List every migration with whether it is applied.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut source = ConfigSource::load()?;
    if matches!(cli.command, Command::Dev { .. }) && !source.is_set("RP_LOG") {
        // One terminal shows every service: keep it to warnings so the welcome stays readable.
        source.set("RP_LOG", "warn");
    }
    init_tracing(&LogConfig::from_source(&source)?);
    match cli.command {
        Command::Dev { listen, data_dir } => {
            embedded::run(&source, listen, &data_dir, shutdown_signal()).await
        }
        Command::Demo {
            gateway,
            users,
            packets,
            data_dir,
        } => {
            let key = signing_key(&source, &data_dir)?;
            let packets = packets.unwrap_or(users);
            let options = demo::DemoOptions {
                users,
                packets,
                // Two yuan a packet on average.
                total_amount: i64::from(packets) * 200,
            };
            demo::demo(&demo::Api::new(&gateway, key)?, &options).await
        }
        Command::Reconcile {
            gateway,
            json,
            repair,
            limit,
            min_age_ms,
            data_dir,
        } => {
            let key = signing_key(&source, &data_dir)?;
            let api = demo::Api::new(&gateway, key)?;
            let repaired = if repair {
                Some(api.repair(limit, min_age_ms, REPAIR_CALLS).await?)
            } else {
                None
            };
            let mut result = api.reconciliation().await?;
            if repaired.as_ref().is_some_and(|r| !r.findings.is_empty()) {
                // The sagas a repair re-drove finish on their own, within moments: the verdict
                // waits for them, for a bounded time.
                let started = std::time::Instant::now();
                while result["ok"].as_bool() != Some(true) && started.elapsed() < REPAIR_SETTLE {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    result = api.reconciliation().await?;
                }
            }
            if json {
                let out = match &repaired {
                    Some(repaired) => serde_json::json!({
                        "repair": {
                            "findings": repaired.findings,
                            "unrepaired": repaired.unrepaired(),
                            "more": repaired.more,
                        },
                        "reconciliation": result,
                    }),
                    None => result.clone(),
                };
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                if let Some(repaired) = &repaired {
                    println!("repair:");
                    demo::print_findings(repaired);
                    println!("reconciliation:");
                }
                demo::print_checks(&result);
            }
            if let Some(repaired) = &repaired {
                let left = repaired.unrepaired();
                if left > 0 || repaired.more {
                    anyhow::bail!(
                        "{left} finding(s) left unrepaired{}",
                        if repaired.more {
                            ", and more to look at"
                        } else {
                            ""
                        }
                    );
                }
            }
            if result["ok"].as_bool() != Some(true) {
                anyhow::bail!("an invariant is broken");
            }
            Ok(())
        }
        Command::Replay {
            gateway,
            campaign,
            reason,
            all,
            most,
            data_dir,
        } => {
            if campaign.is_none() && reason.is_none() && !all {
                anyhow::bail!(
                    "name --campaign or --reason, or pass --all to replay every dead letter"
                );
            }
            let key = signing_key(&source, &data_dir)?;
            let most = usize::try_from(most).unwrap_or(usize::MAX);
            let filter = serde_json::json!({
                "campaign_id": campaign, "reason": reason, "all": all,
                "limit": most.min(500),
            });
            let outcomes = demo::Api::new(&gateway, key)?.replay(filter, most).await?;
            let mut failed = 0;
            for outcome in &outcomes {
                println!(
                    "{} {} {} {}",
                    outcome["id"].as_str().unwrap_or("?"),
                    outcome["saga_id"].as_str().unwrap_or("?"),
                    outcome["outcome"].as_str().unwrap_or("?"),
                    outcome["detail"].as_str().unwrap_or("")
                );
                if matches!(outcome["outcome"].as_str(), Some("failed" | "unreadable")) {
                    failed += 1;
                }
            }
            println!(
                "{} dead letters taken, {failed} not replayed",
                outcomes.len()
            );
            if failed > 0 {
                anyhow::bail!("{failed} dead letters could not be replayed");
            }
            Ok(())
        }
        Command::Wallet { migrate } => {
            let config = redpacket_wallet::WalletConfig::from_source(&source)?;
            let app = redpacket_wallet::Application::build(&config).await?;
            if migrate {
                Migrator::up(app.db(), None)
                    .await
                    .context("applying migrations")?;
            }
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Campaign { migrate } => {
            let config = redpacket_campaign::CampaignConfig::from_source(&source)?;
            let app = redpacket_campaign::Application::build(&config).await?;
            if migrate {
                Migrator::up(app.service().store().db(), None)
                    .await
                    .context("applying migrations")?;
            }
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::SagaWorker { migrate } => {
            let config = redpacket_saga_worker::SagaConfig::from_source(&source)?;
            if migrate {
                let db = redpacket_common::db::connect(config.database_url.expose(), 2).await?;
                Migrator::up(&db, None)
                    .await
                    .context("applying migrations")?;
            }
            let app = redpacket_saga_worker::Application::build(config, Default::default()).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Gateway => {
            let config = redpacket_gateway::GatewayConfig::from_source(&source)?;
            let app = redpacket_gateway::Application::build(&config).await?;
            app.run_until_stopped(shutdown_signal()).await
        }
        Command::Token {
            role,
            sub,
            ttl,
            data_dir,
        } => {
            let secret = redpacket_common::auth::secret_or_generated(&source, &data_dir)?;
            let token =
                redpacket_common::auth::TokenKey::new(secret.expose()).mint(role, &sub, ttl)?;
            println!("{token}");
            Ok(())
        }
        Command::Openapi => {
            print!("{}", redpacket_gateway::spec_json());
            Ok(())
        }
        Command::Migrate { action } => migrate(&source, action).await,
    }
}

async fn migrate(source: &ConfigSource, action: MigrateAction) -> anyhow::Result<()> {
    let url = source.required_secret("RP_DATABASE_URL")?;
    let db = redpacket_common::db::connect(url.expose(), 2)
        .await
        .context("cannot connect to RP_DATABASE_URL")?;
    match action {
        MigrateAction::Up => Migrator::up(&db, None).await?,
        MigrateAction::Down { all: true, .. } => Migrator::down(&db, None).await?,
        MigrateAction::Down { steps, .. } => Migrator::down(&db, Some(steps)).await?,
        MigrateAction::Status => {
            for migration in Migrator::get_migration_with_status(&db).await? {
                println!("{:<8} {}", migration.status(), migration.name());
            }
        }
    }
    Ok(())
}

/// The token key: RP_AUTH_SECRET, else the secret kept in the data directory.
fn signing_key(
    source: &ConfigSource,
    data_dir: &std::path::Path,
) -> anyhow::Result<redpacket_common::auth::TokenKey> {
    let secret = redpacket_common::auth::secret_or_generated(source, data_dir)?;
    Ok(redpacket_common::auth::TokenKey::new(secret.expose()))
}
