//! `redpacket dev`: every service in this process, on SQLite files in one data directory, with
//! the in-process packet pool, lease store and message bus. Nothing to install but Rust.
//!
//! | file | holds |
//! |---|---|
//! | `wallet.sqlite` | the ledger |
//! | `campaign.sqlite` | campaigns, claims, the local packet pool and the local message queue (the grab appends its hand-off in the same transaction) |
//! | `saga.sqlite` | saga states and dead letters |
//! | `auth-secret` | the token signing secret, unless `RP_AUTH_SECRET` is set |
//! | `seeded` | written once the demo merchant and campaign exist |

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redpacket_campaign::{CampaignService, LocalPool, Store};
use redpacket_common::ConfigSource;
use redpacket_common::auth::{Role, TokenKey};
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::local_queue::LocalQueue;
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_saga_worker::bus::LocalBus;
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

/// The demo merchant seeded on first start.
pub const DEMO_MERCHANT: &str = "demo-shop";
/// The demo user whose token is printed.
pub const DEMO_USER: &str = "demo-user";
/// The operator whose token is printed.
pub const OPERATOR: &str = "ops";

async fn sqlite(data_dir: &Path, name: &str) -> anyhow::Result<DatabaseConnection> {
    let path = data_dir.join(name);
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = redpacket_common::db::connect(&url, 1)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    Migrator::up(&db, None)
        .await
        .with_context(|| format!("migrating {}", path.display()))?;
    Ok(db)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs the whole system until `shutdown` resolves.
pub async fn run(
    source: &ConfigSource,
    listen: SocketAddr,
    data_dir: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let secret = redpacket_common::auth::secret_or_generated(source, data_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    };

    let wallet_db = sqlite(data_dir, "wallet.sqlite").await?;
    let wallet = redpacket_wallet::Application::with_database(wallet_db, loopback()).await?;
    let wallet_url = format!("http://127.0.0.1:{}", wallet.port());

    let campaign_db = sqlite(data_dir, "campaign.sqlite").await?;
    let pool = LocalPool::open(campaign_db.clone())
        .await
        .context("opening the local packet pool")?;
    let service = CampaignService::new(
        Store::new(campaign_db.clone()),
        Arc::new(pool),
        Arc::new(SnowflakeGenerator::new(1)?),
        1,
    )
    // The floor on a repair's age guards against judging a grant of a Redis pool whose
    // hand-off is still on its way; the local pool records each claim in its grab's own
    // transaction, so no grant is ever on its way and any age is safe.
    .with_repair_min_age(std::time::Duration::ZERO);
    let campaign = redpacket_campaign::Application::with_service(service, loopback()).await?;
    let campaign_url = format!("http://127.0.0.1:{}", campaign.port());

    let saga_db = sqlite(data_dir, "saga.sqlite").await?;
    let queue = LocalQueue::open(campaign_db)
        .await
        .context("opening the local message queue")?;
    let saga =
        redpacket_saga_worker::Application::embedded(redpacket_saga_worker::EmbeddedConfig {
            db: saga_db,
            bus: LocalBus::new(queue, redpacket_saga_worker::broker::DEFAULT_RETRY_BASE),
            campaign_url: campaign_url.clone(),
            wallet_url: wallet_url.clone(),
            worker_id: 2,
            listen: loopback(),
        })
        .await?;
    let saga_url = format!("http://127.0.0.1:{}", saga.port());

    let mut gateway_source = source.clone();
    gateway_source.set("RP_LISTEN", listen.to_string());
    gateway_source.set("RP_CAMPAIGN_URL", campaign_url);
    gateway_source.set("RP_WALLET_URL", wallet_url);
    gateway_source.set("RP_SAGA_URL", saga_url);
    gateway_source.set(
        "RP_AUTH_SECRET",
        String::from_utf8_lossy(secret.expose()).into_owned(),
    );
    let gateway_config = redpacket_gateway::GatewayConfig::from_source(&gateway_source)?;
    let gateway = redpacket_gateway::Application::build(&gateway_config).await?;
    let address = gateway.local_addr();

    let tasks = [
        tokio::spawn(wallet.run_until_stopped(stopped())),
        tokio::spawn(campaign.run_until_stopped(stopped())),
        tokio::spawn(saga.run_until_stopped(stopped())),
        tokio::spawn(gateway.run_until_stopped(stopped())),
    ];

    let key = TokenKey::new(secret.expose());
    let base = format!("http://{address}");
    let seeded = seed_once(&base, &key, data_dir).await;
    print_welcome(
        &base,
        &key,
        data_dir,
        seeded.as_ref().ok().and_then(Clone::clone),
    )?;
    if let Err(err) = seeded {
        eprintln!("warning: the demo data could not be seeded: {err:#}");
    }

    shutdown.await;
    eprintln!("redpacket dev: stopping");
    let _ = stop_tx.send(true);
    for task in tasks {
        task.await.context("a service panicked")??;
    }
    Ok(())
}

/// Tops up the demo merchant and creates a demo campaign opening a few seconds later, once
/// per data directory. Answers the campaign id when seeding happened now.
async fn seed_once(base: &str, key: &TokenKey, data_dir: &Path) -> anyhow::Result<Option<String>> {
    let marker = data_dir.join("seeded");
    if marker.exists() {
        return Ok(None);
    }
    let client = reqwest::Client::new();
    let operator = key.mint(Role::Operator, OPERATOR, Duration::from_secs(300))?;
    let merchant = key.mint(Role::Merchant, DEMO_MERCHANT, Duration::from_secs(300))?;
    let topup = client
        .post(format!("{base}/v1/admin/topups"))
        .bearer_auth(&operator)
        .header("Idempotency-Key", "demo-seed")
        .json(&serde_json::json!({
            "merchant_id": DEMO_MERCHANT, "amount": 10_000_000, "currency": "CNY"
        }))
        .send()
        .await?;
    anyhow::ensure!(
        topup.status().is_success(),
        "top-up answered {}",
        topup.status()
    );
    let starts = chrono::Utc::now() + chrono::Duration::seconds(5);
    let created = client
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&merchant)
        .header("Idempotency-Key", "demo-seed-campaign")
        .json(&serde_json::json!({
            "title": "Welcome packets", "currency": "CNY", "total_amount": 100_000,
            "packet_count": 1000, "split": {"mode": "double_mean"},
            "starts_at": starts.to_rfc3339(),
            "ends_at": (starts + chrono::Duration::days(7)).to_rfc3339(),
        }))
        .send()
        .await?;
    anyhow::ensure!(
        created.status().is_success(),
        "creating the demo campaign answered {}",
        created.status()
    );
    let campaign: serde_json::Value = created.json().await?;
    std::fs::write(&marker, "the demo merchant and campaign exist\n")?;
    Ok(campaign["id"].as_str().map(str::to_owned))
}

fn print_welcome(
    base: &str,
    key: &TokenKey,
    data_dir: &Path,
    campaign: Option<String>,
) -> anyhow::Result<()> {
    let day = Duration::from_secs(24 * 3600);
    let operator = key.mint(Role::Operator, OPERATOR, day)?;
    let merchant = key.mint(Role::Merchant, DEMO_MERCHANT, day)?;
    let user = key.mint(Role::User, DEMO_USER, day)?;
    println!(
        "redpacket dev: the whole system runs at {base} (data in {})",
        data_dir.display()
    );
    println!();
    println!("  API docs (Swagger UI): {base}/docs");
    println!("  OpenAPI spec:          {base}/openapi.json");
    println!();
    println!(
        "  tokens (valid 24 h; `redpacket token --data-dir {}` mints more):",
        data_dir.display()
    );
    println!("    operator ({OPERATOR}):       {operator}");
    println!("    merchant ({DEMO_MERCHANT}): {merchant}");
    println!("    user ({DEMO_USER}):      {user}");
    println!();
    if let Some(id) = campaign {
        println!(
            "  seeded: merchant {DEMO_MERCHANT} with 100,000.00 CNY and campaign {id}, opening in 5 s"
        );
        println!(
            "    grab: curl -s -XPOST {base}/v1/campaigns/{id}/grab -H \"Authorization: Bearer $USER_TOKEN\""
        );
    }
    println!(
        "  next: cargo run --release -p redpacket -- demo --gateway {base} --data-dir {}",
        data_dir.display()
    );
    Ok(())
}
