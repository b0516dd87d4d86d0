//! The whole distributed system on the real servers, in this process: wallet, campaign service,
//! saga worker and gateway, each on port 0 with its own databases, Redis prefix and RabbitMQ
//! names; and a fake upstream for the resilience tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use poem::http::StatusCode;
use poem::{EndpointExt, IntoResponse, Response, Route};
use redpacket_campaign::{CampaignService, RedisPool, Store};
use redpacket_common::Secret;
use redpacket_common::auth::{Role, TokenKey};
use redpacket_common::http::BoundListener;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::testing::{Backend, TestDatabase, amqp_url, redis_url};
use redpacket_gateway::GatewayConfig;
use redpacket_gateway::breaker::BreakerConfig;
use redpacket_gateway::limits::{LimitConfig, Rate};
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_saga_worker::{SagaConfig, TestSwitches};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const SECRET: &[u8] = b"test-secret-of-at-least-thirty-two-bytes";

pub fn key() -> TokenKey {
    TokenKey::new(SECRET)
}

pub fn token(role: Role, sub: &str) -> String {
    key().mint(role, sub, Duration::from_secs(600)).unwrap()
}

/// The gateway's settings over the given upstreams, with limits off unless a test sets them.
pub fn gateway_config(campaign: &str, wallet: &str, saga: &str) -> GatewayConfig {
    GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        campaign_url: campaign.to_owned(),
        wallet_url: wallet.to_owned(),
        saga_url: saga.to_owned(),
        auth_secret: Secret::new(SECRET.to_vec()),
        max_in_flight: 1024,
        currency: "CNY".into(),
        limits: LimitConfig {
            global: Rate::OFF,
            user: Rate::OFF,
            campaign: Rate::OFF,
        },
        breaker: BreakerConfig::default(),
        loops: redpacket_common::front::Loops::Threads(2),
        connections: redpacket_common::front::ConnectionLimits::default(),
        timeouts: redpacket_gateway::Timeouts {
            grab: Duration::from_secs(2),
            read: Duration::from_secs(5),
            write: Duration::from_secs(15),
            create: Duration::from_secs(60),
        },
    }
}

/// A running gateway.
pub struct Gateway {
    pub url: String,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Gateway {
    pub async fn start(config: GatewayConfig) -> Gateway {
        redpacket_common::telemetry::install_crypto_provider();
        let app = redpacket_gateway::Application::build(&config)
            .await
            .unwrap();
        let url = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Gateway {
            url,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    /// Sends a request with an optional token and JSON body; answers status, headers, body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (status, _, body) = self
            .send(reqwest::Method::GET, path, Some(token), None)
            .await;
        (status, body)
    }

    pub async fn post(&self, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, _, body) = self
            .send(reqwest::Method::POST, path, Some(token), body)
            .await;
        (status, body)
    }
}

/// Wallet, campaign service and saga worker on the real servers, and a gateway in front.
pub struct System {
    pub gateway: Gateway,
    pub campaign_url: String,
    pub campaigns: CampaignService,
    /// The key prefix of the campaign service's pools and the saga worker's leases.
    pub redis_prefix: String,
    /// The saga worker's tables, for tests that break a saga on purpose.
    pub sagas: redpacket_saga_worker::store::SagaStore,
    stop_campaign: Option<oneshot::Sender<()>>,
    _stops: Vec<oneshot::Sender<()>>,
    _databases: Vec<TestDatabase>,
}

async fn database() -> (TestDatabase, sea_orm::DatabaseConnection) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let db = redpacket_common::db::connect(&database.url, 8)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    (database, db)
}

impl System {
    pub async fn start() -> System {
        Self::start_with(|_| {}).await
    }

    /// Starts everything; `adjust` may change the gateway's settings first.
    pub async fn start_with(adjust: impl FnOnce(&mut GatewayConfig)) -> System {
        redpacket_common::telemetry::install_crypto_provider();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let redis_prefix = format!("rpt:{suffix}");
        let mut stops = Vec::new();
        let mut databases = Vec::new();

        let (wallet_database, wallet_db) = database().await;
        databases.push(wallet_database);
        let wallet =
            redpacket_wallet::Application::with_database(wallet_db, "127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
        let wallet_url = format!("http://127.0.0.1:{}", wallet.port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(wallet.run_until_stopped(async {
            let _ = stopped.await;
        }));
        stops.push(stop);

        let (campaign_database, campaign_db) = database().await;
        databases.push(campaign_database);
        let pool = RedisPool::connect(&redis_url(), &redis_prefix)
            .await
            .unwrap();
        let campaigns = CampaignService::new(
            Store::new(campaign_db),
            Arc::new(pool),
            Arc::new(SnowflakeGenerator::new(rand_id() % 512).unwrap()),
            4,
        )
        // A lost pool is rebuilt a second after its claims went quiet, not a minute.
        .with_rebuild_quiet(Duration::from_secs(1))
        // And a repair may take what is a second old, for the same reason.
        .with_repair_min_age(Duration::from_secs(1));
        let campaign = redpacket_campaign::Application::with_service(
            campaigns.clone(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let campaign_url = format!("http://127.0.0.1:{}", campaign.port());
        let (stop_campaign, stopped) = oneshot::channel::<()>();
        tokio::spawn(campaign.run_until_stopped(async {
            let _ = stopped.await;
        }));

        let (saga_database, saga_db) = database().await;
        let saga_db_url = saga_database.url.clone();
        databases.push(saga_database);
        let config = SagaConfig {
            database_url: Secret::new(saga_db_url),
            redis_url: Secret::new(redis_url()),
            amqp_url: Secret::new(amqp_url()),
            campaign_url: campaign_url.clone(),
            wallet_url: wallet_url.clone(),
            worker_id: 512 + rand_id() % 500,
            listen: "127.0.0.1:0".parse().unwrap(),
            redis_prefix: redis_prefix.clone(),
            amqp_prefix: format!("rpt.{suffix}"),
            prefetch: 256,
            credit_batch: 200,
            credit_linger: Duration::from_millis(5),
            retry_base: Duration::from_millis(20),
            retry_budget: Duration::from_secs(5),
            wait_max: Duration::from_secs(60),
            lease_ttl: Duration::from_millis(1500),
            db_max_connections: 8,
        };
        let saga = redpacket_saga_worker::Application::build(config, TestSwitches::default())
            .await
            .unwrap();
        let saga_url = format!("http://127.0.0.1:{}", saga.port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(saga.run_until_stopped(async {
            let _ = stopped.await;
        }));
        stops.push(stop);

        let mut config = gateway_config(&campaign_url, &wallet_url, &saga_url);
        adjust(&mut config);
        let gateway = Gateway::start(config).await;
        System {
            gateway,
            campaign_url,
            campaigns,
            redis_prefix,
            sagas: redpacket_saga_worker::store::SagaStore::new(saga_db),
            stop_campaign: Some(stop_campaign),
            _stops: stops,
            _databases: databases,
        }
    }

    /// Stops the campaign service: its port closes.
    pub async fn stop_campaign_service(&mut self) {
        if let Some(stop) = self.stop_campaign.take() {
            let _ = stop.send(());
        }
        // Graceful shutdown finishes requests in flight; wait until the port refuses.
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if client
                .get(format!("{}/health/live", self.campaign_url))
                .timeout(Duration::from_millis(200))
                .send()
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the campaign service did not stop");
    }

    /// Tops up a merchant through the gateway.
    pub async fn top_up(&self, merchant: &str, amount: i64) {
        let operator = token(Role::Operator, "ops");
        let response = self
            .gateway
            .client
            .post(format!("{}/v1/admin/topups", self.gateway.url))
            .bearer_auth(&operator)
            .header("Idempotency-Key", format!("t-{merchant}-{amount}"))
            .json(&json!({"merchant_id": merchant, "amount": amount, "currency": "CNY"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }

    /// Creates a campaign opening in `starts_in_ms` and waits until it is `active`.
    pub async fn active_campaign(&self, merchant: &str, total: i64, packets: i64) -> String {
        let id = self.create_campaign(merchant, total, packets, 1500).await;
        self.wait_status(merchant, &id, "active").await;
        id
    }

    pub async fn create_campaign(
        &self,
        merchant: &str,
        total: i64,
        packets: i64,
        starts_in_ms: i64,
    ) -> String {
        let (status, body) = self
            .gateway
            .post(
                "/v1/campaigns",
                &token(Role::Merchant, merchant),
                Some(json!({
                    "title": "gateway test", "currency": "CNY", "total_amount": total,
                    "packet_count": packets, "split": {"mode": "double_mean"},
                    "starts_at": redpacket_common::time::rfc3339_in(starts_in_ms),
                    "ends_at": redpacket_common::time::rfc3339_in(600_000), "seed": 3
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn wait_status(&self, merchant: &str, id: &str, wanted: &str) {
        let merchant = token(Role::Merchant, merchant);
        for _ in 0..300 {
            let (_, body) = self
                .gateway
                .get(&format!("/v1/campaigns/{id}"), &merchant)
                .await;
            if body["status"] == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("campaign {id} never became {wanted}");
    }
}

fn rand_id() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos.wrapping_add(u32::try_from(NEXT.fetch_add(7919, Ordering::Relaxed) % 100_000).unwrap())
}

/// How the fake upstream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Fail,
    Slow(u64),
    /// 503 `overloaded` with `Retry-After: 2`, as a service whose database pool is exhausted.
    Overloaded,
}

/// A stand-in for the campaign service whose behaviour a test switches.
pub struct FakeUpstream {
    pub url: String,
    mode: Arc<std::sync::Mutex<Mode>>,
    pub calls: Arc<AtomicU64>,
    _stop: oneshot::Sender<()>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let mode = Arc::new(std::sync::Mutex::new(Mode::Ok));
        let calls = Arc::new(AtomicU64::new(0));
        let (m, c) = (mode.clone(), calls.clone());
        let app = Route::new().nest(
            "/",
            poem::endpoint::make(move |_request| {
                let mode = *m.lock().unwrap();
                c.fetch_add(1, Ordering::Relaxed);
                async move {
                    match mode {
                        Mode::Ok => {}
                        Mode::Fail => {
                            return Response::builder()
                                .status(StatusCode::INTERNAL_SERVER_ERROR)
                                .content_type("application/problem+json")
                                .body(r#"{"code":"internal","status":500}"#);
                        }
                        Mode::Overloaded => {
                            return Response::builder()
                                .status(StatusCode::SERVICE_UNAVAILABLE)
                                .content_type("application/problem+json")
                                .header("retry-after", "2")
                                .body(r#"{"code":"overloaded","status":503}"#);
                        }
                        Mode::Slow(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    }
                    Response::builder()
                        .content_type("application/json")
                        .body(
                            json!({"claim_id": "c1", "campaign_id": "1", "amount": 1,
                                "currency": "CNY", "status": "pending", "merchant_id": "m1"})
                            .to_string(),
                        )
                        .into_response()
                }
            })
            .map_to_response(),
        );
        let listener = BoundListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let url = format!("http://{}", listener.local_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(listener.serve(app, async {
            let _ = stopped.await;
        }));
        FakeUpstream {
            url,
            mode,
            calls,
            _stop: stop,
        }
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}
