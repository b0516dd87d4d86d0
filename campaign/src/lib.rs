//! The campaign service: campaigns split in advance into packets, the packets' pool, and the
//! atomic seckill grab.
//!
//! [`Application::build`] connects to the database and the pool and binds the listener;
//! [`Application::run_until_stopped`] serves and runs the lifecycle loop (loading pools before
//! their start, starting and ending campaigns) until the shutdown future resolves.

pub mod api;
pub mod entity;
pub mod local_pool;
pub mod pool;
pub mod service;
pub mod split;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use redpacket_common::front::Loops;
use redpacket_common::http::{BoundListener, Readiness, service_endpoint};
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::telemetry::Metrics;
use redpacket_common::{ConfigError, ConfigSource, Secret};
use sea_orm::DatabaseConnection;

pub use api::CampaignApi;
pub use local_pool::LocalPool;
pub use pool::{PacketPool, RedisPool};
pub use service::CampaignService;
pub use store::Store;

/// How long before its start a campaign's pool is loaded, so grabs open exactly on time.
pub const LOAD_LEAD_MS: i64 = 60_000;
/// A pool load not finished after this long is taken over by another process.
pub const LOAD_STALE_MS: i64 = 120_000;
/// How often the lifecycle loop looks at live campaigns.
pub const LIFECYCLE_TICK: Duration = Duration::from_millis(250);
/// Buckets per campaign pool unless configured.
pub const DEFAULT_BUCKETS: u32 = 8;
/// The most buckets a campaign may be spread over.
pub const MAX_BUCKETS: u32 = 64;

/// The campaign service's settings; only what it uses.
#[derive(Debug, Clone)]
pub struct CampaignConfig {
    /// `RP_DATABASE_URL` (required).
    pub database_url: Secret<String>,
    /// `RP_REDIS_URL` (required).
    pub redis_url: Secret<String>,
    /// `RP_WORKER_ID` (required): unique per running process, 0-1023; part of every id.
    pub worker_id: u32,
    /// `RP_LISTEN` (default `127.0.0.1:8081`).
    pub listen: SocketAddr,
    /// `RP_REDIS_PREFIX` (default `rp`): the prefix of every Redis key.
    pub redis_prefix: String,
    /// `RP_POOL_BUCKETS` (default 8, at most 64): list keys per campaign pool.
    pub buckets: u32,
    /// `RP_DB_MAX_CONNECTIONS` (default 16).
    pub db_max_connections: u32,
}

impl CampaignConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let buckets: u32 = source.or("RP_POOL_BUCKETS", DEFAULT_BUCKETS)?;
        if !(1..=MAX_BUCKETS).contains(&buckets) {
            return Err(ConfigError::Malformed {
                var: "RP_POOL_BUCKETS".into(),
                shown: format!(" `{buckets}`"),
                reason: format!("must be between 1 and {MAX_BUCKETS}"),
            });
        }
        let worker_id = source.worker_id()?;
        Ok(CampaignConfig {
            database_url: source.required_secret("RP_DATABASE_URL")?,
            redis_url: source.required_secret("RP_REDIS_URL")?,
            worker_id,
            listen: source.or("RP_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8081)))?,
            redis_prefix: source.or("RP_REDIS_PREFIX", "rp".to_owned())?,
            buckets,
            db_max_connections: source.or(
                "RP_DB_MAX_CONNECTIONS",
                redpacket_common::db::DEFAULT_MAX_CONNECTIONS,
            )?,
        })
    }
}

struct Ready {
    db: DatabaseConnection,
    pool: Arc<dyn PacketPool>,
}

impl Readiness for Ready {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            self.db
                .ping()
                .await
                .map_err(|err| format!("database: {err}"))?;
            self.pool
                .ping()
                .await
                .map(|detail| format!("packet pool: {detail}"))
                .map_err(|err| format!("packet pool: {err}"))
        })
    }
}

/// The campaign routes: the API, its spec at `/openapi.json`, health and metrics (the grab is
/// also answered ahead of them, see [`api::HotGrab`]).
pub fn endpoint(service: CampaignService, metrics: Metrics) -> impl Endpoint + 'static {
    let ready = Ready {
        db: service.store().db().clone(),
        pool: service.pool().clone(),
    };
    let api = OpenApiService::new(
        CampaignApi::new(service),
        "Red-packet campaigns (internal)",
        env!("CARGO_PKG_VERSION"),
    );
    let spec = api.spec_endpoint();
    let route = Route::new().at("/openapi.json", spec).nest("/", api);
    service_endpoint(route, metrics, Arc::new(ready)).boxed()
}

/// Runs the lifecycle until `shutdown` resolves: every tick, and at once when woken.
pub async fn run_lifecycle(service: CampaignService, shutdown: impl Future<Output = ()>) {
    let wakeup = service.lifecycle_wakeup();
    tokio::pin!(shutdown);
    loop {
        if let Err(err) = service.lifecycle_tick().await {
            tracing::warn!(error = %err, "lifecycle tick failed");
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(LIFECYCLE_TICK) => {}
            () = wakeup.notified() => {}
        }
    }
}

/// A built, bound campaign service.
pub struct Application {
    listener: BoundListener,
    service: CampaignService,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects to the database and Redis and binds the listener.
    pub async fn build(config: &CampaignConfig) -> anyhow::Result<Self> {
        let db =
            redpacket_common::db::connect(config.database_url.expose(), config.db_max_connections)
                .await
                .map_err(|err| anyhow::anyhow!("cannot connect to RP_DATABASE_URL: {err}"))?;
        let pool = RedisPool::connect(config.redis_url.expose(), &config.redis_prefix)
            .await
            .map_err(|err| anyhow::anyhow!("cannot connect to RP_REDIS_URL: {err}"))?;
        let ids = Arc::new(SnowflakeGenerator::new(config.worker_id)?);
        // The repair's lease lives in the pool's Redis, shared by every replica.
        let leases = redpacket_common::lease::LeaseManager::with_fence_key(
            pool.connection(),
            &format!("{}:lease:fence", config.redis_prefix),
        );
        let service = CampaignService::new(Store::new(db), Arc::new(pool), ids, config.buckets)
            .with_repair_leases(
                leases,
                format!("{}:lease:campaign-repair", config.redis_prefix),
            );
        Self::with_service(service, config.listen).await
    }

    /// Binds the listener over a ready service (tests, the embedded mode).
    pub async fn with_service(
        service: CampaignService,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let listener = BoundListener::bind(listen).await?;
        Ok(Application { listener, service })
    }

    pub fn service(&self) -> &CampaignService {
        &self.service
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves and runs the lifecycle until `shutdown` resolves.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr(), "campaign service listening");
        let (stop_lifecycle, lifecycle_stopped) = tokio::sync::oneshot::channel::<()>();
        let lifecycle = tokio::spawn(run_lifecycle(self.service.clone(), async {
            let _ = lifecycle_stopped.await;
        }));
        let metrics = Metrics::new("campaign");
        let hot = api::HotGrab {
            service: self.service.clone(),
        };
        let served = self
            .listener
            .serve_with_hot_route(
                endpoint(self.service, metrics.clone()),
                hot,
                metrics,
                Loops::Shared,
                shutdown,
            )
            .await;
        let _ = stop_lifecycle.send(());
        let _ = lifecycle.await;
        served
    }
}
