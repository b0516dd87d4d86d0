//! The saga worker: relays the grab hand-off and the campaign outbox into RabbitMQ, and drives
//! the grab, funding and refund sagas with retries, compensation, dead letters and a sweeper.
//!
//! [`Application::build`] connects to its database, Redis and RabbitMQ and binds its internal
//! API; [`Application::run_until_stopped`] runs the relays, the consumer, the sweeper and the API
//! until the shutdown future resolves, then drains the messages in flight.

pub mod api;
pub mod batcher;
pub mod broker;
pub mod bus;
pub mod clients;
pub mod engine;
pub mod entity;
pub mod grabs;
pub mod relay;
#[cfg(feature = "simulation")]
pub mod simulation;
pub mod store;
pub mod sweeper;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use poem::{EndpointExt, Route};
use poem_openapi::OpenApiService;
use redpacket_common::http::{BoundListener, Readiness, service_endpoint};
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::lease::LeaseManager;
use redpacket_common::redis_settings::Durability;
use redpacket_common::telemetry::Metrics;
use redpacket_common::{ConfigError, ConfigSource, Secret};
use tokio_util::sync::CancellationToken;

use crate::batcher::CreditBatcher;
use crate::broker::Broker;
use crate::bus::Bus;
use crate::clients::{CampaignClient, WalletApi, WalletClient};
use crate::engine::Engine;
use crate::store::SagaStore;
use crate::worker::WorkerStats;

/// The saga worker's settings; only what it uses.
#[derive(Debug, Clone)]
pub struct SagaConfig {
    /// `RP_DATABASE_URL` (required): the saga worker's own database.
    pub database_url: Secret<String>,
    /// `RP_REDIS_URL` (required): leases and the hand-off streams.
    pub redis_url: Secret<String>,
    /// `RP_AMQP_URL` (required).
    pub amqp_url: Secret<String>,
    /// `RP_CAMPAIGN_URL` (required): the campaign service's internal API.
    pub campaign_url: String,
    /// `RP_WALLET_URL` (required): the wallet's internal API.
    pub wallet_url: String,
    /// `RP_WORKER_ID` (required): 0-1023, unique per running process.
    pub worker_id: u32,
    /// `RP_LISTEN` (default `127.0.0.1:8083`).
    pub listen: SocketAddr,
    /// `RP_REDIS_PREFIX` (default `rp`): must match the campaign service's.
    pub redis_prefix: String,
    /// `RP_AMQP_PREFIX` (default `rp`): prefix of the exchange and queues.
    pub amqp_prefix: String,
    /// `RP_SAGA_PREFETCH` (default 1000): sagas delivered and not yet settled per consumer,
    /// room for two grab batches of 500 in flight. The hand-off's grabs travel
    /// `relay::GRABS_PER_MESSAGE` (10) to a message, so the broker channel's own prefetch, which
    /// counts messages, is this divided by 10.
    pub prefetch: u16,
    /// `RP_SAGA_CREDIT_BATCH` (default 500): grab sagas (and credits) driven per batch; 1
    /// turns batching off (every saga on its own, one transfer per credit).
    pub credit_batch: usize,
    /// `RP_SAGA_CREDIT_LINGER_MS` (default 5): the longest a grab or credit waits for its batch.
    pub credit_linger: Duration,
    /// `RP_SAGA_LEASE_TTL_MS` (default 10000): an executor's lease on a saga.
    pub lease_ttl: Duration,
    /// `RP_SAGA_RETRY_BASE_MS` (default 200): the first retry delay; each next one doubles, up
    /// to the last retry level's, which then repeats.
    pub retry_base: Duration,
    /// `RP_SAGA_RETRY_BUDGET_MS` (default 600000, ten minutes): how long a saga's message keeps
    /// being retried before it is dead-lettered; long enough to ride out an outage of a
    /// service, the broker or a database lasting that long.
    pub retry_budget: Duration,
    /// `RP_SAGA_WAIT_MAX_MS` (default 1800000, thirty minutes; at least the retry budget): how
    /// long a saga may wait on another (a refund on its funding or on claims in flight) before
    /// it is `stuck` with the reason, in the dead letters for an operator.
    pub wait_max: Duration,
    /// `RP_DB_MAX_CONNECTIONS` (default 16).
    pub db_max_connections: u32,
}

impl SagaConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let worker_id = source.worker_id()?;
        let credit_batch: usize = source.or("RP_SAGA_CREDIT_BATCH", 500)?;
        if !(1..=batcher::MAX_BATCH).contains(&credit_batch) {
            return Err(ConfigError::Malformed {
                var: "RP_SAGA_CREDIT_BATCH".into(),
                shown: format!(" `{credit_batch}`"),
                reason: format!("must be between 1 and {}", batcher::MAX_BATCH),
            });
        }
        let linger_ms: u64 = source.or("RP_SAGA_CREDIT_LINGER_MS", 5)?;
        if linger_ms > 1000 {
            return Err(ConfigError::Malformed {
                var: "RP_SAGA_CREDIT_LINGER_MS".into(),
                shown: format!(" `{linger_ms}`"),
                reason: "must be at most 1000".into(),
            });
        }
        let retry_budget_ms: u64 = source.or("RP_SAGA_RETRY_BUDGET_MS", 600_000)?;
        if !(1_000..=MAX_RETRY_BUDGET_MS).contains(&retry_budget_ms) {
            return Err(ConfigError::Malformed {
                var: "RP_SAGA_RETRY_BUDGET_MS".into(),
                shown: format!(" `{retry_budget_ms}`"),
                reason: format!("must be between 1000 and {MAX_RETRY_BUDGET_MS}"),
            });
        }
        let wait_max_ms: u64 = source.or("RP_SAGA_WAIT_MAX_MS", 1_800_000)?;
        if !(retry_budget_ms..=MAX_RETRY_BUDGET_MS).contains(&wait_max_ms) {
            return Err(ConfigError::Malformed {
                var: "RP_SAGA_WAIT_MAX_MS".into(),
                shown: format!(" `{wait_max_ms}`"),
                reason: format!(
                    "must be between RP_SAGA_RETRY_BUDGET_MS ({retry_budget_ms}) and {MAX_RETRY_BUDGET_MS}: a saga waiting on another must outlast that one's retries"
                ),
            });
        }
        Ok(SagaConfig {
            database_url: source.required_secret("RP_DATABASE_URL")?,
            redis_url: source.required_secret("RP_REDIS_URL")?,
            amqp_url: source.required_secret("RP_AMQP_URL")?,
            campaign_url: source.required("RP_CAMPAIGN_URL")?,
            wallet_url: source.required("RP_WALLET_URL")?,
            worker_id,
            listen: source.or("RP_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8083)))?,
            redis_prefix: source.or("RP_REDIS_PREFIX", "rp".to_owned())?,
            amqp_prefix: source.or("RP_AMQP_PREFIX", "rp".to_owned())?,
            prefetch: source.or("RP_SAGA_PREFETCH", 1000)?,
            credit_batch,
            credit_linger: Duration::from_millis(linger_ms),
            retry_base: Duration::from_millis(source.or("RP_SAGA_RETRY_BASE_MS", 200)?),
            retry_budget: Duration::from_millis(retry_budget_ms),
            wait_max: Duration::from_millis(wait_max_ms),
            lease_ttl: Duration::from_millis(source.or("RP_SAGA_LEASE_TTL_MS", 10_000)?),
            db_max_connections: source.or(
                "RP_DB_MAX_CONNECTIONS",
                redpacket_common::db::DEFAULT_MAX_CONNECTIONS,
            )?,
        })
    }
}

/// The longest retry budget or wait bound: a day.
pub const MAX_RETRY_BUDGET_MS: u64 = 24 * 3600 * 1000;
/// The embedded mode's retry budget and wait bound: the distributed defaults.
const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(600);
const DEFAULT_WAIT_MAX: Duration = Duration::from_secs(1800);

/// Switches for tests that play failures.
#[derive(Debug, Clone, Default)]
pub struct TestSwitches {
    /// The relay publishes every hand-off entry twice.
    pub duplicate_every_message: bool,
}

struct Ready {
    store: SagaStore,
    redis: Option<redis::aio::ConnectionManager>,
}

impl Readiness for Ready {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            self.store
                .db()
                .ping()
                .await
                .map_err(|err| format!("database: {err}"))?;
            match &self.redis {
                Some(redis) => Durability::check(&mut redis.clone())
                    .await
                    .map(|detail| format!("redis: {detail}")),
                None => Ok(String::new()),
            }
        })
    }
}

/// What an embedded saga worker needs: its database, the local bus, the other services.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// The saga worker's own (SQLite) database, migrated.
    pub db: sea_orm::DatabaseConnection,
    /// The durable local queue (in the campaign database, where the grab appends its hand-off).
    pub bus: bus::LocalBus,
    pub campaign_url: String,
    pub wallet_url: String,
    pub worker_id: u32,
    pub listen: SocketAddr,
}

/// A built saga worker.
pub struct Application {
    listener: BoundListener,
    engine: Engine,
    /// The campaign service's outbox, which the outbox relay moves to the bus.
    outbox: CampaignClient,
    bus: Arc<dyn Bus>,
    broker: Option<Broker>,
    /// The hand-off streams live in Redis in the distributed system; the embedded grab
    /// publishes to the local bus itself.
    redis: Option<redis::aio::ConnectionManager>,
    ids: Arc<SnowflakeGenerator>,
    prefix: String,
    prefetch: u16,
    switches: TestSwitches,
    pub stats: Arc<WorkerStats>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// The engine's tuning: credit batching and saga leases.
struct Tuning {
    credit_batch: usize,
    credit_linger: Duration,
    lease_ttl: Duration,
    retry_budget: Duration,
    wait_max: Duration,
}

fn engine(
    db: sea_orm::DatabaseConnection,
    campaign_url: &str,
    wallet_url: &str,
    leases: LeaseManager,
    lease_prefix: &str,
    tuning: Tuning,
) -> anyhow::Result<(Engine, CampaignClient)> {
    let Tuning {
        credit_batch,
        credit_linger,
        lease_ttl,
        retry_budget,
        wait_max,
    } = tuning;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        // Below the services' keep-alive time (`front::KEEP_ALIVE_TIMEOUT`, 75 s): the client
        // drops an idle connection before the server closes it under a request.
        .pool_idle_timeout(Duration::from_secs(60))
        .build()?;
    let wallet: Arc<dyn WalletApi> = Arc::new(WalletClient::new(http.clone(), wallet_url));
    let campaign = CampaignClient::new(http, campaign_url);
    let engine = Engine {
        store: SagaStore::new(db),
        campaign: Arc::new(campaign.clone()),
        batcher: CreditBatcher::start(wallet.clone(), credit_batch, credit_linger),
        wallet,
        leases,
        lease_prefix: lease_prefix.to_owned(),
        lease_ttl,
        batch: credit_batch,
        linger: credit_linger,
        retry_budget,
        wait_max,
    };
    Ok((engine, campaign))
}

impl Application {
    /// Connects to the database, Redis and RabbitMQ, declares the topology and binds the API.
    pub async fn build(config: SagaConfig, switches: TestSwitches) -> anyhow::Result<Self> {
        let db =
            redpacket_common::db::connect(config.database_url.expose(), config.db_max_connections)
                .await
                .map_err(|err| anyhow::anyhow!("cannot connect to RP_DATABASE_URL: {err}"))?;
        let redis = redis::Client::open(config.redis_url.expose().as_str())?
            .get_connection_manager()
            .await
            .map_err(|err| anyhow::anyhow!("cannot connect to RP_REDIS_URL: {err}"))?;
        // Leases and the hand-off streams must not be evicted.
        Durability::check(&mut redis.clone())
            .await
            .map_err(|reason| anyhow::anyhow!("RP_REDIS_URL: {reason}"))?;
        let broker = Broker::connect(
            config.amqp_url.expose(),
            &config.amqp_prefix,
            config.retry_base,
        )
        .await
        .map_err(|err| anyhow::anyhow!("cannot connect to RP_AMQP_URL: {err}"))?;
        let leases = LeaseManager::with_fence_key(
            redis.clone(),
            &format!("{}:lease:fence", config.redis_prefix),
        );
        // Redis may have lost its fencing counter (restarted without persistence, failed over
        // to a replica behind it): grants must still be above every fence the rows hold.
        let highest = SagaStore::new(db.clone())
            .highest_fence()
            .await
            .map_err(|err| anyhow::anyhow!("cannot read the saga rows' fences: {err}"))?;
        leases.raise_floor(u64::try_from(highest).unwrap_or(0));
        let (engine, outbox) = engine(
            db,
            &config.campaign_url,
            &config.wallet_url,
            leases,
            &config.redis_prefix,
            Tuning {
                credit_batch: config.credit_batch,
                credit_linger: config.credit_linger,
                lease_ttl: config.lease_ttl,
                retry_budget: config.retry_budget,
                wait_max: config.wait_max,
            },
        )?;
        let listener = BoundListener::bind(config.listen).await?;
        Ok(Application {
            listener,
            engine,
            outbox,
            bus: Arc::new(broker.clone()),
            broker: Some(broker),
            redis: Some(redis),
            ids: Arc::new(SnowflakeGenerator::new(config.worker_id)?),
            prefix: config.redis_prefix,
            prefetch: u16::try_from(
                usize::from(config.prefetch).div_ceil(relay::GRABS_PER_MESSAGE),
            )
            .unwrap_or(u16::MAX)
            .max(1),
            switches,
            stats: Arc::default(),
        })
    }

    /// The embedded saga worker: the local bus, in-process leases, no Redis, no RabbitMQ.
    pub async fn embedded(config: EmbeddedConfig) -> anyhow::Result<Self> {
        let (engine, outbox) = engine(
            config.db,
            &config.campaign_url,
            &config.wallet_url,
            LeaseManager::local(),
            "local",
            Tuning {
                credit_batch: 500,
                credit_linger: Duration::from_millis(5),
                lease_ttl: Duration::from_secs(10),
                retry_budget: DEFAULT_RETRY_BUDGET,
                wait_max: DEFAULT_WAIT_MAX,
            },
        )?;
        let listener = BoundListener::bind(config.listen).await?;
        Ok(Application {
            listener,
            engine,
            outbox,
            bus: Arc::new(config.bus),
            broker: None,
            redis: None,
            ids: Arc::new(SnowflakeGenerator::new(config.worker_id)?),
            prefix: "local".to_owned(),
            prefetch: 1000,
            switches: TestSwitches::default(),
            stats: Arc::default(),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    /// The RabbitMQ connection, in the distributed system.
    pub fn broker(&self) -> Option<&Broker> {
        self.broker.as_ref()
    }

    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Runs everything until `shutdown` resolves; then stops taking messages and lets the ones
    /// in flight finish (unacknowledged ones return to the queue).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let prefix = self.prefix.clone();
        let tasks = tokio_util::task::TaskTracker::new();
        if let Some(redis) = &self.redis {
            tasks.spawn(relay::relay_handoff(
                redis.clone(),
                self.engine.leases.clone(),
                self.bus.clone(),
                format!("{prefix}:handoff:streams"),
                prefix.clone(),
                self.switches.duplicate_every_message,
                stop.clone(),
            ));
        }
        tasks.spawn(relay::relay_outbox(
            self.outbox.clone(),
            self.engine.leases.clone(),
            self.bus.clone(),
            format!("{prefix}:relay:outbox"),
            stop.clone(),
        ));
        tasks.spawn(worker::consume(
            self.engine.clone(),
            self.bus.clone(),
            self.ids.clone(),
            self.stats.clone(),
            self.prefetch,
            stop.clone(),
        ));
        tasks.spawn(sweeper::run(
            self.engine.store.clone(),
            self.bus.clone(),
            self.engine.leases.clone(),
            format!("{prefix}:saga:sweeper"),
            Duration::from_secs(5),
            sweeper::STALL_AFTER,
            stop.clone(),
        ));
        tasks.close();

        let metrics = Metrics::new("saga-worker");
        register_worker_metrics(&metrics, self.stats.clone());
        let api = OpenApiService::new(
            api::SagaApi::new(self.engine.store.clone(), self.bus.clone()),
            "Red-packet saga worker (internal)",
            env!("CARGO_PKG_VERSION"),
        );
        let spec = api.spec_endpoint();
        let routes = Route::new().at("/openapi.json", spec).nest("/", api);
        let ready = Ready {
            store: self.engine.store.clone(),
            redis: self.redis.clone(),
        };
        let endpoint = service_endpoint(routes, metrics, Arc::new(ready)).boxed();
        tracing::info!(addr = %self.listener.local_addr(), "saga worker listening");
        let served = self.listener.serve(endpoint, shutdown).await;
        stop.cancel();
        tasks.wait().await;
        served
    }
}

/// Exposes the consumer's counters.
fn register_worker_metrics(metrics: &Metrics, stats: Arc<WorkerStats>) {
    let gauge = prometheus_gauge;
    let done = gauge("saga_messages_done", "Saga messages handled to completion");
    let retried = gauge(
        "saga_messages_retried",
        "Saga messages sent to a retry queue",
    );
    let dead = gauge("saga_messages_dead", "Saga messages dead-lettered");
    metrics.register(Box::new(ObservedCounters {
        stats,
        gauges: [done, retried, dead],
    }));
}

fn prometheus_gauge(name: &str, help: &str) -> redpacket_common::telemetry::IntGauge {
    redpacket_common::telemetry::IntGauge::new(name, help)
        .unwrap_or_else(|err| panic!("static metric definition is valid: {err}"))
}

/// Reads the worker's atomic counters at scrape time.
struct ObservedCounters {
    stats: Arc<WorkerStats>,
    gauges: [redpacket_common::telemetry::IntGauge; 3],
}

impl redpacket_common::telemetry::Collector for ObservedCounters {
    fn desc(&self) -> Vec<&redpacket_common::telemetry::Desc> {
        self.gauges.iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<redpacket_common::telemetry::MetricFamily> {
        let values = [
            self.stats.done.load(Ordering::Relaxed),
            self.stats.retried.load(Ordering::Relaxed),
            self.stats.dead.load(Ordering::Relaxed),
        ];
        for (gauge, value) in self.gauges.iter().zip(values) {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.gauges.iter().flat_map(|g| g.collect()).collect()
    }
}
