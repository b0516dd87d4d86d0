use std::sync::Arc;
use std::time::Duration;

use redpacket_campaign::{CampaignService, RedisPool, Store};
use redpacket_common::Secret;
use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::testing::{Backend, TestDatabase};
pub use redpacket_common::testing::{amqp_url, redis_url};
pub use redpacket_common::time::rfc3339_in;
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_saga_worker::broker::Broker;
use redpacket_saga_worker::store::SagaStore;
use redpacket_saga_worker::{Application, SagaConfig, TestSwitches};
use redpacket_wallet::Ledger;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::faults::{self, Faults};

/// A saga worker in its own runtime and thread: it can stop cleanly or crash like a process.
pub struct SagaProcess {
    stop: Option<oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub broker: Broker,
    pub url: String,
}

impl SagaProcess {
    pub fn start(config: SagaConfig, switches: TestSwitches) -> SagaProcess {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = Application::build(config, switches)
                    .await
                    .expect("saga worker starts");
                ready_tx
                    .send((
                        app.broker()
                            .expect("the distributed worker has a broker")
                            .clone(),
                        app.port(),
                    ))
                    .unwrap();
                let (graceful_tx, graceful_rx) = oneshot::channel::<()>();
                let server = tokio::spawn(app.run_until_stopped(async {
                    let _ = graceful_rx.await;
                }));
                let graceful = stopped.await.unwrap_or(true);
                if graceful {
                    let _ = graceful_tx.send(());
                    let _ = server.await;
                }
                // Not graceful: leaving block_on drops the runtime with every task in it, like a
                // process that dies (no acks, no lease releases).
            });
            runtime.shutdown_background();
        });
        let (broker, port) = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("saga worker ready");
        SagaProcess {
            stop: Some(stop),
            thread: Some(thread),
            broker,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn stop(mut self) {
        self.finish(true);
    }

    pub fn crash(mut self) {
        self.finish(false);
    }

    fn finish(&mut self, graceful: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(graceful);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SagaProcess {
    fn drop(&mut self) {
        self.finish(true);
    }
}

/// The wallet, the campaign service and the saga worker, wired together.
pub struct System {
    pub client: reqwest::Client,
    pub wallet_url: String,
    /// The running wallet's stop signal and task, while it runs.
    wallet_process: Option<(
        oneshot::Sender<()>,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
    wallet_db: sea_orm::DatabaseConnection,
    pub campaign_url: String,
    pub ledger: Ledger,
    pub campaigns: CampaignService,
    pub sagas: SagaStore,
    /// Between the saga worker and the wallet.
    pub faults: Faults,
    /// Between the saga worker and the campaign service.
    pub campaign_faults: Faults,
    pub worker: Option<SagaProcess>,
    pub config: SagaConfig,
    redis_prefix: String,
    /// The Redis the system runs on.
    redis: String,
    databases: Vec<TestDatabase>,
    stops: Vec<oneshot::Sender<()>>,
}

/// A fresh database, with a pool that waits for connections rather than refusing: these tests
/// load the machine with the whole suite, and test the sagas, not the services' overload
/// answers (the services' own tests do).
async fn database() -> (TestDatabase, sea_orm::DatabaseConnection) {
    let database = TestDatabase::create(Backend::Postgres).await;
    // Small pools: six of these systems run at once against one PostgreSQL (100 connections).
    let db = redpacket_common::db::connect_patient(&database.url, 4)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    (database, db)
}

pub async fn spawn_system(switches: TestSwitches, credit_batch: usize) -> System {
    spawn_system_with(switches, credit_batch, |_| {}).await
}

/// [`spawn_system`] with the saga worker's settings adjusted first.
pub async fn spawn_system_with(
    switches: TestSwitches,
    credit_batch: usize,
    adjust: impl FnOnce(&mut SagaConfig),
) -> System {
    spawn_system_on(&redis_url(), switches, credit_batch, adjust).await
}

/// [`spawn_system_with`] on the Redis at `redis` (a test's private one).
pub async fn spawn_system_on(
    redis: &str,
    switches: TestSwitches,
    credit_batch: usize,
    adjust: impl FnOnce(&mut SagaConfig),
) -> System {
    redpacket_common::telemetry::install_crypto_provider();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let redis_prefix = format!("rpt:{suffix}");
    let amqp_prefix = format!("rpt.{suffix}");
    let mut stops = Vec::new();
    let mut databases = Vec::new();

    let (wallet_database, wallet_db) = database().await;
    databases.push(wallet_database);
    let wallet = redpacket_wallet::Application::with_database(
        wallet_db.clone(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let wallet_url = format!("http://127.0.0.1:{}", wallet.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let wallet_task = tokio::spawn(wallet.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let wallet_process = Some((stop, wallet_task));

    let (campaign_database, campaign_db) = database().await;
    // The test's own reads of the campaign tables go through connections of their own, so
    // that they neither wait behind the service's pool nor take its connections.
    let reads_db = redpacket_common::db::connect_patient(&campaign_database.url, 2)
        .await
        .unwrap();
    databases.push(campaign_database);
    let pool = Arc::new(RedisPool::connect(redis, &redis_prefix).await.unwrap());
    let service = CampaignService::new(
        Store::new(campaign_db),
        pool.clone(),
        Arc::new(SnowflakeGenerator::new(rand::random::<u32>() % 512).unwrap()),
        4,
    )
    .with_rebuild_quiet(Duration::from_secs(2));
    let campaigns = CampaignService::new(
        Store::new(reads_db),
        pool,
        Arc::new(SnowflakeGenerator::new(rand::random::<u32>() % 512).unwrap()),
        4,
    );
    let campaign =
        redpacket_campaign::Application::with_service(service, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
    let campaign_url = format!("http://127.0.0.1:{}", campaign.port());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(campaign.run_until_stopped(async {
        let _ = stopped.await;
    }));
    stops.push(stop);

    let faults = faults::start(wallet_url.clone()).await;
    let campaign_faults = faults::start(campaign_url.clone()).await;
    let (saga_database, saga_db) = database().await;
    let saga_url = saga_database.url.clone();
    databases.push(saga_database);
    let config = SagaConfig {
        database_url: Secret::new(saga_url),
        redis_url: Secret::new(redis.to_owned()),
        amqp_url: Secret::new(amqp_url()),
        campaign_url: campaign_faults.url.clone(),
        wallet_url: faults.url.clone(),
        worker_id: 512 + rand::random::<u32>() % 500,
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_prefix: redis_prefix.clone(),
        amqp_prefix,
        prefetch: 256,
        credit_batch,
        credit_linger: Duration::from_millis(5),
        retry_base: Duration::from_millis(20),
        retry_budget: Duration::from_secs(30),
        wait_max: Duration::from_secs(60),
        lease_ttl: Duration::from_millis(1500),
        db_max_connections: 4,
    };
    let mut config = config;
    adjust(&mut config);
    let worker = SagaProcess::start(config.clone(), switches);
    System {
        client: reqwest::Client::new(),
        wallet_url,
        wallet_process,
        wallet_db: wallet_db.clone(),
        campaign_url,
        ledger: Ledger::new(wallet_db),
        campaigns,
        sagas: SagaStore::new(saga_db),
        faults,
        campaign_faults,
        worker: Some(worker),
        config,
        redis_prefix,
        redis: redis.to_owned(),
        databases,
        stops,
    }
}

impl System {
    pub async fn post(&self, url: &str, body: Value) -> reqwest::Response {
        self.client.post(url).json(&body).send().await.unwrap()
    }

    /// A GET that, as a real client does, waits out 503s (an overloaded service under the
    /// whole test suite's load) for a bounded time.
    pub async fn get_json(&self, url: &str) -> Value {
        for _ in 0..50 {
            let response = self.client.get(url).send().await.unwrap();
            if response.status() == 503 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert!(
                response.status().is_success(),
                "GET {url}: {}",
                response.status()
            );
            return response.json().await.unwrap();
        }
        panic!("GET {url}: 503 for 10 s");
    }

    pub async fn top_up(&self, merchant: &str, amount: i64) {
        let response = self
            .post(&format!("{}/transfers", self.wallet_url), json!({"id": format!("topup-{merchant}-{amount}"),
                "debit": "external", "credit": format!("merchant:{merchant}"), "amount": amount, "currency": "CNY"}))
            .await;
        assert_eq!(response.status(), 200);
    }

    pub async fn balance(&self, account: &str) -> i64 {
        for _ in 0..50 {
            let response = self
                .client
                .get(format!("{}/accounts/{account}", self.wallet_url))
                .send()
                .await
                .unwrap();
            match response.status().as_u16() {
                404 => return 0,
                503 => tokio::time::sleep(Duration::from_millis(200)).await,
                _ => {
                    return response.json::<Value>().await.unwrap()["balance"]
                        .as_i64()
                        .unwrap();
                }
            }
        }
        panic!("the wallet answered 503 for 10 s");
    }

    /// Creates a campaign starting now; returns its id.
    pub async fn create_campaign(
        &self,
        merchant: &str,
        total: i64,
        packets: i64,
        ends_in_ms: i64,
    ) -> String {
        let response = self
            .post(&format!("{}/campaigns", self.campaign_url), json!({
                "merchant_id": merchant, "title": "saga test", "currency": "CNY",
                "total_amount": total, "packet_count": packets, "split": {"mode": "double_mean"},
                "starts_at": rfc3339_in(-1000), "ends_at": rfc3339_in(ends_in_ms), "seed": 7,
            }))
            .await;
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn campaign(&self, id: &str) -> Value {
        self.get_json(&format!("{}/campaigns/{id}", self.campaign_url))
            .await
    }

    pub async fn stats(&self, id: &str) -> Value {
        self.get_json(&format!("{}/campaigns/{id}/stats", self.campaign_url))
            .await
    }

    /// Polls until `check` holds, for at most `seconds`.
    pub async fn wait_until<F, Fut>(&self, seconds: u64, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out after {seconds} s waiting until {what}");
    }

    pub async fn wait_for_status(&self, id: &str, status: &str, seconds: u64) {
        self.wait_until(seconds, &format!("campaign {id} is {status}"), || async {
            self.campaign(id).await["status"] == status
        })
        .await;
    }

    /// Grabs with `users` distinct users, `in_flight` at a time; returns the granted grabs.
    pub async fn grab_all(&self, id: &str, users: usize, in_flight: usize) -> Vec<Value> {
        use futures::StreamExt;
        let url = format!("{}/campaigns/{id}/grab", self.campaign_url);
        futures::stream::iter(0..users)
            .map(|i| {
                let (client, url) = (self.client.clone(), url.clone());
                async move {
                    let response = client
                        .post(url)
                        .json(&json!({"user_id": format!("u{i}")}))
                        .send()
                        .await
                        .unwrap();
                    if response.status() == 200 {
                        Some(response.json::<Value>().await.unwrap())
                    } else {
                        None
                    }
                }
            })
            .buffer_unordered(in_flight)
            .filter_map(|grab| async move { grab })
            .collect()
            .await
    }

    /// Redis keys of this system that contain `part`, the hand-off registry's members included.
    pub async fn redis_keys(&self, part: &str) -> Vec<String> {
        let mut redis = redis::Client::open(self.redis.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.redis_prefix))
            .query_async(&mut redis)
            .await
            .unwrap();
        let registered: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}:handoff:streams", self.redis_prefix))
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.extend(registered);
        keys.retain(|key| key.contains(part));
        keys
    }

    pub async fn assert_ledger(&self) {
        for check in self.ledger.check_invariants().await.unwrap() {
            assert!(check.ok, "{}: {}", check.name, check.detail);
        }
    }

    /// Stops the wallet: its port refuses connections until [`System::start_wallet`].
    pub async fn stop_wallet(&mut self) {
        if let Some((stop, task)) = self.wallet_process.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }

    /// Starts the wallet again on its port, over its database.
    pub async fn start_wallet(&mut self) {
        let address = self
            .wallet_url
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let wallet = redpacket_wallet::Application::with_database(self.wallet_db.clone(), address)
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(wallet.run_until_stopped(async {
            let _ = stopped.await;
        }));
        self.wallet_process = Some((stop, task));
    }

    pub async fn stop(mut self) {
        self.stop_wallet().await;
        if let Some(worker) = self.worker.take() {
            let broker = worker.broker.clone();
            worker.stop();
            delete_topology(&broker).await;
        }
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        let mut redis = redis::Client::open(self.redis.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.redis_prefix))
            .query_async(&mut redis)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for database in self.databases.drain(..) {
            database.drop_database().await;
        }
    }
}

/// Deletes a test's exchange and queues from the broker.
pub async fn delete_topology(broker: &Broker) {
    if let Err(err) = broker.delete_topology().await {
        eprintln!(
            "leftover RabbitMQ names of {:?}: {err}",
            broker.topology().prefix
        );
    }
}
