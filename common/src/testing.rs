//! Test support: a fresh database per test on the real servers.
//!
//! The servers are named by `RP_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `RP_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306/mysql`). Every database is called `rp_t_<random>` so tests
//! run in parallel and the test script can drop leftovers of earlier runs by prefix. A server
//! that does not answer fails the test: nothing is skipped silently.

use sea_orm::{ConnectionTrait, Database};

/// Which database server a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MySql,
    Sqlite,
}

/// A database created for one test.
#[derive(Debug)]
pub struct TestDatabase {
    pub backend: Backend,
    pub url: String,
    name: String,
    admin_url: Option<String>,
}

fn admin_url(backend: Backend) -> String {
    match backend {
        Backend::Postgres => std::env::var("RP_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        Backend::MySql => std::env::var("RP_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_owned()),
        Backend::Sqlite => String::new(),
    }
}

impl TestDatabase {
    /// Creates an empty database on the backend's server.
    pub async fn create(backend: Backend) -> Self {
        let name = format!("rp_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        if backend == Backend::Sqlite {
            let dir = std::env::temp_dir().join("redpacket-tests");
            std::fs::create_dir_all(&dir).expect("create the temporary directory");
            let path = dir.join(format!("{name}.sqlite"));
            return TestDatabase {
                backend,
                url: format!("sqlite://{}?mode=rwc", path.display()),
                name,
                admin_url: None,
            };
        }
        let admin = admin_url(backend);
        let connection = Database::connect(&admin).await.unwrap_or_else(|err| {
            panic!("the {backend:?} test server at {admin} must be running: {err}")
        });
        // A MySQL database starts with MariaDB's default, case-insensitive collation whatever
        // the test server is configured with, as a production database created before the
        // binary-keys migration did: the tests then show that the migrations make every key
        // compare bytes exactly.
        let create = match backend {
            Backend::MySql => {
                format!("CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
            }
            _ => format!("CREATE DATABASE {name}"),
        };
        connection
            .execute_unprepared(&create)
            .await
            .unwrap_or_else(|err| panic!("creating test database {name}: {err}"));
        connection.close().await.ok();
        TestDatabase {
            backend,
            url: crate::db::database_url(&admin, &name),
            name,
            admin_url: Some(admin),
        }
    }

    /// Drops the database (SQLite: deletes the file). Leftovers of failed tests are dropped by
    /// the test script by their `rp_t_` prefix.
    pub async fn drop_database(self) {
        match self.admin_url {
            Some(admin) => {
                if let Ok(connection) = Database::connect(&admin).await {
                    let sql = match self.backend {
                        Backend::Postgres => {
                            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
                        }
                        _ => format!("DROP DATABASE IF EXISTS {}", self.name),
                    };
                    connection.execute_unprepared(&sql).await.ok();
                    connection.close().await.ok();
                }
            }
            None => {
                let path = std::env::temp_dir()
                    .join("redpacket-tests")
                    .join(format!("{}.sqlite", self.name));
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::remove_file(format!("{}{suffix}", path.display())).ok();
                }
            }
        }
    }
}

/// Runs an async scenario `fn(Backend)` once per database backend, as three tests named
/// `scenario::on_postgres`, `::on_mariadb` and `::on_sqlite`.
#[macro_export]
macro_rules! on_every_backend {
    ($scenario:ident) => {
        mod $scenario {
            use $crate::testing::Backend;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                super::$scenario(Backend::Postgres).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_mariadb() {
                super::$scenario(Backend::MySql).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                super::$scenario(Backend::Sqlite).await;
            }
        }
    };
}

/// Waits until a statement of another session on `observer`'s database has been waiting for a
/// while (PostgreSQL: for a lock; MariaDB: running for more than 200 ms), the sign that a
/// request of the service under test holds one of its pooled connections while it waits for a
/// lock the test holds. Panics after `timeout`.
pub async fn wait_for_a_waiting_statement(
    observer: &sea_orm::DatabaseConnection,
    timeout: std::time::Duration,
) {
    let backend = observer.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'"
        }
        // InnoDB's own view lists a waiting transaction only once it holds a lock of its own;
        // the process list shows every statement with how long it has run.
        _ => {
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() \
             AND ID <> CONNECTION_ID() AND COMMAND <> 'Sleep' AND TIME_MS > 200"
        }
    };
    let started = std::time::Instant::now();
    loop {
        let row = observer
            .query_one_raw(sea_orm::Statement::from_string(backend, sql))
            .await
            .unwrap()
            .unwrap();
        let waiting: i64 = row.try_get_by_index(0).unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "no statement waited within {timeout:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Asserts a problem+json answer: status, content type, `code` and `field`; returns the body.
pub async fn assert_problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
    field: Option<&str>,
) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["field"].as_str(), field, "{body}");
    assert!(body["type"].as_str().unwrap().ends_with(code), "{body}");
    body
}

/// The Redis of the tests (`RP_TEST_REDIS_URL`, default the local one); each test keeps its
/// keys under its own prefix.
pub fn redis_url() -> String {
    std::env::var("RP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The RabbitMQ of the tests (`RP_TEST_AMQP_URL`, default the local one); each test declares
/// its own exchange and queue names.
pub fn amqp_url() -> String {
    std::env::var("RP_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

#[cfg(test)]
mod tests {
    use crate::db::database_url as with_database;

    #[test]
    fn the_database_part_of_a_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("mysql://root@h:3306", "x"),
            "mysql://root@h:3306/x"
        );
        assert_eq!(
            with_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}

/// A `redis-server` of a test's own, on a free loopback port, for tests that flush, restart
/// or reconfigure Redis without touching the shared one. Stopped (killed) on drop.
#[derive(Debug)]
pub struct PrivateRedis {
    pub port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
    args: Vec<String>,
}

impl PrivateRedis {
    /// Starts one with `args` added to a persistence-free default (`--save ""`).
    pub async fn start(args: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let dir = std::env::temp_dir()
            .join("redpacket-tests")
            .join(format!("redis-{port}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a directory for the private Redis");
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        let child = Self::spawn(port, &dir, &args);
        let redis = PrivateRedis {
            port,
            child,
            dir,
            args,
        };
        redis.wait_answering().await;
        redis
    }

    fn spawn(port: u16, dir: &std::path::Path, args: &[String]) -> std::process::Child {
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)")
    }

    async fn wait_answering(&self) {
        // Loading a long append-only file takes a while: LOADING answers are not ready yet.
        for _ in 0..1200 {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!(
            "the private redis-server on port {} did not start",
            self.port
        );
    }

    /// SIGKILLs it: whatever it did not persist is gone, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, directory and settings (so from its append-only file
    /// when it has one), after [`PrivateRedis::kill`] or a crash.
    pub async fn start_again(&mut self) {
        self.kill();
        // The port may still be held a moment after the kill: a start that exits is retried.
        for _ in 0..50 {
            self.child = Self::spawn(self.port, &self.dir, &self.args);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if !matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
        }
        self.wait_answering().await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A command against it, for a test to change its settings or its data.
    pub async fn run(&self, command: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd(command[0]);
        for arg in &command[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut connection).await.unwrap()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
