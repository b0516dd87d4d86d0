use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redpacket_campaign::{
    Application, CampaignConfig, CampaignService, LocalPool, PacketPool, RedisPool, Store,
};
use redpacket_common::Secret;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::messages::{Envelope, SagaEvent};
use redpacket_common::testing::{Backend, TestDatabase, redis_url};
pub use redpacket_common::time::rfc3339_in;
use redpacket_migrations::{Migrator, MigratorTrait};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Which packet pool a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// The distributed system's: Redis.
    Redis,
    /// The embedded mode's: tables in the campaign's SQLite database.
    Local,
}

/// A test's database backend and packet pool.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub backend: Backend,
    pub pool: PoolKind,
}

/// Runs a scenario on every database with the Redis pool, and on SQLite with the local pool:
/// the pool's contract tests for both implementations.
#[macro_export]
macro_rules! on_every_pool {
    ($scenario:ident) => {
        mod $scenario {
            use redpacket_common::testing::Backend;

            use $crate::helpers::{PoolKind, Setup};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                super::$scenario(Setup {
                    backend: Backend::Postgres,
                    pool: PoolKind::Redis,
                })
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_mariadb() {
                super::$scenario(Setup {
                    backend: Backend::MySql,
                    pool: PoolKind::Redis,
                })
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                super::$scenario(Setup {
                    backend: Backend::Sqlite,
                    pool: PoolKind::Redis,
                })
                .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite_with_the_local_pool() {
                super::$scenario(Setup {
                    backend: Backend::Sqlite,
                    pool: PoolKind::Local,
                })
                .await;
            }
        }
    };
}

/// A campaign service on port 0 over a fresh database and its own Redis key prefix.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub service: CampaignService,
    pub setup: Setup,
    pub pool: RedisPool,
    pub prefix: String,
    database: TestDatabase,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app(setup: Setup) -> TestApp {
    spawn_app_with_buckets(setup, 4).await
}

pub async fn spawn_app_with_buckets(setup: Setup, buckets: u32) -> TestApp {
    spawn_app_on(setup, buckets, &redis_url()).await
}

/// A campaign service whose pool lives in the Redis at `redis`.
pub async fn spawn_app_on(setup: Setup, buckets: u32, redis: &str) -> TestApp {
    redpacket_common::telemetry::install_crypto_provider();
    let database = TestDatabase::create(setup.backend).await;
    let db = redpacket_common::db::connect(&database.url, 8)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    let prefix = format!("rpt:{}", uuid::Uuid::new_v4().simple());
    let pool = RedisPool::connect(redis, &prefix)
        .await
        .expect("the Redis test server must be running");
    let worker = rand::random::<u32>() % 1024;
    let packets: Arc<dyn PacketPool> = match setup.pool {
        PoolKind::Redis => Arc::new(pool.clone()),
        PoolKind::Local => Arc::new(LocalPool::open(db.clone()).await.unwrap()),
    };
    let service = CampaignService::new(
        Store::new(db),
        packets,
        Arc::new(SnowflakeGenerator::new(worker).unwrap()),
        buckets,
    )
    .with_rebuild_quiet(Duration::from_millis(500))
    .with_repair_min_age(Duration::from_millis(500))
    .with_repair_leases(
        redpacket_common::lease::LeaseManager::with_fence_key(
            pool.connection(),
            &format!("{prefix}:lease:fence"),
        ),
        format!("{prefix}:lease:campaign-repair"),
    );
    let app = Application::with_service(service.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        service,
        setup,
        pool,
        prefix,
        database,
        stop,
        server,
    }
}

/// A campaign service built as its binary builds it, from its configuration (its own pool of
/// `db_max_connections`, its own Redis connection), over a fresh migrated database.
pub async fn spawn_configured_app(backend: Backend, db_max_connections: u32) -> TestApp {
    redpacket_common::telemetry::install_crypto_provider();
    let database = TestDatabase::create(backend).await;
    let migrator = redpacket_common::db::connect(&database.url, 1)
        .await
        .unwrap();
    Migrator::up(&migrator, None).await.unwrap();
    migrator.close().await.unwrap();
    let prefix = format!("rpt:{}", uuid::Uuid::new_v4().simple());
    let config = CampaignConfig {
        database_url: Secret::new(database.url.clone()),
        redis_url: Secret::new(redis_url()),
        worker_id: rand::random::<u32>() % 1024,
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_prefix: prefix.clone(),
        buckets: 4,
        db_max_connections,
    };
    let app = Application::build(&config).await.unwrap();
    let service = app.service().clone();
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let pool = RedisPool::connect(&redis_url(), &prefix)
        .await
        .expect("the Redis test server must be running");
    TestApp {
        address,
        client: reqwest::Client::new(),
        service,
        setup: Setup {
            backend,
            pool: PoolKind::Redis,
        },
        pool,
        prefix,
        database,
        stop,
        server,
    }
}

/// A campaign body starting now and lasting a minute.
pub fn campaign_body(total: i64, packets: i64, limit: i64) -> Value {
    json!({
        "merchant_id": "m1",
        "title": "Spring festival",
        "currency": "CNY",
        "total_amount": total,
        "packet_count": packets,
        "split": {"mode": "double_mean"},
        "per_user_limit": limit,
        "starts_at": rfc3339_in(-1_000),
        "ends_at": rfc3339_in(60_000),
        "seed": 42
    })
}

impl TestApp {
    /// The URL of the app's own database, for a test that needs a connection of its own.
    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    /// Creates a campaign and returns its id.
    pub async fn create(&self, body: &Value) -> String {
        let response = self.post("/campaigns", body).await;
        assert_eq!(response.status(), 201);
        let campaign: Value = response.json().await.unwrap();
        campaign["id"].as_str().unwrap().to_owned()
    }

    /// Marks funded and waits until the pool is loaded and the campaign active.
    pub async fn fund_and_open(&self, id: &str) {
        let response = self
            .post(&format!("/campaigns/{id}/funded"), &json!({}))
            .await;
        assert_eq!(response.status(), 200);
        self.wait_for_status(id, "active").await;
    }

    pub async fn wait_for_status(&self, id: &str, status: &str) {
        for _ in 0..100 {
            let campaign = self.get_json(&format!("/campaigns/{id}")).await;
            if campaign["status"] == status {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("campaign {id} never became {status}");
    }

    pub async fn grab(&self, id: &str, user: &str) -> reqwest::Response {
        self.post(
            &format!("/campaigns/{id}/grab"),
            &json!({ "user_id": user }),
        )
        .await
    }

    /// Every hand-off entry of a campaign: (claim id, user, seq, amount).
    pub async fn handoff(&self, id: &str, buckets: u32) -> Vec<(String, String, u32, i64)> {
        if self.setup.pool == PoolKind::Local {
            return self.local_handoff(id).await;
        }
        let mut connection = self.pool.connection();
        let mut entries = Vec::new();
        for bucket in 0..buckets {
            let key = self.pool.stream_key(id.parse().unwrap(), bucket);
            let reply: redis::streams::StreamRangeReply =
                connection.xrange_all(&key).await.unwrap();
            for entry in reply.ids {
                let field = |name: &str| -> String {
                    redis::from_redis_value(entry.map.get(name).unwrap().clone()).unwrap()
                };
                entries.push((
                    field("claim"),
                    field("user"),
                    field("seq").parse().unwrap(),
                    field("amount").parse().unwrap(),
                ));
            }
        }
        entries
    }

    /// The local pool's hand-off: grab messages in the local queue.
    async fn local_handoff(&self, id: &str) -> Vec<(String, String, u32, i64)> {
        use sea_orm::ConnectionTrait;
        let db = self.service.store().db();
        let rows = db
            .query_all_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                "SELECT body FROM local_messages WHERE queue = 'work' ORDER BY id",
            ))
            .await
            .unwrap();
        rows.iter()
            .filter_map(|row| {
                let body: String = row.try_get_by_index(0).unwrap();
                match Envelope::from_bytes(body.as_bytes()).unwrap().event {
                    SagaEvent::GrabClaimed {
                        claim_id,
                        campaign_id,
                        user_id,
                        packet_seq,
                        amount,
                        ..
                    } if campaign_id == id => Some((claim_id, user_id, packet_seq, amount)),
                    _ => None,
                }
            })
            .collect()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
        let mut connection = self.pool.connection();
        let keys: Vec<String> = connection.keys(format!("{}:*", self.prefix)).await.unwrap();
        if !keys.is_empty() {
            let _: () = connection.del(keys).await.unwrap();
        }
        self.service.store().db().clone().close().await.ok();
        self.database.drop_database().await;
    }
}

pub use redpacket_common::testing::assert_problem;
