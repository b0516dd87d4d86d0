//! Black-box tests of the campaign service through its HTTP API, on real Redis and
//! PostgreSQL, MariaDB or SQLite.

mod claims;
mod create;
mod grab;
mod helpers;

/// Runs an async scenario once per database backend, as three separately named tests.
#[macro_export]
macro_rules! on_every_backend {
    ($scenario:ident) => {
        mod $scenario {
            use redpacket_common::testing::Backend;

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
