use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redpacket_campaign::{Application, CampaignService, RedisPool, Store};
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::testing::{Backend, TestDatabase};
pub use redpacket_common::time::rfc3339_in;
use redpacket_migrations::{Migrator, MigratorTrait};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A campaign service on port 0 over a fresh database and its own Redis key prefix.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub service: CampaignService,
    pub pool: RedisPool,
    pub prefix: String,
    database: TestDatabase,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub fn redis_url() -> String {
    std::env::var("RP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with_buckets(backend, 4).await
}

pub async fn spawn_app_with_buckets(backend: Backend, buckets: u32) -> TestApp {
    redpacket_common::telemetry::install_crypto_provider();
    let database = TestDatabase::create(backend).await;
    let db = redpacket_common::db::connect(&database.url, 8)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    let prefix = format!("rpt:{}", uuid::Uuid::new_v4().simple());
    let pool = RedisPool::connect(&redis_url(), &prefix)
        .await
        .expect("the Redis test server must be running");
    let worker = rand::random::<u32>() % 1024;
    let service = CampaignService::new(
        Store::new(db),
        Arc::new(pool.clone()),
        Arc::new(SnowflakeGenerator::new(worker).unwrap()),
        buckets,
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
