//! The gateway: the only public entry. It authenticates bearer tokens, applies rate limits and
//! a bound on requests in flight, and relays to the campaign, wallet and saga services through
//! a circuit breaker per upstream, degrading (fast 503s, stale statistics) when one fails.

pub mod api;
pub mod breaker;
pub mod cache;
pub mod dto;
pub mod error;
pub mod limits;
pub mod payload;
pub mod reconcile;
pub mod repair;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::client::legacy::connect::HttpConnector;
use poem::{Endpoint, EndpointExt, IntoResponse, Route};
use poem_openapi::OpenApiService;
use redpacket_common::auth::{TokenKey, VerifiedTokens};
use redpacket_common::front::{ConnectionLimits, Loops};
use redpacket_common::http::{BoundListener, Readiness, service_endpoint};
use redpacket_common::telemetry::Metrics;
use redpacket_common::{ConfigError, ConfigSource, Problem, Secret};
use tokio::sync::Semaphore;

pub use api::PublicApi;
use breaker::BreakerConfig;
use limits::{LimitConfig, Limits};
use upstream::{BreakerMetrics, Upstream};

/// The deadline of each kind of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `RP_TIMEOUT_GRAB_MS` (default 2,000): the grab, the hot path.
    pub grab: Duration,
    /// `RP_TIMEOUT_READ_MS` (default 5,000): reads.
    pub read: Duration,
    /// `RP_TIMEOUT_WRITE_MS` (default 15,000): top-ups, cancels, replays, reconciliation.
    pub write: Duration,
    /// `RP_TIMEOUT_CREATE_MS` (default 120,000): campaign creation (splits and stores up to
    /// 10,000,000 packets).
    pub create: Duration,
}

impl Timeouts {
    fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let millis = |var: &str, default: u64| -> Result<Duration, ConfigError> {
            let value: u64 = source.or(var, default)?;
            if !(1..=600_000).contains(&value) {
                return Err(ConfigError::Malformed {
                    var: var.to_owned(),
                    shown: format!(" `{value}`"),
                    reason: "must be between 1 and 600000 milliseconds".into(),
                });
            }
            Ok(Duration::from_millis(value))
        };
        Ok(Timeouts {
            grab: millis("RP_TIMEOUT_GRAB_MS", 2_000)?,
            read: millis("RP_TIMEOUT_READ_MS", 5_000)?,
            write: millis("RP_TIMEOUT_WRITE_MS", 15_000)?,
            create: millis("RP_TIMEOUT_CREATE_MS", 120_000)?,
        })
    }
}

/// The gateway's settings; only what it uses.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `RP_LISTEN` (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// `RP_CAMPAIGN_URL` (required).
    pub campaign_url: String,
    /// `RP_WALLET_URL` (required).
    pub wallet_url: String,
    /// `RP_SAGA_URL` (required): the saga worker's internal API.
    pub saga_url: String,
    /// `RP_AUTH_SECRET` (required, at least 32 bytes): signs and verifies bearer tokens.
    pub auth_secret: Secret<Vec<u8>>,
    /// `RP_MAX_IN_FLIGHT` (default 4,096, 1-1,000,000): requests served at once; beyond it,
    /// 503 `overloaded` with Retry-After instead of an unbounded queue.
    pub max_in_flight: u32,
    /// `RP_CURRENCY` (default `CNY`): the currency shown for a wallet never used.
    pub currency: String,
    pub limits: LimitConfig,
    pub breaker: BreakerConfig,
    pub timeouts: Timeouts,
    /// `RP_HTTP_THREADS` (default: one per core; 0 for the shared runtime): the event loops
    /// that drive connections (see [`Loops`]).
    pub loops: Loops,
    /// `RP_MAX_CONNECTIONS` (default 10,000), `RP_HEAD_TIMEOUT_MS` (default 30,000) and
    /// `RP_KEEP_ALIVE_TIMEOUT_MS` (default 75,000): the bound on open connections and how long
    /// a request head and an idle keep-alive connection may take (see [`ConnectionLimits`]).
    pub connections: ConnectionLimits,
}

impl GatewayConfig {
    pub fn from_source(source: &ConfigSource) -> Result<Self, ConfigError> {
        let max_in_flight: u32 = source.or("RP_MAX_IN_FLIGHT", 4096)?;
        if !(1..=1_000_000).contains(&max_in_flight) {
            return Err(ConfigError::Malformed {
                var: "RP_MAX_IN_FLIGHT".into(),
                shown: format!(" `{max_in_flight}`"),
                reason: "must be between 1 and 1000000".into(),
            });
        }
        let url = |var: &str| -> Result<String, ConfigError> {
            let value: String = source.required(var)?;
            // The internal APIs are plain HTTP inside the cluster; TLS ends at the gateway.
            if !value.starts_with("http://") {
                return Err(ConfigError::Malformed {
                    var: var.to_owned(),
                    shown: format!(" `{value}`"),
                    reason: "must be an http:// URL (the internal APIs speak plain HTTP)".into(),
                });
            }
            Ok(value)
        };
        Ok(GatewayConfig {
            listen: source.or("RP_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            campaign_url: url("RP_CAMPAIGN_URL")?,
            wallet_url: url("RP_WALLET_URL")?,
            saga_url: url("RP_SAGA_URL")?,
            auth_secret: redpacket_common::auth::required_secret(source)?,
            max_in_flight,
            currency: source.or("RP_CURRENCY", "CNY".to_owned())?,
            limits: LimitConfig::from_source(source)?,
            loops: Loops::from_source(source, Loops::per_core())?,
            connections: ConnectionLimits::from_source(source)?,
            breaker: BreakerConfig::from_source(source)?,
            timeouts: Timeouts::from_source(source)?,
        })
    }
}

/// Verified tokens remembered per replica: enough for a crowd of 100,000 users tapping at
/// once, about 25 MB at most.
pub const VERIFIED_TOKENS: usize = 100_000;

/// Everything a request needs, shared.
#[derive(Debug)]
pub struct Gateway {
    pub key: TokenKey,
    /// Tokens verified recently (at most [`VERIFIED_TOKENS`]).
    pub tokens: VerifiedTokens,
    pub limits: Limits,
    pub campaign: Upstream,
    pub wallet: Upstream,
    pub saga: Upstream,
    pub cache: cache::Cache,
    pub timeouts: Timeouts,
    pub currency: String,
    in_flight: Semaphore,
    /// One operator repair at a time per replica.
    pub repair_gate: Semaphore,
}

impl Gateway {
    pub fn new(config: &GatewayConfig, metrics: &Metrics) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector);
        let breaker_metrics = BreakerMetrics::new(metrics);
        let upstream = |name, url: &str| {
            Upstream::new(
                name,
                url,
                client.clone(),
                config.breaker,
                breaker_metrics.clone(),
            )
        };
        Ok(Gateway {
            key: TokenKey::new(config.auth_secret.expose()),
            tokens: VerifiedTokens::new(VERIFIED_TOKENS),
            limits: Limits::new(config.limits),
            campaign: upstream("campaign", &config.campaign_url)?,
            wallet: upstream("wallet", &config.wallet_url)?,
            saga: upstream("saga", &config.saga_url)?,
            cache: cache::Cache::default(),
            timeouts: config.timeouts,
            currency: config.currency.clone(),
            in_flight: Semaphore::new(config.max_in_flight as usize),
            repair_gate: Semaphore::new(1),
        })
    }

    /// What every `/v1` request passes first: the global token bucket, then the bound on
    /// requests in flight (held until the permit drops). Refusals are immediate, never queued.
    pub fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, error::GatewayError> {
        self.limits
            .global
            .check(Instant::now())
            .map_err(|wait| crate::error::rate_limited("global", wait))?;
        self.in_flight.try_acquire().map_err(|_| {
            Problem::unavailable(
                "overloaded",
                "the gateway is at its bound of requests in flight; retry shortly",
            )
            .into()
        })
    }

    pub fn upstreams(&self) -> impl Iterator<Item = &Upstream> {
        [&self.campaign, &self.wallet, &self.saga].into_iter()
    }
}

/// The spec's introduction, with every stable error code.
const API_DESCRIPTION: &str = "Merchants fund campaigns split into packets; users grab them; \
the money reaches their wallets through a saga. Amounts are integers in minor units with an \
ISO 4217 currency; ids are strings; times are RFC 3339. Authenticate with \
`Authorization: Bearer <token>` (HS256 JWT with `sub`, `role` and `exp`); a merchant's id and \
a user's id are the subject of their token.

Every error is `application/problem+json` with a stable `code` (and `field` when one input is \
at fault). The codes:

| status | codes |
|---|---|
| 400 | `malformed_json`, `unknown_field`, `missing_field`, `invalid_field`, `invalid_body`, \
`invalid_parameter`, `invalid_cursor`, `invalid_idempotency_key` |
| 401 | `unauthorized` (no token), `invalid_token` (malformed, expired, badly signed, not HS256) |
| 403 | `forbidden_role` |
| 404 | `campaign_not_found`, `claim_not_found`, `saga_not_found`, `dead_letter_not_found`, \
`not_found` (no such route) |
| 409 | `limit_reached` (with the caller's `claims`), `campaign_not_started`, \
`campaign_not_funded`, `campaign_rejected`, `already_started`, `wrong_state`, \
`idempotency_key_reused`, `transfer_conflict` |
| 410 | `sold_out`, `campaign_ended`, `campaign_cancelled` |
| 413 | `payload_too_large` |
| 422 | `invalid_field`, `impossible_split`, `invalid_amount`, `unknown_currency`, \
`currency_mismatch`, `insufficient_funds`, `invalid_account`, `unreadable_message` |
| 429 | `rate_limited` (with the `limit`: `global`, `per-user` or `per-campaign`) |
| 500 | `internal` |
| 503 | `upstream_unavailable`, `overloaded` (the gateway's bound on requests in flight, or a \
service whose database connections are all taken), `database_unavailable`, `pool_unavailable`, \
`broker_unavailable` |
| 504 | `upstream_timeout` |

429 and 503 carry `Retry-After`. Every response carries `X-Request-Id` (the client's, when it \
sent a sane one), which follows the request into every service and the saga's messages.";

/// The public API's spec, as served at `/openapi.json` and committed as `openapi.json`.
pub fn api_service(gateway: Arc<Gateway>) -> OpenApiService<PublicApi, ()> {
    OpenApiService::new(
        PublicApi::new(gateway),
        "Red packets",
        env!("CARGO_PKG_VERSION"),
    )
    .description(API_DESCRIPTION)
}

/// The spec as pretty JSON (what `openapi.json` at the repository root holds).
pub fn spec_json() -> String {
    let config = GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        campaign_url: "http://127.0.0.1:1".into(),
        wallet_url: "http://127.0.0.1:1".into(),
        saga_url: "http://127.0.0.1:1".into(),
        auth_secret: Secret::new(vec![0; 32]),
        max_in_flight: 1,
        currency: "CNY".into(),
        limits: LimitConfig::DEFAULT,
        loops: Loops::Shared,
        connections: ConnectionLimits::default(),
        breaker: BreakerConfig::default(),
        timeouts: Timeouts {
            grab: Duration::from_secs(1),
            read: Duration::from_secs(1),
            write: Duration::from_secs(1),
            create: Duration::from_secs(1),
        },
    };
    let metrics = Metrics::new("gateway");
    let gateway = Gateway::new(&config, &metrics).expect("an HTTP client builds");
    let mut spec = api_service(Arc::new(gateway)).spec();
    spec.push('\n');
    spec
}

struct Ready {
    gateway: Arc<Gateway>,
}

impl Readiness for Ready {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>> {
        Box::pin(async move {
            let open: Vec<&str> = self
                .gateway
                .upstreams()
                .filter(|upstream| upstream.is_open())
                .map(|upstream| upstream.name())
                .collect();
            if open.is_empty() {
                Ok(String::new())
            } else {
                Err(format!("circuit open for: {}", open.join(", ")))
            }
        })
    }
}

/// The gateway's routes: the API, `/openapi.json`, Swagger UI at `/docs`, health and
/// metrics; the global rate limit and the in-flight bound in front of everything under `/v1`.
pub fn endpoint(gateway: Arc<Gateway>, metrics: Metrics) -> impl Endpoint + 'static {
    let api = api_service(gateway.clone());
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    let guard = gateway.clone();
    let api = api.data(gateway.clone()).around(move |endpoint, request| {
        let gateway = guard.clone();
        async move {
            let _permit = match gateway.admit() {
                Ok(permit) => permit,
                Err(refused) => return Ok(refused.into_response()),
            };
            endpoint
                .call(request)
                .await
                .map(IntoResponse::into_response)
        }
    });
    let route = Route::new()
        .at("/openapi.json", spec)
        .nest("/docs", docs)
        .nest("/", api);
    service_endpoint(route, metrics, Arc::new(Ready { gateway })).boxed()
}

/// A built, bound gateway.
pub struct Application {
    listener: BoundListener,
    gateway: Arc<Gateway>,
    metrics: Metrics,
    loops: Loops,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Application {
    pub async fn build(config: &GatewayConfig) -> anyhow::Result<Self> {
        let metrics = Metrics::new("gateway");
        let gateway = Arc::new(Gateway::new(config, &metrics)?);
        let listener = BoundListener::bind(config.listen)
            .await?
            .with_limits(config.connections);
        Ok(Application {
            listener,
            gateway,
            metrics,
            loops: config.loops,
        })
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().port()
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr(), "gateway listening");
        let hot = api::HotGrab {
            gateway: self.gateway.clone(),
        };
        self.listener
            .serve_with_hot_route(
                endpoint(self.gateway, self.metrics.clone()),
                hot,
                self.metrics,
                self.loops,
                shutdown,
            )
            .await
    }
}
