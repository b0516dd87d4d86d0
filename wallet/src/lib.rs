//! The wallet service: a double-entry ledger behind an internal HTTP API.
//!
//! [`Application::build`] connects to the database and binds the listener (port 0 in tests);
//! [`Application::run_until_stopped`] serves until the shutdown future resolves. The `redpacket
//! wallet` command only parses its configuration and calls these.

pub mod api;
pub mod entity;
pub mod ledger;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use redpacket_common::http::{BoundListener, Readiness, service_endpoint};
use redpacket_common::telemetry::Metrics;
use redpacket_common::{ConfigError, ConfigSource, Secret};
use sea_orm::DatabaseConnection;

pub use api::WalletApi;
pub use ledger::Ledger;

/// The wallet's settings; only what it uses.
#[derive(Debug, Clone)]
pub struct WalletConfig {
    /// `RP_DATABASE_URL` (required): PostgreSQL, MySQL/MariaDB or SQLite.
    pub database_url: Secret<String>,
    /// `RP_LISTEN` (default `127.0.0.1:8082`).
    pub listen: SocketAddr,
    /// `RP_DB_MAX_CONNECTIONS` (default 16).
    pub db_max_connections: u32,
}

impl WalletConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        Ok(WalletConfig {
            database_url: source.required_secret("RP_DATABASE_URL")?,
            listen: source.or("RP_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8082)))?,
            db_max_connections: source.or(
                "RP_DB_MAX_CONNECTIONS",
                redpacket_common::db::DEFAULT_MAX_CONNECTIONS,
            )?,
        })
    }
}

/// The largest body of a transfer batch: 1,000 transfers with metadata (other requests keep
/// the default bound).
pub const BODY_LIMIT_BYTES: usize = 8 * 1024 * 1024;

struct DatabaseReady(DatabaseConnection);

impl Readiness for DatabaseReady {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            self.0
                .ping()
                .await
                .map(|()| String::new())
                .map_err(|err| format!("database: {err}"))
        })
    }
}

/// The wallet's routes: the API, its spec at `/openapi.json`, health and metrics.
pub fn endpoint(db: DatabaseConnection) -> impl Endpoint + 'static {
    let api = OpenApiService::new(
        WalletApi::new(Ledger::new(db.clone())),
        "Red-packet wallet (internal)",
        env!("CARGO_PKG_VERSION"),
    );
    let spec = api.spec_endpoint();
    let route = Route::new().at("/openapi.json", spec).nest("/", api);
    service_endpoint(route, Metrics::new("wallet"), Arc::new(DatabaseReady(db))).boxed()
}

/// A built, bound wallet, ready to serve.
pub struct Application {
    listener: BoundListener,
    db: DatabaseConnection,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects to the database and binds the listener.
    pub async fn build(config: &WalletConfig) -> anyhow::Result<Self> {
        let db =
            redpacket_common::db::connect(config.database_url.expose(), config.db_max_connections)
                .await
                .map_err(|err| anyhow::anyhow!("cannot connect to RP_DATABASE_URL: {err}"))?;
        Self::with_database(db, config.listen).await
    }

    /// Binds the listener over an existing connection (tests, the embedded mode).
    pub async fn with_database(db: DatabaseConnection, listen: SocketAddr) -> anyhow::Result<Self> {
        let listener = BoundListener::bind(listen).await?;
        Ok(Application { listener, db })
    }

    /// The database connection the wallet serves from.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then drains requests in flight.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr(), "wallet listening");
        self.listener.serve(endpoint(self.db), shutdown).await
    }
}
