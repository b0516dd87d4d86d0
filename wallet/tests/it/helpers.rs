use redpacket_common::Secret;
use redpacket_common::testing::{Backend, TestDatabase};
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_wallet::{Application, Ledger, WalletConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// A wallet on port 0 over a fresh, migrated database.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub ledger: Ledger,
    database: TestDatabase,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    redpacket_common::telemetry::install_crypto_provider();
    let database = TestDatabase::create(backend).await;
    let db = redpacket_common::db::connect(&database.url, 8)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    let app = Application::with_database(db.clone(), "127.0.0.1:0".parse().unwrap())
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
        ledger: Ledger::new(db),
        database,
        stop,
        server,
    }
}

/// A wallet built as its binary builds it, from its configuration (its own pool of
/// `db_max_connections`), over a fresh migrated database.
pub async fn spawn_configured_app(backend: Backend, db_max_connections: u32) -> TestApp {
    redpacket_common::telemetry::install_crypto_provider();
    let database = TestDatabase::create(backend).await;
    let migrator = redpacket_common::db::connect(&database.url, 1)
        .await
        .unwrap();
    Migrator::up(&migrator, None).await.unwrap();
    migrator.close().await.unwrap();
    let config = WalletConfig {
        database_url: Secret::new(database.url.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        db_max_connections,
    };
    let app = Application::build(&config).await.unwrap();
    let ledger = Ledger::new(app.db().clone());
    let address = format!("http://127.0.0.1:{}", app.port());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        ledger,
        database,
        stop,
        server,
    }
}

pub fn transfer_body(id: &str, debit: &str, credit: &str, amount: i64) -> Value {
    json!({"id": id, "debit": debit, "credit": credit, "amount": amount, "currency": "CNY"})
}

impl TestApp {
    /// The URL of the wallet's own database, for a test that needs a connection of its own.
    pub fn database_url(&self) -> &str {
        &self.database.url
    }

    pub async fn post_raw(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.address))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    pub async fn transfer(&self, body: &Value) -> reqwest::Response {
        self.post_raw("/transfers", &body.to_string()).await
    }

    /// A transfer that must succeed; returns its JSON.
    pub async fn transfer_ok(&self, id: &str, debit: &str, credit: &str, amount: i64) -> Value {
        let response = self
            .transfer(&transfer_body(id, debit, credit, amount))
            .await;
        assert_eq!(response.status(), 200, "transfer {id}");
        response.json().await.unwrap()
    }

    pub async fn batch(&self, transfers: Vec<Value>) -> reqwest::Response {
        self.post_raw(
            "/transfers/batch",
            &json!({ "transfers": transfers }).to_string(),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap()
    }

    /// An account's balance, 0 when it was never used.
    pub async fn balance(&self, name: &str) -> i64 {
        let response = self.get(&format!("/accounts/{name}")).await;
        if response.status() == 404 {
            return 0;
        }
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["balance"]
            .as_i64()
            .unwrap()
    }

    /// Asserts every ledger invariant holds.
    pub async fn assert_invariants(&self) {
        for check in self.ledger.check_invariants().await.unwrap() {
            assert!(check.ok, "{}: {}", check.name, check.detail);
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
        self.ledger.db().clone().close().await.ok();
        self.database.drop_database().await;
    }
}

pub use redpacket_common::testing::assert_problem;
